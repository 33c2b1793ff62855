//! `alarms`: the `timer` built-in's timers, each on its object's alarm. Throughput: N timers on
//! N new objects (100k; 20k with `--quick`), all due at one time, fired per second from that
//! time to the last handler run. Lateness: timers due 20 ms apart on an idle host, how late each
//! handler ran after its time. Both read from what the handlers recorded (`GET /fired`), so the
//! polling that finds them costs nothing that is measured.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use super::Settings;
use super::capnp_load;
use super::child::{self, Duro};
use super::hist::Histogram;
use super::measure::{Budget, Run, Series, drive};
use duro::Clock;
use duro::duro_capnp::{host, namespace};

const IN_FLIGHT: usize = 64;
/// The throughput run first times setting this share of its timers on other objects (due in a
/// day: they do not fire during the run), and gives the burst this many times as long per timer
/// before its time. Past that time the run fails rather than measure firing mixed with setting.
const CALIBRATION_SHARE: u64 = 20;
const SET_MARGIN: u64 = 2;
/// Objects polled to see that the burst has fired, before reading all of them.
const SAMPLE: u64 = 64;
/// Timers of one lateness run (fewer with `--quick`), and their spacing.
const SPACED: u64 = 200;
const SPACED_QUICK: u64 = 50;
const SPACING_MS: u64 = 20;
/// Longest wait for timers past their time, in either part.
const FIRE_TIME_MAX: Duration = Duration::from_secs(120);

pub fn run(settings: &Settings) -> Vec<Series> {
    duro::testing::run_local(async { vec![burst(settings).await, spaced(settings).await] })
}

fn now_ms() -> u64 {
    duro::SystemClock.now_ms()
}

async fn start(settings: &Settings, name: &str) -> Result<(Duro, namespace::Client), String> {
    let duro = child::start_duro(&settings.fresh_dir(name), false)?;
    let host: host::Client = capnp_load::connect(duro.addr).await?;
    Ok((duro, capnp_load::namespace(&host, "timer")))
}

/// Sets timer `name(i)` on object `name(i)` at `at(i)` for `i` in `0..count`.
async fn set(
    namespace: &namespace::Client,
    count: u64,
    time_max: Duration,
    name: &dyn Fn(u64) -> String,
    at: &dyn Fn(u64) -> u64,
) -> Result<(), String> {
    let post = |i: u64| {
        let stub = capnp_load::stub(namespace, &name(i));
        let url = format!("/?at={}&tag={}", at(i), name(i));
        capnp_load::fetch(&stub, "POST", &url, b"", &[200])
    };
    let driven = drive(IN_FLIGHT, Budget::new(time_max, count), post).await?;
    if driven.ops < count {
        return Err(format!(
            "only {} of {count} timers set in {time_max:?}",
            driven.ops
        ));
    }
    Ok(())
}

/// The first fired record of each object `name(i)`, `i` in `0..count`, as `late_us`: reads
/// them all, then again those that have none yet, until `deadline`.
async fn lateness_us(
    namespace: &namespace::Client,
    count: u64,
    name: &dyn Fn(u64) -> String,
    deadline: Instant,
) -> Result<Vec<u64>, String> {
    let late: RefCell<Vec<Option<u64>>> = RefCell::new(vec![None; count as usize]);
    for _ in 0..1000 {
        let missing: Vec<u64> = (0..count)
            .filter(|&i| late.borrow()[i as usize].is_none())
            .collect();
        if missing.is_empty() {
            return Ok(late.into_inner().into_iter().flatten().collect());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {count} timers had not fired in time",
                missing.len()
            ));
        }
        let read = |k: u64| {
            let i = missing[k as usize];
            let stub = capnp_load::stub(namespace, &name(i));
            let body = capnp_load::fetch_body(&stub, "GET", "/fired");
            let late = &late;
            async move {
                let records: Vec<serde_json::Value> =
                    serde_json::from_slice(&body.await?).map_err(|e| e.to_string())?;
                late.borrow_mut()[i as usize] = records.first().and_then(|r| r["late_us"].as_u64());
                Ok(())
            }
        };
        let budget = Budget::new(
            deadline.saturating_duration_since(Instant::now()),
            missing.len() as u64,
        );
        drive(IN_FLIGHT, budget, read).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("gave up reading the fired timers".into())
}

fn histogram_us(values: &[u64]) -> Histogram {
    let mut histogram = Histogram::default();
    for &us in values {
        histogram.record(Duration::from_micros(us));
    }
    histogram
}

/// Sleeps until `at_ms` by the system's clock.
async fn sleep_until_ms(at_ms: u64) {
    tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms()))).await;
}

