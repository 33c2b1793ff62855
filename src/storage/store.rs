//! One object's storage state: its cache, its unflushed writes, and its flushes.
//!
//! - Reads see the object's own writes at once: every write lands in the cache, and a key with a
//!   write not yet durable is never evicted, so it is never read from the backend.
//! - Writes are grouped: all writes made before the flush task runs (at least those with no
//!   pending await between them, and with an idle writer those of every call the event loop
//!   ran meanwhile; see [`flush_group`]) go to the writer as one atomic batch. One batch is in
//!   flight per object at a time; writes made meanwhile form the next batch. So batches commit
//!   in order, and a failed batch never has a successor committed after it.
//! - `written_seq` numbers write operations; `durable_seq` is the newest one known durable. The
//!   output gate waits for `durable_seq >= written_seq` as it was when the response was made.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use bytes::Bytes;

use super::Error;
use super::backend::{AlarmWrite, Backend, ObjectBatch, ObjectKey};
use super::cluster::Ownership;
use super::keys::{as_ref, range_is_empty};
use super::options::Limits;
use super::shards::ShardMap;
use super::writer::WriterHandle;

/// Most keys an object may have for [`ObjectStore::preload`] to load it whole; a larger one
/// reads what it misses from the backend, as with LMDB.
pub(crate) const PRELOAD_KEYS_MAX: usize = 10_000;

/// How many entries a `list` reads from the backend at a time.
const SCAN_CHUNK: usize = 256;
/// Bookkeeping bytes counted per cache entry besides key and value.
const CACHE_ENTRY_OVERHEAD: usize = 48;

/// What an object's storage shares with every other: the backend, the writer, the limits.
pub(crate) struct Shared {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) writer: WriterHandle,
    pub(crate) limits: Limits,
    /// The virtual shards and the epoch of each this host writes under, read from the backend
    /// when the host opened: every batch carries its shard's epoch from here, and the backend
    /// refuses it once the shard's stored epoch moved on (see `storage::shards`).
    pub(crate) shards: ShardMap,
    /// In a cluster, the virtual shards this node owns and their epochs now: an object
    /// activated here writes under the epoch its shard had then (not the opening map's).
    pub(crate) cluster: Option<Arc<Ownership>>,
    /// Objects with writes to flush at the end of this turn of the event loop; their batches
    /// go to the writer together, as one group (each batch answered on its own).
    pub(crate) pending: RefCell<Vec<Rc<ObjectStore>>>,
    /// Told of every committed change of an object's alarm (its new alarm, or none): the
    /// host's alarm scheduler, once it runs.
    pub(crate) on_alarm: RefCell<Option<AlarmListener>>,
}

/// Hears of committed alarm changes: (object, its alarm now).
pub(crate) type AlarmListener = Rc<dyn Fn(ObjectKey, Option<u64>)>;

impl Shared {
    /// The shared state over `backend`, whose shard map it reads now.
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        writer: WriterHandle,
        limits: Limits,
    ) -> Result<Shared, Error> {
        let shards = backend.shard_map()?;
        Ok(Shared {
            backend,
            writer,
            limits,
            shards,
            cluster: None,
            pending: RefCell::default(),
            on_alarm: RefCell::default(),
        })
    }

    pub(crate) fn alarm_committed(&self, object: ObjectKey, alarm: Option<u64>) {
        let listener = self.on_alarm.borrow().clone();
        if let Some(listener) = listener {
            listener(object, alarm);
        }
    }

    /// Queues `store` for the next group, starting a flush task if none is waiting to run.
    fn schedule(self: &Rc<Self>, store: Rc<ObjectStore>) {
        let mut pending = self.pending.borrow_mut();
        if pending.is_empty() {
            // Runs once the current task yields: every write made before that joins the group.
            tokio::task::spawn_local(flush_group(self.clone()));
        }
        pending.push(store);
    }
}

/// Hands the batches of every pending object to the writer as one group, then settles each.
///
/// When the writer is idle, the group would start a commit at once: it first lets the event
/// loop run what is ready and read what arrived (one deferred yield: one more pass of the loop,
/// which polls the sockets without waiting), so that the writes of calls that arrived together
/// share the commit rather than each paying for one. When the writer is at work, the group
/// waits for it anyway, and joins its next commit with whatever else is queued by then: it
/// goes at once, not to miss that one.
async fn flush_group(shared: Rc<Shared>) {
    if !shared.writer.is_committing() {
        tokio::task::yield_now().await;
    }
    let stores = std::mem::take(&mut *shared.pending.borrow_mut());
    let mut group = Vec::with_capacity(stores.len());
    let mut batches = Vec::with_capacity(stores.len());
    for store in stores {
        if let Some((batch, seq)) = store.take_batch() {
            // The alarm the object has once this batch commits, if the batch changes it.
            let alarm = (batch.clear || batch.alarm != AlarmWrite::Keep)
                .then(|| batch.alarm.apply(None, batch.clear));
            batches.push(batch);
            group.push((store, seq, alarm));
        }
    }
    if batches.is_empty() {
        return;
    }
    // One answer per batch, in order: each store settles with its own.
    let answers = shared.writer.submit(batches).await.unwrap_or_default();
    // The calls that waited for these writes are answered now, over the next passes.
    crate::wire::cork::settled();
    let mut answers = answers.into_iter();
    for (store, seq, alarm) in group {
        // A missing answer means the writer stopped before settling it.
        match answers.next().unwrap_or(Err(Error::Closed)) {
            Ok(()) => {
                if let Some(alarm) = alarm {
                    shared.alarm_committed(store.key, alarm);
                }
                store.committed(seq);
            }
            Err(error) => store.commit_failed(error),
        }
    }
}

