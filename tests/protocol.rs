//! The wire protocol over real TCP connections: namespaces, IDs, stubs, E-order, pipelining,
//! errors and resets.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use duro::duro_capnp::{durable_object, host, namespace};
use duro::testing::{TestServer, fetch, fetch_by_name, fetch_call, request, run_local};
use duro::{BoxError, DurableObject, Error, Request, Response, Server, State};

/// Records the order in which requests arrive; answers with its count so far. A path of
/// `/panic` panics; `/fail` returns an error; `/hang` never answers.
struct Recorder {
    seen: RefCell<Vec<String>>,
    live: Arc<AtomicUsize>,
    hanging: Arc<AtomicUsize>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Hanging(Arc<AtomicUsize>);

impl Drop for Hanging {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DurableObject for Recorder {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let path = request.uri().path().to_owned();
        match path.as_str() {
            "/panic" => panic!("boom"),
            "/fail" => return Err("it failed".into()),
            "/hang" => {
                self.hanging.fetch_add(1, Ordering::SeqCst);
                let _guard = Hanging(self.hanging.clone());
                std::future::pending::<()>().await;
            }
            "/seen" => return Ok(Response::new(self.seen.borrow().join(",").into())),
            _ => {}
        }
        self.seen
            .borrow_mut()
            .push(path.trim_start_matches('/').to_owned());
        Ok(Response::new(self.seen.borrow().len().to_string().into()))
    }
}

struct Counters {
    live: Arc<AtomicUsize>,
    built: Arc<AtomicUsize>,
    hanging: Arc<AtomicUsize>,
}

fn server() -> (TestServer, Counters) {
    let counters = Counters {
        live: Arc::new(AtomicUsize::new(0)),
        built: Arc::new(AtomicUsize::new(0)),
        hanging: Arc::new(AtomicUsize::new(0)),
    };
    let (live, built, hanging) = (
        counters.live.clone(),
        counters.built.clone(),
        counters.hanging.clone(),
    );
    let builder = duro::builtin::register(Server::builder())
        .class("recorder", move |_state: State, _env| {
            live.fetch_add(1, Ordering::SeqCst);
            built.fetch_add(1, Ordering::SeqCst);
            Recorder {
                seen: RefCell::default(),
                live: live.clone(),
                hanging: hanging.clone(),
            }
        })
        .namespace("recorder", "recorder")
        .namespace("recorder2", "recorder");
    (TestServer::start(builder), counters)
}

fn ns(host: &host::Client, name: &str) -> namespace::Client {
    let mut call = host.namespace_request();
    call.get().set_name(name);
    call.send().pipeline.get_namespace()
}

fn stub_by_name(ns: &namespace::Client, name: &str) -> durable_object::Client {
    let mut call = ns.get_by_name_request();
    call.get().set_name(name);
    call.send().pipeline.get_stub()
}

async fn id_from_name(ns: &namespace::Client, name: &str) -> Vec<u8> {
    let mut call = ns.id_from_name_request();
    call.get().set_name(name);
    let reply = call.send().promise.await.unwrap();
    let id = reply.get().unwrap().get_id().unwrap();
    assert_eq!(id.get_name().unwrap().to_str().unwrap(), name);
    id.get_bytes().unwrap().to_vec()
}

async fn id_from_string(ns: &namespace::Client, text: &str) -> Result<Vec<u8>, Error> {
    let mut call = ns.id_from_string_request();
    call.get().set_id(text);
    let reply = call.send().promise.await?;
    Ok(reply.get()?.get_id()?.get_bytes()?.to_vec())
}

fn stub_by_id(ns: &namespace::Client, bytes: &[u8]) -> durable_object::Client {
    let mut call = ns.get_request();
    call.get().init_id().set_bytes(bytes);
    call.send().pipeline.get_stub()
}

async fn body(stub: &durable_object::Client, path: &str) -> Result<String, Error> {
    let response = fetch(stub, request("POST", path, b"")).await?;
    Ok(String::from_utf8(response.body().to_vec()).unwrap())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn namespaces_are_listed_with_their_classes() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let reply = host.list_namespaces_request().send().promise.await.unwrap();
        let list = reply.get().unwrap().get_namespaces().unwrap();
        let names: Vec<(String, String)> = list
            .iter()
            .map(|i| {
                let name = i.get_name().unwrap().to_string().unwrap();
                (name, i.get_class_name().unwrap().to_string().unwrap())
            })
            .collect();
        assert_eq!(
            names,
            [
                ("counter", "counter"),
                ("echo", "echo"),
                ("kv", "kv"),
                ("recorder", "recorder"),
                ("recorder2", "recorder"),
                ("room", "room"),
                ("tally", "tally"),
                ("timer", "timer")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let unknown = fetch_by_name(&host, "nope", "x", "GET", "/", b"")
            .await
            .unwrap_err();
        assert_eq!(
            unknown,
            Error::InvalidArgument("unknown namespace 'nope'".into())
        );
    });
}

#[test]
fn echo_describes_the_request() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let stub = stub_by_name(&ns(&host, "echo"), "e");
        let req = http::Request::builder()
            .method("PUT")
            .uri("/p/q?x=1")
            .header("x-test", "yes")
            .body(bytes::Bytes::from_static(b"hi"))
            .unwrap();
        let response = fetch(&stub, req).await.unwrap();
        assert_eq!(response.status(), 200);
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(json["method"], "PUT");
        assert_eq!(json["url"], "/p/q?x=1");
        assert_eq!(json["headers"], serde_json::json!([["x-test", "yes"]]));
        assert_eq!(json["body_base64"], "aGk=");
    });
}

