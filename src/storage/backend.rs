//! The narrow interface between duro's storage layer and the engine that persists it.
//!
//! The event loop reads through it directly (reads are memory-mapped and take microseconds); the
//! writer thread is the only caller of [`Backend::commit`]. Keeping the interface this small lets a
//! test wrap the real engine and inject I/O errors or a full disk at the Nth commit.

use std::ops::Bound;
use std::time::{SystemTime, UNIX_EPOCH};

use super::shards::ShardMap;

/// Identifies one object's storage: the namespace's tag and the object's 32-byte ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Small integer the engine assigned to the namespace (see [`Backend::namespace`]).
    pub tag: u32,
    /// The object's ID bytes.
    pub id: [u8; 32],
}

/// What one object asks to be made durable, as one atomic unit inside a group commit.
#[derive(Clone, Debug)]
pub struct ObjectBatch {
    pub object: ObjectKey,
    /// The name the object was reached by, if any: recorded in the object registry.
    pub name: Option<String>,
    /// Delete every key of the object before applying `mutations` (`delete_all`).
    pub clear: bool,
    /// Keys to write (`Some(value)`) or delete (`None`), applied in order.
    pub mutations: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The change of the object's alarm, applied after `clear` (which deletes the alarm too).
    pub alarm: AlarmWrite,
    /// The ownership epoch of the object's virtual shard that the writer believed it owned the
    /// object under. [`Backend::commit`] refuses the batch with [`Error::Fenced`] unless it is
    /// the shard's stored epoch (see `storage::shards`).
    ///
    /// [`Error::Fenced`]: super::Error::Fenced
    pub epoch: u64,
}

/// What a batch does to its object's alarm (one alarm per object).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AlarmWrite {
    /// Leaves the alarm as it is.
    #[default]
    Keep,
    /// Sets or replaces the alarm: milliseconds since the Unix epoch.
    Set(u64),
    /// Deletes the alarm, if any.
    Delete,
}

impl AlarmWrite {
    /// The object's alarm once a batch with this write (and `clear`) applied over `old`.
    pub fn apply(self, old: Option<u64>, clear: bool) -> Option<u64> {
        match self {
            AlarmWrite::Set(at_ms) => Some(at_ms),
            AlarmWrite::Delete => None,
            AlarmWrite::Keep if clear => None,
            AlarmWrite::Keep => old,
        }
    }
}

/// An entry of the time-ordered alarm index: (time in ms since the Unix epoch, object).
pub type AlarmEntry = (u64, ObjectKey);

/// A row of the object registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRecord {
    pub id: [u8; 32],
    /// The name the object was first reached by, if it was reached by name.
    pub name: Option<String>,
    /// Milliseconds since the Unix epoch when the object first stored data.
    pub created_ms: u64,
}

/// A namespace's persistent identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceRecord {
    pub tag: u32,
    /// Secret keying the MACs and name hashes of the namespace's IDs.
    pub secret: [u8; 32],
}

/// One key and its stored value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One item of a dump of storage: what [`Backend::export`] reads and [`Backend::import`]
/// writes, in dump order: a namespace, then each of its objects, each followed by its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DumpItem {
    /// A namespace: its name and the secret that mints and checks its IDs.
    Namespace { name: String, secret: [u8; 32] },
    /// An object of the last namespace: its registry row and its alarm.
    Object {
        record: ObjectRecord,
        alarm_ms: Option<u64>,
    },
    /// A key of the last object, with its value as stored (see `storage::value`).
    Key { key: Vec<u8>, value: Vec<u8> },
}

/// What [`Backend::import`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub namespaces: u32,
    pub objects: u64,
    pub keys: u64,
    /// The namespaces whose secret the import replaced (they had no objects).
    pub new_secrets: Vec<String>,
    /// Every object the import wrote: (namespace, ID).
    pub written: Vec<(String, [u8; 32])>,
}

