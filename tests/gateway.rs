//! The HTTP gateway, over real HTTP/1.1 connections on loopback.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use duro::gateway::{GatewayOptions, WRONG_TOKEN_DELAY};
use duro::testing::{TestServer, fetch_by_name, run_local};
use duro::{BoxError, Builder, DurableObject, HostLimits, Request, Response, Server, State};
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

mod common;

/// Longest wait for any answer: a test that would hang fails instead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Builtins plus the test classes below, with the gateway on.
fn builder() -> Builder {
    duro::builtin::register(Server::builder())
        .class("fail", |_state, _env| Fail)
        .namespace("fail", "fail")
        .class("panic", |_state, _env| Panic)
        .namespace("panic", "panic")
        .http("127.0.0.1:0".parse().unwrap())
}

fn http_addr(server: &TestServer) -> SocketAddr {
    server.http_addr().expect("the gateway is on")
}

/// Answers every request with an error.
struct Fail;

impl DurableObject for Fail {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        Err("boom: the object failed".into())
    }
}

/// Panics on POST; answers GET with "alive".
struct Panic;

impl DurableObject for Panic {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        if request.method() == Method::POST {
            panic!("the object panicked on purpose");
        }
        Ok(Response::new(Bytes::from_static(b"alive")))
    }
}

/// Holds its input gate (so later requests queue) until a permit of `release` is free.
struct Hold {
    state: State,
    /// Notified when a request is inside the handler.
    entered: Arc<Notify>,
    release: Arc<Semaphore>,
}

impl DurableObject for Hold {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        let (entered, release) = (&self.entered, &self.release);
        let wait = async move {
            entered.notify_one();
            release.acquire().await.map(drop)
        };
        self.state.block_concurrency_while(wait).await?;
        Ok(Response::new(Bytes::from_static(b"released")))
    }
}

/// An answer as the client saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// One keep-alive HTTP/1.1 connection: every request made through it goes over it.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Connection {
        let stream = TcpStream::connect(addr).await.expect("connecting");
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 handshake");
        tokio::task::spawn_local(connection);
        Connection { sender }
    }

    async fn send(&mut self, request: http::Request<Full<Bytes>>) -> Reply {
        let what = format!("{} {}", request.method(), request.uri());
        let exchange = async {
            let response = self.sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(ANSWER_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer"))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    async fn call(&mut self, method: &str, path: &str, body: &'static [u8]) -> Reply {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from_static(body)))
            .expect("a valid request");
        self.send(request).await
    }
}

/// One request on a connection of its own.
async fn call_once(addr: SocketAddr, method: &str, path: &str) -> Reply {
    Connection::open(addr).await.call(method, path, b"").await
}

#[test]
fn counter_counts_over_one_connection_and_survives_a_restart() {
    let server = TestServer::start(builder());
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        for expected in 1..=3 {
            let reply = connection.call("POST", "/counter/a", b"").await;
            assert_eq!((reply.status, reply.text()), (200, format!("{expected}\n")));
        }
        let reply = connection.call("GET", "/counter/a/", b"").await;
        assert_eq!((reply.status, reply.text()), (200, "3\n".to_owned()));
        let other = connection.call("GET", "/counter/b", b"").await;
        assert_eq!(other.text(), "0\n", "each name is an object of its own");
    });
    let server = TestServer::start_in(builder(), server.stop());
    run_local(async {
        let reply = call_once(http_addr(&server), "GET", "/counter/a").await;
        assert_eq!((reply.status, reply.text()), (200, "3\n".to_owned()));
    });
}

#[test]
fn names_are_percent_decoded() {
    let server = TestServer::start(builder());
    run_local(async {
        let reply = call_once(http_addr(&server), "POST", "/counter/a%20b").await;
        assert_eq!((reply.status, reply.text()), (200, "1\n".to_owned()));
        let host = server.connect().await;
        let response = fetch_by_name(&host, "counter", "a b", "GET", "/", b"").await;
        assert_eq!(response.unwrap().body().as_ref(), b"1\n", "the same object");
    });
}

