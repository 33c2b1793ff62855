//! The closed-loop driver every load workload uses, and the figures of a run and of a series of
//! runs.
//!
//! The driver keeps `in_flight` calls outstanding (a `FuturesUnordered`), starts a new one as
//! each completes, and stops starting them at the run's deadline or op budget, whichever comes
//! first; then it lets the outstanding ones finish. Each call's latency goes into a
//! [`Histogram`]. One thread drives every connection of a shape, so the generator costs one
//! core at most, leaving the other to the server.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;

use super::hist::Histogram;

/// When a run stops starting calls: at `until` or after `ops_max` calls, whichever is first.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub until: Instant,
    pub ops_max: u64,
}

impl Budget {
    /// A budget of `duration` from now, and `ops_max` calls.
    pub fn new(duration: Duration, ops_max: u64) -> Budget {
        Budget {
            until: Instant::now() + duration,
            ops_max,
        }
    }
}

/// What one driver (one connection) did.
#[derive(Default)]
pub struct Driven {
    pub ops: u64,
    pub latency: Histogram,
}

/// Keeps `in_flight` calls made by `call(i)` outstanding until `budget` is spent, then waits for
/// the last ones. The first error ends the run (a workload that fails is reported, not timed).
///
/// Calls still outstanding [`DRAIN_MAX`] after the budget's deadline end the run with an error:
/// a server that stops answering cannot hang the bench.
pub async fn drive<F, Fut>(in_flight: usize, budget: Budget, call: F) -> Result<Driven, String>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::from_std(budget.until) + DRAIN_MAX;
    match tokio::time::timeout_at(deadline, drive_closed_loop(in_flight, budget, call)).await {
        Ok(driven) => driven,
        Err(_) => Err(format!(
            "calls still unanswered {DRAIN_MAX:?} after the run's end"
        )),
    }
}

/// How long calls outstanding at the end of a run may take to complete.
pub const DRAIN_MAX: Duration = Duration::from_secs(15);

async fn drive_closed_loop<F, Fut>(
    in_flight: usize,
    budget: Budget,
    mut call: F,
) -> Result<Driven, String>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut driven = Driven::default();
    let mut pending = FuturesUnordered::new();
    let mut issued = 0u64;
    while issued < budget.ops_max && (issued as usize) < in_flight {
        pending.push(timed(call(issued)));
        issued += 1;
    }
    while let Some((result, latency)) = pending.next().await {
        result?;
        driven.ops += 1;
        driven.latency.record(latency);
        if issued < budget.ops_max && Instant::now() < budget.until {
            pending.push(timed(call(issued)));
            issued += 1;
        }
    }
    Ok(driven)
}

/// `call` with the time from now (when the call was made and, for a capnp call, sent) until it
/// completes.
fn timed<Fut: Future>(call: Fut) -> impl Future<Output = (Fut::Output, Duration)> {
    let begun = Instant::now();
    async move { (call.await, begun.elapsed()) }
}

/// Runs one driver per connection at once (on this thread) and merges their figures.
pub async fn drive_all<Fut>(drivers: Vec<Fut>) -> Result<Run, String>
where
    Fut: Future<Output = Result<Driven, String>>,
{
    let cpu_before = generator_cpu();
    let begun = Instant::now();
    let results = futures::future::join_all(drivers).await;
    let elapsed = begun.elapsed();
    let mut run = Run {
        ops: 0,
        elapsed,
        latency: Histogram::default(),
        server_cpu: None,
        generator_cpu: cpu_before
            .zip(generator_cpu())
            .map(|(b, a)| a.saturating_sub(b)),
    };
    for driven in results {
        let driven = driven?;
        run.ops += driven.ops;
        run.latency.merge(&driven.latency);
    }
    Ok(run)
}

/// CPU time of this thread, which runs every client of a run (getrusage: µs resolution,
/// where /proc counts 10 ms ticks).
pub fn generator_cpu() -> Option<Duration> {
    rusage_cpu(libc::RUSAGE_THREAD)
}

/// CPU time of this whole process, every thread of it (getrusage).
pub fn process_cpu() -> Option<Duration> {
    rusage_cpu(libc::RUSAGE_SELF)
}

