//! Fault injection: a [`Backend`] that wraps another and fails or holds commits on demand, to
//! test what objects and users see when the disk fails or is slow. Public as
//! `duro::testing::FaultyBackend`.

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::Error;
use super::backend::{
    AlarmEntry, Backend, DumpItem, Entry, ImportReport, NamespaceRecord, ObjectBatch, ObjectKey,
    ObjectRecord,
};
use super::shards::ShardMap;

/// A backend that passes everything to another and fails commits on demand, to test what
/// users see when the disk fails.
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    /// The error the next commits fail with, and how many more will fail.
    fault: Mutex<Option<(Error, u64)>>,
    commits: AtomicU64,
    /// While true, commits wait before writing (to observe what waits on durability).
    held: Mutex<bool>,
    released: Condvar,
}

impl FaultyBackend {
    /// Wraps `inner`; no faults until [`FaultyBackend::fail_commits`].
    pub fn new(inner: Arc<dyn Backend>) -> Arc<FaultyBackend> {
        Arc::new(FaultyBackend {
            inner,
            fault: Mutex::new(None),
            commits: AtomicU64::new(0),
            held: Mutex::new(false),
            released: Condvar::new(),
        })
    }

    /// Makes the next `count` commits fail with `error`, writing nothing.
    pub fn fail_commits(&self, error: Error, count: u64) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some((error, count));
    }

    /// Makes commits wait (after counting them) until [`FaultyBackend::release`].
    pub fn hold(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Lets held and later commits proceed.
    pub fn release(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.released.notify_all();
    }

    /// Commits attempted so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }
}

impl Backend for FaultyBackend {
    fn get(&self, object: &ObjectKey, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.inner.get(object, key)
    }

    fn scan(
        &self,
        object: &ObjectKey,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>, Error> {
        self.inner.scan(object, start, end, reverse, limit)
    }

    fn commit(&self, batches: &[ObjectBatch]) -> Result<(), Error> {
        self.commit_timed(batches).map(drop)
    }

    fn commit_timed(&self, batches: &[ObjectBatch]) -> Result<Option<Duration>, Error> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        drop(held);
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((error, remaining)) = fault.as_mut() {
            let error = error.clone();
            *remaining -= 1;
            if *remaining == 0 {
                *fault = None;
            }
            return Err(error);
        }
        drop(fault);
        self.inner.commit_timed(batches)
    }

    fn list_objects(
        &self,
        tag: u32,
        start_after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<(Vec<ObjectRecord>, bool), Error> {
        self.inner.list_objects(tag, start_after, limit)
    }

    fn alarm(&self, object: &ObjectKey) -> Result<Option<u64>, Error> {
        self.inner.alarm(object)
    }

    fn next_alarms(
        &self,
        after: Option<AlarmEntry>,
        limit: usize,
    ) -> Result<Vec<AlarmEntry>, Error> {
        self.inner.next_alarms(after, limit)
    }

    fn namespace(&self, name: &str) -> Result<NamespaceRecord, Error> {
        self.inner.namespace(name)
    }

    fn shard_map(&self) -> Result<ShardMap, Error> {
        self.inner.shard_map()
    }

    fn raise_epoch(&self, virtual_shard: u32) -> Result<u64, Error> {
        self.inner.raise_epoch(virtual_shard)
    }

    fn export(
        &self,
        namespaces: &[String],
        visit: &mut dyn FnMut(DumpItem) -> bool,
    ) -> Result<(), Error> {
        self.inner.export(namespaces, visit)
    }

    fn import(
        &self,
        items: &mut dyn Iterator<Item = Result<DumpItem, Error>>,
        overwrite: bool,
    ) -> Result<ImportReport, Error> {
        self.inner.import(items, overwrite)
    }

    fn backup(&self, out: std::fs::File) -> Result<(), Error> {
        self.inner.backup(out)
    }

    fn remote_reads(&self) -> bool {
        self.inner.remote_reads()
    }
}
