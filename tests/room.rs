//! The `room` built-in through `duro serve`'s gateway, with real WebSocket clients: one order
//! for every client, the history a joiner gets first, the keep-alive the host answers, the
//! refusals, a restart on the same data, and (in process, where eviction can be made quick) a
//! room evicted while its sockets stay open.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use duro::builtin::room::{HISTORY_MAX, Room, TEXT_BYTES_MAX};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a client waits for one message: generous, as the machine may be busy.
const WAIT: Duration = Duration::from_secs(10);

/// A socket joined to the room `room` of the gateway at `http`; joined once this returns.
async fn join(http: SocketAddr, room: &str) -> Client {
    let url = format!("ws://{http}/room/{room}/ws");
    let (client, response) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("joining {room}: {e}"));
    assert_eq!(response.status(), 101);
    client
}

/// The next frame the client gets, within [`WAIT`].
async fn next_frame(client: &mut Client) -> Message {
    match tokio::time::timeout(WAIT, client.next()).await {
        Ok(Some(Ok(frame))) => frame,
        Ok(other) => panic!("the socket ended: {other:?}"),
        Err(_) => panic!("no message in {WAIT:?}"),
    }
}

/// The next text message.
async fn next_text(client: &mut Client) -> String {
    match next_frame(client).await {
        Message::Text(text) => text.as_str().to_owned(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// The next `count` posted messages, as (seq, text), checking each has its `at`.
async fn next_posts(client: &mut Client, count: usize) -> Vec<(u64, String)> {
    let mut posts = Vec::with_capacity(count);
    for _ in 0..count {
        let message: Value = serde_json::from_str(&next_text(client).await).unwrap();
        assert!(message["at"].as_u64().is_some_and(|at| at > 0), "{message}");
        let seq = message["seq"].as_u64().expect("a seq");
        posts.push((seq, message["text"].as_str().expect("a text").to_owned()));
    }
    posts
}

async fn send(client: &mut Client, text: &str) {
    client.send(Message::text(text)).await.expect("sending");
}

/// `{prefix} {n}` for each `n` in `range`.
fn texts(prefix: &str, range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|n| format!("{prefix} {n}")).collect()
}

/// Status, content type and body of `GET path` from the gateway at `http`.
async fn get(http: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(http).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: duro\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let read = stream.read_to_string(&mut answer);
    tokio::time::timeout(WAIT, read).await.unwrap().unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// `GET /messages` of `room`, as (seq, text).
async fn kept(http: SocketAddr, room: &str) -> Vec<(u64, String)> {
    let (status, content_type, body) = get(http, &format!("/room/{room}/messages")).await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let messages: Vec<Value> = serde_json::from_str(&body).unwrap();
    let post = |m: &Value| {
        (
            m["seq"].as_u64().unwrap(),
            m["text"].as_str().unwrap().into(),
        )
    };
    messages.iter().map(post).collect()
}

/// `duro serve` on a fresh data dir, with its gateway.
fn serve() -> (tempfile::TempDir, common::Served, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let served = common::serve_with(dir.path(), &[]);
    let http = served.http.expect("the gateway");
    (dir, served, http)
}

#[tokio::test]
async fn two_clients_see_the_same_messages_in_the_same_order() {
    let (_dir, _served, http) = serve();
    let mut a = join(http, "order").await;
    let mut b = join(http, "order").await;
    // Both send at once, without waiting for the room: their posts interleave there.
    let (sent_a, sent_b) = (texts("a", 1..=30), texts("b", 1..=30));
    tokio::join!(
        async {
            for text in &sent_a {
                send(&mut a, text).await;
            }
        },
        async {
            for text in &sent_b {
                send(&mut b, text).await;
            }
        }
    );
    let seen_a = next_posts(&mut a, 60).await;
    let seen_b = next_posts(&mut b, 60).await;
    assert_eq!(seen_a, seen_b, "both see one order");
    let seqs: Vec<u64> = seen_a.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=60).collect::<Vec<_>>(),
        "numbered in the order seen"
    );
    for (prefix, sent) in [("a", &sent_a), ("b", &sent_b)] {
        let own: Vec<&String> = seen_a
            .iter()
            .map(|(_, text)| text)
            .filter(|text| text.starts_with(prefix))
            .collect();
        assert_eq!(
            own,
            sent.iter().collect::<Vec<_>>(),
            "{prefix}'s posts in its order"
        );
    }
    assert_eq!(kept(http, "order").await, seen_a, "kept as broadcast");
}

#[tokio::test]
async fn a_late_joiner_gets_the_last_hundred_in_order_first() {
    let (_dir, _served, http) = serve();
    let mut a = join(http, "late").await;
    for text in texts("message", 1..=105) {
        send(&mut a, &text).await;
    }
    let posted = next_posts(&mut a, 105).await;
    assert_eq!(posted.last(), Some(&(105, "message 105".into())));

    let mut c = join(http, "late").await;
    let history = next_posts(&mut c, HISTORY_MAX as usize).await;
    let expected: Vec<(u64, String)> = (6..=105).zip(texts("message", 6..=105)).collect();
    assert_eq!(history, expected, "the last hundred, oldest first");
    send(&mut c, "hello").await;
    assert_eq!(next_posts(&mut c, 1).await, [(106, "hello".into())]);
    assert_eq!(next_posts(&mut a, 1).await, [(106, "hello".into())]);
    let mut expected = expected[1..].to_vec();
    expected.push((106, "hello".into()));
    assert_eq!(kept(http, "late").await, expected, "the oldest fell out");
}

#[tokio::test]
async fn a_joiner_misses_nothing_and_gets_nothing_twice_while_others_post() {
    let (_dir, _served, http) = serve();
    let mut a = join(http, "busy").await;
    for text in texts("m", 1..=120) {
        send(&mut a, &text).await;
    }
    // The join lands somewhere among these 120 posts: what it gets as history and what it
    // gets as broadcasts must meet without a gap or an overlap.
    let (mut c, ()) = tokio::join!(join(http, "busy"), async {
        next_posts(&mut a, 120).await;
    });
    let mut seen = Vec::new();
    while seen.last().is_none_or(|(seq, _)| *seq < 120) {
        seen.extend(next_posts(&mut c, 1).await);
    }
    let seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
    let first = seqs[0];
    assert!(seqs.len() >= HISTORY_MAX as usize, "{seqs:?}");
    assert_eq!(seqs, (first..=120).collect::<Vec<_>>(), "no gap, no repeat");
}

#[tokio::test]
async fn ping_gets_pong_from_the_host_and_is_never_posted() {
    let (_dir, _served, http) = serve();
    let mut a = join(http, "alive").await;
    send(&mut a, "ping").await;
    assert_eq!(next_text(&mut a).await, "pong");
    send(&mut a, "hi").await;
    assert_eq!(
        next_posts(&mut a, 1).await,
        [(1, "hi".into())],
        "ping took no seq"
    );
    assert_eq!(kept(http, "alive").await, [(1, "hi".into())]);
}

#[tokio::test]
async fn refusals_go_to_the_sender_alone_and_binary_closes_with_1003() {
    let (_dir, _served, http) = serve();
    let mut a = join(http, "strict").await;
    let mut b = join(http, "strict").await;
    send(&mut a, "").await;
    let empty: Value = serde_json::from_str(&next_text(&mut a).await).unwrap();
    assert!(
        empty["error"].as_str().is_some_and(|e| e.contains("empty")),
        "{empty}"
    );
    send(&mut a, &"x".repeat(TEXT_BYTES_MAX + 1)).await;
    let long: Value = serde_json::from_str(&next_text(&mut a).await).unwrap();
    let limit = TEXT_BYTES_MAX.to_string();
    assert!(
        long["error"].as_str().is_some_and(|e| e.contains(&limit)),
        "{long}"
    );
    let longest = "y".repeat(TEXT_BYTES_MAX);
    send(&mut a, &longest).await;
    // b got neither refusal: its first message is the post.
    assert_eq!(next_posts(&mut b, 1).await, [(1, longest.clone())]);
    assert_eq!(next_posts(&mut a, 1).await, [(1, longest.clone())]);

    a.send(Message::Binary(Bytes::from_static(b"\x00\x01")))
        .await
        .unwrap();
    match next_frame(&mut a).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Unsupported),
        other => panic!("expected a close with 1003, got {other:?}"),
    }
    send(&mut b, "still here").await;
    assert_eq!(next_posts(&mut b, 1).await, [(2, "still here".into())]);
    assert_eq!(
        kept(http, "strict").await,
        [(1, longest), (2, "still here".into())]
    );
}

