//! The report: a table of every series, the ratios between workloads measured in alternation,
//! and the targets; and the same figures as JSON.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::Settings;
use super::client;
use super::durable::{HOT, SPREAD};
use super::external;
use super::measure::{Series, Spread};
use super::peer::{INCR, NOOP};
use super::room;
use super::rpc_group::{ECHO_CORKED, SHAPES};
use super::shards;
use super::typed;

#[derive(Serialize)]
pub struct Report {
    mode: &'static str,
    runs_per_series: usize,
    run_secs: f64,
    total_secs: f64,
    series: Vec<Series>,
    ratios: Vec<Ratio>,
    targets: Vec<Target>,
}

/// One workload's figure over another's.
#[derive(Serialize)]
pub struct Ratio {
    name: String,
    /// Taken run by run (run i of one over run i of the other, measured back to back), or,
    /// when the run counts differ, of the medians (then min = max = median).
    paired: bool,
    spread: Spread,
}

#[derive(Serialize, PartialEq, Eq, Clone, Copy, Debug)]
#[serde(rename_all = "UPPERCASE")]
enum Verdict {
    Pass,
    Fail,
    Skip,
}

#[derive(Serialize)]
pub struct Target {
    name: String,
    verdict: Verdict,
    /// What was measured, or why there is nothing to judge.
    detail: String,
}

fn find<'a>(series: &'a [Series], workload: &str, shape: &str) -> Option<&'a Series> {
    series
        .iter()
        .find(|s| s.workload == workload && s.shape == shape && !s.runs.is_empty())
}

/// `a / b` in ops/s, run by run when both have the same number of runs.
fn ops_ratio(name: String, a: &Series, b: &Series) -> Option<Ratio> {
    if a.runs.len() == b.runs.len() {
        let ratios = a
            .runs
            .iter()
            .zip(&b.runs)
            .map(|(a, b)| a.ops_per_s / b.ops_per_s);
        return Spread::of(ratios).map(|spread| Ratio {
            name,
            paired: true,
            spread,
        });
    }
    let ratio = a.ops_per_s()?.median / b.ops_per_s()?.median;
    Some(Ratio {
        name,
        paired: false,
        spread: Spread::of([ratio])?,
    })
}

