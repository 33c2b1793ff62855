//! `cluster`: durable increments over 1,000 objects on LMDB (one node), on PostgreSQL (one
//! node) and on a cluster of three PostgreSQL nodes, in the same run, the three measured in
//! alternation.
//!
//! Shape: 4 connections × 64 in flight, each call the next `counter` object. With three nodes
//! the connections go to the nodes in turn, so about two calls in three are passed from the
//! node that took them to the object's owner. The server CPU per call is the sum over the
//! series' processes. PostgreSQL runs on the same machine as everything else (`--postgres
//! URL` or `DURO_BENCH_PG`: a server whose user may create databases); without one, the two
//! PostgreSQL series are skipped.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::Settings;
use super::capnp_load::{self, PAYLOAD};
use super::child::{self, Duro};
use super::measure::Series;
use super::rpc_group::{CallFn, Shape, run_shape};
use duro::duro_capnp::{durable_object, host};

pub const WORKLOAD: &str = "cluster";
const OBJECTS: usize = 1000;
const SHAPE: Shape = Shape {
    connections: 4,
    in_flight: 64,
};
/// The nodes' lease time: long enough that a busy machine does not lose leases mid-run.
const LEASE_MS: &str = "10000";

pub fn run(settings: &Settings) -> Vec<Series> {
    duro::testing::run_local(run_group(settings))
}

/// One measured set-up: its servers and where the connections go.
struct Setup {
    series: Series,
    servers: Vec<Duro>,
    call: Option<CallFn>,
}

impl Setup {
    fn cpu(&self) -> Option<Duration> {
        let pids = self.servers.iter().map(|s| s.child.pid());
        pids.map(child::process_cpu).sum()
    }
}

async fn run_group(settings: &Settings) -> Vec<Series> {
    let mut setups = vec![lmdb(settings).await];
    match &settings.postgres {
        Some(admin) => {
            setups.push(postgres(settings, admin, 1).await);
            setups.push(postgres(settings, admin, 3).await);
        }
        None => {
            for nodes in [1, 3] {
                setups.push(Setup {
                    series: Series::skipped(
                        WORKLOAD,
                        &shape("PostgreSQL", nodes),
                        "no PostgreSQL server: give --postgres URL or DURO_BENCH_PG",
                    ),
                    servers: Vec::new(),
                    call: None,
                });
            }
        }
    }
    for setup in &mut setups {
        if let Some(call) = &setup.call
            && let Err(e) = run_shape(SHAPE, settings.warmup_budget(), call, &|| None).await
        {
            setup.series.fail(e);
        }
    }
    for _ in 0..settings.runs {
        for setup in &mut setups {
            let Some(call) = setup.call.clone() else {
                continue;
            };
            if setup.series.failed() {
                continue;
            }
            let cpu = || setup.cpu();
            let run = run_shape(SHAPE, settings.run_budget(), &call, &cpu).await;
            setup.series.push(run);
        }
    }
    setups.into_iter().map(|setup| setup.series).collect()
}

/// The series name of a set-up.
pub fn shape(engine: &str, nodes: usize) -> String {
    format!(
        "incr 1000 objects, {engine}, {nodes} node{}",
        if nodes == 1 { "" } else { "s" }
    )
}

async fn lmdb(settings: &Settings) -> Setup {
    let mut series = Series::new(WORKLOAD, &shape("LMDB", 1));
    let dir = settings.fresh_dir("cluster-lmdb");
    match child::start_duro_with(&dir, false, &[]) {
        Ok(server) => match calls(&[server.addr]).await {
            Ok(call) => Setup {
                series,
                servers: vec![server],
                call: Some(call),
            },
            Err(e) => {
                series.fail(e);
                Setup {
                    series,
                    servers: vec![server],
                    call: None,
                }
            }
        },
        Err(e) => {
            series.fail(e);
            Setup {
                series,
                servers: Vec::new(),
                call: None,
            }
        }
    }
}