#[tokio::test]
async fn the_page_and_the_routes() {
    let (_dir, _served, http) = serve();
    for path in ["/room/lobby/", "/room/lobby"] {
        let (status, content_type, page) = get(http, path).await;
        assert_eq!(
            (status, content_type.as_str()),
            (200, "text/html; charset=utf-8")
        );
        assert!(
            page.contains("<script>") && page.contains("\"/ws\""),
            "{path}"
        );
    }
    assert_eq!(
        get(http, "/room/lobby/ws").await.0,
        426,
        "a plain GET of the socket"
    );
    assert_eq!(get(http, "/room/lobby/nope").await.0, 404);
    assert_eq!(kept(http, "lobby").await, [], "an empty room");
}

#[tokio::test]
async fn history_survives_a_restart_on_the_same_data_dir() {
    let (dir, served, http) = serve();
    let mut a = join(http, "durable").await;
    for text in ["one", "two", "three"] {
        send(&mut a, text).await;
    }
    // Each broadcast leaves once its write is durable: seen means kept.
    next_posts(&mut a, 3).await;
    drop(served); // SIGKILL
    drop(a);

    let served = common::serve_with(dir.path(), &[]);
    let http = served.http.unwrap();
    let mut c = join(http, "durable").await;
    let history = next_posts(&mut c, 3).await;
    let expected: Vec<(u64, String)> =
        vec![(1, "one".into()), (2, "two".into()), (3, "three".into())];
    assert_eq!(history, expected);
    send(&mut c, "four").await;
    assert_eq!(
        next_posts(&mut c, 1).await,
        [(4, "four".into())],
        "seq from storage"
    );
}

