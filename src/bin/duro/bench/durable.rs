//! `incr` (the durable counter: POST = get + put, answered after fsync), with 64 calls in
//! flight on one hot object and spread over 1000 objects, and one at a time (the latency of a
//! durable write on an idle host), measured in alternation with
//! `lmdb-baseline` (LMDB directly, one synced transaction per increment) and the disk's fsync
//! latency, all on the same disk.

use std::rc::Rc;

use super::capnp_load::{self, PAYLOAD};
use super::child;
use super::disk::{FsyncProbe, LmdbBaseline};
use super::measure::Series;
use super::rpc_group::{CallFn, Shape, run_shape};
use super::{Selection, Settings};
use duro::duro_capnp::{durable_object, host};

/// Objects of `incr` spread.
pub const SPREAD_OBJECTS: u64 = 1000;
/// Calls in flight, on one connection.
const IN_FLIGHT: usize = 64;
pub const HOT: &str = "1 object, 64 in flight";
pub const SPREAD: &str = "1000 objects, 64 in flight";
pub const SERIAL: &str = "1 object, 1 in flight";
pub const LMDB_SHAPE: &str = "1 txn+fsync per incr, serial";
pub const FSYNC: &str = "fsync";
pub const FSYNC_SHAPE: &str = "64 B write+fdatasync, serial";

pub fn run(settings: &Settings, selection: &Selection) -> Vec<Series> {
    duro::testing::run_local(run_group(settings, selection))
}

/// POST on object `i % stubs.len()`.
fn increments(stubs: Vec<durable_object::Client>) -> CallFn {
    Rc::new(move |_, i| {
        let stub = &stubs[(i % stubs.len() as u64) as usize];
        Box::pin(capnp_load::fetch(stub, "POST", "/", PAYLOAD, &[200]))
    })
}

async fn run_group(settings: &Settings, selection: &Selection) -> Vec<Series> {
    let shape = Shape {
        connections: 1,
        in_flight: IN_FLIGHT,
    };
    let one = Shape {
        connections: 1,
        in_flight: 1,
    };
    let mut hot = Series::new("incr", HOT);
    let mut spread = Series::new("incr", SPREAD);
    let mut serial = Series::new("incr", SERIAL);
    let mut lmdb = Series::new("lmdb-baseline", LMDB_SHAPE);
    let mut fsync = Series::new(FSYNC, FSYNC_SHAPE);

    let duro = if selection.has("incr") {
        match child::start_duro(&settings.fresh_dir("incr"), false).map(|duro| {
            let pid = duro.child.pid();
            (duro, pid)
        }) {
            Ok(duro) => Some(duro),
            Err(e) => {
                hot.fail(&e);
                serial.fail(&e);
                spread.fail(e);
                None
            }
        }
    } else {
        None
    };
    let mut calls = None;
    if let Some((duro, _)) = &duro {
        match capnp_load::connect::<host::Client>(duro.addr).await {
            Ok(host) => {
                let namespace = capnp_load::namespace(&host, "counter");
                let spread_stubs = (0..SPREAD_OBJECTS)
                    .map(|i| capnp_load::stub(&namespace, &format!("c{i}")))
                    .collect();
                let hot_stub = vec![capnp_load::stub(&namespace, "hot")];
                calls = Some((increments(hot_stub), increments(spread_stubs)));
            }
            Err(e) => {
                hot.fail(&e);
                serial.fail(&e);
                spread.fail(e);
            }
        }
    }
    let baseline = if selection.has("lmdb-baseline") {
        let opened = LmdbBaseline::open(&settings.fresh_dir("lmdb-baseline"))
            .and_then(|lmdb| Ok((lmdb, FsyncProbe::open(&settings.fresh_dir("fsync-probe"))?)));
        opened.map_err(|e| lmdb.fail(e)).ok()
    } else {
        None
    };

    // Warm up: every spread object activated, code paths and the disk warm.
    if let Some((hot_call, spread_call)) = &calls {
        for (series, call) in [(&mut hot, hot_call), (&mut spread, spread_call)] {
            if let Err(e) = run_shape(shape, settings.warmup_budget(), call, &|| None).await {
                series.fail(e);
            }
        }
    }
    if let Some((lmdb_baseline, _)) = &baseline
        && let Err(e) = lmdb_baseline.run(settings.warmup_budget())
    {
        lmdb.fail(e);
    }

    for _ in 0..settings.runs {
        if let Some((lmdb_baseline, probe)) = &baseline {
            if !lmdb.failed() {
                lmdb.push(lmdb_baseline.run(settings.run_budget()));
            }
            if !fsync.failed() {
                fsync.push(probe.run(settings.run_budget()));
            }
        }
        if let (Some((hot_call, spread_call)), Some((_, pid))) = (&calls, &duro) {
            let pid = *pid;
            let cpu = move || child::process_cpu(pid);
            for (series, call) in [(&mut hot, hot_call), (&mut spread, spread_call)] {
                if !series.failed() {
                    series.push(run_shape(shape, settings.run_budget(), call, &cpu).await);
                }
            }
            if !serial.failed() {
                serial.push(run_shape(one, settings.run_budget(), hot_call, &cpu).await);
            }
        }
    }
    let mut series = Vec::new();
    if selection.has("incr") {
        series.extend([hot, spread, serial]);
    }
    if selection.has("lmdb-baseline") {
        series.extend([lmdb, fsync]);
    }
    series
}
