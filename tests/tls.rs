//! TLS on the Cap'n Proto listener and the HTTP gateway: the Rust client, the harness's client,
//! the `duro` command and a raw HTTPS request get through with the right CA and are refused
//! with another; a plain-TCP client to a TLS listener fails without harming the others; a
//! bad PEM file stops the server from starting, naming the file.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use common::{TlsFiles, tls_files};
use duro::client::{Client, ClientTls};
use duro::testing::{TestServer, fetch_by_name, run_local};
use duro::{Error, ListenAddr, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a test waits for a call that must fail rather than hang.
const FAIL_WITHIN: Duration = Duration::from_secs(5);

fn tls_server(files: &TlsFiles) -> TestServer {
    let builder = duro::builtin::register(Server::builder())
        .http("127.0.0.1:0".parse().unwrap())
        .tls_pem(&files.cert, &files.key);
    TestServer::start(builder)
}

fn trusting(files: &TlsFiles) -> ClientTls {
    ClientTls::with_ca_pem(&files.ca).unwrap()
}

#[tokio::test]
async fn the_rust_client_fetches_over_tls() {
    let files = tls_files();
    let server = tls_server(&files);
    let client = Client::connect_tls(server.addr(), trusting(&files))
        .await
        .unwrap();
    let counter = client.namespace("counter").get_by_name("a");
    for expected in ["1\n", "2\n"] {
        let response = counter.call("POST", "/", "").await.unwrap();
        assert_eq!(response.body().as_ref(), expected.as_bytes());
    }
    // The certificate is for localhost too.
    let by_name = trusting(&files).server_name("localhost").unwrap();
    let client = Client::connect_tls(server.addr(), by_name).await.unwrap();
    let namespaces = client.list_namespaces().await.unwrap();
    assert!(namespaces.iter().any(|ns| ns.name == "counter"));
}

#[test]
fn the_harness_client_fetches_over_tls() {
    let files = tls_files();
    let server = tls_server(&files);
    run_local(async {
        let host = duro::testing::connect_tls(server.addr(), &trusting(&files))
            .await
            .unwrap();
        let response = fetch_by_name(&host, "counter", "a", "POST", "/", b"").await;
        assert_eq!(response.unwrap().body().as_ref(), b"1\n");
    });
}

/// Connecting with `tls` fails with `Disconnected`; its message.
async fn refused(addr: SocketAddr, tls: ClientTls) -> String {
    match Client::connect_tls(addr, tls).await {
        Err(Error::Disconnected(message)) => message,
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

#[tokio::test]
async fn a_certificate_the_client_does_not_trust_is_refused() {
    let files = tls_files();
    let server = tls_server(&files);
    let other_ca = tls_files();
    let message = refused(server.addr(), trusting(&other_ca)).await;
    assert!(message.contains("certificate"), "{message}");
    // Mozilla's roots do not know the test CA either.
    let message = refused(server.addr(), ClientTls::new()).await;
    assert!(message.contains("certificate"), "{message}");
    // The right CA, but a name the certificate is not for.
    let elsewhere = trusting(&files).server_name("duro.example").unwrap();
    let message = refused(server.addr(), elsewhere).await;
    assert!(message.contains("certificate"), "{message}");
    // The server is unharmed.
    let client = Client::connect_tls(server.addr(), trusting(&files))
        .await
        .unwrap();
    client.list_namespaces().await.unwrap();
}

#[tokio::test]
async fn a_plain_client_to_the_tls_listener_fails_and_harms_no_other() {
    let files = tls_files();
    let server = tls_server(&files);
    let client = Client::connect_tls(server.addr(), trusting(&files))
        .await
        .unwrap();
    let counter = client.namespace("counter").get_by_name("a");
    assert_eq!(counter.call("POST", "/", "").await.unwrap().body(), "1\n");
    // A client that connects and never speaks holds a slot until the handshake timeout, and
    // blocks nobody meanwhile.
    let silent = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let plain = async {
        let plain = Client::connect(server.addr()).await?;
        plain.list_namespaces().await
    };
    let outcome = tokio::time::timeout(FAIL_WITHIN, plain).await;
    assert!(
        matches!(outcome, Ok(Err(Error::Disconnected(_)))),
        "a plain client to a TLS listener: {outcome:?}"
    );
    assert_eq!(counter.call("POST", "/", "").await.unwrap().body(), "2\n");
    let again = Client::connect_tls(server.addr(), trusting(&files))
        .await
        .unwrap();
    let counter = again.namespace("counter").get_by_name("a");
    assert_eq!(counter.call("POST", "/", "").await.unwrap().body(), "3\n");
    drop(silent);
}

/// Sends `request` over a TLS connection to `addr` and reads until the server closes.
async fn https(addr: SocketAddr, tls: &ClientTls, request: &str) -> String {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = tls.connect(addr.ip(), stream).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn the_gateway_serves_https() {
    let files = tls_files();
    let server = tls_server(&files);
    let http = server.http_addr().unwrap();
    let post =
        "POST /counter/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let response = https(http, &trusting(&files), post).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("\r\n\r\n1\n"), "{response}");
    // Plain HTTP gets no answer, only a closed connection, and harms nobody.
    let mut plain = tokio::net::TcpStream::connect(http).await.unwrap();
    plain.write_all(post.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(FAIL_WITHIN, plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a plain request to the HTTPS gateway hangs");
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    let response = https(http, &trusting(&files), post).await;
    assert!(response.ends_with("\r\n\r\n2\n"), "{response}");
    // A client that does not trust the certificate gets no further than the handshake.
    let stream = tokio::net::TcpStream::connect(http).await.unwrap();
    let error = trusting(&tls_files())
        .connect(http.ip(), stream)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("certificate"), "{error}");
}

fn duro(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duro"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("running duro")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn the_command_serves_and_fetches_over_tls() {
    let files = tls_files();
    let data = tempfile::tempdir().unwrap();
    let flags = ["--tls-cert", files.cert_str(), "--tls-key", files.key_str()];
    let served = common::serve_with(data.path(), &flags);
    let addr = served.addr.to_string();
    let fetch = |tls: &[&str]| {
        let connect = ["fetch", "--connect", &addr];
        duro(&[&connect[..], tls, &["counter", "a", "-X", "POST"]].concat())
    };
    let output = fetch(&["--tls", "--tls-ca", files.ca_str()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).ends_with("\r\n\r\n1\n"),
        "{}",
        stdout(&output)
    );
    // --tls-ca alone implies --tls, and the server name may be given.
    let output = fetch(&["--tls-ca", files.ca_str(), "--tls-server-name", "localhost"]);
    assert!(
        stdout(&output).ends_with("\r\n\r\n2\n"),
        "{}",
        stderr(&output)
    );
    // Without TLS, or trusting another CA, the command fails as for an unreachable host.
    let output = fetch(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let other_ca = tls_files();
    let output = fetch(&["--tls-ca", other_ca.ca_str()]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(
        stderr(&output).contains("certificate"),
        "{}",
        stderr(&output)
    );
    // A CA file that cannot be read is a refused argument, named.
    let output = fetch(&["--tls-ca", "/nonexistent/ca.pem"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stderr(&output).contains("/nonexistent/ca.pem"),
        "{}",
        stderr(&output)
    );
    // The gateway of `duro serve` speaks HTTPS too.
    let get = "GET /counter/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let response = https(served.http.unwrap(), &trusting(&files), get).await;
    assert!(response.ends_with("\r\n\r\n2\n"), "{response}");
}

/// Starting with the certificate `cert` and the key `key` fails; the error's message.
fn start_error(cert: &std::path::Path, key: &std::path::Path) -> String {
    let data = tempfile::tempdir().unwrap();
    let started = duro::builtin::register(Server::builder())
        .data_dir(data.path())
        .listen("127.0.0.1:0".parse().unwrap())
        .tls_pem(cert, key)
        .start();
    match started {
        Ok(_) => panic!("started with the certificate {cert:?} and the key {key:?}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_bad_pem_file_fails_the_start_naming_the_file() {
    let files = tls_files();
    let missing = files.dir.path().join("missing.pem");
    let message = start_error(&missing, &files.key);
    assert!(message.contains("missing.pem"), "{message}");
    let message = start_error(&files.cert, &missing);
    assert!(message.contains("missing.pem"), "{message}");
    // A key file that holds a certificate, and a certificate file that holds a key.
    let message = start_error(&files.cert, &files.cert);
    assert!(message.contains("no PEM private key"), "{message}");
    assert!(message.contains("cert.pem"), "{message}");
    let message = start_error(&files.key, &files.key);
    assert!(message.contains("no PEM certificate"), "{message}");
    assert!(message.contains("key.pem"), "{message}");
    // A key that is not the certificate's.
    let other = tls_files();
    let message = start_error(&files.cert, &other.key);
    assert!(message.contains("cannot be used together"), "{message}");
}

#[test]
fn a_unix_socket_stays_plain_under_tls() {
    let files = tls_files();
    let dir = tempfile::tempdir().unwrap();
    let socket = ListenAddr::Unix(dir.path().join("duro.sock"));
    let server = duro::builtin::register(Server::builder())
        .data_dir(dir.path().join("data"))
        .listen(socket.clone())
        .tls_pem(&files.cert, &files.key)
        .start()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(&socket).await.unwrap();
        client.list_namespaces().await.unwrap();
        let tls = Client::connect_tls(&socket, trusting(&files)).await;
        assert!(matches!(tls, Err(Error::InvalidArgument(_))), "{tls:?}");
    });
    server.shutdown();
}

#[allow(dead_code)] // its `main` is for `cargo run --example client`
#[path = "../examples/client.rs"]
mod example;

#[tokio::test]
async fn the_rust_example_counts_over_tls() {
    let files = tls_files();
    let server = tls_server(&files);
    let addr = server.addr().to_string();
    let client = example::connect(&addr, Some(&files.ca)).await.unwrap();
    assert_eq!(example::increment(&client, "visits").await.unwrap(), 1);
    assert_eq!(example::increment(&client, "visits").await.unwrap(), 2);
}
