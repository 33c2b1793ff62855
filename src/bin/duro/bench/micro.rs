//! `duro bench --micro`: hot paths measured in-process, in ns per operation (median of runs),
//! so a regression in one of them shows without the noise of a network round trip:
//! ID minting and parsing, HTTP ↔ capnp conversion, a fetch on a warm object of an in-process
//! host, and a cache-hit `storage.get`.

use std::future::Future;
use std::hint::black_box;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::measure::Spread;
use duro::duro_capnp::{http_request, http_response};
use duro::id::IdMinter;
use duro::wire::convert;
use duro::{BoxError, DurableObject, Request, Response, State};

/// A hot path's figure.
#[derive(Serialize)]
struct Figure {
    name: String,
    ns_per_op: Spread,
    runs: usize,
}

/// How long each run lasts, and how many runs.
struct Plan {
    run_time: Duration,
    runs: usize,
}

/// Times `op` in runs of about `plan.run_time` each (the iteration count is calibrated first).
fn measure(plan: &Plan, name: &str, mut op: impl FnMut()) -> Figure {
    let iterations = calibrate(plan.run_time, |n| {
        let begun = Instant::now();
        for _ in 0..n {
            op();
        }
        begun.elapsed()
    });
    let per_op = (0..plan.runs).map(|_| {
        let begun = Instant::now();
        for _ in 0..iterations {
            op();
        }
        begun.elapsed().as_nanos() as f64 / iterations as f64
    });
    figure(name, per_op.collect(), plan.runs)
}

/// The same for an async `op`, on the current `LocalSet`.
async fn measure_async<F: Future<Output = ()>>(
    plan: &Plan,
    name: &str,
    ops_per_call: u64,
    mut op: impl FnMut() -> F,
) -> Figure {
    let mut iterations = 1u64;
    // Doubling until one batch takes a tenth of a run: async ops are too slow to need more.
    loop {
        let begun = Instant::now();
        for _ in 0..iterations {
            op().await;
        }
        if begun.elapsed() >= plan.run_time / 10 || iterations >= 1 << 30 {
            break;
        }
        iterations *= 2;
    }
    iterations *= 10;
    let mut per_op = Vec::new();
    for _ in 0..plan.runs {
        let begun = Instant::now();
        for _ in 0..iterations {
            op().await;
        }
        per_op.push(begun.elapsed().as_nanos() as f64 / (iterations * ops_per_call) as f64);
    }
    figure(name, per_op, plan.runs)
}

fn figure(name: &str, per_op: Vec<f64>, runs: usize) -> Figure {
    Figure {
        name: name.into(),
        ns_per_op: Spread::of(per_op).unwrap_or(Spread {
            median: 0.0,
            min: 0.0,
            max: 0.0,
        }),
        runs,
    }
}

/// Iterations that take about `target`, found by doubling.
fn calibrate(target: Duration, mut time: impl FnMut(u64) -> Duration) -> u64 {
    let mut n = 1u64;
    loop {
        let took = time(n);
        if took >= target / 10 || n >= 1 << 40 {
            let scale = target.as_secs_f64() / took.as_secs_f64().max(1e-9);
            return ((n as f64 * scale) as u64).max(1);
        }
        n *= 2;
    }
}

fn sample_request() -> Request {
    let mut request = Request::new(Bytes::from_static(super::PAYLOAD));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static("/k/some-key?x=1");
    request.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    request
}

fn ids(plan: &Plan) -> Vec<Figure> {
    let minter = IdMinter::new("bench", &[7; 32]);
    let id = minter.new_unique();
    let hex = id.to_hex();
    vec![
        measure(plan, "id: new_unique", || {
            black_box(minter.new_unique());
        }),
        measure(plan, "id: from_name", || {
            black_box(minter.from_name(black_box("object-name-17")));
        }),
        measure(plan, "id: parse (hex + MAC check)", || {
            black_box(minter.parse(black_box(&hex)).ok());
        }),
        measure(plan, "id: check (bytes, MAC)", || {
            black_box(minter.check(black_box(id.bytes()), None).ok());
        }),
        measure(plan, "id: to_hex", || {
            black_box(id.to_hex());
        }),
    ]
}

fn conversions(plan: &Plan) -> Vec<Figure> {
    let request = sample_request();
    let mut request_message = capnp::message::Builder::new_default();
    convert::request_to_capnp(&request, request_message.init_root());
    let mut response = Response::new(Bytes::from_static(b"42"));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let mut response_message = capnp::message::Builder::new_default();
    convert::response_to_capnp(&response, response_message.init_root());
    vec![
        measure(plan, "convert: request_to_capnp", || {
            let mut message = capnp::message::Builder::new_default();
            convert::request_to_capnp(black_box(&request), message.init_root());
            black_box(message);
        }),
        measure(plan, "convert: request_from_capnp", || {
            let reader: http_request::Reader = request_message
                .get_root_as_reader()
                .expect("a message built above");
            black_box(convert::request_from_capnp(black_box(reader)).ok());
        }),
        measure(plan, "convert: response_to_capnp", || {
            let mut message = capnp::message::Builder::new_default();
            convert::response_to_capnp(black_box(&response), message.init_root());
            black_box(message);
        }),
        measure(plan, "convert: response_from_capnp", || {
            let reader: http_response::Reader = response_message
                .get_root_as_reader()
                .expect("a message built above");
            black_box(convert::response_from_capnp(black_box(reader)).ok());
        }),
    ]
}

