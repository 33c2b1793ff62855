//! Who may come in, what a connection may ask for, and what garbage does to the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use duro::duro_capnp::host;
use duro::testing::{TestServer, authenticate, fetch_by_name, fetch_call, request, run_local};
use duro::{BoxError, DurableObject, Error, Request, Response, Server};

fn refused_as_unauthenticated(result: Result<Response, Error>) {
    match result {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains("unauthenticated"), "{message}")
        }
        other => panic!("expected unauthenticated, got {other:?}"),
    }
}

#[test]
fn a_node_link_asks_for_the_token_and_serves_this_host_s_objects() {
    let server =
        TestServer::start(duro::builtin::register(Server::builder()).token("s3cret token"));
    run_local(async {
        let host = server.connect().await;
        let link = |token: &str| {
            let mut call = host.node_link_request();
            call.get().set_token(token);
            async move {
                let reply = call.send().promise.await.map_err(Error::from)?;
                reply.get().and_then(|r| r.get_host()).map_err(Error::from)
            }
        };
        let wrong = link("s3cret tokeN")
            .await
            .err()
            .expect("a wrong token is refused");
        assert!(wrong.to_string().contains("unauthenticated"), "{wrong:?}");
        // With the token: a Host whose objects (all of them: this host is no cluster's node)
        // are served here.
        let linked = link("s3cret token").await.unwrap();
        let response = fetch_by_name(&linked, "counter", "a", "POST", "/", b"")
            .await
            .unwrap();
        assert_eq!(response.body().as_ref(), b"1\n");
    });
}

#[test]
fn with_a_token_only_authenticated_clients_get_in() {
    let server =
        TestServer::start(duro::builtin::register(Server::builder()).token("s3cret token"));
    run_local(async {
        let host = server.connect().await;
        refused_as_unauthenticated(fetch_by_name(&host, "counter", "a", "POST", "/", b"").await);
        let list = host
            .list_namespaces_request()
            .send()
            .promise
            .await
            .map(|_| ());
        assert!(list.is_err());
        let wrong = authenticate(&host, "s3cret tokeN")
            .await
            .err()
            .expect("a wrong token is refused");
        assert!(
            matches!(wrong, Error::InvalidArgument(ref m) if m.contains("unauthenticated")),
            "{wrong:?}"
        );
        let prefix = authenticate(&host, "s3cret").await;
        assert!(prefix.is_err(), "a prefix of the token is not the token");
        let real = authenticate(&host, "s3cret token").await.unwrap();
        let response = fetch_by_name(&real, "counter", "a", "POST", "/", b"")
            .await
            .unwrap();
        assert_eq!(response.body().as_ref(), b"1\n");
        // The bootstrap itself stays locked.
        refused_as_unauthenticated(fetch_by_name(&host, "counter", "a", "POST", "/", b"").await);
    });
}

#[test]
fn without_a_token_authenticate_hands_back_the_host() {
    let server = TestServer::start(duro::builtin::register(Server::builder()));
    run_local(async {
        let host = server.connect().await;
        let same = authenticate(&host, "anything").await.unwrap();
        let response = fetch_by_name(&same, "counter", "a", "POST", "/", b"")
            .await
            .unwrap();
        assert_eq!(response.body().as_ref(), b"1\n");
    });
}

#[test]
fn a_unix_socket_is_for_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("duro.sock");
    let server = duro::builtin::register(Server::builder())
        .data_dir(dir.path().join("data"))
        .listen(duro::ListenAddr::Unix(socket.clone()))
        .start()
        .unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    run_local(async {
        let addr = format!("unix:{}", socket.display());
        let client = duro::client::Client::connect(addr.as_str()).await.unwrap();
        let stub = client.namespace("counter").get_by_name("u");
        let response = stub.fetch(request("POST", "/", b"")).await.unwrap();
        assert_eq!(response.body().as_ref(), b"1\n");
    });
    server.shutdown();
}

/// Never answers; counts the calls it holds.
struct Hang(Arc<AtomicUsize>);

