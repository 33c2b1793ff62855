//! An in-memory [`Backend`] that answers as [`LmdbBackend`] does, for unit tests of the
//! layers above the engine (the cache, transactions, the writer, the host) without a disk.
//!
//! It keeps what LMDB keeps (every object's keys, the object registry, namespace records, the
//! virtual shard count and epochs) in ordered maps behind one lock, with LMDB's semantics: keys
//! in byte order, scans with the same bounds, direction and limit, a commit atomic over all its
//! batches and refused whole when one is fenced, the same registry rules and the same errors for
//! names, tags and key sizes. It is not durable: dropping it loses
//! everything. A byte budget stands in for LMDB's map size, so that a full disk is testable.
//!
//! The same checks run against both engines (`storage::conformance`).
//!
//! [`LmdbBackend`]: super::lmdb::LmdbBackend

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::backend::{
    AlarmEntry, Backend, DumpItem, Entry, ImportReport, NamespaceRecord, ObjectBatch, ObjectKey,
    ObjectRecord, now_ms,
};
use super::dump::{ImportTarget, Importer};
use super::keys::range_is_empty;
use super::lmdb::{MAX_KEY, MAX_NAMESPACE_NAME};
use super::shards::{EPOCH_FIRST, ShardMap, VIRTUAL_SHARDS_DEFAULT, check_count, virtual_shard};
use super::{Error, OpenError};

/// The keys of one object.
type Keys = BTreeMap<Vec<u8>, Vec<u8>>;

/// A storage engine in memory; see the module docs.
pub struct MemoryBackend {
    state: Mutex<State>,
    /// Most bytes of keys and values the backend holds: a commit that would hold more fails
    /// with [`Error::MapFull`], as LMDB's does when its map is full. `None`: no limit.
    map_bytes: Option<usize>,
}

#[derive(Clone)]
struct State {
    /// Every object's keys; an object with no keys has no entry.
    kv: BTreeMap<ObjectKey, Keys>,
    /// The object registry: the objects that have keys or an alarm.
    objects: BTreeMap<ObjectKey, ObjectRecord>,
    /// Every object's alarm, and the same as a time-ordered index (LMDB's `alarm_of` and
    /// `alarms`).
    alarm_of: BTreeMap<ObjectKey, u64>,
    alarms: BTreeSet<AlarmEntry>,
    namespaces: HashMap<String, NamespaceRecord>,
    /// The tag the next new namespace gets (tag 0 is never used, as in LMDB).
    next_tag: u32,
    /// Bytes of every key and value held: what `map_bytes` bounds.
    stored_bytes: usize,
    /// Each virtual shard's ownership epoch; the length is the count, fixed at construction
    /// (LMDB's `virtual_shards` and `epoch/…` records).
    epochs: Vec<u64>,
}

/// One object as a commit in progress sees it; swapped in when the whole commit applied.
struct Draft {
    keys: Keys,
    row: Option<ObjectRecord>,
    alarm: Option<u64>,
}

impl MemoryBackend {
    /// An empty backend without a size limit, with [`VIRTUAL_SHARDS_DEFAULT`] virtual shards.
    pub fn new() -> MemoryBackend {
        MemoryBackend {
            state: Mutex::new(State {
                kv: BTreeMap::new(),
                objects: BTreeMap::new(),
                alarm_of: BTreeMap::new(),
                alarms: BTreeSet::new(),
                namespaces: HashMap::new(),
                next_tag: 1,
                stored_bytes: 0,
                epochs: vec![EPOCH_FIRST; VIRTUAL_SHARDS_DEFAULT as usize],
            }),
            map_bytes: None,
        }
    }

    /// An empty backend whose commits fail with [`Error::MapFull`] once the keys and values it
    /// holds would take more than `map_bytes` bytes. Commits that do not grow it (deletes,
    /// clears) always succeed, as in LMDB.
    pub fn with_map_bytes(map_bytes: usize) -> MemoryBackend {
        MemoryBackend {
            map_bytes: Some(map_bytes),
            ..MemoryBackend::new()
        }
    }

    /// An empty backend without a size limit, with `count` virtual shards, each at epoch 1.
    /// Fails with [`OpenError::VirtualShardCount`] outside `1..=`[`VIRTUAL_SHARDS_MAX`], as
    /// creating an LMDB data dir does.
    ///
    /// [`VIRTUAL_SHARDS_MAX`]: super::shards::VIRTUAL_SHARDS_MAX
    pub fn with_virtual_shards(count: u32) -> Result<MemoryBackend, OpenError> {
        let count = check_count(count)?;
        let backend = MemoryBackend::new();
        backend.lock().epochs = vec![EPOCH_FIRST; count as usize];
        Ok(backend)
    }

