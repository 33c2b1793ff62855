//! A server with two shards, with the objects placed on purpose: each test picks names whose
//! IDs map to the shard it wants (through the data dir's virtual shards), and knows which shard
//! serves each connection (they are handed to the shards in turn, the first to shard 0). So
//! every call below that crosses shards does cross them, whatever the random secrets.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use duro::duro_capnp::{durable_object, host, namespace, response_context};
use duro::rpc::CONNECTION_CALLS_MAX;
use duro::storage::{VIRTUAL_SHARDS_DEFAULT, virtual_shard};
use duro::testing::{TestServer, fetch, fetch_call, request, run_local};
use duro::{
    BoxError, DurableObject, Env, Error, Request, Response, Server, State, StreamRequest,
    StreamResponse,
};

const SHARDS: usize = 2;

/// Numbers the calls it gets, in order; `/panic` panics (a reset); `/call/NAME` calls the probe
/// `NAME` through its env, twice, and answers what the second call answered.
struct Probe {
    seen: RefCell<Vec<String>>,
    env: Env,
}

impl DurableObject for Probe {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let path = request.uri().path().to_owned();
        if path == "/panic" {
            panic!("a reset on purpose");
        }
        if let Some(name) = path.strip_prefix("/call/") {
            let probes = self.env.namespace("probe").ok_or("no probe namespace")?;
            let stub = probes.get_by_name(name)?;
            stub.fetch(request_of("POST", "/from-env")).await?;
            let second = stub.fetch(request_of("POST", "/from-env")).await?;
            return Ok(Response::new(second.into_body()));
        }
        self.seen.borrow_mut().push(path);
        Ok(Response::new(self.seen.borrow().len().to_string().into()))
    }
}

/// Never reads its request body, never answers.
struct Stall;

impl DurableObject for Stall {
    async fn fetch_stream(&self, _request: StreamRequest) -> Result<StreamResponse, BoxError> {
        std::future::pending().await
    }
}

/// A response context that is never called (the stall never answers).
struct NoAnswer;

impl response_context::Server for NoAnswer {}

fn request_of(method: &str, path: &str) -> Request {
    request(method, path, b"")
}

/// A server with [`SHARDS`] shards and the probe class; how many probes were built.
fn server() -> (TestServer, Arc<AtomicUsize>) {
    let built = Arc::new(AtomicUsize::new(0));
    let counter = built.clone();
    let builder = duro::builtin::register(Server::builder())
        .class("probe", move |_state: State, env| {
            counter.fetch_add(1, Ordering::SeqCst);
            Probe {
                seen: RefCell::default(),
                env,
            }
        })
        .namespace("probe", "probe")
        .class("stall", |_state, _env| Stall)
        .namespace("stall", "stall")
        .shards(SHARDS)
        .http("127.0.0.1:0".parse().unwrap());
    (TestServer::start(builder), built)
}

fn probes(host: &host::Client) -> namespace::Client {
    named(host, "probe")
}

fn named(host: &host::Client, name: &str) -> namespace::Client {
    let mut ns = host.namespace_request();
    ns.get().set_name(name);
    ns.send().pipeline.get_namespace()
}

fn stub(namespace: &namespace::Client, name: &str) -> durable_object::Client {
    let mut get = namespace.get_by_name_request();
    get.get().set_name(name);
    get.send().pipeline.get_stub()
}

/// A name whose object lives on `shard`, different from `other` names.
async fn name_on(namespace: &namespace::Client, shard: usize, prefix: &str) -> String {
    for i in 0..1000 {
        let name = format!("{prefix}{i}");
        let mut call = namespace.id_from_name_request();
        call.get().set_name(&name);
        let reply = call.send().promise.await.unwrap();
        let bytes: [u8; 32] = reply
            .get()
            .unwrap()
            .get_id()
            .unwrap()
            .get_bytes()
            .unwrap()
            .try_into()
            .unwrap();
        if virtual_shard(&bytes, VIRTUAL_SHARDS_DEFAULT) as usize % SHARDS == shard {
            return name;
        }
    }
    panic!("no name maps to shard {shard}");
}

async fn body(stub: &durable_object::Client, method: &str, path: &str) -> Result<String, Error> {
    let response = fetch(stub, request_of(method, path)).await?;
    Ok(String::from_utf8_lossy(response.body()).into_owned())
}

