//! `DurableObject.request` over real two-party connections: streamed request and response
//! bodies, E-order with `fetch`, the order of capnp's streaming writes, WebSockets, and errors.
//! Raw capnp where the wire is what is tested; the Rust client where its API is.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use duro::client::{Client, WebSocketEvent};
use duro::duro_capnp::{byte_stream, durable_object, host, response_context};
use duro::rpc::CONNECTION_CALLS_MAX;
use duro::testing::{TestServer, fetch_call, request, run_local};
use duro::wire::convert;
use duro::{
    Body, BoxError, DurableObject, Error, Request, Response, Server, State, StreamRequest,
    StreamResponse, WebSocket, WebSocketMessage,
};
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use tokio::sync::mpsc;

/// What a body looked like to its reader: its size, how it came (chunks, the largest), and an
/// order-sensitive checksum of its bytes (FNV-1a).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    bytes: usize,
    chunks: usize,
    largest: usize,
    checksum: u64,
}

impl Default for Seen {
    fn default() -> Seen {
        Seen {
            bytes: 0,
            chunks: 0,
            largest: 0,
            checksum: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Seen {
    fn add(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len();
        self.chunks += 1;
        self.largest = self.largest.max(chunk.len());
        for byte in chunk {
            self.checksum = (self.checksum ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn to_text(self) -> String {
        format!(
            "{} {} {} {}",
            self.bytes, self.chunks, self.largest, self.checksum
        )
    }

    fn parse(text: &[u8]) -> Seen {
        let text = std::str::from_utf8(text).unwrap();
        let numbers: Vec<u64> = text.split(' ').map(|n| n.parse().unwrap()).collect();
        Seen {
            bytes: numbers[0] as usize,
            chunks: numbers[1] as usize,
            largest: numbers[2] as usize,
            checksum: numbers[3],
        }
    }
}

/// Chunk `k` of a test body: its bytes depend on `k`, so a chunk out of place changes the
/// checksum.
fn chunk(k: usize, len: usize) -> Bytes {
    (0..len)
        .map(|j| (k * 31 + j * 17 + (j >> 8)) as u8)
        .collect()
}

/// Reads the request body a chunk at a time and answers with what it saw ([`Seen`]).
struct Tally;

impl DurableObject for Tally {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        let mut body = request.into_body();
        let mut seen = Seen::default();
        while let Some(chunk) = body.chunk().await {
            seen.add(&chunk?);
        }
        Ok(StreamResponse::new(Body::from(seen.to_text())))
    }
}

/// Answers with a stream: [`EVENTS`] server-sent events, one every [`EVENT_GAP`], and sets
/// `done` after the last. `/fail` fails before answering; `/broken` breaks its body off after
/// the first event.
struct Ticker {
    done: Arc<AtomicBool>,
}

const EVENTS: usize = 10;
const EVENT_GAP: Duration = Duration::from_millis(30);

impl DurableObject for Ticker {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        let path = request.uri().path().to_owned();
        if path == "/fail" {
            return Err("it failed before answering".into());
        }
        let (mut events, response) =
            duro::response::stream(http::StatusCode::OK, "text/event-stream");
        let done = self.done.clone();
        tokio::task::spawn_local(async move {
            for i in 0..EVENTS {
                if events.send(format!("data: {i}\n\n").into()).await.is_err() {
                    return;
                }
                if path == "/broken" {
                    events.abort("the ticker broke");
                    return;
                }
                tokio::time::sleep(EVENT_GAP).await;
            }
            done.store(true, Ordering::SeqCst);
            events.finish();
        });
        Ok(response)
    }
}

/// Records the paths of the requests it gets, in order; `/seen` answers with them, and
/// `/panic` panics (which resets the object).
#[derive(Default)]
struct Recorder {
    seen: std::cell::RefCell<Vec<String>>,
}

impl DurableObject for Recorder {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let path = request.uri().path().trim_start_matches('/').to_owned();
        if path == "seen" {
            return Ok(Response::new(self.seen.borrow().join(",").into()));
        }
        if path == "panic" {
            panic!("the recorder panics, as asked");
        }
        self.seen.borrow_mut().push(path);
        Ok(Response::new(Bytes::new()))
    }
}

/// Reads a body of 8-byte sequence numbers and answers `<count> <in order> <weighted sum>`.
struct Sequence;

impl DurableObject for Sequence {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let numbers: Vec<u64> = request
            .body()
            .chunks_exact(8)
            .map(|n| u64::from_le_bytes(n.try_into().unwrap()))
            .collect();
        let in_order = numbers.iter().enumerate().all(|(i, n)| *n == i as u64);
        let sum: u64 = numbers
            .iter()
            .enumerate()
            .map(|(i, n)| (i as u64 + 1) * n)
            .sum();
        let answer = format!("{} {in_order} {sum}", numbers.len());
        Ok(Response::new(answer.into()))
    }
}

/// Never reads its request body, and never answers.
struct Stall;

impl DurableObject for Stall {
    async fn fetch_stream(&self, _request: StreamRequest) -> Result<StreamResponse, BoxError> {
        std::future::pending().await
    }
}

/// Returns the request body as the response body: both stream at once.
struct Pipe;

impl DurableObject for Pipe {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        Ok(StreamResponse::new(request.into_body()))
    }
}

/// A chat room: accepts WebSockets and broadcasts every message to every socket; logs the
/// closes and errors of its sockets.
struct Chat {
    state: State,
    log: Arc<Mutex<Vec<String>>>,
}

impl DurableObject for Chat {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        self.state.accept_web_socket(&request, &[])?;
        Ok(duro::response::switching_protocols())
    }

