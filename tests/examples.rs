//! The example programs' classes, hosted as their `main` hosts them, over real Cap'n Proto
//! connections on loopback (and, for the chat room, WebSockets through the HTTP gateway).

#[path = "../examples/chat_room.rs"]
mod chat_room;
#[path = "../examples/counter.rs"]
mod counter;
#[path = "../examples/rate_limiter.rs"]
mod rate_limiter;
#[path = "../examples/router.rs"]
mod router;
#[path = "../examples/typed_counter.rs"]
mod typed_counter;
// The generated code of the typed counter's schema names its types from the crate's root.
use typed_counter::typed_counter_capnp;

use duro::duro_capnp::{durable_object, host};
use duro::testing::{TestServer, fetch, fetch_by_name, fetch_call, request, run_local};
use duro::{Response, Server};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// `namespace/name`'s answer to one request: the response, or a panic naming the call.
async fn call(
    host: &host::Client,
    object: (&str, &str),
    method: &str,
    path: &str,
    body: &[u8],
) -> Response {
    let (namespace, name) = object;
    fetch_by_name(host, namespace, name, method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} /{namespace}/{name}{path}: {e}"))
}

fn status_and_text(response: &Response) -> (u16, String) {
    let text = String::from_utf8_lossy(response.body()).into_owned();
    (response.status().as_u16(), text)
}

#[test]
fn counter_counts_durably() {
    let builder = || counter::register(Server::builder());
    let server = TestServer::start(builder());
    let visits = ("counter", "visits");
    run_local(async {
        let host = server.connect().await;
        for expected in ["1\n", "2\n"] {
            let response = call(&host, visits, "POST", "/", b"").await;
            assert_eq!(status_and_text(&response), (200, expected.to_owned()));
        }
    });
    let server = TestServer::start_in(builder(), server.stop());
    run_local(async {
        let host = server.connect().await;
        let response = call(&host, visits, "GET", "/", b"").await;
        assert_eq!(status_and_text(&response), (200, "2\n".to_owned()));
        let response = call(&host, visits, "DELETE", "/", b"").await;
        assert_eq!(status_and_text(&response), (200, "0\n".to_owned()));
        let response = call(&host, visits, "PUT", "/", b"").await;
        assert_eq!(response.status(), 405);
    });
}

/// The stub of `namespace/name`, pipelined: calls on it arrive in the order sent.
fn stub(host: &host::Client, object: (&str, &str)) -> durable_object::Client {
    let (namespace, name) = object;
    let mut get = host.namespace_request();
    get.get().set_name(namespace);
    let namespace = get.send().pipeline.get_namespace();
    let mut get = namespace.get_by_name_request();
    get.get().set_name(name);
    get.send().pipeline.get_stub()
}

/// The texts of `GET /messages` of the room `lobby`, checking their numbers run on.
async fn chat_history(host: &host::Client) -> Vec<String> {
    let response = call(host, ("chat", "lobby"), "GET", "/messages", b"").await;
    assert_eq!(response.status(), 200);
    let messages: Value = serde_json::from_slice(response.body()).expect("a JSON body");
    let messages = messages.as_array().expect("an array");
    let seqs: Vec<u64> = messages
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    let first = seqs.first().copied().unwrap_or(1);
    assert!(
        seqs.iter().copied().eq(first..first + seqs.len() as u64),
        "{seqs:?}"
    );
    let texts = messages
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned());
    texts.collect()
}

/// `message {n}` for each `n` in `range`.
fn messages(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|n| format!("message {n}")).collect()
}

/// A WebSocket joined to the chat room `lobby` through the gateway at `http`.
type ChatSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn join_lobby(http: std::net::SocketAddr) -> ChatSocket {
    let url = format!("ws://{http}/chat/lobby/ws");
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("joining");
    socket
}

async fn say(socket: &mut ChatSocket, text: &str) {
    use futures::SinkExt;
    socket.send(WsMessage::text(text)).await.expect("sending");
}

/// The next frame `socket` gets, within 10 s.
async fn heard(socket: &mut ChatSocket) -> WsMessage {
    use futures::StreamExt;
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next());
    match next.await {
        Ok(Some(Ok(frame))) => frame,
        other => panic!("no message: {other:?}"),
    }
}

