//! The LMDB engine behind [`Backend`]: one memory-mapped, copy-on-write B+tree environment per
//! data dir, whose committed write transactions are fsynced before [`Backend::commit`] returns.
//!
//! # On-disk layout (format version [`FORMAT_VERSION`] = 3)
//!
//! This layout is an API: a data dir written by one build must be readable by every later build
//! that reports the same format version. Change it only together with [`FORMAT_VERSION`].
//!
//! Files in the data dir:
//! - `LOCK`: an empty file on which the open backend holds `flock(LOCK_EX)`, so that only one
//!   process (and only one [`LmdbBackend`] within a process) uses the dir at a time.
//! - `data.mdb`, `lock.mdb`: the LMDB environment (LMDB's own files).
//!
//! All integers are big-endian. "‖" is concatenation. LMDB compares keys bytewise
//! (memcmp, shorter first on a tie), which is the order every layout below relies on.
//!
//! Named database `meta`:
//! - `format_version` → u32: the layout version of the dir (written when the env is created).
//! - `next_tag` → u32: the tag the next new namespace gets (absent = 1; tag 0 is never used).
//! - `ns/{name}` → tag u32 ‖ secret (32 bytes): a namespace's record (see
//!   [`Backend::namespace`]). `{name}` is the UTF-8 name, so a name is at most
//!   [`MAX_NAMESPACE_NAME`] bytes (LMDB's key size limit).
//! - `virtual_shards` → u32 (since version 3): how many virtual shards the dir has, in
//!   `1..=`[`VIRTUAL_SHARDS_MAX`](super::shards::VIRTUAL_SHARDS_MAX). Written when the dir is
//!   created (or upgraded), from [`LmdbOptions::virtual_shards`], and never changed: an
//!   object's virtual shard is [`virtual_shard`]`(id, count)`, so another count would move
//!   objects.
//! - `epoch/` ‖ shard u32 → u64 (since version 3): the ownership epoch of a virtual shard,
//!   absent = 1 (so a new dir writes none). Raised only by [`Backend::raise_epoch`]; every
//!   commit reads the epoch of each batch's shard in its own write transaction and refuses a
//!   batch made under another (see `storage::shards`).
//!
//! Named database `objects` (the object registry): a row per object that has a key or an alarm.
//! - tag u32 ‖ id (32 bytes) → created_ms u64 ‖ name (UTF-8, empty = reached by ID only).
//!
//! Named databases `alarm_of` and `alarms` (since version 2): each object's one alarm, and the
//! same alarms as a time-ordered index; every commit changes both in its one write transaction.
//! - `alarm_of`: tag u32 ‖ id (32 bytes) → at_ms u64 (ms since the Unix epoch).
//! - `alarms`: at_ms u64 ‖ tag u32 ‖ id (32 bytes) → empty.
//!
//! Versions: 1 had no alarms; 2 had no virtual shards. Opening a version-1 dir upgrades it in
//! place: the two alarm databases are created (empty); then, as for a version-2 dir, the
//! virtual shard count is recorded (every epoch is 1) and `format_version` becomes 3, in one
//! transaction. Each step is idempotent, so an upgrade cut short is finished by the next open.
//! A newer version is refused. (A version-2 build refuses a version-3 dir, so no build that
//! ignores epochs can commit into a dir whose shards may be fenced.)
//!
//! Named database `kv` (every object's keys). Let *prefix* = tag u32 ‖ id (32 bytes), and
//! P = [`LONG_KEY_SPLIT`] = 400. LMDB keys are limited to 511 bytes but user keys have no upper
//! bound, so a user key K is stored at one of two addresses:
//! - short, `len(K) ≤ P`: LMDB key = prefix ‖ K; LMDB value = `0x00` ‖ value.
//! - long, `len(K) > P`: LMDB key = prefix ‖ K[..P] ‖ H, where H = the first 16 bytes of
//!   BLAKE3(K); LMDB value = `0x01` ‖ u32 len(K) − P ‖ K[P..] ‖ value.
//!
//! An LMDB key's length tells the two kinds apart: a short address is at most 36 + P bytes
//! long, a long one exactly 36 + P + 16 = 452 bytes. The marker byte is redundant with it, and
//! checked.
//!
//! Order: LMDB order of addresses equals user-key byte order, except among long keys that share
//! their first P bytes (a "group"), which are ordered by H. A group is contiguous and sits right
//! after the short key equal to its P bytes (if any), before every address that is greater in
//! its first 36 + P bytes: exactly where its user keys belong. So a scan reads a group whole,
//! decodes its full keys and sorts them; everywhere else LMDB order is the answer. A point
//! lookup of a long key is one LMDB lookup at its address, whose stored K[P..] is compared with
//! the key sought (a mismatch would be a 128-bit hash collision and reads as "not found").

use std::fs::{File, OpenOptions, TryLockError};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use lmdb::{
    Cursor, Database, DatabaseFlags, Environment, EnvironmentFlags, RoCursor, RwTransaction,
    Transaction, WriteFlags,
};

use super::backend::{
    AlarmEntry, AlarmWrite, Backend, DumpItem, Entry, ImportReport, NamespaceRecord, ObjectBatch,
    ObjectKey, ObjectRecord, now_ms,
};
use super::keys::{range_is_empty, successor};
use super::shards::{
    EPOCH_FIRST, ShardMap, VIRTUAL_SHARDS_DEFAULT, check_count, check_recorded, virtual_shard,
};
use super::{Error, OpenError};

mod dump;

/// Layout version this build writes and reads (see the module docs).
pub const FORMAT_VERSION: u32 = 3;

/// The oldest layout version this build opens, upgrading it to [`FORMAT_VERSION`] in place.
pub const FORMAT_VERSION_OLDEST: u32 = 1;

/// Length of an `alarms` key: at_ms ‖ tag ‖ id.
const ALARM_KEY_LEN: usize = 8 + PREFIX_LEN;

/// Length P of the user-key prefix stored in the address of a long key (see the module docs).
/// 36 (object prefix) + 400 + 16 (hash) = 452 stays under LMDB's 511-byte key limit.
pub const LONG_KEY_SPLIT: usize = 400;

/// Longest namespace name [`Backend::namespace`] accepts: `ns/{name}` must fit LMDB's
/// 511-byte key limit.
pub const MAX_NAMESPACE_NAME: usize = MAX_LMDB_KEY - NS_PREFIX.len();

/// Longest user key the layout can store: the part past [`LONG_KEY_SPLIT`] has a u32 length.
pub const MAX_KEY: usize = LONG_KEY_SPLIT.saturating_add(u32::MAX as usize);

/// LMDB's default `MDB_MAXKEYSIZE`, which lmdb-rkv-sys builds with.
const MAX_LMDB_KEY: usize = 511;
const NS_PREFIX: &str = "ns/";
const FORMAT_VERSION_KEY: &[u8] = b"format_version";
const NEXT_TAG_KEY: &[u8] = b"next_tag";
const VIRTUAL_SHARDS_KEY: &[u8] = b"virtual_shards";
/// Prefix of the `epoch/` ‖ shard keys of `meta`.
const EPOCH_PREFIX: &[u8] = b"epoch/";
const EPOCH_KEY_LEN: usize = 6 + 4;
/// tag ‖ id: the part of every `kv` and `objects` key that names the object.
const PREFIX_LEN: usize = 4 + 32;
const HASH_LEN: usize = 16;
/// Length of every long-key address: prefix ‖ K[..P] ‖ H.
const LONG_ADDR_LEN: usize = PREFIX_LEN + LONG_KEY_SPLIT + HASH_LEN;
const SHORT_MARKER: u8 = 0;
const LONG_MARKER: u8 = 1;