    async fn web_socket_message(
        &self,
        _socket: WebSocket,
        message: WebSocketMessage,
    ) -> Result<(), BoxError> {
        for socket in self.state.get_web_sockets(None) {
            socket.send(message.clone())?;
        }
        Ok(())
    }

    async fn web_socket_close(
        &self,
        _socket: WebSocket,
        code: u16,
        reason: String,
    ) -> Result<(), BoxError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("close {code} {reason}"));
        Ok(())
    }

    async fn web_socket_error(&self, _socket: WebSocket, error: String) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("error {error}"));
        Ok(())
    }
}

struct Shared {
    /// Set by the ticker once it wrote its last event.
    done: Arc<AtomicBool>,
    /// The chat's closes and errors.
    log: Arc<Mutex<Vec<String>>>,
}

fn server() -> (TestServer, Shared) {
    let shared = Shared {
        done: Arc::new(AtomicBool::new(false)),
        log: Arc::default(),
    };
    let (done, log) = (shared.done.clone(), shared.log.clone());
    let builder = Server::builder()
        .class("tally", |_state, _env| Tally)
        .namespace("tally", "tally")
        .class("ticker", move |_state, _env| Ticker { done: done.clone() })
        .namespace("ticker", "ticker")
        .class("recorder", |_state, _env| Recorder::default())
        .namespace("recorder", "recorder")
        .class("sequence", |_state, _env| Sequence)
        .namespace("sequence", "sequence")
        .class("stall", |_state, _env| Stall)
        .namespace("stall", "stall")
        .class("pipe", |_state, _env| Pipe)
        .namespace("pipe", "pipe")
        .class("chat", move |state, _env| Chat {
            state,
            log: log.clone(),
        })
        .namespace("chat", "chat");
    (TestServer::start(builder), shared)
}

fn stub(host: &host::Client, namespace: &str, name: &str) -> durable_object::Client {
    let mut call = host.namespace_request();
    call.get().set_name(namespace);
    let namespace = call.send().pipeline.get_namespace();
    let mut call = namespace.get_by_name_request();
    call.get().set_name(name);
    call.send().pipeline.get_stub()
}

/// What the caller's side of a `request` call received, in order.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Response {
        status: u16,
        body: Vec<u8>,
        follows: bool,
    },
    Write(Vec<u8>),
    End,
}

/// The caller's `ResponseContext`: reports what it gets.
struct Context(mpsc::UnboundedSender<Got>);

