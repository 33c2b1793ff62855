//! Writes seed inputs for every target under the corpus dir given (default `corpus` beside this
//! crate's Cargo.toml): for `capnp_connection`, the bytes real client sessions send to the
//! server; for `capnp_message`, each message of those sessions alone, and framed HTTP requests;
//! for `kv_request` and `id_parse`, hand-written inputs. Fuzzing starts from real traffic
//! instead of searching for the framing from nothing.
//!
//!     cargo run --manifest-path tests/fuzz/Cargo.toml --bin seed_corpus

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use duro::duro_capnp::{host, namespace};
use duro::testing::fetch_call;
use duro_fuzz::{LocalHost, format_kv_input};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// A reader that keeps a copy of every byte read through it.
struct Recording<R> {
    inner: R,
    seen: Rc<RefCell<Vec<u8>>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Recording<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let fresh = buf.filled()[before..].to_vec();
        self.seen.borrow_mut().extend_from_slice(&fresh);
        poll
    }
}

type Session = fn(host::Client) -> futures::future::LocalBoxFuture<'static, ()>;

/// Runs `session` as a client of `host` over an in-memory pipe; the bytes the server read.
async fn record(host: &duro::Host, session: Session) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(1 << 20);
    let (server_reader, server_writer) = tokio::io::split(server);
    let seen = Rc::new(RefCell::new(Vec::new()));
    let reader = Recording {
        inner: server_reader,
        seen: seen.clone(),
    };
    let serve = duro::rpc::serve_connection(host, &Default::default(), reader, server_writer);
    let serve = tokio::task::spawn_local(serve);
    let (client_reader, client_writer) = tokio::io::split(client);
    let network = twoparty::VatNetwork::new(
        client_reader.compat(),
        client_writer.compat_write(),
        Side::Client,
        duro::wire::reader_options(),
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let bootstrap: host::Client = rpc.bootstrap(Side::Server);
    let rpc = tokio::task::spawn_local(rpc);
    session(bootstrap).await;
    rpc.abort();
    let _ = serve.await;
    seen.take()
}

fn ns(host: &host::Client, name: &str) -> namespace::Client {
    let mut call = host.namespace_request();
    call.get().set_name(name);
    call.send().pipeline.get_namespace()
}

async fn fetch_named(host: &host::Client, namespace: &str, name: &str, request: duro::Request) {
    let mut get = ns(host, namespace).get_by_name_request();
    get.get().set_name(name);
    let stub = get.send().pipeline.get_stub();
    let _ = fetch_call(&stub, &request).promise.await;
}

fn request(method: &str, url: &str, body: &[u8]) -> duro::Request {
    http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "text/plain")
        .header("x-repeated", "1")
        .header("x-repeated", "2")
        .body(bytes::Bytes::copy_from_slice(body))
        .expect("a valid request")
}