    /// Bytes of the keys and values held (what [`MemoryBackend::with_map_bytes`] bounds).
    pub fn stored_bytes(&self) -> usize {
        self.lock().stored_bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A commit changes the state only after it fully applied (see `commit`), so a panic
        // elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn set_next_tag(&self, tag: u32) {
        self.lock().next_tag = tag;
    }
}

impl State {
    fn set_alarm(&mut self, object: ObjectKey, alarm: Option<u64>) {
        if let Some(old) = self.alarm_of.remove(&object) {
            self.alarms.remove(&(old, object));
        }
        if let Some(at_ms) = alarm {
            self.alarm_of.insert(object, at_ms);
            self.alarms.insert((at_ms, object));
        }
    }
}

impl Default for MemoryBackend {
    fn default() -> MemoryBackend {
        MemoryBackend::new()
    }
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("stored_bytes", &self.stored_bytes())
            .field("map_bytes", &self.map_bytes)
            .finish_non_exhaustive()
    }
}

impl Backend for MemoryBackend {
    fn get(&self, object: &ObjectKey, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let state = self.lock();
        Ok(state.kv.get(object).and_then(|keys| keys.get(key)).cloned())
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
        let state = self.lock();
        let Some(keys) = state.kv.get(object) else {
            return Ok(Vec::new());
        };
        let range = keys
            .range::<[u8], _>((start, end))
            .map(|(k, v)| (k.clone(), v.clone()));
        Ok(if reverse {
            range.rev().take(limit).collect()
        } else {
            range.take(limit).collect()
        })
    }

    fn commit(&self, batches: &[ObjectBatch]) -> Result<(), Error> {
        let mut state = self.lock();
        // Under the same lock as the writes: no epoch can be raised between check and apply.
        check_epochs(&state.epochs, batches)?;
        let now = now_ms();
        // Apply to drafts of the objects touched; on error they are dropped, so nothing of
        // the commit is visible, as when LMDB aborts its transaction.
        let mut drafts: BTreeMap<ObjectKey, Draft> = BTreeMap::new();
        for batch in batches {
            let draft = drafts.entry(batch.object).or_insert_with(|| Draft {
                keys: state.kv.get(&batch.object).cloned().unwrap_or_default(),
                row: state.objects.get(&batch.object).cloned(),
                alarm: state.alarm_of.get(&batch.object).copied(),
            });
            apply_batch(draft, batch, now)?;
        }
        let mut stored_bytes = state.stored_bytes;
        for (object, draft) in &drafts {
            stored_bytes -= state.kv.get(object).map_or(0, keys_bytes);
            stored_bytes += keys_bytes(&draft.keys);
        }
        if let Some(map_bytes) = self.map_bytes
            && stored_bytes > map_bytes
            && stored_bytes > state.stored_bytes
        {
            return Err(Error::MapFull { map_bytes });
        }
        for (object, draft) in drafts {
            state.set_alarm(object, draft.alarm);
            match draft.row {
                Some(row) => state.objects.insert(object, row),
                None => state.objects.remove(&object),
            };
            if draft.keys.is_empty() {
                state.kv.remove(&object);
            } else {
                state.kv.insert(object, draft.keys);
            }
        }
        state.stored_bytes = stored_bytes;
        Ok(())
    }

    fn list_objects(
        &self,
        tag: u32,
        start_after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<(Vec<ObjectRecord>, bool), Error> {
        let state = self.lock();
        let start = match start_after {
            Some(id) => Bound::Excluded(ObjectKey { tag, id: *id }),
            None => Bound::Included(ObjectKey { tag, id: [0; 32] }),
        };
        let end = Bound::Included(ObjectKey {
            tag,
            id: [0xff; 32],
        });
        let mut rows = state
            .objects
            .range((start, end))
            .map(|(_, row)| row.clone());
        let page: Vec<ObjectRecord> = rows.by_ref().take(limit).collect();
        Ok((page, rows.next().is_some()))
    }

    fn alarm(&self, object: &ObjectKey) -> Result<Option<u64>, Error> {
        Ok(self.lock().alarm_of.get(object).copied())
    }

    fn next_alarms(
        &self,
        after: Option<AlarmEntry>,
        limit: usize,
    ) -> Result<Vec<AlarmEntry>, Error> {
        let state = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let range = state.alarms.range((start, Bound::Unbounded));
        Ok(range.take(limit).copied().collect())
    }

    fn namespace(&self, name: &str) -> Result<NamespaceRecord, Error> {
        if name.len() > MAX_NAMESPACE_NAME {
            return Err(Error::NamespaceNameTooLong {
                len: name.len(),
                max: MAX_NAMESPACE_NAME,
            });
        }
        let mut state = self.lock();
        if let Some(record) = state.namespaces.get(name) {
            return Ok(record.clone());
        }
        let tag = state.next_tag;
        let next = tag.checked_add(1).ok_or(Error::NamespaceTagsExhausted)?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| Error::Io(format!("OS random source: {e}")))?;
        let record = NamespaceRecord { tag, secret };
        state.namespaces.insert(name.to_owned(), record.clone());
        state.next_tag = next;
        Ok(record)
    }

