//! The Rust client: a connection to a duro host, usable from any tokio runtime.
//!
//! capnp-rpc is `!Send`, so the connection lives on a driver thread of its own (a current-thread
//! runtime with a `LocalSet`) that owns the RPC system and every capability. [`Client`],
//! [`RemoteNamespace`] and [`RemoteStub`] are `Send + Sync + Clone` handles that send the driver commands
//! through one ordered channel. The driver issues each Cap'n Proto call as its command arrives,
//! before awaiting any answer, so:
//!
//! - calls made on one stub leave in the order they were made, and the host delivers them in
//!   that order (E-order);
//! - [`Client::namespace`], [`RemoteNamespace::get`] and [`RemoteNamespace::get_by_name`] answer at once
//!   with a handle to a pipelined capability, which the driver keeps in a table under the
//!   handle's id: `get_by_name(name)` then `fetch` costs one round trip;
//! - dropping the last clone of a handle releases its capability on the host, and dropping the
//!   last handle of a connection ([`Client`], [`RemoteNamespace`], [`RemoteStub`], or a [`Pending`] not
//!   yet done) ends the driver thread and closes the connection.
//!
//! Streamed bodies and WebSockets (`DurableObject.request`) are in `stream`.

use crate::wire::stream;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::id::{ID_BYTES, ObjectId};
use crate::message::{Request, Response, StreamRequest, StreamResponse};
pub use crate::tls::ClientTls;
use crate::wire::duro_capnp::{durable_object, host, namespace, namespace_info, object_id};
use crate::wire::{ListenAddr, MESSAGE_BYTES_MAX, convert};
pub use stream::{ClientWebSocket, WebSocketEvent};

/// Calls one client may have in flight (sent, answer not yet delivered), over all its
/// namespaces and stubs. Each holds its request and answer in memory and a question on the
/// connection; capnp-rpc has no flow limit of its own, so without this bound a runaway caller
/// grows both without end. Past it a call fails at once with [`Error::Overloaded`]: await some
/// answers before making more calls. Far above what one object accepts queued (1000 by
/// default), so that pipelining to many objects at once stays possible.
pub const CALLS_IN_FLIGHT_MAX: usize = 4096;

/// How long [`Client::connect`] waits for the connection to be established: an address that
/// drops packets would otherwise hold the caller for minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request the client sends, estimated from the size of its parts (see
/// `wire::convert::request_bytes`). The host drops a connection that sends a message larger than
/// [`crate::wire::MESSAGE_BYTES_MAX`], which would break every call of the client; a larger
/// request is refused here instead, with [`Error::InvalidArgument`].
pub const REQUEST_BYTES_MAX: usize = MESSAGE_BYTES_MAX - 64 * 1024;

/// Most commands the driver takes from its channel per wake-up: under load, fewer wake-ups,
/// and a bounded run of work before the RPC system's tasks get their turn.
const COMMAND_BATCH_MAX: usize = 64;

