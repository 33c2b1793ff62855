//! Alarms, in process on a real data dir: set, replace and delete; delivery at or after the time
//! by an injected clock; retries with backoff; a panic in `alarm()`; a new alarm set inside the
//! handler; `delete_all`; an evicted object woken by its alarm; a restart with overdue alarms;
//! and many objects' alarms firing exactly once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use duro::testing::{ManualClock, run_local};
use duro::{AlarmInfo, BoxError, Clock, DurableObject, Host, Request, Response, Server, State};

/// One delivery of an alarm, as the handler saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fired {
    name: String,
    retry_count: u32,
    is_retry: bool,
    /// What `get_alarm()` answered at the start of the handler.
    alarm_inside: Option<u64>,
    now_ms: u64,
}

type Log = Arc<Mutex<Vec<Fired>>>;

/// Sets, reads and deletes its alarm over HTTP; its `alarm()` does what the key `mode` says:
/// `fail:N` / `panic:N` (deliveries with `retry_count < N` fail or panic), `again:MS` (sets a new alarm
/// MS later, once), `stop` (deletes its alarm, then fails), anything else succeeds.
struct Alarmed {
    state: State,
    clock: Arc<dyn Clock>,
    log: Log,
}

impl DurableObject for Alarmed {
    async fn fetch(&self, req: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        let arg = req.uri().query().unwrap_or("").to_owned();
        match (req.method().as_str(), req.uri().path()) {
            ("PUT", "/alarm") => storage.set_alarm(arg.parse()?).await?,
            ("DELETE", "/alarm") => storage.delete_alarm().await?,
            ("PUT", "/mode") => storage.put("mode", &arg).await?,
            ("POST", "/clear") => storage.delete_all().await?,
            ("PUT", "/both") => {
                // A key and the alarm in one turn: they commit together.
                storage.put("k", &1).await?;
                storage.set_alarm(arg.parse()?).await?;
            }
            _ => {}
        }
        let alarm = storage.get_alarm().await?;
        Ok(Response::new(format!("{alarm:?}").into()))
    }

    async fn alarm(&self, info: AlarmInfo) -> Result<(), BoxError> {
        let storage = self.state.storage();
        let fired = Fired {
            name: self.state.id().name().unwrap_or("").to_owned(),
            retry_count: info.retry_count,
            is_retry: info.is_retry,
            alarm_inside: storage.get_alarm().await?,
            now_ms: self.clock.now_ms(),
        };
        self.log.lock().unwrap().push(fired);
        let count = storage.get::<u32>("fired").await?.unwrap_or(0) + 1;
        storage.put("fired", &count).await?;
        let mode = storage.get::<String>("mode").await?.unwrap_or_default();
        let (what, n) = mode.split_once(':').unwrap_or((&mode, "0"));
        let n: u64 = n.parse().unwrap_or(0);
        match what {
            "fail" if u64::from(info.retry_count) < n => Err("failing on purpose".into()),
            "panic" if u64::from(info.retry_count) < n => panic!("alarm panics on purpose"),
            "again" if count == 1 => {
                storage.set_alarm(self.clock.now_ms() + n).await?;
                Ok(())
            }
            "stop" => {
                storage.delete_alarm().await?;
                Err("failing after deleting the alarm".into())
            }
            _ => Ok(()),
        }
    }
}

const T0: u64 = 1_700_000_000_000;
const HOUR_MS: u64 = 3_600_000;

fn builder(clock: Arc<dyn Clock>, log: Log) -> duro::Builder {
    let class_clock = clock.clone();
    Server::builder()
        .class("alarmed", move |state, _env| Alarmed {
            state,
            clock: class_clock.clone(),
            log: log.clone(),
        })
        .namespace("alarmed", "alarmed")
        .clock(clock)
}

fn host(dir: &std::path::Path, clock: Arc<dyn Clock>, log: Log) -> Host {
    builder(clock, log).data_dir(dir).open_host().unwrap()
}

async fn call(host: &Host, name: &str, method: &str, path: &str) -> String {
    let stub = host
        .namespace("alarmed")
        .unwrap()
        .get_by_name(name)
        .unwrap();
    let response = stub.call(method, path, "").await.unwrap();
    String::from_utf8(response.body().to_vec()).unwrap()
}

/// Lets the host run (real time) until `condition` holds; panics after 10 s.
async fn until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Lets the host run for a while, to see that nothing (more) happens.
async fn idle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn fired(log: &Log) -> Vec<Fired> {
    log.lock().unwrap().clone()
}

