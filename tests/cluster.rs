//! A cluster of `duro serve --node` processes on one real PostgreSQL server (`DURO_TEST_PG`,
//! which CI starts with `.ci/postgres`): calls through any node reach the one instance of an
//! object, in order; a killed node's objects are served again by the others within the lease
//! time plus 2 s; a drained node loses no acknowledged write; and under a seeded schedule of
//! kills, pauses past the lease and restarts, no acknowledged increment is lost, no counter is
//! read going backwards, and no object runs two instances at once.
//!
//! The `tally` class answers every increment with its new value and the number of the
//! instance that made it (each activation stores a new number): for one object, in the order
//! of the answers, the values must grow and the activation numbers never go back.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::Served;
use duro::client::Client;

/// The lease time of the nodes: short, so that takeovers happen within the test's time.
const LEASE_MS: u64 = 1500;

/// One cluster test at a time: each runs three servers on a 2-core machine, and the takeover
/// figures are about time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Cluster {
    store: String,
    dir: tempfile::TempDir,
    nodes: Vec<Option<Served>>,
    /// Flags every node gets besides the cluster's own.
    flags: Vec<String>,
}

impl Cluster {
    /// `count` nodes named n0, n1, ... on a fresh database; waits until they share the shards.
    fn start(count: usize) -> Option<Cluster> {
        Cluster::start_with(count, &["--http", "off"])
    }

