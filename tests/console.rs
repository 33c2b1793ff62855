//! The console of the admin server: its JSON API over plain HTTP (namespaces, a namespace's
//! objects paged by cursor, an object's storage as stored; bad parameters, unknown things and
//! the token), and its page in a real headless Chromium (lists, clicks, live charts drawn from
//! `/metrics`).
//!
//! Objects are made by `duro import` of a generated export, whose IDs the test mints with the
//! namespace's secret: names and keys of any bytes, values of every encoding, alarms, and a few
//! thousand objects, without a call to each.
//!
//! The browser tests need Chromium (`apt-get install chromium`, or `DURO_CHROMIUM=path`); they
//! are skipped without it unless `DURO_REQUIRE_BROWSER` is set (as in CI).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use duro::id::IdMinter;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use common::Served;
use common::browser::{Browser, Page};

/// Longest wait for an answer of the server.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a browser test waits for what the page does: generous, the machine may be busy.
const WAIT: Duration = Duration::from_secs(20);

/// An alarm far in the future, so that it stays set while the test reads it.
const ALARM_MS: u64 = 4_102_444_800_000; // 2100-01-01T00:00:00Z

/// Names with the bytes a name may have that break careless code: quotes, a newline, a
/// backslash, an ampersand, a percent, spaces and letters outside ASCII.
const ODD_NAMES: [&str; 6] = [
    "plain",
    "with \"quotes\" and 'apostrophes'",
    "two\nlines",
    "back\\slash & 100% sure",
    "ünïcødé 🦀 名前",
    "<b>not bold</b>",
];

fn duro(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duro"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running duro")
}

