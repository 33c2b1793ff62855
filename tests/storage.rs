//! `state.storage`: the API, its limits, the cache, transactions, the gates, group commit,
//! failures, and the object registry.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duro::storage::{Error as StorageError, Limits, ListOptions};
use duro::testing::{FaultyBackend, TestServer, fetch_by_name, request, run_local, state};
use duro::{BoxError, DurableObject, Error, Request, Response, Server, State, Storage};

/// A class with no behaviour of its own: it binds the namespace whose objects' storage the
/// tests drive directly, through `duro::testing::state`.
struct Probe;

impl DurableObject for Probe {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        Ok(Response::new("probe".into()))
    }
}

fn probe_builder(dir: &std::path::Path) -> duro::Builder {
    let builder = Server::builder()
        .class("probe", |_state, _env| Probe)
        .namespace("probe", "probe");
    duro::testing::data_dir(builder, dir)
}

/// The storage of the probe object `name`, as the object itself sees it.
fn probe(host: &duro::Host, name: &str) -> Storage {
    state(host, "probe", name).unwrap().storage().clone()
}

fn opts(f: impl FnOnce(&mut ListOptions)) -> ListOptions {
    let mut options = ListOptions::default();
    f(&mut options);
    options
}

fn keys(entries: &[(Vec<u8>, u32)]) -> Vec<String> {
    entries
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect()
}

#[test]
fn values_keep_their_type_and_raw_bytes_stay_raw() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        let s = probe(&host, "types");
        let nested: BTreeMap<String, Vec<Option<i64>>> =
            [("a".into(), vec![Some(-1), None])].into();
        s.put("map", &nested).await.unwrap();
        s.put("text", "hello").await.unwrap();
        s.put_bytes("raw", b"\x00\xff").await.unwrap();
        assert_eq!(
            s.get::<BTreeMap<String, Vec<Option<i64>>>>("map")
                .await
                .unwrap(),
            Some(nested)
        );
        assert_eq!(
            s.get::<String>("text").await.unwrap().as_deref(),
            Some("hello")
        );
        assert_eq!(
            s.get_bytes("raw").await.unwrap().unwrap().as_ref(),
            b"\x00\xff"
        );
        assert_eq!(s.get::<String>("missing").await.unwrap(), None);
        assert!(matches!(
            s.get::<u64>("text").await,
            Err(StorageError::Decode(_))
        ));
        assert!(matches!(
            s.get::<String>("raw").await,
            Err(StorageError::Decode(_))
        ));
        host.shutdown().await;
    });
}

#[test]
fn batched_calls_and_delete_report_what_existed() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        let s = probe(&host, "batch");
        s.put_many(&[("a", 1u32), ("b", 2), ("c", 3)])
            .await
            .unwrap();
        let found: BTreeMap<Vec<u8>, u32> = s.get_many(&["a", "c", "zz"]).await.unwrap();
        assert_eq!(found, [(b"a".to_vec(), 1), (b"c".to_vec(), 3)].into());
        assert!(s.delete("a").await.unwrap());
        assert!(!s.delete("a").await.unwrap());
        assert_eq!(s.delete_many(&["b", "c", "zz"]).await.unwrap(), 2);
        assert_eq!(
            s.list::<u32>(&ListOptions::default()).await.unwrap(),
            vec![]
        );
        host.shutdown().await;
    });
}

#[test]
fn delete_many_counts_a_key_given_twice_once() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        let s = probe(&host, "twice");
        s.put_many(&[("a", 1u32), ("b", 2)]).await.unwrap();
        assert_eq!(s.delete_many(&["a", "a", "zz", "zz"]).await.unwrap(), 1);
        assert_eq!(s.delete_many(&["b", "a", "b"]).await.unwrap(), 1);
        assert_eq!(s.delete_many(&["a", "b"]).await.unwrap(), 0);
        host.shutdown().await;
    });
}