/// A connection to a duro host. Cheap to clone: the clones share the connection.
///
/// ```
/// # let server = duro::testing::TestServer::start(duro::builtin::register(duro::Server::builder()));
/// # let addr = server.addr().to_string();
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use duro::client::Client;
///
/// // `addr` is e.g. "127.0.0.1:7450", or "unix:/run/duro.sock".
/// let client = Client::connect(addr.as_str()).await?;
/// let counter = client.namespace("counter").get_by_name("visits");
/// // `get_by_name` answered at once: the stub and the call travel together.
/// let response = counter.call("POST", "/", "").await?;
/// assert_eq!(response.status(), 200);
/// assert_eq!(response.body().as_ref(), b"1\n");
/// # Ok::<(), duro::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl Client {
    /// Connects to a host: `"HOST:PORT"` over TCP, or `"unix:PATH"` over a unix socket (also
    /// a [`ListenAddr`] or a [`SocketAddr`]). An address that does not parse fails with
    /// [`Error::InvalidArgument`]; a connection that cannot be made (refused, timed out after
    /// [`CONNECT_TIMEOUT`]) with [`Error::Disconnected`].
    pub async fn connect(addr: impl IntoServerAddr) -> Result<Client, Error> {
        Client::connect_with(addr.into_server_addr()?, None).await
    }

    /// [`Client::connect`] over TLS, to a host served with TLS (`duro serve --tls-cert`): `tls`
    /// says which CAs to trust and the name the host's certificate must carry. Only a TCP
    /// address takes TLS; a unix socket fails with [`Error::InvalidArgument`]. A certificate
    /// that `tls` does not trust fails with [`Error::Disconnected`], saying why.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// use duro::client::{Client, ClientTls};
    ///
    /// // The host's certificate was signed by a private CA, for the name duro.internal.
    /// let tls = ClientTls::with_ca_pem("ca.pem")?.server_name("duro.internal")?;
    /// let client = Client::connect_tls("10.0.0.5:7450", tls).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_tls(addr: impl IntoServerAddr, tls: ClientTls) -> Result<Client, Error> {
        let addr = addr.into_server_addr()?;
        if let ListenAddr::Unix(_) = addr {
            return Err(Error::InvalidArgument(format!(
                "TLS needs a TCP address, not {addr}: a unix socket is guarded by its permissions"
            )));
        }
        Client::connect_with(addr, Some(tls)).await
    }

    async fn connect_with(addr: ListenAddr, tls: Option<ClientTls>) -> Result<Client, Error> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (ready, connected) = oneshot::channel();
        let driver_addr = addr.clone();
        std::thread::Builder::new()
            .name("duro-client".into())
            .spawn(move || driver::run(driver_addr, tls, receiver, ready))
            .map_err(|e| Error::Disconnected(format!("starting the client thread: {e}")))?;
        connected.await.unwrap_or_else(|_| Err(driver_stopped()))?;
        Ok(Client {
            shared: Arc::new(Shared {
                commands,
                next_handle: AtomicU64::new(0),
                in_flight: Arc::new(AtomicUsize::new(0)),
                addr,
            }),
        })
    }

    /// The address this client connected to.
    pub fn addr(&self) -> &ListenAddr {
        &self.shared.addr
    }

    /// The namespace `name`, at once: an unknown name fails the calls made through it, with
    /// [`Error::InvalidArgument`]. Each `namespace` opens a capability on the host (a call on
    /// the wire, pipelined): keep the `RemoteNamespace` to reuse it.
    pub fn namespace(&self, name: &str) -> RemoteNamespace {
        let handle = self.shared.new_handle();
        self.shared.send(Command::Namespace {
            handle: handle.id,
            name: name.to_owned(),
        });
        RemoteNamespace {
            handle: Arc::new(handle),
            name: name.into(),
        }
    }

    /// Every namespace of the host with the class it is bound to, ordered by name.
    pub fn list_namespaces(&self) -> Pending<Vec<NamespaceInfo>> {
        self.shared.call(Command::ListNamespaces)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

/// What [`Client::connect`] accepts as the host's address.
pub trait IntoServerAddr {
    /// The address, or [`Error::InvalidArgument`] naming what is wrong with it.
    fn into_server_addr(self) -> Result<ListenAddr, Error>;
}

impl IntoServerAddr for ListenAddr {
    fn into_server_addr(self) -> Result<ListenAddr, Error> {
        Ok(self)
    }
}

impl IntoServerAddr for &ListenAddr {
    fn into_server_addr(self) -> Result<ListenAddr, Error> {
        Ok(self.clone())
    }
}

impl IntoServerAddr for SocketAddr {
    fn into_server_addr(self) -> Result<ListenAddr, Error> {
        Ok(ListenAddr::Tcp(self))
    }
}

impl IntoServerAddr for &str {
    fn into_server_addr(self) -> Result<ListenAddr, Error> {
        self.parse().map_err(Error::InvalidArgument)
    }
}

impl IntoServerAddr for &String {
    fn into_server_addr(self) -> Result<ListenAddr, Error> {
        self.as_str().into_server_addr()
    }
}

/// A namespace of the host: mints IDs and hands out stubs. Cheap to clone.
#[derive(Clone)]
pub struct RemoteNamespace {
    handle: Arc<Handle>,
    name: Arc<str>,
}

impl RemoteNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh random ID: never the same twice, and unguessable.
    pub fn new_unique_id(&self) -> Pending<ObjectId> {
        let namespace = self.handle.id;
        self.shared()
            .call(|reply| Command::NewUniqueId { namespace, reply })
    }

    /// The ID for `name`: the same (namespace, name) gives the same ID, also after a restart.
    pub fn id_from_name(&self, name: &str) -> Pending<ObjectId> {
        let (namespace, name) = (self.handle.id, name.to_owned());
        self.shared().call(|reply| Command::IdFromName {
            namespace,
            name,
            reply,
        })
    }

    /// Parses the 64-hex-digit text form of an ID of this namespace; the host checks it. Text
    /// of the wrong length, not hex, or not minted by this namespace fails with
    /// [`Error::InvalidArgument`].
    pub fn id_from_string(&self, text: &str) -> Pending<ObjectId> {
        let (namespace, text) = (self.handle.id, text.to_owned());
        self.shared().call(|reply| Command::IdFromString {
            namespace,
            text,
            reply,
        })
    }

    /// A stub for the object `id`, at once. An ID the namespace did not mint fails the calls
    /// made on the stub, with [`Error::InvalidArgument`].
    pub fn get(&self, id: &ObjectId) -> RemoteStub {
        let handle = self.shared().new_handle();
        self.shared().send(Command::Get {
            namespace: self.handle.id,
            id: id.clone(),
            handle: handle.id,
        });
        RemoteStub {
            handle: Arc::new(handle),
        }
    }

    /// A stub for the object named `name`, at once: `get(id_from_name(name))` without waiting
    /// for the ID, so that `get_by_name(name).fetch(request)` is one round trip.
    pub fn get_by_name(&self, name: &str) -> RemoteStub {
        let handle = self.shared().new_handle();
        self.shared().send(Command::GetByName {
            namespace: self.handle.id,
            name: name.to_owned(),
            handle: handle.id,
        });
        RemoteStub {
            handle: Arc::new(handle),
        }
    }

    /// Sends `request` to the object named `name`, in one call that holds no stub
    /// (`Namespace.fetchByName`): for one call to an object, it costs the host one message in
    /// and one out, where `get_by_name(name).fetch(request)` costs two of each and a release.
    /// It reaches the same single instance as a stub from [`RemoteNamespace::get_by_name`];
    /// but it has no place in any stub's order: calls that must arrive in order go on one
    /// stub. Errors as [`RemoteStub::fetch`]; a name over the host's bound fails with
    /// [`Error::InvalidArgument`]. A host older than `fetchByName` answers that it does not
    /// implement it ([`Error::Remote`]).
    pub fn fetch_by_name(&self, name: &str, request: Request) -> Pending<Response> {
        let size = convert::request_bytes(&request) + name.len();
        if size > REQUEST_BYTES_MAX {
            return Pending::refused(Error::InvalidArgument(format!(
                "request of about {size} bytes is over the limit of {REQUEST_BYTES_MAX} bytes \
                 (REQUEST_BYTES_MAX)"
            )));
        }
        let (namespace, name) = (self.handle.id, name.to_owned());
        self.shared().call(|reply| Command::FetchByName {
            namespace,
            name,
            request,
            reply,
        })
    }

    /// The namespace's objects that have stored data, in order of their hex IDs, after the hex
    /// ID `start_after` (`None`: from the start); at most `limit` of them (between 1 and the
    /// host's `list_objects_max`, 1000 by default, else [`Error::InvalidArgument`]).
    pub fn list_objects(&self, start_after: Option<&str>, limit: u32) -> Pending<ObjectPage> {
        let (namespace, start_after) = (self.handle.id, start_after.unwrap_or("").to_owned());
        self.shared().call(|reply| Command::ListObjects {
            namespace,
            start_after,
            limit,
            reply,
        })
    }

    /// [`RemoteNamespace::list_objects`] with what the host stores about each object: when it
    /// first stored data and its alarm. The same objects, order, paging and limits. The host
    /// reads its storage only: no object is activated.
    pub fn list_object_info(
        &self,
        start_after: Option<&str>,
        limit: u32,
    ) -> Pending<ObjectInfoPage> {
        let (namespace, start_after) = (self.handle.id, start_after.unwrap_or("").to_owned());
        self.shared().call(|reply| Command::ListObjectInfo {
            namespace,
            start_after,
            limit,
            reply,
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }
}

impl fmt::Debug for RemoteNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteNamespace")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A stub: a capability to one object. Cheap to clone; the clones are the same stub, so calls
/// made on any of them keep one order.
///
/// Calls made on a stub are delivered to the object in the order they were made (E-order):
/// the order of the calls to [`RemoteStub::fetch`], not of the awaits. A stub breaks when its object
/// is reset (a panic in the object's code, a failed commit), the host shuts down or the
/// connection is lost: its calls then fail with [`Error::Disconnected`], and it stays broken.
/// Get a new stub from the namespace.
#[derive(Clone)]
pub struct RemoteStub {
    handle: Arc<Handle>,
}

impl RemoteStub {
    /// Sends `request` to the object. The call is sent now, taking its place in the stub's
    /// order; await the [`Pending`] for the response. Dropping the `Pending` before it is
    /// done cancels the call, as dropping the future of [`crate::Stub::fetch`] does: the host
    /// stops the handler at its next await (or never delivers it), and its response is not
    /// sent. Writes the handler made before then stay made.
    ///
    /// Errors: [`Error::Remote`] when the object's code failed; [`Error::Disconnected`] when
    /// the stub is broken (get a new one); [`Error::Overloaded`] when too many calls are
    /// queued for the object, the host or this client (back off); [`Error::InvalidArgument`]
    /// for a refused argument (a bad ID or name, a request over [`REQUEST_BYTES_MAX`]).
    pub fn fetch(&self, request: Request) -> Pending<Response> {
        let size = convert::request_bytes(&request);
        if size > REQUEST_BYTES_MAX {
            return Pending::refused(Error::InvalidArgument(format!(
                "request of about {size} bytes is over the limit of {REQUEST_BYTES_MAX} bytes \
                 (REQUEST_BYTES_MAX)"
            )));
        }
        let stub = self.handle.id;
        self.handle.shared.call(|reply| Command::Fetch {
            stub,
            request,
            reply,
        })
    }

    /// [`RemoteStub::fetch`] of a request with `method`, `path` (with its query, e.g. `/a?b=1`) and
    /// `body`, and no headers. A method or path that does not parse fails with
    /// [`Error::InvalidArgument`].
    pub fn call(&self, method: &str, path: &str, body: impl Into<Bytes>) -> Pending<Response> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .body(body.into());
        match request {
            Ok(request) => self.fetch(request),
            Err(error) => Pending::refused(Error::InvalidArgument(format!(
                "invalid request {method} {path:?}: {error}"
            ))),
        }
    }
}

impl RemoteStub {
    /// Sends `request` to the object, whose body may be a stream (of any size: it is sent in
    /// pieces as it is read); the response's body may be one too. The call is sent now, in
    /// the stub's order with [`RemoteStub::fetch`]; the request body is read while the
    /// returned future waits for the response, and then while the response body is read,
    /// until the response is complete. Dropping the future, or the response body before its
    /// end, cancels the call.
    ///
    /// The future and the response are not `Send`: a [`crate::Body`] belongs to its thread.
    /// Errors as [`RemoteStub::fetch`]; a response body that broke off ends with the error
    /// of the call.
    pub fn fetch_stream(
        &self,
        request: StreamRequest,
    ) -> impl Future<Output = Result<StreamResponse, Error>> + use<> {
        let send = Box::new(|head, upload| self.request(head, upload));
        stream::fetch(request, REQUEST_BYTES_MAX, send)
    }

    /// Opens a WebSocket to the object: sends `request` (with `Upgrade: websocket`, added when
    /// it has no `Upgrade` header) now, in the stub's order, and resolves once the object
    /// accepted it and the host started it. An object that answers otherwise fails it with
    /// [`Error::Remote`] naming the status; other errors as [`RemoteStub::fetch`].
    pub fn web_socket(
        &self,
        request: Request,
    ) -> impl Future<Output = Result<ClientWebSocket, Error>> + Send + use<> {
        stream::web_socket(request, Box::new(|head, upload| self.request(head, upload)))
    }

    /// Runs `call` on the connection's thread with the stub as a capability of the interface
    /// `C`: the interface the object's class exports (its capnp client type, generated from
    /// the class's schema, e.g. `counter::Client`), or `durable_object::Client`. `call`
    /// makes its calls on it and returns a future of what it makes of their answers, which
    /// the returned [`Pending`] delivers.
    ///
    /// `call` runs when the stub's earlier calls have been sent, so the calls it makes before
    /// it returns take their place in the stub's order with [`RemoteStub::fetch`] and the
    /// others (calls made later, inside the future, leave when it first runs: after the
    /// commands made meanwhile). They pipeline: `get_by_name(name)` and a call made here
    /// travel in one round trip, and so does a call on a capability the first one returns.
    /// Capabilities live on the connection's thread: use them inside `call` and its future.
    /// Dropping the `Pending` cancels the calls not yet answered. Errors as
    /// [`RemoteStub::fetch`]; an interface the object does not export fails with
    /// [`Error::InvalidArgument`] (capnp's `unimplemented`).
    ///
    /// ```no_run
    /// # async fn example(stub: duro::client::RemoteStub) -> Result<(), duro::Error> {
    /// use duro::duro_capnp::durable_object;
    ///
    /// // The stub as its `DurableObject` capability; a class's own interface works alike.
    /// let status = stub
    ///     .with_capability(|object: durable_object::Client| {
    ///         let mut call = object.fetch_request();
    ///         call.get().init_request().set_url("/");
    ///         let answer = call.send().promise;
    ///         async move { Ok(answer.await?.get()?.get_response()?.get_status()) }
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_capability<C, F, Fut, T>(&self, call: F) -> Pending<T>
    where
        C: capnp::capability::FromClientHook,
        F: FnOnce(C) -> Fut + Send + 'static,
        Fut: Future<Output = capnp::Result<T>> + 'static,
        T: Send + 'static,
    {
        let stub = self.handle.id;
        self.handle
            .shared
            .call(|reply: Reply<T>| Command::Capability {
                stub,
                call: Box::new(move |capability| match capability {
                    Ok(stub) => driver::answer(reply, call(C::new(stub.client.hook)), Ok),
                    Err(error) => reply.send(Err(error)),
                }),
            })
    }

    /// Sends a `DurableObject.request` call now, whose body follows from `upload` if given.
    fn request(
        &self,
        head: Request,
        upload: Option<mpsc::Receiver<stream::Upload>>,
    ) -> Result<stream::Call, Error> {
        let size = convert::request_bytes(&head);
        if size > REQUEST_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "request head of about {size} bytes is over the limit of {REQUEST_BYTES_MAX} \
                 bytes (REQUEST_BYTES_MAX)"
            )));
        }
        let shared = &self.handle.shared;
        let slot = Slot::take(&shared.in_flight).ok_or_else(calls_in_flight_max)?;
        let (command, call) = stream::call(head, upload, shared.clone());
        shared.send(Command::Request {
            stub: self.handle.id,
            command: Box::new(command),
            slot,
        });
        Ok(call)
    }
}

