//! `duro bench`: measures duro against the ceilings below it (bare capnp-rpc, bare LMDB, the
//! disk's fsync) and against a peer (workerd), on loopback, and checks the targets.
//!
//! Every workload runs against a fresh `duro serve` child with a fresh data dir; every loop is
//! bounded in time and in count. A workload is run several times and reported as the median
//! with the spread; workloads that are compared are measured in alternation (run 1 of A, run 1
//! of B, run 2 of A...), and their ratio is taken run by run, so that a noisy neighbour moves
//! both sides of a ratio alike.
//!
//! `--micro` measures hot paths in-process instead (ns/op).

mod alarms;
mod capnp_load;
mod child;
mod client;
mod cluster;
mod disk;
mod durable;
mod external;
mod hist;
mod http_load;
mod measure;
mod micro;
mod objects;
mod peer;
mod report;
mod room;
mod rpc_group;
mod shards;
mod typed;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub use capnp_load::PAYLOAD;
use measure::Series;
pub(crate) use typed::typed_counter_capnp;

/// The workloads, in the order they run.
pub const WORKLOADS: &[&str] = &[
    "echo-baseline",
    "noop",
    "incr",
    "typed",
    "lmdb-baseline",
    "activate",
    "list",
    "kv-mixed",
    "alarms",
    "gateway",
    "workerd",
    "room",
    "external",
    "shards",
    "client",
    "cluster",
];

/// Arguments of `duro bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A short run (~30 s): fewer and shorter runs, 20,000 activations, 100,000 listed keys.
    #[arg(long)]
    pub quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run only these workloads (comma-separated): echo-baseline, noop, incr, typed,
    /// lmdb-baseline, activate, list, kv-mixed, alarms, gateway, workerd, room, external,
    /// shards, client, cluster.
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub only: Vec<String>,
    /// Print each target with PASS or FAIL, and exit non-zero if one fails.
    #[arg(long)]
    pub check: bool,
    /// Micro-benchmarks of hot paths in-process (ns/op) instead of the workloads.
    #[arg(long)]
    pub micro: bool,
    /// The workerd binary to compare with (default: `workerd` on PATH; skipped if absent).
    /// `npm install workerd` in any dir puts one in node_modules/.bin/.
    #[arg(long, value_name = "PATH")]
    pub workerd: Option<PathBuf>,
    /// Where the data dirs go (default: the system's temp dir). The LMDB baseline and the
    /// fsync probe use the same place, so they measure the same disk.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Measured runs per workload and shape (default 3 with --quick, else 5).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Seconds per measured run (default 0.4 with --quick, else 2).
    #[arg(long, value_name = "SECONDS")]
    pub run_secs: Option<f64>,
    /// `shards` only: load a server already running at ADDR (e.g. on a larger machine, with the
    /// generator here or on another one) instead of starting its own at 1, 2 and N shards.
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Option<std::net::SocketAddr>,
    /// With --connect: the server's PID, to read its CPU per call from /proc (same machine).
    #[arg(long, value_name = "PID", requires = "connect")]
    pub server_pid: Option<u32>,
    /// `cluster`: a PostgreSQL server on which the user may create databases
    /// (postgresql://USER@HOST:PORT/DB); without one, its PostgreSQL series are skipped.
    #[arg(long, value_name = "URL", env = "DURO_BENCH_PG")]
    pub postgres: Option<String>,
    /// Internal: serves the typed counter with this data dir, as the `typed` workload's
    /// child process.
    #[arg(long, hide = true, value_name = "DIR")]
    pub typed_child: Option<PathBuf>,
}

/// How long and how much each workload runs.
pub(crate) struct Settings {
    pub quick: bool,
    pub runs: usize,
    pub run_time: Duration,
    pub warmup: Duration,
    /// Most calls in one measured run, whatever its duration.
    pub ops_max: u64,
    /// Objects activated per `activate` run.
    pub activations: u64,
    /// Keys the `list` object holds.
    pub list_keys: u64,
    /// Longest a setup phase (filling, touching objects) may take before it stops short.
    pub setup_time_max: Duration,
    pub workerd: Option<PathBuf>,
    /// A running server for `shards` to load, and its PID if known.
    pub connect: Option<(std::net::SocketAddr, Option<u32>)>,
    /// A PostgreSQL server for `cluster`.
    pub postgres: Option<String>,
    /// Holds every data dir; removed at the end.
    pub root: tempfile::TempDir,
}

