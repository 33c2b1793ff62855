//! examples/client.py, the pycapnp client, against a live server: the wire contract works for a
//! client written against schema/duro.capnp alone; and examples/typed_client.py, which calls a
//! class's own interface (examples/typed_counter.capnp) on a stub.
//!
//! Needs `python3` with pycapnp (`pip install pycapnp`). Without it the test is skipped with a
//! message, unless `DURO_REQUIRE_PYTHON=1` (as in CI), which makes it fail instead.

mod common;
#[allow(dead_code)] // The class alone; its Rust client is tested in tests/examples.rs.
#[path = "../examples/typed_counter.rs"]
mod typed_counter;
// The generated code of the typed counter's schema names its types from the crate's root.
use typed_counter::typed_counter_capnp;

use std::process::Command;

use duro::testing::TestServer;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/client.py");

/// Whether `python3` can import pycapnp; why not, when it cannot.
fn pycapnp() -> Result<(), String> {
    let output = Command::new("python3")
        .args(["-c", "import capnp"])
        .output()
        .map_err(|e| format!("python3 cannot be run: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "python3 cannot import pycapnp: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Runs the example; its stdout, or a panic with its stderr.
fn run_example(server: &TestServer, name: &str) -> String {
    run_example_with(server, &[], name)
}

/// [`run_example`] with `flags` before the address.
fn run_example_with(server: &TestServer, flags: &[&str], name: &str) -> String {
    let output = Command::new("python3")
        .arg(SCRIPT)
        .args(flags)
        .arg(server.addr().to_string())
        .arg(name)
        .output()
        .expect("running python3");
    assert!(
        output.status.success(),
        "examples/client.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Whether the test `name` can run; says why not when it is skipped, and fails instead when
/// `DURO_REQUIRE_PYTHON=1`.
fn python_ready(name: &str) -> bool {
    let Err(why) = pycapnp() else {
        return true;
    };
    if std::env::var("DURO_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("DURO_REQUIRE_PYTHON=1 but {why}; install it with: pip install pycapnp");
    }
    eprintln!("SKIPPED {name}: {why}");
    eprintln!("(pip install pycapnp to run it; DURO_REQUIRE_PYTHON=1 makes this a failure)");
    false
}

#[test]
fn the_python_example_increments_the_counter() {
    if !python_ready("the_python_example_increments_the_counter") {
        return;
    }
    let server = TestServer::start(duro::builtin::register(duro::Server::builder()));
    assert_eq!(run_example(&server, "py"), "1\n");
    assert_eq!(run_example(&server, "py"), "2\n");
    assert_eq!(run_example(&server, "other"), "1\n");
    // A refused call exits non-zero and says why.
    let long_name = "x".repeat(2000);
    let output = Command::new("python3")
        .args([SCRIPT, &server.addr().to_string(), &long_name])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("name_bytes_max"), "{stderr}");
}

#[test]
fn the_python_example_talks_tls() {
    if !python_ready("the_python_example_talks_tls") {
        return;
    }
    let files = common::tls_files();
    let builder = duro::builtin::register(duro::Server::builder());
    let server = TestServer::start(builder.tls_pem(&files.cert, &files.key));
    let trusting = ["--tls-ca", files.ca_str()];
    assert_eq!(run_example_with(&server, &trusting, "py"), "1\n");
    assert_eq!(run_example_with(&server, &trusting, "py"), "2\n");
    // Another CA, or no TLS: refused, said on stderr, and the server serves on.
    let other = common::tls_files();
    let refusals = [
        (
            &["--tls-ca", other.ca_str()][..],
            "CERTIFICATE_VERIFY_FAILED",
        ),
        (&[][..], "DISCONNECTED"),
    ];
    for (flags, said) in refusals {
        let output = Command::new("python3")
            .arg(SCRIPT)
            .args(flags)
            .args([&server.addr().to_string(), "py"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{flags:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(said), "{flags:?}: {stderr}");
    }
    assert_eq!(run_example_with(&server, &trusting, "py"), "3\n");
}

const WS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ws_client.py");

/// A chat room: accepts WebSockets on any path and sends every message to every socket, the
/// sender's too, as the built-in `room` class does.
struct Chat {
    state: duro::State,
}

impl duro::DurableObject for Chat {
    async fn fetch_stream(
        &self,
        request: duro::StreamRequest,
    ) -> Result<duro::StreamResponse, duro::BoxError> {
        self.state.accept_web_socket(&request, &[])?;
        Ok(duro::response::switching_protocols())
    }

    async fn web_socket_message(
        &self,
        _socket: duro::WebSocket,
        message: duro::WebSocketMessage,
    ) -> Result<(), duro::BoxError> {
        for socket in self.state.get_web_sockets(None) {
            socket.send(message.clone())?;
        }
        Ok(())
    }
}

/// Runs examples/ws_client.py against `addr` with `args`; its stdout, or a panic with its
/// stderr.
fn run_ws_client(addr: std::net::SocketAddr, args: &[&str]) -> String {
    let output = Command::new("python3")
        .arg(WS_SCRIPT)
        .arg(addr.to_string())
        .args(args)
        .output()
        .expect("running python3");
    assert!(
        output.status.success(),
        "examples/ws_client.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Checks what ws_client.py printed for `sockets` sockets that sent `texts` into a room:
/// each socket received every text in order, then the close that answered its own.
fn assert_broadcast(output: &str, sockets: usize, texts: &[&str]) {
    for socket in 0..sockets {
        let prefix = format!("{socket} ");
        let lines: Vec<&str> = output
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .collect();
        let mut expected: Vec<&str> = texts.to_vec();
        expected.push("closed 1000 bye");
        assert_eq!(lines, expected, "socket {socket} in:\n{output}");
    }
}

#[test]
fn the_python_websocket_client_talks_to_an_object_over_capnp() {
    if !python_ready("the_python_websocket_client_talks_to_an_object_over_capnp") {
        return;
    }
    let builder = duro::Server::builder()
        .class("chat", |state, _env| Chat { state })
        .namespace("chat", "chat");
    let server = TestServer::start(builder);
    let texts = ["one", "two", "three"];
    let mut args = vec!["--namespace", "chat", "--name", "lobby", "--path", "/"];
    args.extend(texts);
    assert_broadcast(&run_ws_client(server.addr(), &args), 2, &texts);
}

/// The example as its docs show it: against `duro serve` and its built-in `room` class, whose
/// posts are JSON (`{"seq", "text", "at"}`) that the example prints by their text.
#[test]
fn the_python_websocket_client_talks_to_the_built_in_room() {
    if !python_ready("the_python_websocket_client_talks_to_the_built_in_room") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let served = common::serve_with(data.path(), &["--http", "off"]);
    let texts = ["hello", "world"];
    let mut args = vec!["--name", "python-test"];
    args.extend(texts);
    assert_broadcast(&run_ws_client(served.addr, &args), 2, &texts);
}

const TYPED_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/typed_client.py");

/// Runs examples/typed_client.py against `server` with `args`: its status and its output
/// (stdout when it succeeded, stderr when not).
fn run_typed_client(server: &TestServer, args: &[&str]) -> (bool, String) {
    let output = Command::new("python3")
        .arg(TYPED_SCRIPT)
        .arg(server.addr().to_string())
        .args(args)
        .output()
        .expect("running python3");
    let text = if output.status.success() {
        output.stdout
    } else {
        output.stderr
    };
    (output.status.success(), String::from_utf8(text).unwrap())
}

#[test]
fn the_python_typed_client_calls_the_counters_own_interface() {
    if !python_ready("the_python_typed_client_calls_the_counters_own_interface") {
        return;
    }
    let builder = typed_counter::register(duro::Server::builder())
        .class("chat", |state, _env| Chat { state })
        .namespace("chat", "chat");
    let server = TestServer::start(builder);
    let typed = |args: &[&str]| run_typed_client(&server, args);
    assert_eq!(typed(&["py", "--by", "5"]), (true, "5\n".into()));
    assert_eq!(typed(&["py", "--by", "-2"]), (true, "3\n".into()));
    // The same object answers fetch, and saw both increments.
    duro::testing::run_local(async {
        let host = server.connect().await;
        let response = duro::testing::fetch_by_name(&host, "counter", "py", "GET", "/", b"");
        assert_eq!(response.await.unwrap().body().as_ref(), b"3\n");
    });
    // An overflow is the object's error; a class that exports no interface answers
    // `unimplemented`.
    let max = i64::MAX.to_string();
    let (ok, said) = typed(&["py", "--by", &max]);
    assert!(
        !ok && said.contains("FAILED") && said.contains("overflow"),
        "{said}"
    );
    let (ok, said) = typed(&["py", "--namespace", "chat"]);
    assert!(!ok && said.contains("UNIMPLEMENTED"), "{said}");
}