#[test]
fn echo_sees_the_rewritten_request() {
    let server = TestServer::start(builder());
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        let request = http::Request::builder()
            .method("PATCH")
            .uri("/echo/a/x/y?q=1")
            .header("x-test", "yes")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        let reply = connection.send(request).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let echoed = reply.json();
        assert_eq!(echoed["method"], "PATCH");
        assert_eq!(echoed["url"], "/x/y?q=1");
        assert_eq!(echoed["body_base64"], "aGVsbG8=");
        let headers = echoed["headers"].as_array().unwrap();
        assert!(headers.contains(&json!(["x-test", "yes"])), "{headers:?}");
        for (path, url) in [
            ("/echo/a", "/"),
            ("/echo/a/", "/"),
            ("/echo/a?q=1", "/?q=1"),
        ] {
            let reply = connection.call("GET", path, b"").await;
            assert_eq!(reply.json()["url"], url, "{path}");
        }
    });
}

#[test]
fn kv_keys_may_contain_slashes() {
    let server = TestServer::start(builder());
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        let put = connection.call("PUT", "/kv/store/k/a/b", b"value").await;
        assert_eq!(put.status, 204, "{}", put.text());
        for path in ["/kv/store/k/a/b", "/kv/store/k/a%2Fb"] {
            let get = connection.call("GET", path, b"").await;
            assert_eq!(
                (get.status, get.text()),
                (200, "value".to_owned()),
                "{path}"
            );
        }
        let elsewhere = connection.call("GET", "/kv/other/k/a/b", b"").await;
        assert_eq!(elsewhere.status, 404, "another object, another storage");
    });
}

#[test]
fn bad_paths_and_unknown_namespaces_are_refused() {
    let server = TestServer::start(builder());
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        for path in [
            "/",
            "/counter",
            "/counter/",
            "//a",
            "/counter//x",
            "/counter/%FF",
        ] {
            let reply = connection.call("GET", path, b"").await;
            assert_eq!(reply.status, 400, "{path}: {}", reply.text());
            assert!(
                reply.text().contains("bad path"),
                "{path}: {}",
                reply.text()
            );
        }
        let long = format!("/counter/{}", "n".repeat(2000));
        let reply = connection.call("GET", &long, b"").await;
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert!(reply.text().contains("name_bytes_max"), "{}", reply.text());
        let reply = connection.call("GET", "/nowhere/a", b"").await;
        assert_eq!(reply.status, 404, "{}", reply.text());
        assert!(reply.text().contains("nowhere"), "{}", reply.text());
        let reply = connection.call("POST", "/counter/a", b"").await;
        assert_eq!(reply.status, 200, "the connection still serves");
    });
}

/// The warnings the servers of this test binary logged (every server runs on a thread of its
/// own, so the subscriber that collects them is the global one).
fn warnings() -> String {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let log = LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        log
    });
    String::from_utf8_lossy(&log.lock().unwrap()).into_owned()
}

/// Appends what is logged to a shared buffer.
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_object_error_is_500_with_a_request_id_and_its_text_goes_to_the_log_only() {
    warnings(); // Collecting from now on.
    let server = TestServer::start(builder());
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        let mut ids = Vec::new();
        for _ in 0..2 {
            let reply = connection.call("GET", "/fail/a", b"").await;
            assert_eq!(reply.status, 500, "{}", reply.text());
            let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
            assert!(
                id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{id}"
            );
            let body = format!("internal error (request id {id})\n");
            assert_eq!(reply.text(), body, "the object's text stays on the server");
            ids.push(id);
        }
        assert_ne!(ids[0], ids[1], "an ID per request");
        let log = warnings();
        for id in &ids {
            let line = log.lines().find(|line| line.contains(id.as_str()));
            let line = line.unwrap_or_else(|| panic!("no warning with {id}:\n{log}"));
            for part in [
                "WARN",
                "namespace=\"fail\"",
                "name=\"a\"",
                "boom: the object failed",
            ] {
                assert!(line.contains(part), "{part} not in {line}");
            }
        }
    });
}

#[test]
fn with_expose_errors_an_object_error_is_500_with_its_text() {
    let options = GatewayOptions {
        expose_errors: true,
        ..GatewayOptions::default()
    };
    let server = TestServer::start(builder().gateway_options(options));
    run_local(async {
        let reply = call_once(http_addr(&server), "GET", "/fail/a").await;
        assert_eq!(reply.status, 500);
        assert!(
            reply.text().contains("boom: the object failed"),
            "{}",
            reply.text()
        );
        // The call's request ID, as every failed call's answer has it.
        assert_eq!(reply.headers["x-request-id"].len(), 16);
    });
}

