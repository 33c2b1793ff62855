//! `external`: the durable counter written in Python (`examples/provider_counter.py`, served
//! by one provider process to `duro serve --external counter_py=pycounter`) against duro's
//! Rust counter (`counter`) on the same server, in the load shapes of `incr`: 64 calls in
//! flight on one connection, to one hot object and spread over 1000 objects, measured in
//! alternation. Each increment is `POST /`: for the Python counter a `get` and a `put` over
//! capnp between host and provider, then the commit and fsync; for the Rust one the same
//! storage calls inside the host.
//!
//! Skipped, with the reason, when `python3` with pycapnp or the example is not found. The
//! provider's CPU per op is reported under figures (the server's is in the table).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use super::Settings;
use super::capnp_load::{self, PAYLOAD};
use super::child::{self, Child};
use super::measure::Series;
use super::rpc_group::{CallFn, Shape, run_shape};
use duro::duro_capnp::{durable_object, host};

pub const PYTHON: &str = "external-py";
pub const RUST: &str = "external-rust";
pub const HOT: &str = "1 object, 64 in flight";
pub const SPREAD: &str = "1000 objects, 64 in flight";
const OBJECTS: u64 = 1000;
const SHAPE: Shape = Shape {
    connections: 1,
    in_flight: 64,
};

/// The Python counter's provider, as the source tree has it.
fn provider_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/provider_counter.py")
}

pub fn run(settings: &Settings) -> Vec<Series> {
    duro::testing::run_local(run_group(settings))
}

/// POST on object `i % stubs.len()`.
fn increments(stubs: Vec<durable_object::Client>) -> CallFn {
    Rc::new(move |_, i| {
        let stub = &stubs[(i % stubs.len() as u64) as usize];
        Box::pin(capnp_load::fetch(stub, "POST", "/", PAYLOAD, &[200]))
    })
}

/// Starts the provider against `addr` and waits until it registered.
fn start_provider(settings: &Settings, addr: std::net::SocketAddr) -> Result<Child, String> {
    let python = child::find_executable(None, "python3").ok_or("python3 is not on PATH")?;
    let script = provider_script();
    if !script.is_file() {
        return Err(format!("{} is not there", script.display()));
    }
    let mut command = Command::new(python);
    command.arg(&script).arg(addr.to_string()).arg("--once");
    let log = settings.fresh_dir("provider").with_extension("log");
    let mut provider = child::spawn(command, &log)?;
    match provider.next_line() {
        Ok(line) if line.starts_with("registered ") => Ok(provider),
        Ok(line) => Err(format!("the provider said {line:?}")),
        Err(_) => Err(format!(
            "the provider did not register (is pycapnp installed?): {}",
            provider.log_tail()
        )),
    }
}

async fn run_group(settings: &Settings) -> Vec<Series> {
    let mut series: Vec<Series> = [(PYTHON, HOT), (RUST, HOT), (PYTHON, SPREAD), (RUST, SPREAD)]
        .iter()
        .map(|(workload, shape)| Series::new(workload, shape))
        .collect();
    let flags = ["--external", "counter_py=pycounter"];
    let started = child::start_duro_with(&settings.fresh_dir("external"), false, &flags)
        .and_then(|duro| Ok((start_provider(settings, duro.addr)?, duro)));
    let (provider, duro) = match started {
        Ok(started) => started,
        Err(why) => {
            return series
                .iter()
                .map(|s| Series::skipped(&s.workload, &s.shape, why.clone()))
                .collect();
        }
    };
    let host = match capnp_load::connect::<host::Client>(duro.addr).await {
        Ok(host) => host,
        Err(e) => {
            series.iter_mut().for_each(|s| s.fail(e.clone()));
            return series;
        }
    };
    let calls: Vec<CallFn> = [
        ("counter_py", 1),
        ("counter", 1),
        ("counter_py", OBJECTS),
        ("counter", OBJECTS),
    ]
    .iter()
    .map(|(namespace, objects)| {
        let namespace = capnp_load::namespace(&host, namespace);
        let stubs = (0..*objects).map(|i| capnp_load::stub(&namespace, &format!("c{i}")));
        increments(stubs.collect())
    })
    .collect();
    // Warm up: every object activated (on the provider too), code paths and the disk warm.
    for (series, call) in series.iter_mut().zip(&calls) {
        if let Err(e) = run_shape(SHAPE, settings.warmup_budget(), call, &|| None).await {
            series.fail(e);
        }
    }
    let (server, provider_pid) = (duro.child.pid(), provider.pid());
    let mut provider_cpu: Vec<Vec<f64>> = vec![Vec::new(); series.len()];
    for _ in 0..settings.runs {
        for (i, call) in calls.iter().enumerate() {
            if series[i].failed() {
                continue;
            }
            let before = child::process_cpu(provider_pid);
            let run = run_shape(SHAPE, settings.run_budget(), call, &|| {
                child::process_cpu(server)
            })
            .await;
            if let (Ok(run), Some(before), Some(after)) =
                (&run, before, child::process_cpu(provider_pid))
            {
                let per_op = (after - before).as_secs_f64() * 1e6 / run.ops.max(1) as f64;
                provider_cpu[i].push(per_op);
            }
            series[i].push(run);
        }
    }
    for (series, cpu) in series.iter_mut().zip(&provider_cpu) {
        if series.workload == PYTHON && !cpu.is_empty() {
            let name = format!("provider, {}", series.shape.split(',').next().unwrap_or(""));
            series.add_extra(&name, "µs/op", cpu);
        }
    }
    drop(provider);
    series
}