impl fmt::Debug for RemoteStub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteStub")
            .field("handle", &self.handle.id)
            .finish_non_exhaustive()
    }
}

/// A namespace and the class it is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NamespaceInfo {
    /// The namespace's name.
    pub name: String,
    /// The name of the class its objects are instances of.
    pub class_name: String,
}

/// One page of [`RemoteNamespace::list_objects`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectPage {
    /// The objects' IDs, in order of their hex form; with their names when they were reached
    /// by name.
    pub ids: Vec<ObjectId>,
    /// Whether more objects follow.
    pub more: bool,
}

impl ObjectPage {
    /// The `start_after` of the next page, when there is one.
    pub fn next_start_after(&self) -> Option<String> {
        self.ids.last().filter(|_| self.more).map(ObjectId::to_hex)
    }
}

/// One object of [`RemoteNamespace::list_object_info`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectInfo {
    /// The object's ID, with its name when it was reached by name.
    pub id: ObjectId,
    /// When the object first stored data, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The object's alarm, in milliseconds since the Unix epoch, if it has one.
    pub alarm_ms: Option<u64>,
}

/// One page of [`RemoteNamespace::list_object_info`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectInfoPage {
    /// The objects, in order of their hex IDs.
    pub objects: Vec<ObjectInfo>,
    /// Whether more objects follow.
    pub more: bool,
}