impl response_context::Server for Context {
    async fn start_response(
        self: Rc<Self>,
        params: response_context::StartResponseParams,
        mut results: response_context::StartResponseResults,
    ) -> capnp::Result<()> {
        let params = params.get()?;
        let response = params.get_response()?;
        let follows = params.get_body_follows();
        let _ = self.0.send(Got::Response {
            status: response.get_status(),
            body: response.get_body()?.to_vec(),
            follows,
        });
        if follows {
            let sink: byte_stream::Client = capnp_rpc::new_client(Sink(self.0.clone()));
            results.get().set_body(sink);
        }
        Ok(())
    }
}

/// The caller's response body: reports each write and the end.
struct Sink(mpsc::UnboundedSender<Got>);

impl byte_stream::Server for Sink {
    async fn write(self: Rc<Self>, params: byte_stream::WriteParams) -> capnp::Result<()> {
        let _ = self.0.send(Got::Write(params.get()?.get_bytes()?.to_vec()));
        Ok(())
    }

    async fn end(
        self: Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> capnp::Result<()> {
        let _ = self.0.send(Got::End);
        Ok(())
    }
}

type RequestCall = capnp::capability::RemotePromise<durable_object::request_results::Owned>;

/// Sends `request` with `request` now; what the caller's context gets arrives on the receiver.
fn send_request(
    stub: &durable_object::Client,
    request: &Request,
    body_follows: bool,
) -> (RequestCall, mpsc::UnboundedReceiver<Got>) {
    let (got, receiver) = mpsc::unbounded_channel();
    let mut call = stub.request_request();
    convert::request_to_capnp(request, call.get().init_request());
    call.get().set_body_follows(body_follows);
    call.get().set_context(capnp_rpc::new_client(Context(got)));
    (call.send(), receiver)
}

fn ok_response(got: Option<Got>) -> (Vec<u8>, bool) {
    match got {
        Some(Got::Response {
            status: 200,
            body,
            follows,
        }) => (body, follows),
        other => panic!("expected a 200 response, got {other:?}"),
    }
}

#[test]
fn a_64_mib_request_body_arrives_whole_and_in_order_a_chunk_at_a_time() {
    const CHUNKS: usize = 1024;
    const CHUNK_BYTES: usize = 64 << 10;
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let stub = stub(&host, "tally", "big");
        let (call, mut got) = send_request(&stub, &request("PUT", "/", b""), true);
        // Pipelined on the call's result: the writes start in its first round trip.
        let body = call.pipeline.get_request_body();
        let mut sent = Seen::default();
        for k in 0..CHUNKS {
            let chunk = chunk(k, CHUNK_BYTES);
            sent.add(&chunk);
            let mut write = body.write_request();
            write.get().set_bytes(&chunk);
            // Waits only for capnp's flow control, not for the write's return.
            write.send().await.unwrap();
        }
        body.end_request().send().promise.await.unwrap();
        call.promise.await.unwrap();
        let (answer, follows) = ok_response(got.recv().await);
        assert!(!follows);
        let seen = Seen::parse(&answer);
        assert_eq!(seen.bytes, CHUNKS * CHUNK_BYTES);
        assert_eq!(seen.checksum, sent.checksum, "the body came out of order");
        // It came as it was written, a write at a time: the host never held the whole body.
        assert_eq!(seen.chunks, CHUNKS);
        assert_eq!(seen.largest, CHUNK_BYTES);
    });
}

#[test]
fn a_streamed_response_reaches_the_caller_while_the_object_still_writes() {
    let (server, shared) = server();
    run_local(async {
        let host = server.connect().await;
        let stub = stub(&host, "ticker", "events");
        let (call, mut got) = send_request(&stub, &request("GET", "/events", b""), false);
        let (_, follows) = ok_response(got.recv().await);
        assert!(follows);
        assert_eq!(got.recv().await, Some(Got::Write(b"data: 0\n\n".to_vec())));
        assert!(
            !shared.done.load(Ordering::SeqCst),
            "the first event arrived only after the object wrote the last"
        );
        for i in 1..EVENTS {
            let event = format!("data: {i}\n\n").into_bytes();
            assert_eq!(got.recv().await, Some(Got::Write(event)));
        }
        assert_eq!(got.recv().await, Some(Got::End));
        call.promise.await.unwrap();
        assert!(shared.done.load(Ordering::SeqCst));
    });
}