pub trait Backend: Send + Sync + 'static {
    /// The value stored under `key`, if any.
    fn get(&self, object: &ObjectKey, key: &[u8]) -> Result<Option<Vec<u8>>, super::Error>;

    /// Up to `limit` entries with `start <= key < end` (as the bounds say), in ascending byte
    /// order of keys, or descending when `reverse`.
    fn scan(
        &self,
        object: &ObjectKey,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>, super::Error>;

    /// Applies every batch in one transaction and makes it durable (fsync) before returning.
    /// On error nothing of the transaction is visible. In that same transaction, every batch's
    /// [`ObjectBatch::epoch`] must equal the stored epoch of its object's virtual shard, else
    /// the commit fails with [`Error::Fenced`](super::Error::Fenced) (naming the first such
    /// batch's shard) and writes nothing. Also maintains the object registry: an
    /// object is in it while it has a key or an alarm, and leaves it when it has neither.
    fn commit(&self, batches: &[ObjectBatch]) -> Result<(), super::Error>;

    /// [`Backend::commit`], and how long making the writes durable took (the engine's commit
    /// and fsync, apart from applying the batches), for the storage metrics; `None` when the
    /// engine does not tell the two apart.
    fn commit_timed(
        &self,
        batches: &[ObjectBatch],
    ) -> Result<Option<std::time::Duration>, super::Error> {
        self.commit(batches).map(|()| None)
    }

    /// Objects of the namespace `tag` that have stored data, in ID byte order, after
    /// `start_after`; at most `limit`, and whether more remain.
    fn list_objects(
        &self,
        tag: u32,
        start_after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<(Vec<ObjectRecord>, bool), super::Error>;

    /// The object's alarm (ms since the Unix epoch), if it has one.
    fn alarm(&self, object: &ObjectKey) -> Result<Option<u64>, super::Error>;

    /// Up to `limit` alarms of every object, in (time, tag, id) order, strictly after `after`
    /// (from the first when `None`): the index the alarm scheduler pages through.
    fn next_alarms(
        &self,
        after: Option<AlarmEntry>,
        limit: usize,
    ) -> Result<Vec<AlarmEntry>, super::Error>;

    /// The record of the namespace `name`, created (tag and a secret from the OS CSPRNG) and made
    /// durable on first use.
    fn namespace(&self, name: &str) -> Result<NamespaceRecord, super::Error>;

    /// The virtual shards: their count (fixed when the data dir was created) and each one's
    /// ownership epoch as stored now.
    fn shard_map(&self) -> Result<ShardMap, super::Error>;

    /// Raises the ownership epoch of `virtual_shard` by one and makes it durable; returns the
    /// new epoch. From then on a batch made under an older epoch of the shard is fenced. Fails
    /// with [`Error::NoSuchShard`](super::Error::NoSuchShard) past the count, changing nothing.
    fn raise_epoch(&self, virtual_shard: u32) -> Result<u64, super::Error>;

    /// Reads the namespaces `namespaces` (those not recorded are skipped), their objects in ID
    /// order and each object's keys in key order, from one consistent snapshot, and hands
    /// each item to `visit` in dump order (see [`DumpItem`]) until it answers false. Commits
    /// go on meanwhile and are not seen.
    fn export(
        &self,
        namespaces: &[String],
        visit: &mut dyn FnMut(DumpItem) -> bool,
    ) -> Result<(), super::Error>;

    /// Writes the items of a dump in one transaction and makes it durable, or writes nothing
    /// when an item is an error or breaks a rule (see `storage::dump`): an object that has
    /// data is a conflict unless `overwrite`, which replaces its data; a namespace recorded
    /// with another secret takes the dump's only if it has no objects.
    fn import(
        &self,
        items: &mut dyn Iterator<Item = Result<DumpItem, super::Error>>,
        overwrite: bool,
    ) -> Result<ImportReport, super::Error>;

    /// Whether a read costs a round trip to another process (a database server) rather than a
    /// memory-mapped lookup. The host then loads an object's storage into its cache when it
    /// activates, off the event loop, so that the object's reads do not wait on the engine
    /// there (see `ObjectStore::preload`).
    fn remote_reads(&self) -> bool {
        false
    }

    /// Writes a consistent, compacted copy of the whole store to `out`, in the engine's own
    /// format, while commits go on. Engines that cannot answer [`Error::Unsupported`].
    ///
    /// [`Error::Unsupported`]: super::Error::Unsupported
    fn backup(&self, out: std::fs::File) -> Result<(), super::Error> {
        drop(out);
        Err(super::Error::Unsupported(
            "this storage engine has no backup of its own".into(),
        ))
    }
}

/// Milliseconds since the Unix epoch: the clock of [`ObjectRecord::created_ms`].
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