struct Setup {
    dir: tempfile::TempDir,
    clock: ManualClock,
    log: Log,
}

fn setup() -> Setup {
    Setup {
        dir: tempfile::tempdir().unwrap(),
        clock: ManualClock::new(T0),
        log: Log::default(),
    }
}

impl Setup {
    fn host(&self) -> Host {
        host(self.dir.path(), self.clock.shared(), self.log.clone())
    }
}

#[test]
fn set_replace_get_delete() {
    let s = setup();
    run_local(async {
        let host = s.host();
        assert_eq!(call(&host, "a", "GET", "/").await, "None");
        let at = T0 + HOUR_MS;
        assert_eq!(
            call(&host, "a", "PUT", &format!("/alarm?{at}")).await,
            format!("Some({at})")
        );
        let later = at + 1;
        assert_eq!(
            call(&host, "a", "PUT", &format!("/alarm?{later}")).await,
            format!("Some({later})")
        );
        // Replaced: the first time passes with nothing fired.
        s.clock.set(at);
        idle().await;
        assert!(fired(&s.log).is_empty());
        assert_eq!(call(&host, "a", "DELETE", "/alarm").await, "None");
        s.clock.advance(HOUR_MS);
        idle().await;
        assert!(fired(&s.log).is_empty());
        // Durable: a new host on the same dir sees what the last answered.
        call(&host, "a", "PUT", &format!("/alarm?{}", T0 + 5 * HOUR_MS)).await;
        host.shutdown().await;
        drop(host);
        let host = s.host();
        assert_eq!(
            call(&host, "a", "GET", "/").await,
            format!("Some({})", T0 + 5 * HOUR_MS)
        );
        let listed = host
            .namespace("alarmed")
            .unwrap()
            .list_objects(None, 10)
            .unwrap();
        assert_eq!(listed.0.len(), 1, "an object with only an alarm is listed");
        host.shutdown().await;
    });
}

#[test]
fn an_alarm_an_hour_away_fires_at_its_time_never_early_and_once() {
    let s = setup();
    run_local(async {
        let host = s.host();
        let at = T0 + HOUR_MS;
        call(&host, "a", "PUT", &format!("/both?{at}")).await;
        s.clock.set(at - 1);
        idle().await;
        assert!(fired(&s.log).is_empty(), "fired early");
        s.clock.set(at);
        until("the alarm fires", || fired(&s.log).len() == 1).await;
        let first = &fired(&s.log)[0];
        assert_eq!((first.retry_count, first.is_retry), (0, false));
        assert_eq!(
            first.alarm_inside, None,
            "the firing alarm is not shown to its handler"
        );
        assert!(first.now_ms >= at);
        // Done: deleted once the handler succeeded.
        idle().await;
        assert_eq!(call(&host, "a", "GET", "/").await, "None");
        s.clock.advance(10 * HOUR_MS);
        idle().await;
        assert_eq!(fired(&s.log).len(), 1);
        host.shutdown().await;
    });
}

#[test]
fn a_time_in_the_past_fires_now() {
    let s = setup();
    run_local(async {
        let host = s.host();
        call(&host, "a", "PUT", &format!("/alarm?{}", T0 - HOUR_MS)).await;
        until("the alarm fires", || fired(&s.log).len() == 1).await;
        call(&host, "b", "PUT", "/alarm?0").await;
        until("the alarm fires", || fired(&s.log).len() == 2).await;
        host.shutdown().await;
    });
}

/// Moves the clock on to each retry in turn, in steps of a tenth of its base backoff, until
/// `deliveries` deliveries happened; returns them. Stepping, rather than jumping past the
/// longest backoff at once, keeps the test right when the scheduler records a failure late
/// (its commit waits for a busy disk): a retry is due a backoff after the failure is recorded,
/// and the clock reaches it whenever that was.
async fn drive_retries(s: &Setup, deliveries: usize) -> Vec<Fired> {
    until("the first delivery", || !fired(&s.log).is_empty()).await;
    for n in 1..deliveries {
        let step = (2000u64 << (n - 1).min(20)) / 10;
        let mut steps = 0;
        while fired(&s.log).len() <= n {
            assert!(steps < 5_000, "retry {n} never came");
            s.clock.advance(step);
            tokio::time::sleep(Duration::from_millis(2)).await;
            steps += 1;
        }
    }
    idle().await;
    fired(&s.log)
}

