//! `room`: one chat room of the built-in `room` class, [`CLIENTS`] WebSocket clients on
//! `GET /room/{name}/ws`, [`SENDERS`] of them sending, every one reading every broadcast; on
//! duro's gateway and on workerd running the same room ([`workerd/room.js`]) with the
//! WebSocket Hibernation API, measured in alternation.
//!
//! A message is `m:<client>:<seq>:<ns>`, `ns` the time it was sent since the bench's epoch;
//! a delivery's latency is the time it is read minus that (one process, one clock). Each
//! sender has one message in flight: it sends the next when it reads its own back. A run
//! ends when the last sender to stop sends an end marker and every client has read up to it;
//! the room's one order puts the marker after every message of the run, so each client must
//! by then have read all of them, in the same order as every other client: a run checks both.
//!
//! Reported per side: messages broadcast per second (the table's ops/s, whose CPU columns are
//! per message), deliveries per second (messages × sockets, under figures), and the p50/p99 of
//! the delivery latency. Either side is skipped with the reason when it is not there: duro's
//! when its gateway does not answer or has no room (404), workerd's when no binary is found.
//!
//! [`workerd/room.js`]: workerd/room.js

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use super::child::{self, Child};
use super::hist::Histogram;
use super::measure::{self, Budget, DRAIN_MAX, Run, Series};
use super::{Settings, peer};

/// Sockets in the room, each with a client of its own, all read by this one thread.
const CLIENTS: usize = 100;
/// Clients that send, each with one message in flight (sent, not yet read back), so at most
/// this many messages are in flight. One sender would leave the room idle for every round
/// trip and measure latency, not throughput; with ten, the room always has messages waiting
/// while the broadcasts of one are on the wire, yet the queue stays bounded, so the latency
/// measured is the room's work and not a backlog that grows with the run. Ten of a hundred
/// also keeps the fan-out (one message, a hundred deliveries) the main cost, as in a chat
/// where most members read.
const SENDERS: usize = 10;
/// The room every run uses (one per server: each side has a fresh server).
const ROOM: &str = "bench";
/// The room of the first check that a room is served, so its message is no run's history.
const PROBE_ROOM: &str = "probe";
/// How long a server has to accept a socket and broadcast a first message.
const PROBE_TIME: Duration = Duration::from_secs(2);
/// How long opening every socket and reading their history may take.
const CONNECT_TIME: Duration = Duration::from_secs(20);
/// Messages a room keeps and sends to a socket that joins: a socket reads at most this many
/// (and the marker) before it is settled.
const KEPT: usize = 100;
/// Largest message or frame a client accepts: the bench's messages are a few dozen bytes.
const MESSAGE_BYTES_MAX: usize = 64 * 1024;

pub const SHAPE: &str = "1 room, 100 sockets, 10 sending";
pub const DURO: &str = "room-duro";
pub const WORKERD: &str = "room-workerd";

type Socket = WebSocketStream<TcpStream>;

/// A server with a room, its sockets, and its series.
struct Side {
    /// Open on the room from the join to the end of the group.
    sockets: Vec<Socket>,
    /// The server, killed when the side is dropped; `None` when it was skipped.
    child: Option<Child>,
    series: Series,
    /// Deliveries per second of each run, reported beside the series.
    deliveries_per_s: Vec<f64>,
}

pub fn run(settings: &Settings) -> Vec<Series> {
    duro::testing::run_local(run_group(settings))
}

async fn run_group(settings: &Settings) -> Vec<Series> {
    // Send times are nanoseconds since this instant.
    let epoch = Instant::now();
    // Each join and run has an end marker of its own.
    let mut tags = 0u64;
    let mut tag = || {
        tags += 1;
        format!("{tags}")
    };
    let mut sides = vec![
        set_up(DURO, start_duro(settings).await, &tag()).await,
        set_up(WORKERD, start_workerd(settings).await, &tag()).await,
    ];
    for side in &mut sides {
        if !side.series.failed()
            && let Err(e) =
                run_once(&mut side.sockets, settings.warmup_budget(), epoch, &tag()).await
        {
            side.series.fail(e);
        }
    }
    for _ in 0..settings.runs {
        for side in &mut sides {
            if !side.series.failed() {
                measured(side, settings, epoch, &tag()).await;
            }
        }
    }
    sides
        .into_iter()
        .map(|side| {
            // The sockets close, and the server is killed, as the rest of the side drops.
            let mut series = side.series;
            series.add_extra("deliveries_per_s", "deliveries/s", &side.deliveries_per_s);
            series
        })
        .collect()
}