#[test]
fn limits_refuse_the_call_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        let s = probe(&host, "limits");
        let key_ok = "k".repeat(2048);
        let key_long = "k".repeat(2049);
        s.put_bytes(&key_ok, b"v").await.unwrap();
        assert_eq!(
            s.put_bytes(&key_long, b"v").await,
            Err(StorageError::KeyTooLarge {
                len: 2049,
                max: 2048
            })
        );
        assert!(matches!(
            s.get::<u8>(&key_long).await,
            Err(StorageError::KeyTooLarge { .. })
        ));
        s.put_bytes("big", &vec![7; 32 * 1024]).await.unwrap();
        let too_big = s.put_bytes("bigger", &vec![7; 32 * 1024 + 1]).await;
        assert_eq!(
            too_big,
            Err(StorageError::ValueTooLarge {
                len: 32 * 1024 + 1,
                max: 32 * 1024
            })
        );
        assert_eq!(s.get_bytes("bigger").await.unwrap(), None);
        let many: Vec<(String, u8)> = (0..129).map(|i| (format!("m{i}"), 1)).collect();
        assert_eq!(
            s.put_many(&many).await,
            Err(StorageError::TooManyKeys {
                count: 129,
                max: 128
            })
        );
        // One bad entry in a batch writes none of it.
        let mixed = vec![
            ("fine".to_string(), vec![1u8]),
            (key_long.clone(), vec![1u8]),
        ];
        assert!(s.put_many(&mixed).await.is_err());
        assert_eq!(s.get::<Vec<u8>>("fine").await.unwrap(), None);
        assert_eq!(s.get::<u8>("m0").await.unwrap(), None);
        let message = too_big.unwrap_err().to_string();
        assert!(message.contains("value_bytes_max"), "{message}");
        host.shutdown().await;
    });
    // The limits are configurable.
    run_local(async {
        let limits = Limits {
            key_bytes_max: 4,
            ..Limits::default()
        };
        let host = probe_builder(dir.path())
            .storage_limits(limits)
            .open_host()
            .unwrap();
        let s = probe(&host, "limits");
        assert!(matches!(
            s.put("12345", &1).await,
            Err(StorageError::KeyTooLarge { max: 4, .. })
        ));
        host.shutdown().await;
    });
}

#[test]
fn list_options_select_the_range_in_order() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        let s = probe(&host, "list");
        for (i, key) in ["a", "b", "ba", "bb", "c", "d"].iter().enumerate() {
            s.put(key, &(i as u32)).await.unwrap();
        }
        s.sync().await.unwrap();
        let list = |o: ListOptions| {
            let s = s.clone();
            async move { keys(&s.list::<u32>(&o).await.unwrap()) }
        };
        assert_eq!(list(opts(|_| {})).await, ["a", "b", "ba", "bb", "c", "d"]);
        assert_eq!(
            list(opts(|o| o.start = Some(b"b".into()))).await,
            ["b", "ba", "bb", "c", "d"]
        );
        assert_eq!(
            list(opts(|o| o.start_after = Some(b"b".into()))).await,
            ["ba", "bb", "c", "d"]
        );
        assert_eq!(
            list(opts(|o| o.end = Some(b"c".into()))).await,
            ["a", "b", "ba", "bb"]
        );
        assert_eq!(
            list(opts(|o| o.prefix = Some(b"b".into()))).await,
            ["b", "ba", "bb"]
        );
        let reversed = opts(|o| {
            o.prefix = Some(b"b".into());
            o.reverse = true;
            o.limit = Some(2);
        });
        assert_eq!(list(reversed).await, ["bb", "ba"]);
        let both = opts(|o| {
            o.start = Some(b"a".into());
            o.start_after = Some(b"a".into());
        });
        assert!(matches!(
            s.list::<u32>(&both).await,
            Err(StorageError::InvalidList(_))
        ));
        let zero = opts(|o| o.limit = Some(0));
        assert!(matches!(
            s.list::<u32>(&zero).await,
            Err(StorageError::InvalidList(_))
        ));
        host.shutdown().await;
    });
}

