//! The built-in `kv` class, over a real Cap'n Proto connection on loopback.

use duro::Server;
use duro::duro_capnp::host;
use duro::testing::{TestServer, fetch_by_name, run_local};
use serde_json::{Value, json};

fn start() -> TestServer {
    TestServer::start(duro::builtin::register(Server::builder()))
}

/// One request to the `kv` object named "store": (status, body).
async fn call(host: &host::Client, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let response = fetch_by_name(host, "kv", "store", method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (response.status().as_u16(), response.body().to_vec())
}

/// `GET path`, expecting 200 and a JSON body.
async fn get_json(host: &host::Client, path: &str) -> Value {
    let (status, body) = call(host, "GET", path, b"").await;
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("a JSON body")
}

/// The keys `GET /list?{query}` answers, in order (UTF-8 keys only).
async fn list_keys(host: &host::Client, query: &str) -> Vec<String> {
    let entries = get_json(host, &format!("/list?{query}")).await;
    let entries = entries.as_array().expect("an array");
    entries
        .iter()
        .map(|e| e["key"].as_str().expect("a UTF-8 key").to_owned())
        .collect()
}

async fn post_txn(host: &host::Client, txn: &Value) -> (u16, Vec<u8>) {
    call(host, "POST", "/txn", txn.to_string().as_bytes()).await
}

/// Asserts a refusal: the status, and that the message names `rule`.
fn assert_refused((status, body): (u16, Vec<u8>), expected: u16, rule: &str) {
    let message = String::from_utf8_lossy(&body);
    assert_eq!(status, expected, "{message}");
    assert!(message.contains(rule), "{message:?} should name {rule}");
}

#[test]
fn put_get_delete() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        assert_eq!(call(&host, "GET", "/k/greeting", b"").await.0, 404);
        assert_eq!(
            call(&host, "PUT", "/k/greeting", b"hello").await,
            (204, vec![])
        );
        assert_eq!(
            call(&host, "GET", "/k/greeting", b"").await,
            (200, b"hello".to_vec())
        );
        assert_eq!(call(&host, "PUT", "/k/greeting", b"").await.0, 204);
        assert_eq!(call(&host, "GET", "/k/greeting", b"").await, (200, vec![]));
        assert_eq!(
            call(&host, "DELETE", "/k/greeting", b"").await,
            (200, b"true".to_vec())
        );
        assert_eq!(call(&host, "GET", "/k/greeting", b"").await.0, 404);
        assert_eq!(
            call(&host, "DELETE", "/k/greeting", b"").await,
            (200, b"false".to_vec())
        );

        // Another object of the namespace has storage of its own.
        call(&host, "PUT", "/k/mine", b"1").await;
        let other = fetch_by_name(&host, "kv", "other", "GET", "/k/mine", b"")
            .await
            .unwrap();
        assert_eq!(other.status().as_u16(), 404);
    });
}

#[test]
fn other_routes_and_methods() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        for path in ["/", "/k", "/kk/a", "/lists", "/txn/x"] {
            assert_eq!(call(&host, "GET", path, b"").await.0, 404, "GET {path}");
        }
        assert_eq!(call(&host, "POST", "/k/a", b"x").await.0, 405);
        assert_eq!(call(&host, "PUT", "/list", b"").await.0, 405);
        assert_eq!(call(&host, "GET", "/txn", b"").await.0, 405);
        assert_eq!(
            call(&host, "GET", "/k/a", b"").await.0,
            404,
            "the POST stored nothing"
        );
    });
}