fn ratios(series: &[Series]) -> Vec<Ratio> {
    let mut ratios = Vec::new();
    for shape in SHAPES.iter().map(|s| s.name()) {
        if let (Some(noop), Some(echo)) = (
            find(series, "noop", &shape),
            find(series, "echo-baseline", &shape),
        ) {
            ratios.extend(ops_ratio(
                format!("noop / echo-baseline, {shape}"),
                noop,
                echo,
            ));
        }
    }
    for shape in SHAPES.iter().map(|s| s.name()) {
        if let (Some(noop), Some(echo)) = (
            find(series, "noop", &shape),
            find(series, ECHO_CORKED, &shape),
        ) {
            ratios.extend(ops_ratio(
                format!("noop / {ECHO_CORKED}, {shape}"),
                noop,
                echo,
            ));
        }
    }
    let rpc = SHAPES[1].name();
    if let (Some(incr), Some(noop)) = (find(series, "incr", SPREAD), find(series, "noop", &rpc)) {
        ratios.extend(ops_ratio(
            format!("incr, {SPREAD} / noop, {rpc}"),
            incr,
            noop,
        ));
    }
    let lmdb = series
        .iter()
        .find(|s| s.workload == "lmdb-baseline" && !s.runs.is_empty());
    for shape in [HOT, SPREAD] {
        if let (Some(incr), Some(lmdb)) = (find(series, "incr", shape), lmdb) {
            ratios.extend(ops_ratio(
                format!("incr / lmdb-baseline, {shape}"),
                incr,
                lmdb,
            ));
        }
    }
    for shape in [HOT, SPREAD] {
        if let (Some(typed), Some(fetch)) = (
            find(series, typed::TYPED, shape),
            find(series, typed::FETCH, shape),
        ) {
            ratios.extend(ops_ratio(
                format!("{} / {}, {shape}", typed::TYPED, typed::FETCH),
                typed,
                fetch,
            ));
        }
    }
    for shape in [NOOP, INCR] {
        if let (Some(gateway), Some(workerd)) = (
            find(series, "gateway", shape),
            find(series, "workerd", shape),
        ) {
            ratios.extend(ops_ratio(
                format!("gateway / workerd, {shape}"),
                gateway,
                workerd,
            ));
        }
    }
    for shape in [external::HOT, external::SPREAD] {
        if let (Some(python), Some(rust)) = (
            find(series, external::PYTHON, shape),
            find(series, external::RUST, shape),
        ) {
            ratios.extend(ops_ratio(
                format!("{} / {}, {shape}", external::PYTHON, external::RUST),
                python,
                rust,
            ));
        }
    }
    for shape in [client::NOOP, client::INCR] {
        if let (Some(rust), Some(bare)) = (
            find(series, client::WORKLOAD, shape),
            find(series, client::BARE, shape),
        ) {
            ratios.extend(ops_ratio(
                format!("{} / {}, {shape}", client::WORKLOAD, client::BARE),
                rust,
                bare,
            ));
        }
    }
    if let (Some(duro), Some(workerd)) = (
        find(series, room::DURO, room::SHAPE),
        find(series, room::WORKERD, room::SHAPE),
    ) {
        ratios.extend(ops_ratio(
            format!("{} / {}, messages/s", room::DURO, room::WORKERD),
            duro,
            workerd,
        ));
    }
    ratios
}

fn ratio_of<'a>(ratios: &'a [Ratio], name: &str) -> Option<&'a Ratio> {
    ratios.iter().find(|r| r.name == name)
}

