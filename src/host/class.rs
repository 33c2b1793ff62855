//! The Rust API for object classes: the [`DurableObject`] trait, and its type-erased form as
//! the host keeps instances.

use std::rc::Rc;

use futures::future::LocalBoxFuture;

use crate::message::{BoxError, Request, Response};

/// A class of Durable Objects.
///
/// The host builds at most one live instance per object ID, from a constructor
/// `Fn(State, Env) -> Self`, and delivers requests to it in the order they were made on a stub.
/// Requests may interleave at the handler's awaits, except while a storage call or
/// [`State::block_concurrency_while`](crate::State::block_concurrency_while) holds the input gate. A returned error reaches the caller
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

    /// Handles the object's alarm (set with [`Storage::set_alarm`](crate::Storage::set_alarm)),
    /// delivered like a request: in order with the object's other events, through its input
    /// gate, activating it if it was evicted. The alarm is done once this returns `Ok` and the
    /// writes made before are durable; on an error, a panic (which resets the object) or a
    /// failed commit it is delivered again with exponential backoff (see [`AlarmInfo`]). So
    /// it runs at least once, maybe more. The default does nothing.
    async fn alarm(&self, info: AlarmInfo) -> Result<(), BoxError> {
        let _ = info;
        Ok(())
    }
}

/// What an alarm delivery knows about the deliveries before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AlarmInfo {
    /// How many deliveries of this alarm failed before this one.
    pub retry_count: u32,
    /// Whether this is a retry (`retry_count > 0`).
    pub is_retry: bool,
}

impl AlarmInfo {
    pub(crate) fn new(retry_count: u32) -> AlarmInfo {
        AlarmInfo {
            retry_count,
            is_retry: retry_count > 0,
        }
    }
}

/// A class with its type erased, as the host keeps it.
pub(crate) trait ErasedObject {
    fn fetch(
        self: Rc<Self>,
        request: Request,
    ) -> LocalBoxFuture<'static, Result<Response, BoxError>>;

    fn alarm(self: Rc<Self>, info: AlarmInfo) -> LocalBoxFuture<'static, Result<(), BoxError>>;
}

impl<T: DurableObject> ErasedObject for T {
    fn fetch(
        self: Rc<Self>,
        request: Request,
    ) -> LocalBoxFuture<'static, Result<Response, BoxError>> {
        Box::pin(async move { DurableObject::fetch(&*self, request).await })
    }

    fn alarm(self: Rc<Self>, info: AlarmInfo) -> LocalBoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async move { DurableObject::alarm(&*self, info).await })
    }
}
