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