#[test]
fn keys_are_the_percent_decoded_rest_of_the_path() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        assert_eq!(call(&host, "PUT", "/k/dir/sub/file", b"slash").await.0, 204);
        assert_eq!(
            call(&host, "GET", "/k/dir%2Fsub%2ffile", b"").await,
            (200, b"slash".to_vec())
        );
        call(&host, "PUT", "/k/nul%00byte", b"nul").await;
        call(&host, "PUT", "/k/%E2%9C%93", b"check").await;
        call(&host, "PUT", "/k/sp%20ace+plus", b"space").await;
        call(&host, "PUT", "/k/raw%FF", b"not utf-8").await;
        assert_eq!(
            call(&host, "GET", "/k/nul%00byte", b"").await,
            (200, b"nul".to_vec())
        );
        assert_eq!(call(&host, "GET", "/k/nul", b"").await.0, 404);
        assert_eq!(
            call(&host, "GET", "/k/%e2%9c%93", b"").await,
            (200, b"check".to_vec())
        );
        assert_eq!(call(&host, "GET", "/k/%FF", b"").await.0, 404);

        // The stored keys are the decoded bytes, in byte order.
        let entries = get_json(&host, "/list").await;
        assert_eq!(
            entries,
            json!([
                {"key": "dir/sub/file", "value": "slash"},
                {"key": "nul\u{0}byte", "value": "nul"},
                {"key_base64": "cmF3/w==", "value": "not utf-8"},
                {"key": "sp ace+plus", "value": "space"},
                {"key": "\u{2713}", "value": "check"},
            ])
        );
        assert_eq!(
            call(&host, "DELETE", "/k/raw%ff", b"").await,
            (200, b"true".to_vec())
        );
        assert_eq!(
            call(&host, "DELETE", "/k/dir%2Fsub/file", b"").await,
            (200, b"true".to_vec())
        );
        assert_eq!(
            list_keys(&host, "").await,
            ["nul\u{0}byte", "sp ace+plus", "\u{2713}"]
        );
    });
}

#[test]
fn list_with_every_option() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        for key in ["a", "b", "c", "d", "p/1", "p/2", "p/3", "q"] {
            let value = format!("value of {key}");
            assert_eq!(
                call(&host, "PUT", &format!("/k/{key}"), value.as_bytes())
                    .await
                    .0,
                204
            );
        }
        let all = get_json(&host, "/list").await;
        assert_eq!(all.as_array().unwrap().len(), 8);
        assert_eq!(all[4], json!({"key": "p/1", "value": "value of p/1"}));

        let cases: &[(&str, &[&str])] = &[
            ("", &["a", "b", "c", "d", "p/1", "p/2", "p/3", "q"]),
            ("start=b", &["b", "c", "d", "p/1", "p/2", "p/3", "q"]),
            ("startAfter=b", &["c", "d", "p/1", "p/2", "p/3", "q"]),
            ("end=c", &["a", "b"]),
            ("start=b&end=d", &["b", "c"]),
            ("startAfter=a&end=c&reverse=true", &["b"]),
            ("limit=3", &["a", "b", "c"]),
            ("reverse=true&limit=2", &["q", "p/3"]),
            ("reverse=false&limit=1", &["a"]),
            ("prefix=p/", &["p/1", "p/2", "p/3"]),
            ("prefix=p%2F&reverse=true&limit=2", &["p/3", "p/2"]),
            ("prefix=p%2f&startAfter=p%2F1", &["p/2", "p/3"]),
            ("prefix=p&end=p%2F3&reverse=true", &["p/2", "p/1"]),
            ("prefix=x", &[]),
            ("start=", &["a", "b", "c", "d", "p/1", "p/2", "p/3", "q"]),
            ("limit=100", &["a", "b", "c", "d", "p/1", "p/2", "p/3", "q"]),
        ];
        for (query, expected) in cases {
            assert_eq!(list_keys(&host, query).await, *expected, "/list?{query}");
        }

        let refused = |query: &'static str| call(&host, "GET", query, b"");
        assert_refused(
            refused("/list?start=a&startAfter=b").await,
            400,
            "start_after",
        );
        assert_refused(refused("/list?limit=0").await, 400, "limit");
        assert_refused(refused("/list?limit=ten").await, 400, "limit");
        assert_refused(refused("/list?limit=-1").await, 400, "limit");
        assert_refused(refused("/list?reverse=yes").await, 400, "reverse");
        assert_refused(refused("/list?reverse").await, 400, "reverse");
        assert_refused(refused("/list?start_after=a").await, 400, "start_after");
    });
}

