//! The Rust API for object classes: the [`DurableObject`] trait, and its type-erased form as
//! the host keeps instances.

use std::rc::Rc;

use futures::future::LocalBoxFuture;

use super::socket::{WebSocket, WebSocketMessage};
use crate::body::Body;
use crate::message::{BoxError, Request, Response, StreamRequest, StreamResponse};

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
    /// Handles one request, with its whole body. The default answers 501: a class implements
    /// this, or [`DurableObject::fetch_stream`], or both.
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let _ = request;
        Ok(http::Response::builder()
            .status(http::StatusCode::NOT_IMPLEMENTED)
            .body("this class implements no fetch\n".into())?)
    }

    /// Handles one request whose body may be streamed, and may answer with a stream (a large
    /// download, server-sent events): every request reaches the object here. The default
    /// reads the whole body (up to the bound its transport set: the gateway's body limit,
    /// the wire's message size) and calls [`DurableObject::fetch`].
    ///
    /// A WebSocket upgrade arrives here too: accept it with
    /// [`State::accept_web_socket`](crate::State::accept_web_socket) and answer with
    /// [`response::switching_protocols`](crate::response::switching_protocols). A response body
    /// is read by the host (or the caller) while the object goes on: a stream the object keeps
    /// writing to does not hold its input gate, and its writer waits while the reader is behind.
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        let (parts, body) = request.into_parts();
        let body = body.bytes().await?;
        let response = self.fetch(Request::from_parts(parts, body)).await?;
        Ok(response.map(Body::from))
    }

    /// Handles a message from a WebSocket the object accepted, delivered like a request: in
    /// the order the socket received them, through the input gate, activating the object if
    /// it was evicted. The default does nothing.
    async fn web_socket_message(
        &self,
        socket: WebSocket,
        message: WebSocketMessage,
    ) -> Result<(), BoxError> {
        let _ = (socket, message);
        Ok(())
    }

    /// Handles the close of a WebSocket by its peer, with the peer's code (1005 when it sent
    /// none) and reason. The host answers the close after this returns, unless the object
    /// closed the socket itself. The default does nothing.
    async fn web_socket_close(
        &self,
        socket: WebSocket,
        code: u16,
        reason: String,
    ) -> Result<(), BoxError> {
        let _ = (socket, code, reason);
        Ok(())
    }

    /// Handles the loss of a WebSocket without a close: the peer vanished, its connection
    /// failed, or it passed a bound (a message over the size limit; a queue it did not read).
    /// The socket is gone by then. The default does nothing.
    async fn web_socket_error(&self, socket: WebSocket, error: String) -> Result<(), BoxError> {
        let _ = (socket, error);
        Ok(())
    }

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

    /// The Cap'n Proto interface the class exports besides `fetch`, if any: a capability to
    /// the object's own server of an interface declared in the class's schema. The host calls
    /// it once per activation, after the constructor, and keeps what it returns for the
    /// activation's life; the default exports none.
    ///
    /// A stub answers the interface as well as `DurableObject`: a caller casts the stub to it
    /// and calls its methods, pipelined like `fetch`. Each call is delivered like a request:
    /// in the stub's order with `fetch` and the stub's other calls, through the input gate
    /// (the method's storage calls hold it as a handler's do), its results held until the
    /// writes made before them are durable. A panic in a method resets the object; an error
    /// it returns reaches the caller with its message prefixed `remote: ` (an `unimplemented`
    /// stays one). A stub of a class that exports no interface, or another one, answers
    /// `unimplemented`.
    ///
    /// Capabilities that the interface's methods return (or pass on) are the object's own:
    /// they are called directly, not through the host, so their calls have none of the
    /// above. Nor do they keep the object active: once it is evicted or reset, they reach the
    /// instance the host let go, which must then not write its storage (a new instance may be
    /// live). Return a stub (see `duro::rpc::stub_capability`) for a capability that keeps
    /// the guarantees.
    ///
    /// ```ignore
    /// fn interface(self: Rc<Self>) -> Option<capnp::capability::Client> {
    ///     Some(capnp_rpc::new_client_from_rc::<counter::Client, _>(self).client)
    /// }
    /// ```
    fn interface(self: Rc<Self>) -> Option<capnp::capability::Client> {
        None
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
    fn fetch_stream(
        self: Rc<Self>,
        request: StreamRequest,
    ) -> LocalBoxFuture<'static, Result<StreamResponse, BoxError>>;

    fn alarm(self: Rc<Self>, info: AlarmInfo) -> LocalBoxFuture<'static, Result<(), BoxError>>;

    fn web_socket_event(
        self: Rc<Self>,
        socket: WebSocket,
        event: SocketEvent,
    ) -> LocalBoxFuture<'static, Result<(), BoxError>>;

    fn interface(self: Rc<Self>) -> Option<capnp::capability::Client>;
}

/// What happened to a WebSocket, for the object.
pub(crate) enum SocketEvent {
    Message(WebSocketMessage),
    Close(u16, String),
    Error(String),
}

impl<T: DurableObject> ErasedObject for T {
    fn fetch_stream(
        self: Rc<Self>,
        request: StreamRequest,
    ) -> LocalBoxFuture<'static, Result<StreamResponse, BoxError>> {
        Box::pin(async move { DurableObject::fetch_stream(&*self, request).await })
    }

    fn alarm(self: Rc<Self>, info: AlarmInfo) -> LocalBoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async move { DurableObject::alarm(&*self, info).await })
    }

    fn web_socket_event(
        self: Rc<Self>,
        socket: WebSocket,
        event: SocketEvent,
    ) -> LocalBoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async move {
            match event {
                SocketEvent::Message(message) => {
                    DurableObject::web_socket_message(&*self, socket, message).await
                }
                SocketEvent::Close(code, reason) => {
                    DurableObject::web_socket_close(&*self, socket, code, reason).await
                }
                SocketEvent::Error(error) => {
                    DurableObject::web_socket_error(&*self, socket, error).await
                }
            }
        })
    }

    fn interface(self: Rc<Self>) -> Option<capnp::capability::Client> {
        DurableObject::interface(self)
    }
}