async fn postgres(settings: &Settings, admin: &str, nodes: usize) -> Setup {
    let series = Series::new(WORKLOAD, &shape("PostgreSQL", nodes));
    let failed = |mut series: Series, servers, e: String| {
        series.fail(e);
        Setup {
            series,
            servers,
            call: None,
        }
    };
    let store = match create_database(admin).await {
        Ok(store) => store,
        Err(e) => return failed(series, Vec::new(), e),
    };
    let mut servers = Vec::new();
    for node in 0..nodes {
        let dir = settings.fresh_dir("cluster-pg");
        let name = format!("bench{node}");
        let mut flags = vec!["--store", &store];
        if nodes > 1 {
            flags.extend(["--node", &name, "--lease-ms", LEASE_MS]);
        }
        match child::start_duro_with(&dir, false, &flags) {
            Ok(server) => servers.push(server),
            Err(e) => return failed(series, servers, e),
        }
    }
    if nodes > 1
        && let Err(e) = settled(&store, nodes, settings.setup_time_max)
    {
        return failed(series, servers, e);
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    match calls(&addrs).await {
        Ok(call) => Setup {
            series,
            servers,
            call: Some(call),
        },
        Err(e) => failed(series, servers, e),
    }
}

/// Waits until `nodes` nodes own every shard between them, none above its share.
fn settled(store: &str, nodes: usize, within: Duration) -> Result<(), String> {
    let options = duro::storage::PostgresOptions {
        cluster: true,
        ..Default::default()
    };
    let view = duro::storage::PostgresBackend::open(store, &options)
        .map_err(|e| format!("opening the cluster's store: {e}"))?;
    let deadline = Instant::now() + within;
    loop {
        let status = view.cluster_view().map_err(|e| e.to_string())?;
        let shards = status.leases.len();
        let owners: Vec<usize> = status
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| {
                let owned = status.leases.iter().filter(|l| l.live);
                owned.filter(|l| l.owner.as_ref() == Some(&n.name)).count()
            })
            .collect();
        let all_owned = owners.iter().sum::<usize>() == shards;
        // No node above its share: no hand-off is still to come.
        let even = owners.iter().all(|&o| o <= shards.div_ceil(nodes));
        if owners.len() == nodes && all_owned && even {
            // Each node learns the others' shards at its next heartbeat (a fifth of the lease).
            std::thread::sleep(Duration::from_millis(
                LEASE_MS.parse::<u64>().unwrap_or(0) / 4,
            ));
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the cluster did not settle: owners {owners:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fresh database on the server `admin` names; its URL.
async fn create_database(admin: &str) -> Result<String, String> {
    let (client, connection) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connecting to {admin}: {e}"))?;
    tokio::task::spawn_local(connection);
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|e| e.to_string())?;
    let name = format!("duro_bench_{}", duro::id::to_hex(&suffix));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("creating a database: {e}"))?;
    let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
    Ok(format!("{base}/{name}"))
}

/// Calls over `SHAPE.connections` connections, to `addrs` in turn, each call the next of
/// 1,000 counters.
async fn calls(addrs: &[SocketAddr]) -> Result<CallFn, String> {
    let mut stubs: Vec<Vec<durable_object::Client>> = Vec::new();
    for c in 0..SHAPE.connections {
        let host: host::Client = capnp_load::connect(addrs[c % addrs.len()]).await?;
        let namespace = capnp_load::namespace(&host, "counter");
        stubs.push(
            (0..OBJECTS)
                .map(|j| capnp_load::stub(&namespace, &format!("o{j}")))
                .collect(),
        );
    }
    Ok(Rc::new(move |c, i| {
        let objects = &stubs[c];
        let stub = &objects[(i % objects.len() as u64) as usize];
        Box::pin(capnp_load::fetch(stub, "POST", "/", PAYLOAD, &[200]))
    }))
}
