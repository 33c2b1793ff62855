//! Checks that every [`Backend`] must pass, run by each backend's tests: the LMDB engine and
//! the in-memory one must answer alike, so that unit tests over the latter say something about
//! the former.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use super::Error;
use super::backend::{AlarmWrite, Backend, Entry, NamespaceRecord, ObjectBatch, ObjectKey, now_ms};
use super::keys::range_is_empty;
use super::lmdb::MAX_NAMESPACE_NAME;
use super::shards::{EPOCH_FIRST, virtual_shard};
use super::writer::Writer;

pub(crate) fn obj(tag: u32, id_byte: u8) -> ObjectKey {
    ObjectKey {
        tag,
        id: [id_byte; 32],
    }
}

pub(crate) fn batch(object: ObjectKey, mutations: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> ObjectBatch {
    ObjectBatch {
        object,
        name: None,
        clear: false,
        mutations,
        alarm: AlarmWrite::Keep,
        epoch: EPOCH_FIRST,
    }
}

pub(crate) fn put(key: &[u8], value: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    (key.to_vec(), Some(value.to_vec()))
}

pub(crate) fn del(key: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    (key.to_vec(), None)
}

pub(crate) fn all(backend: &dyn Backend, object: &ObjectKey) -> Vec<Entry> {
    let (start, end) = (Bound::Unbounded, Bound::Unbounded);
    backend.scan(object, start, end, false, usize::MAX).unwrap()
}

pub(crate) fn long_key(fill: u8, len: usize, tail: &[u8]) -> Vec<u8> {
    let mut key = vec![fill; len];
    key.extend_from_slice(tail);
    key
}

/// Values of empty, short, long (past the split) keys round-trip; overwrites and deletes of
/// present and missing keys apply.
pub(crate) fn put_get_delete_round_trips(b: &dyn Backend) {
    let o = obj(1, 7);
    let big = vec![0xab; 32 * 1024];
    let long = long_key(b'k', 2048, b"");
    let keys: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"".to_vec(), b"empty key".to_vec()),
        (b"zero".to_vec(), Vec::new()),
        (b"big".to_vec(), big.clone()),
        (long.clone(), big.clone()),
        (long_key(b'k', 2047, b""), Vec::new()),
    ];
    let muts = keys.iter().map(|(k, v)| put(k, v)).collect();
    b.commit(&[batch(o, muts)]).unwrap();
    for (k, v) in &keys {
        assert_eq!(
            b.get(&o, k).unwrap().as_ref(),
            Some(v),
            "key len {}",
            k.len()
        );
    }
    assert_eq!(b.get(&o, b"missing").unwrap(), None);
    assert_eq!(b.get(&o, &long_key(b'k', 2049, b"")).unwrap(), None);
    // Overwrite, then delete present and missing keys.
    b.commit(&[batch(o, vec![put(b"zero", b"now 1"), put(&long, b"v2")])])
        .unwrap();
    assert_eq!(b.get(&o, b"zero").unwrap(), Some(b"now 1".to_vec()));
    assert_eq!(b.get(&o, &long).unwrap(), Some(b"v2".to_vec()));
    let missing_long = long_key(b'k', 3000, b"");
    b.commit(&[batch(
        o,
        vec![del(b"big"), del(&long), del(b"nope"), del(&missing_long)],
    )])
    .unwrap();
    assert_eq!(b.get(&o, b"big").unwrap(), None);
    assert_eq!(b.get(&o, &long).unwrap(), None);
    assert_eq!(b.get(&o, b"zero").unwrap(), Some(b"now 1".to_vec()));
    assert_eq!(all(b, &o).len(), 3);
}

