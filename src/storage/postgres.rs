//! The PostgreSQL engine behind [`Backend`]: the same API, limits and guarantees as LMDB's,
//! with the data in a PostgreSQL database (`duro serve --store postgresql://...`).
//!
//! # Schema (version [`SCHEMA_VERSION`])
//!
//! duro creates and versions its tables itself: `duro_schema` holds the version, and each
//! migration runs in one transaction under an advisory lock, so that two nodes starting
//! together migrate once. A newer version than this build knows is refused.
//!
//! - `duro_meta (key text, value bigint)`: `virtual_shards`, fixed when the store is created.
//! - `duro_namespaces (name text, tag bigint, secret bytea)`.
//! - `duro_epochs (shard bigint, epoch bigint)`: a row per virtual shard, made with the store,
//!   so that a commit can lock the rows of its shards (`FOR SHARE`) and an epoch raise waits
//!   for the commits in flight, or they for it.
//! - `duro_objects (tag, id, created_ms, name)`: the registry, as LMDB's `objects`.
//! - `duro_kv (tag, id, key, value)`: every object's keys. `bytea` compares as bytes (memcmp,
//!   shorter first), which is LMDB's order, so scans answer in the same order. A key is at
//!   most [`KEY_BYTES_MAX`] bytes: a B-tree entry must fit a third of a page.
//! - `duro_alarms (tag, id, at_ms)` with an index on `(at_ms, tag, id)`: each object's alarm
//!   and the time-ordered index of them.
//!
//! # Threads
//!
//! The connections run on a runtime of the engine's own (one thread). [`Backend`]'s methods
//! are synchronous: each takes a connection from a bounded pool ([`POOL_SIZE`]), runs its
//! statements (prepared once per connection) and waits for the answer on the caller's thread.
//! The writer thread's commits wait there, as they wait for LMDB's fsync; a group commit is
//! one PostgreSQL transaction, durable when it returns (`synchronous_commit` as the server
//! has it: keep it `on`).
//!
//! - `duro_nodes` and `duro_leases` (version 2): the nodes of a cluster and a lease per
//!   virtual shard (see the `cluster` module).
//!
//! # One host per store, or a cluster
//!
//! A host that is not a node of a cluster owns its store alone: the engine holds a session
//! advisory lock on a connection of its own for its life, and a second one is refused, as a
//! second LMDB open of a data dir is. The nodes of a cluster ([`PostgresOptions::cluster`]) take
//! that lock shared: they share the store, each committing only for the virtual shards it holds
//! leases on (fenced by the epochs), and a host outside the cluster cannot open it meanwhile.

use std::ops::Bound;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use futures::executor::block_on;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::backend::{
    AlarmEntry, AlarmWrite, Backend, DumpItem, Entry, ImportReport, NamespaceRecord, ObjectBatch,
    ObjectKey, ObjectRecord, now_ms,
};
use super::dump::{ImportTarget, Importer};
use super::keys::range_is_empty;
use super::lmdb::MAX_NAMESPACE_NAME;
use super::shards::{EPOCH_FIRST, ShardMap, VIRTUAL_SHARDS_DEFAULT, check_count, virtual_shard};
use super::{Error, OpenError};

pub mod cluster;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 2;

/// Connections in the pool: the event loops' reads and the writer's commits share them.
pub const POOL_SIZE: usize = 8;

/// The longest key the engine stores (PostgreSQL's B-tree entries must fit in a third of a
/// page, with the object's tag and ID).
pub const KEY_BYTES_MAX: usize = 2500;

/// Rows read at a time by an export.
const EXPORT_PAGE: i64 = 1000;

/// The advisory lock a host holds on its store (an arbitrary constant: "duro").
const OWNER_LOCK: i64 = 0x6475_726f;

/// The advisory lock migrations take.
const MIGRATION_LOCK: i64 = 0x6475_726f_6d69;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE duro_meta (key text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE duro_namespaces (
    name text PRIMARY KEY,
    tag bigint NOT NULL UNIQUE,
    secret bytea NOT NULL
);
CREATE TABLE duro_epochs (shard bigint PRIMARY KEY, epoch bigint NOT NULL);
CREATE TABLE duro_objects (
    tag bigint NOT NULL,
    id bytea NOT NULL,
    created_ms bigint NOT NULL,
    name text NOT NULL DEFAULT '',
    PRIMARY KEY (tag, id)
);
CREATE TABLE duro_kv (
    tag bigint NOT NULL,
    id bytea NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tag, id, key)
);
CREATE TABLE duro_alarms (
    tag bigint NOT NULL,
    id bytea NOT NULL,
    at_ms bigint NOT NULL,
    PRIMARY KEY (tag, id)
);
CREATE INDEX duro_alarms_by_time ON duro_alarms (at_ms, tag, id);
"#,
    r#"
CREATE TABLE duro_nodes (
    name text PRIMARY KEY,
    advertise text NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    lease_ms bigint NOT NULL,
    draining boolean NOT NULL DEFAULT false
);
CREATE TABLE duro_leases (shard bigint PRIMARY KEY, owner text, lease_until timestamptz);
INSERT INTO duro_leases (shard) SELECT shard FROM duro_epochs;
"#,
];

/// Options of [`PostgresBackend::open`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Virtual shards of a store created by this open (`None`: [`VIRTUAL_SHARDS_DEFAULT`]);
    /// an existing store keeps its own, and another count is refused.
    pub virtual_shards: Option<u32>,
    /// Open as a node of a cluster: the store is shared with the other nodes (each owning the
    /// virtual shards it holds leases on), so the owner lock is taken shared, which only a host
    /// that is not a node of a cluster refuses.
    pub cluster: bool,
}

