//! The admin server's `/metrics`: Prometheus text that a scraper can parse, whose counters move
//! by exactly what clients did (calls by namespace, method and outcome; activations; commits;
//! refusals; alarms; bytes), behind the server's token; through the library harness and
//! through `duro serve`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use duro::testing::{ManualClock, TestServer, fetch_by_name, run_local};
use duro::{
    AlarmInfo, BoxError, DurableObject, Error, HostLimits, Request, Response, Server, State,
};

/// Lets the probe's `/hold` calls return.
static RELEASE: LazyLock<tokio::sync::Notify> = LazyLock::new(tokio::sync::Notify::new);

/// A class whose calls do what their path says: `/fail` returns an error, `/put` writes a key,
/// `/alarm?MS` sets an alarm at MS, `/hold` waits for [`RELEASE`]; anything else answers `ok`.
struct Probe {
    state: State,
}

impl DurableObject for Probe {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        match request.uri().path() {
            "/fail" => return Err("the probe fails on purpose".into()),
            "/put" => storage.put("k", &1u64).await?,
            "/alarm" => {
                let at: u64 = request.uri().query().unwrap_or("0").parse()?;
                storage.set_alarm(at).await?;
            }
            "/hold" => RELEASE.notified().await,
            _ => {}
        }
        Ok(Response::new("ok".into()))
    }

    async fn alarm(&self, _: AlarmInfo) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The server's metrics, parsed: each sample (name and labels, in a canonical order) and its
/// value.
type Samples = BTreeMap<String, f64>;

/// Parses Prometheus / OpenMetrics text strictly: every line is a comment this format has
/// (`# TYPE`, `# HELP`, `# UNIT`, `# EOF` last), or a sample `name{label="value",...} number`
/// of a family whose `# TYPE` came before. Panics on anything else.
fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    let mut families: Vec<String> = Vec::new();
    let mut ended = false;
    for line in text.lines() {
        assert!(!ended, "a line after # EOF: {line:?}");
        if line == "# EOF" {
            ended = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap(), words.next().expect("a family name"));
            assert!(["TYPE", "HELP", "UNIT"].contains(&kind), "comment {line:?}");
            assert!(is_name(name), "family name in {line:?}");
            if kind == "TYPE" {
                let kinds = ["counter", "gauge", "histogram", "info", "unknown"];
                assert!(kinds.contains(&words.next().unwrap_or("")), "{line:?}");
                families.push(name.to_owned());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect(line))),
            None => (series, Vec::new()),
        };
        assert!(is_name(name), "sample name in {line:?}");
        let family = families
            .last()
            .unwrap_or_else(|| panic!("no # TYPE before {line:?}"));
        assert!(
            name.starts_with(family.as_str()),
            "{name} outside family {family}"
        );
        let mut labels = labels;
        labels.sort();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let key = format!("{name}{{{}}}", labels.join(","));
        assert!(
            samples.insert(key, value).is_none(),
            "repeated sample {line:?}"
        );
    }
    assert!(ended, "no # EOF at the end");
    samples
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `key="value",...` (values with `\"`, `\\`, `\n` escapes).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        assert!(is_name(key), "label name {key:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("a closing quote") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().expect("an escape").1 {
                    'n' => value.push('\n'),
                    c @ ('"' | '\\') => value.push(c),
                    c => panic!("escape \\{c}"),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    labels
}

/// A sample's value: `key` is `name{label=value,...}` with the labels in name order.
fn value(samples: &Samples, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} among {:#?}", samples.keys()))
}

/// `GET path` on `addr` with an optional bearer token: the status and the body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head[9..12].parse().expect("a status");
    (status, head.to_owned(), body.to_owned())
}

/// A `POST path` through the gateway at `addr`; the status.
fn post(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer[9..12].parse().unwrap()
}

fn scrape(addr: SocketAddr) -> Samples {
    let (status, head, body) = get(addr, "/metrics", None);
    assert_eq!(status, 200, "{head}");
    let content_type = "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8";
    assert!(head.to_lowercase().contains(content_type), "{head}");
    parse(&body)
}