/// Batches of one object in one commit apply in order, `clear` first within its batch.
pub(crate) fn batches_of_one_object_apply_in_order(b: &dyn Backend) {
    let o = obj(1, 1);
    let first = batch(o, vec![put(b"a", b"1"), put(b"b", b"1")]);
    let mut second = batch(o, vec![put(b"c", b"2"), del(b"a")]);
    second.clear = false;
    let mut third = batch(o, vec![put(b"d", b"3")]);
    third.clear = true;
    b.commit(&[first.clone(), second.clone()]).unwrap();
    assert_eq!(
        all(b, &o),
        vec![
            (b"b".to_vec(), b"1".to_vec()),
            (b"c".to_vec(), b"2".to_vec())
        ]
    );
    b.commit(&[first, third]).unwrap();
    assert_eq!(all(b, &o), vec![(b"d".to_vec(), b"3".to_vec())]);
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        const ALPHABET: [u8; 4] = [0x00, 0x01, b'a', 0xff];
        (0..len).map(|_| ALPHABET[self.below(4)]).collect()
    }

    /// Keys that often share 400-byte prefixes, straddle the short/long split, and are
    /// prefixes of one another.
    fn key(&mut self) -> Vec<u8> {
        match self.below(8) {
            0 => {
                let len = self.below(7);
                self.bytes(len)
            }
            1 => {
                let len = self.below(1101);
                self.bytes(len)
            }
            _ => {
                const LENS: [usize; 8] = [398, 399, 400, 400, 401, 402, 450, 1000];
                let base = if self.below(3) == 0 { 0x01 } else { b'a' };
                let mut key = vec![b'a'; LENS[self.below(LENS.len())]];
                // A second base that differs just before the split.
                if base == 0x01 && key.len() >= 399 {
                    key[398] = 0x01;
                }
                let tail = self.below(4);
                key.extend(self.bytes(tail));
                key.truncate(1100);
                key
            }
        }
    }
}

type Model = BTreeMap<ObjectKey, BTreeMap<Vec<u8>, Vec<u8>>>;

fn model_scan(
    model: &BTreeMap<Vec<u8>, Vec<u8>>,
    start: Bound<&[u8]>,
    end: Bound<&[u8]>,
    reverse: bool,
    limit: usize,
) -> Vec<Entry> {
    if range_is_empty(start, end) {
        return Vec::new();
    }
    let range = model
        .range::<[u8], _>((start, end))
        .map(|(k, v)| (k.clone(), v.clone()));
    if reverse {
        range.rev().take(limit).collect()
    } else {
        range.take(limit).collect()
    }
}

fn random_batch(rng: &mut Rng, objects: &[ObjectKey], model: &Model, seq: u64) -> ObjectBatch {
    let object = objects[rng.below(objects.len())];
    let existing: Vec<&Vec<u8>> = model
        .get(&object)
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let mut mutations = Vec::new();
    for _ in 0..1 + rng.below(8) {
        let key = if !existing.is_empty() && rng.below(3) == 0 {
            existing[rng.below(existing.len())].clone()
        } else {
            rng.key()
        };
        let value = (rng.below(10) != 0).then(|| {
            let mut v = seq.to_be_bytes().to_vec();
            v.truncate(rng.below(9));
            v
        });
        mutations.push((key, value));
    }
    ObjectBatch {
        object,
        name: Some(format!("n{}", object.id[0])),
        clear: rng.below(25) == 0,
        mutations,
        alarm: AlarmWrite::Keep,
        epoch: EPOCH_FIRST,
    }
}

fn apply_to_model(model: &mut Model, batch: &ObjectBatch) {
    let keys = model.entry(batch.object).or_default();
    if batch.clear {
        keys.clear();
    }
    for (k, v) in &batch.mutations {
        match v {
            Some(v) => keys.insert(k.clone(), v.clone()),
            None => keys.remove(k),
        };
    }
}

fn bounds(key: &[u8]) -> [Bound<&[u8]>; 2] {
    [Bound::Included(key), Bound::Excluded(key)]
}