/// The side `name` of a server that started, or skipped with the reason it did not; its
/// [`CLIENTS`] sockets joined.
async fn set_up(name: &str, started: Result<(Child, SocketAddr), String>, tag: &str) -> Side {
    let (child, addr) = match started {
        Ok(started) => started,
        Err(e) => {
            return Side {
                sockets: Vec::new(),
                child: None,
                series: Series::skipped(name, SHAPE, e),
                deliveries_per_s: Vec::new(),
            };
        }
    };
    let mut series = Series::new(name, SHAPE);
    let sockets = join(addr, tag).await.unwrap_or_else(|e| {
        series.fail(e);
        Vec::new()
    });
    Side {
        sockets,
        child: Some(child),
        series,
        deliveries_per_s: Vec::new(),
    }
}

/// One measured run on `side`, with the server's CPU.
async fn measured(side: &mut Side, settings: &Settings, epoch: Instant, tag: &str) {
    let pid = side.child.as_ref().map(Child::pid);
    let server_cpu = || pid.and_then(child::process_cpu);
    let before = server_cpu();
    let cpu_before = measure::generator_cpu();
    match run_once(&mut side.sockets, settings.run_budget(), epoch, tag).await {
        Ok(room_run) => {
            let elapsed = room_run.elapsed.as_secs_f64().max(1e-9);
            side.deliveries_per_s
                .push(room_run.deliveries as f64 / elapsed);
            side.series.push(Ok(Run {
                ops: room_run.messages,
                elapsed: room_run.elapsed,
                latency: room_run.latency,
                server_cpu: before.zip(server_cpu()).map(|(b, a)| a.saturating_sub(b)),
                generator_cpu: cpu_before
                    .zip(measure::generator_cpu())
                    .map(|(b, a)| a.saturating_sub(b)),
            }));
        }
        Err(e) => side.series.fail(e),
    }
}

/// `duro serve` with its gateway, if the gateway answers and serves the room.
async fn start_duro(settings: &Settings) -> Result<(Child, SocketAddr), String> {
    let (child, addr) = peer::start_gateway(settings).await?;
    probe(addr).await?;
    Ok((child, addr))
}

/// workerd running `workerd/room.js`, if a binary is found.
async fn start_workerd(settings: &Settings) -> Result<(Child, SocketAddr), String> {
    let (child, addr) = peer::start_workerd(settings).await?;
    probe(addr).await?;
    Ok((child, addr))
}

/// Whether `addr` serves a room: a socket joins [`PROBE_ROOM`], sends a message and reads it
/// back, within [`PROBE_TIME`].
async fn probe(addr: SocketAddr) -> Result<(), String> {
    let path = format!("/room/{PROBE_ROOM}/ws");
    let attempt = async {
        let mut socket = open(addr, PROBE_ROOM).await.map_err(|e| match e {
            tungstenite::Error::Http(response) if response.status() == 404 => {
                format!("room unavailable: GET {path} answered 404 (no room class)")
            }
            e => format!("room unavailable: GET {path}: {}", describe(&e)),
        })?;
        send(&mut socket, "probe".into()).await?;
        // The room's history, then the message.
        for _ in 0..=KEPT {
            if next_text(&mut socket).await?.as_str() == "probe" {
                return Ok(());
            }
        }
        Err(format!("room unavailable: {path} did not echo a message"))
    };
    match tokio::time::timeout(PROBE_TIME, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "room unavailable: {path} did not echo a message within {PROBE_TIME:?}"
        )),
    }
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MESSAGE_BYTES_MAX))
        .max_frame_size(Some(MESSAGE_BYTES_MAX))
}

/// A socket on `room`, through the HTTP upgrade of `GET /room/{room}/ws`.
async fn open(addr: SocketAddr, room: &str) -> Result<Socket, tungstenite::Error> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}/room/{room}/ws");
    let (socket, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(config())).await?;
    Ok(socket)
}

