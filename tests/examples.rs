//! The example programs' classes, hosted as their `main` hosts them, over real Cap'n Proto
//! connections on loopback.

#[path = "../examples/chat_room.rs"]
mod chat_room;
#[path = "../examples/counter.rs"]
mod counter;
#[path = "../examples/rate_limiter.rs"]
mod rate_limiter;

use duro::duro_capnp::host;
use duro::testing::{TestServer, fetch_by_name, fetch_call, request, run_local};
use duro::{Response, Server};
use serde_json::Value;

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

#[test]
fn chat_room_keeps_the_last_hundred_messages() {
    let builder = || chat_room::register(Server::builder());
    let server = TestServer::start(builder());
    run_local(async {
        let host = server.connect().await;
        // All on one stub, so they arrive in the order sent.
        let mut get = host.namespace_request();
        get.get().set_name("chat");
        let namespace = get.send().pipeline.get_namespace();
        let mut get = namespace.get_by_name_request();
        get.get().set_name("lobby");
        let room = get.send().pipeline.get_stub();
        let posts: Vec<_> = messages(1..=105)
            .iter()
            .map(|text| fetch_call(&room, &request("POST", "/messages", text.as_bytes())))
            .collect();
        for (post, seq) in posts.into_iter().zip(1..) {
            let reply = post.promise.await.expect("a post");
            let response = reply.get().unwrap().get_response().unwrap();
            assert_eq!(response.get_status(), 201);
            let body: Value = serde_json::from_slice(response.get_body().unwrap()).unwrap();
            assert_eq!(body["seq"], seq);
        }
        assert_eq!(chat_history(&host).await, messages(6..=105));
        let other = call(&host, ("chat", "elsewhere"), "GET", "/messages", b"").await;
        assert_eq!(
            other.body().as_ref(),
            b"[]",
            "each room is an object of its own"
        );
    });
    let server = TestServer::start_in(builder(), server.stop());
    run_local(async {
        let host = server.connect().await;
        assert_eq!(chat_history(&host).await, messages(6..=105));
        let response = call(
            &host,
            ("chat", "lobby"),
            "POST",
            "/messages",
            b"message 106",
        )
        .await;
        assert_eq!(
            status_and_text(&response),
            (201, r#"{"seq":106}"#.to_owned())
        );
        assert_eq!(chat_history(&host).await, messages(7..=106));
        let long = vec![b'x'; chat_room::MESSAGE_BYTES_MAX + 1];
        let response = call(&host, ("chat", "lobby"), "POST", "/messages", &long).await;
        assert_eq!(response.status(), 413);
        let response = call(&host, ("chat", "lobby"), "POST", "/messages", b"\xff").await;
        assert_eq!(response.status(), 400);
        assert_eq!(
            chat_history(&host).await,
            messages(7..=106),
            "nothing refused is kept"
        );
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