#[test]
fn values_that_are_not_utf8_come_as_base64() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        let bytes = [0xff, 0x00, 0xfe, b'a'];
        assert_eq!(call(&host, "PUT", "/k/bin", &bytes).await.0, 204);
        assert_eq!(
            call(&host, "GET", "/k/bin", b"").await,
            (200, bytes.to_vec())
        );
        call(&host, "PUT", "/k/text", "caf\u{e9}".as_bytes()).await;
        assert_eq!(
            get_json(&host, "/list").await,
            json!([{"key": "bin", "value_base64": "/wD+YQ=="}, {"key": "text", "value": "café"}])
        );
        let (status, body) = post_txn(&host, &json!({"ops": [{"op": "get", "key": "bin"}]})).await;
        assert_eq!(status, 200);
        let reads: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(reads, json!([{"value_base64": "/wD+YQ=="}]));
    });
}

#[test]
fn transaction_applies_ops_in_order_and_answers_the_reads() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        call(&host, "PUT", "/k/x", b"1").await;
        let txn = json!({
            "if": [{"key": "x", "equals": "1"}, {"key": "absent", "equals": null}],
            "ops": [
                {"op": "get", "key": "x"},
                {"op": "put", "key": "y", "value": "2"},
                {"op": "get", "key": "y"},
                {"op": "delete", "key": "x"},
                {"op": "get", "key": "x"},
                {"op": "put", "key": "y", "value": "3"},
                {"op": "get", "key": "y"},
                {"op": "get", "key": "absent"},
            ],
        });
        let (status, body) = post_txn(&host, &txn).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let reads: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(reads, json!(["1", "2", null, "3", null]));
        assert_eq!(call(&host, "GET", "/k/x", b"").await.0, 404);
        assert_eq!(call(&host, "GET", "/k/y", b"").await, (200, b"3".to_vec()));

        // No conditions and no reads: an empty array; `if` and `ops` may be left out.
        let (status, body) = post_txn(
            &host,
            &json!({"ops": [{"op": "put", "key": "z", "value": "zz"}]}),
        )
        .await;
        assert_eq!((status, body), (200, b"[]".to_vec()));
        assert_eq!(call(&host, "GET", "/k/z", b"").await, (200, b"zz".to_vec()));
        let (status, body) = post_txn(&host, &json!({"if": [{"key": "z", "equals": "zz"}]})).await;
        assert_eq!((status, body), (200, b"[]".to_vec()));
    });
}

#[test]
fn failed_condition_changes_nothing() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        call(&host, "PUT", "/k/a", b"1").await;
        let ops = json!([
            {"op": "put", "key": "a", "value": "changed"},
            {"op": "delete", "key": "a"},
            {"op": "put", "key": "b", "value": "new"},
            {"op": "get", "key": "a"},
        ]);
        let failing = [
            json!([{"key": "a", "equals": "2"}]),
            json!([{"key": "a", "equals": null}]),
            json!([{"key": "b", "equals": "1"}]),
            json!([{"key": "b", "equals": null}, {"key": "a", "equals": "1 "}]),
        ];
        for conditions in failing {
            let (status, body) = post_txn(&host, &json!({"if": conditions, "ops": ops})).await;
            assert_eq!(
                status,
                409,
                "if {conditions}: {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(call(&host, "GET", "/k/a", b"").await, (200, b"1".to_vec()));
            assert_eq!(call(&host, "GET", "/k/b", b"").await.0, 404);
        }
        assert_eq!(
            get_json(&host, "/list").await,
            json!([{"key": "a", "value": "1"}])
        );

        // The same ops succeed once the conditions hold.
        let conditions = json!([{"key": "a", "equals": "1"}, {"key": "b", "equals": null}]);
        let (status, body) = post_txn(&host, &json!({"if": conditions, "ops": ops})).await;
        assert_eq!((status, body), (200, b"[null]".to_vec()));
        assert_eq!(
            get_json(&host, "/list").await,
            json!([{"key": "b", "value": "new"}])
        );
    });
}

