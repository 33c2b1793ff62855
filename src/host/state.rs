//! What an instance knows of itself: [`State`].

use std::fmt::Display;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use super::socket::{ObjectSockets, UpgradeToken, WebSocket};
use crate::clock::Clock;
use crate::error::Error;
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
    /// The object's storage, with its store and its input gate.
    storage: Storage,
    /// The host's wall clock (`Builder::clock`): the one alarms fire by, so an object that
    /// compares stored times with [`State::now_ms`] agrees with its alarms, also in a test
    /// on a manual clock.
    clock: Arc<dyn Clock>,
    /// Weak: the activation owns the instance, which owns this state.
    activation: Weak<dyn Reset>,
    /// The WebSockets the host holds for the object, which outlive this activation.
    sockets: Rc<ObjectSockets>,
}

impl State {
    pub(crate) fn new(
        id: ObjectId,
        storage: Storage,
        clock: Arc<dyn Clock>,
        activation: Weak<dyn Reset>,
        sockets: Rc<ObjectSockets>,
    ) -> State {
        State {
            id,
            storage,
            clock,
            activation,
            sockets,
        }
    }

    /// Accepts the WebSocket upgrade `request` asks for, with `tags` (at most 10, each at most
    /// 256 bytes) to find it again by: the host holds the socket from now on, also while the
    /// object is evicted, and delivers its events to `web_socket_message`, `web_socket_close`
    /// and `web_socket_error`. Answer the request with
    /// [`response::switching_protocols`](crate::response::switching_protocols).
    ///
    /// Fails when `request` is not an upgrade the caller can complete (no `Upgrade: websocket`,
    /// or a caller that cannot speak WebSocket), when it was accepted already, or when the
    /// object holds its most sockets (`sockets_per_object_max`, overloaded).
    pub fn accept_web_socket<B>(
        &self,
        request: &http::Request<B>,
        tags: &[&str],
    ) -> Result<WebSocket, Error> {
        let token = request.extensions().get::<UpgradeToken>().ok_or_else(|| {
            Error::InvalidArgument(
                "the request is not a WebSocket upgrade (no Upgrade: websocket, or its caller \
                 cannot complete one)"
                    .into(),
            )
        })?;
        let socket = self.sockets.accept(*token, tags)?;
        Ok(WebSocket::new(socket, self.storage.store().clone()))
    }

    /// The object's open WebSockets, those accepted with `tag` if one is given, in the order
    /// they were accepted.
    pub fn get_web_sockets(&self, tag: Option<&str>) -> Vec<WebSocket> {
        self.sockets
            .list(tag)
            .into_iter()
            .map(|socket| WebSocket::new(socket, self.storage.store().clone()))
            .collect()
    }

    /// Sets a text message that the host answers on any of the object's sockets with
    /// `response`, without waking the object (a keep-alive "ping" → "pong"); `None` removes it.
    pub fn set_web_socket_auto_response(&self, pair: Option<(&str, &str)>) {
        self.sockets
            .set_auto_response(pair.map(|(request, response)| (request.into(), response.into())));
    }

    /// Resets the object (see [`DurableObject`](crate::DurableObject)): for a class whose
    /// instance lives elsewhere and was lost (an external class whose provider went away).
    pub(crate) fn reset(&self, reason: &str) {
        if let Some(activation) = self.activation.upgrade() {
            activation.reset(reason);
        }
    }

    /// The object's input gate: for a class that takes it around work the host does for an
    /// instance living elsewhere (an external class's events and storage calls).
    pub(crate) fn gate(&self) -> &Rc<InputGate> {
        self.storage.gate()
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
        let mut lock = self.gate().lock(task);
        lock.try_now();
        let gate = self.gate().clone();
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