#[test]
fn a_reset_is_502_and_the_next_request_gets_a_fresh_instance() {
    let server = TestServer::start(builder());
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        let reply = connection.call("POST", "/panic/a", b"").await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert!(reply.text().contains("disconnected"), "{}", reply.text());
        let reply = connection.call("GET", "/panic/a", b"").await;
        assert_eq!(
            (reply.status, reply.text()),
            (200, "alive".to_owned()),
            "a fresh instance serves the next request"
        );
    });
}

#[test]
fn a_full_object_queue_is_503_with_retry_after() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Semaphore::new(0));
    let (entered_in, release_in) = (entered.clone(), release.clone());
    let builder = Server::builder()
        .class("hold", move |state, _env| Hold {
            state,
            entered: entered_in.clone(),
            release: release_in.clone(),
        })
        .namespace("hold", "hold")
        .limits(HostLimits {
            object_queue_max: 2,
            ..Default::default()
        })
        .http("127.0.0.1:0".parse().unwrap());
    let server = TestServer::start(builder);
    let addr = http_addr(&server);
    run_local(async {
        let first = tokio::task::spawn_local(call_once(addr, "POST", "/hold/x"));
        tokio::time::timeout(ANSWER_TIMEOUT, entered.notified())
            .await
            .expect("the first request is in the handler");
        // The first holds the object; of two more, one queues (two calls in progress) and one
        // finds the object full.
        let mut waiting: Vec<_> = (0..2)
            .map(|_| tokio::task::spawn_local(call_once(addr, "POST", "/hold/x")))
            .collect();
        let (refused, index, _) = futures::future::select_all(&mut waiting).await;
        let refused = refused.unwrap();
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(refused.headers["retry-after"], "1");
        assert!(
            refused.text().contains("object_queue_max"),
            "{}",
            refused.text()
        );
        waiting.remove(index);
        // One permit, given back by each handler in turn, lets every held request finish.
        release.add_permits(1);
        for held in waiting.into_iter().chain([first]) {
            let reply = held.await.unwrap();
            assert_eq!((reply.status, reply.text()), (200, "released".to_owned()));
        }
        let reply = call_once(addr, "POST", "/hold/x").await;
        assert_eq!(reply.status, 200, "the drained queue takes requests again");
    });
}