fn check_object(
    b: &dyn Backend,
    rng: &mut Rng,
    object: &ObjectKey,
    keys: &BTreeMap<Vec<u8>, Vec<u8>>,
    seed: u64,
) {
    for (k, v) in keys {
        assert_eq!(
            b.get(object, k).unwrap().as_ref(),
            Some(v),
            "seed {seed}: get"
        );
    }
    let mut candidates: Vec<Vec<u8>> = (0..4).map(|_| rng.key()).collect();
    let existing: Vec<&Vec<u8>> = keys.keys().collect();
    for _ in 0..2 {
        if !existing.is_empty() {
            candidates.push(existing[rng.below(existing.len())].clone());
        }
    }
    for c in &candidates {
        let expected = keys.get(c);
        assert_eq!(
            b.get(object, c).unwrap().as_ref(),
            expected,
            "seed {seed}: get candidate"
        );
    }
    let mut all_bounds = vec![Bound::Unbounded];
    all_bounds.extend(candidates.iter().flat_map(|c| bounds(c)));
    for &start in &all_bounds {
        for &end in &all_bounds {
            for reverse in [false, true] {
                for limit in [0, 1, 3, usize::MAX] {
                    let got = b.scan(object, start, end, reverse, limit).unwrap();
                    let want = model_scan(keys, start, end, reverse, limit);
                    if got != want {
                        let show = |bound: Bound<&[u8]>| {
                            bound.map(|k| (k.len(), k.iter().rposition(|&x| x != b'a')))
                        };
                        panic!(
                            "seed {seed}: scan {:?}..{:?} reverse {reverse} limit {limit}: got {} entries, want {}",
                            show(start),
                            show(end),
                            got.len(),
                            want.len()
                        );
                    }
                }
            }
        }
    }
}

fn check_all(b: &dyn Backend, rng: &mut Rng, objects: &[ObjectKey], model: &Model, seed: u64) {
    let empty = BTreeMap::new();
    for object in objects {
        check_object(b, rng, object, model.get(object).unwrap_or(&empty), seed);
    }
    let listed = b.list_objects(1, None, usize::MAX).unwrap().0;
    let listed: Vec<[u8; 32]> = listed.iter().map(|r| r.id).collect();
    let want: Vec<[u8; 32]> = model
        .iter()
        .filter(|(o, keys)| o.tag == 1 && !keys.is_empty())
        .map(|(o, _)| o.id)
        .collect();
    assert_eq!(listed, want, "seed {seed}: registry");
}

/// Seeds of the model test: `DURO_MODEL_SEED` if set, else a fixed few.
pub(crate) fn model_seeds() -> Vec<u64> {
    match std::env::var("DURO_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => vec![0x9e37_79b9_7f4a_7c15, 42, 7_777_777],
    }
}

/// Commits random batches (long keys sharing prefixes, clears, deletes; several objects per
/// commit) and checks the backend against a `BTreeMap` model: every get, scans over many bounds
/// in both directions with several limits, and the object registry. At the end `reopen` gets
/// the backend (a persistent one drops and reopens it; an in-memory one hands it back) and
/// everything is checked again.
pub(crate) fn run_model(
    seed: u64,
    commits: u64,
    b: Box<dyn Backend>,
    reopen: impl FnOnce(Box<dyn Backend>) -> Box<dyn Backend>,
) {
    eprintln!("model test seed {seed} (rerun with DURO_MODEL_SEED={seed})");
    let mut rng = Rng(seed.max(1)); // xorshift stays at 0 forever
    // Neighbouring objects and tags, to catch leaks across prefixes.
    let objects = [obj(1, 0x10), obj(1, 0x11), obj(2, 0x10)];
    let mut model = Model::new();
    for seq in 0..commits {
        let batches: Vec<ObjectBatch> = (0..1 + rng.below(3))
            .map(|_| random_batch(&mut rng, &objects, &model, seq))
            .collect();
        b.commit(&batches).unwrap();
        batches
            .iter()
            .for_each(|batch| apply_to_model(&mut model, batch));
        if seq % 15 == 14 {
            check_all(&*b, &mut rng, &objects, &model, seed);
        }
    }
    let b = reopen(b);
    check_all(&*b, &mut rng, &objects, &model, seed);
}