/// A small deterministic generator; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn key(&mut self) -> Vec<u8> {
        let long = self.below(8) == 0;
        let mut key = if long { vec![b'L'; 420] } else { Vec::new() };
        for _ in 0..=self.below(3) {
            key.push(b"abc\xff"[self.below(4) as usize]);
        }
        key
    }
    fn bound(&mut self) -> Option<Vec<u8>> {
        (self.below(3) == 0).then(|| self.key())
    }
}

/// Random puts, deletes, delete_alls, transactions, syncs and restarts, checked after every
/// step against a BTreeMap: reads, lists over random ranges, with a cache small enough to
/// evict, so entries come from the cache, from LMDB, and from both merged.
#[test]
fn storage_matches_a_model_through_cache_evictions_and_restarts() {
    let seed = std::env::var("DURO_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    println!("seed {seed} (set DURO_SEED to repeat)");
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed);
    let mut model: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let limits = Limits {
        cache_bytes_max: 4096,
        ..Limits::default()
    };
    for _restart in 0..4 {
        let builder = probe_builder(dir.path()).storage_limits(limits.clone());
        run_local(async {
            let host = builder.open_host().unwrap();
            let s = probe(&host, "model");
            for step in 0..300 {
                apply_random_step(&s, &mut rng, &mut model, step).await;
                check_random_list(&s, &mut rng, &model).await;
            }
            s.sync().await.unwrap();
            host.shutdown().await;
        });
    }
}

async fn apply_random_step(
    s: &Storage,
    rng: &mut Rng,
    model: &mut BTreeMap<Vec<u8>, u32>,
    step: u32,
) {
    match rng.below(20) {
        0..=8 => {
            let key = rng.key();
            s.put(&key, &step).await.unwrap();
            model.insert(key, step);
        }
        9..=12 => {
            let key = rng.key();
            assert_eq!(s.delete(&key).await.unwrap(), model.remove(&key).is_some());
        }
        13 => {
            if rng.below(4) == 0 {
                s.delete_all().await.unwrap();
                model.clear();
            }
        }
        14..=15 => {
            let (a, b) = (rng.key(), rng.key());
            let rollback = rng.below(3) == 0;
            s.transaction(|txn| {
                let (a, b) = (a.clone(), b.clone());
                async move {
                    txn.put(&a, &step).await?;
                    txn.delete(&b).await?;
                    if rollback {
                        txn.rollback();
                    }
                    Ok::<_, StorageError>(())
                }
            })
            .await
            .unwrap();
            if !rollback {
                model.insert(a, step);
                model.remove(&b);
            }
        }
        16 => s.sync().await.unwrap(),
        _ => {
            let key = rng.key();
            assert_eq!(s.get::<u32>(&key).await.unwrap(), model.get(&key).copied());
        }
    }
}