// `MDB_cursor_op` values from lmdb.h. lmdb-rkv does not re-export them; they are part of
// LMDB's stable ABI, and defining them here spares a direct dependency on lmdb-rkv-sys.
const MDB_FIRST: u32 = 0;
const MDB_GET_CURRENT: u32 = 4;
const MDB_LAST: u32 = 6;
const MDB_NEXT: u32 = 8;
const MDB_PREV: u32 = 12;
const MDB_SET_RANGE: u32 = 17;

/// Tuning of the LMDB environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmdbOptions {
    /// Size of the memory map, i.e. the most data the dir can hold; commits fail with
    /// [`Error::MapFull`] beyond it. Default 64 GiB: it only reserves address space (the file
    /// grows as data is written), so a large value costs nothing on 64-bit hosts. If the data
    /// file is already larger, LMDB uses the file's size.
    pub map_bytes: usize,
    /// Most read transactions open at once (LMDB reader-table slots). Default 1024.
    pub max_readers: u32,
    /// How many virtual shards a dir created by this open gets (`None`:
    /// [`VIRTUAL_SHARDS_DEFAULT`]); bounded by
    /// `1..=`[`VIRTUAL_SHARDS_MAX`](super::shards::VIRTUAL_SHARDS_MAX). An existing dir
    /// keeps the count it was created with: opening it with `Some` other count fails with
    /// [`OpenError::VirtualShardsMismatch`], `None` takes the dir's.
    pub virtual_shards: Option<u32>,
}

impl Default for LmdbOptions {
    fn default() -> Self {
        LmdbOptions {
            map_bytes: 64 << 30,
            max_readers: 1024,
            virtual_shards: None,
        }
    }
}

/// The LMDB storage engine of one data dir; see the module docs for its on-disk layout.
///
/// Reads (`get`, `scan`, `list_objects`) each use their own read-only transaction and may run
/// on any thread concurrently with the writer; LMDB serializes write transactions.
#[derive(Debug)]
pub struct LmdbBackend {
    // Field order matters: the environment must close before the lock is released.
    env: Environment,
    meta: Database,
    kv: Database,
    objects: Database,
    /// Each object's alarm: tag ‖ id → at_ms.
    alarm_of: Database,
    /// The time-ordered alarm index: at_ms ‖ tag ‖ id → empty.
    alarms: Database,
    map_bytes: usize,
    /// The dir's virtual shard count, read (or recorded) at open; it never changes.
    virtual_shards: u32,
    dir: PathBuf,
    _lock: File,
}

/// A raw LMDB (key, value) pair borrowed from a transaction.
type Raw<'t> = (&'t [u8], &'t [u8]);

impl LmdbBackend {
    /// Opens (creating if missing) the data dir `dir`, taking its exclusive lock.
    ///
    /// Fails with [`OpenError::Locked`] if another [`LmdbBackend`] (in this or another
    /// process) has the dir open, and with [`OpenError::FormatVersion`] if the dir was written
    /// in another layout version. A virtual shard count out of bounds, or other than the one an
    /// existing dir recorded, fails with [`OpenError::VirtualShardCount`] or
    /// [`OpenError::VirtualShardsMismatch`] and changes nothing.
    pub fn open(dir: &Path, options: &LmdbOptions) -> Result<LmdbBackend, OpenError> {
        if let Some(count) = options.virtual_shards {
            check_count(count)?;
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| OpenError::Io(format!("creating {}: {e}", dir.display())))?;
        // Lock before LMDB touches the files: two environments on one file in one process
        // break LMDB's own locking (its fcntl locks are per process).
        let lock = lock_dir(dir)?;
        let env = Environment::new()
            .set_flags(EnvironmentFlags::NO_TLS | EnvironmentFlags::NO_READAHEAD)
            .set_max_dbs(5)
            .set_max_readers(options.max_readers)
            .set_map_size(options.map_bytes)
            .open(dir)
            .map_err(open_error)?;
        let map_bytes = env.info().map_err(open_error)?.map_size();
        // Refuse a dir of another format before creating anything in it.
        check_existing_format(&env)?;
        let meta = env
            .create_db(Some("meta"), DatabaseFlags::empty())
            .map_err(open_error)?;
        let kv = env
            .create_db(Some("kv"), DatabaseFlags::empty())
            .map_err(open_error)?;
        let objects = env
            .create_db(Some("objects"), DatabaseFlags::empty())
            .map_err(open_error)?;
        let alarm_of = env
            .create_db(Some("alarm_of"), DatabaseFlags::empty())
            .map_err(open_error)?;
        let alarms = env
            .create_db(Some("alarms"), DatabaseFlags::empty())
            .map_err(open_error)?;
        let mut backend = LmdbBackend {
            env,
            meta,
            kv,
            objects,
            alarm_of,
            alarms,
            map_bytes,
            virtual_shards: VIRTUAL_SHARDS_DEFAULT,
            dir: dir.to_path_buf(),
            _lock: lock,
        };
        backend.virtual_shards = backend.check_format(options.virtual_shards)?;
        Ok(backend)
    }

    /// The size of the memory map in bytes: the most data the dir can hold.
    pub fn map_bytes(&self) -> usize {
        self.map_bytes
    }