/// Objects of adjacent prefixes and tags never see each other's keys, in scans both ways,
/// gets and clears.
pub(crate) fn objects_and_tags_are_isolated(b: &dyn Backend) {
    // Adjacent prefixes: `a`'s successor prefix is `next`, whose empty key's address is
    // exactly that successor; `last` has the greatest possible prefix.
    let mut id = [0u8; 32];
    id[31] = 5;
    let a = ObjectKey { tag: 1, id };
    id[31] = 6;
    let next = ObjectKey { tag: 1, id };
    let other_tag = ObjectKey { tag: 2, id: a.id };
    let last = ObjectKey {
        tag: u32::MAX,
        id: [0xff; 32],
    };
    let long = long_key(b'x', 700, b"");
    let objects = [a, next, other_tag, last];
    let batches: Vec<ObjectBatch> = objects
        .iter()
        .enumerate()
        .map(|(i, &o)| {
            batch(
                o,
                vec![
                    put(b"", &[i as u8]),
                    put(b"k", &[i as u8]),
                    put(&long, &[i as u8]),
                ],
            )
        })
        .collect();
    b.commit(&batches).unwrap();
    for (i, o) in objects.iter().enumerate() {
        let want: Vec<Entry> = [b"".to_vec(), b"k".to_vec(), long.clone()]
            .into_iter()
            .map(|k| (k, vec![i as u8]))
            .collect();
        assert_eq!(all(b, o), want);
        let reversed = b
            .scan(o, Bound::Unbounded, Bound::Unbounded, true, usize::MAX)
            .unwrap();
        assert_eq!(reversed, want.iter().rev().cloned().collect::<Vec<_>>());
        assert_eq!(b.get(o, &long).unwrap(), Some(vec![i as u8]));
    }
    // Clearing one object leaves its neighbours alone.
    let mut clear = batch(a, vec![]);
    clear.clear = true;
    b.commit(&[clear]).unwrap();
    assert!(all(b, &a).is_empty());
    assert_eq!(b.get(&a, b"k").unwrap(), None);
    for (i, o) in objects.iter().enumerate().skip(1) {
        assert_eq!(all(b, o).len(), 3, "object {i}");
    }
    assert_eq!(b.list_objects(1, None, 10).unwrap().0.len(), 1);
    assert_eq!(b.list_objects(2, None, 10).unwrap().0.len(), 1);
    assert_eq!(b.list_objects(u32::MAX, None, 10).unwrap().0.len(), 1);
}

/// An object enters the registry with its first key (with its name and creation time, kept
/// afterwards), gains a name later if it had none, and leaves with its last key or a clear.
pub(crate) fn registry_tracks_objects_with_data(b: &dyn Backend) {
    let (o, p) = (obj(1, 1), obj(1, 2));
    let before = now_ms();
    let mut first = batch(o, vec![put(b"a", b"1"), put(b"b", b"2")]);
    first.name = Some("alice".into());
    // A batch that stores nothing does not register its object.
    b.commit(&[first, batch(p, vec![del(b"x")])]).unwrap();
    let (rows, more) = b.list_objects(1, None, 10).unwrap();
    assert!(!more);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].id, rows[0].name.as_deref()), (o.id, Some("alice")));
    let created = rows[0].created_ms;
    assert!(created >= before && created <= now_ms());
    // The first name and creation time are kept.
    let mut again = batch(o, vec![put(b"c", b"3")]);
    again.name = Some("bob".into());
    b.commit(&[again]).unwrap();
    assert_eq!(b.list_objects(1, None, 10).unwrap().0, rows);
    // Deleting keys one by one: it leaves with the last one.
    b.commit(&[batch(o, vec![del(b"a"), del(b"b")])]).unwrap();
    assert_eq!(b.list_objects(1, None, 10).unwrap().0.len(), 1);
    b.commit(&[batch(o, vec![del(b"c")])]).unwrap();
    assert_eq!(b.list_objects(1, None, 10).unwrap(), (vec![], false));
    // An unnamed object gains a name later; `clear` removes it.
    b.commit(&[batch(p, vec![put(b"k", b"v")])]).unwrap();
    assert_eq!(b.list_objects(1, None, 10).unwrap().0[0].name, None);
    let mut named = batch(p, vec![]);
    named.name = Some("carol".into());
    b.commit(&[named]).unwrap();
    assert_eq!(
        b.list_objects(1, None, 10).unwrap().0[0].name.as_deref(),
        Some("carol")
    );
    let mut clear = batch(p, vec![]);
    clear.clear = true;
    b.commit(&[clear]).unwrap();
    assert_eq!(b.list_objects(1, None, 10).unwrap(), (vec![], false));
}

