//! Crash safety: `duro serve` as a child process, SIGKILLed at random moments under load, then
//! restarted. Every acknowledged write must be there, and no transaction half-applied; every
//! acknowledged timer (the `timer` built-in, on the object's alarm) fires at least once.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use duro::Clock;
use duro::testing::{connect, fetch_by_name, run_local};

mod common;
use common::serve;

/// Rounds of kill and restart. `DURO_CRASH_ROUNDS` raises it for a longer run.
fn rounds() -> u32 {
    std::env::var("DURO_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10)
}

/// What the clients were told is durable.
#[derive(Clone, Default)]
struct Acknowledged {
    /// Counter name → the highest value a POST answered.
    counters: BTreeMap<String, u64>,
    /// Transactions (kv puts of `a/N` and `b/N` together) that were answered 200.
    txns: Vec<u64>,
    /// Timers whose `POST` was answered 200 and that were not yet seen fired: (timer object,
    /// tag, due time in ms since the epoch).
    timers: Vec<(String, String, u64)>,
    /// Timers seen fired.
    timers_fired: usize,
}

fn now_ms() -> u64 {
    duro::SystemClock.now_ms()
}

/// One step of xorshift64.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Sets timers due within 0–2 s on 24 `timer` objects until the connection dies or `deadline`.
async fn set_timers(
    addr: SocketAddr,
    worker: u64,
    mut seed: u64,
    acked: Rc<RefCell<Acknowledged>>,
    deadline: Instant,
) {
    let Ok(host) = connect(addr).await else {
        return;
    };
    let mut n = 0u64;
    while Instant::now() < deadline && n < 100_000 {
        n += 1;
        let name = format!("t{}", (worker * 5 + n) % 24);
        let tag = format!("w{worker}-{n}");
        let at = now_ms() + next(&mut seed) % 2000;
        let path = format!("/?at={at}&tag={tag}");
        match fetch_by_name(&host, "timer", &name, "POST", &path, b"").await {
            Ok(response) if response.status() == 200 => {
                acked.borrow_mut().timers.push((name, tag, at))
            }
            Ok(response) => panic!("setting a timer answered {}", response.status()),
            Err(_) => return,
        }
    }
}

/// Forgets the timers due by `until_ms` that are in `fired`; answers one that is not.
fn forget_fired(
    acked: &mut Acknowledged,
    fired: &std::collections::BTreeSet<(String, String)>,
    until_ms: u64,
) -> Option<(String, String, u64)> {
    let before = acked.timers.len();
    acked
        .timers
        .retain(|(name, tag, at)| *at > until_ms || !fired.contains(&(name.clone(), tag.clone())));
    acked.timers_fired += before - acked.timers.len();
    acked
        .timers
        .iter()
        .find(|(_, _, at)| *at <= until_ms)
        .cloned()
}

/// Waits (at most 10 s) until every acknowledged timer due by `until_ms` is in its object's
/// `/fired`, and forgets those.
async fn check_timers(addr: SocketAddr, acked: &RefCell<Acknowledged>, until_ms: u64, seed: u64) {
    let host = connect(addr).await.unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let due: BTreeMap<String, Vec<String>> = {
            let acked = acked.borrow();
            let mut due: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let timers = acked.timers.iter().filter(|(_, _, at)| *at <= until_ms);
            for (name, tag, _) in timers {
                due.entry(name.clone()).or_default().push(tag.clone());
            }
            due
        };
        let mut fired = std::collections::BTreeSet::new();
        for name in due.keys() {
            let response = fetch_by_name(&host, "timer", name, "GET", "/fired", b"")
                .await
                .unwrap();
            let entries: Vec<serde_json::Value> = serde_json::from_slice(response.body()).unwrap();
            for entry in entries {
                fired.insert((name.clone(), entry["tag"].as_str().unwrap().to_owned()));
            }
        }
        let Some((name, tag, at)) = forget_fired(&mut acked.borrow_mut(), &fired, until_ms) else {
            return;
        };
        assert!(
            Instant::now() < give_up,
            "timer {tag} of {name}, due at {at} and acknowledged, has not fired 10 s after its \
             time (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drives increments and two-key transactions until the connection dies or `deadline`.
async fn load(addr: SocketAddr, worker: u64, acked: Rc<RefCell<Acknowledged>>, deadline: Instant) {
    let Ok(host) = connect(addr).await else {
        return;
    };
    let mut n = 0u64;
    while Instant::now() < deadline && n < 100_000 {
        n += 1;
        let name = format!("c{}", (worker * 7 + n) % 16);
        match fetch_by_name(&host, "counter", &name, "POST", "/", b"").await {
            Ok(response) => {
                let value: u64 = std::str::from_utf8(response.body())
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                let mut acked = acked.borrow_mut();
                let top = acked.counters.entry(name).or_default();
                *top = (*top).max(value);
            }
            Err(_) => return,
        }
        let id = worker * 1_000_000 + n;
        let txn = format!(
            r#"{{"ops": [{{"op": "put", "key": "a/{id}", "value": "{id}"}}, {{"op": "put", "key": "b/{id}", "value": "{id}"}}]}}"#
        );
        match fetch_by_name(&host, "kv", "txns", "POST", "/txn", txn.as_bytes()).await {
            Ok(response) if response.status() == 200 => acked.borrow_mut().txns.push(id),
            Ok(response) => panic!("txn answered {}", response.status()),
            Err(_) => return,
        }
    }
}

/// Checks the restarted server holds everything acknowledged, and whole transactions only.
async fn check(addr: SocketAddr, acked: &Acknowledged) {
    let host = connect(addr).await.unwrap();
    for (name, value) in &acked.counters {
        let response = fetch_by_name(&host, "counter", name, "GET", "/", b"")
            .await
            .unwrap();
        let stored: u64 = std::str::from_utf8(response.body())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            stored >= *value,
            "counter {name}: acknowledged {value}, found {stored}"
        );
    }
    let list = |prefix: &str| {
        let host = host.clone();
        let path = format!("/list?prefix={prefix}");
        async move {
            let response = fetch_by_name(&host, "kv", "txns", "GET", &path, b"")
                .await
                .unwrap();
            let entries: Vec<serde_json::Value> = serde_json::from_slice(response.body()).unwrap();
            entries
                .iter()
                .map(|e| e["key"].as_str().unwrap()[2..].parse::<u64>().unwrap())
                .collect::<std::collections::BTreeSet<u64>>()
        }
    };
    let (a, b) = (list("a/").await, list("b/").await);
    assert_eq!(a, b, "a transaction was half-applied");
    for id in &acked.txns {
        assert!(a.contains(id), "acknowledged transaction {id} is lost");
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Rc::new(RefCell::new(Acknowledged::default()));
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ std::process::id() as u64;
    let first_seed = seed;
    println!("seed {seed}");
    for round in 0..rounds() {
        let mut served = serve(dir.path());
        let kill_after = Duration::from_millis(30 + next(&mut seed) % 250);
        run_local(async {
            let snapshot = acked.borrow().clone();
            check(served.addr, &snapshot).await;
            check_timers(served.addr, &acked, now_ms(), first_seed).await;
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut workers: Vec<_> = (0..4)
                .map(|w| {
                    tokio::task::spawn_local(load(
                        served.addr,
                        w + 10 * round as u64,
                        acked.clone(),
                        deadline,
                    ))
                })
                .collect();
            // Timers set while earlier rounds' timers fall due and fire.
            workers.extend((0..2).map(|w| {
                let worker = w + 10 * round as u64;
                let seed = seed ^ worker;
                tokio::task::spawn_local(set_timers(
                    served.addr,
                    worker,
                    seed,
                    acked.clone(),
                    deadline,
                ))
            }));
            tokio::time::sleep(kill_after).await;
            // SIGKILL: no chance to flush or say goodbye.
            served.child.kill().expect("killing duro serve");
            served.child.wait().expect("reaping duro serve");
            for worker in workers {
                worker.await.unwrap();
            }
        });
    }
    let mut served = serve(dir.path());
    let snapshot = acked.borrow().clone();
    run_local(check(served.addr, &snapshot));
    // Every timer still outstanding falls due within 2 s.
    let last_ms = acked.borrow().timers.iter().map(|t| t.2).max();
    if let Some(last_ms) = last_ms {
        std::thread::sleep(Duration::from_millis(last_ms.saturating_sub(now_ms())));
        run_local(check_timers(served.addr, &acked, last_ms, first_seed));
    }
    assert!(
        !acked.borrow().txns.is_empty(),
        "the load acknowledged nothing"
    );
    println!(
        "acknowledged timers seen fired: {}",
        acked.borrow().timers_fired
    );
    assert!(
        acked.borrow().timers_fired > 0,
        "no acknowledged timer fired"
    );
    served.child.kill().unwrap();
    served.child.wait().unwrap();
}

/// SIGTERM under load: the server answers or fails every call, keeps every acknowledged write,
/// and exits cleanly.
#[test]
fn sigterm_shuts_down_gracefully_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Rc::new(RefCell::new(Acknowledged::default()));
    let mut served = serve(dir.path());
    run_local(async {
        let deadline = Instant::now() + Duration::from_secs(5);
        let workers: Vec<_> = (0..4)
            .map(|w| tokio::task::spawn_local(load(served.addr, w, acked.clone(), deadline)))
            .collect();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // SAFETY: kill(2) on the PID of the child this test started; no memory is involved.
        let sent = unsafe { libc::kill(served.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0);
        // Every worker ends: its calls were answered or failed, none hangs.
        for worker in workers {
            worker.await.unwrap();
        }
    });
    let status = served.child.wait().unwrap();
    assert!(status.success(), "duro serve exited with {status}");
    let restarted = serve(dir.path());
    let snapshot = acked.borrow().clone();
    assert!(!snapshot.txns.is_empty(), "the load acknowledged nothing");
    run_local(check(restarted.addr, &snapshot));
}
