//! The storage writer: one thread that owns every write to the backend.
//!
//! Objects submit batches (each one atomic unit); the writer takes every batch that is waiting,
//! commits them in one transaction with one fsync (group commit), and answers each. While it
//! commits, new batches queue up and join the next commit, so under load many objects share one
//! fsync. The event loop never waits on the backend's write lock.
//!
//! Each batch gets its own answer. When a group fails because the disk is full, its batches are
//! committed again apart (halving the group), so that only the objects whose writes cannot fit
//! fail, not every object that happened to share the commit. When a group fails because a batch
//! was fenced (made under an ownership epoch its virtual shard no longer has), the fenced
//! batches are answered [`Error::Fenced`] and the others committed again without them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::Error;
use super::backend::{Backend, ObjectBatch, ObjectKey};
use crate::metrics::StorageMetrics;

/// Most batches in one commit: bounds the time one commit takes, and so the latency of the
/// batches behind it.
const COMMIT_BATCHES_MAX: usize = 4096;
/// Most mutations in one commit, for the same reason (1000 puts commit in ~15 ms here).
const COMMIT_MUTATIONS_MAX: usize = 64 * 1024;

/// The answer to a group of batches: one result per batch, in the order submitted.
pub(crate) type Answers = Vec<Result<(), Error>>;

/// A group of batches (of different objects) handed over together, answered together.
struct Job {
    batches: Vec<ObjectBatch>,
    done: oneshot::Sender<Answers>,
}

/// Counters of the writer's work, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Batches handed to the writer.
    pub submitted: AtomicU64,
    /// Groups of batches handed to the writer (one each time an event loop flushes).
    pub groups: AtomicU64,
    /// Transactions committed (or attempted), the retries of a group that hit a full disk
    /// included.
    pub commits: AtomicU64,
    /// Batches they carried (a retried batch counts again).
    pub batches: AtomicU64,
}

/// Owns the writer thread; dropping it (or [`Writer::shutdown`]) finishes queued batches first.
pub(crate) struct Writer {
    handle: WriterHandle,
    thread: Option<JoinHandle<()>>,
}

/// Submits batches to the writer. Cheap to clone.
#[derive(Clone)]
pub(crate) struct WriterHandle {
    /// `None` once the writer shut down. Behind a mutex only so the handle is `Sync`; it is used
    /// from one thread, so it is never contended.
    sender: Arc<Mutex<Option<mpsc::Sender<Job>>>>,
    pub(crate) stats: Arc<WriterStats>,
    /// Whether the writer is at work on a group (else it waits for one); set by its thread.
    committing: Arc<AtomicBool>,
}