/// `list_objects` pages through one tag in ID order, saying whether more remain.
pub(crate) fn list_objects_paginates_within_a_tag(b: &dyn Backend) {
    let ids = [3u8, 5, 9, 0xff];
    let mut batches: Vec<ObjectBatch> = ids
        .iter()
        .map(|&i| batch(obj(7, i), vec![put(b"k", b"v")]))
        .collect();
    batches.push(batch(obj(6, 4), vec![put(b"k", b"v")]));
    batches.push(batch(obj(8, 0), vec![put(b"k", b"v")]));
    b.commit(&batches).unwrap();
    let page = |after: Option<u8>, limit| {
        let after = after.map(|i| [i; 32]);
        let (rows, more) = b.list_objects(7, after.as_ref(), limit).unwrap();
        (rows.iter().map(|r| r.id[0]).collect::<Vec<_>>(), more)
    };
    assert_eq!(page(None, 2), (vec![3, 5], true));
    assert_eq!(page(Some(5), 2), (vec![9, 0xff], false));
    assert_eq!(page(Some(4), 1), (vec![5], true));
    assert_eq!(page(Some(9), 1), (vec![0xff], false));
    assert_eq!(page(Some(0xff), 5), (vec![], false));
    assert_eq!(page(None, 0), (vec![], true));
    assert_eq!(page(None, 4), (ids.to_vec(), false));
    assert_eq!(b.list_objects(5, None, 10).unwrap(), (vec![], false));
}

/// Namespaces get tags 1, 2, ... and distinct random secrets, the same record on every call;
/// a name past the limit is refused. Returns the records of `x` and `y`, for a persistent
/// backend to check after a reopen.
pub(crate) fn namespaces_are_distinct(b: &dyn Backend) -> [NamespaceRecord; 2] {
    let x = b.namespace("x").unwrap();
    let y = b.namespace("y").unwrap();
    assert_eq!((x.tag, y.tag), (1, 2));
    assert_ne!(x.secret, y.secret);
    assert_ne!(x.secret, [0; 32]);
    assert_eq!(b.namespace("x").unwrap(), x);
    assert!(b.namespace(&"n".repeat(MAX_NAMESPACE_NAME)).is_ok());
    assert_eq!(
        b.namespace(&"n".repeat(MAX_NAMESPACE_NAME + 1)),
        Err(Error::NamespaceNameTooLong {
            len: MAX_NAMESPACE_NAME + 1,
            max: MAX_NAMESPACE_NAME
        })
    );
    [x, y]
}

/// Concurrent first uses of the same names agree on one record per name.
pub(crate) fn namespace_is_safe_across_threads(b: &dyn Backend) {
    let records: Vec<Vec<NamespaceRecord>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    ["a", "b", "c"]
                        .iter()
                        .map(|n| b.namespace(n).unwrap())
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(records.iter().all(|r| *r == records[0]));
    let mut tags: Vec<u32> = records[0].iter().map(|r| r.tag).collect();
    tags.sort();
    assert_eq!(tags, vec![1, 2, 3]);
}

fn with_alarm(object: ObjectKey, alarm: AlarmWrite) -> ObjectBatch {
    ObjectBatch {
        alarm,
        ..batch(object, Vec::new())
    }
}