/// A server in this process hosting `room` with a quick idle eviction, and the count of rooms
/// it built.
fn quickly_evicting_server() -> (duro::testing::TestServer, Arc<AtomicUsize>) {
    let built = Arc::new(AtomicUsize::new(0));
    let counted = built.clone();
    let limits = duro::HostLimits {
        idle_evict_ms: 50,
        ..duro::HostLimits::default()
    };
    let builder = duro::Server::builder()
        .class("room", move |state, _env| {
            counted.fetch_add(1, Ordering::SeqCst);
            Room::new(state)
        })
        .namespace("room", "room")
        .http(SocketAddr::from(([127, 0, 0, 1], 0)))
        .limits(limits);
    (duro::testing::TestServer::start(builder), built)
}

#[tokio::test]
async fn an_evicted_room_wakes_for_the_next_message_and_reaches_every_socket() {
    let (server, built) = quickly_evicting_server();
    let http = server.http_addr().unwrap();
    let mut a = join(http, "sleepy").await;
    let mut b = join(http, "sleepy").await;
    send(&mut a, "before").await;
    assert_eq!(next_posts(&mut b, 1).await, [(1, "before".into())]);
    next_posts(&mut a, 1).await;
    assert_eq!(built.load(Ordering::SeqCst), 1);

    // Past the idle time the room is evicted, its sockets held by the host. A keep-alive is
    // answered without building it; the next message builds it, from storage.
    let mut seq = 1;
    let mut rebuilt = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = built.load(Ordering::SeqCst);
        send(&mut b, "ping").await;
        assert_eq!(next_text(&mut b).await, "pong");
        assert_eq!(
            built.load(Ordering::SeqCst),
            before,
            "a keep-alive woke the room"
        );
        seq += 1;
        let text = format!("after {seq}");
        send(&mut b, &text).await;
        assert_eq!(next_posts(&mut a, 1).await, [(seq, text.clone())]);
        assert_eq!(next_posts(&mut b, 1).await, [(seq, text)]);
        if built.load(Ordering::SeqCst) > before {
            rebuilt = true;
            break;
        }
    }
    assert!(rebuilt, "the room was never evicted");
    let mut c = join(http, "sleepy").await;
    let history: Vec<u64> = next_posts(&mut c, seq as usize)
        .await
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(history, (1..=seq).collect::<Vec<_>>());
}
