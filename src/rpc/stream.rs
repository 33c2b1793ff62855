//! `DurableObject.request`: requests whose bodies are streamed, and WebSockets, over capnp.
//!
//! The host's side of the streaming half of the contract (`schema/duro.capnp`): the request's
//! head is read and its call enqueued on the stub at dispatch, as `fetch` does (E-order); the
//! body follows on a `ByteStream` the host implements ([`RequestBody`]); the answer goes back
//! through the caller's `ResponseContext`, a body as `write`s on the caller's `ByteStream`, or a
//! WebSocket as a pair of `WebSocket` capabilities ([`UpSocket`] from the peer to the object,
//! [`DownSocket`] the other way).
//!
//! The streaming calls that arrive from the peer (a request body's `write`s, the messages on an
//! up socket) are dispatched as they arrive ([`eager_client`]), not one after another as
//! capnp-rpc dispatches `-> stream` methods: capnp-rpc would queue the later ones unseen, in any
//! number, while the first waits. Dispatched at once, each is admitted against the connection's
//! bounds ([`InFlight`]) before it is kept, and [`Turns`] keeps their order instead.
//!
//! Memory: a request body is held in the body's channel (bounded) and in the writes admitted
//! in flight (the connection's share of the budget); a response body is read a chunk at a time
//! and each write's bytes are owed to the connection's account until the socket took them.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::ops::Deref;
use std::rc::Rc;

use bytes::Bytes;
use capnp::capability::{FromClientHook, FromServer};
use capnp::private::capability::ClientHook;
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use tokio::sync::oneshot;

use super::connection::{Connection, InFlight, RESPONSE_BYTES_MAX};
use crate::body::{Body, BodySender};
use crate::error::Error;
use crate::host::{HostSocket, SocketSink, Stub, WebSocketMessage};
use crate::message::{Response, StreamRequest, StreamResponse};
use crate::wire::budget::Account;
use crate::wire::duro_capnp::{byte_stream, durable_object, response_context, web_socket};
use crate::wire::{MESSAGE_BYTES_MAX, STREAM_WRITE_BYTES, convert};

/// Largest `write` a request body takes: what one message can carry, less room for the call
/// around it. The connection's reader refuses larger messages anyway (and drops the
/// connection); this names the rule for the writes that pass it narrowly.
pub const WRITE_BYTES_MAX: usize = RESPONSE_BYTES_MAX;

/// `DurableObject.request` (see the module docs). The head is read, admitted and enqueued
/// on the stub now, before any await: this is where E-order with `fetch` is kept.
pub(super) fn request(
    stub: &Stub,
    connection: &Rc<Connection>,
    params: durable_object::RequestParams,
    mut results: durable_object::RequestResults,
) -> impl Future<Output = capnp::Result<()>> + 'static + use<> {
    let started = start(stub, connection, params, &mut results);
    let connection = connection.clone();
    async move {
        let Started {
            in_flight,
            context,
            call,
        } = started?;
        let (response, socket) = call.await?;
        match socket {
            Some(socket) => start_web_socket(&context, &response, socket, &connection).await?,
            None => respond(&context, response, &connection.account).await?,
        }
        drop(in_flight);
        Ok(())
    }
}

/// A `request` call taken in: counted in the connection's bounds, and enqueued on the stub.
struct Started {
    /// The call's place in the connection's bounds, with the bytes of its head.
    in_flight: InFlight,
    context: response_context::Client,
    /// The call to the object: its response, and the WebSocket it accepted, if any.
    call: LocalBoxFuture<'static, Result<(StreamResponse, Option<HostSocket>), Error>>,
}

fn start(
    stub: &Stub,
    connection: &Rc<Connection>,
    params: durable_object::RequestParams,
    results: &mut durable_object::RequestResults,
) -> capnp::Result<Started> {
    let params = params.get()?;
    let head = convert::request_from_capnp(params.get_request()?)?;
    let context = params.get_context()?;
    let in_flight = InFlight::admit(connection, convert::request_bytes(&head))?;
    let (parts, start) = head.into_parts();
    let body = if params.get_body_follows() {
        request_body(start, connection, results)?
    } else {
        Body::full(start)
    };
    // A whole-body read of it is bounded as a `fetch` request is: by the wire's message.
    let request = StreamRequest::from_parts(parts, body.with_whole_bytes_max(MESSAGE_BYTES_MAX));
    let call = if is_web_socket_upgrade(request.headers()) {
        stub.fetch_upgrade(request).boxed_local()
    } else {
        let call = stub.fetch_stream(request);
        async move { Ok((call.await?, None)) }.boxed_local()
    };
    Ok(Started {
        in_flight,
        context,
        call,
    })
}