impl DurableObject for Hang {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

#[test]
fn a_connection_may_hold_only_so_many_calls() {
    let held = Arc::new(AtomicUsize::new(0));
    let counter = held.clone();
    let builder = duro::builtin::register(Server::builder())
        .class("hang", move |_state, _env| Hang(counter.clone()))
        .namespace("hang", "hang");
    let server = TestServer::start(builder);
    run_local(async {
        let host = server.connect().await;
        let mut ns = host.namespace_request();
        ns.get().set_name("hang");
        let ns = ns.send().pipeline.get_namespace();
        let max = duro::rpc::CONNECTION_CALLS_MAX;
        let mut calls = Vec::new();
        for i in 0..max {
            let mut get = ns.get_by_name_request();
            get.get().set_name(format!("h{}", i % 8));
            let stub = get.send().pipeline.get_stub();
            calls.push(fetch_call(&stub, &request("GET", "/", b"")));
        }
        while held.load(Ordering::SeqCst) < max {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut get = ns.get_by_name_request();
        get.get().set_name("h0");
        let stub = get.send().pipeline.get_stub();
        let refused = duro::testing::fetch(&stub, request("GET", "/", b"")).await;
        assert!(
            matches!(refused, Err(Error::Overloaded(ref m)) if m.contains("CONNECTION_CALLS_MAX")),
            "{refused:?}"
        );
        // Another connection is not affected.
        let other = server.connect().await;
        let response = fetch_by_name(&other, "counter", "c", "POST", "/", b"")
            .await
            .unwrap();
        assert_eq!(response.body().as_ref(), b"1\n");
        drop(calls);
    });
}

#[test]
fn calls_past_the_budget_of_bytes_in_flight_are_overloaded_until_it_drains() {
    let held = Arc::new(AtomicUsize::new(0));
    let counter = held.clone();
    let limits = duro::HostLimits {
        inflight_bytes_max: 8 << 20,
        ..duro::HostLimits::default()
    };
    let builder = duro::builtin::register(Server::builder())
        .limits(limits)
        .class("hang", move |_state, _env| Hang(counter.clone()))
        .namespace("hang", "hang");
    let server = TestServer::start(builder);
    run_local(async {
        let host = server.connect().await;
        let mut ns = host.namespace_request();
        ns.get().set_name("hang");
        let ns = ns.send().pipeline.get_namespace();
        let stub = |i: usize| {
            let mut get = ns.get_by_name_request();
            get.get().set_name(format!("h{i}"));
            get.send().pipeline.get_stub()
        };
        // Each hanging call holds its 1 MiB request: seven fit in 8 MiB, the eighth does not.
        let body = vec![b'x'; 1 << 20];
        let calls: Vec<_> = (0..7)
            .map(|i| fetch_call(&stub(i), &request("POST", "/", &body)))
            .collect();
        while held.load(Ordering::SeqCst) < 7 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let eighth_stub = stub(7);
        let eighth = duro::testing::fetch(&eighth_stub, request("POST", "/", &body));
        let refused = tokio::time::timeout(std::time::Duration::from_secs(5), eighth)
            .await
            .expect("the eighth call was admitted: it hangs");
        assert!(
            matches!(refused, Err(Error::Overloaded(ref m)) if m.contains("inflight_bytes_max")),
            "{refused:?}"
        );
        // Small calls of another connection still fit; once the held calls end, big ones do too.
        let other = server.connect().await;
        let response = fetch_by_name(&other, "counter", "c", "POST", "/", b"")
            .await
            .unwrap();
        assert_eq!(response.body().as_ref(), b"1\n");
        drop(calls);
        let mut admitted = false;
        for _ in 0..200 {
            let echo = fetch_by_name(&other, "echo", "e", "POST", "/", &body).await;
            if echo.is_ok() {
                admitted = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(admitted, "the budget did not drain once the calls ended");
    });
}

/// Garbage on one connection closes it; the server and other connections carry on.
#[test]
fn garbage_on_the_wire_harms_no_one_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(duro::builtin::register(Server::builder()));
    run_local(async {
        let healthy = server.connect().await;
        let junk: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            vec![0xff; 4096],
            // A frame header announcing 2^31 words in one segment.
            vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f],
            // A truncated frame: header promises 100 words, 3 bytes follow.
            vec![0, 0, 0, 0, 100, 0, 0, 0, 1, 2, 3],
        ];
        for bytes in junk {
            let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
            stream.write_all(&bytes).await.unwrap();
            let _ = stream.shutdown().await;
            let mut sink = Vec::new();
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read_to_end(&mut sink),
            );
            assert!(
                read.await.is_ok(),
                "the server must end a connection that sent garbage"
            );
            let response = fetch_by_name(&healthy, "counter", "alive", "POST", "/", b"")
                .await
                .unwrap();
            assert!(!response.body().is_empty());
        }
    });
}

/// A full disk (a deliberately small LMDB map): the commit that does not fit resets its object
/// and fails its caller, nothing of it is visible, reads keep working, and writes work again
/// once space is freed.
#[test]
fn a_full_map_fails_the_write_and_recovers_when_space_returns() {
    let server = TestServer::start(duro::builtin::register(Server::builder()).map_bytes(1 << 20));
    run_local(async {
        let host = server.connect().await;
        let kv = |method: &'static str, path: String, body: Vec<u8>| {
            let host = host.clone();
            async move { fetch_by_name(&host, "kv", "full", method, &path, &body).await }
        };
        let value = vec![b'v'; 30 * 1024];
        let mut stored = Vec::new();
        let failure = loop {
            let key = format!("/k/{}", stored.len());
            match kv("PUT", key.clone(), value.clone()).await {
                Ok(response) => {
                    assert_eq!(response.status(), 204);
                    stored.push(key);
                }
                Err(error) => break error,
            }
            assert!(stored.len() < 1000, "a 1 MiB map never filled up");
        };
        assert!(matches!(failure, Error::Disconnected(_)), "{failure:?}");
        assert!(!stored.is_empty());
        // Nothing of the failed commit is visible; what was acknowledged is all there.
        let missing = kv("GET", format!("/k/{}", stored.len()), Vec::new())
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        for key in &stored {
            let got = kv("GET", key.clone(), Vec::new()).await.unwrap();
            assert_eq!(got.body().len(), value.len(), "{key}");
        }
        // Free space; LMDB reuses freed pages a couple of commits later, so allow a few tries.
        for key in stored.iter().take(stored.len() / 2) {
            let deleted = kv("DELETE", key.clone(), Vec::new()).await.unwrap();
            assert_eq!(deleted.body().as_ref(), b"true");
        }
        let mut recovered = false;
        for attempt in 0..5 {
            if let Ok(response) = kv("PUT", format!("/k/again{attempt}"), value.clone()).await {
                assert_eq!(response.status(), 204);
                recovered = true;
                break;
            }
        }
        assert!(recovered, "writes did not work again after space was freed");
    });
}