/// Cache-hit gets in a loop: `POST` stores the key, `GET /N` reads it N times.
struct GetLoop {
    state: State,
}

impl DurableObject for GetLoop {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        if request.method() == http::Method::POST {
            storage.put("k", &1u64).await?;
            return Ok(Response::new(Bytes::new()));
        }
        let count: u64 = request.uri().path().trim_start_matches('/').parse()?;
        let mut sum = 0u64;
        for _ in 0..count {
            sum += storage.get::<u64>("k").await?.unwrap_or(0);
        }
        Ok(Response::new(sum.to_string().into()))
    }
}

/// Gets per `GET` of [`GetLoop`].
const GETS_PER_FETCH: u64 = 1000;

async fn host_paths(plan: &Plan, dir: &Path) -> Result<Vec<Figure>, String> {
    let host = duro::builtin::register(duro::Server::builder())
        .class("getloop", |state, _env| GetLoop { state })
        .namespace("getloop", "getloop")
        .data_dir(dir)
        .open_host()
        .map_err(|e| format!("opening an in-process host: {e}"))?;
    let counter = host.namespace("counter").ok_or("no counter namespace")?;
    let getloop = host.namespace("getloop").ok_or("no getloop namespace")?;
    let request = || duro::testing::request("GET", "/", b"");
    let warm = counter.get_by_name("x").map_err(|e| e.to_string())?;
    warm.fetch(request()).await.map_err(|e| e.to_string())?;
    let loops = getloop.get_by_name("x").map_err(|e| e.to_string())?;
    loops
        .fetch(duro::testing::request("POST", "/", b""))
        .await
        .map_err(|e| e.to_string())?;
    let gets = format!("/{GETS_PER_FETCH}");
    let figures = vec![
        measure_async(plan, "host: fetch GET counter (warm, cache hit)", 1, || {
            let call = warm.fetch(request());
            async move {
                black_box(call.await.ok());
            }
        })
        .await,
        measure_async(
            plan,
            "host: get_by_name + fetch GET counter (warm)",
            1,
            || {
                let call = counter.get_by_name("x").map(|stub| stub.fetch(request()));
                async move {
                    if let Ok(call) = call {
                        black_box(call.await.ok());
                    }
                }
            },
        )
        .await,
        {
            // A new object each time: activation, a read of a missing key (an LMDB read), no
            // write. The same work `activate` measures, without the RPC around it.
            let mut next = 0u64;
            measure_async(plan, "host: activate a new object + first GET", 1, || {
                next += 1;
                let call = counter
                    .get_by_name(&format!("new{next}"))
                    .map(|stub| stub.fetch(request()));
                async move {
                    if let Ok(call) = call {
                        black_box(call.await.ok());
                    }
                }
            })
            .await
        },
        measure_async(plan, "storage: get (cache hit)", GETS_PER_FETCH, || {
            let call = loops.fetch(duro::testing::request("GET", &gets, b""));
            async move {
                black_box(call.await.ok());
            }
        })
        .await,
    ];
    // Dropped, not shut down: a shutdown resets (and logs) each of the many objects activated
    // above, and every write was already durable.
    drop(host);
    Ok(figures)
}

pub fn run(quick: bool, json: Option<&Path>) -> ExitCode {
    let plan = Plan {
        run_time: Duration::from_millis(if quick { 30 } else { 150 }),
        runs: if quick { 5 } else { 9 },
    };
    let mut figures = ids(&plan);
    figures.extend(conversions(&plan));
    let dir = match tempfile::Builder::new()
        .prefix("duro-bench-micro-")
        .tempdir()
    {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("duro bench: creating a temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    match duro::testing::run_local(host_paths(&plan, dir.path())) {
        Ok(host) => figures.extend(host),
        Err(e) => eprintln!("duro bench: host micro-benchmarks failed: {e}"),
    }
    println!(
        "\nduro bench --micro: ns/op, median [min–max] of {} runs of ~{} ms",
        plan.runs,
        plan.run_time.as_millis()
    );
    for figure in &figures {
        let spread = figure.ns_per_op;
        println!(
            "  {:<46} {:>10.1} ns  [{:.1}–{:.1}]",
            figure.name, spread.median, spread.min, spread.max
        );
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&figures).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("duro bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("figures written to {}", path.display());
    }
    ExitCode::SUCCESS
}