#[test]
fn fetch_and_request_on_one_stub_arrive_in_the_order_made() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let stub = stub(&host, "recorder", "order");
        let mut calls: Vec<LocalBoxFuture<'static, ()>> = Vec::new();
        for i in 0..100 {
            let path = format!("/{i}");
            if i % 2 == 0 {
                let call = fetch_call(&stub, &request("POST", &path, b""));
                calls.push(async move { drop(call.promise.await.unwrap()) }.boxed_local());
            } else {
                let (call, mut got) = send_request(&stub, &request("POST", &path, b""), false);
                calls.push(
                    async move {
                        call.promise.await.unwrap();
                        ok_response(got.recv().await);
                    }
                    .boxed_local(),
                );
            }
        }
        // Awaited in reverse: the order is the order the calls were made, not awaited.
        for call in calls.into_iter().rev() {
            call.await;
        }
        let seen = duro::testing::fetch(&stub, request("GET", "/seen", b"")).await;
        let expected: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        assert_eq!(seen.unwrap().body(), expected.join(",").as_bytes());
    });
}

/// With several shards, a stub to an object of another shard hands its whole fetches off to
/// that shard until its first streamed call, which goes through the link between the shards:
/// that call, sent right behind fetches not yet delivered there, must still arrive after them.
#[test]
fn a_streamed_call_right_behind_fetches_arrives_after_them_on_every_object() {
    const OBJECTS: usize = 24;
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let mut calls: Vec<LocalBoxFuture<'static, ()>> = Vec::new();
        let stubs: Vec<_> = (0..OBJECTS)
            .map(|o| stub(&host, "recorder", &format!("behind-{o}")))
            .collect();
        for stub in &stubs {
            for i in 0..30 {
                let path = format!("/{i}");
                if i == 10 {
                    let (call, mut got) = send_request(stub, &request("POST", &path, b""), false);
                    calls.push(
                        async move {
                            call.promise.await.unwrap();
                            ok_response(got.recv().await);
                        }
                        .boxed_local(),
                    );
                } else {
                    let call = fetch_call(stub, &request("POST", &path, b""));
                    calls.push(async move { drop(call.promise.await.unwrap()) }.boxed_local());
                }
            }
        }
        futures::future::join_all(calls).await;
        let expected: Vec<String> = (0..30).map(|i| i.to_string()).collect();
        for stub in &stubs {
            let seen = duro::testing::fetch(stub, request("GET", "/seen", b"")).await;
            assert_eq!(seen.unwrap().body(), expected.join(",").as_bytes());
        }
    });
}

/// A stub made before its object was reset stays broken whichever way its calls go: with
/// several shards, a stub to an object of another shard hands its fetches off, and its first
/// streamed call takes the link, which must reach the instance the stub was made for (reset),
/// not a new one.
#[test]
fn a_stub_that_only_fetched_before_its_object_reset_fails_its_first_streamed_call() {
    const OBJECTS: usize = 12;
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let other_host = server.connect().await;
        for o in 0..OBJECTS {
            let name = format!("reset-{o}");
            let stub = stub(&host, "recorder", &name);
            let call = fetch_call(&stub, &request("POST", "/a", b""));
            call.promise.await.unwrap();
            // The object is reset through a stub of another connection.
            let other = self::stub(&other_host, "recorder", &name);
            let panicked = fetch_call(&other, &request("POST", "/panic", b""));
            let error = panicked.promise.await.map(drop).map_err(Error::from);
            assert!(matches!(error, Err(Error::Disconnected(_))), "{error:?}");
            // The first call of `stub` that takes the link fails too, and so do later ones.
            let (call, mut got) = send_request(&stub, &request("POST", "/b", b""), false);
            let error = call.promise.await.map(drop).map_err(Error::from);
            assert!(
                matches!(error, Err(Error::Disconnected(_))),
                "{name}: {error:?}"
            );
            assert_eq!(
                got.recv().await,
                None,
                "a call to the reset object answered"
            );
            let call = fetch_call(&stub, &request("POST", "/c", b""));
            let error = call.promise.await.map(drop).map_err(Error::from);
            assert!(
                matches!(error, Err(Error::Disconnected(_))),
                "{name}: {error:?}"
            );
            // A new stub reaches a new instance, which saw none of those calls.
            let fresh = self::stub(&host, "recorder", &name);
            let (call, mut got) = send_request(&fresh, &request("POST", "/d", b""), false);
            call.promise.await.unwrap();
            ok_response(got.recv().await);
            let seen = duro::testing::fetch(&fresh, request("GET", "/seen", b"")).await;
            assert_eq!(seen.unwrap().body(), &b"d"[..], "{name}");
        }
    });
}

