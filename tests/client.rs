//! The Rust client against real servers, from multi-threaded tokio runtimes (no `LocalSet`):
//! IDs, fetch, E-order, pipelining, listings, broken stubs, errors by kind, both transports,
//! the release of capabilities and connections, and the bound on calls in flight.

mod common;

use std::future::{Future, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use duro::client::{CALLS_IN_FLIGHT_MAX, Client, REQUEST_BYTES_MAX};
use duro::duro_capnp::{durable_object, host, namespace};
use duro::testing::TestServer;
use duro::{BoxError, DurableObject, Error, ListenAddr, Request, Response, Server};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// `/panic` panics (resetting the object), `/fail` returns an error, `/hang` never answers
/// (counted in `hanging`); anything else answers `ok`.
struct Fragile {
    hanging: Arc<AtomicUsize>,
}

impl DurableObject for Fragile {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        match request.uri().path() {
            "/panic" => panic!("boom"),
            "/fail" => Err("it failed".into()),
            "/hang" => {
                self.hanging.fetch_add(1, Ordering::SeqCst);
                std::future::pending().await
            }
            _ => Ok(Response::new("ok".into())),
        }
    }
}

/// The built-in classes plus `fragile`; and the count of `/hang` calls that arrived.
fn builder() -> (duro::Builder, Arc<AtomicUsize>) {
    let hanging = Arc::new(AtomicUsize::new(0));
    let counted = hanging.clone();
    let builder = duro::builtin::register(Server::builder())
        .class("fragile", move |_state, _env| Fragile {
            hanging: counted.clone(),
        })
        .namespace("fragile", "fragile");
    (builder, hanging)
}

fn server() -> TestServer {
    TestServer::start(builder().0)
}

async fn connect(server: &TestServer) -> Client {
    Client::connect(server.addr()).await.unwrap()
}

fn text(response: &Response) -> &str {
    std::str::from_utf8(response.body()).unwrap()
}

