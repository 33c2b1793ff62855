//! duro's web pages in a real headless Chromium, driven over the DevTools protocol by
//! `common::browser`. The first tests hold the harness to what the page tests rely on, against
//! a page served here on loopback.
//!
//! Needs Chromium (`apt-get install chromium`, or `DURO_CHROMIUM=path`). Without it the tests
//! are skipped with a message, unless `DURO_REQUIRE_BROWSER` is set (as in CI), which makes
//! them fail instead.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

use common::browser::Browser;

/// A page whose script does observable work: it sets the title to a sum it computes, after a
/// delay, and its button POSTs to `/click` and shows the server's count of clicks.
const PAGE: &str = r#"<!doctype html>
<title>computing</title>
<button id="click">click</button>
<p id="count">0</p>
<script>
  const primes = [...Array(100).keys()].filter(
    (n) => n > 1 && [...Array(n).keys()].slice(2).every((d) => n % d));
  setTimeout(() => { document.title = "primes " + primes.reduce((a, b) => a + b); }, 100);
  document.getElementById("click").onclick = async () => {
    const response = await fetch("/click", { method: "POST" });
    document.getElementById("count").textContent = await response.text();
  };
</script>
"#;

/// How long a test waits for what a page does; generous, as the machine may be busy.
const WAIT: Duration = Duration::from_secs(10);

/// Serves [`PAGE`] at `/` and the click counter at `POST /click` on 127.0.0.1, until the
/// test's runtime ends.
async fn serve_page() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let clicks = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let clicks = clicks.clone();
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let answer = match (request.method(), request.uri().path()) {
                    (&Method::GET, "/") => Response::new(Full::new(Bytes::from(PAGE))),
                    (&Method::POST, "/click") => {
                        let count = clicks.fetch_add(1, Ordering::Relaxed) + 1;
                        Response::new(Full::new(Bytes::from(count.to_string())))
                    }
                    _ => Response::builder()
                        .status(404)
                        .body(Full::default())
                        .unwrap(),
                };
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::spawn(connection);
        }
    });
    addr
}

/// The browser, or `None` with the reason the test `name` is skipped.
async fn browser(name: &str) -> Option<Browser> {
    let browser = Browser::launch().await;
    if browser.is_none() {
        eprintln!("SKIPPED {name}: no browser");
    }
    browser
}

#[tokio::test]
async fn the_harness_sees_page_script_work_in_separate_tabs() {
    let Some(browser) = browser("the_harness_sees_page_script_work_in_separate_tabs").await else {
        return;
    };
    let url = format!("http://{}/", serve_page().await);
    let a = browser.open(&url).await;
    let b = browser.open(&url).await;
    a.wait_loaded().await.unwrap();
    b.wait_loaded().await.unwrap();

    // The title the page's script sets once it has computed the sum.
    a.wait_for("document.title === 'primes 1060'", WAIT)
        .await
        .unwrap();
    assert_eq!(a.eval("document.title").await, "primes 1060");
    assert_eq!(a.eval("location.href").await, url.as_str());

    // Values come back as JSON; promises are awaited; `undefined` is null.
    let value = a
        .eval("({ n: 1.5, list: [1, 'two', true], none: null })")
        .await;
    assert_eq!(
        value,
        json!({ "n": 1.5, "list": [1, "two", true], "none": null })
    );
    let later = "new Promise((resolve) => setTimeout(() => resolve(42), 20))";
    assert_eq!(a.eval(later).await, 42);
    assert_eq!(a.eval("undefined").await, json!(null));

    // A click's effect, made by page script after a round trip to the server, is seen in its
    // own tab only.
    a.eval("document.getElementById('click').click()").await;
    let count_is = |n: u32| format!("document.getElementById('count').textContent === '{n}'");
    a.wait_for(&count_is(1), WAIT).await.unwrap();
    assert_eq!(
        b.eval("document.getElementById('count').textContent").await,
        "0"
    );
    b.eval("document.getElementById('click').click()").await;
    b.wait_for(&count_is(2), WAIT).await.unwrap();
    assert_eq!(
        a.eval("document.getElementById('count').textContent").await,
        "1"
    );
}

