//! The `kv` class's request parsing: up to 8 requests (see `duro_fuzz::parse_kv_input`) sent in
//! order to a fresh kv object of an in-process host (opened once per process), each read from
//! its wire form as the server reads it. Every request must be answered with 2xx or 4xx: a
//! panic would reset the object, an error would reach the caller as a failure. The object's
//! storage is emptied afterwards, so every input starts from nothing.
#![no_main]

use duro::duro_capnp::http_request;
use duro::wire::convert;
use duro_fuzz::{KvRequest, LocalHost};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static HOST: LocalHost = LocalHost::open(
        duro::Server::builder()
            .class("kv", |state, _env| {
                duro_fuzz::stash_state(&state);
                duro::builtin::kv::Kv::new(state)
            })
            .namespace("kv", "kv"),
    );
}

fuzz_target!(|data: &[u8]| {
    let requests = duro_fuzz::parse_kv_input(data);
    HOST.with(|local| local.block_on(run(&local.host, requests)));
});

/// The request as the server reads it off the wire; `None` where the server refuses it.
fn from_the_wire(request: &KvRequest) -> Option<duro::Request> {
    let url = std::str::from_utf8(&request.url).ok()?;
    let mut message = capnp::message::Builder::new_default();
    let mut builder: http_request::Builder = message.init_root();
    builder.set_method(request.method.as_str());
    builder.set_url(url);
    builder.set_body(&request.body);
    convert::request_from_capnp(message.get_root_as_reader().ok()?).ok()
}

async fn run(host: &duro::Host, requests: Vec<KvRequest>) {
    let namespace = host.namespace("kv").expect("the kv namespace");
    let stub = namespace.get(&namespace.new_unique_id()).expect("a stub");
    for request in &requests {
        let Some(wire) = from_the_wire(request) else {
            continue;
        };
        let (method, uri) = (wire.method().clone(), wire.uri().clone());
        match stub.fetch(wire).await {
            Ok(response) => {
                let status = response.status();
                assert!(
                    status.is_success() || status.is_client_error(),
                    "{method} {uri} answered {status}: {:?}",
                    String::from_utf8_lossy(response.body())
                );
            }
            Err(error) => panic!(
                "{method} {uri} (body of {} bytes) failed: {error}",
                request.body.len()
            ),
        }
    }
    for state in duro_fuzz::take_states() {
        let storage = state.storage();
        storage.delete_all().await.expect("emptying the object");
        storage.sync().await.expect("emptying the object");
    }
    drop(stub);
    host.evict_idle();
}
