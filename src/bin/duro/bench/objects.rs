//! Workloads over many objects or much data: `activate` (first fetch to many new objects: time,
//! host CPU and resident memory per object), `list` (one object with many keys: list pages from
//! random starts, and the bytes on disk), `kv-mixed` (90% get / 10% put over 10,000 objects).

use std::rc::Rc;

use futures::future::Either;
use std::time::{Duration, Instant};

use super::Settings;
use super::capnp_load::{self, PAYLOAD};
use super::child::{self, Duro};
use super::measure::{Budget, Rng, Run, Series, drive, drive_all};
use super::rpc_group::{CallFn, Shape, run_shape};
use duro::duro_capnp::{durable_object, host, namespace};

const IN_FLIGHT: usize = 64;

/// Starts a duro child on a fresh data dir and connects to the namespace `name`.
async fn start(
    settings: &Settings,
    workload: &str,
    name: &str,
) -> Result<(Duro, namespace::Client), String> {
    let duro = child::start_duro(&settings.fresh_dir(workload), false)?;
    let host: host::Client = capnp_load::connect(duro.addr).await?;
    let namespace = capnp_load::namespace(&host, name);
    Ok((duro, namespace))
}

/// How `activate` reaches each new object.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FirstCall {
    /// `getByName(name)` and a `fetch` pipelined on the stub, which is then released: four
    /// messages on the host's side of the wire (two calls, their returns) and a release.
    Stub,
    /// `Namespace.fetchByName(name, request)`: one call and its return.
    ByName,
}

impl FirstCall {
    /// The end of the series' shape, which names the path.
    pub const fn label(self) -> &'static str {
        match self {
            FirstCall::Stub => "getByName+fetch",
            FirstCall::ByName => "fetchByName",
        }
    }
}

/// Both paths of `activate`, their runs taken in turn (one fresh server each), so that the
/// two are measured back to back.
pub fn activate(settings: &Settings) -> Vec<Series> {
    let paths = [FirstCall::Stub, FirstCall::ByName];
    let mut all = paths.map(|path| Activations::new(settings, path));
    for _ in 0..settings.runs.min(3) {
        for (path, activations) in paths.iter().zip(all.iter_mut()) {
            match duro::testing::run_local(activate_once(settings, *path)) {
                Ok((run, cpu, rss)) => {
                    activations.cpu_us.push(cpu);
                    activations.rss_bytes.push(rss);
                    activations.series.push(Ok(run));
                }
                Err(e) => activations.series.fail(e),
            }
        }
    }
    all.map(Activations::finish).into()
}

/// The runs of one path of `activate`.
struct Activations {
    series: Series,
    cpu_us: Vec<f64>,
    rss_bytes: Vec<f64>,
}

impl Activations {
    fn new(settings: &Settings, path: FirstCall) -> Activations {
        let shape = format!(
            "{}k new, 64 in flight, {}{}",
            settings.activations / 1000,
            path.label(),
            if settings.quick { " (quick)" } else { "" }
        );
        Activations {
            series: Series::new("activate", &shape),
            cpu_us: Vec::new(),
            rss_bytes: Vec::new(),
        }
    }

    fn finish(mut self) -> Series {
        if !self.series.runs.is_empty() {
            self.series
                .add_extra("cpu_per_activation", "µs", &self.cpu_us);
            self.series
                .add_extra("rss_per_object", "bytes", &self.rss_bytes);
        }
        self.series
    }
}