#[test]
fn ten_thousand_pipelined_writes_arrive_in_order() {
    const WRITES: u64 = 10_000;
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let stub = stub(&host, "sequence", "writes");
        let (call, mut got) = send_request(&stub, &request("PUT", "/", b""), true);
        let body = call.pipeline.get_request_body();
        for n in 0..WRITES {
            let mut write = body.write_request();
            write.get().set_bytes(&n.to_le_bytes());
            write.send().await.unwrap();
        }
        body.end_request().send().promise.await.unwrap();
        // A write after the end is refused, and so is a second end; the stream stays failed.
        let mut late = body.write_request();
        late.get().set_bytes(b"late");
        late.send().await.unwrap();
        let error = body
            .end_request()
            .send()
            .promise
            .await
            .map(drop)
            .unwrap_err();
        assert!(error.to_string().contains("ended already"), "{error}");
        let mut again = body.write_request();
        again.get().set_bytes(b"again");
        let error = again.send().await.unwrap_err();
        assert!(error.to_string().contains("ended already"), "{error}");
        call.promise.await.unwrap();
        let (answer, _) = ok_response(got.recv().await);
        let sum: u64 = (0..WRITES).map(|n| (n + 1) * n).sum();
        assert_eq!(
            std::str::from_utf8(&answer).unwrap(),
            format!("{WRITES} true {sum}")
        );
    });
}

/// The Rust client's stubs resolve (`wire::resolving`): a streamed call made at once on a new
/// stub sends its body while the stub resolves, and the body must still arrive in order.
#[test]
fn the_clients_body_writes_on_a_stub_resolving_meanwhile_arrive_in_order() {
    const WRITES: u64 = 5_000;
    let (server, _) = server();
    run_local(async {
        let client = Client::connect(server.addr()).await.unwrap();
        for round in 0..2 {
            let stub = client
                .namespace("sequence")
                .get_by_name(&format!("resolving-{round}"));
            let (mut sender, body) = Body::channel();
            let writer = tokio::task::spawn_local(async move {
                for n in 0..WRITES {
                    sender
                        .send(Bytes::copy_from_slice(&n.to_le_bytes()))
                        .await
                        .unwrap();
                }
                sender.finish();
            });
            let request = http::Request::builder().method("PUT").uri("/").body(body);
            let response = stub.fetch_stream(request.unwrap()).await.unwrap();
            let answer = response.into_body().bytes().await.unwrap();
            writer.await.unwrap();
            let sum: u64 = (0..WRITES).map(|n| (n + 1) * n).sum();
            assert_eq!(
                std::str::from_utf8(&answer).unwrap(),
                format!("{WRITES} true {sum}"),
                "round {round}"
            );
        }
    });
}