    /// The size of the data file (`data.mdb`) in bytes.
    pub fn stat_bytes(&self) -> Result<u64, Error> {
        let path = self.dir.join("data.mdb");
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| Error::Io(format!("stat {}: {e}", path.display())))
    }

    fn err(&self, e: lmdb::Error) -> Error {
        lmdb_error(e, self.map_bytes)
    }

    /// Writes the format version and the virtual shard count (`requested`, or the default)
    /// into a fresh env, or upgrades an older one in place now that the databases of this
    /// version exist (1 → 2 adds the empty alarm databases, 2 → 3 records the count). Returns
    /// the dir's virtual shard count; a `requested` count other than a recorded one is refused
    /// before anything is written.
    fn check_format(&self, requested: Option<u32>) -> Result<u32, OpenError> {
        let mut txn = self.env.begin_rw_txn().map_err(open_error)?;
        let version = match get_opt(&txn, self.meta, FORMAT_VERSION_KEY).map_err(open_error)? {
            Some(bytes) => Some(check_version(bytes)?),
            None => {
                for db in [self.kv, self.objects, self.alarm_of, self.alarms] {
                    if txn.stat(db).map_err(open_error)?.entries() != 0 {
                        return Err(OpenError::Corrupt(
                            "data present but format_version missing".into(),
                        ));
                    }
                }
                None
            }
        };
        let recorded = match get_opt(&txn, self.meta, VIRTUAL_SHARDS_KEY).map_err(open_error)? {
            Some(bytes) => Some(
                decode_u32(bytes)
                    .ok_or_else(|| OpenError::Corrupt(not_u32("virtual_shards")))
                    .and_then(|count| {
                        check_count(count).map_err(|e| OpenError::Corrupt(e.to_string()))
                    })?,
            ),
            None => None,
        };
        match (version, recorded) {
            (Some(FORMAT_VERSION), Some(recorded)) => return check_recorded(recorded, requested),
            (Some(FORMAT_VERSION), None) => {
                return Err(OpenError::Corrupt("virtual_shards missing".into()));
            }
            (Some(_), _) => tracing::info!(to = FORMAT_VERSION, "upgrading the data dir's format"),
            (None, _) => {}
        }
        let count = match recorded {
            // An upgrade cut short after recording the count (not possible today: both are
            // written in one transaction, but cheap to honour).
            Some(recorded) => check_recorded(recorded, requested)?,
            None => requested.unwrap_or(VIRTUAL_SHARDS_DEFAULT),
        };
        let flags = WriteFlags::empty();
        txn.put(self.meta, &VIRTUAL_SHARDS_KEY, &count.to_be_bytes(), flags)
            .map_err(open_error)?;
        let version = FORMAT_VERSION.to_be_bytes();
        txn.put(self.meta, &FORMAT_VERSION_KEY, &version, flags)
            .map_err(open_error)?;
        txn.commit().map_err(open_error)?;
        Ok(count)
    }

    /// The stored epoch of `virtual_shard` as `txn` sees it (absent = [`EPOCH_FIRST`]).
    fn epoch_in<T: Transaction>(&self, txn: &T, virtual_shard: u32) -> Result<u64, Error> {
        match get_opt(txn, self.meta, &epoch_key(virtual_shard)).map_err(|e| self.err(e))? {
            Some(bytes) => decode_u64(bytes).ok_or_else(|| Error::Corrupt(not_u64("epoch"))),
            None => Ok(EPOCH_FIRST),
        }
    }

    /// Fails with [`Error::Fenced`] for the first batch whose epoch is not the one its
    /// virtual shard has in `txn`.
    fn check_epochs(&self, txn: &RwTransaction, batches: &[ObjectBatch]) -> Result<(), Error> {
        for batch in batches {
            let shard = virtual_shard(&batch.object.id, self.virtual_shards);
            let current = self.epoch_in(txn, shard)?;
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

    /// Applies one batch inside the group-commit transaction.
    fn apply_batch(
        &self,
        txn: &mut RwTransaction,
        batch: &ObjectBatch,
        now: u64,
    ) -> Result<(), Error> {
        let prefix = object_prefix(&batch.object);
        if batch.clear {
            self.clear_object(txn, &prefix).map_err(|e| self.err(e))?;
        }
        if batch.clear || batch.alarm != AlarmWrite::Keep {
            self.write_alarm(txn, &prefix, batch.alarm)?;
        }
        for (key, value) in &batch.mutations {
            match value {
                Some(value) => {
                    let stored = encode_value(key, value)?;
                    txn.put(
                        self.kv,
                        &kv_address(&prefix, key),
                        &stored,
                        WriteFlags::empty(),
                    )
                    .map_err(|e| self.err(e))?;
                }
                None => self.delete_key(txn, &prefix, key)?,
            }
        }
        self.update_registry(txn, &prefix, batch.name.as_deref(), now)
    }

    /// Replaces the object's alarm (in `alarm_of` and `alarms`) with what `write` says: `Keep`
    /// here means a clear, which deletes it.
    fn write_alarm(
        &self,
        txn: &mut RwTransaction,
        prefix: &[u8; PREFIX_LEN],
        write: AlarmWrite,
    ) -> Result<(), Error> {
        let err = |e| self.err(e);
        if let Some(old) = get_opt(txn, self.alarm_of, prefix).map_err(err)? {
            let old = decode_u64(old).ok_or_else(|| Error::Corrupt(not_u64("alarm_of")))?;
            txn.del(self.alarms, &alarm_key(old, prefix), None)
                .map_err(err)?;
            txn.del(self.alarm_of, prefix, None).map_err(err)?;
        }
        if let AlarmWrite::Set(at_ms) = write {
            let flags = WriteFlags::empty();
            txn.put(self.alarm_of, prefix, &at_ms.to_be_bytes(), flags)
                .map_err(err)?;
            txn.put(self.alarms, &alarm_key(at_ms, prefix), &[], flags)
                .map_err(err)?;
        }
        Ok(())
    }

    /// Deletes every `kv` entry of the object.
    fn clear_object(&self, txn: &mut RwTransaction, prefix: &[u8; PREFIX_LEN]) -> lmdb::Result<()> {
        let mut cursor = txn.open_rw_cursor(self.kv)?;
        let mut entry = cursor_get(&cursor, Some(prefix), MDB_SET_RANGE)?;
        while let Some((key, _)) = entry {
            if !key.starts_with(prefix) {
                break;
            }
            cursor.del(WriteFlags::empty())?;
            // After a cursor delete LMDB leaves the cursor on the following entry, and MDB_NEXT
            // returns that entry rather than skipping it.
            entry = cursor_get(&cursor, None, MDB_NEXT)?;
        }
        Ok(())
    }

    fn delete_key(
        &self,
        txn: &mut RwTransaction,
        prefix: &[u8; PREFIX_LEN],
        key: &[u8],
    ) -> Result<(), Error> {
        let address = kv_address(prefix, key);
        if key.len() > LONG_KEY_SPLIT {
            // Do not delete another key that collides on the hash (see `get`).
            let Some(stored) = get_opt(txn, self.kv, &address).map_err(|e| self.err(e))? else {
                return Ok(());
            };
            if decode_long_value(stored)?.0 != &key[LONG_KEY_SPLIT..] {
                return Ok(());
            }
        }
        match txn.del(self.kv, &address, None) {
            Ok(()) | Err(lmdb::Error::NotFound) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Adds, names or removes the object's registry row to match whether it has keys or an
    /// alarm.
    fn update_registry(
        &self,
        txn: &mut RwTransaction,
        prefix: &[u8; PREFIX_LEN],
        name: Option<&str>,
        now: u64,
    ) -> Result<(), Error> {
        let err = |e| self.err(e);
        let has_keys = {
            let cursor = txn.open_ro_cursor(self.kv).map_err(err)?;
            let first = cursor_get(&cursor, Some(prefix), MDB_SET_RANGE).map_err(err)?;
            first.is_some_and(|(key, _)| key.starts_with(prefix))
        } || get_opt(txn, self.alarm_of, prefix).map_err(err)?.is_some();
        let existing = get_opt(txn, self.objects, prefix).map_err(err)?;
        let name = name.unwrap_or("");
        let row = match (has_keys, existing) {
            (false, None) => return Ok(()),
            (false, Some(_)) => return txn.del(self.objects, prefix, None).map_err(err),
            (true, None) => encode_record(now, name),
            (true, Some(row)) => {
                let (created_ms, stored_name) = decode_record_value(row)?;
                if !stored_name.is_empty() || name.is_empty() {
                    return Ok(());
                }
                encode_record(created_ms, name)
            }
        };
        txn.put(self.objects, prefix, &row, WriteFlags::empty())
            .map_err(err)
    }

    fn namespace_create(&self, key: &[u8]) -> Result<NamespaceRecord, Error> {
        let err = |e| self.err(e);
        let mut txn = self.env.begin_rw_txn().map_err(err)?;
        // Another thread may have created it between our read and this write transaction.
        if let Some(bytes) = get_opt(&txn, self.meta, key).map_err(err)? {
            return decode_namespace(bytes);
        }
        let tag = match get_opt(&txn, self.meta, NEXT_TAG_KEY).map_err(err)? {
            Some(bytes) => decode_u32(bytes).ok_or_else(|| Error::Corrupt(not_u32("next_tag")))?,
            None => 1,
        };
        let next = tag.checked_add(1).ok_or(Error::NamespaceTagsExhausted)?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| Error::Io(format!("OS random source: {e}")))?;
        let mut record = Vec::with_capacity(36);
        record.extend_from_slice(&tag.to_be_bytes());
        record.extend_from_slice(&secret);
        txn.put(self.meta, &key, &record, WriteFlags::empty())
            .map_err(err)?;
        txn.put(
            self.meta,
            &NEXT_TAG_KEY,
            &next.to_be_bytes(),
            WriteFlags::empty(),
        )
        .map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(NamespaceRecord { tag, secret })
    }
}

impl Backend for LmdbBackend {
    fn get(&self, object: &ObjectKey, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let prefix = object_prefix(object);
        let txn = self.env.begin_ro_txn().map_err(|e| self.err(e))?;
        let address = kv_address(&prefix, key);
        let Some(stored) = get_opt(&txn, self.kv, &address).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        if key.len() <= LONG_KEY_SPLIT {
            return decode_short_value(stored).map(|v| Some(v.to_vec()));
        }
        let (rest, value) = decode_long_value(stored)?;
        // A different stored rest is another key with the same 128-bit hash: not this key.
        Ok((rest == &key[LONG_KEY_SPLIT..]).then(|| value.to_vec()))
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
        let prefix = object_prefix(object);
        let txn = self.env.begin_ro_txn().map_err(|e| self.err(e))?;
        let cursor = txn.open_ro_cursor(self.kv).map_err(|e| self.err(e))?;
        let mut walker = Walker::new(cursor, prefix, reverse, self.map_bytes);
        if reverse {
            walker.seek_back(end)?;
        } else {
            walker.seek_forward(start)?;
        }
        collect_scan(walker, start, end, limit)
    }

    fn commit(&self, batches: &[ObjectBatch]) -> Result<(), Error> {
        self.commit_timed(batches).map(drop)
    }

    fn commit_timed(&self, batches: &[ObjectBatch]) -> Result<Option<std::time::Duration>, Error> {
        let mut txn = self.env.begin_rw_txn().map_err(|e| self.err(e))?;
        // In the commit's own transaction: LMDB serializes write transactions, so no epoch
        // can be raised between this check and the commit.
        self.check_epochs(&txn, batches)?;
        let now = now_ms();
        for batch in batches {
            // On error `txn` drops, which aborts it: nothing of the commit becomes visible.
            self.apply_batch(&mut txn, batch, now)?;
        }
        // LMDB's commit writes the dirty pages and fsyncs (the env has neither NO_SYNC nor
        // NO_META_SYNC): the durable part of the commit.
        let syncing = std::time::Instant::now();
        txn.commit().map_err(|e| self.err(e))?;
        Ok(Some(syncing.elapsed()))
    }

    fn list_objects(
        &self,
        tag: u32,
        start_after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<(Vec<ObjectRecord>, bool), Error> {
        let err = |e| self.err(e);
        let txn = self.env.begin_ro_txn().map_err(err)?;
        let cursor = txn.open_ro_cursor(self.objects).map_err(err)?;
        let tag_bytes = tag.to_be_bytes();
        let mut entry = match start_after {
            None => cursor_get(&cursor, Some(&tag_bytes), MDB_SET_RANGE).map_err(err)?,
            Some(id) => {
                let after = object_prefix(&ObjectKey { tag, id: *id });
                match cursor_get(&cursor, Some(&after), MDB_SET_RANGE).map_err(err)? {
                    Some((key, _)) if key == after => {
                        cursor_get(&cursor, None, MDB_NEXT).map_err(err)?
                    }
                    other => other,
                }
            }
        };
        let mut out = Vec::new();
        while let Some((key, value)) = entry {
            if !key.starts_with(&tag_bytes) {
                break;
            }
            if out.len() >= limit {
                return Ok((out, true));
            }
            out.push(decode_record(key, value)?);
            entry = cursor_get(&cursor, None, MDB_NEXT).map_err(err)?;
        }
        Ok((out, false))
    }

    fn alarm(&self, object: &ObjectKey) -> Result<Option<u64>, Error> {
        let txn = self.env.begin_ro_txn().map_err(|e| self.err(e))?;
        let stored = get_opt(&txn, self.alarm_of, &object_prefix(object));
        match stored.map_err(|e| self.err(e))? {
            Some(bytes) => decode_u64(bytes)
                .map(Some)
                .ok_or_else(|| Error::Corrupt(not_u64("alarm_of"))),
            None => Ok(None),
        }
    }

    fn next_alarms(
        &self,
        after: Option<AlarmEntry>,
        limit: usize,
    ) -> Result<Vec<AlarmEntry>, Error> {
        let err = |e| self.err(e);
        let txn = self.env.begin_ro_txn().map_err(err)?;
        let cursor = txn.open_ro_cursor(self.alarms).map_err(err)?;
        let mut entry = match after {
            None => cursor_get(&cursor, None, MDB_FIRST).map_err(err)?,
            Some((at_ms, object)) => {
                let after = alarm_key(at_ms, &object_prefix(&object));
                match cursor_get(&cursor, Some(&after), MDB_SET_RANGE).map_err(err)? {
                    Some((key, _)) if key == after => {
                        cursor_get(&cursor, None, MDB_NEXT).map_err(err)?
                    }
                    other => other,
                }
            }
        };
        let mut out = Vec::new();
        while let Some((key, _)) = entry {
            if out.len() >= limit {
                break;
            }
            out.push(decode_alarm_key(key)?);
            entry = cursor_get(&cursor, None, MDB_NEXT).map_err(err)?;
        }
        Ok(out)
    }

    fn namespace(&self, name: &str) -> Result<NamespaceRecord, Error> {
        if name.len() > MAX_NAMESPACE_NAME {
            return Err(Error::NamespaceNameTooLong {
                len: name.len(),
                max: MAX_NAMESPACE_NAME,
            });
        }
        let key = format!("{NS_PREFIX}{name}").into_bytes();
        {
            let txn = self.env.begin_ro_txn().map_err(|e| self.err(e))?;
            if let Some(bytes) = get_opt(&txn, self.meta, &key).map_err(|e| self.err(e))? {
                return decode_namespace(bytes);
            }
        }
        self.namespace_create(&key)
    }

    fn shard_map(&self) -> Result<ShardMap, Error> {
        let err = |e| self.err(e);
        let txn = self.env.begin_ro_txn().map_err(err)?;
        let mut epochs = vec![EPOCH_FIRST; self.virtual_shards as usize];
        let cursor = txn.open_ro_cursor(self.meta).map_err(err)?;
        let mut entry = cursor_get(&cursor, Some(EPOCH_PREFIX), MDB_SET_RANGE).map_err(err)?;
        while let Some((key, value)) = entry {
            let Some(shard) = key.strip_prefix(EPOCH_PREFIX) else {
                break;
            };
            let shard = decode_u32(shard).ok_or_else(|| Error::Corrupt(not_u32("epoch key")))?;
            let epoch = decode_u64(value).ok_or_else(|| Error::Corrupt(not_u64("epoch")))?;
            let slot = epochs.get_mut(shard as usize).ok_or_else(|| {
                Error::Corrupt(format!("epoch of virtual shard {shard} past the count"))
            })?;
            *slot = epoch;
            entry = cursor_get(&cursor, None, MDB_NEXT).map_err(err)?;
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
        let mut txn = self.env.begin_rw_txn().map_err(|e| self.err(e))?;
        let epoch = self
            .epoch_in(&txn, virtual_shard)?
            .checked_add(1)
            .ok_or(Error::EpochsExhausted { virtual_shard })?;
        txn.put(
            self.meta,
            &epoch_key(virtual_shard),
            &epoch.to_be_bytes(),
            WriteFlags::empty(),
        )
        .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(epoch)
    }

    fn export(
        &self,
        namespaces: &[String],
        visit: &mut dyn FnMut(DumpItem) -> bool,
    ) -> Result<(), Error> {
        self.export_dump(namespaces, visit)
    }

    fn import(
        &self,
        items: &mut dyn Iterator<Item = Result<DumpItem, Error>>,
        overwrite: bool,
    ) -> Result<ImportReport, Error> {
        self.import_dump(items, overwrite)
    }

    fn backup(&self, out: std::fs::File) -> Result<(), Error> {
        self.copy_compacted(out)
    }
}

/// The `meta` key of a virtual shard's epoch: `epoch/` ‖ shard u32.
fn epoch_key(virtual_shard: u32) -> [u8; EPOCH_KEY_LEN] {
    let mut key = [0u8; EPOCH_KEY_LEN];
    key[..EPOCH_PREFIX.len()].copy_from_slice(EPOCH_PREFIX);
    key[EPOCH_PREFIX.len()..].copy_from_slice(&virtual_shard.to_be_bytes());
    key
}

/// Steps a cursor through one object's `kv` entries in one direction, yielding "chunks": a
/// single short key, or a whole long-key group, decoded and sorted in the walk's direction.
struct Walker<'t> {
    cursor: RoCursor<'t>,
    prefix: [u8; PREFIX_LEN],
    reverse: bool,
    /// The next entry of the object not yet yielded.
    pending: Option<Raw<'t>>,
    /// For error mapping only.
    map_bytes: usize,
}

impl<'t> Walker<'t> {
    fn new(
        cursor: RoCursor<'t>,
        prefix: [u8; PREFIX_LEN],
        reverse: bool,
        map_bytes: usize,
    ) -> Self {
        Walker {
            cursor,
            prefix,
            reverse,
            pending: None,
            map_bytes,
        }
    }

    fn get(&self, key: Option<&[u8]>, op: u32) -> Result<Option<Raw<'t>>, Error> {
        cursor_get(&self.cursor, key, op).map_err(|e| lmdb_error(e, self.map_bytes))
    }

    /// Positions at the first entry that may hold a user key at or after `start`.
    fn seek_forward(&mut self, start: Bound<&[u8]>) -> Result<(), Error> {
        let mut target = self.prefix.to_vec();
        if let Bound::Included(key) | Bound::Excluded(key) = start {
            // Every key ≥ `start` has an address ≥ prefix ‖ start[..P] (see the module docs).
            target.extend_from_slice(&key[..key.len().min(LONG_KEY_SPLIT)]);
        }
        let first = self.get(Some(&target), MDB_SET_RANGE)?;
        self.pending = self.own(first);
        Ok(())
    }

    /// Positions at the last entry that may hold a user key at or before `end`.
    fn seek_back(&mut self, end: Bound<&[u8]>) -> Result<(), Error> {
        // The last address the walk may start at, and whether it is itself allowed.
        let (target, inclusive) = match end {
            Bound::Included(key) | Bound::Excluded(key) => {
                let mut target = self.prefix.to_vec();
                if key.len() <= LONG_KEY_SPLIT {
                    target.extend_from_slice(key);
                } else {
                    // The end key's group may hold keys on both sides of it: start after the
                    // whole group (its addresses are all ≤ prefix ‖ key[..P] ‖ ff…ff).
                    target.extend_from_slice(&key[..LONG_KEY_SPLIT]);
                    target.extend_from_slice(&[0xff; HASH_LEN]);
                }
                (Some(target), true)
            }
            // Just before the next object's first possible address.
            Bound::Unbounded => (successor(&self.prefix), false),
        };
        let last = match target {
            None => self.get(None, MDB_LAST)?,
            Some(target) => match self.get(Some(&target), MDB_SET_RANGE)? {
                Some(found) if inclusive && found.0 == target.as_slice() => Some(found),
                Some(_) => self.get(None, MDB_PREV)?,
                None => self.get(None, MDB_LAST)?,
            },
        };
        self.pending = self.own(last);
        Ok(())
    }

    /// `entry` if it belongs to this walk's object.
    fn own(&self, entry: Option<Raw<'t>>) -> Option<Raw<'t>> {
        entry.filter(|(key, _)| key.starts_with(&self.prefix))
    }

    fn step(&mut self) -> Result<Option<Raw<'t>>, Error> {
        let entry = self.get(None, if self.reverse { MDB_PREV } else { MDB_NEXT })?;
        Ok(self.own(entry))
    }

    /// The next chunk, or `None` at the end of the object.
    fn next_chunk(&mut self) -> Result<Option<Vec<Entry>>, Error> {
        let Some(first) = self.pending.take() else {
            return Ok(None);
        };
        if first.0.len() != LONG_ADDR_LEN {
            self.pending = self.step()?;
            return Ok(Some(vec![decode_entry(first)?]));
        }
        let group_prefix = &first.0[..PREFIX_LEN + LONG_KEY_SPLIT];
        let mut group = vec![decode_entry(first)?];
        loop {
            match self.step()? {
                Some(raw) if raw.0.len() == LONG_ADDR_LEN && raw.0.starts_with(group_prefix) => {
                    group.push(decode_entry(raw)?)
                }
                other => {
                    self.pending = other;
                    break;
                }
            }
        }
        // Inside a group LMDB orders by hash; put the keys in the walk's order.
        if self.reverse {
            group.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        } else {
            group.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        Ok(Some(group))
    }
}

/// Reads the rest of a scan; `walker` is positioned at the entry nearest the bound it
/// starts from.
fn collect_scan(
    mut walker: Walker,
    start: Bound<&[u8]>,
    end: Bound<&[u8]>,
    limit: usize,
) -> Result<Vec<Entry>, Error> {
    let reverse = walker.reverse;
    let mut out = Vec::new();
    while let Some(chunk) = walker.next_chunk()? {
        for (key, value) in chunk {
            let (after_start, before_end) = (above(&key, start), below(&key, end));
            // Keys come sorted, so the first key past the far bound ends the scan.
            if (!reverse && !before_end) || (reverse && !after_start) {
                return Ok(out);
            }
            if after_start && before_end {
                out.push((key, value));
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

/// Fails if the env holds a `meta` database whose format version is not ours.
fn check_existing_format(env: &Environment) -> Result<(), OpenError> {
    let meta = match env.open_db(Some("meta")) {
        Ok(meta) => meta,
        Err(lmdb::Error::NotFound) => return Ok(()),
        Err(e) => return Err(open_error(e)),
    };
    let txn = env.begin_ro_txn().map_err(open_error)?;
    match get_opt(&txn, meta, FORMAT_VERSION_KEY).map_err(open_error)? {
        Some(bytes) => check_version(bytes).map(drop),
        None => Ok(()),
    }
}

/// The stored `format_version`, if this build opens it (ours, or an older one it upgrades).
fn check_version(bytes: &[u8]) -> Result<u32, OpenError> {
    let found = decode_u32(bytes).ok_or_else(|| OpenError::Corrupt(not_u32("format_version")))?;
    if !(FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&found) {
        return Err(OpenError::FormatVersion {
            found,
            supported: FORMAT_VERSION,
        });
    }
    Ok(found)
}

/// Takes `flock(LOCK_EX | LOCK_NB)` on `dir/LOCK` (std's `try_lock` is exactly that on Unix).
/// The lock belongs to the open file description, so a second open in the same process
/// conflicts too.
fn lock_dir(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| OpenError::Io(format!("opening {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(OpenError::Locked(dir.display().to_string())),
        Err(TryLockError::Error(e)) => {
            Err(OpenError::Io(format!("locking {}: {e}", path.display())))
        }
    }
}

/// An engine error while opening. A full map cannot be told apart usefully here: opening
/// writes at most the format version.
fn open_error(e: lmdb::Error) -> OpenError {
    OpenError::Io(format!("LMDB: {e}"))
}

fn lmdb_error(e: lmdb::Error, map_bytes: usize) -> Error {
    match e {
        lmdb::Error::MapFull => Error::MapFull { map_bytes },
        other => Error::Io(format!("LMDB: {other}")),
    }
}

/// Runs a cursor operation, mapping "no such entry" to `None`.
fn cursor_get<'t>(
    cursor: &impl Cursor<'t>,
    key: Option<&[u8]>,
    op: u32,
) -> lmdb::Result<Option<Raw<'t>>> {
    match cursor.get(key, None, op) {
        Ok((Some(key), value)) => Ok(Some((key, value))),
        // lmdb-rkv returns the key only if LMDB moved the key pointer; ask for it explicitly.
        Ok((None, _)) => match cursor.get(None, None, MDB_GET_CURRENT) {
            Ok((Some(key), value)) => Ok(Some((key, value))),
            Ok((None, _)) => Err(lmdb::Error::Invalid),
            Err(lmdb::Error::NotFound) => Ok(None),
            Err(e) => Err(e),
        },
        Err(lmdb::Error::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

fn get_opt<'t, T: Transaction>(
    txn: &'t T,
    db: Database,
    key: &[u8],
) -> lmdb::Result<Option<&'t [u8]>> {
    match txn.get(db, &key) {
        Ok(value) => Ok(Some(value)),
        Err(lmdb::Error::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

fn object_prefix(object: &ObjectKey) -> [u8; PREFIX_LEN] {
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[..4].copy_from_slice(&object.tag.to_be_bytes());
    prefix[4..].copy_from_slice(&object.id);
    prefix
}

/// The `alarms` key of an alarm at `at_ms` of the object `prefix` names.
fn alarm_key(at_ms: u64, prefix: &[u8; PREFIX_LEN]) -> [u8; ALARM_KEY_LEN] {
    let mut key = [0u8; ALARM_KEY_LEN];
    key[..8].copy_from_slice(&at_ms.to_be_bytes());
    key[8..].copy_from_slice(prefix);
    key
}

fn decode_alarm_key(key: &[u8]) -> Result<AlarmEntry, Error> {
    let corrupt = || Error::Corrupt("malformed key in alarms".into());
    let (at_ms, prefix) = key.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let (tag, id) = prefix.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let id: [u8; 32] = id.try_into().map_err(|_| corrupt())?;
    let tag = u32::from_be_bytes(*tag);
    Ok((u64::from_be_bytes(*at_ms), ObjectKey { tag, id }))
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn not_u64(what: &str) -> String {
    format!("{what} value is not a u64")
}

fn key_hash(key: &[u8]) -> [u8; HASH_LEN] {
    let mut hash = [0u8; HASH_LEN];
    hash.copy_from_slice(&blake3::hash(key).as_bytes()[..HASH_LEN]);
    hash
}

/// The `kv` address of user key `key` (see the module docs).
fn kv_address(prefix: &[u8; PREFIX_LEN], key: &[u8]) -> Vec<u8> {
    let mut address = Vec::with_capacity(LONG_ADDR_LEN.max(PREFIX_LEN + key.len()));
    address.extend_from_slice(prefix);
    if key.len() <= LONG_KEY_SPLIT {
        address.extend_from_slice(key);
    } else {
        address.extend_from_slice(&key[..LONG_KEY_SPLIT]);
        address.extend_from_slice(&key_hash(key));
    }
    address
}

/// The `kv` value stored for `key` → `value` (see the module docs).
fn encode_value(key: &[u8], value: &[u8]) -> Result<Vec<u8>, Error> {
    if key.len() <= LONG_KEY_SPLIT {
        let mut stored = Vec::with_capacity(1 + value.len());
        stored.push(SHORT_MARKER);
        stored.extend_from_slice(value);
        return Ok(stored);
    }
    let rest = &key[LONG_KEY_SPLIT..];
    let rest_len = u32::try_from(rest.len()).map_err(|_| Error::EngineKeyTooLarge {
        len: key.len(),
        max: MAX_KEY,
    })?;
    let mut stored = Vec::with_capacity(5 + rest.len() + value.len());
    stored.push(LONG_MARKER);
    stored.extend_from_slice(&rest_len.to_be_bytes());
    stored.extend_from_slice(rest);
    stored.extend_from_slice(value);
    Ok(stored)
}

fn decode_short_value(stored: &[u8]) -> Result<&[u8], Error> {
    match stored.split_first() {
        Some((&SHORT_MARKER, value)) => Ok(value),
        _ => Err(Error::Corrupt(
            "kv value of a short key lacks its marker".into(),
        )),
    }
}

/// Splits a long key's stored value into (key[P..], value).
fn decode_long_value(stored: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let corrupt = || Error::Corrupt("malformed kv value of a long key".into());
    let (&LONG_MARKER, rest) = stored.split_first().ok_or_else(corrupt)? else {
        return Err(corrupt());
    };
    let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| corrupt())?;
    if len == 0 || len > rest.len() {
        return Err(corrupt());
    }
    Ok(rest.split_at(len))
}

/// Decodes one raw `kv` entry of the object into (user key, value).
fn decode_entry((address, stored): Raw) -> Result<Entry, Error> {
    let body = &address[PREFIX_LEN..];
    if address.len() != LONG_ADDR_LEN {
        return Ok((body.to_vec(), decode_short_value(stored)?.to_vec()));
    }
    let (rest, value) = decode_long_value(stored)?;
    let mut key = Vec::with_capacity(LONG_KEY_SPLIT + rest.len());
    key.extend_from_slice(&body[..LONG_KEY_SPLIT]);
    key.extend_from_slice(rest);
    if key_hash(&key) != body[LONG_KEY_SPLIT..] {
        return Err(Error::Corrupt(
            "long key does not match its address hash".into(),
        ));
    }
    Ok((key, value.to_vec()))
}

fn encode_record(created_ms: u64, name: &str) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + name.len());
    row.extend_from_slice(&created_ms.to_be_bytes());
    row.extend_from_slice(name.as_bytes());
    row
}

/// Splits an `objects` value into (created_ms, name); the name is empty if there is none.
fn decode_record_value(row: &[u8]) -> Result<(u64, &str), Error> {
    let (created, name) = row
        .split_first_chunk::<8>()
        .ok_or_else(|| Error::Corrupt("object registry row too short".into()))?;
    let name = std::str::from_utf8(name)
        .map_err(|_| Error::Corrupt("object registry name is not UTF-8".into()))?;
    Ok((u64::from_be_bytes(*created), name))
}

fn decode_record(key: &[u8], row: &[u8]) -> Result<ObjectRecord, Error> {
    let id: [u8; 32] = key
        .get(4..)
        .and_then(|id| id.try_into().ok())
        .ok_or_else(|| Error::Corrupt("object registry key is not 36 bytes".into()))?;
    let (created_ms, name) = decode_record_value(row)?;
    Ok(ObjectRecord {
        id,
        name: (!name.is_empty()).then(|| name.to_owned()),
        created_ms,
    })
}

fn decode_u32(bytes: &[u8]) -> Option<u32> {
    bytes.try_into().ok().map(u32::from_be_bytes)
}

/// What is corrupt when the meta record `what` does not decode as a u32.
fn not_u32(what: &str) -> String {
    format!("meta {what} is not 4 bytes")
}

fn decode_namespace(bytes: &[u8]) -> Result<NamespaceRecord, Error> {
    let corrupt = || Error::Corrupt("namespace record is not 36 bytes".into());
    let (tag, secret) = bytes.split_first_chunk::<4>().ok_or_else(corrupt)?;
    Ok(NamespaceRecord {
        tag: u32::from_be_bytes(*tag),
        secret: secret.try_into().map_err(|_| corrupt())?,
    })
}

/// Whether `key` is at or after `start`.
fn above(key: &[u8], start: Bound<&[u8]>) -> bool {
    match start {
        Bound::Included(s) => key >= s,
        Bound::Excluded(s) => key > s,
        Bound::Unbounded => true,
    }
}

/// Whether `key` is at or before `end`.
fn below(key: &[u8], end: Bound<&[u8]>) -> bool {
    match end {
        Bound::Included(e) => key <= e,
        Bound::Excluded(e) => key < e,
        Bound::Unbounded => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::{self, all, batch, del, long_key, obj, put};
    use crate::storage::shards::VIRTUAL_SHARDS_MAX;

    fn open(dir: &Path) -> LmdbBackend {
        LmdbBackend::open(dir, &LmdbOptions::default()).unwrap()
    }

    #[test]
    fn backend_is_send_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<LmdbBackend>();
    }

    #[test]
    fn put_get_delete_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        conformance::put_get_delete_round_trips(&open(dir.path()));
    }

    #[test]
    fn batches_of_one_object_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        conformance::batches_of_one_object_apply_in_order(&open(dir.path()));
    }

    #[test]
    fn model_scan_matches_btreemap() {
        for seed in conformance::model_seeds() {
            let dir = tempfile::tempdir().unwrap();
            let b = Box::new(open(dir.path()));
            conformance::run_model(seed, 200, b, |b| {
                drop(b);
                Box::new(open(dir.path()))
            });
        }
    }

    #[test]
    fn objects_and_tags_are_isolated() {
        let dir = tempfile::tempdir().unwrap();
        conformance::objects_and_tags_are_isolated(&open(dir.path()));
    }

    #[test]
    fn clear_spans_many_pages() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let (o, neighbour) = (obj(3, 1), obj(3, 2));
        let keys: Vec<Vec<u8>> = (0..3000u32).map(|i| i.to_be_bytes().repeat(50)).collect();
        let muts = |v: &[u8]| keys.iter().map(|k| put(k, v)).collect::<Vec<_>>();
        b.commit(&[batch(o, muts(b"o")), batch(neighbour, muts(b"n"))])
            .unwrap();
        let mut clear = batch(o, vec![put(b"after", b"1")]);
        clear.clear = true;
        b.commit(&[clear]).unwrap();
        assert_eq!(all(&b, &o), vec![(b"after".to_vec(), b"1".to_vec())]);
        assert_eq!(all(&b, &neighbour).len(), keys.len());
    }

    #[test]
    fn registry_tracks_objects_with_data() {
        let dir = tempfile::tempdir().unwrap();
        conformance::registry_tracks_objects_with_data(&open(dir.path()));
    }

    #[test]
    fn list_objects_paginates_within_a_tag() {
        let dir = tempfile::tempdir().unwrap();
        conformance::list_objects_paginates_within_a_tag(&open(dir.path()));
    }

    #[test]
    fn namespaces_are_distinct_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let [x, y] = conformance::namespaces_are_distinct(&open(dir.path()));
        let b = open(dir.path());
        assert_eq!(b.namespace("y").unwrap(), y);
        assert_eq!(b.namespace("x").unwrap(), x);
        assert_eq!(b.namespace("z").unwrap().tag, 4);
    }

    #[test]
    fn namespace_tags_run_out_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let x = b.namespace("x").unwrap();
        let mut txn = b.env.begin_rw_txn().unwrap();
        let last = u32::MAX.to_be_bytes();
        txn.put(b.meta, &NEXT_TAG_KEY, &last, WriteFlags::empty())
            .unwrap();
        txn.commit().unwrap();
        assert_eq!(b.namespace("y"), Err(Error::NamespaceTagsExhausted));
        assert_eq!(b.namespace("x").unwrap(), x);
    }

    #[test]
    fn namespace_is_safe_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        conformance::namespace_is_safe_across_threads(&open(dir.path()));
    }

    #[test]
    fn newer_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let mut txn = b.env.begin_rw_txn().unwrap();
        let newer = (FORMAT_VERSION + 1).to_be_bytes();
        let flags = WriteFlags::empty();
        txn.put(b.meta, &FORMAT_VERSION_KEY, &newer, flags).unwrap();
        txn.commit().unwrap();
        drop(b);
        let err = LmdbBackend::open(dir.path(), &LmdbOptions::default()).unwrap_err();
        let want = OpenError::FormatVersion {
            found: FORMAT_VERSION + 1,
            supported: FORMAT_VERSION,
        };
        assert_eq!(err, want);
    }

    #[test]
    fn refused_dir_is_left_untouched() {
        // A future format that has only a `meta` database: opening it must not create ours.
        let dir = tempfile::tempdir().unwrap();
        let env = Environment::new().set_max_dbs(3).open(dir.path()).unwrap();
        let meta = env.create_db(Some("meta"), DatabaseFlags::empty()).unwrap();
        let mut txn = env.begin_rw_txn().unwrap();
        let newer = (FORMAT_VERSION + 1).to_be_bytes();
        let flags = WriteFlags::empty();
        txn.put(meta, &FORMAT_VERSION_KEY, &newer, flags).unwrap();
        txn.commit().unwrap();
        drop(env);
        let err = LmdbBackend::open(dir.path(), &LmdbOptions::default()).unwrap_err();
        assert!(matches!(err, OpenError::FormatVersion { .. }));
        let env = Environment::new().set_max_dbs(3).open(dir.path()).unwrap();
        assert_eq!(env.open_db(Some("kv")).unwrap_err(), lmdb::Error::NotFound);
    }

    #[test]
    fn second_open_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested/data");
        let b = open(&data);
        b.commit(&[batch(obj(1, 1), vec![put(b"k", b"v")])])
            .unwrap();
        let err = LmdbBackend::open(&data, &LmdbOptions::default()).unwrap_err();
        assert_eq!(err, OpenError::Locked(data.display().to_string()));
        // The failed open must not have disturbed the live backend.
        assert_eq!(b.get(&obj(1, 1), b"k").unwrap(), Some(b"v".to_vec()));
        drop(b);
        let b = open(&data);
        assert_eq!(b.get(&obj(1, 1), b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn map_full_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let options = LmdbOptions {
            map_bytes: 1 << 20,
            ..LmdbOptions::default()
        };
        let b = LmdbBackend::open(dir.path(), &options).unwrap();
        assert_eq!(b.map_bytes(), 1 << 20);
        let o = obj(1, 1);
        let value = vec![7u8; 20_000];
        let mut committed = 0u32;
        let err = loop {
            let muts = vec![
                put(&committed.to_be_bytes(), &value),
                put(b"marker", &committed.to_be_bytes()),
            ];
            match b.commit(&[batch(o, muts)]) {
                Ok(()) => committed += 1,
                Err(e) => break e,
            }
            assert!(committed < 1000, "1 MiB map never filled");
        };
        assert_eq!(err, Error::MapFull { map_bytes: 1 << 20 });
        assert!(committed > 10);
        // Nothing of the failed commit is visible; everything before it is.
        assert_eq!(b.get(&o, &committed.to_be_bytes()).unwrap(), None);
        assert_eq!(
            b.get(&o, b"marker").unwrap(),
            Some((committed - 1).to_be_bytes().to_vec())
        );
        assert_eq!(all(&b, &o).len() as u32, committed + 1);
        assert!(b.stat_bytes().unwrap() <= 1 << 20);
        // Deleting still commits, and makes room again: LMDB reuses the freed pages once no
        // snapshot can see them, i.e. two write transactions later.
        let deletes = (0..committed / 2).map(|i| del(&i.to_be_bytes())).collect();
        b.commit(&[batch(o, deletes)]).unwrap();
        b.commit(&[batch(o, vec![del(&(committed / 2).to_be_bytes())])])
            .unwrap();
        b.commit(&[batch(o, vec![put(b"again", &value)])]).unwrap();
        assert_eq!(b.get(&o, b"again").unwrap(), Some(value));
    }

    #[test]
    fn corrupt_bytes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let o = obj(1, 1);
        let prefix = object_prefix(&o);
        let long = long_key(b'l', 500, b"");
        let mut txn = b.env.begin_rw_txn().unwrap();
        let flags = WriteFlags::empty();
        txn.put(b.kv, &kv_address(&prefix, b"s"), &[LONG_MARKER], flags)
            .unwrap();
        txn.put(
            b.kv,
            &kv_address(&prefix, &long),
            &[LONG_MARKER, 0, 0, 0, 200, 1],
            flags,
        )
        .unwrap();
        txn.put(b.objects, &prefix, &[0, 1], flags).unwrap();
        txn.commit().unwrap();
        assert!(matches!(b.get(&o, b"s"), Err(Error::Corrupt(_))));
        assert!(matches!(b.get(&o, &long), Err(Error::Corrupt(_))));
        let (start, end) = (Bound::Unbounded, Bound::Unbounded);
        assert!(matches!(
            b.scan(&o, start, end, true, 10),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            b.list_objects(1, None, 10),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn alarms_set_replace_delete() {
        let dir = tempfile::tempdir().unwrap();
        conformance::alarms_set_replace_delete(&open(dir.path()));
        // The alarms survive a reopen.
        let b = open(dir.path());
        assert_eq!(b.next_alarms(None, 10).unwrap(), vec![(7, obj(1, 2))]);
    }

    /// A version-1 dir (the fixture: see tests/fixtures/README.md) opens, upgraded in place to
    /// this version, with its data intact, and takes alarms.
    #[test]
    fn version_1_dir_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1");
        std::fs::copy(fixture.join("data.mdb"), dir.path().join("data.mdb")).unwrap();
        let b = open(dir.path());
        let kv = b.namespace("kv").unwrap();
        let (rows, _) = b.list_objects(kv.tag, None, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name.as_deref(), Some("fixture"));
        let fixture_obj = ObjectKey {
            tag: kv.tag,
            id: rows[0].id,
        };
        let stored = b.get(&fixture_obj, b"greeting").unwrap().unwrap();
        let value = crate::storage::value::decode_raw(&stored.into()).unwrap();
        assert_eq!(value, &b"hello"[..]);
        let batch = ObjectBatch {
            alarm: AlarmWrite::Set(5),
            ..conformance::batch(fixture_obj, Vec::new())
        };
        b.commit(&[batch]).unwrap();
        drop(b);
        let b = open(dir.path());
        assert_eq!(b.alarm(&fixture_obj).unwrap(), Some(5));
        let txn = b.env.begin_ro_txn().unwrap();
        let version = get_opt(&txn, b.meta, FORMAT_VERSION_KEY).unwrap().unwrap();
        assert_eq!(decode_u32(version), Some(FORMAT_VERSION));
        // The upgrade recorded the default virtual shard count, every epoch at 1.
        let map = b.shard_map().unwrap();
        assert_eq!(map.count(), VIRTUAL_SHARDS_DEFAULT);
        assert!(map.epochs().iter().all(|&e| e == EPOCH_FIRST));
    }

    #[test]
    fn virtual_shard_mapping_is_stable() {
        conformance::virtual_shard_mapping_is_stable();
    }

    fn with_shards(count: Option<u32>) -> LmdbOptions {
        LmdbOptions {
            virtual_shards: count,
            ..LmdbOptions::default()
        }
    }

    /// The count given at creation is recorded in the dir and read back by every later open,
    /// with or without the count given again; the epochs survive a reopen too.
    #[test]
    fn virtual_shard_count_is_recorded_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let b = LmdbBackend::open(dir.path(), &with_shards(Some(16))).unwrap();
        conformance::shard_map_starts_at_1_and_raises(&b, 16);
        drop(b);
        for count in [None, Some(16)] {
            let b = LmdbBackend::open(dir.path(), &with_shards(count)).unwrap();
            let map = b.shard_map().unwrap();
            assert_eq!(map.count(), 16);
            assert_eq!(map.epoch(15), Some(3));
        }
        // A dir created without a count has the default.
        let other = tempfile::tempdir().unwrap();
        conformance::shard_map_starts_at_1_and_raises(&open(other.path()), 256);
        assert_eq!(open(other.path()).shard_map().unwrap().count(), 256);
    }

    /// An existing dir keeps its count: another explicit count is refused, naming both, and
    /// the dir is unchanged (it opens after with its own count and data).
    #[test]
    fn another_virtual_shard_count_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = LmdbBackend::open(dir.path(), &with_shards(Some(16))).unwrap();
        b.commit(&[batch(obj(1, 1), vec![put(b"k", b"v")])])
            .unwrap();
        drop(b);
        let refused = LmdbBackend::open(dir.path(), &with_shards(Some(32))).err();
        assert_eq!(
            refused,
            Some(OpenError::VirtualShardsMismatch {
                recorded: 16,
                requested: 32
            })
        );
        let b = open(dir.path());
        assert_eq!(b.shard_map().unwrap().count(), 16);
        assert_eq!(b.get(&obj(1, 1), b"k").unwrap(), Some(b"v".to_vec()));
    }

    /// Counts outside 1..=65536 are refused before the dir is even created.
    #[test]
    fn virtual_shard_counts_out_of_bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("never");
        for count in [0, VIRTUAL_SHARDS_MAX + 1] {
            assert_eq!(
                LmdbBackend::open(&path, &with_shards(Some(count))).err(),
                Some(OpenError::VirtualShardCount {
                    count,
                    max: VIRTUAL_SHARDS_MAX
                })
            );
        }
        assert!(!path.exists());
        let b = LmdbBackend::open(&path, &with_shards(Some(VIRTUAL_SHARDS_MAX))).unwrap();
        assert_eq!(b.shard_map().unwrap().count(), VIRTUAL_SHARDS_MAX);
    }

    #[test]
    fn stale_epoch_is_fenced_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        conformance::stale_epoch_is_fenced_and_writes_nothing(&open(dir.path()));
        // The raised epoch is durable: after a reopen the old epoch is still fenced.
        let b = open(dir.path());
        let x = ObjectKey {
            tag: 1,
            id: conformance::id_with_head([0, 0, 0, 7], 1),
        };
        assert!(matches!(
            b.commit(&[batch(x, vec![put(b"k", b"again")])]),
            Err(Error::Fenced { current: 2, .. })
        ));
    }

    #[test]
    fn writer_commits_the_unfenced_batches_of_a_group() {
        let dir = tempfile::tempdir().unwrap();
        conformance::writer_commits_the_unfenced_batches_of_a_group(std::sync::Arc::new(open(
            dir.path(),
        )));
    }

    #[test]
    fn dumps_round_trip() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        conformance::dumps_round_trip(&open(a.path()), &open(b.path()));
        // Across engines both ways: the dump is the engines' common language.
        let memory = crate::storage::MemoryBackend::new();
        let c = tempfile::tempdir().unwrap();
        conformance::dumps_round_trip(&memory, &open(c.path()));
    }

    /// The compacted copy opens as a data dir holding what had committed.
    #[test]
    fn backup_opens_as_a_data_dir() {
        let (dir, copy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let b = open(dir.path());
        let ns = b.namespace("n").unwrap();
        let o = obj(ns.tag, 3);
        b.commit(&[batch(o, vec![put(b"k", b"v")])]).unwrap();
        let file = std::fs::File::create(copy.path().join("data.mdb")).unwrap();
        b.backup(file).unwrap();
        b.commit(&[batch(o, vec![put(b"later", b"v")])]).unwrap();
        let restored = open(copy.path());
        assert_eq!(restored.namespace("n").unwrap(), ns);
        assert_eq!(all(&restored, &o), vec![(b"k".to_vec(), b"v".to_vec())]);
    }

    /// A version-2 dir (no virtual shards recorded) is upgraded on open: it gets the count the
    /// open asks for, every epoch at 1, and keeps it after.
    #[test]
    fn version_2_dir_records_its_count_on_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        b.commit(&[batch(obj(1, 1), vec![put(b"k", b"v")])])
            .unwrap();
        // Make it what a version-2 build left: no count, version 2.
        let mut txn = b.env.begin_rw_txn().unwrap();
        txn.del(b.meta, &VIRTUAL_SHARDS_KEY, None).unwrap();
        let two = 2u32.to_be_bytes();
        txn.put(b.meta, &FORMAT_VERSION_KEY, &two, WriteFlags::empty())
            .unwrap();
        txn.commit().unwrap();
        drop(b);
        let b = LmdbBackend::open(dir.path(), &with_shards(Some(16))).unwrap();
        assert_eq!(b.shard_map().unwrap(), ShardMap::new(vec![1; 16]).unwrap());
        assert_eq!(b.get(&obj(1, 1), b"k").unwrap(), Some(b"v".to_vec()));
        drop(b);
        assert_eq!(open(dir.path()).shard_map().unwrap().count(), 16);
    }
}