async fn check_random_list(s: &Storage, rng: &mut Rng, model: &BTreeMap<Vec<u8>, u32>) {
    let mut options = ListOptions {
        start: rng.bound(),
        end: rng.bound(),
        prefix: (rng.below(4) == 0).then(|| rng.key()[..1].to_vec()),
        reverse: rng.below(2) == 0,
        limit: (rng.below(2) == 0).then(|| 1 + rng.below(10) as usize),
        ..ListOptions::default()
    };
    if options.start.is_none() && rng.below(2) == 0 {
        options.start_after = rng.bound();
    }
    let got = s.list::<u32>(&options).await.unwrap();
    let mut expected: Vec<(Vec<u8>, u32)> = model
        .iter()
        .filter(|(k, _)| options.start.as_ref().is_none_or(|b| *k >= b))
        .filter(|(k, _)| options.start_after.as_ref().is_none_or(|b| *k > b))
        .filter(|(k, _)| options.end.as_ref().is_none_or(|b| *k < b))
        .filter(|(k, _)| options.prefix.as_ref().is_none_or(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    if options.reverse {
        expected.reverse();
    }
    expected.truncate(options.limit.unwrap_or(usize::MAX));
    assert_eq!(got, expected, "list {options:?}");
}

#[test]
fn transactions_commit_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        let s = probe(&host, "txn");
        s.put("balance/a", &10u32).await.unwrap();
        // Reads inside see the transaction's own writes; lists too.
        let seen = s
            .transaction(|txn| async move {
                txn.put("balance/b", &5u32).await?;
                txn.delete("balance/a").await?;
                let b = txn.get::<u32>("balance/b").await?;
                let listed = txn
                    .list::<u32>(&opts(|o| o.prefix = Some(b"balance/".into())))
                    .await?;
                Ok::<_, StorageError>((b, keys(&listed)))
            })
            .await
            .unwrap();
        assert_eq!(seen, (Some(5), vec!["balance/b".to_string()]));
        assert_eq!(s.get::<u32>("balance/a").await.unwrap(), None);
        // An error from the body writes nothing.
        let failed: Result<(), BoxError> = s
            .transaction(|txn| async move {
                txn.put("x", &1u32).await?;
                Err("no".into())
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(s.get::<u32>("x").await.unwrap(), None);
        // After rollback nothing is written and the transaction refuses further calls.
        let after = s
            .transaction(|txn| async move {
                txn.put("y", &1u32).await?;
                txn.rollback();
                Ok::<_, StorageError>(txn.put("z", &1u32).await)
            })
            .await
            .unwrap();
        assert_eq!(after, Err(StorageError::TransactionEnded));
        assert_eq!(s.get::<u32>("y").await.unwrap(), None);
        host.shutdown().await;
    });
}

#[test]
fn a_transaction_is_retried_when_a_write_lands_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        let s = probe(&host, "conflict");
        let runs = Rc::new(RefCell::new(0));
        let result = s
            .transaction(|txn| {
                let (s, runs) = (s.clone(), runs.clone());
                async move {
                    *runs.borrow_mut() += 1;
                    let n = txn.get::<u32>("n").await?.unwrap_or(0);
                    if *runs.borrow() == 1 {
                        // A task of the object writes meanwhile (not gated by the transaction).
                        tokio::task::spawn_local(async move { s.put("n", &100u32).await.unwrap() });
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    txn.put("n", &(n + 1)).await?;
                    Ok::<_, StorageError>(n + 1)
                }
            })
            .await
            .unwrap();
        assert_eq!(*runs.borrow(), 2, "the body ran again after the conflict");
        assert_eq!(result, 101);
        assert_eq!(s.get::<u32>("n").await.unwrap(), Some(101));
        host.shutdown().await;
    });
}

#[test]
fn writes_are_durable_across_restarts_and_delete_all_is_too() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        let s = probe(&host, "durable");
        s.put("keep", &1u32).await.unwrap();
        let other = probe(&host, "wiped");
        other.put("a", &1u32).await.unwrap();
        other.put("b", &1u32).await.unwrap();
        other.sync().await.unwrap();
        other.delete_all().await.unwrap();
        assert_eq!(other.get::<u32>("a").await.unwrap(), None, "hidden at once");
        other.put("after", &2u32).await.unwrap();
        assert_eq!(
            keys(&other.list::<u32>(&ListOptions::default()).await.unwrap()),
            ["after"]
        );
        s.sync().await.unwrap();
        other.sync().await.unwrap();
        host.shutdown().await;
    });
    run_local(async {
        let host = probe_builder(dir.path()).open_host().unwrap();
        assert_eq!(
            probe(&host, "durable").get::<u32>("keep").await.unwrap(),
            Some(1)
        );
        let other = probe(&host, "wiped");
        assert_eq!(
            keys(&other.list::<u32>(&ListOptions::default()).await.unwrap()),
            ["after"]
        );
        host.shutdown().await;
    });
}

/// A counter whose handler can hold the input gate: `POST /hold` takes the gate and waits 20 ms
/// inside it before incrementing; `POST /txn` does the same inside a storage transaction;
/// `POST /fail-gate` fails inside the gate.
struct Gatekeeper {
    state: State,
    log: Rc<RefCell<Vec<String>>>,
}

