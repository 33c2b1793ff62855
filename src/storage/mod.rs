//! `state.storage`: each object's transactional key-value storage.
//!
//! Keys are byte strings (a `&str` works too) ordered by bytes; values are serde values or raw
//! bytes (see [`value`] for the encoding, which is the on-disk format).
//!
//! Guarantees (see also the crate docs):
//! - Every method is atomic and isolated on its own, the batched ones too.
//! - Reads see the object's own writes at once, from a per-object cache.
//! - Writes made with no await between them commit together, atomically.
//! - The object's responses are held until every write made before them is durable (the output
//!   gate), so an acknowledged write is never lost.
//! - An object's one alarm ([`Storage::set_alarm`]) is written like a key: it joins the batch
//!   of its turn, and the output gate waits for it. The backend keeps a time-ordered index of
//!   every object's alarm ([`Backend::next_alarms`]) for the host's scheduler.
//! - While a transaction or `sync` is in progress, no other event is delivered to the object
//!   (the input gate). The other calls never wait on I/O other than the memory-mapped read of a
//!   key that is not cached, so nothing interleaves with them either.
//!
//! - Every object belongs to a virtual shard ([`virtual_shard`], a count fixed in the data dir),
//!   and every batch carries the ownership epoch of its shard that the host opened with; a
//!   commit refuses a batch whose shard's epoch moved on ([`Error::Fenced`]), and the object is
//!   reset as after any failed commit (see [`shards`]).
//!
//! Layers, from the object down: [`Storage`] (the API and its limits) → `store` (cache, dirty
//! writes, flushes) → `writer` (one thread, group commit) → [`Backend`] ([`LmdbBackend`];
//! [`MemoryBackend`] for tests without a disk).

mod backend;
pub mod cluster;
#[cfg(test)]
mod conformance;
mod dump;
mod error;
mod fault;
#[cfg(test)]
mod harness;
mod keys;
pub mod lines;
mod lmdb;
mod memory;
mod options;
mod postgres;
pub mod shards;
mod store;
mod txn;
pub mod value;
mod writer;

use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use backend::{
    AlarmEntry, AlarmWrite, Backend, DumpItem, Entry, ImportReport, NamespaceRecord, ObjectBatch,
    ObjectKey, ObjectRecord,
};
pub use error::{Error, OpenError};
pub use fault::FaultyBackend;
pub(crate) use keys::successor;
pub use lmdb::{FORMAT_VERSION, LmdbBackend, LmdbOptions};
pub use memory::MemoryBackend;
pub use options::{Limits, ListOptions};
pub use postgres::cluster::{ClusterView, LeaseRow, NodeRow};
pub use postgres::{PostgresBackend, PostgresOptions};
pub use shards::{ShardMap, VIRTUAL_SHARDS_DEFAULT, VIRTUAL_SHARDS_MAX, virtual_shard};
pub(crate) use store::{ObjectStore, PRELOAD_KEYS_MAX, Shared};
pub(crate) use txn::Outcome;
pub use txn::{ATTEMPTS_MAX, Transaction};
pub use writer::WriterStats;
pub(crate) use writer::{Writer, WriterHandle};

use crate::gate::{self, InputGate};

/// The storage of one object. Cheap to clone; every clone is the same storage.
#[derive(Clone)]
pub struct Storage {
    store: Rc<ObjectStore>,
    gate: Rc<InputGate>,
}

impl Storage {
    pub(crate) fn new(store: Rc<ObjectStore>, gate: Rc<InputGate>) -> Storage {
        Storage { store, gate }
    }

    pub(crate) fn store(&self) -> &Rc<ObjectStore> {
        &self.store
    }

    /// The object's input gate, which its storage calls hold.
    pub(crate) fn gate(&self) -> &Rc<InputGate> {
        &self.gate
    }

    pub(crate) fn check_count(&self, count: usize) -> Result<(), Error> {
        self.store.limits().check_count(count)
    }

    /// The encoded value of `key`.
    pub(crate) fn get_encoded(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        self.store.get_checked(key)
    }