struct Cached {
    /// `None`: known to be absent.
    value: Option<Bytes>,
    /// The write that put this entry here; 0 for an entry read from the backend. The entry is
    /// clean (and evictable) once `seq <= durable_seq`.
    seq: u64,
}

#[derive(Default)]
struct State {
    /// Keys boxed, not `Vec`s: 8 bytes less a key, in each of a B-tree node's 11 slots (a node
    /// is allocated whole, and an idle object of a few keys holds one).
    cache: BTreeMap<Box<[u8]>, Cached>,
    cached_bytes: usize,
    /// Writes not yet handed to the writer, latest per key, applied after `clear_pending`.
    dirty: BTreeMap<Vec<u8>, Option<Bytes>>,
    /// A `delete_all` not yet handed to the writer.
    clear_pending: bool,
    /// The alarm change not yet handed to the writer (applied after `clear_pending`).
    alarm_dirty: AlarmWrite,
    /// The alarm as the object sees it, its own writes included; `None` until first read.
    alarm: Option<Option<u64>>,
    /// The alarm being delivered to the object, until its handler is done or the object
    /// changes its alarm: `get_alarm` does not show it, and only an unchanged fired alarm is
    /// deleted when its handler succeeds.
    alarm_firing: Option<u64>,
    /// The write that was the last `delete_all`: until it is durable the backend's keys are
    /// stale, and reads must not consult the backend.
    clear_seq: u64,
    written_seq: u64,
    durable_seq: u64,
    flushing: bool,
    /// Set when a commit failed or the object was reset; every later call fails with it.
    failed: Option<Error>,
    /// The cache holds every key of the object (it was preloaded and nothing was evicted
    /// since): a key not in it is absent, and no read goes to the backend.
    complete: bool,
    durable_waiters: Vec<Waker>,
    idle_waiters: Vec<Waker>,
}

/// Resets the object when a commit of its writes fails.
type OnFailure = Box<dyn FnOnce(&Error)>;

pub(crate) struct ObjectStore {
    pub(crate) shared: Rc<Shared>,
    pub(crate) key: ObjectKey,
    /// Recorded in the object registry with the object's first write.
    name: Option<String>,
    state: RefCell<State>,
    /// Called once when a commit of this object fails: resets the object.
    on_failure: RefCell<Option<OnFailure>>,
    /// Bumped by every write; a transaction compares it to detect concurrent writes.
    pub(crate) mutations: Cell<u64>,
    /// The ownership epoch of the object's virtual shard when it was activated: every batch
    /// carries it, so a commit made after the shard moved is fenced.
    pub(crate) epoch: u64,
}

impl ObjectStore {
    pub(crate) fn new(shared: Rc<Shared>, key: ObjectKey, name: Option<String>) -> ObjectStore {
        let epoch = match &shared.cluster {
            Some(cluster) => cluster.epoch(shared.shards.shard_of(&key.id)),
            None => shared.shards.epoch_of(&key.id),
        };
        ObjectStore {
            shared,
            key,
            name,
            state: RefCell::default(),
            on_failure: RefCell::new(None),
            mutations: Cell::new(0),
            epoch,
        }
    }

