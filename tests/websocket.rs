//! WebSockets and streamed bodies through the HTTP gateway, over real connections on loopback:
//! order, flow control, hibernation, the output gate, and every way a socket ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use duro::storage::FaultyBackend;
use duro::testing::{TestServer, run_local};
use duro::{
    BoxError, Builder, DurableObject, HostLimits, Server, SocketLimits, State, StreamRequest,
    StreamResponse, WebSocket, WebSocketMessage, response,
};
use futures::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod common;

/// Longest wait for anything a test expects: a test that would hang fails instead.
const WAIT: Duration = Duration::from_secs(20);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A room: accepts sockets tagged with the `?name=` of their URL (kept as the attachment too),
/// and broadcasts each text message to every socket as `<sender's name>:<text>`. Special
/// texts: `bye` closes the sender's socket with 4000, `panic` panics (a reset), `store:X`
/// stores X before it broadcasts (the output gate applies), `others` answers the sender with
/// how many sockets the room holds.
struct Room {
    state: State,
    events: Arc<Events>,
}

/// What the test classes saw, shared with the test.
#[derive(Default)]
struct Events {
    constructed: AtomicUsize,
    closes: std::sync::Mutex<Vec<(u16, String)>>,
    errors: AtomicUsize,
}

impl DurableObject for Room {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        let name = request
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("name="))
            .unwrap_or("anonymous")
            .to_owned();
        let socket = self.state.accept_web_socket(&request, &[&name])?;
        socket.serialize_attachment(&name)?;
        self.state
            .set_web_socket_auto_response(Some(("ping", "pong")));
        Ok(response::switching_protocols())
    }

    async fn web_socket_message(
        &self,
        socket: WebSocket,
        message: WebSocketMessage,
    ) -> Result<(), BoxError> {
        let WebSocketMessage::Text(text) = message else {
            return Ok(());
        };
        let name: String = socket.deserialize_attachment()?.unwrap_or_default();
        match text.as_str() {
            "bye" => socket.close(4000, "bye to you")?,
            "badclose" => match socket.close(1005, "") {
                Err(error) => socket.send(error.to_string())?,
                Ok(()) => socket.send("closed with 1005")?,
            },
            "panic" => panic!("the room panicked on purpose"),
            "others" => socket.send(self.state.get_web_sockets(None).len().to_string())?,
            _ => {
                if let Some(value) = text.strip_prefix("store:") {
                    self.state.storage().put("last", &value).await?;
                }
                for other in self.state.get_web_sockets(None) {
                    other.send(format!("{name}:{text}"))?;
                }
            }
        }
        Ok(())
    }

    async fn web_socket_close(
        &self,
        _socket: WebSocket,
        code: u16,
        reason: String,
    ) -> Result<(), BoxError> {
        self.events.closes.lock().unwrap().push((code, reason));
        Ok(())
    }

    async fn web_socket_error(&self, _socket: WebSocket, _error: String) -> Result<(), BoxError> {
        self.events.errors.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn room_builder(events: &Arc<Events>, limits: HostLimits) -> Builder {
    let events = events.clone();
    Server::builder()
        .class("room", move |state, _env| {
            events.constructed.fetch_add(1, Ordering::SeqCst);
            Room {
                state,
                events: events.clone(),
            }
        })
        .namespace("room", "room")
        .limits(limits)
        .http("127.0.0.1:0".parse().unwrap())
}

async fn join(server: &TestServer, room: &str, name: &str) -> Client {
    let addr = server.http_addr().expect("the gateway is on");
    let url = format!("ws://{addr}/room/{room}/ws?name={name}");
    let (client, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("the handshake in time")
        .expect("the handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    client
}

/// The next text message (skipping pings and pongs), or the close frame's code as `Err`.
async fn next(client: &mut Client) -> Result<String, u16> {
    loop {
        let message = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a message in time");
        match message {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(1006),
        }
    }
}

async fn send(client: &mut Client, text: &str) {
    client.send(Message::text(text)).await.expect("sending");
}

#[test]
fn ten_thousand_messages_on_one_socket_arrive_in_order() {
    let events = Arc::new(Events::default());
    let server = TestServer::start(room_builder(&events, HostLimits::default()));
    run_local(async {
        let mut client = join(&server, "order", "a").await;
        let (mut writer, mut reader) = client.split();
        let sending = tokio::task::spawn_local(async move {
            for i in 0..10_000 {
                writer.feed(Message::text(i.to_string())).await.unwrap();
            }
            writer.flush().await.unwrap();
            writer
        });
        for i in 0..10_000 {
            let message = tokio::time::timeout(WAIT, reader.next()).await.unwrap();
            let Some(Ok(Message::Text(text))) = message else {
                panic!("message {i}: {message:?}");
            };
            assert_eq!(text.as_str(), format!("a:{i}"), "message {i} out of order");
        }
        client = sending.await.unwrap().reunite(reader).unwrap();
        client.close(None).await.unwrap();
    });
}

#[test]
fn a_slow_reader_slows_only_its_own_socket_and_is_closed_past_its_queue() {
    let events = Arc::new(Events::default());
    let limits = HostLimits {
        web_sockets: SocketLimits {
            queued_bytes_max: 256 << 10,
            ..SocketLimits::default()
        },
        ..HostLimits::default()
    };
    let server = TestServer::start(room_builder(&events, limits));
    run_local(async {
        // `slow` never reads until the end; the kernel's buffers and the queue fill up.
        let mut slow = join(&server, "slow", "slow").await;
        let mut fast = join(&server, "slow", "fast").await;
        let text = "x".repeat(16 << 10);
        // 2,000 broadcasts of 16 KiB: 32 MiB to each socket, far past the slow one's queue.
        for i in 0..2_000 {
            send(&mut fast, &format!("{i}{text}")).await;
            let echoed = next(&mut fast)
                .await
                .expect("the fast socket keeps receiving");
            assert!(echoed.starts_with(&format!("fast:{i}x")), "message {i}");
        }
        // The slow socket got what fit, then a close with 1008.
        let mut received = 0;
        let code = loop {
            match next(&mut slow).await {
                Ok(_) => received += 1,
                Err(code) => break code,
            }
        };
        assert_eq!(code, 1008, "after {received} messages");
        assert!(received < 2_000, "the slow socket was not cut off");
        // The client answers the close (tungstenite does as it reads on), and the object
        // hears why its socket went.
        let _ = tokio::time::timeout(WAIT, slow.next()).await;
        wait_until("the object heard of the cut", || {
            events.errors.load(Ordering::SeqCst) == 1
        })
        .await;
        // The room lives on: the fast socket is alone in it now.
        send(&mut fast, "others").await;
        assert_eq!(next(&mut fast).await, Ok("1".to_owned()));
    });
}

#[test]
fn sockets_outlive_the_eviction_of_their_object_and_a_message_rebuilds_it() {
    let events = Arc::new(Events::default());
    let limits = HostLimits {
        idle_evict_ms: 100,
        ..HostLimits::default()
    };
    let server = TestServer::start(room_builder(&events, limits));
    run_local(async {
        let mut clients = Vec::new();
        for i in 0..100 {
            clients.push(join(&server, "hibernate", &format!("c{i}")).await);
        }
        assert_eq!(events.constructed.load(Ordering::SeqCst), 1);
        // Idle for several eviction periods: the object goes, its 100 sockets stay.
        tokio::time::sleep(Duration::from_millis(600)).await;
        // The auto-response is the host's: it does not wake the object.
        send(&mut clients[7], "ping").await;
        assert_eq!(next(&mut clients[7]).await, Ok("pong".to_owned()));
        assert_eq!(
            events.constructed.load(Ordering::SeqCst),
            1,
            "woken by a ping"
        );
        // A message wakes it: a new instance, which finds every socket and its attachment.
        send(&mut clients[42], "hello").await;
        for (i, client) in clients.iter_mut().enumerate() {
            assert_eq!(next(client).await, Ok("c42:hello".to_owned()), "client {i}");
        }
        assert_eq!(events.constructed.load(Ordering::SeqCst), 2, "rebuilt once");
        send(&mut clients[0], "others").await;
        assert_eq!(next(&mut clients[0]).await, Ok("100".to_owned()));
    });
}

#[test]
fn every_end_of_a_socket_reaches_both_sides() {
    let events = Arc::new(Events::default());
    let server = TestServer::start(room_builder(&events, HostLimits::default()));
    run_local(async {
        // The client closes: the object hears the code and reason, and the host answers.
        let mut closing = join(&server, "ends", "closing").await;
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::from(4001),
            reason: "done".into(),
        };
        closing.close(Some(frame)).await.unwrap();
        assert_eq!(
            next(&mut closing).await,
            Err(4001),
            "the host answers the close"
        );
        wait_until("the object heard the close", || {
            !events.closes.lock().unwrap().is_empty()
        })
        .await;
        assert_eq!(events.closes.lock().unwrap()[0], (4001, "done".to_owned()));

        // The object closes: the client gets its code. A code reserved to the protocol is
        // refused, and the socket stays open.
        let mut bye = join(&server, "ends", "bye").await;
        send(&mut bye, "badclose").await;
        let refused = next(&mut bye).await.expect("still open");
        assert!(
            refused.contains("1000-1003, 1007-1014 or 3000-4999"),
            "{refused}"
        );
        send(&mut bye, "bye").await;
        assert_eq!(next(&mut bye).await, Err(4000));

        // The client vanishes without a close: the object hears of it as an error.
        let vanishing = join(&server, "ends", "vanishing").await;
        drop(vanishing);
        wait_until("the object heard of the error", || {
            events.errors.load(Ordering::SeqCst) == 1
        })
        .await;

        // A reset of the object closes its sockets with 1011; the next get builds it again.
        let mut a = join(&server, "ends", "a").await;
        let mut b = join(&server, "ends", "b").await;
        send(&mut a, "panic").await;
        assert_eq!(next(&mut a).await, Err(1011));
        assert_eq!(next(&mut b).await, Err(1011));
        let mut again = join(&server, "ends", "again").await;
        send(&mut again, "others").await;
        assert_eq!(next(&mut again).await, Ok("1".to_owned()), "a fresh room");

        // A shutdown closes every socket with 1001, also those of evicted objects.
        let mut last = join(&server, "ends2", "last").await;
        let dir = server.stop();
        assert_eq!(next(&mut last).await, Err(1001));
        assert_eq!(next(&mut again).await, Err(1001));
        drop(dir);
    });
}

#[test]
fn a_message_sent_after_a_write_leaves_once_the_write_is_durable() {
    let events = Arc::new(Events::default());
    let slot: Arc<std::sync::Mutex<Option<Arc<FaultyBackend>>>> = Arc::default();
    let wrap_slot = slot.clone();
    let builder = room_builder(&events, HostLimits::default()).wrap_backend(move |inner| {
        let faulty = FaultyBackend::new(inner);
        *wrap_slot.lock().unwrap() = Some(faulty.clone());
        faulty
    });
    let server = TestServer::start(builder);
    let backend = slot.lock().unwrap().clone().unwrap();
    run_local(async {
        let mut client = join(&server, "gate", "g").await;
        backend.hold();
        send(&mut client, "store:v").await;
        let early = tokio::time::timeout(Duration::from_millis(300), client.next()).await;
        assert!(
            early.is_err(),
            "a message left before its write was durable: {early:?}"
        );
        backend.release();
        assert_eq!(next(&mut client).await, Ok("g:store:v".to_owned()));
    });
}

#[test]
fn a_message_over_the_size_bound_closes_the_socket_with_1009() {
    let events = Arc::new(Events::default());
    let limits = HostLimits {
        web_sockets: SocketLimits {
            message_bytes_max: 1024,
            ..SocketLimits::default()
        },
        ..HostLimits::default()
    };
    let server = TestServer::start(room_builder(&events, limits));
    run_local(async {
        let mut client = join(&server, "big", "big").await;
        send(&mut client, &"y".repeat(1000)).await;
        assert!(next(&mut client).await.is_ok(), "under the bound");
        send(&mut client, &"y".repeat(2000)).await;
        assert_eq!(next(&mut client).await, Err(1009));
        wait_until("the object heard of the error", || {
            events.errors.load(Ordering::SeqCst) == 1
        })
        .await;
    });
}

/// Waits until `condition` holds, at most [`WAIT`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Answers with server-sent events: one at once, the next when the test allows it.
struct Events2 {
    allow: Arc<tokio::sync::Semaphore>,
    seen: Arc<Seen>,
}

/// What the stream classes saw of their bodies' ends.
#[derive(Default)]
struct Seen {
    /// Set when a response body's writer found its reader gone.
    reader_gone: std::sync::atomic::AtomicBool,
    /// The outcome of the last request body read: its bytes, or its error.
    upload: std::sync::Mutex<Option<Result<u64, String>>>,
}

impl DurableObject for Events2 {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        // `?n=N` events (3 by default), each after the first waiting for a permit.
        let count: u32 = match request.uri().query().and_then(|q| q.strip_prefix("n=")) {
            Some(n) => n.parse()?,
            None => 3,
        };
        let (mut sender, response) = response::stream(StatusCode::OK, "text/event-stream");
        let (allow, seen) = (self.allow.clone(), self.seen.clone());
        tokio::task::spawn_local(async move {
            for i in 0..count {
                if i > 0 {
                    allow.acquire().await.unwrap().forget();
                }
                let event = Bytes::from(format!("data: event {i}\n\n"));
                if sender.send(event).await.is_err() {
                    seen.reader_gone.store(true, Ordering::SeqCst);
                    return;
                }
            }
            sender.finish();
        });
        Ok(response)
    }
}

/// Reads a request body to its end, and notes how it ended.
struct Upload {
    seen: Arc<Seen>,
}

impl DurableObject for Upload {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        let mut body = request.into_body();
        let mut bytes = 0u64;
        let outcome = loop {
            match body.chunk().await {
                Some(Ok(chunk)) => bytes += chunk.len() as u64,
                Some(Err(error)) => break Err(error.to_string()),
                None => break Ok(bytes),
            }
        };
        *self.seen.upload.lock().unwrap() = Some(outcome);
        Ok(http::Response::new(bytes.to_string().into()))
    }
}

