//! `client`: what duro's Rust client (`duro::client::Client`) adds to a call, against the same
//! calls made with bare capnp stubs (`noop` and `incr`'s own generator), on one server, in
//! alternation: `GET` on one warm counter, and `POST` (a durable increment) over 1000
//! counters, each with 64 calls in flight on one connection.
//!
//! The client runs its connection on a thread of its own, so its generator CPU is this whole
//! process's (the calling thread and the client's), not the calling thread's alone.

use std::rc::Rc;

use super::Settings;
use super::capnp_load::{self, PAYLOAD};
use super::child;
use super::durable::SPREAD_OBJECTS;
use super::measure::{Series, process_cpu};
use super::rpc_group::{CallFn, Shape, run_shape};
use duro::client::{Client, RemoteStub};
use duro::duro_capnp::host;

pub const WORKLOAD: &str = "client";
/// The same calls with bare capnp stubs.
pub const BARE: &str = "client-bare";
pub const NOOP: &str = "noop, 64 in flight";
pub const INCR: &str = "incr 1000 objects, 64 in flight";

const SHAPE: Shape = Shape {
    connections: 1,
    in_flight: 64,
};

pub fn run(settings: &Settings) -> Vec<Series> {
    duro::testing::run_local(run_group(settings))
}

/// `method /` on stub `i % stubs.len()` through the Rust client.
fn client_calls(stubs: Vec<RemoteStub>, method: &'static str) -> CallFn {
    Rc::new(move |_, i| {
        let stub = &stubs[(i % stubs.len() as u64) as usize];
        let call = stub.call(method, "/", PAYLOAD);
        Box::pin(async move {
            let response = call.await.map_err(|e| e.to_string())?;
            match response.status().as_u16() {
                200 => Ok(()),
                status => Err(format!("status {status}")),
            }
        })
    })
}

/// The same with bare capnp stubs.
fn bare_calls(
    stubs: Vec<duro::duro_capnp::durable_object::Client>,
    method: &'static str,
) -> CallFn {
    Rc::new(move |_, i| {
        let stub = &stubs[(i % stubs.len() as u64) as usize];
        Box::pin(capnp_load::fetch(stub, method, "/", PAYLOAD, &[200]))
    })
}

async fn run_group(settings: &Settings) -> Vec<Series> {
    let mut series = vec![
        Series::new(WORKLOAD, NOOP),
        Series::new(BARE, NOOP),
        Series::new(WORKLOAD, INCR),
        Series::new(BARE, INCR),
    ];
    let fail_all = |series: &mut Vec<Series>, e: String| {
        series.iter_mut().for_each(|s| s.fail(e.clone()));
    };
    let duro = match child::start_duro(&settings.fresh_dir("client"), false) {
        Ok(duro) => duro,
        Err(e) => {
            fail_all(&mut series, e);
            return series;
        }
    };
    let pid = duro.child.pid();
    let client = match Client::connect(duro.addr).await {
        Ok(client) => client,
        Err(e) => {
            fail_all(&mut series, format!("the Rust client: {e}"));
            return series;
        }
    };
    let host: host::Client = match capnp_load::connect(duro.addr).await {
        Ok(host) => host,
        Err(e) => {
            fail_all(&mut series, e);
            return series;
        }
    };
    let namespace = client.namespace("counter");
    let bare_namespace = capnp_load::namespace(&host, "counter");
    let names: Vec<String> = (0..SPREAD_OBJECTS).map(|i| format!("c{i}")).collect();
    let calls: [CallFn; 4] = [
        client_calls(vec![namespace.get_by_name("noop")], "GET"),
        bare_calls(vec![capnp_load::stub(&bare_namespace, "noop")], "GET"),
        client_calls(
            names.iter().map(|n| namespace.get_by_name(n)).collect(),
            "POST",
        ),
        bare_calls(
            names
                .iter()
                .map(|n| capnp_load::stub(&bare_namespace, n))
                .collect(),
            "POST",
        ),
    ];
    for (series, call) in series.iter_mut().zip(&calls) {
        if let Err(e) = run_shape(SHAPE, settings.warmup_budget(), call, &|| None).await {
            series.fail(e);
        }
    }
    let server_cpu = move || child::process_cpu(pid);
    for _ in 0..settings.runs {
        for (series, call) in series.iter_mut().zip(&calls) {
            if series.failed() {
                continue;
            }
            let before = process_cpu();
            let run = run_shape(SHAPE, settings.run_budget(), call, &server_cpu)
                .await
                .map(|mut run| {
                    run.generator_cpu = before.zip(process_cpu()).map(|(b, a)| a - b);
                    run
                });
            series.push(run);
        }
    }
    drop(client);
    series
}