/// The PostgreSQL engine; see the module docs.
pub struct PostgresBackend {
    /// Runs the connections' I/O. Taken (and shut down in the background) on drop.
    runtime: Option<tokio::runtime::Runtime>,
    config: Config,
    pool: Mutex<Vec<Conn>>,
    returned: Condvar,
    /// Holds [`OWNER_LOCK`] for the engine's life.
    _owner: Client,
    virtual_shards: u32,
    /// For messages: the server and database, without credentials.
    describe: String,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("store", &self.describe)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        // Let go of the store at once: the server would notice the closed connection only a
        // little later, and a host started right after would find the store locked.
        let _ = block_on(self._owner.execute("SELECT pg_advisory_unlock_all()", &[]));
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn pg_error(error: tokio_postgres::Error) -> Error {
    Error::Io(format!("PostgreSQL: {error}"))
}

fn open_error(error: tokio_postgres::Error) -> OpenError {
    OpenError::Io(format!("PostgreSQL: {error}"))
}

/// Why a connection could not be made: the server's answer, or the engine's runtime gone.
enum ConnectError {
    Postgres(tokio_postgres::Error),
    Stopped,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Postgres(error) => write!(f, "PostgreSQL: {error}"),
            ConnectError::Stopped => f.write_str("the PostgreSQL engine is shutting down"),
        }
    }
}

/// Connects on `runtime`, whose thread then carries the connection's I/O.
fn connect(runtime: &tokio::runtime::Handle, config: &Config) -> Result<Client, ConnectError> {
    let config = config.clone();
    let handle = runtime.clone();
    let connecting = runtime.spawn(async move {
        let (client, connection) = config.connect(NoTls).await?;
        handle.spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "a PostgreSQL connection ended");
            }
        });
        Ok(client)
    });
    match block_on(connecting) {
        Ok(result) => result.map_err(ConnectError::Postgres),
        Err(_) => Err(ConnectError::Stopped),
    }
}