/// Runs `duro COMMAND --connect addr ARGS...`; its stdout, or a panic with its stderr.
fn at(addr: SocketAddr, args: &[&str]) -> String {
    let connect = addr.to_string();
    let mut all = vec![args[0], "--connect", &connect];
    all.extend_from_slice(&args[1..]);
    let output = duro(&all);
    assert!(
        output.status.success(),
        "duro {all:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// `duro serve` with its admin server on a port of its own, and the gateway as `http` says.
fn serve(dir: &Path, http: bool, token_file: Option<&Path>) -> Served {
    let mut flags = vec!["--admin", "127.0.0.1:0"];
    if !http {
        flags.extend(["--http", "off"]);
    }
    let token_file = token_file.map(|p| p.to_str().expect("a UTF-8 path").to_owned());
    if let Some(file) = &token_file {
        flags.extend(["--token-file", file.as_str()]);
    }
    common::serve_with(dir, &flags)
}

/// The namespace line of `duro export NAMESPACE` (its secret) and a minter of its IDs.
fn minter(addr: SocketAddr, namespace: &str) -> (String, IdMinter) {
    let export = at(addr, &["export", namespace]);
    let line = export.lines().nth(1).expect("a namespace line").to_owned();
    let parsed: Value = serde_json::from_str(&line).expect("a JSON line");
    let secret = STANDARD
        .decode(parsed["secret"].as_str().expect("a secret"))
        .expect("base64");
    let secret: [u8; 32] = secret.try_into().expect("32 bytes");
    (line, IdMinter::new(namespace, &secret))
}

/// An object of an export to import: its name, alarm and lines of keys.
struct Seed {
    name: String,
    alarm_ms: Option<u64>,
    keys: Vec<Value>,
}

/// Imports `seeds` into `namespace` with `duro import`; their IDs, hex, by name.
fn import(addr: SocketAddr, dir: &Path, namespace: &str, seeds: &[Seed]) -> Vec<(String, String)> {
    let (namespace_line, minter) = minter(addr, namespace);
    let mut text = format!("{{\"duro_export\":1}}\n{namespace_line}\n");
    let mut ids = Vec::new();
    for seed in seeds {
        let id = minter.from_name(&seed.name).to_hex();
        let mut object =
            json!({ "object": id, "created_ms": 1_700_000_000_000u64, "name": seed.name });
        if let Some(alarm) = seed.alarm_ms {
            object["alarm_ms"] = alarm.into();
        }
        text.push_str(&format!("{object}\n"));
        for key in &seed.keys {
            text.push_str(&format!("{key}\n"));
        }
        ids.push((seed.name.clone(), id));
    }
    let file = dir.join("seed.jsonl");
    std::fs::write(&file, text).unwrap();
    at(addr, &["import", "-i", file.to_str().unwrap()]);
    ids
}

/// One key line holding a short text, for objects whose content does not matter.
fn text_key(text: &str) -> Vec<Value> {
    vec![json!({ "key": "k", "text": text })]
}

/// An answer of the admin server.
struct Answer {
    status: u16,
    /// The head, lowercased.
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The message of a JSON error, checking the status and the type.
    fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        assert!(
            self.head.contains("content-type: application/json"),
            "{}",
            self.head
        );
        let message = self.json()["error"].as_str().expect("an error").to_owned();
        assert!(!message.is_empty());
        message
    }
}

/// `METHOD path` on `addr`, with a bearer token when given.
fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Answer {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    Answer {
        status: head[9..12].parse().expect("a status"),
        head: head.to_lowercase(),
        body: body.to_owned(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path, None)
}

/// `GET path`, which must answer 200 with JSON.
fn get_json(addr: SocketAddr, path: &str) -> Value {
    let answer = get(addr, path);
    assert_eq!(answer.status, 200, "GET {path}: {}", answer.body);
    assert!(
        answer.head.contains("content-type: application/json"),
        "{}",
        answer.head
    );
    answer.json()
}

/// A parameter's value, percent-encoded.
fn enc(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

/// Every object of `namespace`, page by page of `limit`: (ID, name) in the order listed,
/// and the number of pages. Checks each page's `more` and `next`.
fn all_objects(admin: SocketAddr, namespace: &str, limit: usize) -> (Vec<(String, String)>, usize) {
    let mut objects = Vec::new();
    let mut after: Option<String> = None;
    for pages in 1..=10_000 {
        let cursor = after
            .as_ref()
            .map_or(String::new(), |a| format!("&after={a}"));
        let path = format!("/api/objects?namespace={namespace}&limit={limit}{cursor}");
        let page = get_json(admin, &path);
        let listed = page["objects"].as_array().expect("objects");
        assert!(listed.len() <= limit, "{path}: {} objects", listed.len());
        for object in listed {
            let id = object["id"].as_str().expect("an id").to_owned();
            objects.push((id, object["name"].as_str().unwrap_or("").to_owned()));
        }
        if page["more"] == false {
            assert_eq!(page["next"], Value::Null, "{path}");
            return (objects, pages);
        }
        assert_eq!(
            listed.len(),
            limit,
            "{path}: a page short of its limit says more"
        );
        let next = page["next"].as_str().expect("a next cursor");
        assert_eq!(Some(next), listed.last().and_then(|o| o["id"].as_str()));
        after = Some(next.to_owned());
    }
    panic!("the objects of {namespace} never ended");
}

/// The stored CBOR of `value`, base64, as an export line carries it.
fn cbor_b64(value: &impl serde::Serialize) -> String {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).unwrap();
    STANDARD.encode(bytes)
}

/// An object with a key of each kind: raw text, raw bytes that are not UTF-8, a typed
/// (CBOR) value, and a key that is not UTF-8; and an alarm.
fn rich_seed() -> Seed {
    let typed = json!({ "n": 42, "list": [1, "two", null], "nested": { "ok": true } });
    Seed {
        name: "plain".into(),
        alarm_ms: Some(ALARM_MS),
        keys: vec![
            json!({ "key": "bin", "raw_b64": STANDARD.encode([0xff, 0x00, 0x80]) }),
            json!({ "key": "text", "text": "hello, \"world\"\n" }),
            json!({ "key": "typed", "cbor_b64": cbor_b64(&typed) }),
            json!({ "key_b64": STANDARD.encode([0xff, 0xfe]), "text": "under a binary key" }),
        ],
    }
}

/// The objects with [`ODD_NAMES`], the first of them [`rich_seed`].
fn odd_seeds() -> Vec<Seed> {
    let mut seeds = vec![rich_seed()];
    for name in &ODD_NAMES[1..] {
        seeds.push(Seed {
            name: (*name).to_owned(),
            alarm_ms: None,
            keys: text_key(name),
        });
    }
    seeds
}

#[test]
fn the_api_lists_namespaces_and_pages_objects_with_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), false, None);
    let admin = served.admin.expect("the admin server is on");
    let ids = import(served.addr, dir.path(), "kv", &odd_seeds());

    let namespaces = get_json(admin, "/api/namespaces");
    let names: Vec<&str> = namespaces
        .as_array()
        .unwrap()
        .iter()
        .map(|ns| ns["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["counter", "echo", "kv", "room", "tally", "timer"]);
    assert!(
        namespaces
            .as_array()
            .unwrap()
            .contains(&json!({ "name": "kv", "class": "kv" }))
    );

    // Pages of 2 over 6 objects: 3 pages, in ID order, every name as it was given.
    let (listed, pages) = all_objects(admin, "kv", 2);
    assert_eq!(pages, 3);
    let mut expected = ids.clone();
    expected.sort_by(|a, b| a.1.cmp(&b.1));
    let expected: Vec<(String, String)> = expected.into_iter().map(|(n, id)| (id, n)).collect();
    assert_eq!(listed, expected);

    // Each row has its creation time and its alarm.
    let page = get_json(admin, "/api/objects?namespace=kv&limit=1000");
    assert_eq!(page["more"], false);
    for object in page["objects"].as_array().unwrap() {
        assert_eq!(object["created_ms"], 1_700_000_000_000u64);
        let alarm = if object["name"] == "plain" {
            json!(ALARM_MS)
        } else {
            Value::Null
        };
        assert_eq!(object["alarm_ms"], alarm, "{object}");
    }
    // No objects: an empty page; the default page is 100.
    let empty = get_json(admin, "/api/objects?namespace=counter");
    assert_eq!(empty, json!({ "objects": [], "more": false, "next": null }));

    // Each object is found by its name, however odd, and by its ID.
    for (name, id) in &ids {
        let by_name = get_json(
            admin,
            &format!("/api/object?namespace=kv&name={}", enc(name)),
        );
        assert_eq!(by_name["id"], id.as_str());
        assert_eq!(by_name["name"], name.as_str());
        let by_id = get_json(admin, &format!("/api/object?namespace=kv&id={id}"));
        assert_eq!(by_id["name"], name.as_str());
        if name != "plain" {
            let entries =
                json!([{ "key": "k", "encoding": "raw", "bytes": name.len(), "value": name }]);
            assert_eq!(by_id["entries"], entries);
        }
    }
}

#[test]
fn the_api_shows_an_objects_keys_and_values_as_stored_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), false, None);
    let admin = served.admin.unwrap();
    import(served.addr, dir.path(), "kv", &[rich_seed()]);

    let object = get_json(admin, "/api/object?namespace=kv&name=plain");
    assert_eq!(object["alarm_ms"], ALARM_MS);
    assert_eq!(object["created_ms"], 1_700_000_000_000u64);
    assert_eq!(object["more"], false);
    assert_eq!(object["next"], Value::Null);
    let typed = json!({ "n": 42, "list": [1, "two", null], "nested": { "ok": true } });
    let typed_bytes = STANDARD.decode(cbor_b64(&typed)).unwrap().len();
    // In key byte order: the key that is not UTF-8 (0xff 0xfe) last, as base64.
    assert_eq!(
        object["entries"],
        json!([
            { "key": "bin", "encoding": "raw", "bytes": 3, "value_b64": "/wCA" },
            { "key": "text", "encoding": "raw", "bytes": 15, "value": "hello, \"world\"\n" },
            { "key": "typed", "encoding": "cbor", "bytes": typed_bytes, "value": typed },
            { "key_b64": "//4=", "encoding": "raw", "bytes": 18, "value": "under a binary key" },
        ])
    );

    // A prefix of any bytes: percent-encoded, or base64.
    let keys = |path: &str| -> Vec<Value> {
        let page = get_json(admin, path);
        page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.get("key").or(e.get("key_b64")).unwrap().clone())
            .collect()
    };
    let base = "/api/object?namespace=kv&name=plain";
    assert_eq!(keys(&format!("{base}&prefix=t")), ["text", "typed"]);
    assert_eq!(keys(&format!("{base}&prefix=%FF")), ["//4="]);
    assert_eq!(keys(&format!("{base}&prefix_b64=%2F%2F4%3D")), ["//4="]);
    assert_eq!(keys(&format!("{base}&prefix=nothing")), Vec::<Value>::new());

    // One key a page: each page's cursor leads to the next, to the end.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10 {
        let page = get_json(admin, &format!("{base}&limit=1{cursor}"));
        let entry = &page["entries"][0];
        seen.push(entry.get("key").or(entry.get("key_b64")).unwrap().clone());
        if page["more"] == false {
            break;
        }
        let next = page["next_b64"].as_str().unwrap();
        cursor = format!("&start_after_b64={}", enc(next));
    }
    assert_eq!(seen, ["bin", "text", "typed", "//4="]);
    // A text cursor works as well, and `next` is the last key when it is text.
    let page = get_json(admin, &format!("{base}&limit=2"));
    assert_eq!(page["next"], "text");
    let rest = get_json(admin, &format!("{base}&start_after=text"));
    assert_eq!(rest["entries"][0]["key"], "typed");
}