impl DurableObject for Gatekeeper {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let path = request.uri().path().to_owned();
        self.log.borrow_mut().push(format!("start {path}"));
        match path.as_str() {
            "/hold" => {
                let log = self.log.clone();
                self.state
                    .block_concurrency_while(async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        log.borrow_mut().push("held".into());
                        Ok::<_, String>(())
                    })
                    .await?;
            }
            "/txn" => {
                let log = self.log.clone();
                let storage = self.state.storage();
                storage
                    .transaction(|txn| {
                        let log = log.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            log.borrow_mut().push("held".into());
                            txn.put("txn", &1u32).await
                        }
                    })
                    .await?;
            }
            "/fail-gate" => {
                self.state
                    .block_concurrency_while(async { Err::<(), _>("bad init") })
                    .await?;
            }
            "/sleep" => tokio::time::sleep(Duration::from_millis(5)).await,
            _ => {}
        }
        self.log.borrow_mut().push(format!("end {path}"));
        Ok(Response::new("ok".into()))
    }
}

#[test]
fn block_concurrency_while_keeps_other_requests_out() {
    gate_keeps_other_requests_out("/hold", true);
}

#[test]
fn a_transaction_keeps_other_requests_out() {
    gate_keeps_other_requests_out("/txn", false);
}

/// `/sleep` starts, then `holding` takes the gate while `/sleep` is mid-await, and `/after`
/// is queued: neither runs until the gate opens. With `then_fail`, a failure inside
/// `block_concurrency_while` resets the object.
fn gate_keeps_other_requests_out(holding: &str, then_fail: bool) {
    let dir = tempfile::tempdir().unwrap();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    run_local(async {
        thread_local! { static LOG: RefCell<Option<Rc<RefCell<Vec<String>>>>> = const { RefCell::new(None) }; }
        LOG.with(|l| *l.borrow_mut() = Some(log.clone()));
        let builder = Server::builder()
            .class("gate", |state, _env| Gatekeeper {
                state,
                log: LOG.with(|l| l.borrow().clone().unwrap()),
            })
            .namespace("gate", "gate");
        let host = duro::testing::data_dir(builder, dir.path())
            .open_host()
            .unwrap();
        let stub = host.namespace("gate").unwrap().get_by_name("g").unwrap();
        // /sleep starts first and is mid-await when `holding` takes the gate; /after is queued.
        let sleeping = stub.fetch(request("POST", "/sleep", b""));
        let holding = stub.fetch(request("POST", holding, b""));
        let after = stub.fetch(request("POST", "/after", b""));
        let (a, b, c) = tokio::join!(sleeping, holding, after);
        a.unwrap();
        b.unwrap();
        c.unwrap();
        let log = log.borrow().clone();
        let held = log.iter().position(|e| e == "held").unwrap();
        let sleep_end = log.iter().position(|e| e == "end /sleep").unwrap();
        let after_start = log.iter().position(|e| e == "start /after").unwrap();
        assert!(
            held < sleep_end,
            "a started handler does not resume while the gate is held: {log:?}"
        );
        assert!(
            held < after_start,
            "no new request is delivered while the gate is held: {log:?}"
        );
        if then_fail {
            // A failure inside the gate resets the object.
            let failed = stub.fetch(request("POST", "/fail-gate", b"")).await;
            assert!(matches!(failed, Err(Error::Disconnected(_))), "{failed:?}");
            assert!(stub.is_broken());
        }
        host.shutdown().await;
    });
}