/// Whether `headers` ask for a WebSocket (`Upgrade: websocket`, in any case, maybe among other
/// protocols).
fn is_web_socket_upgrade(headers: &http::HeaderMap) -> bool {
    let upgrade = headers.get_all(http::header::UPGRADE);
    upgrade.iter().any(|value| {
        let protocols = value.to_str().unwrap_or("").split(',');
        protocols
            .map(str::trim)
            .any(|protocol| protocol.eq_ignore_ascii_case("websocket"))
    })
}

/// The body of a request whose rest follows: `start`, then what the peer writes to the
/// `requestBody` set in `results`, published at once so the peer's pipelined writes reach it.
fn request_body(
    start: Bytes,
    connection: &Rc<Connection>,
    results: &mut durable_object::RequestResults,
) -> capnp::Result<Body> {
    let (mut sender, body) = Body::channel();
    if !start.is_empty() {
        // A fresh channel takes its first chunk at once, however large.
        let _ = sender.send(start).now_or_never();
    }
    let stream: byte_stream::Client = eager_client(RequestBody {
        sender: RefCell::new(Some(sender)),
        phase: Cell::new(Phase::Open),
        turns: Turns::default(),
        connection: connection.clone(),
    });
    results.get().set_request_body(stream);
    results.set_pipeline()?;
    Ok(body)
}

/// Hands a response to the caller: the head in `startResponse`, with the whole body when it
/// fits in one message, else followed by the body's chunks as `write`s and an `end`. Returns
/// once the caller took it all; fails, without `end`, when the object's body broke off.
async fn respond(
    context: &response_context::Client,
    response: StreamResponse,
    account: &Account,
) -> capnp::Result<()> {
    let (parts, body) = response.into_parts();
    let whole = Response::from_parts(parts, body.as_full().cloned().unwrap_or_default());
    let mut call = context.start_response_request();
    if body.as_full().is_some() && convert::response_bytes(&whole) <= RESPONSE_BYTES_MAX {
        // Owed until the writer has sent it, as a `fetch` response is.
        account.owe(convert::response_payload_bytes(&whole));
        convert::response_to_capnp(&whole, call.get().init_response());
        call.send().promise.await?;
        return Ok(());
    }
    let head = whole.map(|_| Bytes::new());
    account.owe(convert::response_payload_bytes(&head));
    convert::response_to_capnp(&head, call.get().init_response());
    call.get().set_body_follows(true);
    let started = call.send();
    // Pipelined: the first writes travel with `startResponse`.
    let stream = started.pipeline.get_body();
    write_body(body, &stream, account).await?;
    stream.end_request().send().promise.await?;
    started.promise.await?;
    Ok(())
}

/// Writes `body` to `stream` a chunk at a time, each write waiting for capnp's flow control,
/// so that the object's writer waits while the caller is behind.
async fn write_body(
    mut body: Body,
    stream: &byte_stream::Client,
    account: &Account,
) -> capnp::Result<()> {
    while let Some(chunk) = body.chunk().await {
        let chunk = chunk
            .map_err(|error| Error::Remote(format!("the response body broke off: {error}")))?;
        for at in (0..chunk.len()).step_by(STREAM_WRITE_BYTES) {
            let piece = chunk.slice(at..chunk.len().min(at + STREAM_WRITE_BYTES));
            let mut write = stream.write_request();
            write.get().set_bytes(&piece);
            // Owed while the write is on its way: until the connection's writer sent it.
            account.owe(piece.len());
            write.send().await?;
        }
    }
    Ok(())
}

/// Hands the WebSocket the object accepted to the caller (`startWebSocket`) and attaches the
/// caller's `downSocket` to it: from then on the socket is the host's and the caller's.
async fn start_web_socket(
    context: &response_context::Client,
    response: &StreamResponse,
    socket: HostSocket,
    connection: &Rc<Connection>,
) -> capnp::Result<()> {
    let socket = Rc::new(socket);
    let up: web_socket::Client = eager_client(UpSocket::new(socket.clone(), connection));
    let mut call = context.start_web_socket_request();
    let headers = response.headers();
    convert::headers_to_capnp(headers, call.get().init_headers(headers.len() as u32));
    call.get().set_up_socket(up);
    let account = connection.account.clone();
    account.owe(convert::headers_payload_bytes(headers));
    let reply = call.send().promise.await?;
    let down = reply.get()?.get_down_socket()?;
    socket.attach(Box::new(DownSocket { down, account }));
    Ok(())
}