/// Sends `head` (and any bytes after it) on a fresh connection, and reads until the server
/// closes it: the server must answer without waiting for the rest of the body.
async fn exchange_raw(addr: SocketAddr, parts: &[&[u8]]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connecting");
    for part in parts {
        stream.write_all(part).await.expect("sending");
    }
    let mut answer = Vec::new();
    tokio::time::timeout(ANSWER_TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .expect("an answer, and the connection closed, before the body is complete")
        .expect("reading the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

/// The next `len` bytes the server sends.
async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    tokio::time::timeout(ANSWER_TIMEOUT, stream.read_exact(&mut bytes))
        .await
        .expect("an answer")
        .expect("reading the answer");
    bytes
}

fn limited_builder() -> Builder {
    builder().gateway_options(GatewayOptions {
        body_bytes_max: 1024,
        ..GatewayOptions::default()
    })
}

#[test]
fn a_content_length_over_the_limit_is_refused_at_once() {
    let server = TestServer::start(limited_builder());
    let addr = http_addr(&server);
    run_local(async {
        // Ten megabytes announced, none sent: an answer proves the body was not awaited.
        let head =
            b"PUT /kv/store/k/big HTTP/1.1\r\nhost: duro\r\ncontent-length: 10000000\r\n\r\n";
        let answer = exchange_raw(addr, &[head]).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("body_bytes_max"), "{answer}");
        // A client that waits for 100 Continue before it sends its body (as curl does) gets it.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = b"PUT /kv/store/k/small HTTP/1.1\r\nhost: duro\r\ncontent-length: 5\r\n\
                     expect: 100-continue\r\n\r\n";
        stream.write_all(head).await.unwrap();
        let answer = read_exactly(&mut stream, 25).await;
        assert_eq!(answer, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(b"small").await.unwrap();
        assert_eq!(read_exactly(&mut stream, 12).await, b"HTTP/1.1 204");
        let mut connection = Connection::open(addr).await;
        let at_limit = http::Request::builder()
            .method("PUT")
            .uri("/kv/store/k/big")
            .body(Full::new(Bytes::from(vec![b'v'; 1024])))
            .unwrap();
        assert_eq!(connection.send(at_limit).await.status, 204, "at the limit");
        let over = http::Request::builder()
            .method("PUT")
            .uri("/kv/store/k/big")
            .body(Full::new(Bytes::from(vec![b'v'; 1025])))
            .unwrap();
        assert_eq!(connection.send(over).await.status, 413, "one byte over");
        let reply = call_once(addr, "GET", "/kv/store/k/big").await;
        assert_eq!(reply.body.len(), 1024, "the refused body was not stored");
    });
}

#[test]
fn a_chunked_body_over_the_limit_is_refused_once_past_it() {
    let server = TestServer::start(limited_builder());
    let addr = http_addr(&server);
    run_local(async {
        let head =
            b"PUT /kv/store/k/big HTTP/1.1\r\nhost: duro\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunk = [b"200\r\n".as_slice(), &[b'v'; 0x200], b"\r\n"].concat();
        // Three chunks of 512 bytes pass the limit of 1024; the final empty chunk never comes.
        let answer = exchange_raw(addr, &[head, &chunk, &chunk, &chunk]).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let within = [head.as_slice(), &chunk, &chunk, b"0\r\n\r\n"].concat();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&within).await.unwrap();
        let status = read_exactly(&mut stream, 12).await;
        assert_eq!(status, b"HTTP/1.1 204", "a chunked body within the limit");
        let reply = call_once(addr, "GET", "/kv/store/k/big").await;
        assert_eq!((reply.status, reply.body.len()), (200, 1024));
    });
}

/// Answers with the bytes of its `x-raw` header, in hex.
struct RawHeader;

impl DurableObject for RawHeader {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let value = request.headers().get("x-raw").ok_or("no x-raw header")?;
        let hex: String = value
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Response::new(hex.into()))
    }
}

#[test]
fn a_header_that_is_not_utf8_reaches_the_object_as_sent_by_either_path() {
    let server = TestServer::start(
        builder()
            .class("raw", |_state, _env| RawHeader)
            .namespace("raw", "raw"),
    );
    run_local(async {
        let sent = b"caf\xe9";
        let answer = exchange_raw(
            http_addr(&server),
            &[b"GET /raw/a/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-raw: caf\xe9\r\n\r\n"],
        )
        .await;
        assert!(answer.ends_with("\r\n\r\n636166e9"), "{answer}");
        let host = server.connect().await;
        let mut request = duro::testing::request("GET", "/", b"");
        let value = http::HeaderValue::from_bytes(sent).unwrap();
        request.headers_mut().insert("x-raw", value);
        let mut ns = host.namespace_request();
        ns.get().set_name("raw");
        let ns = ns.send().pipeline.get_namespace();
        let mut get = ns.get_by_name_request();
        get.get().set_name("a");
        let stub = get.send().pipeline.get_stub();
        let response = duro::testing::fetch(&stub, request).await.unwrap();
        assert_eq!(
            response.body().as_ref(),
            b"636166e9",
            "the same bytes over capnp"
        );
    });
}

const TOKEN: &str = "s3cret token";

/// `method path`, with `authorization` as its Authorization header if given, and `body`.
fn authorized(
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &'static [u8],
) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::builder().method(method).uri(path);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request
        .body(Full::new(Bytes::from_static(body)))
        .expect("a valid request")
}