#[test]
fn bad_parameters_are_400_and_unknown_things_404_with_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), false, None);
    let admin = served.admin.unwrap();
    let ids = import(served.addr, dir.path(), "kv", &[rich_seed()]);
    let id = &ids[0].1;
    let zeros = "0".repeat(64);

    let bad = [
        ("/api/objects", "namespace"),
        ("/api/objects?namespace=kv&after=xyz", "after"),
        ("/api/objects?namespace=kv&limit=0", "limit"),
        ("/api/objects?namespace=kv&limit=1001", "limit"),
        ("/api/objects?namespace=kv&limit=many", "limit"),
        ("/api/objects?namespace=kv&limit=1&limit=2", "twice"),
        ("/api/objects?namespace=kv&colour=red", "colour"),
        ("/api/namespaces?x=1", "x"),
        ("/api/object?namespace=kv", "id"),
        (
            &format!("/api/object?namespace=kv&id={id}&name=plain"),
            "not both",
        ),
        ("/api/object?namespace=kv&id=12", "id"),
        (&format!("/api/object?namespace=kv&id={zeros}"), "id"),
        (
            &format!("/api/object?namespace=kv&id={id}&limit=1001"),
            "limit",
        ),
        (
            &format!("/api/object?namespace=kv&id={id}&prefix=a&prefix_b64=YQ=="),
            "prefix",
        ),
        (
            &format!("/api/object?namespace=kv&id={id}&start_after_b64=%21"),
            "base64",
        ),
        ("/api/object?namespace=kv&name=%FF", "UTF-8"),
    ];
    for (path, named) in bad {
        let message = get(admin, path).error(400);
        assert!(
            message.contains(named),
            "GET {path}: {message:?} names no {named:?}"
        );
    }

    let not_found = [
        "/api/objects?namespace=nope",
        "/api/object?namespace=nope&name=x",
        "/api/object?namespace=kv&name=never-used",
        "/api/object?namespace=counter&name=plain",
        "/api/nothing",
    ];
    for path in not_found {
        get(admin, path).error(404);
    }
    assert_eq!(get(admin, "/nothing").status, 404);

    for path in ["/api/namespaces", "/"] {
        let answer = request(admin, "POST", path, None);
        assert_eq!(answer.status, 405, "POST {path}");
        assert!(answer.head.contains("allow: get, head"), "{}", answer.head);
    }
}

