//! What an instance knows of itself: [`State`].

use std::fmt::Display;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use crate::clock::Clock;
use crate::gate::{self, Gated, InputGate};
use crate::id::ObjectId;
use crate::storage::Storage;

/// What a [`State`] may ask of the activation it belongs to. A trait, so that this file does
/// not depend on the activation's (which holds the state).
pub(crate) trait Reset {
    /// Resets the object (see the activation's docs).
    fn reset(&self, reason: &str);
}

/// What an instance knows of itself: its ID, its storage, its input gate, the host's clock.
#[derive(Clone)]
pub struct State {
    id: ObjectId,
    storage: Storage,
    gate: Rc<InputGate>,
    /// The host's wall clock (`Builder::clock`): the one alarms fire by, so an object that
    /// compares stored times with [`State::now_ms`] agrees with its alarms, also in a test
    /// on a manual clock.
    clock: Arc<dyn Clock>,
    /// Weak: the activation owns the instance, which owns this state.
    activation: Weak<dyn Reset>,
}

impl State {
    pub(crate) fn new(
        id: ObjectId,
        storage: Storage,
        gate: Rc<InputGate>,
        clock: Arc<dyn Clock>,
        activation: Weak<dyn Reset>,
    ) -> State {
        State {
            id,
            storage,
            gate,
            clock,
            activation,
        }
    }

    /// The object's ID.
    pub fn id(&self) -> &ObjectId {
        &self.id
    }

    /// The object's storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The host's wall clock now, in milliseconds since the Unix epoch: the clock alarms fire
    /// by (`Builder::clock`; the system's by default). Use it, not the system's, for times an
    /// object stores and compares, so that tests on a manual clock see them move together.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Runs `body` with the input gate closed: no other request is delivered to the object, and
    /// no other of its handlers resumes, until `body` is done. The gate closes at the call, so a
    /// constructor can use it (spawning the returned future) to finish initialising before the
    /// first request. If `body` fails, the object is reset.
    pub fn block_concurrency_while<T, E, F>(
        &self,
        body: F,
    ) -> impl Future<Output = Result<T, E>> + use<T, E, F>
    where
        F: Future<Output = Result<T, E>>,
        E: Display,
    {
        let task = gate::current_task().unwrap_or_else(gate::next_task_id);
        let mut lock = self.gate.lock(task);
        lock.try_now();
        let gate = self.gate.clone();
        let activation = self.activation.clone();
        async move {
            (&mut lock).await;
            let result = Gated::new(body, gate, task).await;
            drop(lock);
            if let (Err(error), Some(activation)) = (&result, activation.upgrade()) {
                activation.reset(&format!("block_concurrency_while failed: {error}"));
            }
            result
        }
    }
}