fn stream_builder(allow: &Arc<tokio::sync::Semaphore>, seen: &Arc<Seen>) -> Builder {
    let (allow, seen, seen2) = (allow.clone(), seen.clone(), seen.clone());
    Server::builder()
        .class("events", move |_state, _env| Events2 {
            allow: allow.clone(),
            seen: seen.clone(),
        })
        .namespace("events", "events")
        .class("upload", move |_state, _env| Upload {
            seen: seen2.clone(),
        })
        .namespace("upload", "upload")
        .http("127.0.0.1:0".parse().unwrap())
}

#[test]
fn a_client_vanishing_mid_stream_ends_the_stream_for_the_object() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let allow = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Arc::new(Seen::default());
    let server = TestServer::start(stream_builder(&allow, &seen));
    let addr = server.http_addr().unwrap();
    run_local(async move {
        // A download: the client reads the first event and goes.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /events/gone/?n=100000 HTTP/1.1\r\nhost: duro\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 512];
        let read = tokio::time::timeout(WAIT, stream.read(&mut head))
            .await
            .unwrap();
        assert!(read.unwrap() > 0);
        drop(stream);
        // Writes fail once the connection's end is known; the writer never gets to the end.
        allow.add_permits(100_000);
        wait_until("the writer saw its reader go", || {
            seen.reader_gone.load(Ordering::SeqCst)
        })
        .await;

        // An upload: half a chunked body, then the client goes.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head =
            b"POST /upload/gone/ HTTP/1.1\r\nhost: duro\r\ntransfer-encoding: chunked\r\n\r\n";
        stream.write_all(head).await.unwrap();
        stream.write_all(b"5\r\nhello\r\n").await.unwrap();
        // The object reads what came, then waits for more.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            seen.upload.lock().unwrap().is_none(),
            "the read ended early"
        );
        drop(stream);
        wait_until("the upload read ended", || {
            seen.upload.lock().unwrap().is_some()
        })
        .await;
        let outcome = seen.upload.lock().unwrap().clone().unwrap();
        assert!(
            outcome.is_err(),
            "a broken upload read as whole: {outcome:?}"
        );
    });
}