/// The next message `socket` gets, as JSON.
async fn heard_json(socket: &mut ChatSocket) -> Value {
    match heard(socket).await {
        WsMessage::Text(text) => serde_json::from_str(&text).expect("JSON"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// `{"seq": seq, "text": "message {seq}"}`, as the room sends message `seq` of these tests.
fn posted(seq: u64) -> Value {
    serde_json::json!({ "seq": seq, "text": format!("message {seq}") })
}

#[test]
fn chat_room_broadcasts_in_one_order_and_keeps_the_last_hundred() {
    let builder = || {
        chat_room::register(Server::builder()).http(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
    };
    let server = TestServer::start(builder());
    run_local(async {
        let http = server.http_addr().expect("the gateway");
        let host = server.connect().await;
        let mut alice = join_lobby(http).await;
        let mut bob = join_lobby(http).await;
        for text in messages(1..=105) {
            say(&mut alice, &text).await;
        }
        for seq in 1..=105 {
            assert_eq!(
                heard_json(&mut alice).await,
                posted(seq),
                "the sender hears it too"
            );
            assert_eq!(heard_json(&mut bob).await, posted(seq));
        }
        assert_eq!(chat_history(&host).await, messages(6..=105));

        // A late joiner hears the last hundred first, oldest first.
        let mut carol = join_lobby(http).await;
        for seq in 6..=105 {
            assert_eq!(heard_json(&mut carol).await, posted(seq));
        }
        say(&mut carol, "ping").await;
        assert_eq!(
            heard(&mut carol).await,
            WsMessage::text("pong"),
            "the keep-alive"
        );
        say(&mut carol, &"x".repeat(chat_room::MESSAGE_BYTES_MAX + 1)).await;
        let refused = heard_json(&mut carol).await;
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.contains("4096")),
            "{refused}"
        );
        say(&mut carol, "message 106").await;
        for socket in [&mut alice, &mut bob, &mut carol] {
            // Neither the keep-alive nor the refusal reached the others, or took a number.
            assert_eq!(heard_json(socket).await, posted(106));
        }
        futures::SinkExt::send(&mut carol, WsMessage::binary(vec![1u8]))
            .await
            .unwrap();
        match heard(&mut carol).await {
            WsMessage::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1003),
            other => panic!("expected a close, got {other:?}"),
        }
        assert_eq!(chat_history(&host).await, messages(7..=106));
        let other = call(&host, ("chat", "elsewhere"), "GET", "/messages", b"").await;
        assert_eq!(
            other.body().as_ref(),
            b"[]",
            "each room is an object of its own"
        );
    });
    let server = TestServer::start_in(builder(), server.stop());
    run_local(async {
        let http = server.http_addr().expect("the gateway");
        let host = server.connect().await;
        let mut dave = join_lobby(http).await;
        for seq in 7..=106 {
            assert_eq!(
                heard_json(&mut dave).await,
                posted(seq),
                "kept across a restart"
            );
        }
        say(&mut dave, "message 107").await;
        assert_eq!(heard_json(&mut dave).await, posted(107));
        assert_eq!(chat_history(&host).await, messages(8..=107));
        let plain = call(&host, ("chat", "lobby"), "GET", "/ws", b"").await;
        assert_eq!(plain.status(), 426, "a socket only over a WebSocket");
    });
}

#[test]
fn rate_limiter_allows_a_burst_of_capacity_then_refuses() {
    let server = TestServer::start(rate_limiter::register(Server::builder()));
    run_local(async {
        let host = server.connect().await;
        let alice = ("limiter", "alice");
        // A token comes every six seconds: far longer than this burst takes.
        for remaining in (0..rate_limiter::CAPACITY).rev() {
            let response = call(&host, alice, "POST", "/take", b"").await;
            assert_eq!(status_and_text(&response), (200, format!("{remaining}\n")));
        }
        let response = call(&host, alice, "POST", "/take", b"").await;
        assert_eq!(response.status(), 429);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=6).contains(&retry_after), "{retry_after}");
        let bob = call(&host, ("limiter", "bob"), "POST", "/take", b"").await;
        assert_eq!(
            status_and_text(&bob),
            (200, "9\n".to_owned()),
            "a bucket per key"
        );
    });
}

