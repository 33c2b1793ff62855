//! `echo-baseline` and `noop`, measured in alternation in three shapes: 1 call in flight;
//! 64 in flight on 1 connection; 4 connections × 64.
//!
//! `noop` is `GET` on one warm `counter` object: the handler reads its value from the object's
//! cache (no I/O) and answers it; so it measures the host's own path (capnp → stub → input gate
//! → handler → output gate → capnp) over what bare capnp-rpc costs.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use super::capnp_load::{self, EchoBaseline, PAYLOAD};
use super::child;
use super::measure::{Budget, Run, Series, drive, drive_all};
use super::{Selection, Settings};
use duro::duro_capnp::{durable_object, host};

/// The echo baseline with duro's server writer (see [`EchoBaseline::start_corked`]).
pub const ECHO_CORKED: &str = "echo-corked";

/// A call of a workload: given the connection's index and the call's number, sends it.
pub type CallFn = Rc<dyn Fn(usize, u64) -> Pin<Box<dyn Future<Output = Result<(), String>>>>>;

/// Connections and calls in flight on each.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub connections: usize,
    pub in_flight: usize,
}

impl Shape {
    pub fn name(&self) -> String {
        match self.connections {
            1 => format!("{} in flight", self.in_flight),
            n => format!("{n} conns × {}", self.in_flight),
        }
    }
}

pub const SHAPES: [Shape; 3] = [
    Shape {
        connections: 1,
        in_flight: 1,
    },
    Shape {
        connections: 1,
        in_flight: 64,
    },
    Shape {
        connections: 4,
        in_flight: 64,
    },
];

/// One run of `call` in `shape`, the server's CPU read before and after by `cpu`.
pub async fn run_shape(
    shape: Shape,
    budget: Budget,
    call: &CallFn,
    cpu: &dyn Fn() -> Option<Duration>,
) -> Result<Run, String> {
    let per_connection = Budget {
        until: budget.until,
        ops_max: budget.ops_max / shape.connections as u64,
    };
    let drivers = (0..shape.connections).map(|c| {
        let call = call.clone();
        drive(shape.in_flight, per_connection, move |i| call(c, i))
    });
    let before = cpu();
    let mut run = drive_all(drivers.collect()).await?;
    run.server_cpu = before.zip(cpu()).map(|(b, a)| a.saturating_sub(b));
    Ok(run)
}

/// A fetch of `method path` on one stub per connection.
pub fn fetch_on(
    stubs: Vec<durable_object::Client>,
    method: &'static str,
    path: &'static str,
) -> CallFn {
    Rc::new(move |c, _| Box::pin(capnp_load::fetch(&stubs[c], method, path, PAYLOAD, &[200])))
}

pub fn run(settings: &Settings, selection: &Selection) -> Vec<Series> {
    duro::testing::run_local(run_group(settings, selection))
}

/// Connects the stubs of one shape: one per connection.
type ConnectStubs = Box<
    dyn Fn(usize) -> Pin<Box<dyn Future<Output = Result<Vec<durable_object::Client>, String>>>>,
>;

/// A server under test in this group.
struct Side {
    /// One per shape of [`SHAPES`]; `None` where the side does not run that shape.
    series: Vec<Option<Series>>,
    stubs: ConnectStubs,
    cpu: Box<dyn Fn() -> Option<Duration>>,
}