fn rusage_cpu(who: libc::c_int) -> Option<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given, or fails.
    if unsafe { libc::getrusage(who, usage.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: initialized by the successful call above.
    let usage = unsafe { usage.assume_init() };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Some(Duration::from_micros(
        micros(usage.ru_utime) + micros(usage.ru_stime),
    ))
}

/// One measured run.
pub struct Run {
    pub ops: u64,
    pub elapsed: Duration,
    pub latency: Histogram,
    /// CPU the server used during the run, when it could be read.
    pub server_cpu: Option<Duration>,
    /// CPU the load generator (this thread) used during the run.
    pub generator_cpu: Option<Duration>,
}

impl Run {
    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn per_op_us(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.ops.max(1) as f64
    }

    pub fn summary(&self) -> RunSummary {
        let us = |q| self.latency.quantile_ns(q) as f64 / 1000.0;
        RunSummary {
            ops: self.ops,
            ops_per_s: self.ops_per_s(),
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            server_cpu_us_per_op: self.server_cpu.map(|cpu| self.per_op_us(cpu)),
            generator_cpu_us_per_op: self.generator_cpu.map(|cpu| self.per_op_us(cpu)),
        }
    }
}

/// The figures of one run, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub ops: u64,
    pub ops_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Server CPU (user + system) per op, in µs: what bounds throughput on a shared core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_op: Option<f64>,
    /// The load generator's CPU per op, in µs: when it nears 1e6 / ops_per_s, the generator,
    /// not the server, bounds the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_cpu_us_per_op: Option<f64>,
}

/// Median, smallest and largest of some figures.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }
}

/// A workload in one shape, measured over several runs (or why it was not).
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    pub workload: String,
    pub shape: String,
    pub runs: Vec<RunSummary>,
    /// The figures of the table: medians over `runs` (set by [`Series::summarize`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<SeriesSummary>,
    /// Why the series has no runs (skipped or failed), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Figures particular to the workload (e.g. µs of CPU per activation), each the median over
    /// runs, with their spread.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<Extra>,
}

/// What the table shows of a series.
#[derive(Clone, Debug, Serialize)]
pub struct SeriesSummary {
    pub runs: usize,
    pub ops_per_s: Spread,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_cpu_us_per_op: Option<f64>,
}

/// A figure particular to a workload.
#[derive(Clone, Debug, Serialize)]
pub struct Extra {
    pub name: String,
    pub unit: String,
    pub spread: Spread,
}

impl Series {
    pub fn new(workload: &str, shape: &str) -> Series {
        Series {
            workload: workload.into(),
            shape: shape.into(),
            runs: Vec::new(),
            summary: None,
            skipped: None,
            extra: Vec::new(),
        }
    }

    pub fn skipped(workload: &str, shape: &str, why: impl Into<String>) -> Series {
        let mut series = Series::new(workload, shape);
        series.skipped = Some(why.into());
        series
    }

    /// Computes [`Series::summary`] from the runs.
    pub fn summarize(&mut self) {
        self.summary = self.ops_per_s().map(|ops_per_s| SeriesSummary {
            runs: self.runs.len(),
            ops_per_s,
            p50_us: self.p50_us().unwrap_or(0.0),
            p99_us: self.p99_us().unwrap_or(0.0),
            p999_us: self.p999_us().unwrap_or(0.0),
            server_cpu_us_per_op: self.server_cpu_us_per_op(),
            generator_cpu_us_per_op: self.generator_cpu_us_per_op(),
        });
    }

    pub fn ops_per_s(&self) -> Option<Spread> {
        Spread::of(self.runs.iter().map(|r| r.ops_per_s))
    }

    pub fn p50_us(&self) -> Option<f64> {
        Spread::of(self.runs.iter().map(|r| r.p50_us)).map(|s| s.median)
    }

    pub fn p99_us(&self) -> Option<f64> {
        Spread::of(self.runs.iter().map(|r| r.p99_us)).map(|s| s.median)
    }

    pub fn p999_us(&self) -> Option<f64> {
        Spread::of(self.runs.iter().map(|r| r.p999_us)).map(|s| s.median)
    }

    pub fn server_cpu_us_per_op(&self) -> Option<f64> {
        Spread::of(self.runs.iter().filter_map(|r| r.server_cpu_us_per_op)).map(|s| s.median)
    }

    pub fn generator_cpu_us_per_op(&self) -> Option<f64> {
        Spread::of(self.runs.iter().filter_map(|r| r.generator_cpu_us_per_op)).map(|s| s.median)
    }

    /// Adds a workload-specific figure measured in each run.
    pub fn add_extra(&mut self, name: &str, unit: &str, values: &[f64]) {
        if let Some(spread) = Spread::of(values.iter().copied()) {
            self.extra.push(Extra {
                name: name.into(),
                unit: unit.into(),
                spread,
            });
        }
    }

    pub fn extra(&self, name: &str) -> Option<Spread> {
        self.extra.iter().find(|e| e.name == name).map(|e| e.spread)
    }

    /// Records a run's outcome: its figures, or the error that ended the series.
    pub fn push(&mut self, run: Result<Run, String>) {
        match run {
            Ok(run) => self.runs.push(run.summary()),
            Err(error) => self.fail(error),
        }
    }

    pub fn fail(&mut self, error: impl Into<String>) {
        if self.skipped.is_none() {
            self.skipped = Some(format!("failed: {}", error.into()));
        }
    }

    pub fn failed(&self) -> bool {
        self.skipped.is_some()
    }
}

/// A small, fast, seeded PRNG (xorshift64*), so workloads are repeatable and the generator
/// spends no time on randomness.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the bias is negligible for the small n used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