#[test]
fn malformed_transactions_are_refused() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        call(&host, "PUT", "/k/a", b"1").await;
        let put_b = json!({"op": "put", "key": "b", "value": "x"});
        let bad: Vec<Vec<u8>> = vec![
            b"{".to_vec(),
            b"".to_vec(),
            b"[]".to_vec(),
            json!({"ops": [put_b, {"op": "increment", "key": "a"}]})
                .to_string()
                .into(),
            json!({"ops": [put_b, {"op": "put", "key": "a"}]})
                .to_string()
                .into(),
            json!({"ops": [put_b, {"op": "put", "key": "a", "value": 5}]})
                .to_string()
                .into(),
            json!({"ops": [put_b, {"key": "a"}]}).to_string().into(),
            json!({"ops": [put_b, {"op": "get", "key": "a", "extra": 1}]})
                .to_string()
                .into(),
            // A misspelt `if` must not run the ops unconditionally.
            json!({"iff": [{"key": "a", "equals": "2"}], "ops": [put_b]})
                .to_string()
                .into(),
            // `equals` is required: null must be said.
            json!({"if": [{"key": "b"}], "ops": [put_b]})
                .to_string()
                .into(),
        ];
        for body in bad {
            let (status, answer) = call(&host, "POST", "/txn", &body).await;
            let (body, answer) = (
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(&answer),
            );
            assert_eq!(status, 400, "{body} got {answer}");
        }
        assert_eq!(
            get_json(&host, "/list").await,
            json!([{"key": "a", "value": "1"}])
        );

        // At most batch_keys_max (128) ops.
        let ops = |n: usize| -> Vec<Value> {
            (0..n)
                .map(|i| json!({"op": "put", "key": format!("k{i:03}"), "value": "v"}))
                .collect()
        };
        assert_refused(
            post_txn(&host, &json!({"ops": ops(129)})).await,
            400,
            "batch_keys_max",
        );
        assert_eq!(list_keys(&host, "").await, ["a"]);
        assert_eq!(post_txn(&host, &json!({"ops": ops(128)})).await.0, 200);
        assert_eq!(list_keys(&host, "prefix=k").await.len(), 128);
    });
}

#[test]
fn keys_and_values_over_the_limits_are_refused() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        let long_key = "k".repeat(2049);
        let path = format!("/k/{long_key}");
        assert_refused(call(&host, "PUT", &path, b"v").await, 400, "key_bytes_max");
        assert_refused(call(&host, "GET", &path, b"").await, 400, "key_bytes_max");
        assert_refused(
            call(&host, "DELETE", &path, b"").await,
            400,
            "key_bytes_max",
        );
        assert_eq!(list_keys(&host, "").await, Vec::<String>::new());
        // The limit counts decoded bytes: 2048 of them is fine.
        let max_key = "%41".repeat(2048);
        assert_eq!(
            call(&host, "PUT", &format!("/k/{max_key}"), b"v").await.0,
            204
        );
        assert_eq!(list_keys(&host, "").await, ["A".repeat(2048)]);

        let big = vec![b'v'; 32 * 1024 + 1];
        assert_refused(
            call(&host, "PUT", "/k/big", &big).await,
            413,
            "value_bytes_max",
        );
        assert_eq!(call(&host, "GET", "/k/big", b"").await.0, 404);
        let max = vec![b'v'; 32 * 1024];
        assert_eq!(call(&host, "PUT", "/k/big", &max).await.0, 204);
        assert_eq!(call(&host, "GET", "/k/big", b"").await, (200, max.clone()));
        // A refused overwrite keeps the old value.
        assert_refused(
            call(&host, "PUT", "/k/big", &big).await,
            413,
            "value_bytes_max",
        );
        assert_eq!(call(&host, "GET", "/k/big", b"").await, (200, max));

        // In a transaction: refused, and its other ops are not applied either.
        let first = json!({"op": "put", "key": "first", "value": "1"});
        let big_value = json!({"op": "put", "key": "x", "value": "v".repeat(32 * 1024 + 1)});
        let txn = json!({"ops": [first, big_value]});
        assert_refused(post_txn(&host, &txn).await, 413, "value_bytes_max");
        let long = json!({"op": "put", "key": long_key, "value": "v"});
        assert_refused(
            post_txn(&host, &json!({"ops": [first, long]})).await,
            400,
            "key_bytes_max",
        );
        let get_long = json!({"op": "get", "key": long_key});
        assert_refused(
            post_txn(&host, &json!({"ops": [first, get_long]})).await,
            400,
            "key_bytes_max",
        );
        assert_eq!(call(&host, "GET", "/k/first", b"").await.0, 404);
        assert_eq!(list_keys(&host, "").await.len(), 2);
    });
}

