//! `typed`: a durable increment as a typed call (`Counter.increment` of
//! `examples/typed_counter.capnp`) against the same increment as `fetch` (`POST /`), on the
//! same class (`examples/typed_counter.rs`, compiled in) in the same server, in the shapes of
//! `incr`: one connection, 64 calls in flight, on one hot object and spread over 1000 objects.
//! Both do one get and one put in the object and are answered after the fsync; what differs is
//! the call's path (a typed call dispatched by interface ID and forwarded to the object's
//! capability, or an HTTP request converted to and from capnp). The two are measured in
//! alternation, and their ratio run by run.
//!
//! The server is a child process, as `incr`'s: `duro bench --typed-child DIR` (hidden), which
//! hosts the typed counter in the namespace `counter` and prints `duro listening on ADDR`.

use std::future::Future;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::rc::Rc;

use capnp::capability::FromClientHook;

use super::Settings;
use super::capnp_load::{self, PAYLOAD};
use super::child::{self, Child};
use super::durable::{HOT, SPREAD, SPREAD_OBJECTS};
use super::measure::Series;
use super::rpc_group::{CallFn, Shape, run_shape};
use duro::duro_capnp::{durable_object, host};

#[allow(dead_code)] // The class alone; the example's client and `main` are not the bench's.
#[path = "../../../../examples/typed_counter.rs"]
mod typed_counter;
pub(crate) use typed_counter::typed_counter_capnp;
use typed_counter_capnp::counter;

/// The series of typed increments.
pub const TYPED: &str = "typed";
/// The series of the same increments through `fetch`.
pub const FETCH: &str = "typed-fetch";

/// Calls in flight, on one connection, as `incr`.
const IN_FLIGHT: usize = 64;

/// Serves the typed counter as the `typed` workload's child: until killed.
pub fn serve_child(data_dir: &Path) -> ExitCode {
    let listen = duro::ListenAddr::Tcp(([127, 0, 0, 1], 0).into());
    let served = typed_counter::register(duro::Server::builder())
        .listen(listen)
        .data_dir(data_dir)
        .run();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("duro bench --typed-child: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the child on `data_dir`; the child and its address.
fn start_child(data_dir: &Path) -> Result<(Child, std::net::SocketAddr), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the duro binary: {e}"))?;
    let mut command = Command::new(exe);
    command.args(["bench", "--typed-child"]).arg(data_dir);
    command.env("RUST_LOG", "warn");
    let mut child = child::spawn(command, &data_dir.with_extension("log"))?;
    let addr = child::parse_addr(&child.next_line()?, "duro listening on ")?;
    Ok((child, addr))
}

/// `increment(1)` on object `i % counters.len()`.
fn typed_increments(counters: Vec<counter::Client>) -> CallFn {
    Rc::new(move |_, i| {
        let counter = &counters[(i % counters.len() as u64) as usize];
        Box::pin(increment(counter))
    })
}

/// `POST /` on object `i % stubs.len()`.
fn fetch_increments(stubs: Vec<durable_object::Client>) -> CallFn {
    Rc::new(move |_, i| {
        let stub = &stubs[(i % stubs.len() as u64) as usize];
        Box::pin(capnp_load::fetch(stub, "POST", "/", PAYLOAD, &[200]))
    })
}

/// Sends `increment(1)` now and resolves when the new value arrives.
fn increment(counter: &counter::Client) -> impl Future<Output = Result<(), String>> + use<> {
    let mut call = counter.increment_request();
    call.get().set_by(1);
    let promise = call.send().promise;
    async move {
        let reply = promise.await.map_err(|e| e.to_string())?;
        let value = reply.get().map_err(|e| e.to_string())?.get_value();
        if value > 0 {
            Ok(())
        } else {
            Err(format!("the counter answered {value}"))
        }
    }
}

pub fn run(settings: &Settings) -> Vec<Series> {
    duro::testing::run_local(run_group(settings))
}

async fn run_group(settings: &Settings) -> Vec<Series> {
    let mut series = [
        Series::new(TYPED, HOT),
        Series::new(FETCH, HOT),
        Series::new(TYPED, SPREAD),
        Series::new(FETCH, SPREAD),
    ];
    let fail_all = |series: &mut [Series], error: String| {
        series.iter_mut().for_each(|s| s.fail(&error));
    };
    let (child, addr) = match start_child(&settings.fresh_dir("typed")) {
        Ok(started) => started,
        Err(error) => {
            fail_all(&mut series, error);
            return series.into();
        }
    };
    let host = match capnp_load::connect::<host::Client>(addr).await {
        Ok(host) => host,
        Err(error) => {
            fail_all(&mut series, error);
            return series.into();
        }
    };
    let namespace = capnp_load::namespace(&host, "counter");
    let stubs = |prefix: &str, count: u64| -> Vec<durable_object::Client> {
        (0..count)
            .map(|i| capnp_load::stub(&namespace, &format!("{prefix}{i}")))
            .collect()
    };
    let typed = |stubs: Vec<durable_object::Client>| {
        typed_increments(stubs.into_iter().map(|s| s.cast_to()).collect())
    };
    // Typed calls and fetches go to objects of their own, so each series starts from warm
    // objects of its own kind of call.
    let calls = [
        typed(stubs("typed-hot", 1)),
        fetch_increments(stubs("fetch-hot", 1)),
        typed(stubs("typed-", SPREAD_OBJECTS)),
        fetch_increments(stubs("fetch-", SPREAD_OBJECTS)),
    ];
    let shape = Shape {
        connections: 1,
        in_flight: IN_FLIGHT,
    };
    // Warm up: every object activated, the code paths and the disk warm.
    for (series, call) in series.iter_mut().zip(&calls) {
        if let Err(e) = run_shape(shape, settings.warmup_budget(), call, &|| None).await {
            series.fail(e);
        }
    }
    let pid = child.pid();
    let cpu = move || child::process_cpu(pid);
    for _ in 0..settings.runs {
        for (series, call) in series.iter_mut().zip(&calls) {
            if !series.failed() {
                series.push(run_shape(shape, settings.run_budget(), call, &cpu).await);
            }
        }
    }
    series.into()
}