impl PostgresBackend {
    /// Connects to the store at `url` (`postgresql://USER@HOST:PORT/DB`), creates or migrates
    /// its schema, and takes its owner lock. Fails with [`OpenError::Locked`] when another host
    /// has it.
    pub fn open(url: &str, options: &PostgresOptions) -> Result<PostgresBackend, OpenError> {
        if let Some(count) = options.virtual_shards {
            check_count(count)?;
        }
        let config: Config = url
            .parse()
            .map_err(|e| OpenError::Io(format!("invalid PostgreSQL URL: {e}")))?;
        let describe = format!(
            "{:?}/{}",
            config.get_hosts(),
            config.get_dbname().unwrap_or("")
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("duro-postgres")
            .enable_all()
            .build()
            .map_err(|e| OpenError::Io(format!("starting the PostgreSQL runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let owner = connect(&handle, &config).map_err(|e| OpenError::Io(e.to_string()))?;
        let lock = match options.cluster {
            true => "SELECT pg_try_advisory_lock_shared($1)",
            false => "SELECT pg_try_advisory_lock($1)",
        };
        let locked: bool = block_on(owner.query_one(lock, &[&OWNER_LOCK]))
            .map_err(open_error)?
            .get(0);
        if !locked {
            return Err(OpenError::Locked(format!("PostgreSQL store {describe}")));
        }
        let mut setup = connect(&handle, &config).map_err(|e| OpenError::Io(e.to_string()))?;
        let virtual_shards = block_on(migrate(&mut setup, options.virtual_shards))?;
        let mut pool = vec![Conn {
            client: setup,
            statements: Statements::default(),
        }];
        for _ in 1..POOL_SIZE {
            let client = connect(&handle, &config).map_err(|e| OpenError::Io(e.to_string()))?;
            pool.push(Conn {
                client,
                statements: Statements::default(),
            });
        }
        Ok(PostgresBackend {
            runtime: Some(runtime),
            config,
            pool: Mutex::new(pool),
            returned: Condvar::new(),
            _owner: owner,
            virtual_shards,
            describe,
        })
    }

    /// A connection of the pool, waiting for one when all are in use; a broken one is
    /// replaced.
    fn client(&self) -> Result<Pooled<'_>, Error> {
        let mut pool = self.lock_pool();
        let client = loop {
            if let Some(client) = pool.pop() {
                break client;
            }
            pool = self
                .returned
                .wait(pool)
                .unwrap_or_else(PoisonError::into_inner);
        };
        drop(pool);
        let client = if client.client.is_closed() {
            let runtime = self.runtime.as_ref().map(|r| r.handle().clone());
            let runtime = runtime.ok_or(Error::Closed)?;
            match connect(&runtime, &self.config) {
                Ok(fresh) => Conn {
                    client: fresh,
                    statements: Statements::default(),
                },
                Err(error) => {
                    // Give the broken one back, so the pool keeps its size; the next taker
                    // tries again.
                    self.give_back(client);
                    return Err(Error::Io(error.to_string()));
                }
            }
        } else {
            client
        };
        Ok(Pooled {
            backend: self,
            client: Some(client),
        })
    }

    fn lock_pool(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn give_back(&self, client: Conn) {
        self.lock_pool().push(client);
        self.returned.notify_one();
    }
}

/// A connection of the pool, with the statements prepared on it.
struct Conn {
    client: Client,
    statements: Statements,
}

/// Statements prepared on one connection, by their SQL: each is parsed and planned once.
#[derive(Default)]
struct Statements(std::collections::HashMap<String, Statement>);

impl Statements {
    async fn get<C: tokio_postgres::GenericClient>(
        &mut self,
        client: &C,
        sql: &str,
    ) -> Result<Statement, Error> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql).await.map_err(pg_error)?;
        self.0.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

/// A connection taken from the pool, given back when dropped.
struct Pooled<'b> {
    backend: &'b PostgresBackend,
    client: Option<Conn>,
}

impl Pooled<'_> {
    fn get(&mut self) -> &mut Conn {
        self.client.as_mut().expect("a pooled client until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            self.backend.give_back(client);
        }
    }
}

/// Creates or migrates the schema; the store's virtual shard count.
async fn migrate(client: &mut Client, requested: Option<u32>) -> Result<u32, OpenError> {
    let txn = client.transaction().await.map_err(open_error)?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(open_error)?;
    // Under the lock: no other node creates it meanwhile (and no notice that it exists).
    let exists: bool = txn
        .query_one("SELECT to_regclass('duro_schema') IS NOT NULL", &[])
        .await
        .map_err(open_error)?
        .get(0);
    if !exists {
        txn.batch_execute("CREATE TABLE duro_schema (version integer NOT NULL)")
            .await
            .map_err(open_error)?;
    }
    let version: i32 = match txn
        .query_opt("SELECT version FROM duro_schema", &[])
        .await
        .map_err(open_error)?
    {
        Some(row) => row.get(0),
        None => {
            txn.execute("INSERT INTO duro_schema (version) VALUES (0)", &[])
                .await
                .map_err(open_error)?;
            0
        }
    };
    if version > SCHEMA_VERSION {
        return Err(OpenError::FormatVersion {
            found: version as u32,
            supported: SCHEMA_VERSION as u32,
        });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tracing::info!(to = index + 1, "migrating the PostgreSQL schema");
        txn.batch_execute(migration).await.map_err(open_error)?;
    }
    txn.execute("UPDATE duro_schema SET version = $1", &[&SCHEMA_VERSION])
        .await
        .map_err(open_error)?;
    let recorded = txn
        .query_opt(
            "SELECT value FROM duro_meta WHERE key = 'virtual_shards'",
            &[],
        )
        .await
        .map_err(open_error)?
        .map(|row| row.get::<_, i64>(0) as u32);
    let count = match recorded {
        Some(count) => super::shards::check_recorded(count, requested)?,
        None => {
            let count = requested.unwrap_or(VIRTUAL_SHARDS_DEFAULT);
            txn.execute(
                "INSERT INTO duro_meta (key, value) VALUES ('virtual_shards', $1)",
                &[&i64::from(count)],
            )
            .await
            .map_err(open_error)?;
            txn.execute(
                "INSERT INTO duro_epochs (shard, epoch) \
                 SELECT s, $2::bigint FROM generate_series(0::bigint, $1::bigint - 1) AS s",
                &[&i64::from(count), &(EPOCH_FIRST as i64)],
            )
            .await
            .map_err(open_error)?;
            txn.execute(
                "INSERT INTO duro_leases (shard) \
                 SELECT s FROM generate_series(0::bigint, $1::bigint - 1) AS s",
                &[&i64::from(count)],
            )
            .await
            .map_err(open_error)?;
            count
        }
    };
    txn.commit().await.map_err(open_error)?;
    Ok(count)
}

fn tag(object: &ObjectKey) -> i64 {
    i64::from(object.tag)
}

fn id_of(row: &Row, index: usize) -> Result<[u8; 32], Error> {
    let bytes: &[u8] = row.get(index);
    bytes
        .try_into()
        .map_err(|_| Error::Corrupt("an object ID is not 32 bytes".into()))
}

fn check_key(key: &[u8]) -> Result<(), Error> {
    if key.len() > KEY_BYTES_MAX {
        return Err(Error::EngineKeyTooLarge {
            len: key.len(),
            max: KEY_BYTES_MAX,
        });
    }
    Ok(())
}

/// The SQL of a scan with these bounds and direction.
fn scan_sql(start: Bound<&[u8]>, end: Bound<&[u8]>, reverse: bool) -> String {
    let mut sql = String::from("SELECT key, value FROM duro_kv WHERE tag = $1 AND id = $2");
    let mut next = 3;
    for (bound, including, excluding) in [(start, ">=", ">"), (end, "<=", "<")] {
        let op = match bound {
            Bound::Included(_) => including,
            Bound::Excluded(_) => excluding,
            Bound::Unbounded => continue,
        };
        sql.push_str(&format!(" AND key {op} ${next}"));
        next += 1;
    }
    let order = if reverse { "DESC" } else { "ASC" };
    sql.push_str(&format!(" ORDER BY key {order} LIMIT ${next}"));
    sql
}

impl Backend for PostgresBackend {
    fn get(&self, object: &ObjectKey, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        if key.len() > KEY_BYTES_MAX {
            return Ok(None);
        }
        let mut pooled = self.client()?;
        let Conn { client, statements } = pooled.get();
        block_on(async {
            let statement = statements
                .get(
                    client,
                    "SELECT value FROM duro_kv WHERE tag = $1 AND id = $2 AND key = $3",
                )
                .await?;
            let row = client
                .query_opt(&statement, &[&tag(object), &&object.id[..], &key])
                .await
                .map_err(pg_error)?;
            Ok(row.map(|row| row.get::<_, Vec<u8>>(0)))
        })
    }

    fn scan(
        &self,
        object: &ObjectKey,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>, Error> {
        if limit == 0 || range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        let sql = scan_sql(start, end, reverse);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (tag, id) = (tag(object), &object.id[..]);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&tag, &id];
        let bounds: Vec<&[u8]> = [start, end]
            .into_iter()
            .filter_map(|b| match b {
                Bound::Included(k) | Bound::Excluded(k) => Some(k),
                Bound::Unbounded => None,
            })
            .collect();
        for bound in &bounds {
            params.push(bound);
        }
        params.push(&limit);
        let mut pooled = self.client()?;
        let Conn { client, statements } = pooled.get();
        block_on(async {
            let statement = statements.get(client, &sql).await?;
            let rows = client.query(&statement, &params).await.map_err(pg_error)?;
            Ok(rows
                .into_iter()
                .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }

    fn commit(&self, batches: &[ObjectBatch]) -> Result<(), Error> {
        for batch in batches {
            for (key, value) in &batch.mutations {
                if value.is_some() {
                    check_key(key)?;
                }
            }
        }
        let mut pooled = self.client()?;
        let Conn { client, statements } = pooled.get();
        block_on(async {
            let txn = client.transaction().await.map_err(pg_error)?;
            check_epochs(&txn, statements, batches, self.virtual_shards).await?;
            let now = now_ms() as i64;
            let prepared = CommitStatements::prepare(&txn, statements).await?;
            // On error `txn` drops, which rolls it back: nothing becomes visible.
            apply_batches(&txn, &prepared, batches, now).await?;
            txn.commit().await.map_err(pg_error)
        })
    }

    fn list_objects(
        &self,
        tag: u32,
        start_after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<(Vec<ObjectRecord>, bool), Error> {
        let after: &[u8] = start_after.map_or(&[], |id| &id[..]);
        let asked = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let mut pooled = self.client()?;
        let Conn { client, statements } = pooled.get();
        let rows = block_on(async {
            let statement = statements
                .get(
                    client,
                    "SELECT id, created_ms, name FROM duro_objects \
                     WHERE tag = $1 AND id > $2 ORDER BY id LIMIT $3",
                )
                .await?;
            client
                .query(&statement, &[&i64::from(tag), &after, &asked])
                .await
                .map_err(pg_error)
        })?;
        let more = rows.len() > limit;
        let records = rows
            .iter()
            .take(limit)
            .map(record_of)
            .collect::<Result<Vec<_>, Error>>()?;
        Ok((records, more))
    }

    fn alarm(&self, object: &ObjectKey) -> Result<Option<u64>, Error> {
        let mut pooled = self.client()?;
        let Conn { client, statements } = pooled.get();
        block_on(async {
            let statement = statements
                .get(
                    client,
                    "SELECT at_ms FROM duro_alarms WHERE tag = $1 AND id = $2",
                )
                .await?;
            let row = client
                .query_opt(&statement, &[&tag(object), &&object.id[..]])
                .await
                .map_err(pg_error)?;
            Ok(row.map(|row| row.get::<_, i64>(0) as u64))
        })
    }

    fn next_alarms(
        &self,
        after: Option<AlarmEntry>,
        limit: usize,
    ) -> Result<Vec<AlarmEntry>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut pooled = self.client()?;
        let Conn { client, statements } = pooled.get();
        let rows = block_on(async {
            match after {
                None => {
                    let statement = statements
                        .get(
                            client,
                            "SELECT at_ms, tag, id FROM duro_alarms \
                             ORDER BY at_ms, tag, id LIMIT $1",
                        )
                        .await?;
                    client.query(&statement, &[&limit]).await.map_err(pg_error)
                }
                Some((at_ms, object)) => {
                    let statement = statements
                        .get(
                            client,
                            "SELECT at_ms, tag, id FROM duro_alarms \
                             WHERE (at_ms, tag, id) > ($1, $2, $3) \
                             ORDER BY at_ms, tag, id LIMIT $4",
                        )
                        .await?;
                    let params: [&(dyn ToSql + Sync); 4] =
                        [&(at_ms as i64), &tag(&object), &&object.id[..], &limit];
                    client.query(&statement, &params).await.map_err(pg_error)
                }
            }
        })?;
        rows.iter()
            .map(|row| {
                let object = ObjectKey {
                    tag: row.get::<_, i64>(1) as u32,
                    id: id_of(row, 2)?,
                };
                Ok((row.get::<_, i64>(0) as u64, object))
            })
            .collect()
    }

    fn namespace(&self, name: &str) -> Result<NamespaceRecord, Error> {
        if name.len() > MAX_NAMESPACE_NAME {
            return Err(Error::NamespaceNameTooLong {
                len: name.len(),
                max: MAX_NAMESPACE_NAME,
            });
        }
        let mut pooled = self.client()?;
        let Conn { client, .. } = pooled.get();
        block_on(async {
            if let Some(record) = namespace_in(client, name).await? {
                return Ok(record);
            }
            let txn = client.transaction().await.map_err(pg_error)?;
            // One creator at a time: two nodes creating one namespace get the same record.
            txn.execute(
                "LOCK TABLE duro_namespaces IN SHARE ROW EXCLUSIVE MODE",
                &[],
            )
            .await
            .map_err(pg_error)?;
            if let Some(record) = namespace_in(&txn, name).await? {
                return Ok(record);
            }
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|e| Error::Io(format!("OS random source: {e}")))?;
            let row = txn
                .query_one(
                    "INSERT INTO duro_namespaces (name, tag, secret) \
                     SELECT $1, COALESCE(MAX(tag), 0) + 1, $2 FROM duro_namespaces \
                     RETURNING tag",
                    &[&name, &&secret[..]],
                )
                .await
                .map_err(pg_error)?;
            let tag: i64 = row.get(0);
            let tag = u32::try_from(tag).map_err(|_| Error::NamespaceTagsExhausted)?;
            txn.commit().await.map_err(pg_error)?;
            Ok(NamespaceRecord { tag, secret })
        })
    }

    fn shard_map(&self) -> Result<ShardMap, Error> {
        let mut pooled = self.client()?;
        let Conn { client, .. } = pooled.get();
        let rows =
            block_on(client.query("SELECT shard, epoch FROM duro_epochs ORDER BY shard", &[]))
                .map_err(pg_error)?;
        let epochs: Vec<u64> = rows.iter().map(|row| row.get::<_, i64>(1) as u64).collect();
        if epochs.len() != self.virtual_shards as usize {
            return Err(Error::Corrupt(format!(
                "{} epochs for {} virtual shards",
                epochs.len(),
                self.virtual_shards
            )));
        }
        ShardMap::new(epochs).map_err(|e| Error::Corrupt(e.to_string()))
    }

    fn raise_epoch(&self, virtual_shard: u32) -> Result<u64, Error> {
        if virtual_shard >= self.virtual_shards {
            return Err(Error::NoSuchShard {
                virtual_shard,
                count: self.virtual_shards,
            });
        }
        let mut pooled = self.client()?;
        let Conn { client, .. } = pooled.get();
        let row = block_on(client.query_one(
            "UPDATE duro_epochs SET epoch = epoch + 1 WHERE shard = $1 RETURNING epoch",
            &[&i64::from(virtual_shard)],
        ))
        .map_err(pg_error)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    fn export(
        &self,
        namespaces: &[String],
        visit: &mut dyn FnMut(DumpItem) -> bool,
    ) -> Result<(), Error> {
        let mut pooled = self.client()?;
        let Conn { client, statements } = pooled.get();
        block_on(async {
            // One snapshot for the whole export.
            let txn = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg_error)?;
            for name in namespaces {
                let Some(record) = namespace_in(&txn, name).await? else {
                    continue;
                };
                let item = DumpItem::Namespace {
                    name: name.clone(),
                    secret: record.secret,
                };
                if !visit(item) || !export_objects(&txn, statements, record.tag, visit).await? {
                    break;
                }
            }
            txn.commit().await.map_err(pg_error)
        })
    }

    fn import(
        &self,
        items: &mut dyn Iterator<Item = Result<DumpItem, Error>>,
        overwrite: bool,
    ) -> Result<ImportReport, Error> {
        let mut pooled = self.client()?;
        let Conn { client, .. } = pooled.get();
        let txn = block_on(client.transaction()).map_err(pg_error)?;
        let mut target = PgImport { txn };
        let report = Importer::new(overwrite).run(&mut target, items)?;
        block_on(target.txn.commit()).map_err(pg_error)?;
        Ok(report)
    }

    fn remote_reads(&self) -> bool {
        true
    }

    fn backup(&self, out: std::fs::File) -> Result<(), Error> {
        drop(out);
        Err(Error::Unsupported(
            "a PostgreSQL store is backed up with PostgreSQL's own tools (pg_dump, base \
             backups), or exported with `duro export`"
                .into(),
        ))
    }
}

async fn namespace_in<C: tokio_postgres::GenericClient>(
    client: &C,
    name: &str,
) -> Result<Option<NamespaceRecord>, Error> {
    let row = client
        .query_opt(
            "SELECT tag, secret FROM duro_namespaces WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(pg_error)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let secret: &[u8] = row.get(1);
    Ok(Some(NamespaceRecord {
        tag: row.get::<_, i64>(0) as u32,
        secret: secret
            .try_into()
            .map_err(|_| Error::Corrupt("a namespace secret is not 32 bytes".into()))?,
    }))
}

fn record_of(row: &Row) -> Result<ObjectRecord, Error> {
    let name: String = row.get(2);
    Ok(ObjectRecord {
        id: id_of(row, 0)?,
        name: (!name.is_empty()).then_some(name),
        created_ms: row.get::<_, i64>(1) as u64,
    })
}

/// Fails with [`Error::Fenced`] for the first batch whose epoch is not its shard's, holding
/// the epochs' rows (`FOR SHARE`) until the transaction ends: an epoch raise waits for it.
async fn check_epochs(
    txn: &tokio_postgres::Transaction<'_>,
    cache: &mut Statements,
    batches: &[ObjectBatch],
    count: u32,
) -> Result<(), Error> {
    let mut shards: Vec<i64> = batches
        .iter()
        .map(|b| i64::from(virtual_shard(&b.object.id, count)))
        .collect();
    shards.sort_unstable();
    shards.dedup();
    let statement = cache
        .get(
            txn,
            "SELECT shard, epoch FROM duro_epochs WHERE shard = ANY($1) ORDER BY shard FOR SHARE",
        )
        .await?;
    let rows = txn.query(&statement, &[&shards]).await.map_err(pg_error)?;
    let epochs: std::collections::HashMap<i64, i64> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    for batch in batches {
        let shard = virtual_shard(&batch.object.id, count);
        let current = epochs.get(&i64::from(shard)).copied().unwrap_or(0) as u64;
        if batch.epoch != current {
            return Err(Error::Fenced {
                virtual_shard: shard,
                epoch: batch.epoch,
                current,
            });
        }
    }
    Ok(())
}

/// The statements of a group commit, prepared (once per connection) before its batches run,
/// so that the batches of different objects can run at once on the connection.
struct CommitStatements {
    clear: Statement,
    put: Statement,
    delete: Statement,
    alarm_set: Statement,
    alarm_delete: Statement,
    probe: Statement,
    row_delete: Statement,
    row_insert: Statement,
    row_name: Statement,
}

impl CommitStatements {
    async fn prepare(
        txn: &tokio_postgres::Transaction<'_>,
        cache: &mut Statements,
    ) -> Result<CommitStatements, Error> {
        Ok(CommitStatements {
            clear: cache
                .get(txn, "DELETE FROM duro_kv WHERE tag = $1 AND id = $2")
                .await?,
            put: cache
                .get(
                    txn,
                    "INSERT INTO duro_kv (tag, id, key, value) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (tag, id, key) DO UPDATE SET value = EXCLUDED.value",
                )
                .await?,
            delete: cache
                .get(
                    txn,
                    "DELETE FROM duro_kv WHERE tag = $1 AND id = $2 AND key = $3",
                )
                .await?,
            alarm_set: cache
                .get(
                    txn,
                    "INSERT INTO duro_alarms (tag, id, at_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (tag, id) DO UPDATE SET at_ms = EXCLUDED.at_ms",
                )
                .await?,
            alarm_delete: cache
                .get(txn, "DELETE FROM duro_alarms WHERE tag = $1 AND id = $2")
                .await?,
            probe: cache
                .get(
                    txn,
                    "SELECT EXISTS (SELECT 1 FROM duro_kv WHERE tag = $1 AND id = $2) \
                         OR EXISTS (SELECT 1 FROM duro_alarms WHERE tag = $1 AND id = $2), \
                     (SELECT name FROM duro_objects WHERE tag = $1 AND id = $2)",
                )
                .await?,
            row_delete: cache
                .get(txn, "DELETE FROM duro_objects WHERE tag = $1 AND id = $2")
                .await?,
            row_insert: cache
                .get(
                    txn,
                    "INSERT INTO duro_objects (tag, id, created_ms, name) \
                     VALUES ($1, $2, $3, $4)",
                )
                .await?,
            row_name: cache
                .get(
                    txn,
                    "UPDATE duro_objects SET name = $3 WHERE tag = $1 AND id = $2",
                )
                .await?,
        })
    }
}

/// Applies the batches of a group commit: each object's in order, different objects at once
/// (tokio-postgres pipelines the statements of concurrent calls on one connection, so a group
/// costs a few round trips, not a few per object).
async fn apply_batches(
    txn: &tokio_postgres::Transaction<'_>,
    statements: &CommitStatements,
    batches: &[ObjectBatch],
    now: i64,
) -> Result<(), Error> {
    let mut by_object: std::collections::BTreeMap<ObjectKey, Vec<&ObjectBatch>> =
        Default::default();
    for batch in batches {
        by_object.entry(batch.object).or_default().push(batch);
    }
    let chains = by_object.into_values().map(|chain| async move {
        for batch in chain {
            apply_batch(txn, statements, batch, now).await?;
        }
        Ok::<(), Error>(())
    });
    for result in futures::future::join_all(chains).await {
        result?;
    }
    Ok(())
}

/// Applies one batch inside the group commit's transaction, as LMDB's `apply_batch` does.
async fn apply_batch(
    txn: &tokio_postgres::Transaction<'_>,
    statements: &CommitStatements,
    batch: &ObjectBatch,
    now: i64,
) -> Result<(), Error> {
    let (tag, id) = (tag(&batch.object), &batch.object.id[..]);
    if batch.clear {
        txn.execute(&statements.clear, &[&tag, &id])
            .await
            .map_err(pg_error)?;
    }
    if batch.clear || batch.alarm != AlarmWrite::Keep {
        match batch.alarm {
            AlarmWrite::Set(at_ms) => {
                txn.execute(&statements.alarm_set, &[&tag, &id, &(at_ms as i64)])
                    .await
                    .map_err(pg_error)?;
            }
            AlarmWrite::Delete | AlarmWrite::Keep => {
                txn.execute(&statements.alarm_delete, &[&tag, &id])
                    .await
                    .map_err(pg_error)?;
            }
        }
    }
    // Only the last write of each key counts; the rest run together.
    let mut last: std::collections::BTreeMap<&[u8], Option<&[u8]>> = Default::default();
    for (key, value) in &batch.mutations {
        last.insert(key, value.as_deref());
    }
    let writes = last.iter().map(|(key, value)| async move {
        match value {
            Some(value) => txn.execute(&statements.put, &[&tag, &id, key, value]).await,
            None => txn.execute(&statements.delete, &[&tag, &id, key]).await,
        }
    });
    for result in futures::future::join_all(writes).await {
        result.map_err(pg_error)?;
    }
    update_registry(txn, statements, tag, id, batch.name.as_deref(), now).await
}

/// Adds, names or removes the object's registry row to match whether it has keys or an alarm
/// (the rules of LMDB's `update_registry`).
async fn update_registry(
    txn: &tokio_postgres::Transaction<'_>,
    statements: &CommitStatements,
    tag: i64,
    id: &[u8],
    name: Option<&str>,
    now: i64,
) -> Result<(), Error> {
    let row = txn
        .query_one(&statements.probe, &[&tag, &id])
        .await
        .map_err(pg_error)?;
    let has_data: bool = row.get(0);
    let existing: Option<String> = row.get(1);
    let name = name.unwrap_or("");
    let done = match (has_data, existing) {
        (false, None) => return Ok(()),
        (false, Some(_)) => txn.execute(&statements.row_delete, &[&tag, &id]).await,
        (true, None) => {
            txn.execute(&statements.row_insert, &[&tag, &id, &now, &name])
                .await
        }
        (true, Some(stored)) if stored.is_empty() && !name.is_empty() => {
            txn.execute(&statements.row_name, &[&tag, &id, &name]).await
        }
        (true, Some(_)) => return Ok(()),
    };
    done.map(drop).map_err(pg_error)
}

/// The objects of the namespace `tag` and their keys, page by page; false when `visit` asked
/// to stop.
async fn export_objects(
    txn: &tokio_postgres::Transaction<'_>,
    cache: &mut Statements,
    tag: u32,
    visit: &mut dyn FnMut(DumpItem) -> bool,
) -> Result<bool, Error> {
    let objects = cache
        .get(
            txn,
            "SELECT o.id, o.created_ms, o.name, a.at_ms FROM duro_objects o \
         LEFT JOIN duro_alarms a ON a.tag = o.tag AND a.id = o.id \
         WHERE o.tag = $1 AND o.id > $2 ORDER BY o.id LIMIT $3",
        )
        .await?;
    let first_keys = cache
        .get(
            txn,
            "SELECT key, value FROM duro_kv WHERE tag = $1 AND id = $2 ORDER BY key LIMIT $3",
        )
        .await?;
    let keys = cache
        .get(
            txn,
            "SELECT key, value FROM duro_kv WHERE tag = $1 AND id = $2 AND key > $3 \
         ORDER BY key LIMIT $4",
        )
        .await?;
    let tag = i64::from(tag);
    let mut after: Vec<u8> = Vec::new();
    loop {
        let rows = txn
            .query(&objects, &[&tag, &after, &EXPORT_PAGE])
            .await
            .map_err(pg_error)?;
        for row in &rows {
            let record = record_of(row)?;
            let alarm_ms = row.get::<_, Option<i64>>(3).map(|at| at as u64);
            let id = record.id;
            if !visit(DumpItem::Object { record, alarm_ms }) {
                return Ok(false);
            }
            // The first page from the first key (the empty key included), the next ones after
            // the last key read.
            let mut key_after: Option<Vec<u8>> = None;
            loop {
                let page = match &key_after {
                    None => {
                        txn.query(&first_keys, &[&tag, &&id[..], &EXPORT_PAGE])
                            .await
                    }
                    Some(after) => {
                        txn.query(&keys, &[&tag, &&id[..], after, &EXPORT_PAGE])
                            .await
                    }
                }
                .map_err(pg_error)?;
                for row in &page {
                    let key: Vec<u8> = row.get(0);
                    key_after = Some(key.clone());
                    if !visit(DumpItem::Key {
                        key,
                        value: row.get(1),
                    }) {
                        return Ok(false);
                    }
                }
                if (page.len() as i64) < EXPORT_PAGE {
                    break;
                }
            }
        }
        match rows.last() {
            Some(last) if rows.len() as i64 == EXPORT_PAGE => after = last.get::<_, Vec<u8>>(0),
            _ => return Ok(true),
        }
    }
}

/// An import's transaction.
struct PgImport<'c> {
    txn: tokio_postgres::Transaction<'c>,
}

impl PgImport<'_> {
    fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        block_on(self.txn.execute(sql, params)).map_err(pg_error)
    }
}

impl ImportTarget for PgImport<'_> {
    fn namespace(&mut self, name: &str) -> Result<Option<(u32, [u8; 32])>, Error> {
        if name.len() > MAX_NAMESPACE_NAME {
            return Err(Error::NamespaceNameTooLong {
                len: name.len(),
                max: MAX_NAMESPACE_NAME,
            });
        }
        let record = block_on(namespace_in(&self.txn, name))?;
        Ok(record.map(|r| (r.tag, r.secret)))
    }

    fn create_namespace(&mut self, name: &str, secret: &[u8; 32]) -> Result<u32, Error> {
        self.execute(
            "LOCK TABLE duro_namespaces IN SHARE ROW EXCLUSIVE MODE",
            &[],
        )?;
        let row = block_on(self.txn.query_one(
            "INSERT INTO duro_namespaces (name, tag, secret) \
             SELECT $1, COALESCE(MAX(tag), 0) + 1, $2 FROM duro_namespaces RETURNING tag",
            &[&name, &&secret[..]],
        ))
        .map_err(pg_error)?;
        u32::try_from(row.get::<_, i64>(0)).map_err(|_| Error::NamespaceTagsExhausted)
    }

    fn set_secret(&mut self, name: &str, _tag: u32, secret: &[u8; 32]) -> Result<(), Error> {
        self.execute(
            "UPDATE duro_namespaces SET secret = $2 WHERE name = $1",
            &[&name, &&secret[..]],
        )
        .map(drop)
    }

    fn has_objects(&mut self, tag: u32) -> Result<bool, Error> {
        let row = block_on(self.txn.query_one(
            "SELECT EXISTS (SELECT 1 FROM duro_objects WHERE tag = $1)",
            &[&i64::from(tag)],
        ))
        .map_err(pg_error)?;
        Ok(row.get(0))
    }

    fn has_object(&mut self, object: &ObjectKey) -> Result<bool, Error> {
        let row = block_on(self.txn.query_one(
            "SELECT EXISTS (SELECT 1 FROM duro_objects WHERE tag = $1 AND id = $2)",
            &[&tag(object), &&object.id[..]],
        ))
        .map_err(pg_error)?;
        Ok(row.get(0))
    }

    fn clear_object(&mut self, object: &ObjectKey) -> Result<(), Error> {
        let params: [&(dyn ToSql + Sync); 2] = [&tag(object), &&object.id[..]];
        self.execute("DELETE FROM duro_kv WHERE tag = $1 AND id = $2", &params)?;
        self.execute(
            "DELETE FROM duro_alarms WHERE tag = $1 AND id = $2",
            &params,
        )?;
        self.delete_row(object)
    }

    fn put_row(&mut self, object: &ObjectKey, created_ms: u64, name: &str) -> Result<(), Error> {
        self.execute(
            "INSERT INTO duro_objects (tag, id, created_ms, name) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tag, id) DO UPDATE SET created_ms = EXCLUDED.created_ms, \
             name = EXCLUDED.name",
            &[&tag(object), &&object.id[..], &(created_ms as i64), &name],
        )
        .map(drop)
    }

    fn delete_row(&mut self, object: &ObjectKey) -> Result<(), Error> {
        self.execute(
            "DELETE FROM duro_objects WHERE tag = $1 AND id = $2",
            &[&tag(object), &&object.id[..]],
        )
        .map(drop)
    }

    fn put_alarm(&mut self, object: &ObjectKey, at_ms: u64) -> Result<(), Error> {
        self.execute(
            "INSERT INTO duro_alarms (tag, id, at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (tag, id) DO UPDATE SET at_ms = EXCLUDED.at_ms",
            &[&tag(object), &&object.id[..], &(at_ms as i64)],
        )
        .map(drop)
    }

    fn put_key(&mut self, object: &ObjectKey, key: &[u8], value: &[u8]) -> Result<(), Error> {
        check_key(key)?;
        self.execute(
            "INSERT INTO duro_kv (tag, id, key, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tag, id, key) DO UPDATE SET value = EXCLUDED.value",
            &[&tag(object), &&object.id[..], &key, &value],
        )
        .map(drop)
    }
}

/// A fresh database on the test server `DURO_TEST_PG` names (a PostgreSQL URL whose user may
/// create databases), dropped with the value. `None` (the tests say they were skipped) when it
/// is not set, unless `DURO_REQUIRE_PG` is: CI sets both, so a missing server fails there.
#[cfg(test)]
pub(crate) struct TestDatabase {
    admin: String,
    pub(crate) url: String,
    name: String,
}

#[cfg(test)]
impl TestDatabase {
    pub(crate) fn create() -> Option<TestDatabase> {
        let Some(admin) = std::env::var("DURO_TEST_PG")
            .ok()
            .filter(|url| !url.is_empty())
        else {
            assert!(
                std::env::var("DURO_REQUIRE_PG").is_err(),
                "DURO_REQUIRE_PG is set but DURO_TEST_PG is not (see .ci/postgres)"
            );
            eprintln!("skipped: DURO_TEST_PG is not set (see .ci/postgres)");
            return None;
        };
        let mut suffix = [0u8; 8];
        getrandom::fill(&mut suffix).unwrap();
        let name = format!("duro_test_{}", crate::id::to_hex(&suffix));
        Self::admin_sql(&admin, &format!("CREATE DATABASE {name}"));
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Some(TestDatabase { admin, url, name })
    }