#[test]
fn ids_from_names_are_stable_across_restarts_and_namespaces() {
    let (server, _) = server();
    let (first, other, unique_a, unique_b) = run_local(async {
        let host = server.connect().await;
        let recorder = ns(&host, "recorder");
        let first = id_from_name(&recorder, "alice").await;
        assert_eq!(first.len(), 32);
        assert_eq!(id_from_name(&recorder, "alice").await, first);
        assert_ne!(id_from_name(&recorder, "bob").await, first);
        let other = id_from_name(&ns(&host, "recorder2"), "alice").await;
        let unique = |n: namespace::Client| async move {
            let reply = n.new_unique_id_request().send().promise.await.unwrap();
            let id = reply.get().unwrap().get_id().unwrap();
            assert_eq!(id.get_name().unwrap().to_str().unwrap(), "");
            id.get_bytes().unwrap().to_vec()
        };
        (
            first,
            other,
            unique(recorder.clone()).await,
            unique(recorder).await,
        )
    });
    assert_ne!(first, other, "another namespace gives another id");
    assert_ne!(unique_a, unique_b);
    let builder = Server::builder()
        .class("recorder", |_s, _e| Recorder {
            seen: RefCell::default(),
            live: Arc::new(AtomicUsize::new(1)),
            hanging: Arc::new(AtomicUsize::new(0)),
        })
        .namespace("recorder", "recorder");
    let restarted = TestServer::start_in(builder, server.stop());
    run_local(async {
        let host = restarted.connect().await;
        let recorder = ns(&host, "recorder");
        assert_eq!(id_from_name(&recorder, "alice").await, first);
        // A unique id minted before the restart is still valid after it.
        assert_eq!(
            id_from_string(&recorder, &hex(&unique_a)).await.unwrap(),
            unique_a
        );
    });
}

#[test]
fn bad_ids_are_refused_with_the_rule() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let recorder = ns(&host, "recorder");
        let id = id_from_name(&recorder, "alice").await;
        let text = hex(&id);
        assert_eq!(
            id_from_string(&recorder, &text.to_uppercase())
                .await
                .unwrap(),
            id
        );
        let refused = |e: Error, rule: &str| match e {
            Error::InvalidArgument(message) => assert!(message.contains(rule), "{message}"),
            other => panic!("expected a refused argument, got {other:?}"),
        };
        refused(
            id_from_string(&recorder, &text[..60]).await.unwrap_err(),
            "64 hex digits",
        );
        let not_hex = format!("zz{}", &text[2..]);
        refused(
            id_from_string(&recorder, &not_hex).await.unwrap_err(),
            "not a hex digit",
        );
        let flipped = format!(
            "{}{}",
            if &text[..1] == "0" { "1" } else { "0" },
            &text[1..]
        );
        refused(
            id_from_string(&recorder, &flipped).await.unwrap_err(),
            "not minted by namespace",
        );
        let other = id_from_name(&ns(&host, "recorder2"), "alice").await;
        refused(
            id_from_string(&recorder, &hex(&other)).await.unwrap_err(),
            "not minted",
        );
        // get checks too, and the pipelined fetch fails with the same error.
        let forged = stub_by_id(&recorder, &other);
        refused(
            body(&forged, "/x").await.unwrap_err(),
            "not minted by namespace 'recorder'",
        );
        let short = stub_by_id(&recorder, &id[..31]);
        refused(body(&short, "/x").await.unwrap_err(), "must be 32 bytes");
    });
}

