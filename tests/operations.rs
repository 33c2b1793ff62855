//! The operator's commands against live hosts: `inspect`, `export`, `import`, `backup`; and
//! the `Admin` capability under them, through the Rust client.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use duro::client::Client;
use duro::client::admin::ReadOptions;
use duro::id::IdMinter;
use duro::storage::{Backend, LmdbBackend, LmdbOptions, ObjectKey};
use duro::testing::TestServer;
use duro::{BoxError, DurableObject, Request, Response, Server, State};

fn duro(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duro"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running duro")
}

fn at(addr: std::net::SocketAddr, args: &[&str]) -> Output {
    let connect = addr.to_string();
    let mut all = vec![args[0], "--connect", &connect];
    all.extend_from_slice(&args[1..]);
    duro(&all)
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}; stderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Exit status 2 (a refused argument) and stderr naming `what`.
fn refused(output: Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(what), "{what:?} not in: {stderr}");
}

/// Names that a shell, JSON or a line-based format could get wrong.
const UNUSUAL: &[&str] = &[
    "plain",
    "with space",
    "quote\" and \\ backslash",
    "new\nline\ttab",
    "ünïcødé 🦀",
    "",
];

fn fetch(addr: std::net::SocketAddr, args: &[&str]) -> String {
    ok(at(addr, &[&["fetch"], args].concat()))
}

/// The counter of `name` on the host, through the `counter` class's GET.
fn counter_value(addr: std::net::SocketAddr, target: &[&str]) -> String {
    let response = fetch(addr, &[&["counter"], target, &["/"]].concat());
    response
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

#[test]
fn an_export_imports_exactly_and_its_ids_keep_working() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = common::serve_with(dir_a.path(), &["--http", "off"]);
    let b = common::serve_with(dir_b.path(), &["--http", "off"]);
    for (i, name) in UNUSUAL.iter().enumerate() {
        for _ in 0..=i {
            fetch(a.addr, &["counter", name, "/increment", "-X", "POST"]);
        }
    }
    // An object reached by ID only: a user may have stored the ID anywhere.
    let unique = ok(at(a.addr, &["ids", "counter", "--unique"]));
    let unique = unique.trim();
    for _ in 0..7 {
        fetch(
            a.addr,
            &["counter", "--id", unique, "/increment", "-X", "POST"],
        );
    }
    fetch(
        a.addr,
        &["timer", "t", "/?at=4102444800000&tag=x", "-X", "POST"],
    );
    let export = ok(at(a.addr, &["export"]));
    assert!(export.contains(r#""alarm_ms":4102444800000"#), "{export}");
    let lines: Vec<&str> = export.lines().collect();
    assert_eq!(lines[0], r#"{"duro_export":1}"#);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(r#""name":"new\nline\ttab""#)),
        "{export}"
    );

    // Into another host: the same data, byte for byte, and the same IDs are valid there.
    let file = dir_a.path().join("export.jsonl");
    let file = file.to_str().unwrap();
    ok(at(a.addr, &["export", "--output", file]));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "an export holds secrets");
    assert_eq!(std::fs::read_to_string(file).unwrap(), export);
    refused(at(a.addr, &["export", "--output", file]), "File exists");
    ok(at(b.addr, &["import", "--input", file]));
    assert_eq!(ok(at(b.addr, &["export"])), export);
    assert_eq!(counter_value(b.addr, &["--id", unique]), "7");
    for (i, name) in UNUSUAL.iter().enumerate() {
        assert_eq!(
            counter_value(b.addr, &[name]),
            (i + 1).to_string(),
            "{name:?}"
        );
    }
    assert_eq!(
        ok(at(b.addr, &["ids", "counter", "--name", "plain"])),
        ok(at(a.addr, &["ids", "counter", "--name", "plain"])),
        "names derive the same IDs on both hosts"
    );

    // Again: every object is a conflict; nothing changes. With --overwrite it applies.
    fetch(b.addr, &["counter", "plain", "/increment", "-X", "POST"]);
    let before = ok(at(b.addr, &["export"]));
    refused(at(b.addr, &["import", "--input", file]), "already has data");
    assert_eq!(ok(at(b.addr, &["export"])), before);
    ok(at(b.addr, &["import", "--input", file, "--overwrite"]));
    assert_eq!(ok(at(b.addr, &["export"])), export);
    assert_eq!(counter_value(b.addr, &["plain"]), "1");

    // Bad input changes nothing and names its line.
    let broken = format!("{}\n{{\"key\":\"x\"\n", lines[..3].join("\n"));
    let broken_file = dir_a.path().join("broken.jsonl");
    std::fs::write(&broken_file, broken).unwrap();
    let broken_file = broken_file.to_str().unwrap();
    refused(
        at(b.addr, &["import", "--overwrite", "-i", broken_file]),
        "line 4",
    );
    assert_eq!(ok(at(b.addr, &["export"])), export);
    refused(
        at(b.addr, &["import", "-i", "/nonexistent/file"]),
        "/nonexistent/file",
    );
    refused(
        at(b.addr, &["export", "nosuch"]),
        "unknown namespace \"nosuch\"",
    );
}

#[test]
fn a_namespace_with_objects_keeps_its_secret() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = common::serve_with(dir_a.path(), &["--http", "off"]);
    let b = common::serve_with(dir_b.path(), &["--http", "off"]);
    fetch(a.addr, &["counter", "x", "/increment", "-X", "POST"]);
    fetch(b.addr, &["counter", "y", "/increment", "-X", "POST"]);
    let export = ok(at(a.addr, &["export", "counter"]));
    let file = dir_a.path().join("a.jsonl");
    std::fs::write(&file, &export).unwrap();
    let before = ok(at(b.addr, &["export"]));
    let file = file.to_str().unwrap();
    refused(
        at(b.addr, &["import", "--overwrite", "-i", file]),
        "another secret",
    );
    assert_eq!(ok(at(b.addr, &["export"])), before);
}