    /// The value stored under `key`, decoded as `T`; `None` if there is none.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<T>, Error> {
        match self.get_encoded(key.as_ref())? {
            Some(stored) => value::decode(&stored).map(Some),
            None => Ok(None),
        }
    }

    /// The raw bytes stored under `key` with [`Storage::put_bytes`].
    pub async fn get_bytes(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, Error> {
        match self.get_encoded(key.as_ref())? {
            Some(stored) => value::decode_raw(&stored).map(Some),
            None => Ok(None),
        }
    }

    /// The values of the keys found (at most `batch_keys_max` keys); missing keys are left out.
    pub async fn get_many<K: AsRef<[u8]>, T: DeserializeOwned>(
        &self,
        keys: &[K],
    ) -> Result<BTreeMap<Vec<u8>, T>, Error> {
        self.check_count(keys.len())?;
        let mut found = BTreeMap::new();
        for key in keys {
            if let Some(stored) = self.get_encoded(key.as_ref())? {
                found.insert(key.as_ref().to_vec(), value::decode(&stored)?);
            }
        }
        Ok(found)
    }

    /// Stores `value` under `key`.
    pub async fn put<T: Serialize + ?Sized>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<(), Error> {
        let encoded = value::encode(value)?;
        self.put_encoded(vec![(key.as_ref().to_vec(), encoded)])
    }

    /// Stores raw bytes under `key`.
    pub async fn put_bytes(&self, key: impl AsRef<[u8]>, value: &[u8]) -> Result<(), Error> {
        self.put_encoded(vec![(key.as_ref().to_vec(), value::encode_raw(value))])
    }

    /// Stores every entry (at most `batch_keys_max`), atomically.
    pub async fn put_many<K: AsRef<[u8]>, T: Serialize>(
        &self,
        entries: &[(K, T)],
    ) -> Result<(), Error> {
        self.check_count(entries.len())?;
        let encoded = entries
            .iter()
            .map(|(k, v)| Ok((k.as_ref().to_vec(), value::encode(v)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        self.put_encoded(encoded)
    }

    pub(crate) fn put_encoded(&self, entries: Vec<(Vec<u8>, Bytes)>) -> Result<(), Error> {
        let limits = self.store.limits();
        for (key, value) in &entries {
            limits.check_key(key)?;
            limits.check_value(value)?;
        }
        self.store
            .write(entries.into_iter().map(|(k, v)| (k, Some(v))).collect())
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        Ok(self.delete_encoded(&[key.as_ref()])? == 1)
    }

    /// Deletes every key (at most `batch_keys_max`), atomically; how many existed.
    pub async fn delete_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<usize, Error> {
        self.check_count(keys.len())?;
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        self.delete_encoded(&keys)
    }

    /// Deletes every key, atomically; how many existed.
    pub(crate) fn delete_encoded(&self, keys: &[&[u8]]) -> Result<usize, Error> {
        let mut existed = 0;
        let mut counted = std::collections::BTreeSet::new();
        for key in keys {
            // A key given twice existed once.
            if counted.insert(*key) {
                existed += usize::from(self.get_encoded(key)?.is_some());
            }
        }
        self.store
            .write(keys.iter().map(|k| (k.to_vec(), None)).collect())?;
        Ok(existed)
    }

    /// Entries in key order (see [`ListOptions`]), decoded as `T`.
    pub async fn list<T: DeserializeOwned>(
        &self,
        options: &ListOptions,
    ) -> Result<Vec<(Vec<u8>, T)>, Error> {
        value::decode_entries(self.list_encoded(options)?)
    }

    /// Entries in key order with their encoded values (see [`value`]).
    pub fn list_encoded(&self, options: &ListOptions) -> Result<Vec<(Vec<u8>, Bytes)>, Error> {
        let (start, end, limit) = options.bounds()?;
        self.store.range(start, end, options.reverse, limit)
    }

    /// Deletes every key of the object, and its alarm. The object leaves `listObjects` once
    /// this is durable.
    pub async fn delete_all(&self) -> Result<(), Error> {
        self.store.delete_all()
    }

    /// The object's alarm, in milliseconds since the Unix epoch, if it has one. Inside
    /// `alarm()`, the alarm being delivered is not shown: only one the handler set anew.
    pub async fn get_alarm(&self) -> Result<Option<u64>, Error> {
        self.store.alarm()
    }

    /// Sets or replaces the object's one alarm, to fire at `at_ms` (milliseconds since the
    /// Unix epoch) or later; a time in the past fires as soon as possible. A storage write:
    /// it commits with the other writes of the turn, and the output gate waits for it.
    pub async fn set_alarm(&self, at_ms: u64) -> Result<(), Error> {
        self.store.write_alarm(Some(at_ms))
    }

    /// [`Storage::set_alarm`] at a [`SystemTime`](std::time::SystemTime).
    pub async fn set_alarm_at(&self, at: std::time::SystemTime) -> Result<(), Error> {
        self.store
            .write_alarm(Some(crate::clock::system_time_ms(at)))
    }

    /// Deletes the object's alarm, if any; inside `alarm()`, this also stops its retries.
    pub async fn delete_alarm(&self) -> Result<(), Error> {
        self.store.write_alarm(None)
    }

    /// Resolves once every write made before the call is durable.
    pub async fn sync(&self) -> Result<(), Error> {
        let seq = self.store.written_seq();
        let _lock = self.hold_gate().await;
        self.store.wait_durable(seq).await
    }

    /// Closes the input gate for the current task (the handler that made the call) once it
    /// is open for it; it stays closed until the returned lock is dropped. (Awaiting the
    /// lock itself would drop it at once: the lock is the future.)
    async fn hold_gate(&self) -> gate::Lock {
        let task = gate::current_task().unwrap_or_else(gate::next_task_id);
        let mut lock = self.gate.lock(task);
        (&mut lock).await;
        lock
    }

    /// Runs `body` as one transaction: its writes commit together or not at all.
    ///
    /// `body` gets a [`Transaction`] with get/put/delete/list and `rollback()`. If it returns
    /// an error, or called `rollback()`, nothing it wrote is stored. While it runs, the input
    /// gate is held, so no other event of the object interleaves. If a write outside the
    /// transaction (from a task the object spawned) lands while it runs, it is retried from the
    /// start, at most [`ATTEMPTS_MAX`] times, then fails with [`Error::Conflict`]: so
    /// effects of `body` outside storage may happen more than once.
    pub async fn transaction<T, E, F, Fut>(&self, mut body: F) -> Result<T, E>
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        let _lock = self.hold_gate().await;
        for _ in 0..txn::ATTEMPTS_MAX {
            let txn = Transaction::begin(self.store.clone());
            let result = body(txn.clone()).await;
            match txn.finish(result.is_ok())? {
                txn::Outcome::Done => return result,
                txn::Outcome::Conflict => continue,
            }
        }
        Err(Error::Conflict {
            attempts: txn::ATTEMPTS_MAX,
        }
        .into())
    }
}