/// 64 clients each doing get then put of n+1 on one object, 100 times: the input gate means
/// no increment is lost.
#[test]
fn concurrent_increments_are_never_lost() {
    let server = TestServer::start(duro::builtin::register(Server::builder()));
    run_local(async {
        let mut clients = Vec::new();
        for _ in 0..64 {
            let host = server.connect().await;
            clients.push(tokio::task::spawn_local(async move {
                for _ in 0..100 {
                    fetch_by_name(&host, "counter", "hot", "POST", "/", b"")
                        .await
                        .unwrap();
                }
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
        let host = server.connect().await;
        let value = fetch_by_name(&host, "counter", "hot", "GET", "/", b"")
            .await
            .unwrap();
        assert_eq!(value.body().as_ref(), b"6400\n");
    });
}

fn faulty_server() -> (TestServer, Arc<FaultyBackend>) {
    let slot: Arc<Mutex<Option<Arc<FaultyBackend>>>> = Arc::default();
    let wrap_slot = slot.clone();
    let builder = duro::builtin::register(Server::builder()).wrap_backend(move |inner| {
        let faulty = FaultyBackend::new(inner);
        *wrap_slot.lock().unwrap() = Some(faulty.clone());
        faulty
    });
    let server = TestServer::start(builder);
    let faulty = slot.lock().unwrap().clone().unwrap();
    (server, faulty)
}

#[test]
fn a_response_waits_until_its_writes_are_durable() {
    let (server, faulty) = faulty_server();
    run_local(async {
        let host = server.connect().await;
        fetch_by_name(&host, "counter", "gated", "POST", "/", b"")
            .await
            .unwrap();
        let before = faulty.commits();
        faulty.hold();
        let pending = tokio::task::spawn_local({
            let host = host.clone();
            async move { fetch_by_name(&host, "counter", "gated", "POST", "/", b"").await }
        });
        // The commit carrying the write has started and is held: no response may exist yet.
        for _ in 0..500 {
            if faulty.commits() > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(faulty.commits(), before + 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !pending.is_finished(),
            "the response left before its write was durable"
        );
        // A read of the same object needs no durability: its own writes are visible.
        faulty.release();
        let response = pending.await.unwrap().unwrap();
        assert_eq!(response.body().as_ref(), b"2\n");
    });
}

#[test]
fn a_failed_commit_resets_the_object_and_keeps_nothing() {
    let (server, faulty) = faulty_server();
    run_local(async {
        let host = server.connect().await;
        let post = |name: &'static str| {
            let host = host.clone();
            async move { fetch_by_name(&host, "counter", name, "POST", "/", b"").await }
        };
        post("victim").await.unwrap();
        post("bystander").await.unwrap();
        faulty.fail_commits(StorageError::MapFull { map_bytes: 1 }, 1);
        let failed = post("victim").await;
        assert!(matches!(failed, Err(Error::Disconnected(_))), "{failed:?}");
        // Nothing of the failed commit is visible; the next get builds a fresh instance from
        // storage; reads work; writes work again.
        let get = fetch_by_name(&host, "counter", "victim", "GET", "/", b"")
            .await
            .unwrap();
        assert_eq!(get.body().as_ref(), b"1\n");
        assert_eq!(post("victim").await.unwrap().body().as_ref(), b"2\n");
        assert_eq!(post("bystander").await.unwrap().body().as_ref(), b"2\n");
    });
}

/// Once an object's virtual shard has its ownership epoch raised under a running host (as a
/// node that lost the shard's lease would find), that object's next write is fenced: its stub
/// breaks with `disconnected`, its storage reports `Fenced`, and nothing is stored. An object
/// on another virtual shard keeps working.
#[test]
fn a_raised_epoch_fences_the_objects_of_that_shard_only() {
    let dir = tempfile::tempdir().unwrap();
    let slot: Arc<Mutex<Option<Arc<dyn duro::storage::Backend>>>> = Arc::default();
    let wrap_slot = slot.clone();
    run_local(async {
        let host = duro::builtin::register(probe_builder(dir.path()))
            .wrap_backend(move |inner| {
                *wrap_slot.lock().unwrap() = Some(inner.clone());
                inner
            })
            .open_host()
            .unwrap();
        let backend = slot.lock().unwrap().clone().unwrap();
        let count = backend.shard_map().unwrap().count();
        let shard_of = |namespace: &str, name: &str| {
            let id = host
                .namespace(namespace)
                .unwrap()
                .id_from_name(name)
                .unwrap();
            duro::storage::virtual_shard(id.bytes(), count)
        };
        let fenced_shards = [shard_of("counter", "victim"), shard_of("probe", "p")];
        let bystander = (0..)
            .map(|i| format!("bystander{i}"))
            .find(|name| !fenced_shards.contains(&shard_of("counter", name)))
            .unwrap();
        let counter = host.namespace("counter").unwrap();
        let post = |name: &str| {
            let stub = counter.get_by_name(name).unwrap();
            async move { stub.fetch(request("POST", "/", b"")).await }
        };
        let body = |r: Result<Response, Error>| r.unwrap().body().to_vec();
        assert_eq!(body(post("victim").await), b"1\n");
        assert_eq!(body(post(&bystander).await), b"1\n");
        let storage = probe(&host, "p");
        storage.put("k", &1u32).await.unwrap();
        storage.sync().await.unwrap();

        for shard in fenced_shards {
            // Both may share a shard: raise each shard once.
            if backend.shard_map().unwrap().epoch(shard) == Some(1) {
                assert_eq!(backend.raise_epoch(shard).unwrap(), 2);
            }
        }
        let fenced = post("victim").await;
        assert!(
            matches!(&fenced, Err(Error::Disconnected(why)) if why.contains("fenced")),
            "the caller is told why: {fenced:?}"
        );
        storage.put("k", &2u32).await.unwrap();
        let synced = storage.sync().await;
        assert!(
            matches!(
                synced,
                Err(StorageError::Fenced {
                    epoch: 1,
                    current: 2,
                    ..
                })
            ),
            "{synced:?}"
        );
        assert_eq!(body(post(&bystander).await), b"2\n");

        // Nothing fenced was stored: the victim still counts 1, the probe's key is 1.
        let victim = counter.id_from_name("victim").unwrap();
        let key = duro::storage::ObjectKey {
            tag: backend.namespace("counter").unwrap().tag,
            id: *victim.bytes(),
        };
        let all = (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded);
        let stored = backend.scan(&key, all.0, all.1, false, 10).unwrap();
        let values: Vec<u64> = stored
            .iter()
            .map(|(_, v)| duro::storage::value::decode(v).unwrap())
            .collect();
        assert_eq!(values, [1]);
        host.shutdown().await;
    });
}

/// Writes of many objects waiting at once share one commit (and one fsync).
#[test]
fn many_objects_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let slot: Arc<Mutex<Option<Arc<FaultyBackend>>>> = Arc::default();
    let wrap_slot = slot.clone();
    run_local(async {
        let builder = duro::builtin::register(Server::builder());
        let host = duro::testing::data_dir(builder, dir.path())
            .wrap_backend(move |inner| {
                let faulty = FaultyBackend::new(inner);
                *wrap_slot.lock().unwrap() = Some(faulty.clone());
                faulty
            })
            .open_host()
            .unwrap();
        let faulty = slot.lock().unwrap().clone().unwrap();
        let stats = host.writer_stats();
        let counter = host.namespace("counter").unwrap();
        // Hold the disk while every object writes, so all their batches wait together.
        faulty.hold();
        let calls: Vec<_> = (0..1000)
            .map(|i| {
                counter
                    .get_by_name(&format!("c{i}"))
                    .unwrap()
                    .fetch(request("POST", "/", b""))
            })
            .map(tokio::task::spawn_local)
            .collect();
        while stats.submitted.load(Ordering::SeqCst) < 1000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        faulty.release();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().body().as_ref(), b"1\n");
        }
        let commits = stats.commits.load(Ordering::SeqCst);
        assert!(commits <= 2, "1000 objects' writes took {commits} commits");
        assert_eq!(stats.batches.load(Ordering::SeqCst), 1000);
        host.shutdown().await;
    });
}

/// With the writer idle, a flush lets the event loop poll its sockets and run what is ready
/// first: the writes of a call whose request arrives on a socket meanwhile join the group of
/// the call before it, and the two share one commit.
#[test]
fn on_an_idle_writer_a_call_arriving_meanwhile_shares_the_group() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let builder = duro::builtin::register(Server::builder());
        let host = duro::testing::data_dir(builder, dir.path())
            .open_host()
            .unwrap();
        let stats = host.writer_stats();
        let counter = host.namespace("counter").unwrap();
        let a = counter.get_by_name("a").unwrap();
        let b = counter.get_by_name("b").unwrap();
        // Both activated, and nothing written: the writer waits for work.
        for stub in [&a, &b] {
            let read = stub.fetch(request("GET", "/", b"")).await.unwrap();
            assert_eq!(read.body().as_ref(), b"0\n");
        }
        let groups = stats.groups.load(Ordering::SeqCst);
        let commits = stats.commits.load(Ordering::SeqCst);
        let (mut sender, mut receiver) = tokio::net::UnixStream::pair().unwrap();
        // `b`'s call waits for its request on a socket, as a connection's does.
        let later = tokio::task::spawn_local(async move {
            let mut byte = [0u8; 1];
            receiver.read_exact(&mut byte).await.unwrap();
            b.fetch(request("POST", "/", b"")).await
        });
        // `a`'s call sends that request, then writes: `b`'s request arrives after the write,
        // before the event loop polls its sockets again.
        let first = tokio::task::spawn_local(async move {
            sender.write_all(b"x").await.unwrap();
            a.fetch(request("POST", "/", b"")).await
        });
        for call in [first, later] {
            assert_eq!(call.await.unwrap().unwrap().body().as_ref(), b"1\n");
        }
        assert_eq!(stats.groups.load(Ordering::SeqCst), groups + 1);
        assert_eq!(stats.commits.load(Ordering::SeqCst), commits + 1);
        host.shutdown().await;
    });
}

