//! What a hostile client can make `duro serve` spend, against the real binary on loopback:
//! memory follows the bytes a client sent (not those it announced, not those it will not
//! read), slow senders are cut off, and a healthy client keeps being answered meanwhile.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use common::{Served, rss_kib, serve_with};
use duro::duro_capnp::{durable_object, host};
use duro::testing::{connect, fetch_by_name, fetch_call, request, run_local};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const MIB_IN_KIB: u64 = 1024;

/// Lets this process open as many sockets as its hard limit allows (the attacks open 1,000).
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the calls only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// The time of one durable increment by a healthy client.
async fn healthy_call(host: &host::Client) -> Duration {
    let started = Instant::now();
    fetch_by_name(host, "counter", "healthy", "POST", "/", b"")
        .await
        .expect("a healthy client's call");
    started.elapsed()
}

/// Calls of a healthy client during an attack: every one answers, and the median within
/// 100 ms (the slowest may meet a busy moment of this shared test machine).
async fn assert_healthy_calls_answer(host: &host::Client) {
    let mut times = Vec::new();
    for _ in 0..21 {
        times.push(healthy_call(host).await);
    }
    times.sort();
    assert!(
        times[10] <= Duration::from_millis(100),
        "a healthy client waited {:?} (median) during the attack; all: {times:?}",
        times[10]
    );
}

/// RSS once the server settled: sampled every 250 ms until it moved less than 1 MiB in a
/// second, for at most 30 s (a server that keeps growing is measured at its largest).
async fn settled_rss_kib(served: &Served) -> u64 {
    let mut samples = vec![rss_kib(served.child.id())];
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        samples.push(rss_kib(served.child.id()));
        if let [.., a, _, _, _, e] = samples[..]
            && a.abs_diff(e) < 1024
        {
            break;
        }
    }
    *samples.last().expect("a sample")
}

#[test]
fn announced_but_never_sent_costs_nothing() {
    raise_file_limit();
    let dir = tempfile::tempdir().unwrap();
    let served = serve_with(dir.path(), &["--http", "off"]);
    run_local(async {
        let host = connect(served.addr).await.unwrap();
        healthy_call(&host).await;
        let before = settled_rss_kib(&served).await;
        // 1,000 connections each announce a message of 1,000,000 words (8 MB, within
        // MESSAGE_BYTES_MAX), send 8 bytes of it, and stall.
        let mut stalled = Vec::new();
        for _ in 0..1000 {
            let mut stream = TcpStream::connect(served.addr).await.unwrap();
            let frame = [0, 0, 0, 0, 0x40, 0x42, 0x0f, 0, 1, 2, 3, 4, 5, 6, 7, 8];
            stream.write_all(&frame).await.unwrap();
            stalled.push(stream);
        }
        assert_healthy_calls_answer(&host).await;
        let during = settled_rss_kib(&served).await;
        let growth = during.saturating_sub(before);
        eprintln!("stalled announcements: RSS {before} KiB before, {during} KiB during");
        assert!(
            growth <= 128 * MIB_IN_KIB,
            "1,000 stalled announcements grew the server by {} MiB",
            growth / MIB_IN_KIB
        );
        drop(stalled);
        assert_healthy_calls_answer(&host).await;
        // The memory comes back, within a margin: the connections end and their memory is
        // free; the allocator (mimalloc, with its default purge delay) may keep some of its
        // pages for reuse rather than return them at once. A healthy client keeps calling
        // meanwhile. At most 20 s.
        let mut after = rss_kib(served.child.id());
        for _ in 0..80 {
            if after <= before + 32 * MIB_IN_KIB {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            healthy_call(&host).await;
            after = rss_kib(served.child.id());
        }
        eprintln!("stalled announcements: RSS {after} KiB after");
        assert!(
            after <= before + 32 * MIB_IN_KIB,
            "the server kept {} MiB after the attack ended",
            after.saturating_sub(before) / MIB_IN_KIB
        );
    });
}

/// A reading half that never yields a byte: the client never reads its socket.
struct NeverReads;

impl tokio::io::AsyncRead for NeverReads {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

/// The bytes a capnp client writes for `calls` pipelined echo calls of `body_bytes` each
/// (bootstrap, namespace, getByName, then the calls), recorded from a real client.
async fn recorded_echo_calls(calls: usize, body_bytes: usize) -> Vec<u8> {
    let (client_end, mut tap) = tokio::io::duplex(1 << 20);
    let (_, writer) = tokio::io::split(client_end);
    let mut rpc = duro::wire::rpc_system(NeverReads, writer, Side::Client, None);
    let client: host::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    let mut namespace = client.namespace_request();
    namespace.get().set_name("echo");
    let namespace = namespace.send().pipeline.get_namespace();
    let mut get = namespace.get_by_name_request();
    get.get().set_name("flood");
    let stub: durable_object::Client = get.send().pipeline.get_stub();
    let body = vec![b'x'; body_bytes];
    let pending: Vec<_> = (0..calls)
        .map(|_| fetch_call(&stub, &request("POST", "/", &body)))
        .collect();
    let mut bytes = Vec::new();
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(300), tap.read_buf(&mut bytes)).await
    {
        if n == 0 {
            break;
        }
    }
    drop(pending);
    bytes
}

#[test]
fn a_client_that_never_reads_slows_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve_with(dir.path(), &["--http", "off", "--inflight-mib", "64"]);
    run_local(async {
        let host = connect(served.addr).await.unwrap();
        healthy_call(&host).await;
        // 1,000 echo calls of 256 KiB (250 MiB; their answers would take 330 MiB), sent as
        // fast as the server reads them by a client that never reads a byte.
        let attack = recorded_echo_calls(1000, 256 << 10).await;
        let before = settled_rss_kib(&served).await;
        let stream = TcpStream::connect(served.addr).await.unwrap();
        let (unread, mut writer) = stream.into_split();
        let sender = tokio::task::spawn_local(async move {
            let _ = writer.write_all(&attack).await;
            writer
        });
        let during = settled_rss_kib(&served).await;
        assert_healthy_calls_answer(&host).await;
        let growth = during.saturating_sub(before);
        eprintln!("a client that never reads: RSS {before} KiB before, {during} KiB during");
        assert!(
            growth <= 160 * MIB_IN_KIB,
            "a client that does not read grew the server by {} MiB (budget 64 MiB)",
            growth / MIB_IN_KIB
        );
        sender.abort();
        drop(unread);
        assert_healthy_calls_answer(&host).await;
    });
}

