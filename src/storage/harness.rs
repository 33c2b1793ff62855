//! What the unit tests of the layers above the backend share: a writer thread over an
//! in-memory backend that can be held or made to fail, object stores on it, and an event loop
//! (current-thread runtime and `LocalSet`, as in the host) to run them on.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::backend::ObjectKey;
use super::fault::FaultyBackend;
use super::memory::MemoryBackend;
use super::store::{ObjectStore, Shared};
use super::writer::{Writer, WriterStats};
use super::{Limits, Storage};
use crate::gate::InputGate;

/// A writer over `faulty`, which wraps `memory`. Releases a held backend when dropped, so a
/// failing test ends instead of waiting on the writer forever.
pub(crate) struct Harness {
    pub(crate) memory: Arc<MemoryBackend>,
    pub(crate) faulty: Arc<FaultyBackend>,
    pub(crate) shared: Rc<Shared>,
    _writer: Writer,
}

impl Harness {
    pub(crate) fn new(memory: MemoryBackend, limits: Limits) -> Harness {
        let memory = Arc::new(memory);
        let faulty = FaultyBackend::new(memory.clone());
        let writer = Writer::spawn(faulty.clone()).unwrap();
        let shared = Rc::new(Shared::new(faulty.clone(), writer.handle(), limits).unwrap());
        Harness {
            memory,
            faulty,
            shared,
            _writer: writer,
        }
    }

    /// The store of object `id` (namespace tag 1), reached by no name.
    pub(crate) fn store(&self, id: u8) -> Rc<ObjectStore> {
        Rc::new(ObjectStore::new(self.shared.clone(), object(id), None))
    }

    /// The storage API over a fresh store of object `id`, with a gate of its own.
    pub(crate) fn storage(&self, id: u8) -> Storage {
        Storage::new(self.store(id), Rc::new(InputGate::default()))
    }

    pub(crate) fn stats(&self) -> &WriterStats {
        &self.shared.writer.stats
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.faulty.release();
    }
}

/// The key of object `id` in namespace tag 1, as [`Harness::store`] makes them.
pub(crate) fn object(id: u8) -> ObjectKey {
    ObjectKey {
        tag: 1,
        id: [id; 32],
    }
}

/// Runs `future` on a current-thread runtime inside a `LocalSet`, as the host does.
pub(crate) fn run<F: Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, future)
}

/// Waits until `condition` holds, e.g. until the writer thread got somewhere; panics after 5 s.
pub(crate) async fn until(condition: impl Fn() -> bool) {
    for _ in 0..5000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for a condition");
}

/// Lets every local task that is ready run (the flush tasks among them) without waiting for
/// the writer thread.
pub(crate) async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}