    fn shard_map(&self) -> Result<ShardMap, Error> {
        let epochs = self.lock().epochs.clone();
        ShardMap::new(epochs).map_err(|e| Error::Corrupt(e.to_string()))
    }

    fn raise_epoch(&self, virtual_shard: u32) -> Result<u64, Error> {
        let mut state = self.lock();
        let count = state.epochs.len() as u32;
        let epoch = state
            .epochs
            .get_mut(virtual_shard as usize)
            .ok_or(Error::NoSuchShard {
                virtual_shard,
                count,
            })?;
        *epoch = epoch
            .checked_add(1)
            .ok_or(Error::EpochsExhausted { virtual_shard })?;
        Ok(*epoch)
    }

    fn export(
        &self,
        namespaces: &[String],
        visit: &mut dyn FnMut(DumpItem) -> bool,
    ) -> Result<(), Error> {
        // A snapshot: the state as it is now, read without holding the lock.
        let state = self.lock().clone();
        for name in namespaces {
            let Some(record) = state.namespaces.get(name) else {
                continue;
            };
            let item = DumpItem::Namespace {
                name: name.clone(),
                secret: record.secret,
            };
            if !visit(item) {
                return Ok(());
            }
            let tag = record.tag;
            let first = ObjectKey { tag, id: [0; 32] };
            let last = ObjectKey {
                tag,
                id: [0xff; 32],
            };
            for (object, row) in state.objects.range(first..=last) {
                let alarm_ms = state.alarm_of.get(object).copied();
                if !visit(DumpItem::Object {
                    record: row.clone(),
                    alarm_ms,
                }) {
                    return Ok(());
                }
                for (key, value) in state.kv.get(object).into_iter().flatten() {
                    let (key, value) = (key.clone(), value.clone());
                    if !visit(DumpItem::Key { key, value }) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    fn import(
        &self,
        items: &mut dyn Iterator<Item = Result<DumpItem, Error>>,
        overwrite: bool,
    ) -> Result<ImportReport, Error> {
        let mut state = self.lock();
        // Applied to a copy, swapped in whole: an import that fails leaves nothing.
        let mut draft = state.clone();
        let report = Importer::new(overwrite).run(&mut draft, items)?;
        draft.stored_bytes = draft.kv.values().map(keys_bytes).sum();
        if let Some(map_bytes) = self.map_bytes
            && draft.stored_bytes > map_bytes
        {
            return Err(Error::MapFull { map_bytes });
        }
        *state = draft;
        Ok(report)
    }
}

impl ImportTarget for State {
    fn namespace(&mut self, name: &str) -> Result<Option<(u32, [u8; 32])>, Error> {
        if name.len() > MAX_NAMESPACE_NAME {
            return Err(Error::NamespaceNameTooLong {
                len: name.len(),
                max: MAX_NAMESPACE_NAME,
            });
        }
        Ok(self.namespaces.get(name).map(|r| (r.tag, r.secret)))
    }

    fn create_namespace(&mut self, name: &str, secret: &[u8; 32]) -> Result<u32, Error> {
        let tag = self.next_tag;
        self.next_tag = tag.checked_add(1).ok_or(Error::NamespaceTagsExhausted)?;
        self.set_secret(name, tag, secret)?;
        Ok(tag)
    }

    fn set_secret(&mut self, name: &str, tag: u32, secret: &[u8; 32]) -> Result<(), Error> {
        let record = NamespaceRecord {
            tag,
            secret: *secret,
        };
        self.namespaces.insert(name.to_owned(), record);
        Ok(())
    }

    fn has_objects(&mut self, tag: u32) -> Result<bool, Error> {
        let first = ObjectKey { tag, id: [0; 32] };
        let last = ObjectKey {
            tag,
            id: [0xff; 32],
        };
        Ok(self.objects.range(first..=last).next().is_some())
    }

    fn has_object(&mut self, object: &ObjectKey) -> Result<bool, Error> {
        Ok(self.objects.contains_key(object))
    }

    fn clear_object(&mut self, object: &ObjectKey) -> Result<(), Error> {
        self.kv.remove(object);
        self.set_alarm(*object, None);
        self.objects.remove(object);
        Ok(())
    }

    fn put_row(&mut self, object: &ObjectKey, created_ms: u64, name: &str) -> Result<(), Error> {
        let record = ObjectRecord {
            id: object.id,
            name: (!name.is_empty()).then(|| name.to_owned()),
            created_ms,
        };
        self.objects.insert(*object, record);
        Ok(())
    }

    fn delete_row(&mut self, object: &ObjectKey) -> Result<(), Error> {
        self.objects.remove(object);
        Ok(())
    }

    fn put_alarm(&mut self, object: &ObjectKey, at_ms: u64) -> Result<(), Error> {
        self.set_alarm(*object, Some(at_ms));
        Ok(())
    }

    fn put_key(&mut self, object: &ObjectKey, key: &[u8], value: &[u8]) -> Result<(), Error> {
        if key.len() > MAX_KEY {
            return Err(Error::EngineKeyTooLarge {
                len: key.len(),
                max: MAX_KEY,
            });
        }
        let keys = self.kv.entry(*object).or_default();
        keys.insert(key.to_vec(), value.to_vec());
        Ok(())
    }
}

/// Fails with [`Error::Fenced`] for the first batch whose epoch is not its virtual shard's.
fn check_epochs(epochs: &[u64], batches: &[ObjectBatch]) -> Result<(), Error> {
    let count = epochs.len() as u32;
    for batch in batches {
        let shard = virtual_shard(&batch.object.id, count);
        let current = epochs[shard as usize];
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

/// Applies one batch to a draft, as LMDB's `apply_batch` does inside its transaction.
fn apply_batch(draft: &mut Draft, batch: &ObjectBatch, now: u64) -> Result<(), Error> {
    if batch.clear {
        draft.keys.clear();
    }
    draft.alarm = batch.alarm.apply(draft.alarm, batch.clear);
    for (key, value) in &batch.mutations {
        match value {
            Some(value) => {
                if key.len() > MAX_KEY {
                    return Err(Error::EngineKeyTooLarge {
                        len: key.len(),
                        max: MAX_KEY,
                    });
                }
                draft.keys.insert(key.clone(), value.clone());
            }
            None => {
                draft.keys.remove(key);
            }
        }
    }
    update_registry(draft, batch, now);
    Ok(())
}

/// Adds, names or removes the object's registry row to match whether it has keys or an alarm.
/// As in LMDB, an empty name counts as none, and the first name and the creation time are kept.
fn update_registry(draft: &mut Draft, batch: &ObjectBatch, now: u64) {
    if draft.keys.is_empty() && draft.alarm.is_none() {
        draft.row = None;
        return;
    }
    let name = batch.name.as_deref().filter(|name| !name.is_empty());
    match &mut draft.row {
        None => {
            draft.row = Some(ObjectRecord {
                id: batch.object.id,
                name: name.map(str::to_owned),
                created_ms: now,
            })
        }
        Some(row) => {
            if row.name.is_none() {
                row.name = name.map(str::to_owned);
            }
        }
    }
}

fn keys_bytes(keys: &Keys) -> usize {
    keys.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::{self, all, batch, del, obj, put};
    use crate::storage::shards::VIRTUAL_SHARDS_MAX;
    use std::sync::Arc;

    #[test]
    fn put_get_delete_round_trips() {
        conformance::put_get_delete_round_trips(&MemoryBackend::new());
    }

    #[test]
    fn batches_of_one_object_apply_in_order() {
        conformance::batches_of_one_object_apply_in_order(&MemoryBackend::new());
    }

    #[test]
    fn model_scan_matches_btreemap() {
        for seed in conformance::model_seeds() {
            conformance::run_model(seed, 200, Box::new(MemoryBackend::new()), |b| b);
        }
    }

    #[test]
    fn objects_and_tags_are_isolated() {
        conformance::objects_and_tags_are_isolated(&MemoryBackend::new());
    }

    #[test]
    fn registry_tracks_objects_with_data() {
        conformance::registry_tracks_objects_with_data(&MemoryBackend::new());
    }

    #[test]
    fn list_objects_paginates_within_a_tag() {
        conformance::list_objects_paginates_within_a_tag(&MemoryBackend::new());
    }

    #[test]
    fn namespaces_are_distinct() {
        let b = MemoryBackend::new();
        let [x, _] = conformance::namespaces_are_distinct(&b);
        b.set_next_tag(u32::MAX);
        assert_eq!(b.namespace("new"), Err(Error::NamespaceTagsExhausted));
        assert_eq!(b.namespace("x").unwrap(), x);
    }

    #[test]
    fn namespace_is_safe_across_threads() {
        conformance::namespace_is_safe_across_threads(&MemoryBackend::new());
    }

    #[test]
    fn map_budget_fails_commits_cleanly() {
        let b = MemoryBackend::with_map_bytes(100);
        let (o, p) = (obj(1, 1), obj(1, 2));
        b.commit(&[batch(o, vec![put(b"a", &[1; 39])])]).unwrap();
        assert_eq!(b.stored_bytes(), 40);
        // A commit past the budget fails whole: the batch that fits with it is not kept.
        let fits = batch(p, vec![put(b"p", b"1")]);
        let too_big = batch(o, vec![put(b"b", &[2; 70])]);
        let full = b.commit(&[fits.clone(), too_big.clone()]);
        assert_eq!(full, Err(Error::MapFull { map_bytes: 100 }));
        assert_eq!(b.get(&p, b"p").unwrap(), None);
        assert_eq!(all(&b, &o), vec![(b"a".to_vec(), vec![1; 39])]);
        assert_eq!(b.list_objects(1, None, 10).unwrap().0.len(), 1);
        assert_eq!(b.stored_bytes(), 40);
        // Alone, the small one fits; the big one fits once it makes room.
        b.commit(&[fits]).unwrap();
        assert_eq!(b.commit(std::slice::from_ref(&too_big)), full);
        let mut room = too_big;
        room.mutations.push(del(b"a"));
        b.commit(&[room]).unwrap();
        assert_eq!(b.stored_bytes(), 2 + 71);
        // Deleting always commits.
        let mut clear = batch(o, vec![]);
        clear.clear = true;
        b.commit(&[clear]).unwrap();
        assert_eq!(b.stored_bytes(), 2);
        assert_eq!(b.list_objects(1, None, 10).unwrap().0.len(), 1);
    }

    #[test]
    fn a_failed_commit_undoes_its_earlier_batches() {
        let b = MemoryBackend::with_map_bytes(50);
        let (o, p) = (obj(1, 1), obj(1, 2));
        let mut named = batch(o, vec![put(b"k", b"old")]);
        named.name = Some("o".into());
        b.commit(&[named]).unwrap();
        let rows = b.list_objects(1, None, 10).unwrap();
        // The first batch clears `o` and renames nothing; the second cannot fit.
        let mut cleared = batch(o, vec![put(b"new", b"1")]);
        cleared.clear = true;
        let result = b.commit(&[cleared, batch(p, vec![put(b"big", &[0; 60])])]);
        assert_eq!(result, Err(Error::MapFull { map_bytes: 50 }));
        assert_eq!(all(&b, &o), vec![(b"k".to_vec(), b"old".to_vec())]);
        assert_eq!(all(&b, &p), vec![]);
        assert_eq!(b.list_objects(1, None, 10).unwrap(), rows);
        assert_eq!(b.stored_bytes(), 4);
    }

    #[test]
    fn alarms_set_replace_delete() {
        conformance::alarms_set_replace_delete(&MemoryBackend::new());
    }

    #[test]
    fn virtual_shard_mapping_is_stable() {
        conformance::virtual_shard_mapping_is_stable();
    }

    #[test]
    fn shard_map_starts_at_1_and_raises() {
        conformance::shard_map_starts_at_1_and_raises(&MemoryBackend::new(), 256);
        let b = MemoryBackend::with_virtual_shards(3).unwrap();
        conformance::shard_map_starts_at_1_and_raises(&b, 3);
    }

    #[test]
    fn virtual_shard_counts_out_of_bounds_are_refused() {
        for count in [0, VIRTUAL_SHARDS_MAX + 1] {
            assert_eq!(
                MemoryBackend::with_virtual_shards(count).err(),
                Some(OpenError::VirtualShardCount {
                    count,
                    max: VIRTUAL_SHARDS_MAX
                })
            );
        }
    }

    #[test]
    fn stale_epoch_is_fenced_and_writes_nothing() {
        conformance::stale_epoch_is_fenced_and_writes_nothing(&MemoryBackend::new());
    }

    #[test]
    fn writer_commits_the_unfenced_batches_of_a_group() {
        conformance::writer_commits_the_unfenced_batches_of_a_group(Arc::new(MemoryBackend::new()));
    }

    #[test]
    fn dumps_round_trip() {
        conformance::dumps_round_trip(&MemoryBackend::new(), &MemoryBackend::new());
    }
}
