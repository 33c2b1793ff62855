//! The cluster's tables and queries: the nodes, and a lease per virtual shard.
//!
//! - `duro_nodes (name, advertise, started_at, heartbeat_at, lease_ms, draining)`: every node
//!   that joined. A node is alive while its heartbeat is younger than its lease time, by the
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
    /// Its heartbeat is younger than its lease time.
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
    pub fn join(&self, node: &str, advertise: &str, lease_ms: u64) -> Result<(), Error> {
        let mut pooled = self.client()?;
        let client = &mut pooled.get().client;
        block_on(async {
            let txn = client.transaction().await.map_err(pg_error)?;
            record_node(&txn, node, advertise, lease_ms, false, true).await?;
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
            record_node(&txn, node, advertise, lease_ms, draining, false).await?;
            let renew = format!(
                "UPDATE duro_leases SET lease_until = clock_timestamp() + {} WHERE owner = $1",
                millis(2)
            );
            txn.execute(&renew, &[&node, &lease])
                .await
                .map_err(pg_error)?;
            let view = read_view(&txn).await?;
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

    /// The cluster as the store has it: the nodes and every shard's lease.
    pub fn cluster_view(&self) -> Result<ClusterView, Error> {
        let mut pooled = self.client()?;
        let client = &mut pooled.get().client;
        block_on(async {
            let txn = client.transaction().await.map_err(pg_error)?;
            let view = read_view(&txn).await?;
            txn.commit().await.map_err(pg_error)?;
            Ok(view)
        })
    }
}

/// Records `node` alive now (by the database's clock), with its address, lease time and
/// whether it drains; `joining` also restarts its `started_at`.
async fn record_node(
    txn: &tokio_postgres::Transaction<'_>,
    node: &str,
    advertise: &str,
    lease_ms: u64,
    draining: bool,
    joining: bool,
) -> Result<(), Error> {
    txn.execute(
        "INSERT INTO duro_nodes (name, advertise, started_at, heartbeat_at, lease_ms, draining) \
         VALUES ($1, $2, clock_timestamp(), clock_timestamp(), $3, $4) \
         ON CONFLICT (name) DO UPDATE SET advertise = $2, heartbeat_at = clock_timestamp(), \
         lease_ms = $3, draining = $4, \
         started_at = CASE WHEN $5 THEN clock_timestamp() ELSE duro_nodes.started_at END",
        &[&node, &advertise, &(lease_ms as i64), &draining, &joining],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

async fn read_view(txn: &tokio_postgres::Transaction<'_>) -> Result<ClusterView, Error> {
    let nodes = "SELECT name, advertise, \
         heartbeat_at > clock_timestamp() - lease_ms * interval '1 millisecond', draining, \
         (extract(epoch FROM clock_timestamp() - heartbeat_at) * 1000)::bigint \
         FROM duro_nodes ORDER BY name";
    let nodes = txn
        .query(nodes, &[])
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

#[cfg(test)]
mod tests {
    use super::super::{PostgresOptions, TestDatabase};
    use super::*;
    use crate::storage::conformance::{batch, put};
    use crate::storage::{Backend, ObjectBatch, ObjectKey, OpenError};

    fn node(db: &TestDatabase) -> PostgresBackend {
        let options = PostgresOptions {
            cluster: true,
            ..PostgresOptions::default()
        };
        PostgresBackend::open(&db.url, &options).unwrap()
    }

    fn owner(view: &ClusterView, shard: u32) -> (Option<&str>, u64, bool) {
        let lease = &view.leases[shard as usize];
        (lease.owner.as_deref(), lease.epoch, lease.live)
    }

    /// An object of virtual shard `shard` (of the default 256).
    fn object_of(shard: u8) -> ObjectKey {
        let mut id = [9u8; 32];
        id[..4].copy_from_slice(&[0, 0, 0, shard]);
        ObjectKey { tag: 1, id }
    }

    #[test]
    fn a_shard_is_taken_once_under_a_raised_epoch_that_fences_the_old_writers() {
        let Some(db) = TestDatabase::create() else {
            return;
        };
        let (a, b) = (node(&db), node(&db));
        a.join("a", "127.0.0.1:1", 60_000).unwrap();
        b.join("b", "127.0.0.1:2", 60_000).unwrap();
        // Free shards go to the first that asks, with their epoch raised.
        assert_eq!(
            a.acquire("a", &[3, 4], 60_000).unwrap(),
            vec![(3, 2), (4, 2)]
        );
        // A live lease is not taken.
        assert_eq!(b.acquire("b", &[3, 5], 60_000).unwrap(), vec![(5, 2)]);
        let view = b.heartbeat("b", "127.0.0.1:2", 60_000, false).unwrap();
        assert_eq!(owner(&view, 3), (Some("a"), 2, true));
        assert_eq!(owner(&view, 5), (Some("b"), 2, true));
        assert_eq!(owner(&view, 6), (None, 1, false));
        let names: Vec<&str> = view.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(view.nodes.iter().all(|n| n.alive && !n.draining));
        // A commit made under the epoch before the take is fenced; one under the new commits.
        let x = object_of(3);
        let stale = a.commit(&[batch(x, vec![put(b"k", b"old")])]);
        assert!(matches!(
            stale,
            Err(Error::Fenced {
                virtual_shard: 3,
                epoch: 1,
                current: 2
            })
        ));
        let current = ObjectBatch {
            epoch: 2,
            ..batch(x, vec![put(b"k", b"new")])
        };
        a.commit(&[current]).unwrap();
        assert_eq!(b.get(&x, b"k").unwrap(), Some(b"new".to_vec()));
        // Released, a shard is taken at once by another, under the next epoch: the first
        // owner's writers are fenced again.
        a.release("a", &[3]).unwrap();
        assert_eq!(b.acquire("b", &[3], 60_000).unwrap(), vec![(3, 3)]);
        let late = ObjectBatch {
            epoch: 2,
            ..batch(x, vec![put(b"k", b"late")])
        };
        assert!(matches!(a.commit(&[late]), Err(Error::Fenced { .. })));
        assert_eq!(b.get(&x, b"k").unwrap(), Some(b"new".to_vec()));
    }

    #[test]
    fn an_expired_lease_is_taken_over_and_a_heartbeat_renews_only_its_own() {
        let Some(db) = TestDatabase::create() else {
            return;
        };
        let (a, b) = (node(&db), node(&db));
        a.join("a", "127.0.0.1:1", 60_000).unwrap();
        b.join("b", "127.0.0.1:2", 60_000).unwrap();
        assert_eq!(a.acquire("a", &[1, 2], 300).unwrap(), vec![(1, 2), (2, 2)]);
        // a renews shard 1's lease... (both of its leases, for a long time)
        a.heartbeat("a", "127.0.0.1:1", 60_000, false).unwrap();
        assert_eq!(b.acquire("b", &[1, 2], 60_000).unwrap(), vec![]);
        // ...then stops renewing: once the database's clock passes the lease, b takes over.
        let a_short = a.heartbeat("a", "127.0.0.1:1", 200, false).unwrap();
        assert_eq!(owner(&a_short, 1), (Some("a"), 2, true));
        std::thread::sleep(std::time::Duration::from_millis(400));
        let view = b.heartbeat("b", "127.0.0.1:2", 60_000, false).unwrap();
        assert_eq!(owner(&view, 1), (Some("a"), 2, false));
        let a_row = view.nodes.iter().find(|n| n.name == "a").unwrap();
        assert!(
            !a_row.alive,
            "a's heartbeat is older than the lease: {a_row:?}"
        );
        assert_eq!(
            b.acquire("b", &[1, 2], 60_000).unwrap(),
            vec![(1, 3), (2, 3)]
        );
        // a's next heartbeat does not renew what is b's now.
        let view = a.heartbeat("a", "127.0.0.1:1", 60_000, false).unwrap();
        assert_eq!(owner(&view, 1), (Some("b"), 3, true));
        // A node that joins again under its name starts with no lease of its earlier run.
        assert_eq!(a.acquire("a", &[7], 60_000).unwrap(), vec![(7, 2)]);
        a.join("a", "127.0.0.1:3", 60_000).unwrap();
        let view = b.cluster_view().unwrap();
        assert_eq!(owner(&view, 7), (None, 2, false));
        let a_row = view.nodes.iter().find(|n| n.name == "a").unwrap();
        assert_eq!(a_row.advertise, "127.0.0.1:3");
        // A draining node says so; one that left is gone from the list.
        b.heartbeat("b", "127.0.0.1:2", 60_000, true).unwrap();
        b.leave("b").unwrap();
        let view = a.cluster_view().unwrap();
        let names: Vec<&str> = view.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn nodes_share_a_store_that_a_single_host_cannot_open_meanwhile() {
        let Some(db) = TestDatabase::create() else {
            return;
        };
        let first = node(&db);
        let second = node(&db);
        let single = PostgresBackend::open(&db.url, &PostgresOptions::default());
        assert!(matches!(single, Err(OpenError::Locked(_))), "{single:?}");
        drop((first, second));
        PostgresBackend::open(&db.url, &PostgresOptions::default()).unwrap();
    }
}