impl ObjectInfoPage {
    /// The `start_after` of the next page, when there is one.
    pub fn next_start_after(&self) -> Option<String> {
        let last = self.objects.last().filter(|_| self.more);
        last.map(|info| info.id.to_hex())
    }
}

/// The answer to a call that was sent when it was made: a future of the call's result.
///
/// Dropping it before it is done cancels the call (see [`RemoteStub::fetch`]). It keeps the
/// connection open until it is done or dropped.
#[must_use = "the call was sent; await the Pending for its answer"]
pub struct Pending<T> {
    state: PendingState<T>,
}

enum PendingState<T> {
    Sent {
        answer: oneshot::Receiver<Result<T, Error>>,
        /// Keeps the driver alive until the answer is delivered, also when every other handle
        /// was dropped meanwhile.
        _client: Arc<Shared>,
    },
    /// Refused before it was sent; `None` once taken.
    Refused(Option<Error>),
}

impl<T> Pending<T> {
    fn refused(error: Error) -> Pending<T> {
        Pending {
            state: PendingState::Refused(Some(error)),
        }
    }
}

impl<T> Future for Pending<T> {
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, Error>> {
        match &mut self.get_mut().state {
            PendingState::Sent { answer, .. } => Pin::new(answer)
                .poll(cx)
                .map(|answer| answer.unwrap_or_else(|_| Err(driver_stopped()))),
            PendingState::Refused(error) => Poll::Ready(Err(error
                .take()
                .expect("`Pending` polled after it completed"))),
        }
    }
}