fn sessions() -> Vec<(&'static str, Session)> {
    vec![
        ("list_namespaces", |host| {
            Box::pin(async move {
                let _ = host.list_namespaces_request().send().promise.await;
            })
        }),
        ("echo", |host| {
            Box::pin(async move {
                let r = request("PUT", "/hello?x=1", b"body\x00\xff");
                fetch_named(&host, "echo", "a", r).await;
            })
        }),
        ("counter_twice", |host| {
            Box::pin(async move {
                let mut get = ns(&host, "counter").get_by_name_request();
                get.get().set_name("c");
                let stub = get.send().pipeline.get_stub();
                let first = fetch_call(&stub, &request("POST", "/", b"")).promise;
                let second = fetch_call(&stub, &request("GET", "/", b"")).promise;
                let _ = futures::join!(first, second);
            })
        }),
        ("kv", |host| {
            Box::pin(async move {
                for (method, url, body) in [
                    ("PUT", "/k/a%2Fb", &b"value"[..]),
                    ("GET", "/k/a/b", b""),
                    ("GET", "/list?prefix=a&limit=2&reverse=true&startAfter=%00", b""),
                    ("POST", "/txn", br#"{"if":[{"key":"a/b","equals":"value"}],"ops":[{"op":"put","key":"x","value":"y"},{"op":"get","key":"x"},{"op":"delete","key":"a/b"}]}"#),
                    ("DELETE", "/k/x", b""),
                ] {
                    fetch_named(&host, "kv", "store", request(method, url, body)).await;
                }
            })
        }),
        ("ids", |host| {
            Box::pin(async move {
                let echo = ns(&host, "echo");
                let unique = echo.new_unique_id_request().send().promise.await;
                let mut by_name = echo.id_from_name_request();
                by_name.get().set_name("named");
                let _ = by_name.send().promise.await;
                for text in [&"0".repeat(64)[..], "not hex", ""] {
                    let mut parse = echo.id_from_string_request();
                    parse.get().set_id(text);
                    let _ = parse.send().promise.await;
                }
                if let Ok(reply) = unique
                    && let Ok(id) = reply.get().and_then(|r| r.get_id())
                    && let Ok(bytes) = id.get_bytes()
                {
                    let mut get = echo.get_request();
                    get.get().init_id().set_bytes(bytes);
                    let stub = get.send().pipeline.get_stub();
                    let _ = fetch_call(&stub, &request("GET", "/", b"")).promise.await;
                }
                let mut list = echo.list_objects_request();
                list.get().set_limit(10);
                let _ = list.send().promise.await;
            })
        }),
        ("authenticate", |host| {
            Box::pin(async move {
                let mut call = host.authenticate_request();
                call.get().set_token("token");
                let again = call.send().pipeline.get_host();
                fetch_named(&again, "echo", "b", request("GET", "/", b"")).await;
            })
        }),
        ("unknown_namespace", |host| {
            Box::pin(async move {
                fetch_named(&host, "nope", "a", request("GET", "/", b"")).await;
            })
        }),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("creating a corpus dir");
    std::fs::write(dir.join(name), bytes).expect("writing a seed");
}

/// Each message of a recorded stream, on its own.
fn messages(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut rest = stream;
    let mut messages = Vec::new();
    while !rest.is_empty() {
        let before = rest.len();
        if capnp::serialize::read_message(&mut rest, duro::wire::reader_options()).is_err() {
            break;
        }
        let start = stream.len() - before;
        messages.push(stream[start..stream.len() - rest.len()].to_vec());
    }
    messages
}

fn main() {
    let corpus = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let local = LocalHost::open(duro::builtin::register(duro::Server::builder()));
    for (name, session) in sessions() {
        let stream = local.block_on(record(&local.host, session));
        write(&corpus.join("capnp_connection"), name, &stream);
        for (i, message) in messages(&stream).iter().enumerate() {
            write(
                &corpus.join("capnp_message"),
                &format!("{name}_{i}"),
                message,
            );
        }
    }
    let mut message = capnp::message::Builder::new_default();
    let r = request("PATCH", "http://h/p?q=1", b"\x00\x01");
    duro::wire::convert::request_to_capnp(&r, message.init_root());
    let mut framed = Vec::new();
    capnp::serialize::write_message(&mut framed, &message).expect("framing");
    write(&corpus.join("capnp_message"), "http_request", &framed);

    let kv = corpus.join("kv_request");
    let seeds: [(&str, Vec<(&str, &str, &[u8])>); 5] = [
        ("put_get", vec![("PUT", "/k/a", b"v"), ("GET", "/k/a", b"")]),
        (
            "list",
            vec![
                ("PUT", "/k/a%00", b"1"),
                ("PUT", "/k/b%FF", b"\xff"),
                ("GET", "/list?start=a&end=c&prefix=&reverse=true&limit=1", b""),
            ],
        ),
        (
            "txn",
            vec![(
                "POST",
                "/txn",
                br#"{"if":[{"key":"a","equals":null}],"ops":[{"op":"put","key":"a","value":"1"},{"op":"get","key":"a"},{"op":"delete","key":"a"}]}"#,
            )],
        ),
        ("delete", vec![("DELETE", "/k/a", b""), ("PATCH", "/k/a", b"")]),
        ("other", vec![("GET", "/nope", b""), ("POST", "/list", b"")]),
    ];
    for (name, requests) in seeds {
        write(&kv, name, &format_kv_input(&requests));
    }

    let ids = corpus.join("id_parse");
    let minter = duro::id::IdMinter::new("ns", &[7; 32]);
    write(&ids, "minted", minter.from_name("a").to_hex().as_bytes());
    write(
        &ids,
        "upper",
        minter.new_unique().to_hex().to_uppercase().as_bytes(),
    );
    write(&ids, "zeros", "0".repeat(64).as_bytes());
    write(&ids, "short", b"abc");
    println!("seeds written under {}", corpus.display());
}