#[test]
fn inspect_shows_keys_values_and_alarms_and_refuses_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let served = common::serve_with(dir.path(), &["--http", "off"]);
    for name in UNUSUAL {
        fetch(served.addr, &["counter", name, "/increment", "-X", "POST"]);
    }
    for name in UNUSUAL {
        let shown = ok(at(served.addr, &["inspect", "counter", name]));
        assert_eq!(shown, "\"value\" = 1\n", "{name:?}");
        let json: serde_json::Value = serde_json::from_str(&ok(at(
            served.addr,
            &["inspect", "counter", name, "--json"],
        )))
        .unwrap();
        // An empty name is no name.
        let expected = Some(*name).filter(|n| !n.is_empty());
        assert_eq!(json["name"], serde_json::json!(expected));
        assert_eq!(json["more"], false);
        assert_eq!(
            json["entries"],
            serde_json::json!([{"key": "value", "encoding": "cbor", "value": 1}])
        );
    }
    // An object with no data: an empty list, not an error.
    let empty = ok(at(
        served.addr,
        &["inspect", "counter", "never-written", "--json"],
    ));
    let empty: serde_json::Value = serde_json::from_str(&empty).unwrap();
    assert_eq!(empty["entries"], serde_json::json!([]));
    assert_eq!(empty["alarm_ms"], serde_json::Value::Null);
    // An alarm shows (the timer class sets one), with the keys that hold the timers.
    fetch(
        served.addr,
        &["timer", "t", "/?at=4102444800000&tag=x", "-X", "POST"],
    );
    let timer = ok(at(
        served.addr,
        &["inspect", "timer", "t", "--prefix", "p/"],
    ));
    assert_eq!(
        timer,
        "alarm 2100-01-01T00:00:00.000Z (4102444800000)\n\"p/00000004102444800000/x\" = \"x\"\n"
    );
    let ids = ok(at(served.addr, &["ids", "counter", "--name", "plain"]));
    let by_id = ok(at(served.addr, &["inspect", "counter", "--id", ids.trim()]));
    assert_eq!(by_id, "\"value\" = 1\n");

    refused(at(served.addr, &["inspect", "counter"]), "NAME or its --id");
    refused(at(served.addr, &["inspect", "nosuch", "x"]), "nosuch");
    refused(
        at(served.addr, &["inspect", "counter", "--id", "zz"]),
        "must be 64 hex digits",
    );
    let forged = "ab".repeat(32);
    refused(
        at(served.addr, &["inspect", "counter", "--id", &forged]),
        "counter",
    );
    let usage = at(served.addr, &["inspect", "counter", "x", "--limit", "many"]);
    assert_eq!(usage.status.code(), Some(2));
}