/// Activates `settings.activations` new `counter` objects with a GET each (which reads a
/// missing key: no write), reached by `path`, on a fresh server; answers the run, the server's
/// CPU per activation in µs, and its resident memory per idle object in bytes.
async fn activate_once(settings: &Settings, path: FirstCall) -> Result<(Run, f64, f64), String> {
    let (duro, namespace) = start(settings, "activate", "counter").await?;
    let pid = duro.child.pid();
    let first_fetch = |name: String| match path {
        // A new stub per object, dropped as soon as the call is sent: the object stays
        // activated, idle, with no capability held on it.
        FirstCall::Stub => {
            let stub = capnp_load::stub(&namespace, &name);
            Either::Left(capnp_load::fetch(&stub, "GET", "/", PAYLOAD, &[200]))
        }
        FirstCall::ByName => Either::Right(capnp_load::fetch_by_name(
            &namespace,
            &name,
            "GET",
            "/",
            PAYLOAD,
            &[200],
        )),
    };
    // Warm the connection and the code paths on objects that are not counted.
    let warm = |i: u64| first_fetch(format!("warm{i}"));
    drive(IN_FLIGHT, Budget::new(settings.warmup, 1000), warm).await?;
    settle().await;
    let cpu_before = child::process_cpu(pid).ok_or("reading the server's CPU time")?;
    let rss_before = child::rss_bytes(pid).ok_or("reading the server's VmRSS")?;
    let count = settings.activations;
    let budget = Budget::new(settings.setup_time_max, count);
    let new_object = |i: u64| first_fetch(format!("object{i}"));
    let mut run = drive_all(vec![drive(IN_FLIGHT, budget, new_object)]).await?;
    if run.ops < count {
        return Err(format!(
            "only {} of {count} objects activated within {:?}",
            run.ops, settings.setup_time_max
        ));
    }
    settle().await;
    let cpu = child::process_cpu(pid)
        .ok_or("reading the server's CPU time")?
        .saturating_sub(cpu_before);
    run.server_cpu = Some(cpu);
    let rss = child::rss_bytes(pid).ok_or("reading the server's VmRSS")?;
    let cpu_us = cpu.as_secs_f64() * 1e6 / count as f64;
    let rss_per_object = rss.saturating_sub(rss_before) as f64 / count as f64;
    Ok((run, cpu_us, rss_per_object))
}

/// Lets the server process what is still queued (capability releases, for one).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Puts per `POST /txn` when filling (the kv class's batch limit).
const FILL_BATCH: u64 = 128;
/// Entries per list page.
const PAGE: u64 = 1000;

fn list_key(i: u64) -> String {
    format!("key{i:08}")
}

pub fn list(settings: &Settings) -> Series {
    let shape = format!(
        "{}k keys, pages of 1000, 4 in flight{}",
        settings.list_keys / 1000,
        if settings.quick { " (quick)" } else { "" }
    );
    let mut series = Series::new("list", &shape);
    if let Err(e) = duro::testing::run_local(list_runs(settings, &mut series)) {
        series.fail(e);
    }
    series
}

async fn list_runs(settings: &Settings, series: &mut Series) -> Result<(), String> {
    let (duro, namespace) = start(settings, "list", "kv").await?;
    let stub = capnp_load::stub(&namespace, "big");
    let keys = settings.list_keys;
    let fill_begun = Instant::now();
    let filled = fill(&stub, keys, settings.setup_time_max).await?;
    let fill_secs = fill_begun.elapsed().as_secs_f64();
    if filled < keys {
        return Err(format!(
            "only {filled} of {keys} keys stored within {:?}",
            settings.setup_time_max
        ));
    }
    let data_bytes = std::fs::metadata(duro.data_dir.join("data.mdb"))
        .map_err(|e| format!("stat data.mdb: {e}"))?
        .len();
    let pid = duro.child.pid();
    let rng = Rc::new(std::cell::RefCell::new(Rng::new(0x5eed_0001)));
    let stub = Rc::new(stub);
    let page: CallFn = Rc::new(move |_, _| {
        let start = rng.borrow_mut().below(keys - PAGE + 1);
        let url = format!("/list?start={}&limit={PAGE}", list_key(start));
        Box::pin(capnp_load::fetch(&stub, "GET", &url, b"", &[200]))
    });
    let shape = Shape {
        connections: 1,
        in_flight: 4,
    };
    run_shape(shape, settings.warmup_budget(), &page, &|| None).await?;
    let cpu = move || child::process_cpu(pid);
    for _ in 0..settings.runs {
        series.push(run_shape(shape, settings.run_budget(), &page, &cpu).await);
    }
    series.add_extra("keys", "", &[keys as f64]);
    series.add_extra("fill_keys_per_s", "keys/s", &[keys as f64 / fill_secs]);
    series.add_extra("data_mdb_bytes", "bytes", &[data_bytes as f64]);
    series.add_extra("bytes_per_key", "bytes", &[data_bytes as f64 / keys as f64]);
    Ok(())
}

