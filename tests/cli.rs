//! The client commands of the built `duro` binary against a live server: what they print and
//! how they exit.

use std::process::{Command, Output};

use duro::testing::TestServer;

fn server() -> TestServer {
    TestServer::start(duro::builtin::register(duro::Server::builder()))
}

/// Runs `duro COMMAND --connect ADDR ARGS...`.
fn duro(server: &TestServer, command: &str, args: &[&str]) -> Output {
    let addr = server.addr().to_string();
    run(command, &[&["--connect", &addr], args].concat())
}

fn run(command: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duro"))
        .arg(command)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("running duro")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Asserts the exit status, showing stderr when it differs.
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(output.status.code(), Some(code), "{}", stderr(output));
}

#[test]
fn fetch_prints_the_response_like_curl_i() {
    let server = server();
    let first = duro(&server, "fetch", &["counter", "visits", "-X", "POST"]);
    assert_exit(&first, 0);
    assert_eq!(
        stdout(&first),
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\n\r\n1\n"
    );
    let read = duro(&server, "fetch", &["counter", "visits"]);
    assert_exit(&read, 0);
    assert!(stdout(&read).ends_with("\r\n\r\n1\n"), "{}", stdout(&read));
}

#[test]
fn fetch_sends_method_path_headers_and_body() {
    let server = server();
    // -d alone means POST, as in curl.
    let output = duro(
        &server,
        "fetch",
        &[
            "echo", "e", "/p?q=1", "-d", "hi", "-H", "X-One: 1", "-H", "x-two:2",
        ],
    );
    assert_exit(&output, 0);
    let text = stdout(&output);
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let echoed: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["url"], "/p?q=1");
    assert_eq!(
        echoed["headers"],
        serde_json::json!([["x-one", "1"], ["x-two", "2"]])
    );
    assert_eq!(echoed["body_base64"], "aGk=");

    // -d @FILE sends the file's bytes as they are.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value.bin");
    std::fs::write(&file, b"\x00\xffbytes").unwrap();
    let data = format!("@{}", file.display());
    let put = duro(
        &server,
        "fetch",
        &["kv", "k", "/k/f", "-X", "PUT", "-d", &data],
    );
    assert_exit(&put, 0);
    assert!(stdout(&put).starts_with("HTTP/1.1 204 No Content\r\n"));
    let get = duro(&server, "fetch", &["kv", "k", "/k/f"]);
    assert_exit(&get, 0);
    assert!(get.stdout.ends_with(b"\r\n\r\n\x00\xffbytes"));
}

#[test]
fn an_http_error_status_still_exits_0() {
    let server = server();
    let missing = duro(&server, "fetch", &["kv", "k", "/k/missing"]);
    assert_exit(&missing, 0);
    assert!(stdout(&missing).starts_with("HTTP/1.1 404 Not Found\r\n"));
}

#[test]
fn fetch_by_id_reaches_the_object_of_the_name() {
    let server = server();
    let ids = duro(&server, "ids", &["counter", "--name", "visits"]);
    assert_exit(&ids, 0);
    let hex = stdout(&ids).trim_end().to_owned();
    assert_eq!(hex.len(), 64);
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(
        stdout(&duro(&server, "ids", &["counter", "--name", "visits"])),
        stdout(&ids),
        "the ID of a name is stable"
    );
    assert_exit(
        &duro(&server, "fetch", &["counter", "visits", "-X", "POST"]),
        0,
    );
    let by_id = duro(
        &server,
        "fetch",
        &["counter", "--id", &hex, "/", "-X", "POST"],
    );
    assert_exit(&by_id, 0);
    assert!(
        stdout(&by_id).ends_with("\r\n\r\n2\n"),
        "{}",
        stdout(&by_id)
    );
}

#[test]
fn unique_ids_differ() {
    let server = server();
    let a = duro(&server, "ids", &["counter", "--unique"]);
    let b = duro(&server, "ids", &["counter", "--unique"]);
    assert_exit(&a, 0);
    assert_exit(&b, 0);
    assert_eq!(stdout(&a).trim_end().len(), 64);
    assert_ne!(stdout(&a), stdout(&b));
    // One of the two is required, and only one.
    assert_exit(&duro(&server, "ids", &["counter"]), 2);
    assert_exit(
        &duro(&server, "ids", &["counter", "--unique", "--name", "x"]),
        2,
    );
}