/// The server's open Cap'n Proto connections, from its admin server's `/metrics`.
fn capnp_connections_open(admin: std::net::SocketAddr) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let line = answer
        .lines()
        .find(|l| l.starts_with("duro_connections_open{transport=\"capnp\"}"))
        .expect("the capnp connections gauge");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_connection_whose_peer_left_without_reading_ends() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve_with(dir.path(), &["--http", "off", "--admin", "127.0.0.1:0"]);
    let admin = served.admin.expect("the admin server");
    run_local(async {
        // 64 echo calls of 256 KiB (16 MiB of answers, far more than the sockets' buffers
        // take), then the client closes its side and never reads: what the server still has
        // to write cannot leave, and the connection must not wait for it forever.
        let attack = recorded_echo_calls(64, 256 << 10).await;
        let stream = TcpStream::connect(served.addr).await.unwrap();
        let (unread, mut writer) = stream.into_split();
        writer.write_all(&attack).await.unwrap();
        writer.shutdown().await.unwrap();
        let started = Instant::now();
        let mut open = capnp_connections_open(admin);
        while open > 0 && started.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            open = capnp_connections_open(admin);
        }
        assert_eq!(
            open, 0,
            "the connection is let go (LINGER) although its answers cannot leave"
        );
        drop(unread);
    });
}

#[test]
fn slow_senders_are_cut_off_and_others_do_not_notice() {
    raise_file_limit();
    let dir = tempfile::tempdir().unwrap();
    let served = serve_with(dir.path(), &["--http", "off", "--message-timeout", "1"]);
    run_local(async {
        let host = connect(served.addr).await.unwrap();
        // 200 connections send a message a byte every 100 ms: each would take 3 s.
        let started = Instant::now();
        let slow: Vec<_> = (0..200)
            .map(|_| tokio::task::spawn_local(send_slowly(served.addr)))
            .collect();
        assert_healthy_calls_answer(&host).await;
        let mut cut = 0;
        for task in slow {
            cut += usize::from(task.await.unwrap());
        }
        assert_eq!(
            cut, 200,
            "every slow sender is closed by the message deadline"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_healthy_calls_answer(&host).await;
    });
}

/// Sends a 24-byte message a byte at a time, 100 ms apart; whether the server closed the
/// connection before the message was whole.
async fn send_slowly(addr: std::net::SocketAddr) -> bool {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let message = [
        0u8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    for byte in message {
        if stream.write_all(&[byte]).await.is_err() {
            return true;
        }
        let mut answer = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut answer)).await {
            // Closed (EOF or reset) by the server.
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    false
}