fn calls(namespace: &str, method: &str, outcome: &str) -> String {
    format!("duro_calls_total{{method={method},namespace={namespace},outcome={outcome}}}")
}

fn probe_server(clock: &ManualClock) -> TestServer {
    let limits = HostLimits {
        object_queue_max: 1,
        ..HostLimits::default()
    };
    let builder = Server::builder()
        .class("probe", |state, _| Probe { state })
        .namespace("probe", "probe")
        .limits(limits)
        .clock(clock.shared())
        .http("127.0.0.1:0".parse().unwrap())
        .admin(Some("127.0.0.1:0".parse().unwrap()));
    TestServer::start(builder)
}

#[test]
fn the_counters_move_by_exactly_what_the_clients_did() {
    let clock = ManualClock::new(1_000_000);
    let server = probe_server(&clock);
    let admin = server.admin_addr().expect("the admin server is on");
    let http = server.http_addr().unwrap();
    let before = scrape(admin);
    assert_eq!(value(&before, &calls("probe", "fetch", "ok")), 0.0);
    let mut early = 0.0;
    run_local(async {
        let host = server.connect().await;
        for _ in 0..3 {
            fetch_by_name(&host, "probe", "a", "GET", "/", b"")
                .await
                .unwrap();
        }
        fetch_by_name(&host, "probe", "a", "PUT", "/put", b"")
            .await
            .unwrap();
        let failed = fetch_by_name(&host, "probe", "a", "GET", "/fail", b"").await;
        assert!(matches!(failed, Err(Error::Remote(_))), "{failed:?}");
        // The object takes one call at a time (object_queue_max 1): the second is refused
        // while the first holds it.
        let held = fetch_by_name(&host, "probe", "b", "GET", "/hold", b"");
        let mut held = std::pin::pin!(held);
        let mut refused = None;
        for _ in 0..200 {
            tokio::select! {
                answer = &mut held => panic!("the held call returned: {answer:?}"),
                answer = fetch_by_name(&host, "probe", "b", "GET", "/", b"") => match answer {
                    Err(Error::Overloaded(message)) => {
                        refused = Some(message);
                        break;
                    }
                    // It arrived before the hold did: the hold takes its turn after it.
                    answer => {
                        answer.unwrap();
                        early += 1.0;
                    }
                },
            }
        }
        assert!(refused.is_some(), "no call was refused");
        RELEASE.notify_one();
        held.await.unwrap();
        let at = 1_000_000 + 1000;
        fetch_by_name(&host, "probe", "c", "PUT", &format!("/alarm?{at}"), b"")
            .await
            .unwrap();
    });
    assert_eq!(post(http, "/probe/a/"), 200);
    clock.advance(1500);
    let alarm_ok = calls("probe", "alarm", "ok");
    let fired = "duro_alarms_fired_total{}";
    let mut after = scrape(admin);
    for _ in 0..500 {
        if value(&after, fired) == 1.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        after = scrape(admin);
    }
    let delta = |key: &str| value(&after, key) - before.get(key).copied().unwrap_or(0.0);
    assert_eq!(delta(&calls("probe", "fetch", "overloaded")), 1.0);
    let fetch_ok = delta(&calls("probe", "fetch", "ok"));
    // 3 GETs, the put, the alarm's set, the held call, the gateway's POST; and each
    // `/`-call that arrived before the hold did.
    assert_eq!(fetch_ok, 7.0 + early);
    assert_eq!(delta(&calls("probe", "fetch", "failed")), 1.0);
    assert_eq!(delta(&calls("probe", "fetch", "disconnected")), 0.0);
    assert_eq!(delta(&alarm_ok), 1.0);
    assert_eq!(delta(&calls("probe", "interface", "ok")), 0.0);
    let count = "duro_call_seconds_count{method=fetch,namespace=probe}";
    assert_eq!(delta(count), fetch_ok + 2.0);
    assert_eq!(delta("duro_activations_total{namespace=probe}"), 3.0);
    assert_eq!(delta("duro_objects_active{namespace=probe}"), 3.0);
    assert_eq!(delta("duro_overloaded_total{bound=object_queue}"), 1.0);
    assert_eq!(delta("duro_alarms_set_total{}"), 1.0);
    assert_eq!(delta(fired), 1.0);
    assert_eq!(delta("duro_alarms_late_seconds_count{}"), 1.0);
    // The put and the alarm (set, then deleted once fired) committed.
    assert!(delta("duro_storage_commits_total{}") >= 3.0);
    assert_eq!(
        delta("duro_storage_commits_total{}"),
        delta("duro_storage_commit_seconds_count{}")
    );
    assert!(delta("duro_storage_commit_bytes_sum{}") >= 1.0);
    // LMDB tells its sync apart: one per transaction.
    assert_eq!(
        delta("duro_storage_sync_seconds_count{}"),
        delta("duro_storage_commits_total{}")
    );
    assert!(delta("duro_received_bytes_total{transport=capnp}") > 0.0);
    assert!(delta("duro_sent_bytes_total{transport=capnp}") > 0.0);
    assert!(delta("duro_received_bytes_total{transport=http}") > 0.0);
    assert!(delta("duro_sent_bytes_total{transport=http}") > 0.0);
    // The buckets are cumulative and end with +Inf, which counts them all.
    let inf = "duro_call_seconds_bucket{le=+Inf,method=fetch,namespace=probe}";
    assert_eq!(value(&after, inf), value(&after, count));
}

