//! `shards`: noop and durable increments at 1, 2 and N shards (N: this machine's cores), with
//! the server's CPU per call, so that a reader sees how throughput and cost per call change
//! with shards.
//!
//! Shape: 4 connections × 64 in flight, the calls spread over many objects (256 warm `counter`
//! objects for noop, 1,000 for incr), so that they land on every shard and most cross from the
//! shard that accepted the connection to the object's. The load generator runs in this
//! process: on a machine with few cores it competes with the server for them, which caps the
//! throughput; the server's CPU per call is the figure that carries to a larger machine.

use std::rc::Rc;

use super::Settings;
use super::capnp_load::{self, PAYLOAD};
use super::child;
use super::measure::Series;
use super::rpc_group::{CallFn, Shape, run_shape};
use duro::duro_capnp::{durable_object, host};

pub const WORKLOAD: &str = "shards";
const NOOP_OBJECTS: usize = 256;
const INCR_OBJECTS: usize = 1000;
const SHAPE: Shape = Shape {
    connections: 4,
    in_flight: 64,
};

/// The shard counts measured: 1, 2 and the cores, each once.
pub fn counts() -> Vec<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut counts = vec![1, 2, cores];
    counts.sort_unstable();
    counts.dedup();
    counts
}

/// The shape name of `what` at `shards`.
pub fn shape(what: &str, shards: usize) -> String {
    format!(
        "{what}, {shards} shard{}",
        if shards == 1 { "" } else { "s" }
    )
}

pub fn run(settings: &Settings) -> Vec<Series> {
    duro::testing::run_local(run_group(settings))
}

/// Calls spread over `objects` objects per connection, each call the next object.
fn spread(stubs: Vec<Vec<durable_object::Client>>, method: &'static str) -> CallFn {
    Rc::new(move |c, i| {
        let objects = &stubs[c];
        let stub = &objects[(i % objects.len() as u64) as usize];
        Box::pin(capnp_load::fetch(stub, method, "/", PAYLOAD, &[200]))
    })
}

async fn stubs(
    addr: std::net::SocketAddr,
    objects: usize,
) -> Result<Vec<Vec<durable_object::Client>>, String> {
    let mut all = Vec::new();
    for _ in 0..SHAPE.connections {
        let host: host::Client = capnp_load::connect(addr).await?;
        let namespace = capnp_load::namespace(&host, "counter");
        all.push(
            (0..objects)
                .map(|j| capnp_load::stub(&namespace, &format!("o{j}")))
                .collect(),
        );
    }
    Ok(all)
}

async fn run_group(settings: &Settings) -> Vec<Series> {
    if let Some((addr, pid)) = settings.connect {
        let mut noop = Series::new(WORKLOAD, &format!("noop, the server at {addr}"));
        let mut incr = Series::new(
            WORKLOAD,
            &format!("incr 1000 objects, the server at {addr}"),
        );
        let cpu = move || pid.and_then(child::process_cpu);
        measure(settings, addr, &mut noop, &mut incr, &cpu).await;
        return vec![noop, incr];
    }
    let mut all = Vec::new();
    let most = counts().last().copied().unwrap_or(1);
    // Each count with the one writer the shards share; the most also with a writer per shard.
    let plans = counts()
        .into_iter()
        .map(|n| (n, false))
        .chain((most > 1).then_some((most, true)));
    for (shards, own_writers) in plans {
        let suffix = if own_writers {
            ", a writer per shard"
        } else {
            ""
        };
        let mut noop = Series::new(WORKLOAD, &(shape("noop", shards) + suffix));
        let mut incr = Series::new(WORKLOAD, &(shape("incr 1000 objects", shards) + suffix));
        let dir = settings.fresh_dir("shards");
        let count = shards.to_string();
        let mut flags = vec!["--shards", &count];
        if own_writers {
            flags.push("--writer-per-shard");
        }
        let duro = match child::start_duro_with(&dir, false, &flags) {
            Ok(duro) => duro,
            Err(e) => {
                noop.fail(&e);
                incr.fail(e);
                all.extend([noop, incr]);
                continue;
            }
        };
        let pid = duro.child.pid();
        let cpu = move || child::process_cpu(pid);
        measure(settings, duro.addr, &mut noop, &mut incr, &cpu).await;
        drop(duro);
        all.extend([noop, incr]);
    }
    all
}

/// The noop and incr series against the server at `addr`, its CPU read by `cpu`.
async fn measure(
    settings: &Settings,
    addr: std::net::SocketAddr,
    noop: &mut Series,
    incr: &mut Series,
    cpu: &dyn Fn() -> Option<std::time::Duration>,
) {
    let calls = match (
        stubs(addr, NOOP_OBJECTS).await,
        stubs(addr, INCR_OBJECTS).await,
    ) {
        (Ok(noop_stubs), Ok(incr_stubs)) => {
            Some((spread(noop_stubs, "GET"), spread(incr_stubs, "POST")))
        }
        (Err(e), _) | (_, Err(e)) => {
            noop.fail(&e);
            incr.fail(e);
            None
        }
    };
    if let Some((noop_call, incr_call)) = &calls {
        for (series, call) in [(&mut *noop, noop_call), (&mut *incr, incr_call)] {
            if let Err(e) = run_shape(SHAPE, settings.warmup_budget(), call, &|| None).await {
                series.fail(e);
            }
        }
        for _ in 0..settings.runs {
            for (series, call) in [(&mut *noop, noop_call), (&mut *incr, incr_call)] {
                if !series.failed() {
                    series.push(run_shape(SHAPE, settings.run_budget(), call, cpu).await);
                }
            }
        }
    }
}