/// Set, replace and delete an object's alarm; the index pages in (time, object) order and
/// follows every change; `clear` deletes the alarm; an object with only an alarm is listed.
pub(crate) fn alarms_set_replace_delete(b: &dyn Backend) {
    let (x, y, z) = (obj(1, 1), obj(1, 2), obj(2, 1));
    assert_eq!(b.alarm(&x).unwrap(), None);
    assert_eq!(b.next_alarms(None, 10).unwrap(), vec![]);
    b.commit(&[
        with_alarm(x, AlarmWrite::Set(300)),
        with_alarm(y, AlarmWrite::Set(100)),
        with_alarm(z, AlarmWrite::Set(100)),
    ])
    .unwrap();
    assert_eq!(b.alarm(&x).unwrap(), Some(300));
    let all = vec![(100, y), (100, z), (300, x)];
    assert_eq!(b.next_alarms(None, 10).unwrap(), all);
    assert_eq!(b.next_alarms(None, 2).unwrap(), all[..2]);
    assert_eq!(b.next_alarms(Some(all[1]), 10).unwrap(), all[2..]);
    assert_eq!(b.next_alarms(Some((100, x)), 10).unwrap(), all);
    assert_eq!(b.next_alarms(Some(all[2]), 10).unwrap(), vec![]);
    // An object with an alarm and no keys is in the registry.
    let (rows, _) = b.list_objects(1, None, 10).unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [x.id, y.id]);
    // Replace: the old index entry goes.
    b.commit(&[with_alarm(x, AlarmWrite::Set(50))]).unwrap();
    let want = vec![(50, x), (100, y), (100, z)];
    assert_eq!(b.next_alarms(None, 10).unwrap(), want);
    // Delete, and keys kept across an alarm change.
    let mut keyed = with_alarm(y, AlarmWrite::Delete);
    keyed.mutations.push(put(b"k", b"v"));
    b.commit(&[keyed, with_alarm(x, AlarmWrite::Delete)])
        .unwrap();
    assert_eq!(b.alarm(&y).unwrap(), None);
    assert_eq!(b.next_alarms(None, 10).unwrap(), vec![(100, z)]);
    let (rows, _) = b.list_objects(1, None, 10).unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [y.id]);
    // Clear deletes the alarm; a set after the clear in the same batch stays.
    let mut cleared = with_alarm(z, AlarmWrite::Keep);
    cleared.clear = true;
    b.commit(&[cleared]).unwrap();
    assert_eq!(b.alarm(&z).unwrap(), None);
    let mut reset = with_alarm(y, AlarmWrite::Set(7));
    reset.clear = true;
    b.commit(&[reset]).unwrap();
    assert_eq!(all_keys(b, &y), 0);
    assert_eq!(b.next_alarms(None, 10).unwrap(), vec![(7, y)]);
    assert_eq!(b.list_objects(2, None, 10).unwrap().0, vec![]);
}

fn all_keys(b: &dyn Backend, object: &ObjectKey) -> usize {
    all(b, object).len()
}

/// An ID whose first four bytes (the ones [`virtual_shard`] reads) are `head`, the rest `fill`.
pub(crate) fn id_with_head(head: [u8; 4], fill: u8) -> [u8; 32] {
    let mut id = [fill; 32];
    id[..4].copy_from_slice(&head);
    id
}

/// The ID → virtual shard mapping is the documented formula (first four bytes big-endian, mod
/// the count), for a few fixed IDs: data dirs depend on it never changing. The expected
/// shards are worked out by hand from the formula.
pub(crate) fn virtual_shard_mapping_is_stable() {
    let a = id_with_head([0x12, 0x34, 0x56, 0x78], 0xee); // 0x12345678 = 305_419_896
    assert_eq!(virtual_shard(&a, 256), 0x78);
    assert_eq!(virtual_shard(&a, 1000), 896);
    assert_eq!(virtual_shard(&a, 65536), 0x5678);
    assert_eq!(virtual_shard(&a, 1), 0);
    let b = id_with_head([0xff; 4], 0); // 4_294_967_295 = 7 × 613_566_756 + 3
    assert_eq!(virtual_shard(&b, 7), 3);
    assert_eq!(virtual_shard(&b, 256), 255);
    // Only the first four bytes count.
    let c = id_with_head([0, 0, 1, 2], 0x55);
    assert_eq!(virtual_shard(&c, 256), 2);
    assert_eq!(virtual_shard(&c, 300), 258);
    assert_eq!(virtual_shard(&id_with_head([0, 0, 1, 2], 0), 300), 258);
}

/// A fresh backend has `count` virtual shards, each at epoch 1. Raising an epoch is durable
/// (the map reads it back), touches that shard only, and past the count fails, changing
/// nothing.
pub(crate) fn shard_map_starts_at_1_and_raises(b: &dyn Backend, count: u32) {
    let map = b.shard_map().unwrap();
    assert_eq!(map.count(), count);
    assert!(map.epochs().iter().all(|&e| e == EPOCH_FIRST));
    let last = count - 1;
    assert_eq!(b.raise_epoch(last).unwrap(), 2);
    assert_eq!(b.raise_epoch(last).unwrap(), 3);
    assert_eq!(
        b.raise_epoch(count),
        Err(Error::NoSuchShard {
            virtual_shard: count,
            count
        })
    );
    let map = b.shard_map().unwrap();
    assert_eq!(map.epoch(last), Some(3));
    let others = &map.epochs()[..last as usize];
    assert!(others.iter().all(|&e| e == EPOCH_FIRST));
}

