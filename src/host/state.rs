//! What an instance knows of itself: [`State`].

use std::fmt::Display;
use std::future::Future;
use std::rc::{Rc, Weak};

use crate::gate::{self, Gated, InputGate};
use crate::id::ObjectId;
use crate::storage::Storage;

/// What a [`State`] may ask of the activation it belongs to. A trait, so that this file does
/// not depend on the activation's (which holds the state).
pub(crate) trait Reset {
    /// Resets the object (see the activation's docs).
    fn reset(&self, reason: &str);
}

/// What an instance knows of itself: its ID, its storage, its input gate.
#[derive(Clone)]
pub struct State {
    id: ObjectId,
    storage: Storage,
    gate: Rc<InputGate>,
    /// Weak: the activation owns the instance, which owns this state.
    activation: Weak<dyn Reset>,
}

impl State {
    pub(crate) fn new(
        id: ObjectId,
        storage: Storage,
        gate: Rc<InputGate>,
        activation: Weak<dyn Reset>,
    ) -> State {
        State {
            id,
            storage,
            gate,
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