#[test]
fn refused_arguments_exit_2_naming_the_rule() {
    let server = server();
    let cases: [(&[&str], &str); 6] = [
        (&["nope", "x"], "unknown namespace 'nope'"),
        (&["counter", "--id", "abc"], "must be 64 hex digits"),
        (&["counter", "--id", &"0".repeat(64)], "not minted"),
        (
            &["counter", "--id", &"0".repeat(64), "/", "extra"],
            "with --id, give no NAME",
        ),
        (
            &["counter", "x", "-H", "no colon"],
            "expected 'Name: value'",
        ),
        (
            &["counter", "x", "-d", "@/no/such/file"],
            "cannot read the body",
        ),
    ];
    for (args, rule) in cases {
        let output = duro(&server, "fetch", args);
        assert_exit(&output, 2);
        assert!(
            stderr(&output).contains(rule),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(output.stdout.is_empty());
    }
    let unknown = duro(&server, "ids", &["nope", "--unique"]);
    assert_exit(&unknown, 2);
    assert!(stderr(&unknown).contains("unknown namespace 'nope'"));
}

#[test]
fn an_unreachable_host_exits_1() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    for (command, args) in [
        ("fetch", &["counter", "x"][..]),
        ("ids", &["counter", "--unique"][..]),
        ("ls", &[][..]),
    ] {
        let output = run(command, &[&["--connect", &addr], args].concat());
        assert_exit(&output, 1);
        assert!(stderr(&output).contains("disconnected: connecting to"));
    }
}

#[test]
fn ls_lists_namespaces_with_their_classes() {
    let server = server();
    let output = duro(&server, "ls", &[]);
    assert_exit(&output, 0);
    assert_eq!(
        stdout(&output),
        "counter  counter\necho     echo\nkv       kv\nroom     room\ntally    tally\ntimer    timer\n"
    );
}

#[test]
fn ls_lists_objects_by_pages_and_says_how_to_get_the_next() {
    let server = server();
    let mut expected = Vec::new();
    for name in ["a", "b", "c"] {
        assert_exit(&duro(&server, "fetch", &["counter", name, "-X", "POST"]), 0);
        let hex = stdout(&duro(&server, "ids", &["counter", "--name", name]));
        expected.push(format!("{}  {name}", hex.trim_end()));
    }
    expected.sort();

    let first = duro(&server, "ls", &["counter", "--limit", "2"]);
    assert_exit(&first, 0);
    assert_eq!(stdout(&first), format!("{}\n", expected[..2].join("\n")));
    let last_hex = &expected[1][..64];
    let hint = stderr(&first);
    let suggested = format!("counter --limit 2 --start-after {last_hex}");
    assert!(hint.contains(&suggested), "{hint}");
    assert!(
        hint.contains(&format!("--connect {}", server.addr())),
        "{hint}"
    );

    let second = duro(
        &server,
        "ls",
        &["counter", "--limit", "2", "--start-after", last_hex],
    );
    assert_exit(&second, 0);
    assert_eq!(stdout(&second), format!("{}\n", expected[2]));
    assert_eq!(stderr(&second), "", "no next page");

    assert_exit(&duro(&server, "ls", &["counter", "--limit", "0"]), 2);
    assert_exit(&duro(&server, "ls", &["nope"]), 2);
}

#[test]
fn ls_shows_the_next_alarm_of_objects_that_have_one() {
    // On a manual clock, so the alarm's time is known: a kv key expiring in an hour.
    let clock = duro::testing::ManualClock::new(1_795_981_200_000); // 2026-11-29T19:40:00Z
    let builder = duro::builtin::register(duro::Server::builder()).clock(clock.shared());
    let server = TestServer::start(builder);
    let put = |name: &str, path: &str| {
        let output = duro(
            &server,
            "fetch",
            &["kv", name, path, "-X", "PUT", "-d", "v"],
        );
        assert_exit(&output, 0);
    };
    put("expiring", "/k/a?ttl=3600");
    put("plain", "/k/a");
    let hex = |name: &str| {
        let output = duro(&server, "ids", &["kv", "--name", name]);
        stdout(&output).trim_end().to_owned()
    };
    let mut expected = [
        format!(
            "{}  expiring  alarm 2026-11-29T20:40:00.000Z",
            hex("expiring")
        ),
        format!("{}  plain", hex("plain")),
    ];
    expected.sort();
    let output = duro(&server, "ls", &["kv"]);
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), format!("{}\n", expected.join("\n")));
}
