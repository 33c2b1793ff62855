//! The storage writer: one thread that owns every write to the backend.
//!
//! Objects submit batches (each one atomic unit); the writer takes every batch that is waiting,
//! commits them in one transaction with one fsync (group commit), and answers each. While it
//! commits, new batches queue up and join the next commit, so under load many objects share one
//! fsync. The event loop never waits on the backend's write lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::Error;
use super::backend::{Backend, ObjectBatch};

/// Most batches in one commit: bounds the time one commit takes, and so the latency of the
/// batches behind it.
const COMMIT_BATCHES_MAX: usize = 4096;
/// Most mutations in one commit, for the same reason (1000 puts commit in ~15 ms here).
const COMMIT_MUTATIONS_MAX: usize = 64 * 1024;

/// A group of batches (of different objects) handed over together, with one answer.
struct Job {
    batches: Vec<ObjectBatch>,
    done: oneshot::Sender<Result<(), Error>>,
}

/// Counters of the writer's work, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Batches handed to the writer.
    pub submitted: AtomicU64,
    /// Transactions committed (or attempted).
    pub commits: AtomicU64,
    /// Batches they carried.
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
}

impl Writer {
    pub(crate) fn spawn(backend: Arc<dyn Backend>) -> std::io::Result<Writer> {
        let (sender, receiver) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("duro-writer".into())
            .spawn(move || run(&*backend, &receiver, &thread_stats))?;
        let handle = WriterHandle {
            sender: Arc::new(Mutex::new(Some(sender))),
            stats,
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
    /// Queues a group of batches; the receiver answers once they are durable, or with the
    /// commit's error. They commit in one transaction (with whatever else is queued).
    pub(crate) fn submit(&self, batches: Vec<ObjectBatch>) -> oneshot::Receiver<Result<(), Error>> {
        let (done, receiver) = oneshot::channel();
        self.stats
            .submitted
            .fetch_add(batches.len() as u64, Ordering::Relaxed);
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job { batches, done };
        let refused = match sender.as_ref() {
            Some(sender) => sender.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = refused {
            let _ = job.done.send(Err(Error::Closed));
        }
        receiver
    }
}

fn run(backend: &dyn Backend, receiver: &mpsc::Receiver<Job>, stats: &WriterStats) {
    while let Ok(first) = receiver.recv() {
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

fn commit(backend: &dyn Backend, jobs: Vec<Job>, stats: &WriterStats) {
    let mut batches = Vec::new();
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        batches.extend(job.batches);
        answers.push(job.done);
    }
    let result = backend.commit(&batches);
    if let Err(error) = &result {
        tracing::error!(%error, batches = batches.len(), "commit failed");
    }
    stats.commits.fetch_add(1, Ordering::Relaxed);
    stats
        .batches
        .fetch_add(batches.len() as u64, Ordering::Relaxed);
    for answer in answers {
        let _ = answer.send(result.clone());
    }
}