#[test]
fn token_buckets_refill_one_token_per_interval() {
    use rate_limiter::{CAPACITY, Outcome, REFILL_INTERVAL_MS as INTERVAL, take};
    let start = 1_000_000;
    let mut bucket = None;
    for _ in 0..CAPACITY {
        let (next, outcome) = take(bucket, start);
        assert!(matches!(outcome, Outcome::Taken { .. }));
        bucket = Some(next);
    }
    let (_, outcome) = take(bucket, start + INTERVAL - 1);
    assert_eq!(outcome, Outcome::Empty { retry_after_ms: 1 });
    // Half an interval later than the token: the half counts towards the next one.
    let (next, outcome) = take(bucket, start + INTERVAL + INTERVAL / 2);
    assert_eq!(outcome, Outcome::Taken { remaining: 0 });
    let (_, outcome) = take(Some(next), start + 2 * INTERVAL);
    assert_eq!(outcome, Outcome::Taken { remaining: 0 });
    // A long wait fills the bucket, but never past its capacity.
    let (_, outcome) = take(bucket, start + 1000 * INTERVAL);
    let remaining = CAPACITY - 1;
    assert_eq!(outcome, Outcome::Taken { remaining });
    // A clock that went back earns nothing.
    let (_, outcome) = take(bucket, start - INTERVAL);
    assert!(matches!(outcome, Outcome::Empty { .. }), "{outcome:?}");
}

/// `POST /items` with `body`, of the type `content_type`.
fn post_items(content_type: &'static str, body: &str) -> duro::Request {
    let mut post = request("POST", "/items", body.as_bytes());
    let content_type = http::HeaderValue::from_static(content_type);
    post.headers_mut()
        .insert(http::header::CONTENT_TYPE, content_type);
    post
}

/// `list`'s answer to `POST /items` with `body`, of the type `content_type`.
async fn post_item(
    list: &durable_object::Client,
    content_type: &'static str,
    body: &str,
) -> Response {
    fetch(list, post_items(content_type, body))
        .await
        .expect("POST /items")
}

/// `POST /items` of `list` with a JSON item titled `title`.
async fn create_item(list: &durable_object::Client, title: &str) -> (u16, Value) {
    let body = serde_json::json!({ "title": title }).to_string();
    let response = post_item(list, "application/json", &body).await;
    let item = serde_json::from_slice(response.body()).unwrap_or(Value::Null);
    (response.status().as_u16(), item)
}

/// The status and JSON body of `GET /items` on the list `home`.
async fn todo_items(host: &host::Client) -> (u16, Value) {
    let response = call(host, ("todo", "home"), "GET", "/items", b"").await;
    let items = serde_json::from_slice(response.body()).expect("a JSON body");
    (response.status().as_u16(), items)
}

#[test]
fn router_serves_a_todo_list_through_axum() {
    use serde_json::json;
    let builder = || router::register(Server::builder());
    let server = TestServer::start(builder());
    let home = ("todo", "home");
    run_local(async {
        let host = server.connect().await;
        let list = stub(&host, home);
        let milk = json!({ "id": 1, "title": "milk" });
        assert_eq!(create_item(&list, "milk").await, (201, milk.clone()));
        let eggs = json!({ "id": 2, "title": "eggs" });
        assert_eq!(create_item(&list, "eggs").await, (201, eggs.clone()));
        assert_eq!(todo_items(&host).await, (200, json!([milk, eggs])));
        let response = call(&host, home, "GET", "/items/2", b"").await;
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(
            serde_json::from_slice::<Value>(response.body()).unwrap(),
            eggs
        );
        let response = call(&host, home, "DELETE", "/items/1", b"").await;
        assert_eq!(status_and_text(&response), (200, milk.to_string()));
        for (method, path) in [("DELETE", "/items/1"), ("GET", "/items/1")] {
            let response = call(&host, home, method, path, b"").await;
            assert_eq!(status_and_text(&response), (404, "Not Found\n".to_owned()));
        }
        let other = call(&host, ("todo", "work"), "GET", "/items", b"").await;
        assert_eq!(other.body().as_ref(), b"[]", "a list per object");
    });
    let server = TestServer::start_in(builder(), server.stop());
    run_local(async {
        let host = server.connect().await;
        let eggs = json!({ "id": 2, "title": "eggs" });
        assert_eq!(todo_items(&host).await, (200, json!([eggs])));
        let list = stub(&host, home);
        let bread = json!({ "id": 3, "title": "bread" });
        assert_eq!(
            create_item(&list, "bread").await,
            (201, bread),
            "ids are never reused, across restarts too"
        );
    });
}

