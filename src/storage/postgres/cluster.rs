//! The cluster's tables and queries: the nodes, and a lease per virtual shard.
//!
//! - `duro_nodes (name, advertise, started_at, heartbeat_at, draining)`: every node that
//!   joined. A node is alive while its heartbeat is younger than the lease time, by the
//!   database's clock.
//! - `duro_leases (shard, owner, lease_until)`: a row per virtual shard, apart from
//!   `duro_epochs`, so that renewing leases never waits for the commits that lock the epochs.
//!
//! Taking a shard ([`PostgresBackend::acquire`]) sets its owner and raises its epoch in one
//! transaction, only where no live lease stands; the epoch raise waits for the commits in
//! flight under the old one (they lock the epoch `FOR SHARE`), and fences every later one. Every
//! time here is `clock_timestamp()`: the database's clock, one for the whole cluster.

use futures::executor::block_on;

use super::{PostgresBackend, pg_error};
use crate::storage::Error;

/// A node, as the store lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub name: String,
    pub advertise: String,
    /// Its heartbeat is younger than the lease time.
    pub alive: bool,
    /// It is handing its shards off before it leaves.
    pub draining: bool,
    /// Milliseconds since its last heartbeat, by the database's clock.
    pub heartbeat_age_ms: i64,
}

/// A virtual shard's lease, as the store has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub shard: u32,
    /// The node that took it last, if it was not released since.
    pub owner: Option<String>,
    pub epoch: u64,
    /// The lease has not expired.
    pub live: bool,
}

/// What a node reads of the cluster on every heartbeat.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Every node, by name.
    pub nodes: Vec<NodeRow>,
    /// Every virtual shard, in order.
    pub leases: Vec<LeaseRow>,
}

/// Milliseconds as a PostgreSQL interval, in SQL: `$n::float8 * interval '1 millisecond'`.
fn millis(param: usize) -> String {
    format!("(${param}::float8 * interval '1 millisecond')")
}

fn shards_param(shards: &[u32]) -> Vec<i64> {
    shards.iter().map(|&s| i64::from(s)).collect()
}

impl PostgresBackend {
    /// Registers node `node`, reachable at `advertise`, as alive and not draining; the leases
    /// an earlier run of a node of that name still held are released first (their epochs are
    /// raised by whoever takes them next, so that earlier run can never commit again).
    pub fn join(&self, node: &str, advertise: &str) -> Result<(), Error> {
        let mut pooled = self.client()?;
        let client = &mut pooled.get().client;
        block_on(async {
            let txn = client.transaction().await.map_err(pg_error)?;
            txn.execute(
                "INSERT INTO duro_nodes (name, advertise, started_at, heartbeat_at, draining) \
                 VALUES ($1, $2, clock_timestamp(), clock_timestamp(), false) \
                 ON CONFLICT (name) DO UPDATE SET advertise = $2, \
                 started_at = clock_timestamp(), heartbeat_at = clock_timestamp(), \
                 draining = false",
                &[&node, &advertise],
            )
            .await
            .map_err(pg_error)?;
            txn.execute(
                "UPDATE duro_leases SET owner = NULL, lease_until = NULL WHERE owner = $1",
                &[&node],
            )
            .await
            .map_err(pg_error)?;
            txn.commit().await.map_err(pg_error)
        })
    }

    /// One heartbeat of `node`: records it alive (and whether it drains), renews every lease
    /// it holds for `lease_ms` from now by the database's clock, and reads the cluster.
    pub fn heartbeat(
        &self,
        node: &str,
        advertise: &str,
        lease_ms: u64,
        draining: bool,
    ) -> Result<ClusterView, Error> {
        let lease = lease_ms as f64;
        let mut pooled = self.client()?;
        let client = &mut pooled.get().client;
        block_on(async {
            let txn = client.transaction().await.map_err(pg_error)?;
            txn.execute(
                "INSERT INTO duro_nodes (name, advertise, started_at, heartbeat_at, draining) \
                 VALUES ($1, $2, clock_timestamp(), clock_timestamp(), $3) \
                 ON CONFLICT (name) DO UPDATE SET heartbeat_at = clock_timestamp(), \
                 draining = $3",
                &[&node, &advertise, &draining],
            )
            .await
            .map_err(pg_error)?;
            let renew = format!(
                "UPDATE duro_leases SET lease_until = clock_timestamp() + {} WHERE owner = $1",
                millis(2)
            );
            txn.execute(&renew, &[&node, &lease])
                .await
                .map_err(pg_error)?;
            let view = read_view(&txn, lease).await?;
            txn.commit().await.map_err(pg_error)?;
            Ok(view)
        })
    }