#[test]
fn the_page_is_served_whole_from_the_binary_and_the_api_behind_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let data = dir.path().join("data");
    let served = serve(&data, false, Some(&token_file));
    let admin = served.admin.unwrap();

    // The page's files, without the token: they hold no data.
    let files = [
        ("/", "text/html; charset=utf-8"),
        ("/console.js", "text/javascript; charset=utf-8"),
        ("/console.css", "text/css; charset=utf-8"),
    ];
    for (path, content_type) in files {
        let answer = get(admin, path);
        assert_eq!(answer.status, 200, "{path}");
        assert!(
            answer
                .head
                .contains(&format!("content-type: {content_type}")),
            "{}",
            answer.head
        );
        assert!(
            answer.head.contains("cache-control: no-cache"),
            "{}",
            answer.head
        );
        // Nothing is fetched from elsewhere: many operators have no internet.
        for outside in ["http://", "https://", "//cdn", "@import"] {
            assert!(!answer.body.contains(outside), "{path} refers to {outside}");
        }
    }
    let page = get(admin, "/").body;
    assert!(page.contains("console.js") && page.contains("console.css"));

    // Everything else needs the token.
    for path in [
        "/api/namespaces",
        "/api/objects?namespace=kv",
        "/metrics",
        "/nothing",
    ] {
        let answer = request(admin, "GET", path, None);
        assert_eq!(answer.status, 401, "{path}");
        assert!(
            answer.head.contains("www-authenticate: bearer"),
            "{}",
            answer.head
        );
        assert_eq!(
            request(admin, "GET", path, Some("wrong")).status,
            401,
            "{path}"
        );
    }
    let answer = request(admin, "GET", "/api/namespaces", Some("s3cret"));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json().as_array().unwrap().len(), 6);
    let answer = request(admin, "GET", "/api/objects?namespace=kv", Some("s3cret"));
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// A page of the object registry is a range read from its cursor: its cost does not grow
/// with the namespace (no count, no scan), so paging a million objects costs per page what
/// paging these few thousand does. What a test can check is that paging reaches the end,
/// every object once, in order, at the largest page and at the default one.
#[test]
fn a_few_thousand_objects_page_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), false, None);
    let admin = served.admin.unwrap();
    let count = 3_000;
    let seeds: Vec<Seed> = (0..count)
        .map(|i| Seed {
            name: format!("object {i}"),
            alarm_ms: None,
            keys: text_key("v"),
        })
        .collect();
    let mut ids: Vec<String> = import(served.addr, dir.path(), "kv", &seeds)
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    ids.sort();

    for (limit, pages) in [(1000, 3), (100, 30), (7, 429)] {
        let started = Instant::now();
        let (listed, listed_pages) = all_objects(admin, "kv", limit);
        assert_eq!(listed_pages, pages, "pages of {limit}");
        let listed: Vec<String> = listed.into_iter().map(|(id, _)| id).collect();
        assert_eq!(listed, ids, "pages of {limit}");
        eprintln!(
            "{count} objects in pages of {limit}: {:?}",
            started.elapsed()
        );
    }
    let default = get_json(admin, "/api/objects?namespace=kv");
    assert_eq!(default["objects"].as_array().unwrap().len(), 100);
    assert_eq!(default["more"], true);
}