#[test]
fn with_a_token_the_admin_server_answers_401_without_it() {
    let builder = duro::builtin::register(Server::builder())
        .token("s3cret")
        .admin(Some("127.0.0.1:0".parse().unwrap()));
    let server = TestServer::start(builder);
    let admin = server.admin_addr().unwrap();
    let (status, head, _) = get(admin, "/metrics", None);
    assert_eq!(status, 401);
    assert!(
        head.to_lowercase().contains("www-authenticate: bearer"),
        "{head}"
    );
    let (status, head, _) = get(admin, "/metrics", Some("wrong"));
    assert_eq!(status, 401);
    assert!(head.contains("invalid_token"), "{head}");
    let (status, _, body) = get(admin, "/metrics", Some("s3cret"));
    assert_eq!(status, 200);
    parse(&body);
    // Any other path is the console's, behind the same token.
    assert_eq!(get(admin, "/nothing-here", None).0, 401);
    assert_eq!(get(admin, "/nothing-here", Some("s3cret")).0, 404);
}

#[test]
fn the_library_serves_no_admin_server_unless_asked() {
    let server = TestServer::start(duro::builtin::register(Server::builder()));
    assert_eq!(server.admin_addr(), None);
}

#[test]
fn an_admin_address_taken_fails_the_start_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = duro::builtin::register(Server::builder())
        .data_dir(dir.path())
        .listen(duro::ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
        .admin(Some(addr))
        .start();
    let error = started.err().expect("the start fails").to_string();
    assert!(error.contains("admin"), "{error}");
    assert!(error.contains(&addr.to_string()), "{error}");
}

#[test]
fn duro_serve_counts_the_gateway_calls_on_its_admin_server() {
    let dir = tempfile::tempdir().unwrap();
    let served = common::serve_with(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = served.admin.expect("the admin line");
    let http = served.http.unwrap();
    let ok = calls("counter", "fetch", "ok");
    let before = value(&scrape(admin), &ok);
    for _ in 0..2 {
        assert_eq!(post(http, "/counter/visits/"), 200);
    }
    let after = scrape(admin);
    assert_eq!(value(&after, &ok) - before, 2.0);
    assert_eq!(
        value(&after, "duro_activations_total{namespace=counter}"),
        1.0
    );
    assert!(value(&after, "duro_storage_commits_total{}") >= 2.0);
}