#[test]
fn data_persists_across_a_restart() {
    let server = start();
    let bytes = [0u8, 159, 146, 150];
    run_local(async {
        let host = server.connect().await;
        call(&host, "PUT", "/k/a/b", b"slash").await;
        call(&host, "PUT", "/k/bin", &bytes).await;
        call(&host, "PUT", "/k/gone", b"x").await;
        call(&host, "DELETE", "/k/gone", b"").await;
        let txn = json!({"ops": [{"op": "put", "key": "t", "value": "from txn"}]});
        assert_eq!(post_txn(&host, &txn).await.0, 200);
    });
    let dir = server.stop();
    let server = TestServer::start_in(duro::builtin::register(Server::builder()), dir);
    run_local(async {
        let host = server.connect().await;
        assert_eq!(
            call(&host, "GET", "/k/a%2Fb", b"").await,
            (200, b"slash".to_vec())
        );
        assert_eq!(
            call(&host, "GET", "/k/bin", b"").await,
            (200, bytes.to_vec())
        );
        assert_eq!(call(&host, "GET", "/k/gone", b"").await.0, 404);
        assert_eq!(
            call(&host, "GET", "/k/t", b"").await,
            (200, b"from txn".to_vec())
        );
        assert_eq!(list_keys(&host, "").await.len(), 3);
    });
}

/// Ranges that hold no key, such as a start past the end, answer an empty list (also while
/// the object's cache holds entries in and around the range).
#[test]
fn empty_ranges_answer_an_empty_list() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        // Written by this activation, so the keys are in its cache.
        for key in ["a", "b", "c", "d", "p/1", "q"] {
            assert_eq!(call(&host, "PUT", &format!("/k/{key}"), b"v").await.0, 204);
        }
        let queries = [
            "start=d&end=b",
            "start=b&end=b",
            "startAfter=b&end=b",
            "startAfter=b&end=c",
            "prefix=p%2F&start=q",
            "prefix=p%2F&end=a",
            "start=d&end=b&reverse=true",
        ];
        for query in queries {
            assert_eq!(
                list_keys(&host, query).await,
                Vec::<String>::new(),
                "/list?{query}"
            );
        }
    });
}

// Expiring keys (`PUT /k/{key}?ttl=SECONDS`), on a manual clock.

const T0: u64 = 1_700_000_000_000;

/// An in-process host with the `kv` class on `clock`: calls made on a stub before the test
/// yields are delivered before an alarm the clock's move makes due, so a test can read
/// between an expiry and the alarm that deletes the key.
fn ttl_host(dir: &std::path::Path, clock: &duro::testing::ManualClock) -> duro::Host {
    duro::builtin::register(Server::builder())
        .clock(clock.shared())
        .data_dir(dir)
        .open_host()
        .unwrap()
}