// --- In the browser ------------------------------------------------------------------------

/// The browser, or `None` with the reason the test `name` is skipped.
async fn browser(name: &str) -> Option<Browser> {
    let browser = Browser::launch().await;
    if browser.is_none() {
        eprintln!("SKIPPED {name}: no browser");
    }
    browser
}

/// Waits for `condition`, with what the page shows in the panic when it never holds.
async fn wait(page: &Page, condition: &str) {
    if let Err(why) = page.wait_for(condition, WAIT).await {
        let shown = page
            .try_eval("document.body.innerText")
            .await
            .unwrap_or_default();
        panic!("{why}\nthe page shows:\n{shown}");
    }
}

/// A JavaScript string literal of `text`.
fn js(text: &str) -> String {
    Value::from(text).to_string()
}

/// POSTs to `/counter/{name}/` on the gateway at `http` until `stop`, one call at a time;
/// counts the calls answered.
fn drive_counters(
    http: SocketAddr,
    names: Vec<String>,
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let name = &names[i % names.len()];
        let answer = request(http, "POST", &format!("/counter/{name}/"), None);
        assert_eq!(answer.status, 200, "{}", answer.body);
        calls.fetch_add(1, Ordering::Relaxed);
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pixels of `canvas` of exactly the color `rgb` and opaque: what a series drew, not
/// the grid or the text (drawn in grays).
fn pixels_of(canvas: &str, rgb: [u8; 3]) -> String {
    format!(
        "(() => {{ const c = document.getElementById({}); \
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
         let n = 0; for (let i = 0; i < d.length; i += 4) \
         if (d[i] === {} && d[i + 1] === {} && d[i + 2] === {} && d[i + 3] === 255) n++; \
         return n; }})()",
        js(canvas),
        rgb[0],
        rgb[1],
        rgb[2]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_lists_namespaces_objects_and_storage_and_charts_live_metrics() {
    let name = "the_page_lists_namespaces_objects_and_storage_and_charts_live_metrics";
    let Some(browser) = browser(name).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), true, None);
    let (admin, http) = (served.admin.unwrap(), served.http.unwrap());
    import(served.addr, dir.path(), "kv", &odd_seeds());
    // More than a page (100) of objects, and of keys.
    let many_objects: Vec<Seed> = (0..120)
        .map(|i| Seed {
            name: format!("room {i:03}"),
            alarm_ms: None,
            keys: text_key("v"),
        })
        .collect();
    import(served.addr, dir.path(), "room", &many_objects);
    let many_keys = Seed {
        name: "many".into(),
        alarm_ms: None,
        keys: (0..150)
            .map(|i| json!({ "key": format!("k{i:03}"), "text": "v" }))
            .collect(),
    };
    import(served.addr, dir.path(), "timer", &[many_keys]);

    // Calls all along, for the charts; two counters with names.
    let calls = Arc::new(AtomicU64::new(0));
    let driver = Driver::start(http, vec!["alpha".into(), "beta".into()], calls.clone());

    let page = browser.open(&format!("http://{admin}/")).await;
    page.wait_loaded().await.unwrap();

    // The namespaces, with their classes.
    wait(
        &page,
        "document.querySelectorAll('#namespaces tbody tr').length === 6",
    )
    .await;
    let classes = page
        .eval("[...document.querySelectorAll('#namespaces tbody tr')].map(r => r.innerText.split('\\t').join(' '))")
        .await;
    assert!(
        classes.as_array().unwrap().contains(&json!("kv kv")),
        "{classes}"
    );

    // A namespace's objects, with their names as given (as text, never as markup).
    page.eval("document.querySelector('a[data-namespace=\"kv\"]').click()")
        .await;
    wait(
        &page,
        "document.querySelectorAll('#objects tbody tr').length === 6",
    )
    .await;
    let names = page
        .eval("[...document.querySelectorAll('#objects td.name')].map(td => td.textContent).sort()")
        .await;
    let mut expected: Vec<&str> = ODD_NAMES.to_vec();
    expected.sort();
    assert_eq!(names, json!(expected));
    assert_eq!(
        page.eval("document.querySelectorAll('#objects b').length")
            .await,
        0
    );

    // An object's keys and values, and its alarm as a date.
    let open_plain = "[...document.querySelectorAll('#objects tbody tr')]\
        .find(r => r.querySelector('td.name').textContent === 'plain').querySelector('a').click()";
    page.eval(open_plain).await;
    wait(
        &page,
        "document.querySelectorAll('#entries tbody tr').length === 4",
    )
    .await;
    let keys = page
        .eval("[...document.querySelectorAll('#entries td.key')].map(td => td.textContent)")
        .await;
    assert_eq!(keys, json!(["bin", "text", "typed", "//4="]));
    let values = page
        .eval("[...document.querySelectorAll('#entries td.value')].map(td => td.textContent)")
        .await;
    assert_eq!(values[1], "hello, \"world\"\n");
    let typed: Value = serde_json::from_str(values[2].as_str().unwrap()).unwrap();
    assert_eq!(typed["n"], 42);
    assert_eq!(
        page.eval("document.getElementById('object-alarm').textContent")
            .await,
        "2100-01-01 00:00:00 UTC"
    );
    assert_eq!(
        page.eval("document.getElementById('object-name').textContent")
            .await,
        "plain"
    );

    // Pages of objects, and of keys, by cursor.
    page.eval("location.hash = '#/ns/room'").await;
    wait(
        &page,
        "document.querySelectorAll('#objects tbody tr').length === 100",
    )
    .await;
    page.eval("document.getElementById('next-page').click()")
        .await;
    wait(
        &page,
        "document.querySelectorAll('#objects tbody tr').length === 20",
    )
    .await;
    assert_eq!(
        page.eval("!!document.getElementById('next-page')").await,
        false
    );
    page.eval("location.hash = '#/ns/timer'").await;
    wait(
        &page,
        "document.querySelectorAll('#objects tbody tr a').length === 1",
    )
    .await;
    page.eval("document.querySelector('#objects tbody tr a').click()")
        .await;
    wait(
        &page,
        "document.querySelectorAll('#entries td.key').length === 100",
    )
    .await;
    page.eval("document.getElementById('next-keys').click()")
        .await;
    wait(
        &page,
        "document.querySelectorAll('#entries td.key').length === 50",
    )
    .await;
    let first = "document.querySelector('#entries td.key').textContent";
    assert_eq!(page.eval(first).await, "k100");
    assert_eq!(
        page.eval("!!document.getElementById('next-keys')").await,
        false
    );
    page.eval("document.getElementById('prefix').value = 'k14'; document.querySelector('#object form button').click()").await;
    wait(
        &page,
        "document.querySelectorAll('#entries td.key').length === 10",
    )
    .await;
    assert_eq!(page.eval(first).await, "k140");

    // The jump box finds an object by its name.
    page.eval("location.hash = '#/ns/counter'").await;
    wait(&page, "!!document.getElementById('jump')").await;
    page.eval("document.getElementById('jump').value = 'alpha'; document.querySelector('#jump-form button').click()").await;
    wait(
        &page,
        "document.querySelectorAll('#entries td.key').length === 1",
    )
    .await;
    assert_eq!(
        page.eval("document.querySelector('#entries td.key').textContent")
            .await,
        "value"
    );
    assert_eq!(
        page.eval("document.getElementById('object-name').textContent")
            .await,
        "alpha"
    );

    // The charts: calls per second measured from /metrics, and each series drawn.
    wait(&page, "duroConsole.series('calls').some(v => v > 0)").await;
    wait(&page, "duroConsole.series('commits').some(v => v > 0)").await;
    wait(&page, "duroConsole.series('objects').some(v => v >= 2)").await;
    wait(&page, "duroConsole.series('p99').some(v => v > 0)").await;
    for (canvas, rgb) in [
        ("chart-calls", [0x25, 0x63, 0xeb]),
        ("chart-latency", [0xdc, 0x26, 0x26]),
        ("chart-objects", [0x05, 0x96, 0x69]),
        ("chart-commits", [0xd9, 0x77, 0x06]),
    ] {
        wait(&page, &format!("{} > 10", pixels_of(canvas, rgb))).await;
    }
    driver.finish();
    assert!(calls.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_once_and_sends_it() {
    let name = "with_a_token_the_page_asks_for_it_once_and_sends_it";
    let Some(browser) = browser(name).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let served = serve(&dir.path().join("data"), false, Some(&token_file));
    let admin = served.admin.unwrap();

    let page = browser.open(&format!("http://{admin}/")).await;
    page.wait_loaded().await.unwrap();
    wait(&page, "!document.getElementById('login').hidden").await;
    assert_eq!(
        page.eval("document.querySelectorAll('#namespaces').length")
            .await,
        0
    );

    // A wrong token is refused and asked again.
    let sign_in = |token: &str| {
        format!(
            "document.getElementById('token').value = {}; \
             document.querySelector('#login button').click()",
            js(token)
        )
    };
    page.eval(&sign_in("wrong")).await;
    wait(
        &page,
        "document.getElementById('login-error').textContent.includes('refused')",
    )
    .await;
    assert_eq!(
        page.eval("sessionStorage.getItem('duro.token')").await,
        Value::Null
    );

    page.eval(&sign_in("s3cret")).await;
    wait(
        &page,
        "document.querySelectorAll('#namespaces tbody tr').length === 6",
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('login').hidden").await,
        true
    );
    assert_eq!(
        page.eval("sessionStorage.getItem('duro.token')").await,
        "s3cret"
    );
    // The metrics are read with it too.
    wait(&page, "duroConsole.series('objects').length >= 2").await;
}

/// The thread of [`drive_counters`]. Dropped (when a test fails early), it stops the calls
/// and waits for the thread, so that the server is not killed under a call in progress.
struct Driver {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Driver {
    fn start(http: SocketAddr, names: Vec<String>, calls: Arc<AtomicU64>) -> Driver {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || drive_counters(http, names, stop, calls))
        };
        Driver {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the calls; a panic if one of them failed.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("a thread");
        thread.join().expect("every call went through");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