    /// [`Cluster::start`], each node with `flags` too.
    fn start_with(count: usize, flags: &[&str]) -> Option<Cluster> {
        let store = duro::testing::postgres_database()?;
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster {
            store,
            dir,
            nodes: Vec::new(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        for index in 0..count {
            let node = cluster.spawn(index);
            cluster.nodes.push(Some(node));
        }
        cluster.wait_balanced(count, Duration::from_secs(30));
        Some(cluster)
    }

    fn spawn(&self, index: usize) -> Served {
        let name = format!("n{index}");
        let lease = LEASE_MS.to_string();
        // Node 1 runs two event loops: calls cross its shards as well as the nodes.
        let shards = if index == 1 { "2" } else { "1" };
        let mut flags = vec![
            "--store",
            &self.store,
            "--node",
            &name,
            "--lease-ms",
            &lease,
            "--shards",
            shards,
        ];
        flags.extend(self.flags.iter().map(String::as_str));
        common::serve_with(self.dir.path(), &flags)
    }

    fn addr(&self, index: usize) -> Option<SocketAddr> {
        self.nodes[index].as_ref().map(|node| node.addr)
    }

    fn pid(&self, index: usize) -> i32 {
        self.nodes[index]
            .as_ref()
            .expect("a running node")
            .child
            .id() as i32
    }

    fn status(&self) -> serde_json::Value {
        let output = Command::new(env!("CARGO_BIN_EXE_duro"))
            .args(["cluster", "status", "--json", "--store", &self.store])
            .env("RUST_LOG", "error")
            .output()
            .expect("running duro cluster status");
        assert!(output.status.success(), "cluster status: {output:?}");
        serde_json::from_slice(&output.stdout).expect("cluster status --json")
    }

    /// Waits until `alive` nodes are alive, no shard is without a live lease, and each live
    /// node owns about its share.
    fn wait_balanced(&self, alive: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            let shards = status["virtual_shards"].as_u64().unwrap() as usize;
            let nodes = status["nodes"].as_array().unwrap();
            let live: Vec<usize> = nodes
                .iter()
                .filter(|n| n["alive"].as_bool().unwrap() && !n["draining"].as_bool().unwrap())
                .map(|n| n["shards"].as_array().unwrap().len())
                .collect();
            let unowned = status["unowned"].as_array().unwrap().len();
            // No node above its share (rounded up): no hand-off is still to come, whose shards
            // would have no owner for a moment.
            let even = live.iter().all(|&owned| owned <= shards.div_ceil(alive));
            if live.len() == alive && unowned == 0 && even {
                // Each node learns the others' shards at its next heartbeat (every fifth of
                // the lease): until then it would answer a call for them `disconnected`.
                std::thread::sleep(Duration::from_millis(LEASE_MS * 2 / 5));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle: {status}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node (its index) that owns each virtual shard now, from one read of the status.
    fn owners(&self) -> Vec<Option<usize>> {
        let status = self.status();
        let shards = status["virtual_shards"].as_u64().unwrap() as usize;
        let mut owners = vec![None; shards];
        for node in status["nodes"].as_array().unwrap() {
            let index: usize = node["name"].as_str().unwrap()[1..].parse().unwrap();
            for shard in node["shards"].as_array().unwrap() {
                owners[shard.as_u64().unwrap() as usize] = Some(index);
            }
        }
        owners
    }
}

/// An increment's answer: the value after it, and the instance that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Answer {
    value: u64,
    activation: u64,
}

fn parse(body: &[u8]) -> Answer {
    let text = std::str::from_utf8(body).unwrap().trim();
    let (value, activation) = text.split_once(' ').expect("VALUE ACTIVATION");
    Answer {
        value: value.parse().unwrap(),
        activation: activation.parse().unwrap(),
    }
}

/// Connections to the nodes, made again after one failed.
#[derive(Default)]
struct Clients(HashMap<SocketAddr, Client>);

impl Clients {
    /// `method /` on the tally `name` through the node at `addr`, within `wait`.
    async fn call(
        &mut self,
        addr: SocketAddr,
        name: &str,
        method: &str,
        wait: Duration,
    ) -> Result<Answer, duro::Error> {
        let client = match self.0.get(&addr) {
            Some(client) => client.clone(),
            None => {
                let connect = tokio::time::timeout(wait, Client::connect(addr)).await;
                let client = connect.map_err(|_| duro::Error::Disconnected("connect".into()))??;
                self.0.insert(addr, client.clone());
                client
            }
        };
        let call = client
            .namespace("tally")
            .get_by_name(name)
            .call(method, "/", "");
        let answer = match tokio::time::timeout(wait, call).await {
            Ok(Ok(response)) if response.status() == 200 => Ok(parse(response.body())),
            Ok(Ok(response)) => panic!("{name}: status {}", response.status()),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(duro::Error::Disconnected("timed out".into())),
        };
        if answer.is_err() {
            // The connection may be what failed (its node died or paused): a new one next.
            self.0.remove(&addr);
        }
        answer
    }
}

/// The failures a client of a cluster retries: a broken stub or connection, a node that does
/// not answer (paused), an owner being replaced. Anything else fails the test.
fn retryable(error: &duro::Error) -> bool {
    matches!(
        error,
        duro::Error::Disconnected(_) | duro::Error::Overloaded(_)
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn calls_through_any_node_reach_one_instance_in_order() {
    let _serial = serial();
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    runtime().block_on(async {
        let mut clients = Clients::default();
        let wait = Duration::from_secs(10);
        // Every object, through every node in turn: one instance (activation 1), one count.
        for object in 0..24 {
            let name = format!("o{object}");
            for round in 0..3u64 {
                let addr = cluster.addr(round as usize).unwrap();
                let answer = clients.call(addr, &name, "POST", wait).await.unwrap();
                assert_eq!(
                    answer,
                    Answer {
                        value: round + 1,
                        activation: 1
                    },
                    "{name} through node {round}"
                );
            }
        }
        // Calls pipelined on one stub through a node that does not own the object arrive in
        // the order made.
        let client = Client::connect(cluster.addr(0).unwrap()).await.unwrap();
        let tally = client.namespace("tally");
        let name = names_where(&cluster, &client, "far", 1, |owner| owner != 0)
            .await
            .remove(0);
        // One call by name (fetchByName) through that node reaches the owner's instance too.
        let post = || duro::testing::request("POST", "/", b"");
        let first = tally.fetch_by_name(&name, post()).await.unwrap();
        assert_eq!(
            parse(first.body()),
            Answer {
                value: 1,
                activation: 1
            }
        );
        let stub = tally.get_by_name(&name);
        let calls: Vec<_> = (0..100).map(|_| stub.call("POST", "/", "")).collect();
        let mut values = Vec::new();
        for call in calls {
            values.push(parse(call.await.unwrap().body()));
        }
        let expected: Vec<Answer> = (2..=101)
            .map(|value| Answer {
                value,
                activation: 1,
            })
            .collect();
        assert_eq!(values, expected);
    });
    // An export reads the whole store through any node; a node does not import (the other
    // nodes' instances would keep their caches).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.jsonl");
    let duro = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_duro"))
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let node0 = cluster.addr(0).unwrap().to_string();
    let node1 = cluster.addr(1).unwrap().to_string();
    let file_arg = file.to_str().unwrap();
    let exported = duro(&["export", "tally", "--connect", &node0, "-o", file_arg]);
    assert!(exported.status.success(), "{exported:?}");
    let lines = std::fs::read_to_string(&file).unwrap();
    assert_eq!(lines.matches("{\"object\":").count(), 25, "{lines}");
    let refused = duro(&["import", "--connect", &node1, "-i", file_arg]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("does not import"), "{stderr}");
}

#[test]
fn a_killed_node_s_objects_are_served_again_within_the_lease() {
    let _serial = serial();
    let Some(mut cluster) = Cluster::start(3) else {
        return;
    };
    let victim = 2;
    runtime().block_on(async {
        let mut clients = Clients::default();
        let wait = Duration::from_secs(10);
        let survivor = cluster.addr(0).unwrap();
        // Objects the victim owns, each incremented once through it.
        let client = Client::connect(survivor).await.unwrap();
        let names = names_where(&cluster, &client, "k", 8, |owner| owner == victim).await;
        for name in &names {
            let addr = cluster.addr(victim).unwrap();
            let answer = clients.call(addr, name, "POST", wait).await.unwrap();
            assert_eq!(answer.value, 1);
        }
        let killed = Instant::now();
        unsafe_kill(cluster.pid(victim), libc::SIGKILL);
        cluster.nodes[victim].take();
        let mut gaps = Vec::new();
        for name in &names {
            loop {
                match clients.call(survivor, name, "POST", wait).await {
                    Ok(answer) => {
                        // The acknowledged increment is there; a new instance made this one.
                        assert_eq!(answer.value, 2, "{name}");
                        assert_eq!(answer.activation, 2, "{name}");
                        gaps.push(killed.elapsed());
                        break;
                    }
                    Err(error) if retryable(&error) => {
                        assert!(
                            killed.elapsed() < Duration::from_millis(LEASE_MS + 2000),
                            "{name} still not served {:?} after the kill: {error}",
                            killed.elapsed()
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(error) => panic!("{name}: {error}"),
                }
            }
        }
        gaps.sort();
        eprintln!(
            "takeover after SIGKILL (lease {LEASE_MS} ms): first {:?}, last {:?}",
            gaps[0],
            gaps[gaps.len() - 1]
        );
    });
    // The survivors take the victim's shards.
    cluster.wait_balanced(2, Duration::from_secs(30));
}

#[test]
fn a_drained_node_hands_off_without_losing_acknowledged_writes() {
    let _serial = serial();
    let Some(mut cluster) = Cluster::start(3) else {
        return;
    };
    let drained = 2;
    let entries = [cluster.addr(0).unwrap(), cluster.addr(1).unwrap()];
    let stop = Instant::now() + Duration::from_secs(6);
    let runtime = runtime();
    let workers: Vec<_> = (0..16)
        .map(|worker| {
            runtime.spawn(async move {
                let mut clients = Clients::default();
                let name = format!("d{worker}");
                let mut last = 0;
                let mut breaks = 0;
                let mut calls = 0u64;
                while Instant::now() < stop {
                    let addr = entries[(calls % 2) as usize];
                    calls += 1;
                    match clients
                        .call(addr, &name, "POST", Duration::from_secs(5))
                        .await
                    {
                        Ok(answer) => {
                            assert!(
                                answer.value > last,
                                "{name} went back: {answer:?} after {last}"
                            );
                            last = answer.value;
                        }
                        Err(error) if retryable(&error) => {
                            breaks += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(error) => panic!("{name}: {error}"),
                    }
                }
                (name, last, breaks)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    unsafe_kill(cluster.pid(drained), libc::SIGTERM);
    let mut node = cluster.nodes[drained].take().unwrap();
    let exited = Instant::now();
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            exited.elapsed() < Duration::from_secs(20),
            "the drained node did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the drained node exited with {status}");
    runtime.block_on(async {
        let mut clients = Clients::default();
        for worker in workers {
            let (name, last, breaks) = worker.await.unwrap();
            assert!(last > 0, "{name} made no increment");
            let now = clients
                .call(entries[0], &name, "GET", Duration::from_secs(10))
                .await
                .unwrap();
            assert!(
                now.value >= last,
                "{name}: acknowledged {last}, stored {}",
                now.value
            );
            eprintln!("{name}: {last} increments acknowledged, {breaks} retried breaks");
        }
    });
    cluster.wait_balanced(2, Duration::from_secs(30));
}

/// A seeded random sequence (xorshift64*): the schedule is the same on every run of a seed.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn under_kills_pauses_and_restarts_nothing_acknowledged_is_lost_and_one_instance_runs() {
    let _serial = serial();
    let Some(mut cluster) = Cluster::start(3) else {
        return;
    };
    let seed = std::env::var("DURO_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    eprintln!("chaos seed {seed} (DURO_CHAOS_SEED)");
    let mut schedule = Seeded(seed | 1);
    let addrs: std::sync::Arc<Mutex<Vec<Option<SocketAddr>>>> =
        std::sync::Arc::new(Mutex::new((0..3).map(|i| cluster.addr(i)).collect()));
    let stop = Instant::now() + Duration::from_secs(20);
    let runtime = runtime();
    let workers: Vec<_> = (0..12u64)
        .map(|worker| {
            let addrs = addrs.clone();
            let mut pick = Seeded((seed ^ ((worker + 1) * 0x9e37_79b9)) | 1);
            runtime.spawn(async move {
                let mut clients = Clients::default();
                let name = format!("c{worker}");
                let mut answers: Vec<Answer> = Vec::new();
                while Instant::now() < stop {
                    let addr = {
                        let addrs = addrs.lock().unwrap();
                        let live: Vec<SocketAddr> = addrs.iter().flatten().copied().collect();
                        live[pick.below(live.len() as u64) as usize]
                    };
                    match clients
                        .call(addr, &name, "POST", Duration::from_millis(2500))
                        .await
                    {
                        Ok(answer) => answers.push(answer),
                        Err(error) if retryable(&error) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(error) => panic!("{name}: {error}"),
                    }
                }
                (name, answers)
            })
        })
        .collect();
    let mut events = Vec::new();
    while Instant::now() + Duration::from_secs(4) < stop {
        std::thread::sleep(Duration::from_millis(800 + schedule.below(1200)));
        let victim = schedule.below(3) as usize;
        let pid = cluster.pid(victim);
        match schedule.below(3) {
            0 => {
                events.push(format!("SIGKILL n{victim}, restart"));
                unsafe_kill(pid, libc::SIGKILL);
                addrs.lock().unwrap()[victim] = None;
                cluster.nodes[victim].take();
                std::thread::sleep(Duration::from_millis(schedule.below(1500)));
                let node = cluster.spawn(victim);
                addrs.lock().unwrap()[victim] = Some(node.addr);
                cluster.nodes[victim] = Some(node);
            }
            1 => {
                let pause = LEASE_MS + 500 + schedule.below(1000);
                events.push(format!("SIGSTOP n{victim} for {pause} ms"));
                unsafe_kill(pid, libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(pause));
                unsafe_kill(pid, libc::SIGCONT);
            }
            _ => {
                events.push(format!("SIGKILL n{victim}, restart after the lease"));
                unsafe_kill(pid, libc::SIGKILL);
                addrs.lock().unwrap()[victim] = None;
                cluster.nodes[victim].take();
                std::thread::sleep(Duration::from_millis(LEASE_MS + 200));
                let node = cluster.spawn(victim);
                addrs.lock().unwrap()[victim] = Some(node.addr);
                cluster.nodes[victim] = Some(node);
            }
        }
    }
    eprintln!("schedule: {events:?}");
    assert!(!events.is_empty());
    runtime.block_on(async {
        let mut clients = Clients::default();
        let mut total = 0;
        for worker in workers {
            let (name, answers) = worker.await.unwrap();
            assert!(!answers.is_empty(), "{name}: no increment succeeded");
            total += answers.len();
            for pair in answers.windows(2) {
                // One worker per object, one call at a time: each acknowledged increment sees
                // every one before it (the value grows), and a newer instance never gives way
                // to an older one (no two instances interleave).
                assert!(
                    pair[1].value > pair[0].value,
                    "{name} read going backwards: {pair:?}"
                );
                assert!(
                    pair[1].activation >= pair[0].activation,
                    "{name}: two instances interleaved: {pair:?}"
                );
            }
            let last = answers.last().unwrap().value;
            // Read back through a node until one answers (the cluster may still be settling).
            let deadline = Instant::now() + Duration::from_secs(20);
            let stored = loop {
                let addr = cluster.addr(0).unwrap();
                match clients
                    .call(addr, &name, "GET", Duration::from_secs(3))
                    .await
                {
                    Ok(answer) => break answer,
                    Err(error) if retryable(&error) && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(error) => panic!("{name}: reading back: {error}"),
                }
            };
            assert!(
                stored.value >= last,
                "{name}: acknowledged {last}, stored {}",
                stored.value
            );
        }
        eprintln!(
            "{total} increments acknowledged under {} events",
            events.len()
        );
    });
}

fn unsafe_kill(pid: i32, signal: i32) {
    // SAFETY: kill only sends a signal, to a child process this test started.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "kill({pid}, {signal})");
}

#[test]
fn a_paused_node_serves_nothing_of_its_shards_once_its_lease_lapsed() {
    let _serial = serial();
    let Some(cluster) = Cluster::start(2) else {
        return;
    };
    let paused = 1;
    runtime().block_on(async {
        let mut clients = Clients::default();
        let wait = Duration::from_secs(10);
        let other = cluster.addr(0).unwrap();
        let client = Client::connect(other).await.unwrap();
        let name = name_owned_by(&cluster, &client, "p", paused).await;
        // The object is live on the paused node, its value in that instance's cache.
        let at_paused = Client::connect(cluster.addr(paused).unwrap()).await.unwrap();
        let stub = at_paused.namespace("tally");
        for value in 1..=3 {
            let answer = parse(stub.get_by_name(&name).call("POST", "/", "").await.unwrap().body());
            assert_eq!(answer.value, value);
        }
        unsafe_kill(cluster.pid(paused), libc::SIGSTOP);
        // Past the lease, the other node takes the object over and moves it on.
        let stopped = Instant::now();
        let mut newest = 0;
        while newest < 6 {
            // A call passed on to the paused node waits there: give up on it soon.
            let short = Duration::from_millis(500);
            match clients.call(other, &name, "POST", short).await {
                Ok(answer) => {
                    assert!(answer.value > 3 && answer.activation == 2, "{answer:?}");
                    newest = answer.value;
                }
                Err(error) if retryable(&error) => {
                    assert!(stopped.elapsed() < Duration::from_secs(10), "no takeover: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("{error}"),
            }
        }
        // Calls that reach the paused node while it is stopped wait in its socket: they are
        // the first thing it sees when it resumes, before its lease keeper learns anything.
        let read = stub.get_by_name(&name).call("GET", "/", "");
        let write = stub.get_by_name(&name).call("POST", "/", "");
        tokio::time::sleep(Duration::from_millis(200)).await;
        unsafe_kill(cluster.pid(paused), libc::SIGCONT);
        for (what, call) in [("read", read), ("write", write)] {
            match call.await {
                Ok(response) => {
                    let answer = parse(response.body());
                    assert!(
                        answer.value >= newest,
                        "the resumed node's {what} saw {answer:?} after {newest}: its old instance served"
                    );
                }
                Err(error) => assert!(retryable(&error), "{what}: {error}"),
            }
        }
        // Nothing was lost: the next increment anywhere follows the newest.
        let answer = loop {
            match clients.call(other, &name, "POST", wait).await {
                Ok(answer) => break answer,
                Err(error) if retryable(&error) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(error) => panic!("{error}"),
            }
        };
        assert!(answer.value > newest, "{answer:?} after {newest}");
    });
}

/// The first `count` names among `prefix0`, `prefix1`... of objects whose shard's owner
/// (a node's index) `wanted` picks, by one read of the cluster's status.
async fn names_where(
    cluster: &Cluster,
    client: &Client,
    prefix: &str,
    count: usize,
    wanted: impl Fn(usize) -> bool,
) -> Vec<String> {
    let owners = cluster.owners();
    let tally = client.namespace("tally");
    let mut names = Vec::new();
    for candidate in 0.. {
        let name = format!("{prefix}{candidate}");
        let id = tally.id_from_name(&name).await.unwrap();
        let shard = duro::storage::virtual_shard(id.bytes(), owners.len() as u32);
        let owner = owners[shard as usize].expect("every shard has an owner");
        if wanted(owner) {
            names.push(name);
            if names.len() == count {
                break;
            }
        }
    }
    names
}

/// An object's name among `prefix0`, `prefix1`... whose shard node `owner` owns.
async fn name_owned_by(cluster: &Cluster, client: &Client, prefix: &str, owner: usize) -> String {
    names_where(cluster, client, prefix, 1, |o| o == owner)
        .await
        .remove(0)
}

#[test]
fn nodes_that_listen_with_tls_link_over_tls() {
    let _serial = serial();
    let tls = common::tls_files();
    let flags = [
        "--http",
        "off",
        "--tls-cert",
        tls.cert_str(),
        "--tls-key",
        tls.key_str(),
        "--cluster-ca",
        tls.ca_str(),
    ];
    let Some(cluster) = Cluster::start_with(2, &flags) else {
        return;
    };
    runtime().block_on(async {
        let ca = duro::client::ClientTls::with_ca_pem(&tls.ca).unwrap();
        let client = Client::connect_tls(cluster.addr(0).unwrap(), ca)
            .await
            .unwrap();
        let name = name_owned_by(&cluster, &client, "t", 1).await;
        let stub = client.namespace("tally").get_by_name(&name);
        for value in 1..=3 {
            let answer = parse(stub.call("POST", "/", "").await.unwrap().body());
            assert_eq!((answer.value, answer.activation), (value, 1));
        }
    });
    // Nodes whose links do not trust the others' certificates (the certificate is taken as its
    // own CA, which it is not) cannot pass calls on: TLS is what links them.
    let Some(untrusting) = Cluster::start_with(
        2,
        &[
            "--http",
            "off",
            "--tls-cert",
            tls.cert_str(),
            "--tls-key",
            tls.key_str(),
        ],
    ) else {
        return;
    };
    runtime().block_on(async {
        let ca = duro::client::ClientTls::with_ca_pem(&tls.ca).unwrap();
        let client = Client::connect_tls(untrusting.addr(0).unwrap(), ca)
            .await
            .unwrap();
        let name = name_owned_by(&untrusting, &client, "t", 1).await;
        let stub = client.namespace("tally").get_by_name(&name);
        let refused = stub.call("POST", "/", "").await.unwrap_err();
        assert!(matches!(refused, duro::Error::Disconnected(_)), "{refused}");
    });
}

#[test]
fn nodes_with_a_token_present_it_to_each_other() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "cluster-secret\n").unwrap();
    let flags = [
        "--http",
        "127.0.0.1:0",
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let Some(cluster) = Cluster::start_with(2, &flags) else {
        return;
    };
    let gateway = cluster.nodes[0].as_ref().unwrap().http.unwrap();
    // Which names node 1 owns: the IDs come from a node's minting (the gateway's path names
    // the object); a client without the token cannot ask, so derive them from the status.
    let status = cluster.status();
    let owned_by_1: Vec<u64> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n1")
        .unwrap()["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert!(!owned_by_1.is_empty());
    // Through node 0's gateway, many objects: about half live on node 1, and every call
    // succeeds, so node 0 reached node 1 with the token.
    let mut answered = 0;
    for object in 0..40 {
        let path = format!("/tally/g{object}");
        let (status, body) = http_post(gateway, &path, Some("cluster-secret"));
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body, "1 1\n");
        answered += 1;
    }
    assert_eq!(answered, 40);
    let (status, _) = http_post(gateway, "/tally/g0", None);
    assert_eq!(status, 401);
    // A WebSocket upgrade is served for an object of this node (tally answers it as a GET),
    // and refused with a clear error for one of another node.
    let mut answers = Vec::new();
    for object in 0..20 {
        answers.push(http_upgrade(
            gateway,
            &format!("/tally/w{object}"),
            "cluster-secret",
        ));
    }
    assert!(
        answers.iter().any(|(status, _)| *status == 200),
        "{answers:?}"
    );
    assert!(
        answers
            .iter()
            .any(|(status, body)| *status == 502 && body.contains("another node")),
        "{answers:?}"
    );
}

/// A WebSocket upgrade request for `path` to the gateway at `addr`: the status and the body.
fn http_upgrade(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: duro\r\nAuthorization: Bearer {token}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut buffer = [0u8; 4096];
    // The answer is not an upgrade: read it until its body is whole (Content-Length).
    loop {
        let read = stream.read(&mut buffer).unwrap();
        reply.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&reply).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|l| l.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length || read == 0 {
                return (text[9..12].parse().unwrap(), body.to_owned());
            }
        }
        assert!(read > 0, "the gateway closed: {text}");
    }
}

/// `POST path` to the gateway at `addr` with an empty body: the status and the body.
fn http_post(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: duro\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn a_streamed_request_reaches_an_object_on_another_node() {
    let _serial = serial();
    let Some(cluster) = Cluster::start(2) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Client::connect(cluster.addr(0).unwrap()).await.unwrap();
        let name = name_owned_by(&cluster, &client, "s", 1).await;
        let stub = client.namespace("echo").get_by_name(&name);
        let (mut sender, body) = duro::Body::channel();
        let request = http::Request::builder()
            .method("POST")
            .uri("/streamed")
            .body(body)
            .unwrap();
        let call = stub.fetch_stream(request);
        let writing = async move {
            sender
                .send(bytes::Bytes::from_static(b"hello "))
                .await
                .unwrap();
            sender
                .send(bytes::Bytes::from_static(b"world"))
                .await
                .unwrap();
            sender.finish();
        };
        let (response, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(call, writing)
        })
        .await
        .expect("the streamed call was answered");
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().bytes().await.unwrap();
        let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echoed["url"], "/streamed");
    });
}

#[test]
fn a_node_needs_a_postgresql_store() {
    let dir = tempfile::tempdir().unwrap();
    let options = duro::cluster::ClusterOptions {
        node: "a".into(),
        advertise: String::new(),
        lease: Duration::from_secs(5),
        tls: None,
    };
    let started = duro::builtin::register(duro::Server::builder())
        .data_dir(dir.path())
        .listen("127.0.0.1:0".parse().unwrap())
        .cluster(options)
        .start();
    let error = started.err().expect("a node on a data dir is refused");
    assert!(error.to_string().contains("give --store"), "{error}");
}