/// Where a request body is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    /// `end` arrived: the body is complete.
    Ended,
    /// A write failed or was cancelled: the body broke off, and later calls fail.
    Broken,
}

/// A request body's `ByteStream`, written by the peer: each `write` returns once the object's
/// body took its bytes, so capnp's flow control slows the peer to the object's pace; `end`
/// ends the body; released without `end`, it drops its sender, which breaks the body off.
struct RequestBody {
    /// `None` once ended or broken off, and while a write sends.
    sender: RefCell<Option<BodySender>>,
    phase: Cell<Phase>,
    turns: Turns,
    connection: Rc<Connection>,
}

impl RequestBody {
    /// Puts a call admitted at dispatch in line. A call refused breaks the body off at once,
    /// without waiting for its turn, so that refused calls hold nothing.
    fn in_line<T>(
        &self,
        admitted: capnp::Result<(InFlight, T)>,
    ) -> capnp::Result<(InFlight, T, impl Future<Output = Turn> + 'static + use<T>)> {
        match admitted {
            Ok((in_flight, call)) => Ok((in_flight, call, self.turns.take())),
            Err(error) => {
                self.break_off();
                Err(error)
            }
        }
    }

    fn break_off(&self) {
        if self.phase.get() == Phase::Open {
            self.phase.set(Phase::Broken);
        }
        drop(self.sender.borrow_mut().take());
    }

    /// The error of a call that finds the body no longer open.
    fn closed(&self) -> capnp::Error {
        match self.phase.get() {
            Phase::Ended => capnp::Error::failed("the request body was ended already".into()),
            _ => capnp::Error::failed("the request body broke off".into()),
        }
    }

    async fn send(&self, chunk: Bytes) -> capnp::Result<()> {
        if self.phase.get() != Phase::Open {
            return Err(self.closed());
        }
        let Some(mut sender) = self.sender.borrow_mut().take() else {
            return Err(self.closed());
        };
        if sender.send(chunk).await.is_err() {
            return Err(capnp::Error::failed(
                "the object stopped reading the request body".into(),
            ));
        }
        // A later call may have been cancelled meanwhile, which broke the body off.
        if self.phase.get() == Phase::Open {
            *self.sender.borrow_mut() = Some(sender);
        }
        Ok(())
    }
}

/// Breaks a request body off when the call that holds it is dropped before it finished
/// (cancelled by the peer, or the connection lost): a write that never happened must not
/// leave a gap in the body.
struct BreakUnlessDone(Option<Rc<RequestBody>>);

impl BreakUnlessDone {
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for BreakUnlessDone {
    fn drop(&mut self) {
        if let Some(body) = self.0.take() {
            body.break_off();
        }
    }
}

impl byte_stream::Server for RequestBody {
    fn write(
        self: Rc<Self>,
        params: byte_stream::WriteParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        // Admitted and in line now, at dispatch (see the module docs).
        let admitted = (|| -> capnp::Result<_> {
            let bytes = params.get()?.get_bytes()?;
            if bytes.len() > WRITE_BYTES_MAX {
                return Err(capnp::Error::failed(format!(
                    "a write of {} bytes, over the limit of {WRITE_BYTES_MAX} bytes \
                     (WRITE_BYTES_MAX): split it",
                    bytes.len()
                )));
            }
            let in_flight = InFlight::admit(&self.connection, bytes.len())?;
            Ok((in_flight, Bytes::copy_from_slice(bytes)))
        })();
        let admitted = self.in_line(admitted);
        async move {
            let (_in_flight, chunk, turn) = admitted?;
            let guard = BreakUnlessDone(Some(self.clone()));
            let _turn = turn.await;
            let result = self.send(chunk).await;
            if result.is_err() {
                self.break_off();
            }
            guard.done();
            result
        }
    }