impl<T> fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

fn driver_stopped() -> Error {
    Error::Disconnected("the client's connection driver stopped".into())
}

/// What every handle of one connection shares.
struct Shared {
    /// The driver's command channel. Unbounded so that sending never waits, which keeps the
    /// order of calls the order they were made; calls in flight are bounded by `in_flight`,
    /// and pipelined capabilities by the handles the caller holds.
    commands: mpsc::UnboundedSender<Command>,
    /// The id of the next handle (namespace or stub) in the driver's table.
    next_handle: AtomicU64,
    /// Calls in flight, at most [`CALLS_IN_FLIGHT_MAX`].
    in_flight: Arc<AtomicUsize>,
    addr: ListenAddr,
}

impl Shared {
    /// Sends a command. When the driver is gone, a call's reply sender is dropped with the
    /// command and its caller sees [`driver_stopped`]; a release has nothing left to release.
    fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    fn new_handle(self: &Arc<Self>) -> Handle {
        Handle {
            id: self.next_handle.fetch_add(1, Ordering::Relaxed),
            shared: self.clone(),
        }
    }

    /// Sends the call `make` builds around its reply, if a place in flight is free.
    fn call<T>(self: &Arc<Self>, make: impl FnOnce(Reply<T>) -> Command) -> Pending<T> {
        let Some(slot) = Slot::take(&self.in_flight) else {
            return Pending::refused(calls_in_flight_max());
        };
        let (sender, answer) = oneshot::channel();
        self.send(make(Reply {
            sender,
            _slot: slot,
        }));
        Pending {
            state: PendingState::Sent {
                answer,
                _client: self.clone(),
            },
        }
    }
}