#[test]
fn router_answers_what_axum_refuses_as_axum_does() {
    let server = TestServer::start(router::register(Server::builder()));
    let home = ("todo", "home");
    run_local(async {
        let host = server.connect().await;
        let list = stub(&host, home);
        let response = call(&host, home, "GET", "/nowhere", b"").await;
        assert_eq!(response.status(), 404, "no such route");
        let response = call(&host, home, "PUT", "/items", b"").await;
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()["allow"], "GET,HEAD,POST");
        let response = call(&host, home, "GET", "/items/first", b"").await;
        assert_eq!(response.status(), 400, "an id is a number");
        let refused = [
            ("text/plain", r#"{"title": "milk"}"#, 415),
            ("application/json", r#"{"title": "#, 400),
            ("application/json", r#"{"name": "milk"}"#, 422),
        ];
        for (content_type, body, status) in refused {
            let response = post_item(&list, content_type, body).await;
            assert_eq!(response.status(), status, "{content_type} {body}");
        }
        let long = "x".repeat(router::TITLE_BYTES_MAX + 1);
        assert_eq!(create_item(&list, &long).await.0, 422);
        assert_eq!(todo_items(&host).await, (200, Value::Array(vec![])));
    });
}

#[test]
fn router_list_holds_at_most_items_max() {
    let server = TestServer::start(router::register(Server::builder()));
    run_local(async {
        let host = server.connect().await;
        let list = stub(&host, ("todo", "home"));
        // All pipelined on one stub: they arrive in order, and the last one finds the list full.
        let posts = (1..=router::ITEMS_MAX + 1).map(|n| {
            let body = format!(r#"{{"title": "{n}"}}"#);
            fetch_call(&list, &post_items("application/json", &body))
        });
        let posts: Vec<_> = posts.collect();
        for (post, n) in posts.into_iter().zip(1..) {
            let reply = post.promise.await.expect("a post");
            let status = reply.get().unwrap().get_response().unwrap().get_status();
            let expected = if n <= router::ITEMS_MAX { 201 } else { 409 };
            assert_eq!(status, expected, "post {n}");
        }
        let response = call(&host, ("todo", "home"), "DELETE", "/items/1", b"").await;
        assert_eq!(response.status(), 200);
        // Room for one more, with the next id: the refused post took none.
        let (status, item) = create_item(&list, "one more").await;
        assert_eq!(
            (status, &item["id"]),
            (201, &Value::from(router::ITEMS_MAX + 1))
        );
        let (_, items) = todo_items(&host).await;
        assert_eq!(
            items.as_array().map(Vec::len),
            Some(router::ITEMS_MAX as usize)
        );
    });
}

#[test]
fn typed_counter_counts_through_its_interface_and_fetch_in_one_order() {
    use duro::client::Client;
    use typed_counter_capnp::counter;

    let builder = || typed_counter::register(Server::builder());
    let server = TestServer::start(builder());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(server.addr()).await.unwrap();
        let increment = typed_counter::increment;
        assert_eq!(increment(&client, "typed", 5).await.unwrap(), 5);
        assert_eq!(increment(&client, "typed", -2).await.unwrap(), 3);
        // `fetch` and typed calls on one stub, all sent before any answer: one order.
        let stub = client.namespace("counter").get_by_name("typed");
        let posted = stub.call("POST", "/", "");
        let read = stub.with_capability(|counter: counter::Client| {
            let answer = counter.get_request().send().promise;
            async move { Ok(answer.await?.get()?.get_value()) }
        });
        let posted_again = stub.call("POST", "/", "");
        assert_eq!(posted.await.unwrap().body().as_ref(), b"4\n");
        assert_eq!(read.await.unwrap(), 4);
        assert_eq!(posted_again.await.unwrap().body().as_ref(), b"5\n");
        // The object's error is the caller's `Remote`, and changes nothing.
        let overflow = increment(&client, "typed", i64::MAX).await;
        assert!(
            matches!(overflow, Err(duro::Error::Remote(_))),
            "{overflow:?}"
        );
    });
    let server = TestServer::start_in(builder(), server.stop());
    runtime.block_on(async {
        let client = Client::connect(server.addr()).await.unwrap();
        assert_eq!(
            typed_counter::increment(&client, "typed", 0).await.unwrap(),
            5
        );
    });
}