    fn end(
        self: Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let admitted = self.in_line(InFlight::admit(&self.connection, 0).map(|a| (a, ())));
        async move {
            let (_in_flight, (), turn) = admitted?;
            let guard = BreakUnlessDone(Some(self.clone()));
            let _turn = turn.await;
            if self.phase.get() != Phase::Open {
                return Err(self.closed());
            }
            let sender = self.sender.borrow_mut().take();
            self.phase.set(Phase::Ended);
            if let Some(sender) = sender {
                sender.finish();
            }
            guard.done();
            Ok(())
        }
    }
}

/// The `upSocket` of a WebSocket: the peer's messages and close, handed to the host's socket
/// (and so to the object) in the order they arrived. `sendText` and `sendData` return once
/// the object handled the message, so capnp's flow control slows a peer that sends faster
/// than the object handles.
struct UpSocket {
    socket: Rc<HostSocket>,
    /// Set when the peer's close arrived: nothing may follow it.
    closed: Cell<bool>,
    /// Told of the peer's close; dropped without it, the watcher reports the peer gone.
    watcher: RefCell<Option<oneshot::Sender<()>>>,
    turns: Turns,
    connection: Rc<Connection>,
}

impl UpSocket {
    fn new(socket: Rc<HostSocket>, connection: &Rc<Connection>) -> UpSocket {
        let (closed, released) = oneshot::channel();
        let open = OpenSocket::count(connection);
        let watched = socket.clone();
        // Spawned now, on the event loop: the capability may be dropped where nothing can be.
        tokio::task::spawn_local(async move {
            if released.await.is_err() {
                let error = "the peer released its WebSocket without a close".to_owned();
                let _ = watched.failed(error).await;
            }
            drop(open);
        });
        UpSocket {
            socket,
            closed: Cell::new(false),
            watcher: RefCell::new(Some(closed)),
            turns: Turns::default(),
            connection: connection.clone(),
        }
    }

    /// Delivers a message admitted at dispatch, in its turn.
    fn deliver(
        self: Rc<Self>,
        admitted: capnp::Result<(InFlight, WebSocketMessage)>,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        // A message refused fails at once, without waiting for its turn.
        let admitted = admitted.map(|(in_flight, message)| (in_flight, message, self.turns.take()));
        async move {
            let (_in_flight, message, turn) = admitted?;
            let _turn = turn.await;
            if self.closed.get() {
                return Err(capnp::Error::failed(
                    "a WebSocket message after the close".into(),
                ));
            }
            handled(self.socket.receive(message).await)
        }
    }
}

/// The result of a socket event for the peer: an error of the object's handler is the
/// object's own (it lives on, and so does the socket); others (the object was reset, the host
/// is overloaded) go back to the peer.
fn handled(result: Result<(), Error>) -> capnp::Result<()> {
    match result {
        Err(Error::Remote(error)) => {
            tracing::debug!(%error, "a WebSocket handler failed");
            Ok(())
        }
        other => Ok(other?),
    }
}

impl web_socket::Server for UpSocket {
    fn send_text(
        self: Rc<Self>,
        params: web_socket::SendTextParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let admitted = (|| -> capnp::Result<_> {
            let text = params.get()?.get_text()?.to_string()?;
            Ok((
                InFlight::admit(&self.connection, text.len())?,
                WebSocketMessage::Text(text),
            ))
        })();
        self.deliver(admitted)
    }

    fn send_data(
        self: Rc<Self>,
        params: web_socket::SendDataParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let admitted = (|| -> capnp::Result<_> {
            let data = Bytes::copy_from_slice(params.get()?.get_data()?);
            Ok((
                InFlight::admit(&self.connection, data.len())?,
                WebSocketMessage::Binary(data),
            ))
        })();
        self.deliver(admitted)
    }

    fn close(
        self: Rc<Self>,
        params: web_socket::CloseParams,
        _: web_socket::CloseResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let admitted = (|| -> capnp::Result<_> {
            let params = params.get()?;
            let reason = params.get_reason()?.to_string()?;
            let in_flight = InFlight::admit(&self.connection, reason.len())?;
            Ok((in_flight, params.get_code(), reason))
        })();
        let admitted = admitted.map(|close| (close, self.turns.take()));
        async move {
            let ((_in_flight, code, reason), turn) = admitted?;
            let _turn = turn.await;
            if self.closed.replace(true) {
                return Err(capnp::Error::failed(
                    "the WebSocket was closed already".into(),
                ));
            }
            if let Some(watcher) = self.watcher.borrow_mut().take() {
                let _ = watcher.send(());
            }
            handled(self.socket.closed(code, reason).await)
        }
    }
}

/// Counts an open WebSocket in its connection while it lives: a connection with one is not
/// idle, however long it stays silent.
struct OpenSocket(Rc<Connection>);

impl OpenSocket {
    fn count(connection: &Rc<Connection>) -> OpenSocket {
        connection.sockets.set(connection.sockets.get() + 1);
        OpenSocket(connection.clone())
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.sockets.set(self.0.sockets.get() - 1);
    }
}

/// The caller's `downSocket`, as the socket's pump sends to it. Each send waits for capnp's
/// flow control, so a peer that reads slowly holds its pump back and fills its socket's
/// queue (closed with 1008 past its bound), not the host's memory.
struct DownSocket {
    down: web_socket::Client,
    account: Rc<Account>,
}

impl SocketSink for DownSocket {
    /// Each message is a call of its own, written as it is made; capnp's buffered writer joins
    /// those that follow one another, so `more` changes nothing here.
    fn send(
        &mut self,
        message: WebSocketMessage,
        _more: bool,
    ) -> LocalBoxFuture<'_, Result<(), String>> {
        // Owed while the message is on its way: until the connection's writer sent it.
        self.account.owe(message.len());
        let sent = match message {
            WebSocketMessage::Text(text) => {
                let mut call = self.down.send_text_request();
                call.get().set_text(&text);
                call.send()
            }
            WebSocketMessage::Binary(data) => {
                let mut call = self.down.send_data_request();
                call.get().set_data(&data);
                call.send()
            }
        };
        Box::pin(async move { sent.await.map_err(|error| error.to_string()) })
    }