#[test]
fn writes_past_the_connections_bounds_are_refused_as_they_come_not_queued() {
    const FLOOD: usize = CONNECTION_CALLS_MAX + 1000;
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let stall = stub(&host, "stall", "s");
        let (call, _got) = send_request(&stall, &request("PUT", "/", b""), true);
        let body = call.pipeline.get_request_body();
        // A writer that ignores flow control: every write leaves at once, and the object
        // reads none of them.
        for _ in 0..FLOOD {
            let mut write = body.write_request();
            write.get().set_bytes(&[0; 1024]);
            drop(write.send());
        }
        // The writes past the connection's bound on calls were refused as they arrived, which
        // broke the body off: the stream fails, overloaded.
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
            .expect("the flood was taken in: no write was refused");
        assert_eq!(error.kind, capnp::ErrorKind::Overloaded, "{error}");
        // Let go: the call and the writes it admitted end, and the connection serves again.
        drop((call, body));
        let tally = stub(&host, "tally", "after");
        for attempt in 0.. {
            match duro::testing::fetch(&tally, request("GET", "/", b"")).await {
                Ok(response) => {
                    assert_eq!(Seen::parse(response.body()).bytes, 0);
                    break;
                }
                Err(Error::Overloaded(_)) if attempt < 500 => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => panic!("the connection did not recover: {error}"),
            }
        }
    });
}

#[test]
fn the_client_streams_a_request_body_while_it_reads_the_response() {
    const CHUNKS: usize = 256;
    const CHUNK_BYTES: usize = 64 << 10;
    let (server, _) = server();
    run_local(async {
        let client = Client::connect(server.addr()).await.unwrap();
        let pipe = client.namespace("pipe").get_by_name("p");
        let (mut sender, body) = Body::channel();
        let writer = tokio::task::spawn_local(async move {
            let mut sent = Seen::default();
            for k in 0..CHUNKS {
                let chunk = chunk(k, CHUNK_BYTES);
                sent.add(&chunk);
                sender.send(chunk).await.unwrap();
            }
            sender.finish();
            sent
        });
        let request = http::Request::builder().method("PUT").uri("/").body(body);
        let response = pipe.fetch_stream(request.unwrap()).await.unwrap();
        assert_eq!(response.status(), 200);
        // The object answers before it read the body: the rest of it is sent while the
        // response is read, and comes back through the response, 16 MiB in all.
        let mut body = response.into_body();
        let mut seen = Seen::default();
        while let Some(chunk) = body.chunk().await {
            seen.add(&chunk.unwrap());
        }
        let sent = writer.await.unwrap();
        assert_eq!(seen.bytes, sent.bytes);
        assert_eq!(seen.checksum, sent.checksum);
        // A whole body too large for one message is sent as a stream as well.
        let tally = client.namespace("tally").get_by_name("t");
        let whole = Bytes::from(vec![7u8; 12 << 20]);
        let request = http::Request::builder().method("PUT").uri("/");
        let response = tally
            .fetch_stream(request.body(Body::from(whole.clone())).unwrap())
            .await
            .unwrap();
        let answer = response.into_body().bytes().await.unwrap();
        let mut expected = Seen::default();
        expected.add(&whole);
        let seen = Seen::parse(&answer);
        assert_eq!(
            (seen.bytes, seen.checksum),
            (expected.bytes, expected.checksum)
        );
        assert!(seen.chunks > 1, "sent in one piece: {seen:?}");
    });
}

#[test]
fn the_client_reads_a_streamed_response_as_it_comes() {
    let (server, shared) = server();
    run_local(async {
        let client = Client::connect(server.addr()).await.unwrap();
        let ticker = client.namespace("ticker").get_by_name("t");
        let request = http::Request::builder().uri("/events").body(Body::empty());
        let response = ticker.fetch_stream(request.unwrap()).await.unwrap();
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.into_body();
        let first = body.chunk().await.unwrap().unwrap();
        assert_eq!(first, "data: 0\n\n");
        assert!(!shared.done.load(Ordering::SeqCst));
        let rest = body.bytes().await.unwrap();
        let expected: String = (1..EVENTS).map(|i| format!("data: {i}\n\n")).collect();
        assert_eq!(rest, expected.as_bytes());
    });
}

/// A WebSocket upgrade request to `/`.
fn upgrade() -> Request {
    http::Request::builder()
        .uri("/")
        .header("upgrade", "websocket")
        .body(Bytes::new())
        .unwrap()
}