/// Throughput: every timer due at once.
async fn burst(settings: &Settings) -> Series {
    let count = if settings.quick { 20_000 } else { 100_000 };
    let shape = format!("{}k due at once, fired/s", count / 1000);
    let mut series = Series::new("alarms", &shape);
    match burst_once(settings, count).await {
        Ok(run) => {
            let rate = run.ops_per_s();
            series.push(Ok(run));
            series.add_extra("burst_fired_per_s", "alarms/s", &[rate]);
        }
        Err(e) => series.fail(e),
    }
    series
}

async fn burst_once(settings: &Settings, count: u64) -> Result<Run, String> {
    let (duro, namespace) = start(settings, "alarms-burst").await?;
    let pid = duro.child.pid();
    let calibration = count / CALIBRATION_SHARE;
    let begun = Instant::now();
    let far_ms = now_ms() + 86_400_000;
    let calibrate = |i: u64| format!("c{i}");
    set(
        &namespace,
        calibration,
        settings.setup_time_max,
        &calibrate,
        &|_| far_ms,
    )
    .await?;
    let set_us = begun.elapsed().as_micros() as u64 / calibration.max(1);
    let due_ms = now_ms() + 1000 + count * set_us * SET_MARGIN / 1000;
    let name = |i: u64| format!("b{i}");
    set(&namespace, count, settings.setup_time_max, &name, &|_| {
        due_ms
    })
    .await?;
    let set_ms = now_ms();
    if set_ms >= due_ms {
        return Err(format!(
            "setting {count} timers took past their time ({} ms late, after {set_us} µs per \
             timer in calibration)",
            set_ms - due_ms
        ));
    }
    sleep_until_ms(due_ms.saturating_sub(50)).await;
    let cpu_before = child::process_cpu(pid).ok_or("reading the server's CPU time")?;
    // The sample spans the objects; once it has fired, the rest has (nearly) too.
    let deadline = Instant::now() + FIRE_TIME_MAX;
    let sample = |k: u64| name(k * count / SAMPLE);
    lateness_us(&namespace, SAMPLE, &sample, deadline).await?;
    let cpu = child::process_cpu(pid).map(|after| after.saturating_sub(cpu_before));
    let late = lateness_us(&namespace, count, &name, deadline).await?;
    let last_us = late.iter().copied().max().unwrap_or(0).max(1);
    Ok(Run {
        ops: count,
        elapsed: Duration::from_micros(last_us),
        latency: histogram_us(&late),
        server_cpu: cpu,
        generator_cpu: None,
    })
}

/// Lateness at an idle host: timers due one by one.
async fn spaced(settings: &Settings) -> Series {
    let count = if settings.quick { SPACED_QUICK } else { SPACED };
    let shape = format!("{count} due {SPACING_MS} ms apart, idle host");
    let mut series = Series::new("alarms", &shape);
    let (mut p50_ms, mut p99_ms) = (Vec::new(), Vec::new());
    let started = start(settings, "alarms-spaced").await;
    let (_duro, namespace) = match started {
        Ok(started) => started,
        Err(e) => {
            series.fail(e);
            return series;
        }
    };
    for run in 0..settings.runs.min(3) {
        match spaced_once(settings, &namespace, run, count).await {
            Ok(run) => {
                p50_ms.push(run.latency.quantile_ns(0.5) as f64 / 1e6);
                p99_ms.push(run.latency.quantile_ns(0.99) as f64 / 1e6);
                series.push(Ok(run));
            }
            Err(e) => {
                series.fail(e);
                break;
            }
        }
    }
    series.add_extra("idle_late_p50", "ms", &p50_ms);
    series.add_extra("idle_late_p99", "ms", &p99_ms);
    series
}

async fn spaced_once(
    settings: &Settings,
    namespace: &namespace::Client,
    run: usize,
    count: u64,
) -> Result<Run, String> {
    let first_ms = now_ms() + 1000;
    let name = |i: u64| format!("s{run}-{i}");
    let at = |i: u64| first_ms + i * SPACING_MS;
    set(namespace, count, settings.setup_time_max, &name, &at).await?;
    if now_ms() >= first_ms {
        return Err("setting the timers took past the first one's time".into());
    }
    sleep_until_ms(at(count - 1) + 100).await;
    let late = lateness_us(namespace, count, &name, Instant::now() + FIRE_TIME_MAX).await?;
    Ok(Run {
        ops: count,
        elapsed: Duration::from_millis(count * SPACING_MS),
        latency: histogram_us(&late),
        server_cpu: None,
        generator_cpu: None,
    })
}
