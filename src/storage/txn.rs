//! Transactions: writes buffered in the transaction, laid over the object's storage for its
//! reads, and applied as one atomic group when the body succeeds.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::keys::{as_ref, range_is_empty};
use super::store::ObjectStore;
use super::store::merge_range;
use super::{Error, ListOptions, value};

/// How many times a transaction body runs before it gives up on conflicts. Conflicts need a
/// write from outside the transaction while it runs, which the input gate rules out for the
/// object's own calls; only tasks the object spawned can cause one.
pub const ATTEMPTS_MAX: u32 = 8;

/// A transaction in progress, handed to the body of [`super::Storage::transaction`]. Cheap
/// to clone.
#[derive(Clone)]
pub struct Transaction {
    inner: Rc<Inner>,
}

struct Inner {
    /// The storage of the object the transaction is of.
    store: Rc<ObjectStore>,
    /// Buffered writes (`None` deletes), applied together at the end.
    writes: RefCell<BTreeMap<Vec<u8>, Option<Bytes>>>,
    /// Set by `rollback()` or when the body finished: later calls fail.
    ended: Cell<bool>,
    rolled_back: Cell<bool>,
    /// The store's write counter when the transaction began; a change means a conflict.
    mutations_at_start: u64,
}

pub(crate) enum Outcome {
    Done,
    Conflict,
}

impl Transaction {
    pub(crate) fn begin(store: Rc<ObjectStore>) -> Transaction {
        let mutations_at_start = store.mutations.get();
        let inner = Inner {
            store,
            writes: RefCell::default(),
            ended: Cell::new(false),
            rolled_back: Cell::new(false),
            mutations_at_start,
        };
        Transaction {
            inner: Rc::new(inner),
        }
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.ended.get() {
            return Err(Error::TransactionEnded);
        }
        Ok(())
    }

    pub(crate) fn get_encoded(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        self.check_open()?;
        if let Some(value) = self.inner.writes.borrow().get(key) {
            return Ok(value.clone());
        }
        self.inner.store.get_checked(key)
    }

