//! `gateway` and `workerd`: `noop` (GET on one counter) and `incr` over 1000 counters through
//! HTTP, on duro's gateway and on workerd running the equivalent JavaScript Durable Object with
//! local-disk storage, driven by the same HTTP load generator (64 keep-alive connections) and
//! measured in alternation.
//!
//! Either side is skipped with the reason when it is not there: the gateway when it does not
//! answer a first request in time, workerd when no binary is found.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::child::{self, Child};
use super::http_load::{self, Connection, Target};
use super::measure::{Run, Series};
use super::{Selection, Settings};

/// Connections of the HTTP load generator, one request in flight on each.
const CONNECTIONS: usize = 64;
/// How long the gateway has to answer a first request before it is reported unavailable.
const GATEWAY_PROBE: Duration = Duration::from_secs(2);
/// How long workerd has to start and answer.
const WORKERD_START: Duration = Duration::from_secs(20);
const SPREAD_OBJECTS: u64 = 1000;

pub const NOOP: &str = "noop: GET 1 object, 64 conns";
pub const INCR: &str = "incr: 1000 objects, 64 conns";

const CONFIG: &str = include_str!("workerd/config.capnp");
const SCRIPT: &str = include_str!("workerd/worker.js");
const ROOM_SCRIPT: &str = include_str!("workerd/room.js");

/// A server reached over HTTP, and its two series.
struct HttpSide {
    addr: SocketAddr,
    pid: u32,
    noop: Series,
    incr: Series,
}

pub fn run(settings: &Settings, selection: &Selection) -> Vec<Series> {
    duro::testing::run_local(run_group(settings, selection))
}

async fn run_group(settings: &Settings, selection: &Selection) -> Vec<Series> {
    let mut sides = Vec::new();
    let mut skipped = Vec::new();
    // Kept alive until the end of the group.
    let mut children: Vec<Child> = Vec::new();
    if selection.has("gateway") {
        match start_gateway(settings).await {
            Ok((child, addr)) => {
                sides.push(side("gateway", addr, child.pid()));
                children.push(child);
            }
            Err(e) => skipped.extend(skip_both("gateway", &e)),
        }
    }
    if selection.has("workerd") {
        match start_workerd(settings).await {
            Ok((child, addr)) => {
                sides.push(side("workerd", addr, child.pid()));
                children.push(child);
            }
            Err(e) => skipped.extend(skip_both("workerd", &e)),
        }
    }
    let noop: Target = Rc::new(|_| ("GET", "/counter/noop/".to_owned()));
    let incr: Target = Rc::new(|i| ("POST", format!("/counter/c{}/", i % SPREAD_OBJECTS)));
    let mut connections = Vec::new();
    for side in &mut sides {
        match http_load::open_all(side.addr, CONNECTIONS).await {
            Ok(opened) => connections.push(Some(opened)),
            Err(e) => {
                side.noop.fail(&e);
                side.incr.fail(e);
                connections.push(None);
            }
        }
    }
    for (side, connections) in sides.iter_mut().zip(&mut connections) {
        if let Some(connections) = connections {
            for (series, target) in [(&mut side.noop, &noop), (&mut side.incr, &incr)] {
                if let Err(e) = http_load::run(connections, target, settings.warmup_budget()).await
                {
                    series.fail(e);
                }
            }
        }
    }
    for _ in 0..settings.runs {
        for (which, target) in [(0, &noop), (1, &incr)] {
            for (side, connections) in sides.iter_mut().zip(&mut connections) {
                let series = if which == 0 {
                    &mut side.noop
                } else {
                    &mut side.incr
                };
                if let Some(connections) = connections
                    && !series.failed()
                {
                    let run = measured(side.pid, connections, target, settings).await;
                    series.push(run);
                }
            }
        }
    }
    drop(children);
    let mut series: Vec<Series> = sides.into_iter().flat_map(|s| [s.noop, s.incr]).collect();
    series.extend(skipped);
    series
}

fn side(name: &str, addr: SocketAddr, pid: u32) -> HttpSide {
    HttpSide {
        addr,
        pid,
        noop: Series::new(name, NOOP),
        incr: Series::new(name, INCR),
    }
}

fn skip_both(name: &str, why: &str) -> [Series; 2] {
    [
        Series::skipped(name, NOOP, why),
        Series::skipped(name, INCR, why),
    ]
}

async fn measured(
    pid: u32,
    connections: &mut [Connection],
    target: &Target,
    settings: &Settings,
) -> Result<Run, String> {
    let before = child::process_cpu(pid);
    let mut run = http_load::run(connections, target, settings.run_budget()).await?;
    run.server_cpu = before
        .zip(child::process_cpu(pid))
        .map(|(b, a)| a.saturating_sub(b));
    Ok(run)
}

/// `duro serve --http`, if its gateway answers.
pub(super) async fn start_gateway(settings: &Settings) -> Result<(Child, SocketAddr), String> {
    let duro = child::start_duro(&settings.fresh_dir("gateway"), true)?;
    let addr = duro.http.ok_or("duro printed no gateway address")?;
    http_load::probe(addr, "/counter/probe/", GATEWAY_PROBE)
        .await
        .map_err(|e| format!("gateway unavailable ({e})"))?;
    Ok((duro.child, addr))
}

/// workerd with the config and scripts of `src/bin/duro/bench/workerd/`, listening on a loopback socket
/// that this process binds and hands over, so no port can be taken in between.
pub(super) async fn start_workerd(settings: &Settings) -> Result<(Child, SocketAddr), String> {
    let Some(binary) = child::find_executable(settings.workerd.as_deref(), "workerd") else {
        return Err(match &settings.workerd {
            Some(path) => format!("workerd unavailable: {} is not a file", path.display()),
            None => "workerd unavailable: not on PATH (give --workerd PATH; \
                     `npm install workerd` puts one in node_modules/.bin/)"
                .into(),
        });
    };
    let dir = settings.fresh_dir("workerd");
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    write(&dir.join("config.capnp"), CONFIG)?;
    write(&dir.join("worker.js"), SCRIPT)?;
    write(&dir.join("room.js"), ROOM_SCRIPT)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("binding a port for workerd: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let fd = listener.as_raw_fd();
    // The child inherits the socket: clear close-on-exec on it (this thread alone spawns).
    // SAFETY: fcntl on a descriptor this function owns, with valid arguments.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err("clearing FD_CLOEXEC on the workerd socket".into());
    }
    let mut command = Command::new(&binary);
    command
        .current_dir(&dir)
        .arg("serve")
        .arg("config.capnp")
        .arg(format!("--socket-fd=http={fd}"))
        .arg(format!("--directory-path=do-storage={}", storage.display()));
    let child = child::spawn(command, &dir.join("workerd.log"))?;
    drop(listener);
    let deadline = Instant::now() + WORKERD_START;
    loop {
        match http_load::probe(addr, "/counter/probe/", Duration::from_secs(2)).await {
            Ok(()) => return Ok((child, addr)),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "workerd did not answer: {e}; its log ends with:\n{}",
                    child.log_tail()
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}
