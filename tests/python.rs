//! examples/client.py, the pycapnp client, against a live server: the wire contract works for a
//! client written against schema/duro.capnp alone; examples/typed_client.py, which calls a
//! class's own interface (examples/typed_counter.capnp) on a stub. And the classes written in
//! Python,
//! examples/provider_counter.py and examples/provider_room.py, served by provider processes to
//! `duro serve --external`: through the gateway and capnp, across a restart of the host, and
//! when a provider is killed under load.
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

const COUNTER_PROVIDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/provider_counter.py");
const ROOM_PROVIDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/provider_room.py");

/// A provider process, killed (by its PID) when dropped.
struct PythonProvider {
    child: std::process::Child,
    /// Where its stderr goes, to show when it fails.
    log: tempfile::NamedTempFile,
}

impl PythonProvider {
    /// Starts `script` against the host at `addr` with `flags`, and waits until it registered
    /// (it says so on stdout).
    fn start(script: &str, addr: std::net::SocketAddr, flags: &[&str]) -> PythonProvider {
        use std::io::BufRead;
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new("python3")
            .arg(script)
            .arg(addr.to_string())
            .args(flags)
            .stdout(std::process::Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("running python3");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let provider = PythonProvider { child, log };
        assert!(
            line.starts_with("registered "),
            "{script} did not register: {line:?}\n{}",
            provider.stderr()
        );
        provider
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGKILL, by PID: the process dies without a word to the host.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for PythonProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `method path` with `body` over HTTP/1.1 to the gateway at `addr`, with `headers`; the
/// status and the body.
fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for header in headers {
        request.push_str(&format!("{header}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

/// The body of a counter's answer through capnp, as a number.
async fn capnp_count(host: &duro::duro_capnp::host::Client, name: &str, method: &str) -> u64 {
    let response = duro::testing::fetch_by_name(host, "counter_py", name, method, "/", b"")
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    std::str::from_utf8(response.body())
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_python_counter_counts_through_the_gateway_and_capnp_with_a_token() {
    if !python_ready("the_python_counter_counts_through_the_gateway_and_capnp_with_a_token") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let token = data.path().join("token");
    std::fs::write(&token, "open sesame\n").unwrap();
    let token = token.to_str().unwrap();
    let flags = ["--token-file", token, "--external", "counter_py=pycounter"];
    let served = common::serve_with(&data.path().join("data"), &flags);
    let _provider = PythonProvider::start(COUNTER_PROVIDER, served.addr, &["--token-file", token]);
    let http_addr = served.http.unwrap();
    let bearer = "authorization: Bearer open sesame";
    for expected in ["1\n", "2\n"] {
        let answer = http(http_addr, "POST", "/counter_py/visits/", &[bearer], "");
        assert_eq!(answer, (200, expected.to_owned()));
    }
    duro::testing::run_local(async {
        let guard = duro::testing::connect(served.addr).await.unwrap();
        let host = duro::testing::authenticate(&guard, "open sesame")
            .await
            .unwrap();
        assert_eq!(capnp_count(&host, "visits", "POST").await, 3);
        assert_eq!(capnp_count(&host, "visits", "GET").await, 3);
        assert_eq!(capnp_count(&host, "other", "POST").await, 1);
    });
    let answer = http(http_addr, "DELETE", "/counter_py/visits/", &[bearer], "");
    assert_eq!(answer, (200, "0\n".to_owned()));
    // Without the token, the provider cannot register.
    let output = Command::new("python3")
        .args([COUNTER_PROVIDER, &served.addr.to_string(), "--once"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unauthenticated"), "{stderr}");
}

#[test]
fn the_python_counter_keeps_its_value_across_a_restart_of_the_host() {
    if !python_ready("the_python_counter_keeps_its_value_across_a_restart_of_the_host") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let flags = ["--external", "counter_py=pycounter"];
    let served = common::serve_with(data.path(), &flags);
    let provider = PythonProvider::start(COUNTER_PROVIDER, served.addr, &[]);
    for _ in 0..3 {
        http(served.http.unwrap(), "POST", "/counter_py/kept/", &[], "");
    }
    // SIGKILL: what was acknowledged was durable before it was.
    drop(served);
    drop(provider);
    let served = common::serve_with(data.path(), &flags);
    let _provider = PythonProvider::start(COUNTER_PROVIDER, served.addr, &[]);
    let answer = http(served.http.unwrap(), "POST", "/counter_py/kept/", &[], "");
    assert_eq!(answer, (200, "4\n".to_owned()));
}

/// What one client of [`killing_the_python_provider_under_load_loses_nothing_acknowledged`]
/// saw: the values its increments were acknowledged with, and how many failed as the
/// provider went.
#[derive(Default, Debug)]
struct Seen {
    acknowledged: Vec<u64>,
    disconnected: usize,
    overloaded: usize,
}

/// POSTs to the counter `name` until `stop`, on one stub, getting a new stub when it breaks.
async fn increment_until(
    host: duro::duro_capnp::host::Client,
    name: String,
    stop: std::rc::Rc<std::cell::Cell<bool>>,
) -> Seen {
    let mut seen = Seen::default();
    while !stop.get() {
        let call = duro::testing::fetch_by_name(&host, "counter_py", &name, "POST", "/", b"");
        match call.await {
            Ok(response) => {
                let body = std::str::from_utf8(response.body()).unwrap();
                seen.acknowledged.push(body.trim().parse().unwrap());
            }
            Err(duro::Error::Disconnected(_)) => seen.disconnected += 1,
            Err(duro::Error::Overloaded(_)) => seen.overloaded += 1,
            Err(error) => panic!("{name}: {error}"),
        }
    }
    seen
}

#[test]
fn killing_the_python_provider_under_load_loses_nothing_acknowledged() {
    if !python_ready("killing_the_python_provider_under_load_loses_nothing_acknowledged") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let served = common::serve_with(data.path(), &["--external", "counter_py=pycounter"]);
    let first = PythonProvider::start(COUNTER_PROVIDER, served.addr, &[]);
    duro::testing::run_local(async {
        let host = duro::testing::connect(served.addr).await.unwrap();
        let stop = std::rc::Rc::new(std::cell::Cell::new(false));
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let load = increment_until(host.clone(), format!("c{i}"), stop.clone());
                tokio::task::spawn_local(load)
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        first.kill();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // A second provider takes over: the objects activate on it at their next `get`.
        let second = PythonProvider::start(COUNTER_PROVIDER, served.addr, &[]);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        stop.set(true);
        let mut lost = 0;
        for (i, client) in clients.into_iter().enumerate() {
            let seen = client.await.unwrap();
            lost += seen.disconnected;
            let acknowledged = &seen.acknowledged;
            assert!(acknowledged.len() > 2, "c{i}: {seen:?}");
            // Each acknowledged value is above the one before: nothing acknowledged was lost,
            // though a call that failed may have counted (its write was durable before the
            // provider died, its answer was not sent).
            assert!(
                acknowledged.windows(2).all(|w| w[0] < w[1]),
                "c{i}: {seen:?}"
            );
            let now = capnp_count(&host, &format!("c{i}"), "GET").await;
            assert_eq!(now, *acknowledged.last().unwrap(), "c{i}: {seen:?}");
        }
        assert!(lost > 0, "no call was in flight when the provider died");
        drop(second);
    });
}

#[test]
fn the_python_room_numbers_and_keeps_its_messages() {
    if !python_ready("the_python_room_numbers_and_keeps_its_messages") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let served = common::serve_with(data.path(), &["--external", "room_py=pyroom"]);
    let _provider = PythonProvider::start(ROOM_PROVIDER, served.addr, &[]);
    let http_addr = served.http.unwrap();
    for (i, text) in ["hello", "wide", "world"].iter().enumerate() {
        let (status, body) = http(http_addr, "POST", "/room_py/lobby/messages", &[], text);
        assert_eq!(status, 200, "{body}");
        let message: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(message["seq"], i + 1);
        assert_eq!(message["text"], *text);
    }
    let (_, body) = http(http_addr, "GET", "/room_py/lobby/messages?after=1", &[], "");
    let kept: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let texts: Vec<&str> = kept.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["wide", "world"]);
    let (status, _) = http(http_addr, "POST", "/room_py/lobby/messages", &[], "");
    assert_eq!(status, 400);
    // Another room is another object.
    let (_, body) = http(http_addr, "GET", "/room_py/other/messages", &[], "");
    assert_eq!(body.trim(), "[]");
}

type Member =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Joins the Python room `room` through the gateway at `addr`.
async fn join_room(addr: std::net::SocketAddr, room: &str) -> Member {
    let url = format!("ws://{addr}/room_py/{room}/ws");
    let (member, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    member
}

/// The next message of `member`, as JSON (a close frame or a silence of 10 s fails).
async fn heard(member: &mut Member) -> serde_json::Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), member.next());
        match next.await.expect("a message in time") {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(text.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

async fn say(member: &mut Member, text: &str) {
    use futures::SinkExt;
    let message = tokio_tungstenite::tungstenite::Message::text(text);
    member.send(message).await.unwrap();
}

#[test]
fn the_python_room_talks_over_web_sockets() {
    if !python_ready("the_python_room_talks_over_web_sockets") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let served = common::serve_with(data.path(), &["--external", "room_py=pyroom"]);
    let _provider = PythonProvider::start(ROOM_PROVIDER, served.addr, &[]);
    let http_addr = served.http.unwrap();
    duro::testing::run_local(async move {
        let mut ann = join_room(http_addr, "chat").await;
        let mut bob = join_room(http_addr, "chat").await;
        say(&mut ann, "hello bob").await;
        for member in [&mut ann, &mut bob] {
            let message = heard(member).await;
            assert_eq!(
                (message["seq"].as_u64(), message["text"].as_str()),
                (Some(1), Some("hello bob"))
            );
        }
        say(&mut bob, "hi ann").await;
        for member in [&mut ann, &mut bob] {
            let message = heard(member).await;
            assert_eq!(
                (message["seq"].as_u64(), message["text"].as_str()),
                (Some(2), Some("hi ann"))
            );
        }
        // A refused text: the sender alone hears why.
        say(&mut ann, "").await;
        assert!(heard(&mut ann).await["error"].is_string());
        // A post over HTTP reaches the members; a late joiner gets the history first.
        let (status, _) = http(http_addr, "POST", "/room_py/chat/messages", &[], "by http");
        assert_eq!(status, 200);
        for member in [&mut ann, &mut bob] {
            assert_eq!(heard(member).await["text"], "by http");
        }
        let mut cat = join_room(http_addr, "chat").await;
        for seq in 1..=3 {
            assert_eq!(heard(&mut cat).await["seq"], seq);
        }
        let (_, body) = http(http_addr, "GET", "/room_py/chat/messages", &[], "");
        let kept: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(kept.len(), 3);
    });
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
