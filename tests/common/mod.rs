//! Helpers shared by the tests that run `duro serve` as a child process, and (in `browser`) the
//! headless browser of the tests that open duro's web pages.
#![allow(dead_code)] // Each test binary that includes this module uses a part of it.

pub mod browser;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// A `duro serve` child process, killed when dropped.
pub struct Served {
    pub child: Child,
    pub addr: SocketAddr,
    /// The HTTP gateway's address, when it was asked for.
    pub http: Option<SocketAddr>,
    /// The admin server's address, when it was asked for (`--admin ADDR`).
    pub admin: Option<SocketAddr>,
}

impl Drop for Served {
    /// A failing test must not leave its server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `duro serve` on 127.0.0.1 with a port of its own and the data dir `data`.
pub fn serve(data: &std::path::Path) -> Served {
    serve_with(data, &[])
}

/// `serve` with more flags. The gateway listens on a port of its own unless `flags` say where
/// (`--http ADDR`, or `--http off`); its address is read when it listens. The admin server is
/// off unless `flags` say where (`--admin ADDR`): tests run side by side, and its default
/// port is one for all.
pub fn serve_with(data: &std::path::Path, flags: &[&str]) -> Served {
    let http_flags: &[&str] = if flags.contains(&"--http") {
        &[]
    } else {
        &["--http", "127.0.0.1:0"]
    };
    let admin_flags: &[&str] = if flags.contains(&"--admin") {
        &[]
    } else {
        &["--admin", "off"]
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_duro"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(flags)
        .args(http_flags)
        .args(admin_flags)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting duro serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut read_addr = |prefix: &str| -> SocketAddr {
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("reading an address line");
        let addr = line.trim().strip_prefix(prefix);
        let addr = addr.unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"));
        addr.parse().expect("an address")
    };
    let addr = read_addr("duro listening on ");
    let http_off = flags.windows(2).any(|pair| pair == ["--http", "off"]);
    let http = (!http_off).then(|| read_addr("duro http gateway on "));
    let admin_on = flags.contains(&"--admin") && !flags.windows(2).any(|p| p == ["--admin", "off"]);
    let admin = admin_on.then(|| read_addr("duro admin on "));
    Served {
        child,
        addr,
        http,
        admin,
    }
}

/// The resident memory of a process, in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A loopback proxy that forwards client → server at once but holds server → client bytes
/// until `release` is sent: whatever the server does before releasing, the client asked for
/// without waiting for any answer.
pub async fn holding_proxy(target: SocketAddr) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(target).await.unwrap();
        let (mut client_r, mut client_w) = client.into_split();
        let (mut server_r, mut server_w) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
        });
        let _ = released.await;
        let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    });
    (addr, release)
}

/// A test PKI in PEM files: a CA of its own, and a server certificate it signed for
/// 127.0.0.1 and localhost with the certificate's key. Each call makes a new CA, so a second
/// one is a CA the first server's clients do not know.
pub struct TlsFiles {
    /// Holds the files; removed when dropped.
    pub dir: tempfile::TempDir,
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Makes a [`TlsFiles`].
pub fn tls_files() -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "duro test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        dir,
    };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

impl TlsFiles {
    /// The paths as `&str`, for command lines.
    pub fn ca_str(&self) -> &str {
        self.ca.to_str().unwrap()
    }

    pub fn cert_str(&self) -> &str {
        self.cert.to_str().unwrap()
    }

    pub fn key_str(&self) -> &str {
        self.key.to_str().unwrap()
    }
}