/// An HTTP/1.1 client connection to `addr`, driven by a local task.
async fn http_sender<B>(addr: std::net::SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::task::spawn_local(connection);
    sender
}

/// The resident memory of the process `pid`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// A checksum that depends on the order of the bytes.
fn checksum(sum: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(sum, |sum, &b| sum.wrapping_mul(31).wrapping_add(b as u64))
}

#[test]
fn a_gibibyte_streams_through_the_gateway_both_ways_in_bounded_memory() {
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    // `duro serve` in a process of its own, so that its memory is measured alone.
    let served = common::serve(dir.path());
    let (pid, addr) = (served.child.id(), served.http.unwrap());
    run_local(async move {
        let before = rss_bytes(pid);
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
        let chunk = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let chunks = TOTAL / CHUNK as u64;
        let expected = (0..chunks).fold(0, |sum, _| checksum(sum, &chunk));
        let body = {
            let (chunk, peak) = (chunk.clone(), peak.clone());
            futures::stream::iter(0..chunks).map(move |i| {
                if i % 64 == 0 {
                    peak.fetch_max(rss_bytes(pid), Ordering::SeqCst);
                }
                Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))
            })
        };
        let mut sender = http_sender(addr).await;
        let request = http::Request::post("/echo/big/stream")
            .body(http_body_util::StreamBody::new(body))
            .unwrap();
        // The echo answers as the body arrives: the response starts before the upload ends.
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("the response head in time")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let (mut received, mut sum) = (0u64, 0u64);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        use http_body_util::BodyExt;
        while let Some(frame) = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("the echo in time")
        {
            let data = frame.unwrap().into_data().unwrap();
            received += data.len() as u64;
            sum = checksum(sum, &data);
        }
        assert_eq!((received, sum), (TOTAL, expected), "every byte, in order");
        let grown = peak.load(Ordering::SeqCst).saturating_sub(before);
        assert!(
            grown < 64 << 20,
            "the server's RSS grew by {} MiB",
            grown >> 20
        );
    });
    drop(served);
}

#[test]
fn server_sent_events_pass_as_they_are_written() {
    let allow = Arc::new(tokio::sync::Semaphore::new(0));
    let server = TestServer::start(stream_builder(&allow, &Arc::default()));
    let addr = server.http_addr().unwrap();
    run_local(async move {
        let mut sender = http_sender(addr).await;
        let request = http::Request::get("/events/feed/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.into_body();
        use http_body_util::BodyExt;
        for i in 0..3 {
            // Each event arrives before the object may write the next one.
            let frame = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
            let data = frame.unwrap().unwrap().into_data().unwrap();
            assert_eq!(data, format!("data: event {i}\n\n").as_bytes());
            allow.add_permits(1);
        }
        let end = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
        assert!(end.is_none(), "the stream ends after the last event");
    });
}