/// Writes an export of one object with `keys` keys into `host` by import, as a user would
/// bring in a big object, and returns its ID.
fn import_big_object(addr: std::net::SocketAddr, dir: &Path, keys: usize) -> String {
    let secret_line = ok(at(addr, &["export", "kv"]));
    let secret_line = secret_line.lines().nth(1).unwrap().to_owned();
    let id = ok(at(addr, &["ids", "kv", "--name", "big"]))
        .trim()
        .to_owned();
    let mut text = format!("{{\"duro_export\":1}}\n{secret_line}\n");
    text.push_str(&format!(
        "{{\"object\":\"{id}\",\"created_ms\":1,\"name\":\"big\"}}\n"
    ));
    for i in 0..keys {
        text.push_str(&format!("{{\"key\":\"k{i:06}\",\"text\":\"value {i}\"}}\n"));
    }
    let file = dir.join("big.jsonl");
    std::fs::write(&file, text).unwrap();
    ok(at(addr, &["import", "-i", file.to_str().unwrap()]));
    id
}

#[test]
fn an_object_of_100_000_keys_is_read_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let served = common::serve_with(dir.path(), &["--http", "off"]);
    let keys = 100_000;
    import_big_object(served.addr, dir.path(), keys);
    let all = ok(at(served.addr, &["inspect", "kv", "big", "--json"]));
    let all: serde_json::Value = serde_json::from_str(&all).unwrap();
    let entries = all["entries"].as_array().unwrap();
    assert_eq!(entries.len(), keys);
    assert_eq!(entries[0]["key"], "k000000");
    assert_eq!(entries[keys - 1]["value"], format!("value {}", keys - 1));
    assert!(
        entries
            .windows(2)
            .all(|w| w[0]["key"].as_str() < w[1]["key"].as_str())
    );

    let some = at(
        served.addr,
        &["inspect", "kv", "big", "--prefix", "k0999", "--limit", "3"],
    );
    let stderr = String::from_utf8_lossy(&some.stderr).into_owned();
    assert_eq!(
        ok(some),
        "\"k099900\" = \"value 99900\"\n\"k099901\" = \"value 99901\"\n\"k099902\" = \"value 99902\"\n"
    );
    assert!(stderr.contains("--start-after 'k099902'"), "{stderr}");
    let next = ok(at(
        served.addr,
        &[
            "inspect",
            "kv",
            "big",
            "--prefix",
            "k0999",
            "--start-after",
            "k099997",
        ],
    ));
    assert_eq!(
        next,
        "\"k099998\" = \"value 99998\"\n\"k099999\" = \"value 99999\"\n"
    );
    let from = ok(at(
        served.addr,
        &["inspect", "kv", "big", "--start", "k099999"],
    ));
    assert_eq!(from, "\"k099999\" = \"value 99999\"\n");

    // The host answers pages, never the whole object.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = Client::connect(served.addr).await.unwrap();
        let id = client.namespace("kv").id_from_name("big").await.unwrap();
        let admin = client.admin();
        let page = admin
            .read_storage("kv", &id, ReadOptions::default())
            .await
            .unwrap();
        assert_eq!((page.entries.len(), page.more), (100, true));
        let most = ReadOptions {
            limit: 1000,
            ..ReadOptions::default()
        };
        assert_eq!(
            admin
                .read_storage("kv", &id, most)
                .await
                .unwrap()
                .entries
                .len(),
            1000
        );
        let too_many = ReadOptions {
            limit: 1001,
            ..ReadOptions::default()
        };
        let error = admin.read_storage("kv", &id, too_many).await.unwrap_err();
        assert!(matches!(error, duro::Error::InvalidArgument(_)), "{error}");
    });
}

/// Counts activations, and increments two keys in one turn: a copy taken at one moment has
/// them equal.
struct Pair {
    state: State,
}

static PAIRS_BUILT: AtomicUsize = AtomicUsize::new(0);

impl DurableObject for Pair {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        let a: u64 = storage.get("a").await?.unwrap_or(0);
        let b: u64 = storage.get("b").await?.unwrap_or(0);
        storage.put_many(&[("a", a + 1), ("b", b + 1)]).await?;
        Ok(Response::new((a + 1).to_string().into()))
    }
}

fn pair_server(dir: tempfile::TempDir) -> TestServer {
    let builder = Server::builder()
        .class("pair", |state, _env| {
            PAIRS_BUILT.fetch_add(1, Ordering::SeqCst);
            Pair { state }
        })
        .namespace("pair", "pair");
    TestServer::start_in(builder, dir)
}