#[test]
fn calls_from_one_shard_reach_the_one_instance_on_another_in_order() {
    let (server, built) = server();
    run_local(async {
        // The first connection is served by shard 0, the second by shard 1.
        let first = server.connect().await;
        let second = server.connect().await;
        let namespace = probes(&first);
        let far = name_on(&namespace, 1, "far").await;
        let near_stub = stub(&namespace, &far);
        // 200 calls pipelined on one stub, from shard 0 to an object of shard 1, each sent
        // before the first answer: they arrive in the order made.
        let calls: Vec<_> = (0..200)
            .map(|i| fetch_call(&near_stub, &request_of("POST", &format!("/{i}"))))
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let reply = call.promise.await.unwrap();
            let response = reply.get().unwrap().get_response().unwrap();
            assert_eq!(response.get_body().unwrap(), (i + 1).to_string().as_bytes());
        }
        // The connection of shard 1 reaches the same instance.
        let local_stub = stub(&probes(&second), &far);
        assert_eq!(body(&local_stub, "POST", "/x").await.unwrap(), "201");
        assert_eq!(built.load(Ordering::SeqCst), 1, "one instance");
    });
}

#[test]
fn a_reset_on_the_objects_shard_breaks_the_stub_held_on_another() {
    let (server, built) = server();
    run_local(async {
        let host = server.connect().await;
        let namespace = probes(&host);
        let far = name_on(&namespace, 1, "reset").await;
        let held = stub(&namespace, &far);
        assert_eq!(body(&held, "POST", "/a").await.unwrap(), "1");
        let panicked = body(&held, "POST", "/panic").await.unwrap_err();
        assert!(matches!(panicked, Error::Disconnected(_)), "{panicked:?}");
        let after = body(&held, "POST", "/b").await.unwrap_err();
        assert!(matches!(after, Error::Disconnected(_)), "{after:?}");
        // A new stub reaches a new instance.
        let fresh = stub(&namespace, &far);
        assert_eq!(body(&fresh, "POST", "/c").await.unwrap(), "1");
        assert_eq!(built.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn objects_call_objects_of_other_shards_through_their_env() {
    let (server, built) = server();
    run_local(async {
        let host = server.connect().await;
        let namespace = probes(&host);
        let caller = name_on(&namespace, 0, "caller").await;
        let callee = name_on(&namespace, 1, "callee").await;
        let caller_stub = stub(&namespace, &caller);
        assert_eq!(
            body(&caller_stub, "POST", &format!("/call/{callee}"))
                .await
                .unwrap(),
            "2"
        );
        assert_eq!(
            body(&caller_stub, "POST", &format!("/call/{callee}"))
                .await
                .unwrap(),
            "4"
        );
        let callee_stub = stub(&namespace, &callee);
        assert_eq!(body(&callee_stub, "POST", "/direct").await.unwrap(), "5");
        assert_eq!(built.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn body_writes_relayed_past_the_connections_bound_are_refused_and_break_the_body_off() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let stalls = named(&host, "stall");
        let far = name_on(&stalls, 1, "stall").await;
        let mut call = stub(&stalls, &far).request_request();
        duro::wire::convert::request_to_capnp(&request_of("PUT", "/"), call.get().init_request());
        call.get().set_body_follows(true);
        call.get().set_context(capnp_rpc::new_client(NoAnswer));
        let call = call.send();
        let body = call.pipeline.get_request_body();
        // Every write leaves at once; the object on the other shard reads none of them.
        for _ in 0..CONNECTION_CALLS_MAX + 1000 {
            let mut write = body.write_request();
            write.get().set_bytes(&[0; 1024]);
            drop(write.send());
        }
        let refused = async {
            loop {
                let mut write = body.write_request();
                write.get().set_bytes(b"x");
                match write.send().await {
                    Err(error) => break error,
                    Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        let error = tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .expect("no write was refused: the relay took the flood in");
        assert_eq!(error.kind, capnp::ErrorKind::Overloaded, "{error}");
        // Once one is refused, the body is broken off: later writes fail too.
        let mut later = body.write_request();
        later.get().set_bytes(b"y");
        assert!(
            later.send().await.is_err(),
            "a write after the refusal went through"
        );
        // Let go: the connection serves again.
        drop((call, body));
        let namespace = probes(&host);
        let probe = stub(&namespace, &name_on(&namespace, 1, "after").await);
        let mut answered = false;
        for _ in 0..500 {
            if body_of(&probe).await.is_ok() {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(answered, "the connection did not serve again");
    });
}

async fn body_of(stub: &durable_object::Client) -> Result<String, Error> {
    body(stub, "POST", "/after").await
}

#[test]
fn the_gateway_serves_the_objects_of_every_shard_as_their_own() {
    let (server, built) = server();
    let http = server.http_addr().unwrap();
    run_local(async {
        let host = server.connect().await;
        let namespace = probes(&host);
        let names = [
            name_on(&namespace, 0, "web").await,
            name_on(&namespace, 1, "web").await,
        ];
        // Four HTTP connections, served by the shards in turn: every object is reached both
        // from its own shard and from the other.
        for round in 1..=4 {
            let client = http_connection(http);
            for name in &names {
                let answer = client.post(&format!("/probe/{name}/hit")).await;
                assert_eq!(answer, round.to_string(), "{name}, round {round}");
            }
        }
        for name in &names {
            assert_eq!(
                body(&stub(&namespace, name), "POST", "/x").await.unwrap(),
                "5"
            );
        }
        assert_eq!(built.load(Ordering::SeqCst), 2);
    });
}

/// A plain HTTP/1.1 client of one connection, enough for the gateway's answers.
fn http_connection(addr: std::net::SocketAddr) -> HttpConnection {
    HttpConnection {
        addr,
        stream: RefCell::new(None),
    }
}

struct HttpConnection {
    addr: std::net::SocketAddr,
    stream: RefCell<Option<std::net::TcpStream>>,
}

impl HttpConnection {
    async fn post(&self, path: &str) -> String {
        use std::io::{BufRead, BufReader, Read, Write};
        let addr = self.addr;
        let mut slot = self.stream.borrow_mut();
        let stream = slot.get_or_insert_with(|| std::net::TcpStream::connect(addr).unwrap());
        let head = format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap()
    }
}

/// `Namespace.fetchByName(name, POST path)`, its body as text.
async fn fetch_named(
    namespace: &namespace::Client,
    name: &str,
    path: &str,
) -> Result<String, Error> {
    let mut call = namespace.fetch_by_name_request();
    call.get().set_name(name);
    {
        let mut request = call.get().init_request();
        request.set_method("POST");
        request.set_url(path);
    }
    let reply = call.send().promise.await?;
    let response = reply.get()?.get_response()?;
    Ok(String::from_utf8_lossy(response.get_body()?).into_owned())
}

#[test]
fn fetch_by_name_reaches_the_one_instance_on_another_shard() {
    let (server, built) = server();
    run_local(async {
        // The first connection is served by shard 0, the second by shard 1.
        let first = server.connect().await;
        let second = server.connect().await;
        let namespace = probes(&first);
        let far = name_on(&namespace, 1, "far").await;
        let near = name_on(&namespace, 0, "near").await;
        // From shard 0 to an object of shard 1, and to one of its own.
        assert_eq!(fetch_named(&namespace, &far, "/a").await.unwrap(), "1");
        assert_eq!(fetch_named(&namespace, &near, "/a").await.unwrap(), "1");
        // A stub from either shard reaches the same instances.
        assert_eq!(
            body(&stub(&namespace, &far), "POST", "/b").await.unwrap(),
            "2"
        );
        let there = probes(&second);
        assert_eq!(body(&stub(&there, &far), "POST", "/c").await.unwrap(), "3");
        assert_eq!(fetch_named(&there, &near, "/b").await.unwrap(), "2");
        assert_eq!(fetch_named(&there, &far, "/d").await.unwrap(), "4");
        assert_eq!(built.load(Ordering::SeqCst), 2, "one instance each");
        // A reset there answers disconnected here; the next call builds a fresh instance.
        let error = fetch_named(&namespace, &far, "/panic").await.unwrap_err();
        assert!(matches!(error, Error::Disconnected(_)), "{error:?}");
        assert_eq!(fetch_named(&namespace, &far, "/e").await.unwrap(), "1");
        assert_eq!(built.load(Ordering::SeqCst), 3);
        // A bad request is refused by the far shard as a `fetch` would be.
        let error = fetch_named(&namespace, &far, "no spaces")
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::InvalidArgument(m) if m.contains("invalid URL")),
            "{error:?}"
        );
    });
}