    /// Takes those of `shards` on which no live lease stands, for `node`, for `lease_ms`;
    /// each taken shard's epoch is raised. The shards taken, with their new epochs.
    pub fn acquire(
        &self,
        node: &str,
        shards: &[u32],
        lease_ms: u64,
    ) -> Result<Vec<(u32, u64)>, Error> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let lease = lease_ms as f64;
        let wanted = shards_param(shards);
        let mut pooled = self.client()?;
        let client = &mut pooled.get().client;
        block_on(async {
            let txn = client.transaction().await.map_err(pg_error)?;
            let take = format!(
                "UPDATE duro_leases SET owner = $1, lease_until = clock_timestamp() + {} \
                 WHERE shard = ANY($3) \
                 AND (owner IS NULL OR lease_until IS NULL OR lease_until <= clock_timestamp()) \
                 RETURNING shard",
                millis(2)
            );
            let taken: Vec<i64> = txn
                .query(&take, &[&node, &lease, &wanted])
                .await
                .map_err(pg_error)?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let raised = txn
                .query(
                    "UPDATE duro_epochs SET epoch = epoch + 1 WHERE shard = ANY($1) \
                     RETURNING shard, epoch",
                    &[&taken],
                )
                .await
                .map_err(pg_error)?;
            txn.commit().await.map_err(pg_error)?;
            let mut raised: Vec<(u32, u64)> = raised
                .iter()
                .map(|row| (row.get::<_, i64>(0) as u32, row.get::<_, i64>(1) as u64))
                .collect();
            raised.sort_unstable();
            Ok(raised)
        })
    }

    /// Gives up `node`'s leases on `shards`: another node may take them at once.
    pub fn release(&self, node: &str, shards: &[u32]) -> Result<(), Error> {
        let shards = shards_param(shards);
        let mut pooled = self.client()?;
        let client = &pooled.get().client;
        block_on(client.execute(
            "UPDATE duro_leases SET owner = NULL, lease_until = NULL \
             WHERE owner = $1 AND shard = ANY($2)",
            &[&node, &shards],
        ))
        .map_err(pg_error)?;
        Ok(())
    }

    /// Takes `node` off the list of nodes (once it handed every shard off).
    pub fn leave(&self, node: &str) -> Result<(), Error> {
        let mut pooled = self.client()?;
        let client = &pooled.get().client;
        block_on(client.execute("DELETE FROM duro_nodes WHERE name = $1", &[&node]))
            .map_err(pg_error)?;
        Ok(())
    }

    /// The cluster as the store has it: nodes (alive when their heartbeat is younger than
    /// `lease_ms`) and every shard's lease.
    pub fn cluster_view(&self, lease_ms: u64) -> Result<ClusterView, Error> {
        let mut pooled = self.client()?;
        let client = &mut pooled.get().client;
        block_on(async {
            let txn = client.transaction().await.map_err(pg_error)?;
            let view = read_view(&txn, lease_ms as f64).await?;
            txn.commit().await.map_err(pg_error)?;
            Ok(view)
        })
    }
}

async fn read_view(
    txn: &tokio_postgres::Transaction<'_>,
    lease_ms: f64,
) -> Result<ClusterView, Error> {
    let nodes = format!(
        "SELECT name, advertise, heartbeat_at > clock_timestamp() - {}, draining, \
         (extract(epoch FROM clock_timestamp() - heartbeat_at) * 1000)::bigint \
         FROM duro_nodes ORDER BY name",
        millis(1)
    );
    let nodes = txn
        .query(&nodes, &[&lease_ms])
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| NodeRow {
            name: row.get(0),
            advertise: row.get(1),
            alive: row.get(2),
            draining: row.get(3),
            heartbeat_age_ms: row.get(4),
        })
        .collect();
    let leases = txn
        .query(
            "SELECT l.shard, l.owner, e.epoch, \
             coalesce(l.lease_until > clock_timestamp(), false) \
             FROM duro_leases l JOIN duro_epochs e ON e.shard = l.shard ORDER BY l.shard",
            &[],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| LeaseRow {
            shard: row.get::<_, i64>(0) as u32,
            owner: row.get(1),
            epoch: row.get::<_, i64>(2) as u64,
            live: row.get(3),
        })
        .collect();
    Ok(ClusterView { nodes, leases })
}