async fn run_group(settings: &Settings, selection: &Selection) -> Vec<Series> {
    let mut sides = Vec::new();
    // Kept alive until the end of the group: the servers.
    let mut echoes = Vec::new();
    let mut _duro = None;
    if selection.has("echo-baseline") {
        match EchoBaseline::start() {
            Ok(echo) => {
                let (addr, tid) = (echo.addr, echo.tid);
                let series = SHAPES
                    .iter()
                    .map(|s| Some(Series::new("echo-baseline", &s.name())));
                sides.push(Side {
                    series: series.collect(),
                    stubs: Box::new(move |n| Box::pin(echo_stubs(addr, n))),
                    cpu: Box::new(move || child::cpu_time(&format!("/proc/self/task/{tid}/stat"))),
                });
                echoes.push(echo);
            }
            Err(e) => return vec![Series::skipped("echo-baseline", "all", e)],
        }
        // The same echo with duro's server writer, where many calls are in flight (with one,
        // there is nothing to gather): a figure, not a target.
        match EchoBaseline::start_corked() {
            Ok(echo) => {
                let (addr, tid) = (echo.addr, echo.tid);
                let series = SHAPES
                    .iter()
                    .map(|s| (s.in_flight > 1).then(|| Series::new(ECHO_CORKED, &s.name())));
                sides.push(Side {
                    series: series.collect(),
                    stubs: Box::new(move |n| Box::pin(echo_stubs(addr, n))),
                    cpu: Box::new(move || child::cpu_time(&format!("/proc/self/task/{tid}/stat"))),
                });
                echoes.push(echo);
            }
            Err(e) => return vec![Series::skipped(ECHO_CORKED, "all", e)],
        }
    }
    if selection.has("noop") {
        match child::start_duro(&settings.fresh_dir("noop"), false) {
            Ok(duro) => {
                let (addr, pid) = (duro.addr, duro.child.pid());
                sides.push(Side {
                    series: SHAPES
                        .iter()
                        .map(|s| Some(Series::new("noop", &s.name())))
                        .collect(),
                    stubs: Box::new(move |n| Box::pin(counter_stubs(addr, n, "noop"))),
                    cpu: Box::new(move || child::process_cpu(pid)),
                });
                _duro = Some(duro);
            }
            Err(e) => return vec![Series::skipped("noop", "all", e)],
        }
    }
    for (s, shape) in SHAPES.iter().enumerate() {
        let mut calls = Vec::new();
        for side in &mut sides {
            let Some(series) = &mut side.series[s] else {
                calls.push(None);
                continue;
            };
            match (side.stubs)(shape.connections).await {
                Ok(stubs) => calls.push(Some(fetch_on(stubs, "GET", "/"))),
                Err(e) => {
                    series.fail(e);
                    calls.push(None);
                }
            }
        }
        for (side, call) in sides.iter_mut().zip(&calls) {
            if let (Some(call), Some(series)) = (call, &mut side.series[s])
                && let Err(e) = run_shape(*shape, settings.warmup_budget(), call, &|| None).await
            {
                series.fail(e);
            }
        }
        for _ in 0..settings.runs {
            for (side, call) in sides.iter_mut().zip(&calls) {
                if let (Some(call), Some(series)) = (call, &mut side.series[s])
                    && !series.failed()
                {
                    let run = run_shape(*shape, settings.run_budget(), call, &*side.cpu).await;
                    series.push(run);
                }
            }
        }
    }
    drop(echoes);
    let mut series: Vec<Series> = sides
        .into_iter()
        .flat_map(|side| side.series)
        .flatten()
        .collect();
    // Grouped by workload for the table: the diagnostic series last.
    series.sort_by_key(|s| !s.workload.starts_with("echo-"));
    series
}

/// One connection to the echo-baseline server per stub.
async fn echo_stubs(
    addr: std::net::SocketAddr,
    connections: usize,
) -> Result<Vec<durable_object::Client>, String> {
    let mut stubs = Vec::new();
    for _ in 0..connections {
        stubs.push(capnp_load::connect::<durable_object::Client>(addr).await?);
    }
    Ok(stubs)
}

/// One connection to duro per stub, each a stub of the `counter` object `name`.
pub async fn counter_stubs(
    addr: std::net::SocketAddr,
    connections: usize,
    name: &str,
) -> Result<Vec<durable_object::Client>, String> {
    let mut stubs = Vec::new();
    for _ in 0..connections {
        let host: host::Client = capnp_load::connect(addr).await?;
        let namespace = capnp_load::namespace(&host, "counter");
        stubs.push(capnp_load::stub(&namespace, name));
    }
    Ok(stubs)
}