impl Settings {
    fn new(args: &BenchArgs) -> Result<Settings, String> {
        let quick = args.quick;
        let root = match &args.dir {
            Some(dir) => tempfile::Builder::new()
                .prefix("duro-bench-")
                .tempdir_in(dir),
            None => tempfile::Builder::new().prefix("duro-bench-").tempdir(),
        }
        .map_err(|e| format!("creating a temp dir: {e}"))?;
        let run_secs = args.run_secs.unwrap_or(if quick { 0.4 } else { 2.0 });
        if !(0.05..=600.0).contains(&run_secs) {
            return Err("--run-secs must be between 0.05 and 600".into());
        }
        let runs = args.runs.unwrap_or(if quick { 3 } else { 5 });
        if !(1..=100).contains(&runs) {
            return Err("--runs must be between 1 and 100".into());
        }
        Ok(Settings {
            quick,
            runs,
            run_time: Duration::from_secs_f64(run_secs),
            warmup: Duration::from_secs_f64(if quick { 0.2 } else { 0.5 }),
            ops_max: 10_000_000,
            activations: if quick { 20_000 } else { 100_000 },
            list_keys: if quick { 100_000 } else { 1_000_000 },
            setup_time_max: Duration::from_secs(if quick { 30 } else { 180 }),
            workerd: args.workerd.clone(),
            connect: args.connect.map(|addr| (addr, args.server_pid)),
            postgres: args.postgres.clone(),
            root,
        })
    }

    /// The budget of one measured run.
    pub fn run_budget(&self) -> measure::Budget {
        measure::Budget::new(self.run_time, self.ops_max)
    }

    /// The budget of a warm-up.
    pub fn warmup_budget(&self) -> measure::Budget {
        measure::Budget::new(self.warmup, self.ops_max)
    }

    /// A fresh dir under the root.
    pub fn fresh_dir(&self, name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root.path().join(format!("{name}-{n}"))
    }
}

/// Which workloads run.
pub(crate) struct Selection(Vec<String>);

impl Selection {
    pub fn has(&self, name: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|n| n == name)
    }
}

/// Runs the benchmarks.
pub fn run(args: &BenchArgs) -> ExitCode {
    if let Some(data_dir) = &args.typed_child {
        return typed::serve_child(data_dir);
    }
    if args.micro {
        return micro::run(args.quick, args.json.as_deref());
    }
    for name in &args.only {
        if !WORKLOADS.contains(&name.as_str()) {
            eprintln!(
                "duro bench: unknown workload {name:?}; known: {}",
                WORKLOADS.join(", ")
            );
            return ExitCode::FAILURE;
        }
    }
    let settings = match Settings::new(args) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("duro bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    let selection = Selection(args.only.clone());
    let begun = Instant::now();
    let series = run_workloads(&settings, &selection);
    let report = report::Report::new(&settings, series, begun.elapsed());
    report.print(args.check);
    if let Some(path) = &args.json {
        if let Err(error) = report.write_json(path) {
            eprintln!("duro bench: writing {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("figures written to {}", path.display());
    }
    if args.check && report.any_failed() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run_workloads(settings: &Settings, selection: &Selection) -> Vec<Series> {
    let mut series = Vec::new();
    let mut step = |name: &str, run: &dyn Fn() -> Vec<Series>| {
        let begun = Instant::now();
        eprint!("  {name} ...");
        let results = run();
        eprintln!(" {:.1} s", begun.elapsed().as_secs_f64());
        series.extend(results);
    };
    eprintln!(
        "duro bench: {} mode, {} runs × {:.1} s per workload and shape",
        if settings.quick { "quick" } else { "full" },
        settings.runs,
        settings.run_time.as_secs_f64()
    );
    if selection.has("echo-baseline") || selection.has("noop") {
        step("echo-baseline, noop", &|| {
            rpc_group::run(settings, selection)
        });
    }
    if selection.has("incr") || selection.has("lmdb-baseline") {
        step("incr, lmdb-baseline, fsync", &|| {
            durable::run(settings, selection)
        });
    }
    if selection.has("typed") {
        step("typed", &|| typed::run(settings));
    }
    if selection.has("activate") {
        step("activate", &|| objects::activate(settings));
    }
    if selection.has("list") {
        step("list", &|| vec![objects::list(settings)]);
    }
    if selection.has("kv-mixed") {
        step("kv-mixed", &|| vec![objects::kv_mixed(settings)]);
    }
    if selection.has("alarms") {
        step("alarms", &|| alarms::run(settings));
    }
    if selection.has("gateway") || selection.has("workerd") {
        step("gateway, workerd", &|| peer::run(settings, selection));
    }
    if selection.has("room") {
        step("room", &|| room::run(settings));
    }
    if selection.has("external") {
        step("external", &|| external::run(settings));
    }
    if selection.has("shards") {
        step("shards", &|| shards::run(settings));
    }
    if selection.has("client") {
        step("client", &|| client::run(settings));
    }
    if selection.has("cluster") {
        step("cluster", &|| cluster::run(settings));
    }
    series
}