/// Answers `/body/N` with a body of N bytes, and `/headers/N` with an empty body and N bytes
/// of header values (in headers of 8 KiB).
struct Big;

impl DurableObject for Big {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let path = request.uri().path();
        if let Some(len) = path.strip_prefix("/body/") {
            return Ok(Response::new(vec![b'x'; len.parse()?].into()));
        }
        let len: usize = path.trim_start_matches("/headers/").parse()?;
        let mut response = Response::new(bytes::Bytes::new());
        let value = http::HeaderValue::from_str(&"v".repeat(8 << 10))?;
        for i in 0..len.div_ceil(8 << 10) {
            let name = http::HeaderName::from_bytes(format!("x-h{i}").as_bytes())?;
            response.headers_mut().insert(name, value.clone());
        }
        Ok(response)
    }
}

#[test]
fn oversized_answers_and_names_are_refused_naming_the_limit() {
    let builder = duro::builtin::register(Server::builder())
        .class("big", |_s, _e| Big)
        .namespace("big", "big");
    let server = TestServer::start(builder);
    run_local(async {
        let host = server.connect().await;
        let max = duro::rpc::RESPONSE_BYTES_MAX;
        let host = &host;
        let big =
            |path: String| async move { fetch_by_name(host, "big", "b", "GET", &path, b"").await };
        // The largest body that fits with the response's own overhead.
        let fits = max - duro::wire::convert::response_bytes(&Response::new(Default::default()));
        assert_eq!(
            big(format!("/body/{fits}")).await.unwrap().body().len(),
            fits
        );
        let over = big(format!("/body/{}", fits + 1)).await;
        assert!(
            matches!(over, Err(Error::Remote(ref m)) if m.contains("RESPONSE_BYTES_MAX")),
            "{over:?}"
        );
        // Headers count too: an empty body under too many of them is refused alone, where it
        // would have made the client drop the whole connection.
        let headers = big(format!("/headers/{}", max + 1)).await;
        assert!(
            matches!(headers, Err(Error::Remote(ref m)) if m.contains("RESPONSE_BYTES_MAX")),
            "{headers:?}"
        );
        let some_headers = big(format!("/headers/{}", 64 << 10)).await.unwrap();
        assert_eq!(some_headers.headers().len(), 8);
        // The connection survived: the refusal was the call's alone.
        let name = "n".repeat(1025);
        let long = fetch_by_name(host, "counter", &name, "POST", "/", b"").await;
        assert!(
            matches!(long, Err(Error::InvalidArgument(ref m)) if m.contains("name_bytes_max")),
            "{long:?}"
        );
        let ok = fetch_by_name(host, "counter", &"n".repeat(1024), "POST", "/", b"")
            .await
            .unwrap();
        assert_eq!(ok.body().as_ref(), b"1\n");
    });
}

/// What a connection owes for its answers is given back as they are written, all of it: a
/// long connection's account drains to nothing between calls, so its share of the budget
/// does not shrink call after call until it is refused (`overloaded`) for good.
#[test]
fn a_long_connections_account_drains_between_calls() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = duro::builtin::register(Server::builder())
            .data_dir(dir.path())
            .open_host()
            .unwrap();
        let (client_end, server_end) = tokio::io::duplex(1 << 16);
        let (server_r, server_w) = tokio::io::split(server_end);
        let served = duro::rpc::serve_connection(&host, &Default::default(), server_r, server_w);
        tokio::task::spawn_local(served);
        let (client_r, client_w) = tokio::io::split(client_end);
        let side = capnp_rpc::rpc_twoparty_capnp::Side::Client;
        let mut rpc = duro::wire::rpc_system(client_r, client_w, side, None);
        let client: host::Client = rpc.bootstrap(capnp_rpc::rpc_twoparty_capnp::Side::Server);
        tokio::task::spawn_local(rpc);
        for _ in 0..500 {
            let echo = fetch_by_name(&client, "echo", "e", "POST", "/", b"x").await;
            assert_eq!(echo.unwrap().status(), 200);
        }
        // The last answer's bytes are on their way out; then nothing is in flight.
        for _ in 0..200 {
            if host.inflight_bytes() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(
            host.inflight_bytes(),
            0,
            "bytes stayed owed after 500 calls"
        );
        host.shutdown().await;
    });
}