/// Stores `keys` keys (16-byte values) in the `kv` object of `stub`, 128 per transaction, 16
/// transactions in flight; answers how many were stored before `time_max`.
async fn fill(stub: &durable_object::Client, keys: u64, time_max: Duration) -> Result<u64, String> {
    let batches = keys.div_ceil(FILL_BATCH);
    let put_batch = |b: u64| {
        let ops: Vec<String> = (b * FILL_BATCH..((b + 1) * FILL_BATCH).min(keys))
            .map(|i| {
                format!(
                    r#"{{"op":"put","key":"{}","value":"value-{i:010}"}}"#,
                    list_key(i)
                )
            })
            .collect();
        let body = format!(r#"{{"ops":[{}]}}"#, ops.join(","));
        capnp_load::fetch(stub, "POST", "/txn", body.as_bytes(), &[200])
    };
    let driven = drive(16, Budget::new(time_max, batches), put_batch).await?;
    Ok((driven.ops * FILL_BATCH).min(keys))
}

/// Objects of `kv-mixed`.
const MIXED_OBJECTS: u64 = 10_000;
/// Keys per object.
const MIXED_KEYS: u64 = 8;

pub fn kv_mixed(settings: &Settings) -> Series {
    let mut series = Series::new("kv-mixed", "10k objects, 90% get, 64 in flight");
    if let Err(e) = duro::testing::run_local(kv_mixed_runs(settings, &mut series)) {
        series.fail(e);
    }
    series
}

async fn kv_mixed_runs(settings: &Settings, series: &mut Series) -> Result<(), String> {
    let (duro, namespace) = start(settings, "kv-mixed", "kv").await?;
    let stubs: Rc<Vec<durable_object::Client>> = Rc::new(
        (0..MIXED_OBJECTS)
            .map(|i| capnp_load::stub(&namespace, &format!("m{i}")))
            .collect(),
    );
    // Every object activated and holding one key before measuring.
    let touch = |i: u64| capnp_load::fetch(&stubs[i as usize], "PUT", "/k/k0", PAYLOAD, &[204]);
    let touched = drive(
        IN_FLIGHT,
        Budget::new(settings.setup_time_max, MIXED_OBJECTS),
        touch,
    )
    .await?;
    if touched.ops < MIXED_OBJECTS {
        return Err(format!(
            "only {} of {MIXED_OBJECTS} objects touched in time",
            touched.ops
        ));
    }
    let rng = Rc::new(std::cell::RefCell::new(Rng::new(0x5eed_0002)));
    let mixed: CallFn = Rc::new(move |_, _| {
        let mut rng = rng.borrow_mut();
        let stub = &stubs[rng.below(MIXED_OBJECTS) as usize];
        let url = format!("/k/k{}", rng.below(MIXED_KEYS));
        if rng.below(10) == 0 {
            Box::pin(capnp_load::fetch(stub, "PUT", &url, PAYLOAD, &[204]))
        } else {
            Box::pin(capnp_load::fetch(stub, "GET", &url, b"", &[200, 404]))
        }
    });
    let shape = Shape {
        connections: 1,
        in_flight: IN_FLIGHT,
    };
    run_shape(shape, settings.warmup_budget(), &mixed, &|| None).await?;
    let pid = duro.child.pid();
    let cpu = move || child::process_cpu(pid);
    for _ in 0..settings.runs {
        series.push(run_shape(shape, settings.run_budget(), &mixed, &cpu).await);
    }
    Ok(())
}