fn text(text: &str) -> Option<WebSocketEvent> {
    Some(WebSocketEvent::Message(WebSocketMessage::Text(text.into())))
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
async fn web_sockets_over_capnp_carry_messages_both_ways_in_order_and_close() {
    let (server, shared) = server();
    let client = Client::connect(server.addr()).await.unwrap();
    let room = client.namespace("chat").get_by_name("lobby");
    let mut a = room.web_socket(upgrade()).await.unwrap();
    let mut b = room.web_socket(upgrade()).await.unwrap();
    for message in ["a1", "a2", "a3"] {
        a.send(message).await.unwrap();
    }
    // Every socket gets every message, in the order sent.
    for socket in [&mut a, &mut b] {
        for message in ["a1", "a2", "a3"] {
            assert_eq!(socket.recv().await, text(message));
        }
    }
    b.send(Bytes::from_static(b"\x00b1")).await.unwrap();
    for socket in [&mut a, &mut b] {
        let binary = WebSocketMessage::Binary(Bytes::from_static(b"\x00b1"));
        assert_eq!(socket.recv().await, Some(WebSocketEvent::Message(binary)));
    }
    // A close goes to the object, and the host answers it.
    a.close(1000, "bye").await.unwrap();
    assert_eq!(
        a.recv().await,
        Some(WebSocketEvent::Close(1000, "bye".into()))
    );
    assert_eq!(a.recv().await, None);
    assert!(a.send("after").await.is_err());
    wait_for(|| {
        shared
            .log
            .lock()
            .unwrap()
            .contains(&"close 1000 bye".into())
    })
    .await;
    // The room has one socket left.
    b.send("b2").await.unwrap();
    assert_eq!(b.recv().await, text("b2"));
    // Released without a close: the object hears the peer went away.
    drop(b);
    wait_for(|| {
        shared
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.starts_with("error "))
    })
    .await;
    assert_eq!(shared.log.lock().unwrap().len(), 2, "{:?}", shared.log);
}

#[test]
fn failures_reach_the_caller_with_the_types_of_fetch() {
    let (server, _) = server();
    run_local(async {
        let host = server.connect().await;
        let stub = stub(&host, "ticker", "errors");
        // The object fails before it answered: the call fails as the object's error.
        let (call, mut got) = send_request(&stub, &request("GET", "/fail", b""), false);
        match call.promise.await.map(drop).map_err(Error::from) {
            Err(Error::Remote(message)) => assert!(message.contains("before answering")),
            other => panic!("expected a remote error, got {other:?}"),
        }
        assert_eq!(got.recv().await, None, "a failed call answered");
        // The body breaks off after it began: the call fails, and the body gets no end.
        let (call, mut got) = send_request(&stub, &request("GET", "/broken", b""), false);
        match call.promise.await.map(drop).map_err(Error::from) {
            Err(Error::Remote(message)) => assert!(message.contains("broke off"), "{message}"),
            other => panic!("expected a remote error, got {other:?}"),
        }
        let (_, follows) = ok_response(got.recv().await);
        assert!(follows);
        assert_eq!(got.recv().await, Some(Got::Write(b"data: 0\n\n".to_vec())));
        assert_eq!(got.recv().await, None);
        // An upgrade to a class that does not accept it: a normal response.
        let tally = self::stub(&host, "tally", "no-socket");
        let (call, mut got) = send_request(&tally, &upgrade(), false);
        call.promise.await.unwrap();
        let (answer, _) = ok_response(got.recv().await);
        assert_eq!(Seen::parse(&answer).bytes, 0);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reports_an_upgrade_the_object_did_not_accept() {
    let (server, _) = server();
    let client = Client::connect(server.addr()).await.unwrap();
    let tally = client.namespace("tally").get_by_name("t");
    match tally.web_socket(upgrade()).await {
        Err(Error::Remote(message)) => assert!(message.contains("200"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let ticker = client.namespace("ticker").get_by_name("t");
    let request = http::Request::builder().uri("/fail").body(Body::empty());
    match ticker.fetch_stream(request.unwrap()).await {
        Err(Error::Remote(message)) => assert!(message.contains("before answering")),
        other => panic!("expected a remote error, got {:?}", other.map(|_| ())),
    }
}