/// The counters of the copy in `dir`, read by the engine: (a, b) per object.
fn copied_pairs(dir: &Path, objects: usize) -> Vec<(u64, u64)> {
    let backend = LmdbBackend::open(dir, &LmdbOptions::default()).unwrap();
    let record = backend.namespace("pair").unwrap();
    let minter = IdMinter::new("pair", &record.secret);
    (0..objects)
        .map(|i| {
            let id = minter.from_name(&format!("p{i}"));
            let object = ObjectKey {
                tag: record.tag,
                id: *id.bytes(),
            };
            let read = |key: &[u8]| {
                backend
                    .get(&object, key)
                    .unwrap()
                    .map_or(0, |v| duro::storage::value::decode::<u64>(&v).unwrap())
            };
            (read(b"a"), read(b"b"))
        })
        .collect()
}

#[test]
fn a_backup_under_load_is_the_state_at_one_moment() {
    const OBJECTS: usize = 16;
    let server = pair_server(tempfile::tempdir().unwrap());
    if std::env::var("DURO_TEST_STORE").is_ok_and(|url| !url.is_empty()) {
        // A PostgreSQL store has no copy of duro's own: it says which tools to use instead.
        let refusal = tokio::runtime::Runtime::new().unwrap().block_on(async {
            let client = Client::connect(server.addr()).await.unwrap();
            let mut chunks = client.admin().backup();
            chunks.next().await.unwrap_err()
        });
        assert!(refusal.to_string().contains("pg_dump"), "{refusal}");
        return;
    }
    let addr = server.addr();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let copy = tempfile::tempdir().unwrap();
    let (before, after) = runtime.block_on(async {
        let client = Client::connect(addr).await.unwrap();
        let acked: Arc<Vec<AtomicU64>> =
            Arc::new((0..OBJECTS).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut writers = Vec::new();
        for i in 0..OBJECTS {
            let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let stub = client.namespace("pair").get_by_name(&format!("p{i}"));
                // Bounded: by the stop flag, a deadline and a count.
                for _ in 0..100_000 {
                    if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        break;
                    }
                    let response = stub.call("POST", "/", "").await.unwrap();
                    let value: u64 = std::str::from_utf8(response.body())
                        .unwrap()
                        .parse()
                        .unwrap();
                    acked[i].store(value, Ordering::SeqCst);
                }
            }));
        }
        // Let the load build, then copy while it runs.
        while acked.iter().map(|a| a.load(Ordering::SeqCst)).sum::<u64>() < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let mut chunks = client.admin().backup();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await.unwrap() {
            bytes.extend_from_slice(&chunk);
        }
        let after: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        stop.store(true, Ordering::SeqCst);
        for writer in writers {
            writer.await.unwrap();
        }
        std::fs::write(copy.path().join("data.mdb"), bytes).unwrap();
        (before, after)
    });
    let copied = copied_pairs(copy.path(), OBJECTS);
    for (i, &(a, b)) in copied.iter().enumerate() {
        assert_eq!(a, b, "object {i}: a two-key write is whole");
        assert!(
            before[i] <= a && a <= after[i],
            "object {i}: {} <= {a} <= {}",
            before[i],
            after[i]
        );
    }
    assert!(
        after.iter().zip(&before).any(|(a, b)| a > b),
        "the load ran during the copy"
    );

    // The copy serves: `duro serve --data DIR`.
    let restored = pair_server(copy);
    runtime.block_on(async {
        let client = Client::connect(restored.addr()).await.unwrap();
        let stub = client.namespace("pair").get_by_name("p0");
        let response = stub.call("POST", "/", "").await.unwrap();
        assert_eq!(
            response.body().as_ref(),
            (copied[0].0 + 1).to_string().as_bytes()
        );
    });
}