    fn admin_sql(admin: &str, sql: &str) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(admin, NoTls).await.unwrap();
            tokio::spawn(connection);
            client.batch_execute(sql).await.unwrap();
        });
    }
}

#[cfg(test)]
impl Drop for TestDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        Self::admin_sql(&self.admin, &sql);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::{self, batch, obj, put};
    use std::sync::Arc;

    fn open(db: &TestDatabase) -> PostgresBackend {
        PostgresBackend::open(&db.url, &PostgresOptions::default()).unwrap()
    }

    /// Runs `check` against a backend on a fresh database, if there is a test server.
    fn with_backend(check: impl FnOnce(&PostgresBackend)) {
        let Some(db) = TestDatabase::create() else {
            return;
        };
        let backend = open(&db);
        check(&backend);
    }

    #[test]
    fn put_get_delete_round_trips() {
        with_backend(|b| conformance::put_get_delete_round_trips(b));
    }

    #[test]
    fn batches_of_one_object_apply_in_order() {
        with_backend(|b| conformance::batches_of_one_object_apply_in_order(b));
    }

    #[test]
    fn model_scan_matches_btreemap() {
        for seed in conformance::model_seeds().into_iter().take(2) {
            // A fresh database per seed: the model starts empty.
            let Some(db) = TestDatabase::create() else {
                return;
            };
            let b = Box::new(open(&db));
            conformance::run_model(seed, 100, b, |b| {
                drop(b);
                Box::new(open(&db))
            });
        }
    }

    #[test]
    fn objects_and_tags_are_isolated() {
        with_backend(|b| conformance::objects_and_tags_are_isolated(b));
    }

    #[test]
    fn registry_tracks_objects_with_data() {
        with_backend(|b| conformance::registry_tracks_objects_with_data(b));
    }

    #[test]
    fn list_objects_paginates_within_a_tag() {
        with_backend(|b| conformance::list_objects_paginates_within_a_tag(b));
    }

    #[test]
    fn namespaces_are_distinct_and_stable() {
        let Some(db) = TestDatabase::create() else {
            return;
        };
        let records = conformance::namespaces_are_distinct(&open(&db));
        let reopened = open(&db);
        assert_eq!(reopened.namespace("x").unwrap(), records[0]);
        assert_eq!(reopened.namespace("y").unwrap(), records[1]);
    }

    #[test]
    fn namespace_is_safe_across_threads() {
        with_backend(|b| conformance::namespace_is_safe_across_threads(b));
    }

    #[test]
    fn alarms_set_replace_delete() {
        with_backend(|b| conformance::alarms_set_replace_delete(b));
    }

    #[test]
    fn shard_map_starts_at_1_and_raises() {
        with_backend(|b| conformance::shard_map_starts_at_1_and_raises(b, VIRTUAL_SHARDS_DEFAULT));
    }

    #[test]
    fn stale_epoch_is_fenced_and_writes_nothing() {
        with_backend(|b| conformance::stale_epoch_is_fenced_and_writes_nothing(b));
    }

    #[test]
    fn writer_commits_the_unfenced_batches_of_a_group() {
        let Some(db) = TestDatabase::create() else {
            return;
        };
        conformance::writer_commits_the_unfenced_batches_of_a_group(Arc::new(open(&db)));
    }

    #[test]
    fn dumps_round_trip() {
        let (Some(a), Some(b)) = (TestDatabase::create(), TestDatabase::create()) else {
            return;
        };
        conformance::dumps_round_trip(&open(&a), &open(&b));
        // Across engines: the dump is their common language.
        let c = TestDatabase::create().unwrap();
        conformance::dumps_round_trip(&crate::storage::MemoryBackend::new(), &open(&c));
    }

    #[test]
    fn a_second_host_is_locked_out_and_the_count_is_kept() {
        let Some(db) = TestDatabase::create() else {
            return;
        };
        let options = PostgresOptions {
            virtual_shards: Some(16),
            ..PostgresOptions::default()
        };
        let first = PostgresBackend::open(&db.url, &options).unwrap();
        assert_eq!(first.shard_map().unwrap().count(), 16);
        assert!(matches!(
            PostgresBackend::open(&db.url, &options),
            Err(OpenError::Locked(_))
        ));
        let o = obj(first.namespace("n").unwrap().tag, 1);
        first.commit(&[batch(o, vec![put(b"k", b"v")])]).unwrap();
        drop(first);
        // Reopened: the data, the count, and another count refused.
        let again = PostgresBackend::open(&db.url, &PostgresOptions::default()).unwrap();
        assert_eq!(again.get(&o, b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(again.shard_map().unwrap().count(), 16);
        drop(again);
        let other = PostgresOptions {
            virtual_shards: Some(8),
            ..PostgresOptions::default()
        };
        assert!(matches!(
            PostgresBackend::open(&db.url, &other),
            Err(OpenError::VirtualShardsMismatch { .. })
        ));
    }

    #[test]
    fn keys_past_the_engine_bound_are_refused_cleanly() {
        with_backend(|b| {
            let o = obj(b.namespace("n").unwrap().tag, 2);
            let long = vec![b'k'; KEY_BYTES_MAX + 1];
            let error = b.commit(&[batch(o, vec![put(&long, b"v")])]).unwrap_err();
            assert!(matches!(error, Error::EngineKeyTooLarge { .. }), "{error}");
            assert_eq!(b.get(&o, &long).unwrap(), None);
            let most = vec![b'k'; KEY_BYTES_MAX];
            b.commit(&[batch(o, vec![put(&most, b"v")])]).unwrap();
            assert_eq!(b.get(&o, &most).unwrap(), Some(b"v".to_vec()));
        });
    }
}