    pub(crate) fn set_on_failure(&self, callback: Box<dyn FnOnce(&Error)>) {
        *self.on_failure.borrow_mut() = Some(callback);
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    fn check_live(&self) -> Result<(), Error> {
        match &self.state.borrow().failed {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Marks the store dead: later calls fail, unflushed writes are dropped.
    pub(crate) fn fail(&self, error: Error) {
        let mut state = self.state.borrow_mut();
        if state.failed.is_none() {
            state.failed = Some(error);
        }
        state.dirty.clear();
        state.clear_pending = false;
        state.alarm_dirty = AlarmWrite::Keep;
        state.alarm = None;
        wake_all(&mut state.durable_waiters);
    }

    /// The stored (encoded) value of `key`, once the key is checked against the limits.
    pub(crate) fn get_checked(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        self.shared.limits.check_key(key)?;
        self.get(key)
    }

    /// The stored (encoded) value of `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        self.check_live()?;
        let mut state = self.state.borrow_mut();
        if let Some(cached) = state.cache.get(key) {
            return Ok(cached.value.clone());
        }
        let value = if state.clear_seq > state.durable_seq || state.complete {
            None
        } else {
            self.shared.backend.get(&self.key, key)?.map(Bytes::from)
        };
        insert_cached(&mut state, key.to_vec(), value.clone(), 0);
        self.evict_if_needed(&mut state);
        Ok(value)
    }

    /// Applies writes (`None` deletes) as one atomic group, and schedules a flush.
    pub(crate) fn write(
        self: &Rc<Self>,
        writes: Vec<(Vec<u8>, Option<Bytes>)>,
    ) -> Result<(), Error> {
        self.check_live()?;
        if writes.is_empty() {
            return Ok(());
        }
        let mut state = self.state.borrow_mut();
        state.written_seq += 1;
        let seq = state.written_seq;
        for (key, value) in writes {
            state.dirty.insert(key.clone(), value.clone());
            insert_cached(&mut state, key, value, seq);
        }
        self.after_write(&mut state);
        Ok(())
    }

    /// Deletes every key of the object.
    pub(crate) fn delete_all(self: &Rc<Self>) -> Result<(), Error> {
        self.check_live()?;
        let mut state = self.state.borrow_mut();
        state.written_seq += 1;
        state.clear_seq = state.written_seq;
        state.cache.clear();
        state.cached_bytes = 0;
        state.dirty.clear();
        state.clear_pending = true;
        state.alarm_dirty = AlarmWrite::Keep;
        state.alarm = Some(None);
        state.alarm_firing = None;
        self.after_write(&mut state);
        Ok(())
    }

    /// The object's alarm, its own unflushed changes included. While its alarm is being
    /// delivered, that alarm is not shown (the handler sees only one it set itself).
    pub(crate) fn alarm(&self) -> Result<Option<u64>, Error> {
        self.check_live()?;
        let mut state = self.state.borrow_mut();
        if state.alarm_firing.is_some() {
            return Ok(None);
        }
        if let Some(alarm) = state.alarm {
            return Ok(alarm);
        }
        let alarm = if state.clear_seq > state.durable_seq {
            None
        } else {
            self.shared.backend.alarm(&self.key)?
        };
        state.alarm = Some(alarm);
        Ok(alarm)
    }

    /// Sets (`Some`) or deletes the object's alarm, as a write of the object: it joins the next
    /// batch, and the output gate waits for it.
    pub(crate) fn write_alarm(self: &Rc<Self>, alarm: Option<u64>) -> Result<(), Error> {
        self.check_live()?;
        let mut state = self.state.borrow_mut();
        state.written_seq += 1;
        state.alarm_dirty = alarm.map_or(AlarmWrite::Delete, AlarmWrite::Set);
        state.alarm = Some(alarm);
        state.alarm_firing = None;
        self.schedule_flush(&mut state);
        Ok(())
    }

    /// The alarm at `at_ms` is being delivered (see `State::alarm_firing`).
    pub(crate) fn begin_alarm(&self, at_ms: u64) {
        self.state.borrow_mut().alarm_firing = Some(at_ms);
    }

    /// The handler of the alarm at `at_ms` is done: with `delete`, the alarm is deleted if the
    /// object left it unchanged. The sequence number of the newest write, to wait on.
    pub(crate) fn end_alarm(self: &Rc<Self>, at_ms: u64, delete: bool) -> Result<u64, Error> {
        let unchanged = {
            let mut state = self.state.borrow_mut();
            std::mem::take(&mut state.alarm_firing) == Some(at_ms)
        };
        if unchanged && delete {
            self.write_alarm(None)?;
        }
        Ok(self.written_seq())
    }

    fn after_write(self: &Rc<Self>, state: &mut State) {
        self.mutations.set(self.mutations.get() + 1);
        self.schedule_flush(state);
    }

    fn schedule_flush(self: &Rc<Self>, state: &mut State) {
        if !state.flushing {
            state.flushing = true;
            self.shared.schedule(self.clone());
        }
    }

    /// The batch carrying writes up to `seq` is durable. Writes made since go next.
    fn committed(self: &Rc<Self>, seq: u64) {
        let mut state = self.state.borrow_mut();
        state.durable_seq = seq;
        wake_all(&mut state.durable_waiters);
        self.evict_if_needed(&mut state);
        let more = state.failed.is_none() && state.has_unflushed();
        if more {
            self.shared.schedule(self.clone());
        } else {
            state.flushing = false;
            wake_all(&mut state.idle_waiters);
        }
    }

    /// The next batch and the newest write it carries, or `None` (and the flush ends). One
    /// batch is in flight per object: `flushing` stays set until `committed`.
    fn take_batch(&self) -> Option<(ObjectBatch, u64)> {
        let mut state = self.state.borrow_mut();
        if state.failed.is_some() || !state.has_unflushed() {
            state.flushing = false;
            wake_all(&mut state.idle_waiters);
            return None;
        }
        let dirty = std::mem::take(&mut state.dirty);
        let batch = ObjectBatch {
            object: self.key,
            name: self.name.clone(),
            clear: std::mem::take(&mut state.clear_pending),
            alarm: std::mem::take(&mut state.alarm_dirty),
            epoch: self.epoch,
            mutations: dirty
                .into_iter()
                .map(|(k, v)| (k, v.map(|v| v.to_vec())))
                .collect(),
        };
        Some((batch, state.written_seq))
    }

    fn commit_failed(&self, error: Error) {
        self.fail(error.clone());
        {
            let mut state = self.state.borrow_mut();
            state.flushing = false;
            wake_all(&mut state.idle_waiters);
        }
        let callback = self.on_failure.borrow_mut().take();
        if let Some(callback) = callback {
            callback(&error);
        }
    }

    /// Whether a batch is in flight or about to be.
    pub(crate) fn is_flushing(&self) -> bool {
        self.state.borrow().flushing
    }

    /// Drops the cache (the object was evicted). Only clean entries can be there when idle.
    pub(crate) fn release_cache(&self) {
        let mut state = self.state.borrow_mut();
        let durable = state.durable_seq;
        state.cache.retain(|_, cached| cached.seq > durable);
        state.cached_bytes = state
            .cache
            .iter()
            .map(|(k, c)| entry_bytes(k, &c.value))
            .sum();
    }

    /// The newest write so far; the output gate waits until it is durable.
    pub(crate) fn written_seq(&self) -> u64 {
        self.state.borrow().written_seq
    }

    /// Whether every write up to `seq` is durable now.
    pub(crate) fn is_durable(&self, seq: u64) -> bool {
        self.state.borrow().durable_seq >= seq
    }

    /// Resolves when every write up to `seq` is durable, or with the error that lost them.
    /// Writes that are durable stay so: a failure or reset after them does not fail the wait
    /// (a call whose writes committed is answered, even if the object reset before its
    /// caller read the answer).
    pub(crate) async fn wait_durable(&self, seq: u64) -> Result<(), Error> {
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.durable_seq >= seq {
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = &state.failed {
                return Poll::Ready(Err(error.clone()));
            }
            state.durable_waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Resolves when no batch of this store is in flight (so the backend is final for it).
    pub(crate) async fn wait_idle(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if !state.flushing {
                return Poll::Ready(());
            }
            state.idle_waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn evict_if_needed(&self, state: &mut State) {
        let max = self.shared.limits.cache_bytes_max;
        if state.cached_bytes <= max {
            return;
        }
        let target = max / 4 * 3;
        let durable = state.durable_seq;
        let mut freed = 0;
        state.cache.retain(|key, cached| {
            if state.cached_bytes - freed <= target || cached.seq > durable {
                return true;
            }
            freed += entry_bytes(key, &cached.value);
            false
        });
        if freed > 0 {
            // Keys left the cache: misses must ask the backend again.
            state.complete = false;
        }
        state.cached_bytes -= freed;
    }

    /// Loads the object's keys and alarm into the cache, from a read made off the event loop
    /// (`(entries, alarm)` as the backend had them, `entries` ordered and complete), so that
    /// its reads are answered without the backend. Ignored once the object wrote (the read
    /// may predate its writes), or when the keys would not fit the cache.
    pub(crate) fn preload(&self, entries: Vec<(Vec<u8>, Vec<u8>)>, alarm: Option<u64>) {
        let mut state = self.state.borrow_mut();
        if state.written_seq > 0 || state.failed.is_some() {
            return;
        }
        let bytes: usize = entries
            .iter()
            .map(|(k, v)| k.len() + v.len() + CACHE_ENTRY_OVERHEAD)
            .sum();
        if bytes > self.shared.limits.cache_bytes_max {
            return;
        }
        for (key, value) in entries {
            insert_cached(&mut state, key, Some(Bytes::from(value)), 0);
        }
        if state.alarm.is_none() {
            state.alarm = Some(alarm);
        }
        state.complete = true;
    }

    /// Entries in the range, in key order (descending when `reverse`), at most `limit`: the
    /// backend's entries with the cache laid over them.
    pub(crate) fn range(
        &self,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, Error> {
        self.check_live()?;
        let state = self.state.borrow();
        let backend_live = state.clear_seq <= state.durable_seq && !state.complete;
        let scan = |from: &Bound<Vec<u8>>, to: &Bound<Vec<u8>>, n: usize| {
            if !backend_live {
                return Ok(Vec::new());
            }
            let rows = self
                .shared
                .backend
                .scan(&self.key, as_ref(from), as_ref(to), reverse, n)?;
            Ok(rows.into_iter().map(|(k, v)| (k, Bytes::from(v))).collect())
        };
        let overlay =
            |from: &Bound<Vec<u8>>, to: &Bound<Vec<u8>>| -> Vec<(Vec<u8>, Option<Bytes>)> {
                if range_is_empty(as_ref(from), as_ref(to)) {
                    return Vec::new();
                }
                let range = state.cache.range::<[u8], _>((as_ref(from), as_ref(to)));
                let entries = range.map(|(k, c)| (k.to_vec(), c.value.clone()));
                if reverse {
                    entries.rev().collect()
                } else {
                    entries.collect()
                }
            };
        merge_range(start, end, reverse, limit, scan, overlay)
    }
}

impl State {
    /// Whether writes wait to be handed to the writer.
    fn has_unflushed(&self) -> bool {
        !self.dirty.is_empty() || self.clear_pending || self.alarm_dirty != AlarmWrite::Keep
    }
}

fn wake_all(wakers: &mut Vec<Waker>) {
    for waker in wakers.drain(..) {
        waker.wake();
    }
}

fn entry_bytes(key: &[u8], value: &Option<Bytes>) -> usize {
    key.len() + value.as_ref().map_or(0, Bytes::len) + CACHE_ENTRY_OVERHEAD
}

fn insert_cached(state: &mut State, key: Vec<u8>, value: Option<Bytes>, seq: u64) {
    let added = entry_bytes(&key, &value);
    let key_bytes = key.len();
    if let Some(old) = state
        .cache
        .insert(key.into_boxed_slice(), Cached { value, seq })
    {
        state.cached_bytes -= key_bytes + entry_bytes(&[], &old.value);
    }
    state.cached_bytes += added;
}

/// A source of sorted entries in a range: `(from, to, limit)`, where `from` is the bound the
/// walk starts at (the start, or the end when reverse).
type Entries = Vec<(Vec<u8>, Bytes)>;

/// Merges a sorted `base` (read in chunks) with an `overlay` of newer values (`None` deletes),
/// in the walk's direction, stopping after `limit` entries. `base` and `overlay` take the range
/// as (start, end) bounds and answer in walk order.
pub(crate) fn merge_range(
    start: Bound<Vec<u8>>,
    end: Bound<Vec<u8>>,
    reverse: bool,
    limit: usize,
    base: impl Fn(&Bound<Vec<u8>>, &Bound<Vec<u8>>, usize) -> Result<Entries, Error>,
    overlay: impl Fn(&Bound<Vec<u8>>, &Bound<Vec<u8>>) -> Vec<(Vec<u8>, Option<Bytes>)>,
) -> Result<Entries, Error> {
    let (mut start, mut end) = (start, end);
    let mut out = Vec::new();
    loop {
        let chunk = base(&start, &end, SCAN_CHUNK)?;
        let exhausted = chunk.len() < SCAN_CHUNK;
        // This step covers the range up to the last base key read (all of it when exhausted).
        let (step_start, step_end) = match (exhausted, chunk.last()) {
            (false, Some((last, _))) if reverse => (Bound::Included(last.clone()), end.clone()),
            (false, Some((last, _))) => (start.clone(), Bound::Included(last.clone())),
            _ => (start.clone(), end.clone()),
        };
        let layer = overlay(&step_start, &step_end);
        if merge_step(chunk, layer, reverse, limit, &mut out) || exhausted {
            return Ok(out);
        }
        let last = out_last_base_key(&step_start, &step_end, reverse);
        if reverse {
            end = last;
        } else {
            start = last;
        }
    }
}

/// The bound that continues a walk after a step that ended at an included key.
fn out_last_base_key(
    step_start: &Bound<Vec<u8>>,
    step_end: &Bound<Vec<u8>>,
    reverse: bool,
) -> Bound<Vec<u8>> {
    let edge = if reverse { step_start } else { step_end };
    match edge {
        Bound::Included(key) => Bound::Excluded(key.clone()),
        other => other.clone(),
    }
}

/// Merges one chunk; true when `limit` is reached.
fn merge_step(
    chunk: Entries,
    layer: Vec<(Vec<u8>, Option<Bytes>)>,
    reverse: bool,
    limit: usize,
    out: &mut Entries,
) -> bool {
    use std::cmp::Ordering;
    let mut base = chunk.into_iter().peekable();
    let mut over = layer.into_iter().peekable();
    loop {
        if out.len() >= limit {
            return true;
        }
        let order = match (base.peek(), over.peek()) {
            (None, None) => return false,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((b, _)), Some((o, _))) if reverse => o.cmp(b),
            (Some((b, _)), Some((o, _))) => b.cmp(o),
        };
        let taken = match order {
            Ordering::Less => base.next().map(|(k, v)| (k, Some(v))),
            Ordering::Greater => over.next(),
            Ordering::Equal => {
                base.next();
                over.next()
            }
        };
        if let Some((key, Some(value))) = taken {
            out.push((key, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::storage::conformance::{batch, put};
    use crate::storage::harness::{Harness, object, run, settle, until};
    use crate::storage::memory::MemoryBackend;

    fn harness() -> Harness {
        Harness::new(MemoryBackend::new(), Limits::default())
    }

    fn set(key: &[u8], value: &[u8]) -> (Vec<u8>, Option<Bytes>) {
        (key.to_vec(), Some(Bytes::copy_from_slice(value)))
    }

    fn unset(key: &[u8]) -> (Vec<u8>, Option<Bytes>) {
        (key.to_vec(), None)
    }

    /// Waits until every write of `store` so far is durable.
    async fn durable(store: &ObjectStore) -> Result<(), Error> {
        store.wait_durable(store.written_seq()).await
    }

    fn all(store: &ObjectStore, reverse: bool, limit: usize) -> Vec<(Vec<u8>, Bytes)> {
        let (start, end) = (Bound::Unbounded, Bound::Unbounded);
        store.range(start, end, reverse, limit).unwrap()
    }

    /// A preloaded store answers every read from its cache: what the backend holds besides
    /// is not consulted, until an eviction makes the cache partial again.
    #[test]
    fn a_preloaded_store_reads_nothing_from_the_backend() {
        let h = Harness::new(
            MemoryBackend::new(),
            Limits {
                cache_bytes_max: 4096,
                ..Limits::default()
            },
        );
        run(async {
            let s = h.store(1);
            let loaded = vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec()),
            ];
            s.preload(loaded, Some(77));
            // Written behind the store's back: a preloaded store does not see it.
            h.memory
                .commit(&[batch(object(1), vec![put(b"hidden", b"x")])])
                .unwrap();
            assert_eq!(s.get(b"a").unwrap(), Some(Bytes::from_static(b"1")));
            assert_eq!(s.get(b"hidden").unwrap(), None);
            let keys: Vec<Vec<u8>> = all(&s, false, 10).into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys, [b"a".to_vec(), b"b".to_vec()]);
            assert_eq!(s.alarm().unwrap(), Some(77));
            // Its own writes go through as ever.
            s.write(vec![set(b"c", b"3")]).unwrap();
            durable(&s).await.unwrap();
            assert_eq!(all(&s, false, 10).len(), 3);
            // Past the cache bound, clean keys leave it: the backend is read again.
            let big = vec![b'v'; 1500];
            for key in [b"d", b"e", b"f"] {
                s.write(vec![(key.to_vec(), Some(Bytes::from(big.clone())))])
                    .unwrap();
                durable(&s).await.unwrap();
            }
            h.memory
                .commit(&[batch(object(1), vec![put(b"later", b"y")])])
                .unwrap();
            assert_eq!(s.get(b"later").unwrap(), Some(Bytes::from_static(b"y")));
        });
    }

    /// A store that wrote before its preload arrived keeps reading the backend: the preload
    /// may predate its writes.
    #[test]
    fn a_late_preload_is_ignored() {
        let h = harness();
        run(async {
            let s = h.store(1);
            s.write(vec![set(b"k", b"mine")]).unwrap();
            s.preload(vec![(b"k".to_vec(), b"old".to_vec())], None);
            assert_eq!(s.get(b"k").unwrap(), Some(Bytes::from_static(b"mine")));
            h.memory
                .commit(&[batch(object(1), vec![put(b"other", b"y")])])
                .unwrap();
            assert_eq!(s.get(b"other").unwrap(), Some(Bytes::from_static(b"y")));
        });
    }

    #[test]
    fn reads_see_own_writes_before_they_are_durable() {
        let h = harness();
        run(async {
            let s = h.store(1);
            s.write(vec![set(b"k", b"v"), set(b"gone", b"x")]).unwrap();
            durable(&s).await.unwrap();
            h.faulty.hold();
            s.write(vec![set(b"k", b"new"), unset(b"gone")]).unwrap();
            assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
            assert_eq!(s.get(b"gone").unwrap(), None);
            let stored = |key: &[u8]| h.memory.get(&object(1), key).unwrap();
            assert_eq!(stored(b"k"), Some(b"v".to_vec()));
            assert_eq!(stored(b"gone"), Some(b"x".to_vec()));
            h.faulty.release();
            durable(&s).await.unwrap();
            assert_eq!(stored(b"k"), Some(b"new".to_vec()));
            assert_eq!(stored(b"gone"), None);
        });
    }

    #[test]
    fn writes_with_no_await_between_form_one_batch() {
        let h = harness();
        run(async {
            let (s, t) = (h.store(1), h.store(2));
            s.write(vec![set(b"a", b"1")]).unwrap();
            s.write(vec![set(b"b", b"2")]).unwrap();
            t.write(vec![set(b"c", b"3")]).unwrap();
            durable(&s).await.unwrap();
            durable(&t).await.unwrap();
            // One batch per object, both objects in one group and one commit.
            assert_eq!(h.stats().submitted.load(Ordering::Relaxed), 2);
            assert_eq!(h.faulty.commits(), 1);
            // A write after an await is the next batch.
            s.write(vec![set(b"d", b"4")]).unwrap();
            settle().await;
            s.write(vec![set(b"e", b"5")]).unwrap();
            durable(&s).await.unwrap();
            assert_eq!(h.stats().submitted.load(Ordering::Relaxed), 4);
            let keys: Vec<Vec<u8>> = h
                .memory
                .scan(&object(1), Bound::Unbounded, Bound::Unbounded, false, 10)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            assert_eq!(keys, [b"a", b"b", b"d", b"e"]);
        });
    }

    #[test]
    fn one_batch_is_in_flight_per_object() {
        let h = harness();
        run(async {
            let s = h.store(1);
            h.faulty.hold();
            s.write(vec![set(b"a", b"1")]).unwrap();
            until(|| h.faulty.commits() == 1).await;
            s.write(vec![set(b"b", b"2")]).unwrap();
            s.write(vec![set(b"c", b"3")]).unwrap();
            settle().await;
            // The later writes wait for the batch in flight.
            assert_eq!(h.stats().submitted.load(Ordering::Relaxed), 1);
            assert!(s.is_flushing());
            h.faulty.release();
            durable(&s).await.unwrap();
            // ...and then go as one batch.
            assert_eq!(h.stats().submitted.load(Ordering::Relaxed), 2);
            assert_eq!(h.faulty.commits(), 2);
            until(|| !s.is_flushing()).await;
        });
    }

    #[test]
    fn wait_durable_follows_written_seq() {
        let h = harness();
        run(async {
            let s = h.store(1);
            assert_eq!(s.written_seq(), 0);
            s.wait_durable(0).await.unwrap();
            h.faulty.hold();
            s.write(vec![set(b"a", b"1")]).unwrap();
            s.write(vec![set(b"b", b"2"), set(b"c", b"3")]).unwrap();
            s.write(vec![]).unwrap();
            s.delete_all().unwrap();
            // Each write operation counts once; an empty one not at all.
            assert_eq!(s.written_seq(), 3);
            let wait = tokio::time::timeout(Duration::from_millis(20), s.wait_durable(1));
            assert!(wait.await.is_err(), "durable while the commit is held");
            h.faulty.release();
            s.wait_durable(3).await.unwrap();
            assert!(
                h.memory
                    .scan(&object(1), Bound::Unbounded, Bound::Unbounded, false, 9)
                    .unwrap()
                    .is_empty()
            );
        });
    }

    #[test]
    fn a_failed_commit_fails_the_store_and_reports_once() {
        let h = harness();
        run(async {
            let s = h.store(1);
            let failures = Rc::new(Cell::new(0));
            let seen = failures.clone();
            s.set_on_failure(Box::new(move |error| {
                assert_eq!(*error, Error::Io("disk gone".into()));
                seen.set(seen.get() + 1);
            }));
            h.faulty.hold();
            s.write(vec![set(b"a", b"1")]).unwrap();
            until(|| h.faulty.commits() == 1).await;
            s.write(vec![set(b"b", b"2")]).unwrap();
            h.faulty.fail_commits(Error::Io("disk gone".into()), 2);
            h.faulty.release();
            let lost = Err(Error::Io("disk gone".into()));
            assert_eq!(durable(&s).await, lost);
            settle().await;
            until(|| !s.is_flushing()).await;
            assert_eq!(failures.get(), 1);
            // The write queued behind the failed batch was dropped, never committed.
            assert_eq!(h.faulty.commits(), 1);
            assert_eq!(h.memory.stored_bytes(), 0);
            // Every later call fails with the same error.
            assert_eq!(s.get(b"a"), lost.clone().map(|()| None));
            assert_eq!(s.write(vec![set(b"c", b"3")]), lost);
            assert_eq!(s.delete_all(), lost);
            assert_eq!(failures.get(), 1);
        });
    }

    #[test]
    fn a_full_disk_fails_only_the_object_that_cannot_fit() {
        let h = Harness::new(MemoryBackend::with_map_bytes(4096), Limits::default());
        run(async {
            let (big, small) = (h.store(1), h.store(2));
            let reset = Rc::new(Cell::new(false));
            let flag = reset.clone();
            big.set_on_failure(Box::new(move |_| flag.set(true)));
            small.set_on_failure(Box::new(|error| panic!("small object failed: {error}")));
            // Both write in one turn: one group, one commit attempt for both.
            big.write(vec![set(b"huge", &[0; 8192])]).unwrap();
            small.write(vec![set(b"k", b"v")]).unwrap();
            let full = Err(Error::MapFull { map_bytes: 4096 });
            assert_eq!(durable(&big).await, full);
            assert_eq!(durable(&small).await, Ok(()));
            assert!(reset.get());
            assert_eq!(h.memory.get(&object(2), b"k").unwrap(), Some(b"v".to_vec()));
            assert_eq!(h.memory.get(&object(1), b"huge").unwrap(), None);
            // The object that fit goes on.
            small.write(vec![set(b"k2", b"v2")]).unwrap();
            durable(&small).await.unwrap();
        });
    }

    #[test]
    fn eviction_never_drops_unflushed_writes() {
        let limits = Limits {
            cache_bytes_max: 1000,
            ..Limits::default()
        };
        let h = Harness::new(MemoryBackend::new(), limits);
        run(async {
            let s = h.store(1);
            let key = |i: u8| vec![b'k', i];
            h.faulty.hold();
            for i in 0..50 {
                s.write(vec![set(&key(i), &[i; 100])]).unwrap();
            }
            // Reads run eviction; the cache is far over its budget but holds only dirty writes.
            assert_eq!(s.get(b"missing").unwrap(), None);
            assert!(s.state.borrow().cached_bytes > 1000);
            for i in 0..50 {
                assert_eq!(s.get(&key(i)).unwrap().as_deref(), Some(&[i; 100][..]));
            }
            h.faulty.release();
            durable(&s).await.unwrap();
            // Once durable the entries are clean, and eviction brings the cache under budget;
            // what it dropped is read back from the backend.
            assert_eq!(s.get(b"missing").unwrap(), None);
            assert!(s.state.borrow().cached_bytes <= 1000);
            for i in 0..50 {
                assert_eq!(s.get(&key(i)).unwrap().as_deref(), Some(&[i; 100][..]));
            }
        });
    }

    #[test]
    fn delete_all_hides_the_backend_until_durable() {
        let h = harness();
        run(async {
            let s = h.store(1);
            s.write(vec![set(b"a", b"1"), set(b"b", b"2")]).unwrap();
            durable(&s).await.unwrap();
            s.release_cache();
            h.faulty.hold();
            s.delete_all().unwrap();
            s.write(vec![set(b"c", b"3")]).unwrap();
            assert_eq!(h.memory.get(&object(1), b"a").unwrap(), Some(b"1".to_vec()));
            assert_eq!(s.get(b"a").unwrap(), None);
            let only_c = vec![(b"c".to_vec(), Bytes::from_static(b"3"))];
            assert_eq!(all(&s, false, usize::MAX), only_c);
            assert_eq!(all(&s, true, usize::MAX), only_c);
            h.faulty.release();
            durable(&s).await.unwrap();
            assert_eq!(h.memory.get(&object(1), b"a").unwrap(), None);
            s.release_cache();
            assert_eq!(s.get(b"a").unwrap(), None);
            assert_eq!(all(&s, false, usize::MAX), only_c);
        });
    }

    #[test]
    fn range_lays_the_cache_over_the_backend() {
        let h = harness();
        run(async {
            let s = h.store(1);
            // 600 keys in the backend (more than one scan chunk), none of them cached.
            let key = |i: u32| format!("k{i:04}").into_bytes();
            let stored: Vec<_> = (0..600).map(|i| put(&key(i), b"old")).collect();
            h.memory.commit(&[batch(object(1), stored)]).unwrap();
            let mut model: BTreeMap<Vec<u8>, Bytes> = (0..600)
                .map(|i| (key(i), Bytes::from_static(b"old")))
                .collect();
            // Unflushed writes over them: deletes, overwrites, keys in between and past them.
            h.faulty.hold();
            let mut writes = Vec::new();
            for i in 0..650 {
                let (k, between) = (key(i), [key(i), b"+".to_vec()].concat());
                match i % 7 {
                    0 => writes.push(unset(&k)),
                    3 => writes.push(set(&k, b"new")),
                    5 => writes.push(set(&between, b"added")),
                    _ => {}
                }
            }
            for (k, v) in &writes {
                match v {
                    Some(v) => model.insert(k.clone(), v.clone()),
                    None => model.remove(k),
                };
            }
            s.write(writes).unwrap();
            let bounds = [
                (Bound::Unbounded, Bound::Unbounded),
                (Bound::Included(key(5)), Bound::Excluded(key(590))),
                (Bound::Excluded(key(7)), Bound::Included(key(300))),
                (Bound::Included(key(400)), Bound::Unbounded),
            ];
            for (start, end) in bounds {
                for reverse in [false, true] {
                    for limit in [1, 2, 255, 256, 300, usize::MAX] {
                        let got = s.range(start.clone(), end.clone(), reverse, limit).unwrap();
                        let range = model.range::<Vec<u8>, _>((start.clone(), end.clone()));
                        let range = range.map(|(k, v)| (k.clone(), v.clone()));
                        let want: Vec<_> = if reverse {
                            range.rev().take(limit).collect()
                        } else {
                            range.take(limit).collect()
                        };
                        assert_eq!(got, want, "{start:?}..{end:?} reverse {reverse} {limit}");
                    }
                }
            }
        });
    }
}