    /// The value of `key` as the transaction sees it.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<T>, Error> {
        match self.get_encoded(key.as_ref())? {
            Some(stored) => value::decode(&stored).map(Some),
            None => Ok(None),
        }
    }

    /// The raw bytes of `key` as the transaction sees them.
    pub async fn get_bytes(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, Error> {
        match self.get_encoded(key.as_ref())? {
            Some(stored) => value::decode_raw(&stored).map(Some),
            None => Ok(None),
        }
    }

    fn write(&self, key: &[u8], value: Option<Bytes>) -> Result<(), Error> {
        self.check_open()?;
        self.inner.store.limits().check_key(key)?;
        if let Some(value) = &value {
            self.inner.store.limits().check_value(value)?;
        }
        self.inner.writes.borrow_mut().insert(key.to_vec(), value);
        Ok(())
    }

    /// Stores `value` under `key` when the transaction commits.
    pub async fn put<T: Serialize + ?Sized>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<(), Error> {
        self.write(key.as_ref(), Some(value::encode(value)?))
    }

    /// Stores raw bytes under `key` when the transaction commits.
    pub async fn put_bytes(&self, key: impl AsRef<[u8]>, value: &[u8]) -> Result<(), Error> {
        self.write(key.as_ref(), Some(value::encode_raw(value)))
    }

    /// Deletes `key` when the transaction commits; whether it exists now.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        let existed = self.get_encoded(key.as_ref())?.is_some();
        self.write(key.as_ref(), None)?;
        Ok(existed)
    }

    /// Entries as the transaction sees them (see [`ListOptions`]).
    pub async fn list<T: DeserializeOwned>(
        &self,
        options: &ListOptions,
    ) -> Result<Vec<(Vec<u8>, T)>, Error> {
        value::decode_entries(self.list_encoded(options)?)
    }

    /// Entries with their encoded values, as the transaction sees them.
    pub fn list_encoded(&self, options: &ListOptions) -> Result<Vec<(Vec<u8>, Bytes)>, Error> {
        self.check_open()?;
        let (start, end, limit) = options.bounds()?;
        let reverse = options.reverse;
        let store = &self.inner.store;
        let writes = self.inner.writes.borrow();
        merge_range(
            start,
            end,
            reverse,
            limit,
            |from, to, n| store.range(from.clone(), to.clone(), reverse, n),
            |from, to| {
                if range_is_empty(as_ref(from), as_ref(to)) {
                    return Vec::new();
                }
                let range = writes.range::<Vec<u8>, _>((from.clone(), to.clone()));
                let entries = range.map(|(k, v)| (k.clone(), v.clone()));
                if reverse {
                    entries.rev().collect()
                } else {
                    entries.collect()
                }
            },
        )
    }

    /// Abandons the transaction: nothing it wrote is stored, and later calls on it fail.
    pub fn rollback(&self) {
        self.inner.rolled_back.set(true);
        self.inner.ended.set(true);
    }

    /// Ends the transaction, applying its writes if `commit` and it was not rolled back.
    pub(crate) fn finish(&self, commit: bool) -> Result<Outcome, Error> {
        let inner = &self.inner;
        let rolled_back = inner.rolled_back.get();
        inner.ended.set(true);
        if !commit || rolled_back {
            return Ok(Outcome::Done);
        }
        let store = &inner.store;
        if store.mutations.get() != inner.mutations_at_start {
            return Ok(Outcome::Conflict);
        }
        let writes = std::mem::take(&mut *inner.writes.borrow_mut());
        store.write(writes.into_iter().collect())?;
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::storage::harness::{Harness, run};
    use crate::storage::memory::MemoryBackend;
    use crate::storage::{Limits, Transaction};

    fn harness() -> Harness {
        Harness::new(MemoryBackend::new(), Limits::default())
    }

    #[test]
    fn reads_see_own_buffered_writes() {
        let h = harness();
        run(async {
            let storage = h.storage(1);
            storage.put("x", &1).await.unwrap();
            storage.put("y", &2).await.unwrap();
            let txn = Transaction::begin(storage.store().clone());
            txn.put("a", &10).await.unwrap();
            txn.put("y", &20).await.unwrap();
            assert!(txn.delete("x").await.unwrap());
            assert_eq!(txn.get::<i32>("a").await.unwrap(), Some(10));
            assert_eq!(txn.get::<i32>("x").await.unwrap(), None);
            let listed: Vec<(Vec<u8>, i32)> = txn.list(&ListOptions::default()).await.unwrap();
            assert_eq!(listed, vec![(b"a".to_vec(), 10), (b"y".to_vec(), 20)]);
            let reversed = ListOptions {
                reverse: true,
                limit: Some(1),
                ..ListOptions::default()
            };
            let last: Vec<(Vec<u8>, i32)> = txn.list(&reversed).await.unwrap();
            assert_eq!(last, vec![(b"y".to_vec(), 20)]);
            // Outside the transaction nothing changed yet.
            assert_eq!(storage.get::<i32>("a").await.unwrap(), None);
            assert_eq!(storage.get::<i32>("x").await.unwrap(), Some(1));
            assert!(matches!(txn.finish(true), Ok(Outcome::Done)));
            assert_eq!(storage.get::<i32>("a").await.unwrap(), Some(10));
            assert_eq!(storage.get::<i32>("x").await.unwrap(), None);
            assert_eq!(storage.get::<i32>("y").await.unwrap(), Some(20));
            // An ended transaction refuses further calls.
            assert_eq!(txn.get::<i32>("a").await, Err(Error::TransactionEnded));
        });
    }

    #[test]
    fn rollback_and_failure_store_nothing() {
        let h = harness();
        run(async {
            let storage = h.storage(1);
            let rolled_back = storage
                .transaction(|txn| async move {
                    txn.put("a", &1).await?;
                    txn.rollback();
                    assert_eq!(txn.put("b", &2).await, Err(Error::TransactionEnded));
                    Ok::<_, Error>("body result")
                })
                .await;
            assert_eq!(rolled_back, Ok("body result"));
            let failed = storage
                .transaction(|txn| async move {
                    txn.put("c", &3).await?;
                    Err::<(), _>(Error::Io("the body failed".into()))
                })
                .await;
            assert_eq!(failed, Err(Error::Io("the body failed".into())));
            for key in ["a", "b", "c"] {
                assert_eq!(storage.get::<i32>(key).await.unwrap(), None);
            }
            assert_eq!(storage.store().written_seq(), 0);
        });
    }

    #[test]
    fn a_write_from_outside_is_a_conflict() {
        let h = harness();
        run(async {
            let storage = h.storage(1);
            let txn = Transaction::begin(storage.store().clone());
            txn.put("k", &1).await.unwrap();
            storage.put("outside", &1).await.unwrap();
            assert!(matches!(txn.finish(true), Ok(Outcome::Conflict)));
            assert_eq!(storage.get::<i32>("k").await.unwrap(), None);
            // `transaction` retries the body, and gives up if every attempt conflicts.
            let attempts = Cell::new(0);
            let result = storage
                .transaction(|txn| {
                    let storage = storage.clone();
                    let attempts = &attempts;
                    async move {
                        attempts.set(attempts.get() + 1);
                        txn.put("k", &2).await?;
                        storage.put("outside", &attempts.get()).await?;
                        Ok::<_, Error>(())
                    }
                })
                .await;
            let gave_up = Error::Conflict {
                attempts: ATTEMPTS_MAX,
            };
            assert_eq!(result, Err(gave_up));
            assert_eq!(attempts.get(), ATTEMPTS_MAX);
            assert_eq!(storage.get::<i32>("k").await.unwrap(), None);
            // Without an outside write, it commits at the first attempt.
            let once = storage
                .transaction(|txn| async move { txn.put("k", &3).await })
                .await;
            assert_eq!(once, Ok(()));
            assert_eq!(storage.get::<i32>("k").await.unwrap(), Some(3));
        });
    }
}