/// After a shard's epoch is raised, a commit holding a batch made under the old epoch fails
/// with `Fenced` (naming the shard, the batch's epoch and the current one) and writes nothing,
/// not even the other batches of the commit; a batch under the current epoch commits. The
/// backend places the object by the documented formula. `b` has the default count.
pub(crate) fn stale_epoch_is_fenced_and_writes_nothing(b: &dyn Backend) {
    let x = ObjectKey {
        tag: 1,
        id: id_with_head([0, 0, 0, 7], 1),
    };
    let y = ObjectKey {
        tag: 1,
        id: id_with_head([0, 0, 0, 8], 1),
    };
    assert_eq!(b.raise_epoch(7).unwrap(), 2);
    let fenced = b.commit(&[
        batch(y, vec![put(b"k", b"y")]),
        batch(x, vec![put(b"k", b"x")]),
    ]);
    assert_eq!(
        fenced,
        Err(Error::Fenced {
            virtual_shard: 7,
            epoch: 1,
            current: 2
        })
    );
    assert_eq!(b.get(&y, b"k").unwrap(), None);
    assert_eq!(b.get(&x, b"k").unwrap(), None);
    assert_eq!(b.list_objects(1, None, 10).unwrap().0, vec![]);
    // An epoch from the future is not the shard's either.
    let ahead = ObjectBatch {
        epoch: 3,
        ..batch(x, vec![put(b"k", b"x")])
    };
    assert!(matches!(b.commit(&[ahead]), Err(Error::Fenced { .. })));
    let current = ObjectBatch {
        epoch: 2,
        ..batch(x, vec![put(b"k", b"x")])
    };
    b.commit(&[current, batch(y, vec![put(b"k", b"y")])])
        .unwrap();
    assert_eq!(b.get(&x, b"k").unwrap(), Some(b"x".to_vec()));
    assert_eq!(b.get(&y, b"k").unwrap(), Some(b"y".to_vec()));
}

/// Through the writer: in one group, the batches made under a stale epoch are answered
/// `Fenced` and write nothing, while the other objects' batches of the group commit.
pub(crate) fn writer_commits_the_unfenced_batches_of_a_group(b: Arc<dyn Backend>) {
    let stale = ObjectKey {
        tag: 1,
        id: id_with_head([0, 0, 1, 3], 9), // shard 259 % 256 = 3
    };
    let (y, z) = (obj(1, 4), obj(1, 5)); // shards 0x04040404 % 256 = 4, and 5
    assert_eq!(b.raise_epoch(3).unwrap(), 2);
    let writer = Writer::spawn(b.clone()).unwrap();
    let answers = writer
        .handle()
        .submit(vec![
            batch(y, vec![put(b"k", b"y")]),
            batch(stale, vec![put(b"k", b"stale")]),
            batch(z, vec![put(b"k", b"z")]),
            batch(stale, vec![put(b"later", b"stale")]),
        ])
        .blocking_recv()
        .unwrap();
    let fenced = Err(Error::Fenced {
        virtual_shard: 3,
        epoch: 1,
        current: 2,
    });
    assert_eq!(answers, vec![Ok(()), fenced.clone(), Ok(()), fenced]);
    assert_eq!(b.get(&y, b"k").unwrap(), Some(b"y".to_vec()));
    assert_eq!(b.get(&z, b"k").unwrap(), Some(b"z".to_vec()));
    assert_eq!(all_keys(&*b, &stale), 0);
}

fn dump(b: &dyn Backend, namespaces: &[&str]) -> Vec<super::backend::DumpItem> {
    let names: Vec<String> = namespaces.iter().map(|n| n.to_string()).collect();
    let mut items = Vec::new();
    b.export(&names, &mut |item| {
        items.push(item);
        true
    })
    .unwrap();
    items
}