#[test]
fn reading_storage_never_activates_the_object() {
    let server = pair_server(tempfile::tempdir().unwrap());
    let addr = server.addr();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(addr).await.unwrap();
        let stub = client.namespace("pair").get_by_name("quiet");
        stub.call("POST", "/", "").await.unwrap();
    });
    // A fresh host on the same data: no instance of "quiet" yet.
    let server = pair_server(server.stop());
    let built = PAIRS_BUILT.load(Ordering::SeqCst);
    runtime.block_on(async {
        let client = Client::connect(server.addr()).await.unwrap();
        let id = client
            .namespace("pair")
            .id_from_name("quiet")
            .await
            .unwrap();
        let page = client
            .admin()
            .read_storage("pair", &id, ReadOptions::default())
            .await
            .unwrap();
        let keys: Vec<&[u8]> = page.entries.iter().map(|(k, _, _)| k.as_slice()).collect();
        assert_eq!(keys, [b"a", b"b"]);
    });
    assert_eq!(
        PAIRS_BUILT.load(Ordering::SeqCst),
        built,
        "no instance was built"
    );
}

#[test]
fn backup_commands_write_a_servable_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let served = common::serve_with(dir.path(), &["--http", "off"]);
    fetch(
        served.addr,
        &["counter", "saved", "/increment", "-X", "POST"],
    );
    let copies = tempfile::tempdir().unwrap();
    let online = copies.path().join("online");
    ok(at(served.addr, &["backup", online.to_str().unwrap()]));
    refused(
        at(served.addr, &["backup", online.to_str().unwrap()]),
        "not empty",
    );
    let offline = copies.path().join("offline");
    let source = dir.path().to_str().unwrap();
    refused(
        duro(&[
            "backup",
            "--offline",
            "--data",
            source,
            offline.to_str().unwrap(),
        ]),
        "in use",
    );
    drop(served);
    ok(duro(&[
        "backup",
        "--offline",
        "--data",
        source,
        offline.to_str().unwrap(),
    ]));
    refused(
        duro(&[
            "backup",
            "--offline",
            "--data",
            "/nonexistent",
            copies.path().join("x").to_str().unwrap(),
        ]),
        "not a data dir",
    );
    for copy in [online, offline] {
        let served = common::serve_with(&copy, &["--http", "off"]);
        assert_eq!(counter_value(served.addr, &["saved"]), "1");
    }
}

/// A page of big values ends at 4 MiB (the host's bound), not at the keys asked for, and says
/// more follow; an export or backup past the 4 running per shard is refused with `overloaded`.
#[test]
fn pages_and_dumps_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let served = common::serve_with(dir.path(), &["--http", "off", "--shards", "1"]);
    let secret_line = ok(at(served.addr, &["export", "kv"]));
    let secret_line = secret_line.lines().nth(1).unwrap().to_owned();
    let id = ok(at(served.addr, &["ids", "kv", "--name", "wide"]))
        .trim()
        .to_owned();
    let mut text = format!("{{\"duro_export\":1}}\n{secret_line}\n");
    text.push_str(&format!(
        "{{\"object\":\"{id}\",\"created_ms\":1,\"name\":\"wide\"}}\n"
    ));
    let value = "v".repeat(32 * 1024);
    for i in 0..300 {
        text.push_str(&format!("{{\"key\":\"k{i:03}\",\"text\":\"{value}\"}}\n"));
    }
    let file = dir.path().join("wide.jsonl");
    std::fs::write(&file, text).unwrap();
    ok(at(served.addr, &["import", "-i", file.to_str().unwrap()]));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(served.addr).await.unwrap();
        let id = client.namespace("kv").id_from_name("wide").await.unwrap();
        let most = ReadOptions {
            limit: 1000,
            ..ReadOptions::default()
        };
        let page = client.admin().read_storage("kv", &id, most).await.unwrap();
        let bytes: usize = page.entries.iter().map(|(k, v, _)| k.len() + v.len()).sum();
        assert!(page.more, "300 keys of 32 KiB do not fit one page");
        assert!(
            page.entries.len() < 300 && bytes <= 4 << 20 && bytes > 3 << 20,
            "{bytes}"
        );

        // Four exports held unread keep their snapshots (and threads); a fifth is refused.
        let admin = client.admin();
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut chunks = admin.export(&[]);
            assert!(chunks.next().await.unwrap().is_some());
            held.push(chunks);
        }
        let error = admin.export(&[]).next().await.unwrap_err();
        assert!(matches!(error, duro::Error::Overloaded(_)), "{error}");
        let error = admin.backup().next().await.unwrap_err();
        assert!(matches!(error, duro::Error::Overloaded(_)), "{error}");
        // Released, they make room again.
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match admin.export(&["kv".to_string()]).next().await {
                Ok(Some(_)) => break,
                Err(duro::Error::Overloaded(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("{other:?}"),
            }
        }
    });
}