#[test]
fn a_failing_alarm_is_retried_with_backoff_then_dropped() {
    let s = setup();
    run_local(async {
        let host = s.host();
        call(&host, "a", "PUT", "/mode?fail:100").await;
        call(&host, "a", "PUT", &format!("/alarm?{T0}")).await;
        let log = drive_retries(&s, 7).await;
        let counts: Vec<u32> = log.iter().map(|f| f.retry_count).collect();
        assert_eq!(counts, [0, 1, 2, 3, 4, 5, 6]);
        assert!(log[1..].iter().all(|f| f.is_retry));
        // The gaps grow as 2^n s, within the jitter.
        for (n, pair) in log.windows(2).enumerate() {
            let gap = pair[1].now_ms - pair[0].now_ms;
            let base = 2000u64 << n;
            assert!(gap >= base * 8 / 10, "retry {} after {gap} ms", n + 1);
        }
        // Dropped after 6 retries.
        s.clock.advance(100 * HOUR_MS);
        idle().await;
        assert_eq!(fired(&s.log).len(), 7);
        assert_eq!(call(&host, "a", "GET", "/").await, "None");
        host.shutdown().await;
    });
}

#[test]
fn a_retry_succeeds_and_the_alarm_is_done() {
    let s = setup();
    run_local(async {
        let host = s.host();
        call(&host, "a", "PUT", "/mode?fail:2").await;
        call(&host, "a", "PUT", &format!("/alarm?{T0}")).await;
        let log = drive_retries(&s, 3).await;
        assert_eq!(
            log.iter().map(|f| f.retry_count).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        s.clock.advance(100 * HOUR_MS);
        idle().await;
        assert_eq!(fired(&s.log).len(), 3);
        assert_eq!(call(&host, "a", "GET", "/").await, "None");
        host.shutdown().await;
    });
}

#[test]
fn a_panic_in_alarm_resets_the_object_and_the_alarm_is_retried() {
    let s = setup();
    run_local(async {
        let host = s.host();
        call(&host, "a", "PUT", "/mode?panic:1").await;
        let stub = host.namespace("alarmed").unwrap().get_by_name("a").unwrap();
        call(&host, "a", "PUT", &format!("/alarm?{T0}")).await;
        until("the alarm fires", || fired(&s.log).len() == 1).await;
        until("the object resets", || stub.is_broken()).await;
        s.clock.advance(2400);
        until("the retry", || fired(&s.log).len() == 2).await;
        assert_eq!(fired(&s.log)[1].retry_count, 1);
        idle().await;
        // The panicked delivery's write was dropped with the reset: one count survives.
        assert_eq!(call(&host, "a", "GET", "/").await, "None");
        let state = duro::testing::state(&host, "alarmed", "a").unwrap();
        assert_eq!(state.storage().get::<u32>("fired").await.unwrap(), Some(1));
        host.shutdown().await;
    });
}

#[test]
fn set_alarm_inside_the_handler_replaces_it() {
    let s = setup();
    run_local(async {
        let host = s.host();
        call(&host, "a", "PUT", "/mode?again:60000").await;
        call(&host, "a", "PUT", &format!("/alarm?{T0}")).await;
        until("the alarm fires", || fired(&s.log).len() == 1).await;
        idle().await;
        assert_eq!(
            call(&host, "a", "GET", "/").await,
            format!("Some({})", T0 + 60_000)
        );
        s.clock.advance(59_999);
        idle().await;
        assert_eq!(fired(&s.log).len(), 1);
        s.clock.advance(1);
        until("the new alarm fires", || fired(&s.log).len() == 2).await;
        assert_eq!(fired(&s.log)[1].retry_count, 0);
        idle().await;
        assert_eq!(call(&host, "a", "GET", "/").await, "None");
        host.shutdown().await;
    });
}

#[test]
fn delete_alarm_inside_the_handler_stops_retries() {
    let s = setup();
    run_local(async {
        let host = s.host();
        call(&host, "a", "PUT", "/mode?stop").await;
        call(&host, "a", "PUT", &format!("/alarm?{T0}")).await;
        until("the alarm fires", || fired(&s.log).len() == 1).await;
        s.clock.advance(HOUR_MS);
        idle().await;
        assert_eq!(fired(&s.log).len(), 1);
        host.shutdown().await;
    });
}

#[test]
fn delete_all_deletes_the_alarm() {
    let s = setup();
    run_local(async {
        let host = s.host();
        call(&host, "a", "PUT", &format!("/both?{}", T0 + 10)).await;
        assert_eq!(call(&host, "a", "POST", "/clear").await, "None");
        s.clock.advance(HOUR_MS);
        idle().await;
        assert!(fired(&s.log).is_empty());
        let listed = host
            .namespace("alarmed")
            .unwrap()
            .list_objects(None, 10)
            .unwrap();
        assert!(listed.0.is_empty());
        host.shutdown().await;
    });
}

#[test]
fn an_evicted_object_is_woken_by_its_alarm() {
    let s = setup();
    run_local(async {
        let host = s.host();
        call(&host, "a", "PUT", &format!("/alarm?{}", T0 + HOUR_MS)).await;
        idle().await;
        assert_eq!(host.evict_idle(), 1);
        assert_eq!(host.activations(), 0);
        s.clock.advance(HOUR_MS);
        until("the alarm fires", || fired(&s.log).len() == 1).await;
        assert_eq!(host.activations(), 1);
        host.shutdown().await;
    });
}

#[test]
fn overdue_alarms_fire_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let system: Arc<dyn Clock> = Arc::new(duro::SystemClock);
    run_local(async {
        let host = host(dir.path(), system.clone(), log.clone());
        let at = system.now_ms() + 200;
        call(&host, "a", "PUT", &format!("/alarm?{at}")).await;
        host.shutdown().await;
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(fired(&log).is_empty());
    run_local(async {
        let host = host(dir.path(), system.clone(), log.clone());
        until("the overdue alarm fires", || fired(&log).len() == 1).await;
        idle().await;
        assert_eq!(call(&host, "a", "GET", "/").await, "None");
        host.shutdown().await;
    });
}

#[test]
fn ten_thousand_alarms_fire_exactly_once() {
    const OBJECTS: usize = 10_000;
    let s = setup();
    run_local(async {
        let host = s.host();
        let namespace = host.namespace("alarmed").unwrap();
        let calls: Vec<_> = (0..OBJECTS)
            .map(|i| {
                let stub = namespace.get_by_name(&format!("o{i}")).unwrap();
                let at = T0 + 1 + (i as u64 % 97) * 1000;
                stub.call("PUT", &format!("/alarm?{at}"), "")
            })
            .collect();
        for result in futures::future::join_all(calls).await {
            result.unwrap();
        }
        // Requests still get through while the burst is delivered.
        s.clock.advance(HOUR_MS);
        assert_eq!(call(&host, "z", "GET", "/").await, "None");
        until("every alarm fires", || fired(&s.log).len() >= OBJECTS).await;
        idle().await;
        let log = fired(&s.log);
        let names: std::collections::BTreeSet<&str> = log.iter().map(|f| f.name.as_str()).collect();
        assert_eq!((log.len(), names.len()), (OBJECTS, OBJECTS));
        host.shutdown().await;
    });
}

#[test]
fn an_alarm_set_over_capnp_fires() {
    let clock = ManualClock::new(T0);
    let log = Log::default();
    let server = duro::testing::TestServer::start(builder(clock.shared(), log.clone()));
    run_local(async {
        let client = server.connect().await;
        let at = T0 + HOUR_MS;
        let path = format!("/alarm?{at}");
        let response = duro::testing::fetch_by_name(&client, "alarmed", "a", "PUT", &path, b"");
        assert_eq!(
            response.await.unwrap().body().as_ref(),
            format!("Some({at})").as_bytes()
        );
        clock.advance(HOUR_MS);
        until("the alarm fires", || fired(&log).len() == 1).await;
        idle().await;
        let response = duro::testing::fetch_by_name(&client, "alarmed", "a", "GET", "/", b"");
        assert_eq!(response.await.unwrap().body().as_ref(), b"None");
    });
}

/// A host whose commits can be held or failed.
fn faulty_host(s: &Setup) -> (Host, Arc<duro::testing::FaultyBackend>) {
    let slot = Arc::new(Mutex::new(None));
    let wrap_slot = slot.clone();
    let host = builder(s.clock.shared(), s.log.clone())
        .data_dir(s.dir.path())
        .wrap_backend(move |inner| {
            let faulty = duro::testing::FaultyBackend::new(inner);
            *wrap_slot.lock().unwrap() = Some(faulty.clone());
            faulty
        })
        .open_host()
        .unwrap();
    let faulty = slot.lock().unwrap().clone().unwrap();
    (host, faulty)
}

#[test]
fn the_response_after_set_alarm_waits_until_it_is_durable() {
    let s = setup();
    run_local(async {
        let (host, faulty) = faulty_host(&s);
        let stub = host.namespace("alarmed").unwrap().get_by_name("a").unwrap();
        faulty.hold();
        let at = T0 + HOUR_MS;
        let answer = tokio::task::spawn_local(stub.call("PUT", &format!("/alarm?{at}"), ""));
        idle().await;
        assert!(
            !answer.is_finished(),
            "answered before the alarm was durable"
        );
        faulty.release();
        let response = answer.await.unwrap().unwrap();
        assert_eq!(response.body().as_ref(), format!("Some({at})").as_bytes());
        host.shutdown().await;
    });
}

#[test]
fn a_failed_commit_of_the_handler_retries_the_alarm() {
    let s = setup();
    run_local(async {
        let (host, faulty) = faulty_host(&s);
        call(&host, "a", "PUT", &format!("/alarm?{}", T0 + 10)).await;
        faulty.fail_commits(duro::storage::Error::Io("disk gone".into()), 1);
        s.clock.advance(10);
        until("the alarm fires", || fired(&s.log).len() == 1).await;
        idle().await;
        s.clock.advance(2400);
        until("the retry", || fired(&s.log).len() == 2).await;
        assert_eq!(fired(&s.log)[1].retry_count, 1);
        idle().await;
        assert_eq!(call(&host, "a", "GET", "/").await, "None");
        host.shutdown().await;
    });
}

/// The built-in `timer` class on a manual clock: timers fire in time order, those due together
/// in one delivery, and each is listed once in `/fired`; the alarm follows the earliest pending.
#[test]
fn the_timer_builtin_fires_its_timers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_system_time();
    let t0 = clock.now_ms();
    run_local(async {
        let host = duro::builtin::register(Server::builder())
            .clock(clock.shared())
            .data_dir(dir.path())
            .open_host()
            .unwrap();
        let stub = host.namespace("timer").unwrap().get_by_name("t").unwrap();
        let call = |method: &'static str, path: String| {
            let stub = stub.clone();
            async move {
                let response = stub.call(method, &path, "").await.unwrap();
                let body = String::from_utf8(response.body().to_vec()).unwrap();
                (response.status().as_u16(), body)
            }
        };
        let (one, two) = (t0 + HOUR_MS, t0 + 2 * HOUR_MS);
        for (at, tag) in [(two, "b"), (one, "a"), (one, "c"), (one, "a")] {
            let (status, body) = call("POST", format!("/?at={at}&tag={tag}")).await;
            assert_eq!(status, 200, "{body}");
        }
        let tags = |body: &str| -> Vec<String> {
            let entries: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
            entries
                .iter()
                .map(|e| e["tag"].as_str().unwrap().to_owned())
                .collect()
        };
        let (_, pending) = call("GET", "/pending".into()).await;
        assert_eq!(
            tags(&pending),
            ["a", "c", "b"],
            "by time, the repeat stored once"
        );
        assert_eq!(call("POST", "/?at=1".into()).await.0, 400, "no tag");
        assert_eq!(call("POST", "/?tag=x".into()).await.0, 400, "no time");
        assert_eq!(call("GET", "/nowhere".into()).await.0, 404);

        clock.advance(HOUR_MS);
        for _ in 0..10_000 {
            if tags(&call("GET", "/fired".into()).await.1).len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (_, fired) = call("GET", "/fired".into()).await;
        assert_eq!(tags(&fired), ["a", "c"]);
        let record: Vec<serde_json::Value> = serde_json::from_str(&fired).unwrap();
        assert_eq!(record[0]["due_ms"], one);
        assert_eq!(tags(&call("GET", "/pending".into()).await.1), ["b"]);

        idle().await;
        assert_eq!(
            tags(&call("GET", "/fired".into()).await.1).len(),
            2,
            "b is not due"
        );
        clock.advance(HOUR_MS);
        for _ in 0..10_000 {
            if tags(&call("GET", "/fired".into()).await.1).len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(tags(&call("GET", "/fired".into()).await.1), ["a", "c", "b"]);

        call("POST", format!("/?at={}&tag=d", t0 + 3 * HOUR_MS)).await;
        assert_eq!(call("DELETE", "/pending".into()).await.1, "1");
        clock.advance(HOUR_MS);
        idle().await;
        assert_eq!(
            tags(&call("GET", "/fired".into()).await.1).len(),
            3,
            "d was cancelled"
        );
        host.shutdown().await;
    });
}