/// `POST` stores a key, `DELETE` empties the object's storage.
struct Boxed {
    state: State,
}

impl DurableObject for Boxed {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        match *request.method() {
            http::Method::DELETE => self.state.storage().delete_all().await?,
            http::Method::POST => self.state.storage().put("k", &1u8).await?,
            _ => {}
        }
        Ok(Response::new(Default::default()))
    }
}

#[test]
fn list_objects_pages_through_objects_with_data() {
    let builder = Server::builder()
        .class("box", |state, _| Boxed { state })
        .namespace("box", "box");
    let server = TestServer::start(builder);
    run_local(async {
        let host = server.connect().await;
        for i in 0..25 {
            fetch_by_name(&host, "box", &format!("obj{i}"), "POST", "/", b"")
                .await
                .unwrap();
        }
        // Reached but never stored anything: not listed.
        fetch_by_name(&host, "box", "empty", "GET", "/", b"")
            .await
            .ok();
        fetch_by_name(&host, "box", "obj3", "DELETE", "/", b"")
            .await
            .unwrap();
        let mut ns = host.namespace_request();
        ns.get().set_name("box");
        let ns = ns.send().pipeline.get_namespace();
        let mut listed: Vec<(String, String)> = Vec::new();
        let mut after = String::new();
        loop {
            let mut call = ns.list_objects_request();
            call.get().set_start_after(&after);
            call.get().set_limit(10);
            let reply = call.send().promise.await.unwrap();
            let reply = reply.get().unwrap();
            let ids = reply.get_ids().unwrap();
            for id in ids.iter() {
                let hex: String = id
                    .get_bytes()
                    .unwrap()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                listed.push((hex, id.get_name().unwrap().to_string().unwrap()));
            }
            after = listed.last().unwrap().0.clone();
            if !reply.get_more() {
                break;
            }
        }
        assert_eq!(listed.len(), 24, "objects with data, minus the emptied one");
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(listed, sorted, "in order of hex ids");
        let mut names: Vec<String> = listed.into_iter().map(|(_, n)| n).collect();
        names.sort();
        let mut expected: Vec<String> = (0..25)
            .filter(|i| *i != 3)
            .map(|i| format!("obj{i}"))
            .collect();
        expected.sort();
        assert_eq!(names, expected);
        let mut zero = ns.list_objects_request();
        zero.get().set_limit(0);
        assert!(zero.send().promise.await.is_err());
    });
}