    fn close(&mut self, code: u16, reason: String) -> LocalBoxFuture<'_, Result<(), String>> {
        self.account.owe(reason.len());
        let mut call = self.down.close_request();
        call.get().set_code(code);
        call.get().set_reason(&reason);
        let sent = call.send().promise;
        Box::pin(async move { sent.await.map(drop).map_err(|error| error.to_string()) })
    }
}

/// A call's turn among the calls of its capability: the next begins when it is dropped.
type Turn = oneshot::Sender<()>;

/// Runs the calls of one capability one at a time, in the order they arrived (taken).
#[derive(Default)]
struct Turns {
    /// Resolves when the last turn taken ends.
    last: RefCell<Option<oneshot::Receiver<()>>>,
}

impl Turns {
    /// Takes the next turn, now. The future resolves once every turn taken before ended, with
    /// this turn, which ends when dropped.
    fn take(&self) -> impl Future<Output = Turn> + 'static + use<> {
        let (turn, ended) = oneshot::channel();
        let previous = self.last.replace(Some(ended));
        async move {
            if let Some(previous) = previous {
                // Ended, or dropped: either way the turn is over.
                let _ = previous.await;
            }
            turn
        }
    }
}

/// A client of `server` whose streaming methods capnp-rpc dispatches as they arrive, as it
/// does other methods (see the module docs). `C` is the generated client type.
fn eager_client<C, S>(server: S) -> C
where
    C: FromServer<S>,
    S: 'static,
{
    let eager: Eager<C> = capnp_rpc::new_client(server);
    eager.0
}

/// A generated client type `C`, whose server is wrapped in [`EagerDispatch`].
struct Eager<C>(C);

impl<C: FromClientHook> FromClientHook for Eager<C> {
    fn new(hook: Box<dyn ClientHook>) -> Self {
        Eager(C::new(hook))
    }

    fn into_client_hook(self) -> Box<dyn ClientHook> {
        self.0.into_client_hook()
    }

    fn as_client_hook(&self) -> &dyn ClientHook {
        self.0.as_client_hook()
    }
}

impl<C: FromServer<S>, S> FromServer<S> for Eager<C> {
    type Dispatch = EagerDispatch<C::Dispatch>;

    fn from_server(server: Rc<S>) -> Self::Dispatch {
        EagerDispatch(C::from_server(server))
    }
}

/// A generated dispatcher whose calls all count as ordinary ones: capnp-rpc then dispatches
/// each as it arrives instead of holding later calls until a streaming one returned.
#[derive(Clone)]
struct EagerDispatch<D>(D);

impl<D: Deref> Deref for EagerDispatch<D> {
    type Target = D::Target;

    fn deref(&self) -> &D::Target {
        &self.0
    }
}

impl<D: capnp::capability::Server> capnp::capability::Server for EagerDispatch<D> {
    fn dispatch_call(
        self,
        interface_id: u64,
        method_id: u16,
        params: capnp::capability::Params<capnp::any_pointer::Owned>,
        results: capnp::capability::Results<capnp::any_pointer::Owned>,
    ) -> capnp::capability::DispatchCallResult {
        let mut dispatched = self
            .0
            .dispatch_call(interface_id, method_id, params, results);
        dispatched.is_streaming = false;
        dispatched
    }

    fn as_ptr(&self) -> usize {
        self.0.as_ptr()
    }
}