impl Writer {
    /// A writer whose metrics count into no registry.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn spawn(backend: Arc<dyn Backend>) -> std::io::Result<Writer> {
        Writer::spawn_measured(backend, StorageMetrics::detached())
    }

    /// A writer that counts its commits in `metrics`.
    pub(crate) fn spawn_measured(
        backend: Arc<dyn Backend>,
        metrics: StorageMetrics,
    ) -> std::io::Result<Writer> {
        let (sender, receiver) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let tally = Tally {
            stats: stats.clone(),
            metrics,
        };
        let committing = Arc::new(AtomicBool::new(false));
        let at_work = committing.clone();
        let thread = std::thread::Builder::new()
            .name("duro-writer".into())
            .spawn(move || run(&*backend, &receiver, &tally, &at_work))?;
        let handle = WriterHandle {
            sender: Arc::new(Mutex::new(Some(sender))),
            stats,
            committing,
        };
        Ok(Writer {
            handle,
            thread: Some(thread),
        })
    }

    pub(crate) fn handle(&self) -> WriterHandle {
        self.handle.clone()
    }

    /// Commits what is queued, then stops the thread. Later submissions fail.
    pub(crate) fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.handle
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl WriterHandle {
    /// Queues a group of batches; the receiver answers once they are settled, with one result
    /// per batch in their order: `Ok` once durable, or the error that lost it. They commit in
    /// one transaction (with whatever else is queued), unless the disk is full (see the
    /// module docs).
    pub(crate) fn submit(&self, batches: Vec<ObjectBatch>) -> oneshot::Receiver<Answers> {
        let (done, receiver) = oneshot::channel();
        self.stats
            .submitted
            .fetch_add(batches.len() as u64, Ordering::Relaxed);
        self.stats.groups.fetch_add(1, Ordering::Relaxed);
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job { batches, done };
        let refused = match sender.as_ref() {
            Some(sender) => sender.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = refused {
            let _ = job.done.send(vec![Err(Error::Closed); job.batches.len()]);
        }
        receiver
    }

    /// Whether the writer is at work on a group: what is submitted now joins the next one,
    /// which starts when this one is done. Else what is submitted starts a commit at once.
    pub(crate) fn is_committing(&self) -> bool {
        self.committing.load(Ordering::Relaxed)
    }
}

fn run(
    backend: &dyn Backend,
    receiver: &mpsc::Receiver<Job>,
    stats: &Tally,
    committing: &AtomicBool,
) {
    loop {
        let first = match receiver.try_recv() {
            Ok(job) => job,
            Err(_) => {
                committing.store(false, Ordering::Relaxed);
                match receiver.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            }
        };
        committing.store(true, Ordering::Relaxed);
        let mut batches = first.batches.len();
        let mut mutations = mutations_of(&first);
        let mut jobs = vec![first];
        while batches < COMMIT_BATCHES_MAX && mutations < COMMIT_MUTATIONS_MAX {
            match receiver.try_recv() {
                Ok(job) => {
                    batches += job.batches.len();
                    mutations += mutations_of(&job);
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        commit(backend, jobs, stats);
    }
}

fn mutations_of(job: &Job) -> usize {
    job.batches.iter().map(|b| b.mutations.len()).sum()
}

fn commit(backend: &dyn Backend, jobs: Vec<Job>, stats: &Tally) {
    let mut batches = Vec::new();
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        answers.push((job.done, job.batches.len()));
        batches.extend(job.batches);
    }
    let mut results = commit_group(backend, &batches, stats).into_iter();
    for (done, count) in answers {
        let _ = done.send(results.by_ref().take(count).collect());
    }
}

/// Commits `batches` in one transaction; if the disk is full, commits them apart. One result
/// per batch.
fn commit_group(backend: &dyn Backend, batches: &[ObjectBatch], stats: &Tally) -> Answers {
    match attempt(backend, batches, stats) {
        Ok(()) => vec![Ok(()); batches.len()],
        Err(Error::MapFull { .. }) if batches.len() > 1 => commit_apart(backend, batches, stats),
        Err(fenced @ Error::Fenced { .. }) => commit_unfenced(backend, batches, &fenced, stats),
        Err(error) => {
            tracing::error!(%error, batches = batches.len(), "commit failed");
            vec![Err(error); batches.len()]
        }
    }
}

/// Commits the batches of a group that failed on a full disk in halves, halving again each
/// part that fails on a full disk, so that the batches that fit commit and only a batch that
/// cannot fit on its own fails. Parts commit in order, and a batch whose object already failed
/// here fails without being committed: an object's batches never commit after one of its
/// earlier ones failed (see `store`). At most 2n - 1 transactions for n batches, and n is
/// bounded by [`COMMIT_BATCHES_MAX`]; one bad batch among n costs about 2 log2(n).
fn commit_apart(backend: &dyn Backend, batches: &[ObjectBatch], stats: &Tally) -> Answers {
    let mut results: Vec<Option<Result<(), Error>>> = vec![None; batches.len()];
    let mut failed: HashMap<ObjectKey, Error> = HashMap::new();
    let all: Vec<usize> = (0..batches.len()).collect();
    // Parts left to commit, as indices into `batches`; the last is the next in order.
    let mut todo: Vec<Vec<usize>> = halves(all).into_iter().rev().collect();
    while let Some(part) = todo.pop() {
        let (live, doomed): (Vec<usize>, Vec<usize>) = part
            .into_iter()
            .partition(|&i| !failed.contains_key(&batches[i].object));
        for i in doomed {
            results[i] = failed.get(&batches[i].object).cloned().map(Err);
        }
        if live.is_empty() {
            continue;
        }
        match attempt_part(backend, batches, &live, stats) {
            Ok(()) => live.iter().for_each(|&i| results[i] = Some(Ok(()))),
            Err(Error::MapFull { .. }) if live.len() > 1 => {
                todo.extend(halves(live).into_iter().rev());
            }
            Err(fenced @ Error::Fenced { .. }) => {
                let part: Vec<ObjectBatch> = live.iter().map(|&i| batches[i].clone()).collect();
                let answers = commit_unfenced(backend, &part, &fenced, stats);
                for (i, answer) in live.into_iter().zip(answers) {
                    if let Err(error) = &answer {
                        failed.insert(batches[i].object, error.clone());
                    }
                    results[i] = Some(answer);
                }
            }
            Err(error) => {
                tracing::error!(%error, batches = live.len(), "commit failed");
                for i in live {
                    failed.insert(batches[i].object, error.clone());
                    results[i] = Some(Err(error.clone()));
                }
            }
        }
    }
    // Every index was in exactly one part, and every part settles all of its indices.
    results
        .into_iter()
        .map(|result| result.unwrap_or(Err(Error::Closed)))
        .collect()
}

/// Answers the fenced batches of a group whose commit failed with `fenced`, and commits the
/// rest again (as a group of their own: a full disk or another fence is handled there too).
///
/// A batch is fenced when its epoch is not its virtual shard's epoch as the backend reads it
/// now, or when it is the batch `fenced` names (so each round takes at least one batch out,
/// and the retries end). Every batch of an object with a fenced batch is fenced too: an
/// object's batches never commit after one of its earlier ones failed (see `store`).
fn commit_unfenced(
    backend: &dyn Backend,
    batches: &[ObjectBatch],
    fenced: &Error,
    stats: &Tally,
) -> Answers {
    let map = match backend.shard_map() {
        Ok(map) => map,
        Err(error) => {
            tracing::error!(%error, "reading the shard map after a fenced commit failed");
            return vec![Err(error); batches.len()];
        }
    };
    let named = match fenced {
        Error::Fenced {
            virtual_shard,
            epoch,
            ..
        } => Some((*virtual_shard, *epoch)),
        _ => None,
    };
    let mut lost: HashMap<ObjectKey, Error> = HashMap::new();
    for batch in batches {
        let shard = map.shard_of(&batch.object.id);
        let current = map.epoch_of(&batch.object.id);
        if batch.epoch != current || named == Some((shard, batch.epoch)) {
            let error = Error::Fenced {
                virtual_shard: shard,
                epoch: batch.epoch,
                current,
            };
            lost.entry(batch.object).or_insert(error);
        }
    }
    tracing::warn!(objects = lost.len(), %fenced, "fenced batches refused");
    let rest: Vec<ObjectBatch> = batches
        .iter()
        .filter(|b| !lost.contains_key(&b.object))
        .cloned()
        .collect();
    let mut committed = if rest.is_empty() {
        Vec::new()
    } else {
        commit_group(backend, &rest, stats)
    }
    .into_iter();
    batches
        .iter()
        .map(|batch| match lost.get(&batch.object) {
            Some(error) => Err(error.clone()),
            // One answer per batch of `rest`, in order.
            None => committed.next().unwrap_or(Err(Error::Closed)),
        })
        .collect()
}

/// Commits the batches at `indices` (ascending) in one transaction.
fn attempt_part(
    backend: &dyn Backend,
    batches: &[ObjectBatch],
    indices: &[usize],
    stats: &Tally,
) -> Result<(), Error> {
    if let (Some(&first), Some(&last)) = (indices.first(), indices.last())
        && last - first + 1 == indices.len()
    {
        return attempt(backend, &batches[first..=last], stats);
    }
    // Only when a batch between them was left out: copy the rest together.
    let part: Vec<ObjectBatch> = indices.iter().map(|&i| batches[i].clone()).collect();
    attempt(backend, &part, stats)
}

fn attempt(backend: &dyn Backend, batches: &[ObjectBatch], tally: &Tally) -> Result<(), Error> {
    let stats = &tally.stats;
    stats.commits.fetch_add(1, Ordering::Relaxed);
    stats
        .batches
        .fetch_add(batches.len() as u64, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let committed = backend.commit_timed(batches);
    let metrics = &tally.metrics;
    metrics.commit_seconds.observe_duration(started.elapsed());
    metrics.commits.inc();
    match &committed {
        Ok(Some(sync)) => metrics.sync_seconds.observe_duration(*sync),
        Ok(None) => {}
        Err(_) => {
            metrics.commit_failures.inc();
        }
    }
    metrics.commit_objects.observe(batches.len() as u64);
    metrics.commit_bytes.observe(bytes_of(batches));
    committed.map(drop)
}

/// The bytes of the keys and values `batches` write.
fn bytes_of(batches: &[ObjectBatch]) -> u64 {
    let mutations = batches.iter().flat_map(|batch| &batch.mutations);
    let bytes = mutations.map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len));
    bytes.sum::<usize>() as u64
}

/// What the writer thread counts its work in: the stats of the tests and the bench, and the
/// server's metrics.
struct Tally {
    stats: Arc<WriterStats>,
    metrics: StorageMetrics,
}

/// `indices` split into a first and a second half.
fn halves(mut indices: Vec<usize>) -> [Vec<usize>; 2] {
    let second = indices.split_off(indices.len() / 2);
    [indices, second]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::{batch, obj, put};
    use crate::storage::fault::FaultyBackend;
    use crate::storage::memory::MemoryBackend;

    /// A writer over a holdable backend over `memory`.
    fn writer(memory: MemoryBackend) -> (Arc<MemoryBackend>, Arc<FaultyBackend>, Writer) {
        let memory = Arc::new(memory);
        let faulty = FaultyBackend::new(memory.clone());
        let writer = Writer::spawn(faulty.clone()).unwrap();
        (memory, faulty, writer)
    }

    fn write(id: u8, key: &[u8], value_bytes: usize) -> ObjectBatch {
        batch(obj(1, id), vec![put(key, &vec![id; value_bytes])])
    }

    /// Blocks until the writer thread has started its `n`th commit.
    fn until_commits(faulty: &FaultyBackend, n: u64) {
        for _ in 0..5000 {
            if faulty.commits() >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the writer never started commit {n}");
    }

    #[test]
    fn groups_queued_during_a_commit_share_the_next() {
        let (memory, faulty, writer) = writer(MemoryBackend::new());
        let handle = writer.handle();
        faulty.hold();
        let first = handle.submit(vec![write(1, b"a", 1)]);
        until_commits(&faulty, 1);
        let second = handle.submit(vec![write(2, b"b", 1), write(3, b"c", 1)]);
        let third = handle.submit(vec![write(4, b"d", 1)]);
        faulty.release();
        assert_eq!(first.blocking_recv().unwrap(), vec![Ok(())]);
        assert_eq!(second.blocking_recv().unwrap(), vec![Ok(()), Ok(())]);
        assert_eq!(third.blocking_recv().unwrap(), vec![Ok(())]);
        // The two groups queued behind the first commit went in one more.
        assert_eq!(faulty.commits(), 2);
        assert_eq!(handle.stats.batches.load(Ordering::Relaxed), 4);
        assert_eq!(memory.get(&obj(1, 4), b"d").unwrap(), Some(vec![4]));
    }

    #[test]
    fn it_tells_whether_it_is_at_work_on_a_group() {
        let (_memory, faulty, writer) = writer(MemoryBackend::new());
        let handle = writer.handle();
        assert!(!handle.is_committing());
        faulty.hold();
        let answer = handle.submit(vec![write(1, b"a", 1)]);
        until_commits(&faulty, 1);
        assert!(handle.is_committing());
        faulty.release();
        assert_eq!(answer.blocking_recv().unwrap(), vec![Ok(())]);
        // Done, and nothing queued: it waits for work again.
        for _ in 0..5000 {
            if !handle.is_committing() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the writer still says it commits, with nothing to commit");
    }

    #[test]
    fn a_full_disk_fails_only_the_batches_that_cannot_fit() {
        let (memory, faulty, writer) = writer(MemoryBackend::with_map_bytes(1000));
        let handle = writer.handle();
        faulty.hold();
        let warm_up = handle.submit(vec![write(9, b"w", 1)]);
        until_commits(&faulty, 1);
        // Two groups in one commit: object 2's first batch cannot fit, so its second batch
        // (later in the commit) must not commit either; objects 1 and 3 fit.
        let x = handle.submit(vec![write(1, b"a", 10), write(2, b"huge", 2000)]);
        let y = handle.submit(vec![write(3, b"c", 10), write(2, b"after", 1)]);
        faulty.release();
        assert_eq!(warm_up.blocking_recv().unwrap(), vec![Ok(())]);
        let full = Err(Error::MapFull { map_bytes: 1000 });
        assert_eq!(x.blocking_recv().unwrap(), vec![Ok(()), full.clone()]);
        assert_eq!(y.blocking_recv().unwrap(), vec![Ok(()), full]);
        assert_eq!(memory.get(&obj(1, 1), b"a").unwrap(), Some(vec![1; 10]));
        assert_eq!(memory.get(&obj(1, 3), b"c").unwrap(), Some(vec![3; 10]));
        assert_eq!(memory.get(&obj(1, 2), b"after").unwrap(), None);
        assert_eq!(memory.get(&obj(1, 2), b"huge").unwrap(), None);
    }

    #[test]
    fn other_errors_fail_the_whole_group_without_retrying() {
        let (memory, faulty, writer) = writer(MemoryBackend::new());
        let handle = writer.handle();
        faulty.fail_commits(Error::Io("disk gone".into()), 1);
        let answers = handle.submit(vec![write(1, b"a", 1), write(2, b"b", 1)]);
        let lost = Err(Error::Io("disk gone".into()));
        assert_eq!(answers.blocking_recv().unwrap(), vec![lost.clone(), lost]);
        assert_eq!(faulty.commits(), 1);
        assert_eq!(memory.get(&obj(1, 1), b"a").unwrap(), None);
    }

    #[test]
    fn shutdown_commits_what_is_queued_then_refuses() {
        let (memory, faulty, writer) = writer(MemoryBackend::new());
        let handle = writer.handle();
        faulty.hold();
        let first = handle.submit(vec![write(1, b"a", 1)]);
        until_commits(&faulty, 1);
        let queued = handle.submit(vec![write(2, b"b", 1)]);
        let stopping = std::thread::spawn(move || writer.shutdown());
        // Once shutdown has begun, a submission is refused at once (earlier probes queue, and
        // commit nothing: their batch is empty).
        let refused = loop {
            let mut probe = handle.submit(vec![batch(obj(1, 7), vec![])]);
            if let Ok(answer) = probe.try_recv() {
                break answer;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(refused, vec![Err(Error::Closed)]);
        faulty.release();
        stopping.join().unwrap();
        assert_eq!(first.blocking_recv().unwrap(), vec![Ok(())]);
        assert_eq!(queued.blocking_recv().unwrap(), vec![Ok(())]);
        assert_eq!(memory.get(&obj(1, 2), b"b").unwrap(), Some(vec![2]));
        let late = handle.submit(vec![write(3, b"c", 1), write(4, b"d", 1)]);
        let closed = Err(Error::Closed);
        assert_eq!(late.blocking_recv().unwrap(), vec![closed.clone(), closed]);
    }
}