/// (status, body) of one call to the `kv` object "store" of an in-process host.
async fn local(host: &duro::Host, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let stub = host.namespace("kv").unwrap().get_by_name("store").unwrap();
    let response = stub.call(method, path, body.to_vec()).await.unwrap();
    (response.status().as_u16(), response.body().to_vec())
}

/// Every key the object stores, the expiry index's included (read below the `kv` class).
async fn stored_keys(host: &duro::Host) -> Vec<Vec<u8>> {
    let state = duro::testing::state(host, "kv", "store").unwrap();
    let entries = state.storage().list_encoded(&Default::default()).unwrap();
    entries.into_iter().map(|(key, _)| key).collect()
}

/// Lets the host run (real time) until `condition` holds; panics after 10 s.
async fn until<F: std::future::Future<Output = bool>>(what: &str, condition: impl Fn() -> F) {
    for _ in 0..10_000 {
        if condition().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn objects(host: &duro::Host) -> usize {
    let namespace = host.namespace("kv").unwrap();
    namespace.list_objects(None, 10).unwrap().0.len()
}

#[test]
fn an_expired_key_is_absent_at_once_and_the_alarm_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = duro::testing::ManualClock::new(T0);
    run_local(async {
        let host = ttl_host(dir.path(), &clock);
        assert_eq!(local(&host, "PUT", "/k/a?ttl=10", b"1").await.0, 204);
        assert_eq!(local(&host, "PUT", "/k/b?ttl=20", b"2").await.0, 204);
        assert_eq!(local(&host, "PUT", "/k/c", b"3").await.0, 204);
        assert_eq!(local(&host, "GET", "/k/a", b"").await, (200, b"1".to_vec()));
        let state = duro::testing::state(&host, "kv", "store").unwrap();
        assert_eq!(
            state.storage().get_alarm().await.unwrap(),
            Some(T0 + 10_000)
        );
        // What `duro ls` shows, read from storage.
        let namespace = host.namespace("kv").unwrap();
        let alarm = namespace.stored_alarm(state.id().bytes()).unwrap();
        assert_eq!(alarm, Some(T0 + 10_000));

        // Due now; these calls are queued before the alarm is, so they run before it.
        clock.set(T0 + 10_000);
        let stub = host.namespace("kv").unwrap().get_by_name("store").unwrap();
        let get = stub.call("GET", "/k/a", "");
        let list = stub.call("GET", "/list?limit=2", "");
        let delete = stub.call("DELETE", "/k/a", "");
        let txn = json!({
            "if": [{"key": "a", "equals": null}],
            "ops": [{"op": "get", "key": "a"}, {"op": "get", "key": "b"}],
        });
        let txn = stub.call("POST", "/txn", txn.to_string());
        assert_eq!(get.await.unwrap().status().as_u16(), 404);
        let list: Value = serde_json::from_slice(list.await.unwrap().body()).unwrap();
        assert_eq!(
            list,
            json!([{"key": "b", "value": "2"}, {"key": "c", "value": "3"}]),
            "the limit counts live keys only, and the index is not listed"
        );
        assert_eq!(delete.await.unwrap().body().as_ref(), b"false");
        let txn = txn.await.unwrap();
        assert_eq!(txn.status().as_u16(), 200);
        assert_eq!(txn.body().as_ref(), br#"[null,"2"]"#);

        // The alarm re-arms for b; when b expires its alarm deletes it, index entry and all.
        until("the alarm re-arms", || async {
            state.storage().get_alarm().await.unwrap() == Some(T0 + 20_000)
        })
        .await;
        clock.set(T0 + 20_000);
        until("b is deleted", || async {
            stored_keys(&host).await == [b"c".to_vec()]
        })
        .await;
        assert_eq!(state.storage().get_alarm().await.unwrap(), None);

        // With nothing left, the object leaves listObjects.
        assert_eq!(
            local(&host, "DELETE", "/k/c", b"").await,
            (200, b"true".to_vec())
        );
        assert_eq!(local(&host, "PUT", "/k/d?ttl=5", b"4").await.0, 204);
        assert_eq!(objects(&host), 1);
        clock.advance(5_000);
        until("the object has no data", || async { objects(&host) == 0 }).await;
        host.shutdown().await;
    });
}

#[test]
fn a_put_without_ttl_keeps_the_key_and_a_new_ttl_replaces_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let clock = duro::testing::ManualClock::new(T0);
    run_local(async {
        let host = ttl_host(dir.path(), &clock);
        local(&host, "PUT", "/k/kept?ttl=10", b"old").await;
        local(&host, "PUT", "/k/kept", b"new").await;
        local(&host, "PUT", "/k/moved?ttl=10", b"x").await;
        local(&host, "PUT", "/k/moved?ttl=100", b"y").await;
        // In a transaction too, a put clears the expiry.
        local(&host, "PUT", "/k/txn?ttl=10", b"z").await;
        let put = json!({"ops": [{"op": "put", "key": "txn", "value": "zz"}]});
        assert_eq!(
            local(&host, "POST", "/txn", put.to_string().as_bytes())
                .await
                .0,
            200
        );
        let index_entries = |keys: Vec<Vec<u8>>| keys.iter().filter(|k| k[0] == 0).count();
        assert_eq!(index_entries(stored_keys(&host).await), 1, "only moved's");

        clock.set(T0 + 50_000);
        // The alarm set for the old expiries fires, deletes nothing, and re-arms.
        let state = duro::testing::state(&host, "kv", "store").unwrap();
        until("the alarm re-arms", || async {
            state.storage().get_alarm().await.unwrap() == Some(T0 + 100_000)
        })
        .await;
        assert_eq!(
            local(&host, "GET", "/k/kept", b"").await,
            (200, b"new".to_vec())
        );
        assert_eq!(
            local(&host, "GET", "/k/moved", b"").await,
            (200, b"y".to_vec())
        );
        assert_eq!(
            local(&host, "GET", "/k/txn", b"").await,
            (200, b"zz".to_vec())
        );
        clock.set(T0 + 100_000);
        assert_eq!(local(&host, "GET", "/k/moved", b"").await.0, 404);
        until("moved is deleted", || async {
            stored_keys(&host).await.len() == 2
        })
        .await;
        host.shutdown().await;
    });
}

#[test]
fn bad_ttls_and_reserved_keys_are_refused() {
    let server = start();
    run_local(async {
        let host = server.connect().await;
        let rule = "ttl must be a whole number of seconds from 1 to 315360000";
        for query in [
            "ttl=0",
            "ttl=-1",
            "ttl=1.5",
            "ttl=+5",
            "ttl=",
            "ttl",
            "ttl=ten",
            "ttl=315360001",
            "ttl=99999999999999999999999",
        ] {
            let path = format!("/k/a?{query}");
            assert_refused(call(&host, "PUT", &path, b"v").await, 400, rule);
        }
        assert_refused(
            call(&host, "PUT", "/k/a?ttl=5&ttl=6", b"v").await,
            400,
            "once",
        );
        assert_refused(
            call(&host, "PUT", "/k/a?tll=5", b"v").await,
            400,
            "known: ttl",
        );
        assert_refused(
            call(&host, "PUT", "/k/%00ttl/x", b"v").await,
            400,
            "reserved",
        );
        assert_refused(call(&host, "GET", "/k/%00ttl/", b"").await, 400, "reserved");
        let txn = json!({"ops": [{"op": "get", "key": "\u{0}ttl/x"}]});
        assert_refused(post_txn(&host, &txn).await, 400, "reserved");
        // A key or value that fits without a ttl but not with one.
        let key = "k".repeat(2048 - 12);
        let refused = call(&host, "PUT", &format!("/k/{key}?ttl=5"), b"v").await;
        assert_refused(refused, 400, "key_bytes_max");
        let key = "k".repeat(2048 - 13);
        assert_eq!(
            call(&host, "PUT", &format!("/k/{key}?ttl=5"), b"v").await.0,
            204
        );
        let value = vec![b'v'; 32 * 1024 - 15];
        assert_refused(
            call(&host, "PUT", "/k/big?ttl=5", &value).await,
            413,
            "value_bytes_max",
        );
        let value = vec![b'v'; 32 * 1024 - 16];
        assert_eq!(call(&host, "PUT", "/k/big?ttl=5", &value).await.0, 204);
        assert_eq!(call(&host, "GET", "/k/big", b"").await, (200, value));
        assert_eq!(
            call(&host, "GET", "/k/a", b"").await.0,
            404,
            "nothing refused was stored"
        );
        assert_eq!(call(&host, "PUT", "/k/a?ttl=315360000", b"v").await.0, 204);
    });
}

#[test]
fn a_ttl_survives_a_restart() {
    let clock = duro::testing::ManualClock::new(T0);
    let builder = || duro::builtin::register(Server::builder()).clock(clock.shared());
    let server = TestServer::start(builder());
    run_local(async {
        let host = server.connect().await;
        assert_eq!(
            call(&host, "PUT", "/k/brief?ttl=60", b"soon gone").await.0,
            204
        );
        assert_eq!(call(&host, "PUT", "/k/plain", b"stays").await.0, 204);
    });
    let server = TestServer::start_in(builder(), server.stop());
    run_local(async {
        let host = server.connect().await;
        assert_eq!(
            call(&host, "GET", "/k/brief", b"").await,
            (200, b"soon gone".to_vec())
        );
        clock.advance(60_000);
        assert_eq!(call(&host, "GET", "/k/brief", b"").await.0, 404);
        assert_eq!(list_keys(&host, "").await, ["plain"]);
    });
}

/// `list` pages over the expiry index (which sits among keys beginning with a NUL byte) and
/// over expired keys, forward and in reverse, for every limit; and an alarm with more due
/// keys than one delivery deletes goes on until none is left.
#[test]
fn list_skips_the_index_and_many_expiring_keys_are_all_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = duro::testing::ManualClock::new(T0);
    run_local(async {
        let host = ttl_host(dir.path(), &clock);
        for key in ["%00a", "%00u", "%00z", "m"] {
            assert_eq!(local(&host, "PUT", &format!("/k/{key}"), b"v").await.0, 204);
        }
        // Sent 550 at once (under object_queue_max), so that group commit stores them in a
        // few commits.
        let stub = host.namespace("kv").unwrap().get_by_name("store").unwrap();
        for half in [0..550, 550..1100] {
            let puts = half.map(|i| stub.call("PUT", &format!("/k/e{i:04}?ttl={}", 1 + i % 2), ""));
            for put in futures::future::join_all(puts.collect::<Vec<_>>()).await {
                assert_eq!(put.unwrap().status().as_u16(), 204);
            }
        }
        clock.set(T0 + 1_000);
        let live: Vec<String> = ["\u{0}a", "\u{0}u", "\u{0}z"]
            .into_iter()
            .map(String::from)
            .chain((0..1100).filter(|i| i % 2 == 1).map(|i| format!("e{i:04}")))
            .chain(["m".to_owned()])
            .collect();
        for (reverse, limit) in [(false, 1), (true, 1), (false, 3), (true, 7), (false, 600)] {
            let query = format!("/list?reverse={reverse}&limit={limit}");
            let listed: Value =
                serde_json::from_slice(stub.call("GET", &query, "").await.unwrap().body()).unwrap();
            let keys: Vec<&str> = listed
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["key"].as_str().unwrap())
                .collect();
            let mut expected: Vec<&str> = live.iter().map(String::as_str).collect();
            if reverse {
                expected.reverse();
            }
            expected.truncate(limit);
            assert_eq!(keys, expected, "{query}");
        }
        clock.set(T0 + 2_000);
        until("every expiring key is deleted", || async {
            stored_keys(&host).await.len() == 4
        })
        .await;
        host.shutdown().await;
    });
}