fn refused(result: Result<impl std::fmt::Debug, Error>, rule: &str) {
    match result {
        Err(Error::InvalidArgument(message)) => assert!(message.contains(rule), "{message}"),
        other => panic!("expected a refusal naming {rule:?}, got {other:?}"),
    }
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_minted_parsed_and_refused() {
    let server = server();
    let client = connect(&server).await;
    let counter = client.namespace("counter");
    let alice = counter.id_from_name("alice").await.unwrap();
    assert_eq!(alice.name(), Some("alice"));
    assert_eq!(alice.to_hex().len(), 64);
    assert_eq!(counter.id_from_name("alice").await.unwrap(), alice);
    assert_ne!(counter.id_from_name("bob").await.unwrap(), alice);
    let (a, b) = (counter.new_unique_id(), counter.new_unique_id());
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_ne!(a, b);
    assert_eq!(a.name(), None);
    let parsed = counter.id_from_string(&a.to_hex()).await.unwrap();
    assert_eq!(parsed.bytes(), a.bytes());
    let upper = counter.id_from_string(&a.to_hex().to_uppercase()).await;
    assert_eq!(upper.unwrap().bytes(), a.bytes());
    refused(
        counter.id_from_string(&a.to_hex()[..63]).await,
        "64 hex digits",
    );
    let hex = a.to_hex();
    let flipped = format!(
        "{}{}",
        if hex.starts_with('0') { "1" } else { "0" },
        &hex[1..]
    );
    refused(counter.id_from_string(&flipped).await, "not minted");
    // An ID of another namespace is refused, at `id_from_string` and at `get`.
    let echo_id = client.namespace("echo").new_unique_id().await.unwrap();
    refused(
        counter.id_from_string(&echo_id.to_hex()).await,
        "not minted by namespace 'counter'",
    );
    refused(
        counter.get(&echo_id).call("GET", "/", "").await,
        "not minted by namespace 'counter'",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counter_counts_through_stubs_by_name_and_by_id() {
    let server = server();
    let client = connect(&server).await;
    let counter = client.namespace("counter");
    let stub = counter.get_by_name("visits");
    assert_eq!(text(&stub.call("POST", "/", "").await.unwrap()), "1\n");
    // The futures are Send: a call can be awaited on any worker thread.
    let moved = stub.clone();
    let second = tokio::spawn(async move { moved.call("POST", "/", "").await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text(&second), "2\n");
    // Another stub to the same ID, got by ID, reaches the same object.
    let id = counter.id_from_name("visits").await.unwrap();
    let by_id = counter.get(&id);
    let request = http::Request::builder()
        .method("GET")
        .uri("/")
        .header("x-any", "1")
        .body(bytes::Bytes::new())
        .unwrap();
    let response = by_id.fetch(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(text(&response), "2\n");
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    // An HTTP error status is a response, not an error.
    let refused_method = stub.call("DELETE", "/", "").await.unwrap();
    assert_eq!(refused_method.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_one_stub_are_answered_in_the_order_made() {
    let server = server();
    let client = connect(&server).await;
    // All sent before any answer is awaited, starting while the object is not yet active.
    let stub = client.namespace("counter").get_by_name("ordered");
    let calls: Vec<_> = (0..200).map(|_| stub.call("POST", "/", "")).collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(text(&call.await.unwrap()), format!("{}\n", i + 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_get_by_name_and_fetch_take_one_round_trip() {
    let (builder, hanging) = builder();
    let server = TestServer::start(builder);
    let (addr, release) = common::holding_proxy(server.addr()).await;
    let client = Client::connect(addr).await.unwrap();
    // bootstrap → namespace → getByName → fetch reach the object while no byte of any answer
    // has come back: the client waited for none of them.
    let _hung = client
        .namespace("fragile")
        .get_by_name("trip")
        .call("POST", "/hang", "");
    wait_for(|| hanging.load(Ordering::SeqCst) == 1).await;
    release.send(()).unwrap();
    let stub = client.namespace("fragile").get_by_name("trip");
    assert_eq!(text(&stub.call("GET", "/", "").await.unwrap()), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_listed_with_their_classes() {
    let server = server();
    let client = connect(&server).await;
    let listed: Vec<(String, String)> = client
        .list_namespaces()
        .await
        .unwrap()
        .into_iter()
        .map(|info| (info.name, info.class_name))
        .collect();
    let expected = [
        ("counter", "counter"),
        ("echo", "echo"),
        ("fragile", "fragile"),
        ("kv", "kv"),
        ("room", "room"),
        ("tally", "tally"),
        ("timer", "timer"),
    ];
    assert_eq!(listed, expected.map(|(n, c)| (n.to_owned(), c.to_owned())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_with_data_are_listed_by_pages() {
    let server = server();
    let client = connect(&server).await;
    let counter = client.namespace("counter");
    let empty = counter.list_objects(None, 10).await.unwrap();
    assert!(empty.ids.is_empty() && !empty.more);
    let unique = counter.new_unique_id().await.unwrap();
    for stub in [
        counter.get_by_name("a"),
        counter.get_by_name("b"),
        counter.get_by_name("c"),
        counter.get(&unique),
    ] {
        stub.call("POST", "/", "").await.unwrap();
    }
    // Read only: nothing stored, not listed.
    counter
        .get_by_name("reader")
        .call("GET", "/", "")
        .await
        .unwrap();
    let mut expected = Vec::new();
    for name in ["a", "b", "c"] {
        expected.push(counter.id_from_name(name).await.unwrap());
    }
    expected.push(unique);
    expected.sort_by_key(|id| id.to_hex());

    let first = counter.list_objects(None, 3).await.unwrap();
    assert!(first.more);
    let next = first.next_start_after().unwrap();
    let second = counter.list_objects(Some(&next), 3).await.unwrap();
    assert!(!second.more);
    assert_eq!(second.next_start_after(), None);
    let listed: Vec<_> = first.ids.into_iter().chain(second.ids).collect();
    assert_eq!(
        listed, expected,
        "in hex order, with the names of named ones"
    );
    refused(
        counter.list_objects(None, 0).await,
        "limit must be between 1",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stub_stays_broken_and_a_new_get_works() {
    let server = server();
    let client = connect(&server).await;
    let fragile = client.namespace("fragile");
    let stub = fragile.get_by_name("f");
    assert_eq!(text(&stub.call("GET", "/", "").await.unwrap()), "ok");
    // The object's own error is Remote, and the object lives on.
    // Its message as the object wrote it, then the call's request ID.
    let error = stub.call("GET", "/fail", "").await.unwrap_err();
    let failed = matches!(&error, Error::Remote(m) if m.starts_with("it failed (request id "));
    assert!(failed, "{error:?}");
    assert_eq!(text(&stub.call("GET", "/", "").await.unwrap()), "ok");
    // A panic resets it: this call and every later one on the stub are Disconnected.
    let error = stub.call("GET", "/panic", "").await.unwrap_err();
    assert!(matches!(error, Error::Disconnected(_)), "{error:?}");
    let error = stub.call("GET", "/", "").await.unwrap_err();
    assert!(matches!(error, Error::Disconnected(_)), "{error:?}");
    let fresh = fragile.get_by_name("f");
    assert_eq!(text(&fresh.call("GET", "/", "").await.unwrap()), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_arguments_are_invalid_argument_and_the_client_lives_on() {
    let server = server();
    let client = connect(&server).await;
    let nope = client.namespace("nope");
    assert_eq!(
        nope.get_by_name("x")
            .call("GET", "/", "")
            .await
            .unwrap_err(),
        Error::InvalidArgument("unknown namespace 'nope'".into())
    );
    refused(nope.id_from_name("x").await, "unknown namespace 'nope'");
    let stub = client.namespace("echo").get_by_name("e");
    refused(
        stub.call("GET", "no spaces allowed", "").await,
        "invalid request",
    );
    // A request the host would refuse by dropping the connection is refused before it leaves.
    let huge = vec![0u8; REQUEST_BYTES_MAX + 1];
    refused(stub.call("PUT", "/", huge).await, "REQUEST_BYTES_MAX");
    let response = stub.call("PUT", "/p?q=1", "hi").await.unwrap();
    let echoed: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(echoed["method"], "PUT");
    assert_eq!(echoed["url"], "/p?q=1");
    assert_eq!(echoed["body_base64"], "aGk=");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_fails_by_kind() {
    refused(
        Client::connect("not an address").await,
        "HOST:PORT or unix:PATH",
    );
    // A port nobody listens on: bind one, then free it.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let error = Client::connect(addr).await.unwrap_err();
    assert!(matches!(error, Error::Disconnected(_)), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_disconnected() {
    let server = server();
    let client = connect(&server).await;
    let stub = client.namespace("counter").get_by_name("c");
    stub.call("POST", "/", "").await.unwrap();
    drop(server.stop());
    let error = stub.call("POST", "/", "").await.unwrap_err();
    assert!(matches!(error, Error::Disconnected(_)), "{error:?}");
    let error = client.list_namespaces().await.unwrap_err();
    assert!(matches!(error, Error::Disconnected(_)), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_transport_works() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("duro.sock");
    let handle = duro::builtin::register(Server::builder())
        .data_dir(dir.path().join("data"))
        .listen(ListenAddr::Unix(socket.clone()))
        .start()
        .unwrap();
    let client = Client::connect(&format!("unix:{}", socket.display()))
        .await
        .unwrap();
    let stub = client.namespace("counter").get_by_name("over-unix");
    assert_eq!(text(&stub.call("POST", "/", "").await.unwrap()), "1\n");
    assert_eq!(client.addr(), &ListenAddr::Unix(socket));
    drop(client);
    handle.shutdown();
}

/// A stand-in host that counts the stubs it has live and answers `fetch` only when `answers`
/// has permits: to observe what the client releases and holds.
#[derive(Clone)]
struct Fake {
    live_stubs: Arc<AtomicUsize>,
    answers: Arc<tokio::sync::Semaphore>,
}

impl host::Server for Fake {
    fn namespace(
        self: capnp::capability::Rc<Self>,
        _: host::NamespaceParams,
        mut results: host::NamespaceResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let namespace: namespace::Client = capnp_rpc::new_client((*self).clone());
        results.get().set_namespace(namespace);
        ready(Ok(()))
    }
}

impl namespace::Server for Fake {
    fn get_by_name(
        self: capnp::capability::Rc<Self>,
        _: namespace::GetByNameParams,
        mut results: namespace::GetByNameResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        self.live_stubs.fetch_add(1, Ordering::SeqCst);
        let stub: durable_object::Client = capnp_rpc::new_client(FakeStub((*self).clone()));
        results.get().set_stub(stub);
        ready(Ok(()))
    }
}

struct FakeStub(Fake);

impl Drop for FakeStub {
    fn drop(&mut self) {
        self.0.live_stubs.fetch_sub(1, Ordering::SeqCst);
    }
}

impl durable_object::Server for FakeStub {
    fn fetch(
        self: capnp::capability::Rc<Self>,
        _: durable_object::FetchParams,
        mut results: durable_object::FetchResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let answers = self.0.answers.clone();
        async move {
            answers.acquire().await.unwrap().forget();
            results.get().init_response().set_status(204);
            Ok(())
        }
    }
}

/// Serves one connection with `fake` on a thread of its own, which ends when the connection
/// does.
fn serve_fake(fake: Fake) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        duro::testing::run_local(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let (reader, writer) = stream.into_split();
            let network = twoparty::VatNetwork::new(
                reader.compat(),
                writer.compat_write(),
                Side::Server,
                Default::default(),
            );
            let bootstrap: host::Client = capnp_rpc::new_client(fake);
            let _ = RpcSystem::new(Box::new(network), Some(bootstrap.client)).await;
        })
    });
    (addr, thread)
}

fn fake() -> Fake {
    Fake {
        live_stubs: Arc::new(AtomicUsize::new(0)),
        answers: Arc::new(tokio::sync::Semaphore::new(0)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_handles_releases_stubs_and_then_the_connection() {
    let fake = fake();
    let (addr, served) = serve_fake(fake.clone());
    let client = Client::connect(addr).await.unwrap();
    fake.answers.add_permits(1_000);
    let stub = client.namespace("any").get_by_name("x");
    stub.call("GET", "/", "").await.unwrap();
    assert_eq!(fake.live_stubs.load(Ordering::SeqCst), 1);
    // A clone is the same stub: dropping one of two releases nothing.
    let clone = stub.clone();
    drop(stub);
    assert_eq!(clone.call("GET", "/", "").await.unwrap().status(), 204);
    assert_eq!(fake.live_stubs.load(Ordering::SeqCst), 1);
    drop(clone);
    wait_for(|| fake.live_stubs.load(Ordering::SeqCst) == 0).await;
    // Dropping the last handle ends the connection, so the fake's thread ends.
    drop(client);
    tokio::task::spawn_blocking(move || served.join().unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_in_flight_bound_are_overloaded_until_answers_come() {
    let fake = fake();
    let (addr, _served) = serve_fake(fake.clone());
    let client = Client::connect(addr).await.unwrap();
    let stub = client.namespace("any").get_by_name("x");
    let held: Vec<_> = (0..CALLS_IN_FLIGHT_MAX)
        .map(|_| stub.call("GET", "/", ""))
        .collect();
    let error = stub.call("GET", "/", "").await.unwrap_err();
    assert!(matches!(error, Error::Overloaded(_)), "{error:?}");
    // Answers free their places.
    fake.answers.add_permits(CALLS_IN_FLIGHT_MAX + 1);
    for call in held {
        call.await.unwrap();
    }
    assert_eq!(stub.call("GET", "/", "").await.unwrap().status(), 204);
}

#[allow(dead_code)] // its `main` is for `cargo run --example client`
#[path = "../examples/client.rs"]
mod example;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_increments_the_counter() {
    let server = server();
    let addr = server.addr().to_string();
    let example_client = example::connect(&addr, None).await.unwrap();
    assert_eq!(
        example::increment(&example_client, "example")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        example::increment(&example_client, "example")
            .await
            .unwrap(),
        2
    );
    let client = connect(&server).await;
    let stub = client.namespace("counter").get_by_name("example");
    assert_eq!(text(&stub.call("GET", "/", "").await.unwrap()), "2\n");
}

/// Answers nothing: each call runs until it is cancelled, counted in `live` while it runs.
struct Hanger {
    live: Arc<AtomicUsize>,
}

/// Counts a running handler; the count drops when the handler's future is dropped.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DurableObject for Hanger {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        self.live.fetch_add(1, Ordering::SeqCst);
        let _live = Live(self.live.clone());
        std::future::pending().await
    }
}

fn hanger() -> (duro::Builder, Arc<AtomicUsize>) {
    let live = Arc::new(AtomicUsize::new(0));
    let counted = live.clone();
    let builder = Server::builder()
        .class("hang", move |_state, _env| Hanger {
            live: counted.clone(),
        })
        .namespace("hang", "hang");
    (builder, live)
}

/// Waits (at most 5 s) until `count` is `expected`.
async fn until_count(count: &AtomicUsize, expected: usize) {
    for _ in 0..500 {
        if count.load(Ordering::SeqCst) == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the count stayed {} instead of {expected}",
        count.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_remote_call_cancels_it_on_the_host() {
    let (builder, live) = hanger();
    let server = TestServer::start(builder);
    let client = connect(&server).await;
    let stub = client.namespace("hang").get_by_name("h");
    for _ in 0..2 {
        let pending = stub.call("GET", "/", "");
        until_count(&live, 1).await;
        drop(pending);
        // The host dropped the handler: the call was cancelled, not left running.
        until_count(&live, 0).await;
    }
}

#[test]
fn dropping_a_local_call_cancels_it_as_a_remote_one() {
    let (builder, live) = hanger();
    let builder = builder.backend(Arc::new(duro::storage::MemoryBackend::new()));
    duro::testing::run_local(async {
        let host = builder.open_host().unwrap();
        let stub = host.namespace("hang").unwrap().get_by_name("h").unwrap();
        for _ in 0..2 {
            let call = stub.call("GET", "/", "");
            tokio::select! {
                _ = call => panic!("a hanging call answered"),
                () = until_count(&live, 1) => {}
            }
            // `call` was dropped with the select.
            until_count(&live, 0).await;
        }
        host.shutdown().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_object_info_shows_each_objects_alarm() {
    const T0: u64 = 1_700_000_000_000;
    let clock = duro::testing::ManualClock::new(T0);
    let server = TestServer::start(builder().0.clock(clock.shared()));
    let client = connect(&server).await;
    let kv = client.namespace("kv");
    let put = |name: &str, path: &str| kv.get_by_name(name).call("PUT", path, "v");
    assert_eq!(put("expiring", "/k/a?ttl=60").await.unwrap().status(), 204);
    assert_eq!(put("plain", "/k/a").await.unwrap().status(), 204);
    assert_eq!(put("third", "/k/a").await.unwrap().status(), 204);

    let first = kv.list_object_info(None, 2).await.unwrap();
    assert!(first.more);
    let next = first.next_start_after().unwrap();
    let second = kv.list_object_info(Some(&next), 2).await.unwrap();
    assert!(!second.more && second.next_start_after().is_none());
    let objects: Vec<_> = first.objects.into_iter().chain(second.objects).collect();
    // The same objects, in the same order, as listObjects.
    let ids = kv.list_objects(None, 10).await.unwrap().ids;
    assert_eq!(
        objects.iter().map(|o| o.id.clone()).collect::<Vec<_>>(),
        ids
    );
    let alarms: Vec<_> = objects
        .iter()
        .map(|o| (o.id.name().unwrap().to_owned(), o.alarm_ms))
        .collect();
    let mut expected = vec![
        ("expiring".to_owned(), Some(T0 + 60_000)),
        ("plain".to_owned(), None),
        ("third".to_owned(), None),
    ];
    expected.sort_by_key(|(name, _)| kv_hex(&ids, name));
    assert_eq!(alarms, expected);
    let now_ms = duro::Clock::now_ms(&duro::SystemClock);
    assert!(
        objects
            .iter()
            .all(|o| o.created_ms <= now_ms && o.created_ms > now_ms - 600_000)
    );
    refused(
        kv.list_object_info(None, 0).await,
        "limit must be between 1",
    );
    refused(kv.list_object_info(Some("zz"), 1).await, "hex");
}

/// The hex ID of the object `name` among `ids`.
fn kv_hex(ids: &[duro::ObjectId], name: &str) -> String {
    ids.iter()
        .find(|id| id.name() == Some(name))
        .unwrap()
        .to_hex()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_by_name_reaches_the_object_a_stub_by_name_does() {
    let server = server();
    let client = connect(&server).await;
    let counter = client.namespace("counter");
    let post = || duro::testing::request("POST", "/", b"");
    let response = counter.fetch_by_name("hits", post()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(text(&response), "1\n");
    let stub = counter.get_by_name("hits");
    assert_eq!(text(&stub.call("POST", "/", "").await.unwrap()), "2\n");
    assert_eq!(
        text(&counter.fetch_by_name("hits", post()).await.unwrap()),
        "3\n"
    );
    // Errors by kind, as for a stub's fetch; the client lives on.
    refused(
        client.namespace("nope").fetch_by_name("x", post()).await,
        "unknown namespace 'nope'",
    );
    refused(
        counter.fetch_by_name(&"n".repeat(1025), post()).await,
        "name_bytes_max",
    );
    let huge = http::Request::builder()
        .method("PUT")
        .uri("/")
        .body(bytes::Bytes::from(vec![0u8; REQUEST_BYTES_MAX + 1]))
        .unwrap();
    refused(
        counter.fetch_by_name("hits", huge).await,
        "REQUEST_BYTES_MAX",
    );
    let fragile = client.namespace("fragile");
    let answered = fragile.fetch_by_name("f", post()).await.unwrap();
    assert_eq!(text(&answered), "ok");
    let request = http::Request::builder()
        .uri("/panic")
        .body(bytes::Bytes::new())
        .unwrap();
    let error = fragile.fetch_by_name("f", request).await.unwrap_err();
    assert!(matches!(error, Error::Disconnected(_)), "{error:?}");
    assert_eq!(text(&stub.call("GET", "/", "").await.unwrap()), "3\n");
}