fn describe(error: &tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Http(response) => {
            format!("the upgrade was answered {}", response.status())
        }
        error => error.to_string(),
    }
}

async fn send(socket: &mut Socket, text: String) -> Result<(), String> {
    socket
        .send(Message::text(text))
        .await
        .map_err(|e| format!("sending: {}", describe(&e)))
}

/// The next text message; pings and pongs are skipped (tungstenite answers pings itself).
/// The text of the next message posted to the room: both rooms send each message as JSON,
/// `{"seq": n, "text": "...", "at": ms}`, as duro's built-in room does.
async fn next_text(socket: &mut Socket) -> Result<String, String> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(json))) => {
                #[derive(serde::Deserialize)]
                struct Posted {
                    text: String,
                }
                let posted: Posted = serde_json::from_str(json.as_str())
                    .map_err(|e| format!("unexpected message {json:?}: {e}"))?;
                return Ok(posted.text);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => return Err(format!("unexpected message {other:?}")),
            Some(Err(e)) => return Err(format!("reading: {}", describe(&e))),
            None => return Err("the server closed the socket".into()),
        }
    }
}

/// Opens [`CLIENTS`] sockets on [`ROOM`] and reads what each is sent on joining, up to a
/// marker sent once all have joined.
async fn join(addr: SocketAddr, tag: &str) -> Result<Vec<Socket>, String> {
    let attempt = async {
        let mut sockets = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            let socket = open(addr, ROOM)
                .await
                .map_err(|e| format!("opening a socket: {}", describe(&e)))?;
            sockets.push(socket);
        }
        let marker = format!("end:{tag}");
        send(&mut sockets[0], marker.clone()).await?;
        let settle = sockets.iter_mut().map(|socket| async {
            for _ in 0..=KEPT {
                if next_text(socket).await?.as_str() == marker {
                    return Ok(());
                }
            }
            Err(format!("more than {KEPT} messages before the marker"))
        });
        for result in futures::future::join_all(settle).await {
            result?;
        }
        Ok(sockets)
    };
    match tokio::time::timeout(CONNECT_TIME, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{CLIENTS} sockets did not join within {CONNECT_TIME:?}"
        )),
    }
}

/// What one run delivered, every client's reads merged.
struct RoomRun {
    messages: u64,
    deliveries: u64,
    /// From the run's start to the last delivery of a message.
    elapsed: Duration,
    latency: Histogram,
}

/// What the clients of a run share: when senders stop, and who ends the run.
struct Shared {
    epoch: Instant,
    until: Instant,
    /// Messages each sender may send (the run's op budget, split).
    sends_max: u64,
    /// Senders still sending; the one that takes it to zero sends the end marker.
    sending: Cell<usize>,
    marker: String,
}

/// What one client read in a run.
struct Reads {
    /// Messages this client sent.
    sent: u64,
    count: u64,
    latency: Histogram,
    /// A hash of the messages in the order read: equal at every client when they all read
    /// one order.
    order: u64,
    last_at: Option<Instant>,
}

/// One run: the first [`SENDERS`] clients send until `budget` is spent, every client reads
/// until the end marker; then the checks that each read every message, in one order.
async fn run_once(
    sockets: &mut [Socket],
    budget: Budget,
    epoch: Instant,
    tag: &str,
) -> Result<RoomRun, String> {
    let senders = SENDERS.min(sockets.len());
    let shared = Shared {
        epoch,
        until: budget.until,
        sends_max: budget.ops_max / senders.max(1) as u64,
        sending: Cell::new(senders),
        marker: format!("end:{tag}"),
    };
    let begun = Instant::now();
    let clients = sockets
        .iter_mut()
        .enumerate()
        .map(|(id, socket)| take_part(socket, id, id < senders, &shared));
    let deadline = tokio::time::Instant::from_std(budget.until) + DRAIN_MAX;
    let Ok(results) = tokio::time::timeout_at(deadline, futures::future::join_all(clients)).await
    else {
        return Err(format!(
            "deliveries still missing {DRAIN_MAX:?} after the run's end"
        ));
    };
    let reads = results
        .into_iter()
        .collect::<Result<Vec<Reads>, String>>()?;
    merge(reads, begun)
}

