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
//! - While a transaction or `sync` is in progress, no other event is delivered to the object
//!   (the input gate). The other calls never wait on I/O other than the memory-mapped read of a
//!   key that is not cached, so nothing interleaves with them either.
//!
//! Layers, from the object down: [`Storage`] (the API and its limits) → `store` (cache, dirty
//! writes, flushes) → `writer` (one thread, group commit) → [`Backend`] ([`LmdbBackend`];
//! [`MemoryBackend`] for tests without a disk).

mod backend;
#[cfg(test)]
mod conformance;
mod error;
mod fault;
#[cfg(test)]
mod harness;
mod keys;
mod lmdb;
mod memory;
mod store;
mod txn;
pub mod value;
mod writer;

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Bound;
use std::rc::Rc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use backend::{Backend, Entry, NamespaceRecord, ObjectBatch, ObjectKey, ObjectRecord};
pub use error::{Error, OpenError};
pub use fault::FaultyBackend;
pub use lmdb::{FORMAT_VERSION, LmdbBackend, LmdbOptions};
pub use memory::MemoryBackend;
pub(crate) use store::{ObjectStore, Shared};
pub use txn::{ATTEMPTS_MAX, Transaction};
pub(crate) use writer::Writer;
pub use writer::WriterStats;

use crate::gate::{self, InputGate};

/// Limits on what one call may store. Past a limit a call fails with an error naming it, and
/// writes nothing.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest key, in bytes (default 2048, as the hosted service).
    pub key_bytes_max: usize,
    /// Largest value, in bytes of its encoded payload (default 32 KiB, as the hosted service).
    pub value_bytes_max: usize,
    /// Most keys in one batched call (default 128, as the hosted service).
    pub batch_keys_max: usize,
    /// Memory the cache of one object may use before clean entries are evicted (default 8 MiB).
    /// Entries with writes not yet durable are never evicted.
    pub cache_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            key_bytes_max: 2048,
            value_bytes_max: 32 * 1024,
            batch_keys_max: 128,
            cache_bytes_max: 8 << 20,
        }
    }
}

/// A key range as (start, end) bounds, and a limit.
pub(crate) type Range = (Bound<Vec<u8>>, Bound<Vec<u8>>, usize);

/// Options of [`Storage::list`]. The range is `start`/`start_after` (lower bound) to `end`
/// (exclusive upper bound), intersected with `prefix`.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// Keys `>= start`.
    pub start: Option<Vec<u8>>,
    /// Keys `> start_after` (not together with `start`).
    pub start_after: Option<Vec<u8>>,
    /// Keys `< end`.
    pub end: Option<Vec<u8>>,
    /// Keys that begin with `prefix`.
    pub prefix: Option<Vec<u8>>,
    /// Descending order (the same range).
    pub reverse: bool,
    /// At most this many entries (`Some(0)` is refused).
    pub limit: Option<usize>,
}

impl ListOptions {
    /// The range as (start, end) bounds.
    pub(crate) fn bounds(&self) -> Result<Range, Error> {
        if self.start.is_some() && self.start_after.is_some() {
            return Err(Error::InvalidList(
                "start and start_after cannot both be set",
            ));
        }
        if self.limit == Some(0) {
            return Err(Error::InvalidList("limit must be at least 1"));
        }
        let mut start = match (&self.start, &self.start_after) {
            (Some(key), _) => Bound::Included(key.clone()),
            (_, Some(key)) => Bound::Excluded(key.clone()),
            _ => Bound::Unbounded,
        };
        let mut end = self.end.clone().map_or(Bound::Unbounded, Bound::Excluded);
        if let Some(prefix) = &self.prefix {
            if lower_is_below(&start, prefix) {
                start = Bound::Included(prefix.clone());
            }
            if let Some(next) = keys::successor(prefix)
                && upper_is_above(&end, &next)
            {
                end = Bound::Excluded(next);
            }
        }
        Ok((start, end, self.limit.unwrap_or(usize::MAX)))
    }
}

fn lower_is_below(bound: &Bound<Vec<u8>>, key: &[u8]) -> bool {
    match bound {
        Bound::Unbounded => true,
        Bound::Included(b) | Bound::Excluded(b) => b.as_slice() < key,
    }
}

fn upper_is_above(bound: &Bound<Vec<u8>>, key: &[u8]) -> bool {
    match bound {
        Bound::Unbounded => true,
        Bound::Included(b) | Bound::Excluded(b) => b.as_slice() > key,
    }
}

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

    pub(crate) fn check_key(&self, key: &[u8]) -> Result<(), Error> {
        let max = self.store.limits().key_bytes_max;
        if key.len() > max {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max,
            });
        }
        Ok(())
    }

    pub(crate) fn check_value(&self, encoded: &[u8]) -> Result<(), Error> {
        let max = self.store.limits().value_bytes_max;
        let len = value::payload_len(encoded);
        if len > max {
            return Err(Error::ValueTooLarge { len, max });
        }
        Ok(())
    }

    fn check_count(&self, count: usize) -> Result<(), Error> {
        let max = self.store.limits().batch_keys_max;
        if count > max {
            return Err(Error::TooManyKeys { count, max });
        }
        Ok(())
    }

    /// The encoded value of `key`.
    pub(crate) fn get_encoded(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        self.check_key(key)?;
        self.store.get(key)
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
        for (key, value) in &entries {
            self.check_key(key)?;
            self.check_value(value)?;
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

    fn delete_encoded(&self, keys: &[&[u8]]) -> Result<usize, Error> {
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

    /// Deletes every key of the object. The object leaves `listObjects` once this is durable.
    pub async fn delete_all(&self) -> Result<(), Error> {
        self.store.delete_all()
    }

    /// Resolves once every write made before the call is durable.
    pub async fn sync(&self) -> Result<(), Error> {
        let seq = self.store.written_seq();
        let task = gate::current_task().unwrap_or_else(gate::next_task_id);
        let _lock = self.gate.lock(task).await;
        self.store.wait_durable(seq).await
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
        let task = gate::current_task().unwrap_or_else(gate::next_task_id);
        let _lock = self.gate.lock(task).await;
        for _ in 0..txn::ATTEMPTS_MAX {
            let txn = Transaction::begin(self.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_bounds_follow_the_rules() {
        let opts = |f: fn(&mut ListOptions)| {
            let mut o = ListOptions::default();
            f(&mut o);
            o.bounds()
        };
        assert!(matches!(
            opts(|o| {
                o.start = Some(b"a".to_vec());
                o.start_after = Some(b"b".to_vec());
            }),
            Err(Error::InvalidList(_))
        ));
        assert!(matches!(
            opts(|o| o.limit = Some(0)),
            Err(Error::InvalidList(_))
        ));
        let (start, end, _) = opts(|o| o.prefix = Some(b"ab".to_vec())).unwrap();
        assert_eq!(start, Bound::Included(b"ab".to_vec()));
        assert_eq!(end, Bound::Excluded(b"ac".to_vec()));
        let (start, end, _) = opts(|o| {
            o.prefix = Some(b"a\xff".to_vec());
            o.start_after = Some(b"a\xff1".to_vec());
        })
        .unwrap();
        assert_eq!(start, Bound::Excluded(b"a\xff1".to_vec()));
        assert_eq!(end, Bound::Excluded(b"b".to_vec()));
    }
}
