//! Request IDs: the error a client gets for a failed call ends with the call's request ID,
//! over Cap'n Proto and through the gateway (`x-request-id`), and `duro serve --log-format
//! json` logs the failure as a JSON line carrying the same ID.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use duro::testing::{TestServer, connect, fetch_by_name, run_local};
use duro::{BoxError, DurableObject, Error, Request, Response, Server};

/// A class whose `/fail` returns an error; any other path answers `ok`.
struct Failing;

impl DurableObject for Failing {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        match request.uri().path() {
            "/fail" => Err("the object fails on purpose".into()),
            _ => Ok(Response::new("ok".into())),
        }
    }
}

fn failing() -> duro::Builder {
    Server::builder()
        .class("failing", |_, _| Failing)
        .namespace("failing", "failing")
}

/// The request ID at the end of an error message: `... (request id ID)`.
fn request_id(message: &str) -> String {
    let id = message
        .strip_suffix(')')
        .and_then(|rest| rest.rsplit_once("(request id "))
        .map(|(_, id)| id.to_owned());
    let id = id.unwrap_or_else(|| panic!("no request ID at the end of {message:?}"));
    assert_eq!(id.len(), 16, "{message}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{message}");
    id
}

#[test]
fn a_failed_call_names_its_request_id_and_each_call_has_its_own() {
    let server = TestServer::start(failing());
    run_local(async {
        let host = server.connect().await;
        let mut ids = Vec::new();
        for _ in 0..2 {
            let failed = fetch_by_name(&host, "failing", "a", "GET", "/fail", b"").await;
            let Err(Error::Remote(message)) = failed else {
                panic!("expected the object's error, got {failed:?}");
            };
            // The object's message comes first, as it was.
            assert!(message.starts_with("the object fails on purpose (request id "));
            ids.push(request_id(&message));
        }
        assert_ne!(ids[0], ids[1]);
        // A call that succeeds answers as before.
        let ok = fetch_by_name(&host, "failing", "a", "GET", "/", b"").await;
        assert_eq!(ok.unwrap().body().as_ref(), b"ok");
    });
}

#[test]
fn a_failed_request_through_the_gateway_carries_its_request_id() {
    let server = TestServer::start(failing().http("127.0.0.1:0".parse().unwrap()));
    let mut stream = std::net::TcpStream::connect(server.http_addr().unwrap()).unwrap();
    let head = "GET /failing/a/fail HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    let header = answer
        .lines()
        .find_map(|line| line.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no x-request-id in {answer}"));
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    assert_eq!(request_id(body.trim_end()), header);
}

#[test]
fn duro_serve_logs_a_failed_call_as_json_with_its_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_duro"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "off",
            "--admin",
            "off",
        ])
        .args(["--log-format", "json", "--data"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("duro listening on ").expect(&line);
    let addr = addr.parse().unwrap();
    let id = run_local(async move {
        let host = connect(addr).await.unwrap();
        // A request the host refuses (its method is not an HTTP method): a call that fails.
        let mut get = host.namespace_request();
        get.get().set_name("echo");
        let mut stub = get.send().pipeline.get_namespace().get_by_name_request();
        stub.get().set_name("a");
        let stub = stub.send().pipeline.get_stub();
        let mut call = stub.fetch_request();
        let mut request = call.get().init_request();
        request.set_method("NOT A METHOD");
        request.set_url("/");
        let failed = call.send().promise.await.map(|_| ()).map_err(Error::from);
        let Err(Error::InvalidArgument(message)) = failed else {
            panic!("expected a refused argument, got {failed:?}");
        };
        request_id(&message)
    });
    // SIGTERM: the server shuts down and its stderr ends.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    let logged = lines
        .iter()
        .find(|line| line["fields"]["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no line with request_id {id} in {stderr}"));
    assert_eq!(logged["level"], "INFO", "{logged}");
    assert_eq!(logged["fields"]["namespace"], "echo", "{logged}");
    assert_eq!(logged["fields"]["message"], "call failed", "{logged}");
}