/// The error of a call past [`CALLS_IN_FLIGHT_MAX`].
fn calls_in_flight_max() -> Error {
    Error::Overloaded(format!(
        "{CALLS_IN_FLIGHT_MAX} calls in flight on this client (CALLS_IN_FLIGHT_MAX): await some \
         answers before making more calls"
    ))
}

/// One place among the [`CALLS_IN_FLIGHT_MAX`] calls in flight, given back when dropped: by
/// the driver once the answer is delivered, or with a command the driver never took.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(in_flight: &Arc<AtomicUsize>) -> Option<Slot> {
        if in_flight.fetch_add(1, Ordering::AcqRel) >= CALLS_IN_FLIGHT_MAX {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(in_flight.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A namespace's or stub's entry in the driver's table; dropping the last reference releases
/// the capability.
struct Handle {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Sent after every command made through this handle, so after all its calls.
        self.shared.send(Command::Release { handle: self.id });
    }
}

/// Where the driver delivers a call's answer.
struct Reply<T> {
    sender: oneshot::Sender<Result<T, Error>>,
    _slot: Slot,
}

impl<T> Reply<T> {
    fn send(self, answer: Result<T, Error>) {
        // The caller may have stopped waiting; the answer is then dropped.
        let _ = self.sender.send(answer);
    }
}

/// A request to the driver. Handles are ids in the driver's table of capabilities.
// `Fetch` is the largest variant and by far the most frequent: boxing its request would cost
// an allocation per call to make the rare commands smaller.
#[allow(clippy::large_enum_variant)]
enum Command {
    Namespace {
        handle: u64,
        name: String,
    },
    ListNamespaces(Reply<Vec<NamespaceInfo>>),
    NewUniqueId {
        namespace: u64,
        reply: Reply<ObjectId>,
    },
    IdFromName {
        namespace: u64,
        name: String,
        reply: Reply<ObjectId>,
    },
    IdFromString {
        namespace: u64,
        text: String,
        reply: Reply<ObjectId>,
    },
    Get {
        namespace: u64,
        id: ObjectId,
        handle: u64,
    },
    GetByName {
        namespace: u64,
        name: String,
        handle: u64,
    },
    ListObjects {
        namespace: u64,
        start_after: String,
        limit: u32,
        reply: Reply<ObjectPage>,
    },
    ListObjectInfo {
        namespace: u64,
        start_after: String,
        limit: u32,
        reply: Reply<ObjectInfoPage>,
    },
    Fetch {
        stub: u64,
        request: Request,
        reply: Reply<Response>,
    },
    FetchByName {
        namespace: u64,
        name: String,
        request: Request,
        reply: Reply<Response>,
    },
    /// Calls made by the caller's code on the stub's capability (see
    /// [`RemoteStub::with_capability`]), or the error that there is no such capability.
    Capability {
        stub: u64,
        call: CapabilityCall,
    },
    /// A `DurableObject.request` call: a streamed body, or a WebSocket.
    Request {
        stub: u64,
        command: Box<stream::RequestCommand>,
        slot: Slot,
    },
    /// Calls made on the host's capability by the operator's side (`client::admin`).
    Admin(Box<dyn FnOnce(&host::Client) + Send>),
    Release {
        handle: u64,
    },
}

/// What [`RemoteStub::with_capability`] runs on the driver thread.
type CapabilityCall = Box<dyn FnOnce(Result<durable_object::Client, Error>) + Send>;

fn read_id(reader: object_id::Reader<'_>) -> capnp::Result<ObjectId> {
    let bytes = reader.get_bytes()?;
    let bytes: [u8; ID_BYTES] = bytes.try_into().map_err(|_| {
        capnp::Error::failed(format!("the host sent an id of {} bytes", bytes.len()))
    })?;
    let name = reader.get_name()?.to_str()?;
    Ok(ObjectId::from_host(
        bytes,
        (!name.is_empty()).then(|| name.to_owned()),
    ))
}

fn read_namespaces(
    list: capnp::struct_list::Reader<'_, namespace_info::Owned>,
) -> capnp::Result<Vec<NamespaceInfo>> {
    list.iter()
        .map(|info| {
            Ok(NamespaceInfo {
                name: info.get_name()?.to_string()?,
                class_name: info.get_class_name()?.to_string()?,
            })
        })
        .collect()
}

fn read_page(results: namespace::list_objects_results::Reader<'_>) -> capnp::Result<ObjectPage> {
    let ids = results
        .get_ids()?
        .iter()
        .map(read_id)
        .collect::<capnp::Result<_>>()?;
    Ok(ObjectPage {
        ids,
        more: results.get_more(),
    })
}

fn read_info_page(
    results: namespace::list_object_info_results::Reader<'_>,
) -> capnp::Result<ObjectInfoPage> {
    let objects = results
        .get_objects()?
        .iter()
        .map(|info| {
            Ok(ObjectInfo {
                id: read_id(info.get_id()?)?,
                created_ms: info.get_created_ms(),
                alarm_ms: info.get_has_alarm().then(|| info.get_alarm_ms()),
            })
        })
        .collect::<capnp::Result<_>>()?;
    Ok(ObjectInfoPage {
        objects,
        more: results.get_more(),
    })
}

/// The driver thread: the connection, its RPC system and every capability of the client.
pub mod admin;

mod driver {
    use super::*;

    /// Runs a driver for a connection to `addr` (over TLS when `tls` is given) until every
    /// handle of the client is dropped; reports on `ready` whether the connection was made.
    pub(super) fn run(
        addr: ListenAddr,
        tls: Option<ClientTls>,
        commands: mpsc::UnboundedReceiver<Command>,
        ready: oneshot::Sender<Result<(), Error>>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = ready.send(Err(Error::Disconnected(format!(
                    "starting the client's runtime: {error}"
                ))));
                return;
            }
        };
        // Dropped at the end, before the runtime: with it go the RPC system and the calls in
        // flight, which closes the connection.
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, connect(&addr, tls.as_ref())).await {
                Ok(Ok(host)) => {
                    let _ = ready.send(Ok(()));
                    Driver::new(host).serve(commands).await;
                }
                Ok(Err(error)) => {
                    let message = format!("connecting to {addr}: {error}");
                    let _ = ready.send(Err(Error::Disconnected(message)));
                }
                Err(_) => {
                    let message =
                        format!("connecting to {addr}: timed out after {CONNECT_TIMEOUT:?}");
                    let _ = ready.send(Err(Error::Disconnected(message)));
                }
            }
        });
    }

    /// Opens the connection and starts its RPC system on the local set.
    ///
    /// Its writes are corked: the driver issues a batch of commands at once, and their calls
    /// leave in one write rather than one `send` each.
    async fn connect(addr: &ListenAddr, tls: Option<&ClientTls>) -> std::io::Result<host::Client> {
        let connection = crate::wire::connect_corked(addr, tls).await?;
        tokio::task::spawn_local(connection.system);
        tokio::task::spawn_local(connection.flusher);
        Ok(connection.host)
    }

    /// A capability in the driver's table.
    enum Capability {
        Namespace(namespace::Client),
        Stub(durable_object::Client),
    }

    struct Driver {
        host: host::Client,
        /// Namespaces and stubs by handle id; an entry lives until its handle is dropped.
        capabilities: HashMap<u64, Capability>,
    }

    impl Driver {
        fn new(host: host::Client) -> Driver {
            Driver {
                host,
                capabilities: HashMap::new(),
            }
        }

        /// Takes commands until the channel closes, which is when every handle is dropped.
        async fn serve(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
            let mut batch = Vec::with_capacity(COMMAND_BATCH_MAX);
            while commands.recv_many(&mut batch, COMMAND_BATCH_MAX).await > 0 {
                for command in batch.drain(..) {
                    self.handle(command);
                }
            }
        }

        /// Issues the command's capnp call now, synchronously: this is where the order of calls
        /// is kept. Only the wait for the answer runs in a task of its own.
        fn handle(&mut self, command: Command) {
            match command {
                Command::Namespace { handle, name } => {
                    let mut call = self.host.namespace_request();
                    call.get().set_name(&name);
                    let namespace = call.send().pipeline.get_namespace();
                    self.capabilities
                        .insert(handle, Capability::Namespace(namespace));
                }
                Command::Admin(call) => call(&self.host),
                Command::ListNamespaces(reply) => {
                    let promise = self.host.list_namespaces_request().send().promise;
                    answer(reply, promise, |r| {
                        read_namespaces(r.get()?.get_namespaces()?)
                    });
                }
                Command::Get {
                    namespace,
                    id,
                    handle,
                } => self.get(namespace, &id, handle),
                Command::GetByName {
                    namespace,
                    name,
                    handle,
                } => self.get_by_name(namespace, &name, handle),
                Command::Fetch {
                    stub,
                    request,
                    reply,
                } => self.fetch(stub, &request, reply),
                Command::FetchByName {
                    namespace,
                    name,
                    request,
                    reply,
                } => self.on_namespace(namespace, reply, |namespace, reply| {
                    let mut call = namespace.fetch_by_name_request();
                    call.get().set_name(&name);
                    convert::request_to_capnp(&request, call.get().init_request());
                    answer(reply, call.send().promise, |r| {
                        convert::response_from_capnp(r.get()?.get_response()?)
                    });
                }),
                Command::Capability { stub, call } => match self.capabilities.get(&stub) {
                    Some(Capability::Stub(stub)) => call(Ok(stub.clone())),
                    _ => call(Err(unknown_handle())),
                },
                Command::Request {
                    stub,
                    command,
                    slot,
                } => match self.capabilities.get(&stub) {
                    Some(Capability::Stub(stub)) => stream::issue(stub, *command, slot),
                    _ => command.refuse(unknown_handle()),
                },
                Command::Release { handle } => {
                    self.capabilities.remove(&handle);
                }
                Command::NewUniqueId { namespace, reply } => {
                    self.on_namespace(namespace, reply, |namespace, reply| {
                        let promise = namespace.new_unique_id_request().send().promise;
                        answer(reply, promise, |r| read_id(r.get()?.get_id()?));
                    })
                }
                Command::IdFromName {
                    namespace,
                    name,
                    reply,
                } => self.on_namespace(namespace, reply, |namespace, reply| {
                    let mut call = namespace.id_from_name_request();
                    call.get().set_name(&name);
                    answer(reply, call.send().promise, |r| read_id(r.get()?.get_id()?));
                }),
                Command::IdFromString {
                    namespace,
                    text,
                    reply,
                } => self.on_namespace(namespace, reply, |namespace, reply| {
                    let mut call = namespace.id_from_string_request();
                    call.get().set_id(&text);
                    answer(reply, call.send().promise, |r| read_id(r.get()?.get_id()?));
                }),
                Command::ListObjects {
                    namespace,
                    start_after,
                    limit,
                    reply,
                } => self.on_namespace(namespace, reply, |namespace, reply| {
                    let mut call = namespace.list_objects_request();
                    call.get().set_start_after(&start_after);
                    call.get().set_limit(limit);
                    answer(reply, call.send().promise, |r| read_page(r.get()?));
                }),
                Command::ListObjectInfo {
                    namespace,
                    start_after,
                    limit,
                    reply,
                } => self.on_namespace(namespace, reply, |namespace, reply| {
                    let mut call = namespace.list_object_info_request();
                    call.get().set_start_after(&start_after);
                    call.get().set_limit(limit);
                    answer(reply, call.send().promise, |r| read_info_page(r.get()?));
                }),
            }
        }

        fn get(&mut self, namespace: u64, id: &ObjectId, handle: u64) {
            if let Some(namespace) = self.namespace(namespace) {
                let mut call = namespace.get_request();
                let mut builder = call.get().init_id();
                builder.set_bytes(id.bytes());
                builder.set_name(id.name().unwrap_or(""));
                let pipeline = call.send().pipeline;
                let stub = crate::wire::resolving(pipeline.get_stub(), pipeline);
                self.capabilities.insert(handle, Capability::Stub(stub));
            }
        }

        fn get_by_name(&mut self, namespace: u64, name: &str, handle: u64) {
            if let Some(namespace) = self.namespace(namespace) {
                let mut call = namespace.get_by_name_request();
                call.get().set_name(name);
                let pipeline = call.send().pipeline;
                let stub = crate::wire::resolving(pipeline.get_stub(), pipeline);
                self.capabilities.insert(handle, Capability::Stub(stub));
            }
        }

        fn fetch(&self, stub: u64, request: &Request, reply: Reply<Response>) {
            let Some(Capability::Stub(stub)) = self.capabilities.get(&stub) else {
                return reply.send(Err(unknown_handle()));
            };
            let mut call = stub.fetch_request();
            convert::request_to_capnp(request, call.get().init_request());
            answer(reply, call.send().promise, |r| {
                convert::response_from_capnp(r.get()?.get_response()?)
            });
        }

        /// Issues a call on the namespace `handle` with `issue`.
        fn on_namespace<T>(
            &self,
            handle: u64,
            reply: Reply<T>,
            issue: impl FnOnce(&namespace::Client, Reply<T>),
        ) {
            match self.namespace(handle) {
                Some(namespace) => issue(namespace, reply),
                None => reply.send(Err(unknown_handle())),
            }
        }

        fn namespace(&self, handle: u64) -> Option<&namespace::Client> {
            match self.capabilities.get(&handle) {
                Some(Capability::Namespace(namespace)) => Some(namespace),
                _ => None,
            }
        }
    }

    /// A handle is released only after every command made through it, so a command always
    /// finds its capability; this answers one that does not, should that ever break.
    fn unknown_handle() -> Error {
        Error::Disconnected("the client lost track of this capability".into())
    }

    /// Awaits `promise` in a local task and delivers what `read` makes of it; or, when the
    /// caller drops its [`Pending`] first, drops the promise, which cancels the call on the
    /// host (capnp-rpc sends `Finish`, and the host drops the call's future).
    pub(super) fn answer<X, T>(
        mut reply: Reply<T>,
        promise: impl Future<Output = capnp::Result<X>> + 'static,
        read: impl FnOnce(X) -> capnp::Result<T> + 'static,
    ) where
        X: 'static,
        T: 'static,
    {
        tokio::task::spawn_local(async move {
            tokio::select! {
                answer = promise => reply.send(answer.and_then(read).map_err(Error::from)),
                () = reply.sender.closed() => {}
            }
        });
    }
}