#[test]
fn one_instance_per_id_across_connections() {
    let (server, counters) = server();
    run_local(async {
        let a = server.connect().await;
        let b = server.connect().await;
        let id = id_from_name(&ns(&a, "recorder"), "shared").await;
        assert_eq!(
            body(&stub_by_name(&ns(&a, "recorder"), "shared"), "/a")
                .await
                .unwrap(),
            "1"
        );
        assert_eq!(
            body(&stub_by_id(&ns(&b, "recorder"), &id), "/b")
                .await
                .unwrap(),
            "2"
        );
        assert_eq!(
            body(&stub_by_name(&ns(&b, "recorder"), "shared"), "/c")
                .await
                .unwrap(),
            "3"
        );
        // The same name in another namespace is another object.
        assert_eq!(
            body(&stub_by_name(&ns(&b, "recorder2"), "shared"), "/d")
                .await
                .unwrap(),
            "1"
        );
        assert_eq!(counters.built.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn calls_on_one_stub_arrive_in_order_even_while_activating() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        // Everything below is sent before any answer arrives: the namespace, the stub and
        // 1000 calls on it are all pipelined.
        let stub = stub_by_name(&ns(&host, "recorder"), "ordered");
        let calls: Vec<_> = (0..1000)
            .map(|i| fetch_call(&stub, &request("POST", &format!("/{i}"), b"")))
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let reply = call.promise.await.unwrap();
            let response = reply.get().unwrap().get_response().unwrap();
            assert_eq!(response.get_body().unwrap(), (i + 1).to_string().as_bytes());
        }
        let seen = body(&stub, "/seen").await.unwrap();
        let expected: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        assert_eq!(seen, expected.join(","));
    });
}

#[test]
fn a_resolving_stub_becomes_the_capability_and_keeps_the_order_across() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let mut call = ns(&host, "recorder").get_by_name_request();
        call.get().set_name("resolving");
        let pipeline = call.send().pipeline;
        let stub = duro::wire::resolving(pipeline.get_stub(), pipeline);
        // Calls before and after the stub resolves: the earlier are addressed through the
        // answer of the get, the later to the object's capability itself.
        let mut calls = Vec::new();
        for i in 0..300 {
            calls.push(fetch_call(&stub, &request("POST", &format!("/{i}"), b"")));
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // (`when_resolved` asked after the fact never answers in capnp-rpc: look instead.)
        wait_for(|| stub.client.hook.get_resolved().is_some()).await;
        for i in 300..600 {
            calls.push(fetch_call(&stub, &request("POST", &format!("/{i}"), b"")));
        }
        for call in calls {
            call.promise.await.unwrap();
        }
        let seen = body(&stub, "/seen").await.unwrap();
        let expected: Vec<String> = (0..600).map(|i| i.to_string()).collect();
        assert_eq!(seen, expected.join(","));
        // Without it, capnp-rpc never resolves a capability whose pipeline was dropped.
        let bare = stub_by_name(&ns(&host, "recorder"), "resolving");
        body(&bare, "/bare").await.unwrap();
        tokio::task::yield_now().await;
        assert!(bare.client.hook.get_resolved().is_none());
    });
}

#[test]
fn get_and_fetch_take_one_round_trip() {
    let (server, counters) = server();
    run_local(async {
        let (addr, release) = common::holding_proxy(server.addr()).await;
        let host = duro::testing::connect(addr).await.unwrap();
        // bootstrap → namespace → getByName → fetch: the fetch reaches the object while no
        // byte of any answer has reached the client, so the chain cost one round trip.
        let stub = stub_by_name(&ns(&host, "recorder"), "one-trip");
        let _call = fetch_call(&stub, &request("POST", "/hang", b""));
        wait_for(|| counters.hanging.load(Ordering::SeqCst) == 1).await;
        release.send(()).unwrap();
        // And the answers flow once released.
        let other = stub_by_name(&ns(&host, "recorder"), "one-trip");
        assert_eq!(body(&other, "/x").await.unwrap(), "1");
    });
}