#[test]
fn with_a_token_only_requests_that_carry_it_reach_an_object() {
    let server = TestServer::start(builder().token(TOKEN));
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        let right = format!("Bearer {TOKEN}");
        // No header, another scheme, no token: told which scheme to use. A path to nowhere is
        // refused the same way, so it tells nothing about the namespaces.
        for (authorization, path, body) in [
            (None, "/counter/a", &b""[..]),
            (None, "/counter/a", b"a body left unread"),
            (None, "/nowhere/a", b""),
            (Some("Basic czNjcmV0IHRva2Vu"), "/counter/a", b""),
            (Some("Bearer"), "/counter/a", b""),
            (Some(TOKEN), "/counter/a", b""),
        ] {
            let request = authorized("POST", path, authorization, body);
            let reply = connection.send(request).await;
            let what = format!("{authorization:?} {path}");
            assert_eq!(reply.status, 401, "{what}: {}", reply.text());
            assert_eq!(reply.headers["www-authenticate"], "Bearer", "{what}");
            assert!(reply.text().contains("Bearer"), "{what}: {}", reply.text());
        }
        // A wrong token, a prefix of the right one, and the right one in another case: refused
        // as invalid, each after the delay that slows guessing.
        for wrong in ["Bearer wrong", "Bearer s3cret", "Bearer S3CRET TOKEN"] {
            let started = Instant::now();
            let reply = connection
                .send(authorized("POST", "/counter/a", Some(wrong), b""))
                .await;
            assert_eq!(reply.status, 401, "{wrong}: {}", reply.text());
            let challenge = r#"Bearer error="invalid_token""#;
            assert_eq!(reply.headers["www-authenticate"], challenge, "{wrong}");
            assert!(
                started.elapsed() >= WRONG_TOKEN_DELAY,
                "{wrong}: answered at once"
            );
        }
        // The scheme's case does not matter.
        for authorization in [right.clone(), format!("bearer {TOKEN}")] {
            let reply = connection
                .send(authorized("GET", "/counter/a", Some(&authorization), b""))
                .await;
            let text = reply.text();
            assert_eq!(
                (reply.status, text.as_str()),
                (200, "0\n"),
                "nothing reached it"
            );
        }
        let reply = connection
            .send(authorized("POST", "/counter/a", Some(&right), b""))
            .await;
        assert_eq!((reply.status, reply.text()), (200, "1\n".to_owned()));
        let host = server.connect().await;
        let response = fetch_by_name(&host, "counter", "a", "GET", "/", b"").await;
        assert!(
            response.is_err(),
            "the Cap'n Proto side still asks for the token"
        );
    });
}

#[test]
fn the_token_never_reaches_the_object() {
    let server = TestServer::start(builder().token(TOKEN));
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        let mut request = authorized("GET", "/echo/a", Some(&format!("Bearer {TOKEN}")), b"");
        request
            .headers_mut()
            .insert("x-test", http::HeaderValue::from_static("yes"));
        let reply = connection.send(request).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let headers = reply.json()["headers"].clone();
        let headers = headers.as_array().unwrap();
        assert!(headers.contains(&json!(["x-test", "yes"])), "{headers:?}");
        assert!(
            headers.iter().all(|header| header[0] != "authorization"),
            "{headers:?}"
        );
    });
}

#[test]
fn without_a_token_requests_need_none_and_authorization_goes_through() {
    let server = TestServer::start(builder());
    run_local(async {
        let mut connection = Connection::open(http_addr(&server)).await;
        let reply = connection.call("POST", "/counter/a", b"").await;
        assert_eq!((reply.status, reply.text()), (200, "1\n".to_owned()));
        let own = "Bearer the object's own scheme";
        let reply = connection
            .send(authorized("GET", "/echo/a", Some(own), b""))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let headers = reply.json()["headers"].clone();
        assert!(
            headers
                .as_array()
                .unwrap()
                .contains(&json!(["authorization", own])),
            "{headers:?}"
        );
    });
}

#[test]
fn duro_serve_asks_http_clients_for_the_token_of_its_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("  {TOKEN}\n")).unwrap();
    let flags = [
        "--token-file",
        token_file.to_str().unwrap(),
        "--expose-errors",
    ];
    let served = common::serve_with(&dir.path().join("data"), &flags);
    run_local(async {
        let mut connection = Connection::open(served.http.expect("the gateway")).await;
        let reply = connection.call("POST", "/counter/a", b"").await;
        assert_eq!(reply.status, 401, "{}", reply.text());
        let right = format!("Bearer {TOKEN}");
        let reply = connection
            .send(authorized("POST", "/counter/a", Some(&right), b""))
            .await;
        assert_eq!((reply.status, reply.text()), (200, "1\n".to_owned()));
    });
}