/// An export read back by an import into another engine gives the same dump: keys (long ones
/// too), values, names, creation times and alarms; a conflict or a bad order writes nothing;
/// `overwrite` replaces an object whole; a namespace takes the dump's secret only while empty.
pub(crate) fn dumps_round_trip(source: &dyn Backend, target: &dyn Backend) {
    use super::backend::DumpItem;
    let ns = source.namespace("a").unwrap();
    source.namespace("empty").unwrap();
    let (one, two) = (obj(ns.tag, 1), obj(ns.tag, 2));
    let long = long_key(b'k', 1000, b"tail");
    let mut named = batch(
        one,
        vec![put(b"x", b"1"), put(&long, b"long"), put(b"", b"")],
    );
    named.name = Some("first \u{1F600} \"q\"\n".into());
    let alarm_only = with_alarm(two, AlarmWrite::Set(12_345));
    source.commit(&[named, alarm_only]).unwrap();
    let exported = dump(source, &["a", "empty", "unknown"]);
    assert_eq!(exported.len(), 2 + 1 + 3 + 1, "{exported:?}");

    // Into a target whose namespace "a" has another secret but no objects: it takes the dump's.
    let other = target.namespace("a").unwrap();
    assert_ne!(other.secret, ns.secret);
    let mut items = exported.clone().into_iter().map(Ok);
    let report = target.import(&mut items, false).unwrap();
    assert_eq!((report.namespaces, report.objects, report.keys), (2, 2, 3));
    assert_eq!(report.new_secrets, vec!["a".to_string()]);
    assert_eq!(target.namespace("a").unwrap().secret, ns.secret);
    assert_eq!(dump(target, &["a", "empty"]), exported);
    let tag = target.namespace("a").unwrap().tag;
    assert_eq!(target.alarm(&obj(tag, 2)).unwrap(), Some(12_345));
    assert_eq!(
        target.next_alarms(None, 10).unwrap(),
        vec![(12_345, obj(tag, 2))]
    );

    // Again: every object conflicts, and nothing changes.
    let mut changed = exported.clone();
    changed.push(DumpItem::Key {
        key: b"new".to_vec(),
        value: b"v".to_vec(),
    });
    let mut items = changed.clone().into_iter().map(Ok);
    let error = target.import(&mut items, false).unwrap_err();
    assert!(matches!(error, Error::ImportConflict(_)), "{error}");
    assert_eq!(dump(target, &["a", "empty"]), exported);

    // An item that fails midway writes nothing either.
    let mut items = changed
        .clone()
        .into_iter()
        .take(3)
        .map(Ok)
        .chain([Err(Error::InvalidImport("line 4: not JSON".into()))]);
    let error = target.import(&mut items, true).unwrap_err();
    assert!(matches!(error, Error::InvalidImport(_)), "{error}");
    assert_eq!(dump(target, &["a", "empty"]), exported);

    // Overwrite: object 1 becomes exactly what the dump says (its "x" is gone).
    let mut only_one: Vec<_> = exported[..2].to_vec();
    only_one.push(DumpItem::Key {
        key: b"y".to_vec(),
        value: b"2".to_vec(),
    });
    let mut items = only_one.into_iter().map(Ok);
    target.import(&mut items, true).unwrap();
    assert_eq!(
        all(target, &obj(tag, 1)),
        vec![(b"y".to_vec(), b"2".to_vec())]
    );
    assert_eq!(target.alarm(&obj(tag, 2)).unwrap(), Some(12_345));

    // A namespace with objects under another secret refuses the dump whole.
    let mut foreign = exported.clone();
    foreign[0] = DumpItem::Namespace {
        name: "a".into(),
        secret: [9; 32],
    };
    let mut items = foreign.into_iter().map(Ok);
    let error = target.import(&mut items, true).unwrap_err();
    assert!(matches!(error, Error::ImportConflict(_)), "{error}");
    assert_eq!(target.namespace("a").unwrap().secret, ns.secret);

    // Order rules.
    let key_first = vec![Ok(DumpItem::Key {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    })];
    let error = target
        .import(&mut key_first.into_iter(), false)
        .unwrap_err();
    assert!(matches!(error, Error::InvalidImport(_)), "{error}");
    let twice = [exported[0].clone(), exported[0].clone()];
    let error = target
        .import(&mut twice.into_iter().map(Ok), false)
        .unwrap_err();
    assert!(matches!(error, Error::InvalidImport(_)), "{error}");
}