#[tokio::test]
async fn script_errors_and_failed_loads_surface_with_their_text() {
    let Some(browser) = browser("script_errors_and_failed_loads_surface_with_their_text").await
    else {
        return;
    };
    let page = browser
        .open(&format!("http://{}/", serve_page().await))
        .await;
    page.wait_loaded().await.unwrap();

    let thrown = page.try_eval("throw new Error('boom')").await.unwrap_err();
    assert!(thrown.contains("Error: boom"), "{thrown}");
    let rejected = page
        .try_eval("Promise.reject(new TypeError('later'))")
        .await;
    assert!(
        rejected.as_ref().unwrap_err().contains("TypeError: later"),
        "{rejected:?}"
    );
    let plain = page.try_eval("throw 'plain words'").await.unwrap_err();
    assert!(plain.contains("plain words"), "{plain}");
    let syntax = page.try_eval("1 +").await.unwrap_err();
    assert!(syntax.contains("SyntaxError"), "{syntax}");
    let panicked = AssertUnwindSafe(page.eval("null.field"))
        .catch_unwind()
        .await;
    let message = *panicked.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("TypeError"), "{message}");

    // A condition that never holds ends at its timeout, saying what it last was.
    let started = Instant::now();
    let never = page
        .wait_for("document.title === 'never'", Duration::from_millis(300))
        .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < WAIT,
        "{waited:?}"
    );
    assert!(
        never.as_ref().unwrap_err().contains("it was false"),
        "{never:?}"
    );
    let throwing = page
        .wait_for("missing.thing", Duration::from_millis(300))
        .await;
    assert!(
        throwing.as_ref().unwrap_err().contains("ReferenceError"),
        "{throwing:?}"
    );

    // A URL that cannot be loaded fails `open` with the browser's reason.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let failed = AssertUnwindSafe(browser.open(&closed_url))
        .catch_unwind()
        .await;
    let message = *failed
        .err()
        .expect("open fails")
        .downcast::<String>()
        .unwrap();
    assert!(message.contains("ERR_CONNECTION_REFUSED"), "{message}");
}

/// The texts of a room page's messages as it shows them, each after its `seq`.
const ROOM_SHOWN: &str = "[...document.querySelectorAll('#messages li')]\
    .map((li) => li.dataset.seq + ' ' + li.querySelector('.text').textContent)";

/// Types `text` into a room page's input and clicks Send, as a user would; what the input
/// holds afterwards.
async fn type_and_send(page: &common::browser::Page, text: &str) -> serde_json::Value {
    let text = serde_json::to_string(text).unwrap();
    page.eval(&format!(
        "(() => {{
            const input = document.getElementById('text');
            input.focus();
            input.value = {text};
            input.dispatchEvent(new Event('input', {{ bubbles: true }}));
            document.getElementById('send-button').click();
            return input.value;
        }})()"
    ))
    .await
}

#[tokio::test]
async fn two_pages_of_a_room_see_both_messages_in_one_order() {
    let Some(browser) = browser("two_pages_of_a_room_see_both_messages_in_one_order").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let served = common::serve_with(dir.path(), &[]);
    let url = format!("http://{}/room/lobby/", served.http.unwrap());
    let one = browser.open(&url).await;
    let two = browser.open(&url).await;
    let connected = "document.getElementById('status').dataset.state === 'open'";
    for page in [&one, &two] {
        page.wait_loaded().await.unwrap();
        page.wait_for(connected, WAIT).await.unwrap();
        assert_eq!(page.eval("document.title").await, "lobby · room");
    }

    // One sends, and once it shows there the other sends: the order is known.
    assert_eq!(type_and_send(&one, "hello from one").await, "", "sent");
    one.wait_for(&format!("{ROOM_SHOWN}.length === 1"), WAIT)
        .await
        .unwrap();
    assert_eq!(type_and_send(&two, "and from two <b>").await, "", "sent");
    let both = json!(["1 hello from one", "2 and from two <b>"]);
    for page in [&one, &two] {
        page.wait_for(&format!("{ROOM_SHOWN}.length === 2"), WAIT)
            .await
            .unwrap();
        assert_eq!(page.eval(ROOM_SHOWN).await, both);
    }
    // The text is shown as text, never as markup.
    assert_eq!(
        two.eval("document.querySelectorAll('#messages b').length")
            .await,
        0
    );

    // A page opened later shows the history, in the same order.
    let three = browser.open(&url).await;
    three.wait_loaded().await.unwrap();
    three
        .wait_for(&format!("{ROOM_SHOWN}.length === 2"), WAIT)
        .await
        .unwrap();
    assert_eq!(three.eval(ROOM_SHOWN).await, both);
}
