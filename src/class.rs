//! The Rust API for object classes: the [`DurableObject`] trait, and the [`State`] and [`Env`]
//! an instance is built from.

use std::fmt::Display;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::LocalBoxFuture;

use crate::host::HostInner;
use crate::host::Namespace;
use crate::host::activation::Activation;
use crate::host::gate::{self, Gated, InputGate};
use crate::id::ObjectId;
use crate::storage::Storage;

/// The HTTP request an object receives.
pub type Request = http::Request<Bytes>;
/// The HTTP response an object answers with.
pub type Response = http::Response<Bytes>;
/// The error an object's handler may return: any error converts into it with `?`.
pub type BoxError = Box<dyn std::error::Error>;

/// A class of Durable Objects.
///
/// The host builds at most one live instance per object ID, from a constructor
/// `Fn(State, Env) -> Self`, and delivers requests to it in the order they were made on a stub.
/// Requests may interleave at the handler's awaits, except while a storage call or
/// [`State::block_concurrency_while`] holds the input gate. A returned error reaches the caller
/// as `remote: <message>`, and the object lives on; a panic resets the object: the instance is
/// dropped with its unflushed writes, every stub to it breaks, and the next `get` builds a new
/// one from storage.
///
/// ```
/// use duro::{BoxError, DurableObject, Request, Response, State};
///
/// struct Visits {
///     state: State,
/// }
///
/// impl DurableObject for Visits {
///     async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
///         let storage = self.state.storage();
///         let visits = storage.get::<u64>("visits").await?.unwrap_or(0) + 1;
///         storage.put("visits", &visits).await?;
///         // The response leaves only once the put is durable.
///         Ok(Response::new(visits.to_string().into()))
///     }
/// }
///
/// let server = duro::Server::builder()
///     .class("visits", |state, _env| Visits { state })
///     .namespace("visits", "visits");
/// # drop(server);
/// ```
#[allow(async_fn_in_trait)] // Objects run on one thread: their futures need not be Send.
pub trait DurableObject: 'static {
    /// Handles one request.
    async fn fetch(&self, request: Request) -> Result<Response, BoxError>;
}

/// A class with its type erased, as the host keeps it.
pub(crate) trait ErasedObject {
    fn fetch(
        self: Rc<Self>,
        request: Request,
    ) -> LocalBoxFuture<'static, Result<Response, BoxError>>;
}

impl<T: DurableObject> ErasedObject for T {
    fn fetch(
        self: Rc<Self>,
        request: Request,
    ) -> LocalBoxFuture<'static, Result<Response, BoxError>> {
        Box::pin(async move { DurableObject::fetch(&*self, request).await })
    }
}

/// Builds instances of a class.
pub(crate) type Factory = Arc<dyn Fn(State, Env) -> Rc<dyn ErasedObject> + Send + Sync>;

pub(crate) fn factory<T, F>(constructor: F) -> Factory
where
    T: DurableObject,
    F: Fn(State, Env) -> T + Send + Sync + 'static,
{
    Arc::new(move |state, env| Rc::new(constructor(state, env)) as Rc<dyn ErasedObject>)
}

/// What an instance knows of itself: its ID, its storage, its input gate.
#[derive(Clone)]
pub struct State {
    id: ObjectId,
    storage: Storage,
    gate: Rc<InputGate>,
    /// Weak: the activation owns the instance, which owns this state.
    activation: Weak<Activation>,
}

impl State {
    pub(crate) fn new(
        id: ObjectId,
        storage: Storage,
        gate: Rc<InputGate>,
        activation: Weak<Activation>,
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

/// The host as an object sees it: its namespaces, to call other objects.
#[derive(Clone)]
pub struct Env {
    /// Weak: the host owns every instance, and instances own their `Env`.
    host: Weak<HostInner>,
}

impl Env {
    pub(crate) fn new(host: Weak<HostInner>) -> Env {
        Env { host }
    }

    /// The namespace bound to `name`, if there is one (and the host is running).
    pub fn namespace(&self, name: &str) -> Option<Namespace> {
        self.host.upgrade()?.namespace(name)
    }
}