#[test]
fn an_error_in_the_object_is_remote_and_the_object_lives_on() {
    let (server, counters) = server();
    run_local(async {
        let host = server.connect().await;
        let stub = stub_by_name(&ns(&host, "recorder"), "err");
        assert_eq!(body(&stub, "/a").await.unwrap(), "1");
        // Its own text, then the call's request ID.
        let error = body(&stub, "/fail").await.unwrap_err();
        let own = matches!(&error, Error::Remote(m) if m.starts_with("it failed (request id "));
        assert!(own, "{error:?}");
        assert_eq!(body(&stub, "/b").await.unwrap(), "2");
        assert_eq!(counters.built.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn a_panic_resets_the_object_and_breaks_its_stubs() {
    let (server, counters) = server();
    run_local(async {
        let host = server.connect().await;
        let other_host = server.connect().await;
        let recorder = ns(&host, "recorder");
        let stub = stub_by_name(&recorder, "boom");
        let second_stub = stub_by_name(&ns(&other_host, "recorder"), "boom");
        let bystander = stub_by_name(&recorder, "bystander");
        assert_eq!(body(&stub, "/a").await.unwrap(), "1");
        assert_eq!(body(&bystander, "/a").await.unwrap(), "1");
        // A call in flight when the object panics is failed too.
        let hung = fetch_call(&stub, &request("POST", "/hang", b""));
        assert!(matches!(
            body(&stub, "/panic").await,
            Err(Error::Disconnected(_))
        ));
        assert!(matches!(
            hung.promise.await.map(|_| ()).map_err(Error::from),
            Err(Error::Disconnected(_))
        ));
        // Every stub to the reset activation stays broken, on every connection.
        assert!(matches!(
            body(&stub, "/b").await,
            Err(Error::Disconnected(_))
        ));
        assert!(matches!(
            body(&second_stub, "/b").await,
            Err(Error::Disconnected(_))
        ));
        assert_eq!(
            counters.live.load(Ordering::SeqCst),
            1,
            "the instance was dropped"
        );
        // A new get builds a fresh instance; the bystander never noticed.
        let fresh = stub_by_name(&recorder, "boom");
        assert_eq!(body(&fresh, "/c").await.unwrap(), "1");
        assert_eq!(body(&bystander, "/b").await.unwrap(), "2");
        assert_eq!(counters.built.load(Ordering::SeqCst), 3);
    });
}

#[test]
fn shard_stub_is_refused_to_a_client_and_the_connection_lives_on() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let mut call = host.shard_stub_request();
        call.get().set_key(1);
        let error = call.send().promise.await.map(drop).unwrap_err();
        assert_eq!(error.kind, capnp::ErrorKind::Failed, "{error}");
        assert!(error.to_string().contains("only for the links"), "{error}");
        let stub = stub_by_name(&ns(&host, "recorder"), "after-shard-stub");
        assert_eq!(body(&stub, "/a").await.unwrap(), "1");
    });
}

#[test]
fn a_dropped_connection_leaves_nothing_behind() {
    let (server, counters) = server();
    run_local(async {
        let host = server.connect().await;
        let stub = stub_by_name(&ns(&host, "recorder"), "leak");
        let pending: Vec<_> = (0..50)
            .map(|_| fetch_call(&stub, &request("POST", "/hang", b"")))
            .collect();
        // Wait until the calls are running in the object.
        let observer = server.connect().await;
        let seen = stub_by_name(&ns(&observer, "recorder"), "leak");
        let _ = body(&seen, "/seen").await.unwrap();
        wait_for(|| counters.hanging.load(Ordering::SeqCst) == 50).await;
        drop(pending);
        drop(stub);
        drop(host);
        // Dropping the client's last references closes its connection; the server drops its
        // calls, so every handler future is dropped.
        wait_for(|| counters.hanging.load(Ordering::SeqCst) == 0).await;
        // The object still serves others.
        assert_eq!(body(&seen, "/after").await.unwrap(), "1");
    });
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let (server, _) = server();
    let builder = duro::builtin::register(Server::builder());
    let second = duro::testing::data_dir(builder, server.data_dir())
        .listen("127.0.0.1:0".parse().unwrap())
        .start();
    let message = second
        .err()
        .expect("the second server must not start")
        .to_string();
    assert!(
        message.contains("in use by another duro process"),
        "{message}"
    );
}

#[test]
fn a_capability_works_in_process_without_a_network() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = duro::builtin::register(Server::builder())
            .data_dir(dir.path())
            .open_host()
            .unwrap();
        let client = duro::rpc::bootstrap(&host, &Default::default());
        let first = fetch_by_name(&client, "counter", "local", "POST", "/", b"")
            .await
            .unwrap();
        assert_eq!(first.body().as_ref(), b"1\n");
        // The Rust API reaches the same instance.
        let stub = host
            .namespace("counter")
            .unwrap()
            .get_by_name("local")
            .unwrap();
        let second = stub.fetch(request("POST", "/", b"")).await.unwrap();
        assert_eq!(second.body().as_ref(), b"2\n");
        host.shutdown().await;
    });
}