/// Checks that every client read every message sent, in one order, and merges their figures.
fn merge(reads: Vec<Reads>, begun: Instant) -> Result<RoomRun, String> {
    let messages: u64 = reads.iter().map(|r| r.sent).sum();
    let mut run = RoomRun {
        messages,
        deliveries: 0,
        elapsed: Duration::ZERO,
        latency: Histogram::default(),
    };
    for (id, read) in reads.iter().enumerate() {
        if read.count != messages {
            return Err(format!(
                "client {id} read {} of the {messages} messages sent",
                read.count
            ));
        }
        if read.order != reads[0].order {
            return Err(format!(
                "client {id} read the messages in another order than client 0"
            ));
        }
        run.deliveries += read.count;
        run.latency.merge(&read.latency);
        if let Some(at) = read.last_at {
            run.elapsed = run.elapsed.max(at.duration_since(begun));
        }
    }
    Ok(run)
}

/// One client's part in a run: it reads every message up to the end marker, recording each
/// one's latency; a sender also sends a message at the start and another each time it reads
/// its own back, until the run's deadline or its share of the op budget.
async fn take_part(
    socket: &mut Socket,
    id: usize,
    sends: bool,
    shared: &Shared,
) -> Result<Reads, String> {
    let mut reads = Reads {
        sent: 0,
        count: 0,
        latency: Histogram::default(),
        order: FNV_OFFSET,
        last_at: None,
    };
    if sends {
        next_or_stop(socket, id, &mut reads.sent, shared).await?;
    }
    loop {
        let text = next_text(socket).await?;
        let now = Instant::now();
        if text.as_str() == shared.marker {
            return Ok(reads);
        }
        let (from, seq, sent_ns) =
            parse(&text).ok_or_else(|| format!("unexpected message {text:?}"))?;
        let received_ns = now.duration_since(shared.epoch).as_nanos() as u64;
        reads
            .latency
            .record(Duration::from_nanos(received_ns.saturating_sub(sent_ns)));
        reads.count += 1;
        reads.order = fnv(reads.order, text.as_bytes());
        reads.last_at = Some(now);
        if sends && from == id {
            if seq + 1 != reads.sent {
                return Err(format!(
                    "client {id} read its message {seq} back after sending {}",
                    reads.sent
                ));
            }
            next_or_stop(socket, id, &mut reads.sent, shared).await?;
        }
    }
}

/// Sends this sender's next message, or, past the deadline or its budget, stops; the last
/// sender to stop sends the end marker, which the room orders after every message.
async fn next_or_stop(
    socket: &mut Socket,
    id: usize,
    sent: &mut u64,
    shared: &Shared,
) -> Result<(), String> {
    let now = Instant::now();
    if now < shared.until && *sent < shared.sends_max {
        let ns = now.duration_since(shared.epoch).as_nanos();
        send(socket, format!("m:{id}:{sent}:{ns}")).await?;
        *sent += 1;
        return Ok(());
    }
    let sending = shared.sending.get() - 1;
    shared.sending.set(sending);
    if sending == 0 {
        send(socket, shared.marker.clone()).await?;
    }
    Ok(())
}

/// `m:<client>:<seq>:<ns>` as (client, seq, ns).
fn parse(text: &str) -> Option<(usize, u64, u64)> {
    let mut fields = text.strip_prefix("m:")?.splitn(3, ':');
    let client = fields.next()?.parse().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let ns = fields.next()?.parse().ok()?;
    Some((client, seq, ns))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes` and a separator, continuing from `hash`.
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes.iter().chain(b"\n") {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_back() {
        assert_eq!(parse("m:7:42:123456789"), Some((7, 42, 123_456_789)));
        assert_eq!(parse("end:3"), None);
        assert_eq!(parse("m:7:42"), None);
        assert_eq!(parse("m:x:42:1"), None);
    }

    #[test]
    fn the_order_hash_tells_orders_apart() {
        let ab = fnv(fnv(FNV_OFFSET, b"a"), b"b");
        let ba = fnv(fnv(FNV_OFFSET, b"b"), b"a");
        assert_ne!(ab, ba);
        assert_ne!(fnv(FNV_OFFSET, b"ab"), ab);
    }
}
