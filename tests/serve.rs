//! `duro serve` as a developer starts it: what it prints, and the HTTP gateway it serves by
//! default.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

/// `duro serve` on a port of its own and a temporary data dir, with `flags`; killed when dropped.
struct Serve {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    _dir: tempfile::TempDir,
}

impl Serve {
    fn start(flags: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_duro"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path())
            .args(flags)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting duro serve");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Serve {
            child,
            stdout,
            _dir: dir,
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    /// Stops the server with SIGTERM and returns the rest of its stdout and all its stderr.
    fn stop(mut self) -> (String, String) {
        let pid = self.child.id() as libc::pid_t;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let mut stderr = String::new();
        let mut pipe = self.child.stderr.take().unwrap();
        pipe.read_to_string(&mut stderr).unwrap();
        assert!(self.child.wait().unwrap().success(), "{stderr}");
        (rest, stderr)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `POST path` over HTTP/1.1 to `addr`; the whole answer.
fn post(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// `GET path` over HTTP/1.1 to `addr`; the whole answer.
fn get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

// The only test here that takes the default ports (7451, 7452): the others turn both off.
#[test]
fn with_no_flags_the_gateway_listens_on_7451_the_admin_server_on_7452_each_said_once() {
    let mut serve = Serve::start(&[]);
    assert!(serve.line().starts_with("duro listening on 127.0.0.1:"));
    assert_eq!(
        serve.line(),
        format!("duro http gateway on {}\n", duro::DEFAULT_HTTP)
    );
    assert_eq!(
        serve.line(),
        format!("duro admin on {}\n", duro::DEFAULT_ADMIN)
    );
    let answer = post(duro::DEFAULT_HTTP, "/counter/visits");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n1\n"), "{answer}");
    let metrics = get(duro::DEFAULT_ADMIN, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let call = r#"duro_calls_total{namespace="counter",method="fetch",outcome="ok"} 1"#;
    assert!(metrics.contains(call), "{metrics}");
    let (rest, stderr) = serve.stop();
    assert_eq!(rest, "", "nothing more on stdout");
    // The addresses are said on stdout only, not again in the log.
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(!stderr.contains("gateway on"), "{stderr}");
    assert!(!stderr.contains("admin on"), "{stderr}");
}

#[test]
fn http_off_and_admin_off_serve_no_gateway_and_no_admin_server() {
    let mut serve = Serve::start(&["--http", "off", "--admin", "off"]);
    assert!(serve.line().starts_with("duro listening on 127.0.0.1:"));
    let (rest, _) = serve.stop();
    assert_eq!(rest, "", "no gateway line, no admin line");
}

#[test]
fn a_bad_http_or_admin_address_is_refused_with_the_rule() {
    for flag in ["--http", "--admin"] {
        let output = Command::new(env!("CARGO_BIN_EXE_duro"))
            .args(["serve", flag, "nowhere"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("expected HOST:PORT or off"),
            "{flag}: {stderr}"
        );
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}