/// Objects call objects through `Env`, with the same stub semantics.
struct Caller {
    env: duro::Env,
    calls: Rc<Cell<u32>>,
}

impl DurableObject for Caller {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        self.calls.set(self.calls.get() + 1);
        let counter = self
            .env
            .namespace("counter")
            .ok_or("no counter namespace")?;
        let target = request.uri().path().trim_start_matches('/');
        let stub = counter.get_by_name(target)?;
        let response = stub.fetch(duro::testing::request("POST", "/", b"")).await?;
        Ok(Response::new(response.into_body()))
    }
}

#[test]
fn objects_call_other_objects_through_env() {
    let builder = duro::builtin::register(Server::builder())
        .class("caller", |_s, env| Caller {
            env,
            calls: Rc::default(),
        })
        .namespace("caller", "caller");
    let server = TestServer::start(builder);
    run_local(async {
        let host = server.connect().await;
        let stub = stub_by_name(&ns(&host, "caller"), "c");
        assert_eq!(body(&stub, "/target").await.unwrap(), "1\n");
        assert_eq!(body(&stub, "/target").await.unwrap(), "2\n");
        let direct = fetch_by_name(&host, "counter", "target", "GET", "/", b"")
            .await
            .unwrap();
        assert_eq!(direct.body().as_ref(), b"2\n");
    });
}

/// An object that calls the next of a chain: `GET /{n}` on object `n` asks object `n - 1`, and
/// answers its answer plus one (object 0 answers 0).
struct Link {
    env: duro::Env,
}

impl DurableObject for Link {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let n: u32 = request.uri().path().trim_start_matches('/').parse()?;
        if n == 0 {
            return Ok(Response::new("0".into()));
        }
        let chain = self.env.namespace("chain").ok_or("no chain namespace")?;
        let next = chain.get_by_name(&(n - 1).to_string())?;
        let path = format!("/{}", n - 1);
        let answer = next
            .fetch(duro::testing::request("GET", &path, b""))
            .await?;
        let below: u32 = std::str::from_utf8(answer.body())?.parse()?;
        Ok(Response::new((below + 1).to_string().into()))
    }
}

#[test]
fn a_long_chain_of_objects_calling_objects_is_answered() {
    // Each call of the chain ends inside its caller's: without a bound on how deep calls run
    // inside one another, this chain would overflow the stack.
    const DEPTH: u32 = 3000;
    let builder = Server::builder()
        .class("chain", |_s, env| Link { env })
        .namespace("chain", "chain");
    let server = TestServer::start(builder);
    run_local(async {
        let host = server.connect().await;
        let answer = fetch_by_name(
            &host,
            "chain",
            &DEPTH.to_string(),
            "GET",
            &format!("/{DEPTH}"),
            b"",
        )
        .await
        .unwrap();
        assert_eq!(answer.body().as_ref(), DEPTH.to_string().as_bytes());
    });
}

/// `Namespace.fetchByName(name, request)` sent now, its body read as text.
fn fetch_named(
    ns: &namespace::Client,
    name: &str,
    path: &str,
) -> impl std::future::Future<Output = Result<String, Error>> + use<> {
    let mut call = ns.fetch_by_name_request();
    call.get().set_name(name);
    {
        let mut request = call.get().init_request();
        request.set_method("POST");
        request.set_url(path);
    }
    let promise = call.send().promise;
    async move {
        let reply = promise.await?;
        let response = reply.get()?.get_response()?;
        Ok(String::from_utf8(response.get_body()?.to_vec()).unwrap())
    }
}