fn at_least(name: &str, ratio: Option<&Ratio>, min: f64, missing: &str) -> Target {
    match ratio {
        Some(ratio) => Target {
            name: name.into(),
            verdict: if ratio.spread.median >= min {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            detail: format!(
                "{:.2}× (runs {:.2}–{:.2}), need ≥ {min}×",
                ratio.spread.median, ratio.spread.min, ratio.spread.max
            ),
        },
        None => Target {
            name: name.into(),
            verdict: Verdict::Skip,
            detail: missing.into(),
        },
    }
}

fn skip_target(name: &str, why: &str) -> Target {
    Target {
        name: name.into(),
        verdict: Verdict::Skip,
        detail: why.into(),
    }
}

fn targets(series: &[Series], ratios: &[Ratio]) -> Vec<Target> {
    let rpc = &SHAPES[1].name();
    let mut targets = vec![at_least(
        "noop ≥ 0.95 × echo-baseline (64 in flight)",
        ratio_of(ratios, &format!("noop / echo-baseline, {rpc}")),
        0.95,
        "noop or echo-baseline did not run",
    )];
    targets.push(at_least(
        "incr over 1000 objects ≥ 0.6 × noop (64 in flight)",
        ratio_of(ratios, &format!("incr, {SPREAD} / noop, {rpc}")),
        0.6,
        "incr or noop did not run",
    ));
    targets.push(match find(series, "incr", SPREAD) {
        Some(incr) => match (incr.p50_us(), incr.p99_us()) {
            (Some(p50), Some(p99)) => Target {
                name: "incr over 1000 objects p99 ≤ 2 × its p50 (64 in flight)".into(),
                verdict: if p99 <= 2.0 * p50 {
                    Verdict::Pass
                } else {
                    Verdict::Fail
                },
                detail: format!(
                    "p99 {} vs p50 {} ({:.2}×), need ≤ 2×",
                    fmt_us(p99),
                    fmt_us(p50),
                    p99 / p50
                ),
            },
            _ => skip_target("incr over 1000 objects p99 ≤ 2 × its p50", "no latencies"),
        },
        None => skip_target(
            "incr over 1000 objects p99 ≤ 2 × its p50 (64 in flight)",
            "incr did not run",
        ),
    });
    let counts = shards::counts();
    let most = *counts.last().unwrap_or(&1);
    let cpu_of = |n: usize| {
        find(series, shards::WORKLOAD, &shards::shape("noop", n))
            .and_then(Series::server_cpu_us_per_op)
    };
    let name = format!("server CPU per noop call, {most} shards ≤ 1.1 × 1 shard");
    targets.push(match (cpu_of(1), cpu_of(most)) {
        (Some(one), Some(many)) if most > 1 => Target {
            name,
            verdict: if many <= 1.1 * one {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            detail: format!(
                "{many:.1} µs vs {one:.1} µs ({:.2}×), need ≤ 1.1×",
                many / one
            ),
        },
        (Some(_), Some(_)) => skip_target(&name, "this machine has one core"),
        _ => skip_target(&name, "shards did not run"),
    });
    // The path a client that makes one call on a new object takes; the figures of
    // `getByName + fetch` stay in the table beside it.
    let by_name = super::objects::FirstCall::ByName.label();
    let activate = series
        .iter()
        .find(|s| s.workload == "activate" && s.shape.contains(by_name) && !s.runs.is_empty());
    let limit = |name: &str, extra: &str, max: f64, unit: &str, scale: f64| match activate
        .and_then(|a| a.extra(extra))
    {
        Some(spread) => Target {
            name: name.into(),
            verdict: if spread.median <= max * scale {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            detail: format!(
                "{:.2} {unit} (runs {:.2}–{:.2}), need ≤ {max} {unit}",
                spread.median / scale,
                spread.min / scale,
                spread.max / scale
            ),
        },
        None => Target {
            name: name.into(),
            verdict: Verdict::Skip,
            detail: "activate did not run".into(),
        },
    };
    targets.push(limit(
        "activate ≤ 15 µs host CPU per object (fetchByName)",
        "cpu_per_activation",
        15.0,
        "µs",
        1.0,
    ));
    targets.push(limit(
        "activate ≤ 2 KiB RSS per idle object (fetchByName)",
        "rss_per_object",
        2.0,
        "KiB",
        1024.0,
    ));
    let workerd_ran = find(series, "workerd", INCR).is_some();
    targets.push(at_least(
        "gateway incr over 1000 objects ≥ 10 × workerd",
        ratio_of(ratios, &format!("gateway / workerd, {INCR}")),
        10.0,
        if workerd_ran {
            "the gateway did not run (unavailable)"
        } else {
            "workerd did not run"
        },
    ));
    targets
}

impl Report {
    pub fn new(settings: &Settings, mut series: Vec<Series>, total: Duration) -> Report {
        series.iter_mut().for_each(Series::summarize);
        let ratios = ratios(&series);
        let targets = targets(&series, &ratios);
        Report {
            mode: if settings.quick { "quick" } else { "full" },
            runs_per_series: settings.runs,
            run_secs: settings.run_time.as_secs_f64(),
            total_secs: total.as_secs_f64(),
            series,
            ratios,
            targets,
        }
    }

    pub fn any_failed(&self) -> bool {
        self.targets.iter().any(|t| t.verdict == Verdict::Fail)
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    pub fn print(&self, check: bool) {
        println!(
            "\nduro bench, {} mode: {} runs of {:.1} s per series (medians; [min–max] over runs), \
             {:.0} s in all",
            self.mode, self.runs_per_series, self.run_secs, self.total_secs
        );
        println!(
            "{:<14} {:<38} {:>22} {:>8} {:>8} {:>8} {:>9} {:>9} {:>4}",
            "workload",
            "shape",
            "ops/s [min–max]",
            "p50",
            "p99",
            "p999",
            "srv µs/op",
            "gen µs/op",
            "runs"
        );
        for series in &self.series {
            print_series(series);
        }
        let extras: Vec<&Series> = self.series.iter().filter(|s| !s.extra.is_empty()).collect();
        if !extras.is_empty() {
            println!("\nfigures");
            for series in &extras {
                // A workload in several shapes with figures of their own (`activate`'s two
                // paths) names the shape of each.
                let shapes = extras
                    .iter()
                    .filter(|s| s.workload == series.workload)
                    .count();
                let shape = match shapes {
                    1 => String::new(),
                    _ => format!("  ({})", series.shape),
                };
                for extra in &series.extra {
                    println!(
                        "  {:<14} {:<22} {}{shape}",
                        series.workload,
                        extra.name,
                        fmt_extra(extra.spread, &extra.unit)
                    );
                }
            }
        }
        if !self.ratios.is_empty() {
            println!("\nratios (run by run, measured back to back: median [min–max])");
            for ratio in &self.ratios {
                println!(
                    "  {:<60} {:>7.2}× [{:.2}–{:.2}]{}",
                    ratio.name,
                    ratio.spread.median,
                    ratio.spread.min,
                    ratio.spread.max,
                    if ratio.paired { "" } else { " (of medians)" }
                );
            }
        }
        println!(
            "\ntargets{}",
            if check { "" } else { " (--check to enforce)" }
        );
        for target in &self.targets {
            println!(
                "  {:<4} {:<48} {}",
                format!("{:?}", target.verdict).to_uppercase(),
                target.name,
                target.detail
            );
        }
    }
}

fn print_series(series: &Series) {
    let Some(ops) = series.ops_per_s() else {
        println!(
            "{:<14} {:<38} {}",
            series.workload,
            series.shape,
            series.skipped.as_deref().unwrap_or("no runs")
        );
        return;
    };
    let rate = format!(
        "{} [{}–{}]",
        fmt_rate(ops.median),
        fmt_rate(ops.min),
        fmt_rate(ops.max)
    );
    let cpu = |cpu: Option<f64>| cpu.map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.1}"));
    println!(
        "{:<14} {:<38} {:>22} {:>8} {:>8} {:>8} {:>9} {:>9} {:>4}",
        series.workload,
        series.shape,
        rate,
        fmt_us(series.p50_us().unwrap_or(0.0)),
        fmt_us(series.p99_us().unwrap_or(0.0)),
        fmt_us(series.p999_us().unwrap_or(0.0)),
        cpu(series.server_cpu_us_per_op()),
        cpu(series.generator_cpu_us_per_op()),
        series.runs.len()
    );
    if let Some(why) = &series.skipped {
        println!("{:<14} {:<38} (then {why})", "", "");
    }
}

fn fmt_rate(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2}M", rate / 1e6)
    } else if rate >= 1e4 {
        format!("{:.1}k", rate / 1e3)
    } else if rate >= 1e3 {
        format!("{:.2}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 1e4 {
        format!("{:.0}ms", us / 1e3)
    } else if us >= 1e3 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{us:.0}µs")
    }
}

fn fmt_extra(spread: Spread, unit: &str) -> String {
    let one = |v: f64| match unit {
        "bytes" if v >= 1048576.0 => format!("{:.1} MiB", v / 1048576.0),
        "bytes" => format!("{v:.0} B"),
        "" => format!("{v:.0}"),
        "keys/s" => format!("{} keys/s", fmt_rate(v)),
        "alarms/s" => format!("{} alarms/s", fmt_rate(v)),
        "deliveries/s" => format!("{} deliveries/s", fmt_rate(v)),
        unit => format!("{v:.2} {unit}"),
    };
    if spread.min == spread.max {
        one(spread.median)
    } else {
        format!(
            "{} [{}–{}]",
            one(spread.median),
            one(spread.min),
            one(spread.max)
        )
    }
}
