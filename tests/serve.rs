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

#[test]
fn with_no_http_flag_the_gateway_listens_on_7451_and_each_address_is_said_once() {
    let mut serve = Serve::start(&[]);
    assert!(serve.line().starts_with("duro listening on 127.0.0.1:"));
    assert_eq!(
        serve.line(),
        format!("duro http gateway on {}\n", duro::DEFAULT_HTTP)
    );
    let answer = post(duro::DEFAULT_HTTP, "/counter/visits");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n1\n"), "{answer}");
    let (rest, stderr) = serve.stop();
    assert_eq!(rest, "", "nothing more on stdout");
    // The addresses are said on stdout only, not again in the log.
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(!stderr.contains("gateway on"), "{stderr}");
}

#[test]
fn http_off_serves_no_gateway() {
    let mut serve = Serve::start(&["--http", "off"]);
    assert!(serve.line().starts_with("duro listening on 127.0.0.1:"));
    let (rest, _) = serve.stop();
    assert_eq!(rest, "", "no gateway line");
}

#[test]
fn a_bad_http_address_is_refused_with_the_rule() {
    let output = Command::new(env!("CARGO_BIN_EXE_duro"))
        .args(["serve", "--http", "nowhere"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("expected HOST:PORT or off"), "{stderr}");
}