#[test]
fn fetch_by_name_reaches_the_instance_get_by_name_does() {
    let (server, counters) = server();
    run_local(async {
        let a = server.connect().await;
        let b = server.connect().await;
        let recorder = ns(&a, "recorder");
        // Also before the object exists: the first call activates it.
        assert_eq!(fetch_named(&recorder, "shared", "/a").await.unwrap(), "1");
        let held = stub_by_name(&ns(&b, "recorder"), "shared");
        assert_eq!(body(&held, "/b").await.unwrap(), "2");
        assert_eq!(
            fetch_named(&ns(&b, "recorder"), "shared", "/c")
                .await
                .unwrap(),
            "3"
        );
        let id = id_from_name(&recorder, "shared").await;
        assert_eq!(body(&stub_by_id(&recorder, &id), "/d").await.unwrap(), "4");
        assert_eq!(
            fetch_named(&recorder, "shared", "/seen").await.unwrap(),
            "a,b,c,d"
        );
        // The same name in another namespace is another object; the empty name is a name.
        assert_eq!(
            fetch_named(&ns(&b, "recorder2"), "shared", "/e")
                .await
                .unwrap(),
            "1"
        );
        assert_eq!(fetch_named(&recorder, "", "/f").await.unwrap(), "1");
        assert_eq!(body(&stub_by_name(&recorder, ""), "/g").await.unwrap(), "2");
        assert_eq!(counters.built.load(Ordering::SeqCst), 3);
        // Many names at once, each sent before any answer: one instance each, the same ones
        // stubs reach (with several shards, most of them live on another shard).
        let calls: Vec<_> = (0..30)
            .map(|i| fetch_named(&recorder, &format!("many{i}"), "/x"))
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), "1");
        }
        for i in 0..30 {
            let stub = stub_by_name(&ns(&b, "recorder"), &format!("many{i}"));
            assert_eq!(body(&stub, "/y").await.unwrap(), "2");
            assert_eq!(
                fetch_named(&recorder, &format!("many{i}"), "/seen")
                    .await
                    .unwrap(),
                "x,y"
            );
        }
        assert_eq!(counters.built.load(Ordering::SeqCst), 33);
    });
}

#[test]
fn fetch_by_name_refuses_bad_names_and_namespaces_and_answers_as_fetch() {
    let (server, counters) = server();
    run_local(async {
        let host = server.connect().await;
        let recorder = ns(&host, "recorder");
        let refused = |e: Error, rule: &str| match e {
            Error::InvalidArgument(message) => assert!(message.contains(rule), "{message}"),
            other => panic!("expected a refused argument, got {other:?}"),
        };
        let long = "n".repeat(1025);
        refused(
            fetch_named(&recorder, &long, "/x").await.unwrap_err(),
            "name_bytes_max",
        );
        refused(
            fetch_named(&ns(&host, "nope"), "x", "/x")
                .await
                .unwrap_err(),
            "unknown namespace 'nope'",
        );
        assert_eq!(
            counters.built.load(Ordering::SeqCst),
            0,
            "nothing activated"
        );
        refused(
            fetch_named(&recorder, "f", "no spaces allowed")
                .await
                .unwrap_err(),
            "invalid URL",
        );
        // The object's own error, with the call's request ID; the object lives on.
        let error = fetch_named(&recorder, "f", "/fail").await.unwrap_err();
        let own = matches!(&error, Error::Remote(m) if m.starts_with("it failed (request id "));
        assert!(own, "{error:?}");
        assert_eq!(fetch_named(&recorder, "f", "/a").await.unwrap(), "1");
        // A panic resets the object as for any call; the next call builds a fresh instance.
        let held = stub_by_name(&recorder, "f");
        assert_eq!(body(&held, "/b").await.unwrap(), "2");
        let error = fetch_named(&recorder, "f", "/panic").await.unwrap_err();
        assert!(matches!(error, Error::Disconnected(_)), "{error:?}");
        assert!(matches!(
            body(&held, "/c").await,
            Err(Error::Disconnected(_))
        ));
        assert_eq!(fetch_named(&recorder, "f", "/d").await.unwrap(), "1");
        assert_eq!(counters.built.load(Ordering::SeqCst), 2);
        assert_eq!(counters.live.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn fetch_by_name_takes_one_round_trip() {
    let (server, counters) = server();
    run_local(async {
        let (addr, release) = common::holding_proxy(server.addr()).await;
        let host = duro::testing::connect(addr).await.unwrap();
        // bootstrap → namespace → fetchByName reaches the object while no byte of any answer
        // has reached the client.
        let _call = fetch_named(&ns(&host, "recorder"), "one-trip", "/hang");
        wait_for(|| counters.hanging.load(Ordering::SeqCst) == 1).await;
        release.send(()).unwrap();
        assert_eq!(
            fetch_named(&ns(&host, "recorder"), "one-trip", "/x")
                .await
                .unwrap(),
            "1"
        );
    });
}
