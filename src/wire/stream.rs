//! The caller's side of `DurableObject.request`: a streamed request body written to the
//! host's `ByteStream`, and the `ResponseContext`, the response body's `ByteStream` and the
//! `downSocket` that answer it. The Rust client drives it on its driver thread; a shard of a
//! host drives it on its own event loop for a stub to an object of another shard.
//!
//! A [`Body`] belongs to one thread (it is not `Send`), so a streamed request body is read on
//! the caller's thread, by the future of [`fetch`] and then by the response's body, and
//! crosses to the thread that issues the call ([`issue`]) in a bounded channel; a response
//! body and a WebSocket's messages cross back the same way. Each channel holds a few chunks or
//! messages: a side that does not read holds the other back, through capnp's flow control,
//! down to the object. Where caller and issuer are one thread, the channels cost a wake-up.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderValue;
use http_body::Frame;
use tokio::sync::mpsc;

use crate::body::Body;
use crate::error::Error;
use crate::message::{Request, Response, StreamRequest, StreamResponse, WebSocketMessage};
use crate::wire::duro_capnp::{byte_stream, durable_object, response_context, web_socket};
use crate::wire::{STREAM_WRITE_BYTES, convert};

/// Chunks of a request body on their way from the caller's thread to the driver.
const UPLOAD_CHUNKS: usize = 4;
/// Events of one call (response chunks of at most [`STREAM_WRITE_BYTES`]), or messages of one
/// WebSocket either way, that wait for their reader; past it, the writer waits.
const QUEUED_MAX: usize = 16;

/// A WebSocket to an object, over the client's connection ([`RemoteStub::web_socket`]).
///
/// Messages go both ways in the order sent. [`ClientWebSocket::send`] waits while the object
/// is behind (capnp's flow control: the host takes a message once the object handled the one
/// before), and the object's messages wait in the host while this side does not
/// [`ClientWebSocket::recv`] (a socket that falls too far behind is closed with 1008).
/// Dropping it without [`ClientWebSocket::close`] tells the object the peer went away
/// (`web_socket_error`). It keeps the connection open while it lives.
///
/// [`RemoteStub::web_socket`]: crate::client::RemoteStub::web_socket
pub struct ClientWebSocket {
    headers: http::HeaderMap,
    outgoing: mpsc::Sender<Outgoing>,
    incoming: mpsc::Receiver<WebSocketEvent>,
    /// Why the driver stopped sending, once it did.
    failure: Arc<Mutex<Option<Error>>>,
    /// Keeps the connection open while the socket lives.
    _connection: Arc<dyn Send + Sync>,
}

/// What a [`ClientWebSocket`] receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebSocketEvent {
    /// A message of the object.
    Message(WebSocketMessage),
    /// The close frame, with its code and reason: the object closed the socket, or answered
    /// this side's close. Nothing follows it.
    Close(u16, String),
}

impl ClientWebSocket {
    /// The headers of the object's `101` response.
    pub fn headers(&self) -> &http::HeaderMap {
        &self.headers
    }

    /// Sends a message; waits while the object is behind. Fails once the socket was closed
    /// by this side, or its connection failed.
    pub async fn send(&self, message: impl Into<WebSocketMessage>) -> Result<(), Error> {
        let message = Outgoing::Message(message.into());
        self.outgoing
            .send(message)
            .await
            .map_err(|_| self.stopped())
    }

    /// Sends a close frame with `code` and `reason`: nothing may be sent after it. The object
    /// hears of it (`web_socket_close`), and the host answers with its close, which
    /// [`ClientWebSocket::recv`] returns.
    pub async fn close(&self, code: u16, reason: &str) -> Result<(), Error> {
        let close = Outgoing::Close(code, reason.to_owned());
        self.outgoing.send(close).await.map_err(|_| self.stopped())
    }

    /// The next message or the close of the object; `None` after the close, or once the
    /// connection is lost.
    pub async fn recv(&mut self) -> Option<WebSocketEvent> {
        self.incoming.recv().await
    }

    fn stopped(&self) -> Error {
        let failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        failure
            .clone()
            .unwrap_or_else(|| Error::Disconnected("the WebSocket was closed".into()))
    }
}

impl std::fmt::Debug for ClientWebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientWebSocket").finish_non_exhaustive()
    }
}

/// A frame on its way to the object.
enum Outgoing {
    Message(WebSocketMessage),
    Close(u16, String),
}

/// What the driver tells the caller of a `request` call, in order.
pub(crate) enum Event {
    /// The response's head, with its whole body unless one follows (`true`).
    Response(Response, bool),
    /// The object accepted the WebSocket.
    WebSocket(SocketEnds),
    /// The next chunk of the response body.
    Data(Bytes),
    /// The response body is complete.
    End,
    /// The call returned: the answer was handed over.
    Returned,
    Failed(Error),
}

/// The caller's ends of a WebSocket's channels, as the driver hands them over.
pub(crate) struct SocketEnds {
    headers: http::HeaderMap,
    outgoing: mpsc::Sender<Outgoing>,
    incoming: mpsc::Receiver<WebSocketEvent>,
    failure: Arc<Mutex<Option<Error>>>,
}

/// A piece of a request body on its way to the driver.
pub(crate) enum Upload {
    Chunk(Bytes),
    /// The body is complete; the channel closing without it means it broke off.
    End,
}

/// A `request` call, as the driver issues it.
pub(crate) struct RequestCommand {
    /// The head, with the whole body unless `upload` brings it.
    request: Request,
    upload: Option<mpsc::Receiver<Upload>>,
    events: mpsc::Sender<Event>,
}

impl RequestCommand {
    /// Tells the caller the call could not be issued.
    pub(crate) fn refuse(self, error: Error) {
        // A fresh channel has room.
        let _ = self.events.try_send(Event::Failed(error));
    }
}

/// A `request` call sent: what the caller keeps of it. Dropping it cancels the call.
pub(crate) struct Call {
    events: mpsc::Receiver<Event>,
    /// Keeps the connection open while the call lives.
    connection: Arc<dyn Send + Sync>,
}

/// A `request` call of `request`, whose body follows from `upload` if given: the command for
/// the driver, and what the caller keeps. `connection` is kept open while the call lives.
pub(crate) fn call(
    request: Request,
    upload: Option<mpsc::Receiver<Upload>>,
    connection: Arc<dyn Send + Sync>,
) -> (RequestCommand, Call) {
    let (events, receiver) = mpsc::channel(QUEUED_MAX);
    let command = RequestCommand {
        request,
        upload,
        events,
    };
    let call = Call {
        events: receiver,
        connection,
    };
    (command, call)
}

/// Sends a `request` call now (see [`call`]), or says why it cannot.
pub(crate) type SendCall<'a> =
    dyn FnOnce(Request, Option<mpsc::Receiver<Upload>>) -> Result<Call, Error> + 'a;

/// [`RemoteStub::fetch_stream`](crate::client::RemoteStub::fetch_stream): a whole body of at most
/// `whole_bytes_max` (as `convert::request_bytes` counts the request) goes with the head, any
/// other follows it.
pub(crate) fn fetch(
    request: StreamRequest,
    whole_bytes_max: usize,
    send: Box<SendCall<'_>>,
) -> impl Future<Output = Result<StreamResponse, Error>> + use<> {
    let (parts, body) = request.into_parts();
    let head = Request::from_parts(parts, body.as_full().cloned().unwrap_or_default());
    let whole = body.as_full().is_some() && convert::request_bytes(&head) <= whole_bytes_max;
    let (head, upload) = match whole {
        true => (head, None),
        false => (head.map(|_| Bytes::new()), Some(body)),
    };
    let (upload, call) = match upload {
        Some(body) => {
            let (to_driver, from_caller) = mpsc::channel(UPLOAD_CHUNKS);
            let sending: Sending = Box::pin(upload_body(body, to_driver));
            (Some(sending), send(head, Some(from_caller)))
        }
        None => (None, send(head, None)),
    };
    async move {
        let mut call = call?;
        let mut upload = upload;
        let next = std::future::poll_fn(|cx| poll_event(&mut call.events, &mut upload, cx));
        match next.await {
            Some(Event::Response(response, false)) => Ok(response.map(Body::from)),
            Some(Event::Response(response, true)) => {
                let download = Download {
                    events: call.events,
                    upload,
                    ended: false,
                    _connection: call.connection,
                };
                Ok(response.map(|_| Body::from_stream(download)))
            }
            Some(Event::WebSocket(_)) => Err(Error::InvalidArgument(
                "the object accepted a WebSocket: open one with RemoteStub::web_socket".into(),
            )),
            Some(Event::Failed(error)) => Err(error),
            _ => Err(no_answer()),
        }
    }
}

/// [`RemoteStub::web_socket`](crate::client::RemoteStub::web_socket).
pub(crate) fn web_socket(
    mut request: Request,
    send: Box<SendCall<'_>>,
) -> impl Future<Output = Result<ClientWebSocket, Error>> + Send + use<> {
    let upgrade = http::header::UPGRADE;
    if !request.headers().contains_key(&upgrade) {
        let websocket = HeaderValue::from_static("websocket");
        request.headers_mut().insert(upgrade, websocket);
    }
    let call = send(request, None);
    async move {
        let mut call = call?;
        let mut ends = None;
        // Until the call returned: the host attaches the socket before it returns.
        loop {
            match call.events.recv().await {
                Some(Event::WebSocket(started)) => ends = Some(started),
                Some(Event::Returned) => break,
                Some(Event::Response(response, _)) => {
                    return Err(Error::Remote(format!(
                        "the object did not accept the WebSocket: it answered {}",
                        response.status()
                    )));
                }
                Some(Event::Failed(error)) => return Err(error),
                Some(Event::Data(_) | Event::End) => {}
                None => return Err(no_answer()),
            }
        }
        let ends = ends.ok_or_else(no_answer)?;
        Ok(ClientWebSocket {
            headers: ends.headers,
            outgoing: ends.outgoing,
            incoming: ends.incoming,
            failure: ends.failure,
            _connection: call.connection,
        })
    }
}

fn no_answer() -> Error {
    Error::Disconnected("the call ended without an answer".into())
}

/// What remains to send of a request body, read on the caller's thread.
type Sending = Pin<Box<dyn Future<Output = ()>>>;

/// Reads `body` and hands its chunks to the driver; stops without [`Upload::End`] when the
/// body broke off (the driver then releases the stream without `end`), and when the call is
/// over.
async fn upload_body(mut body: Body, to_driver: mpsc::Sender<Upload>) {
    while let Some(chunk) = body.chunk().await {
        let Ok(chunk) = chunk else { return };
        if to_driver.send(Upload::Chunk(chunk)).await.is_err() {
            return;
        }
    }
    let _ = to_driver.send(Upload::End).await;
}

/// The next event of a call, sending the request body meanwhile (`upload` is cleared once
/// that is done).
fn poll_event(
    events: &mut mpsc::Receiver<Event>,
    upload: &mut Option<Sending>,
    cx: &mut Context<'_>,
) -> Poll<Option<Event>> {
    if let Some(sending) = upload
        && sending.as_mut().poll(cx).is_ready()
    {
        *upload = None;
    }
    events.poll_recv(cx)
}

/// A response body arriving from the driver. Reading it also sends what remains of the
/// request body (an object may answer before it read all of it); once the response is
/// complete or dropped, the rest of the request body is not sent.
struct Download {
    events: mpsc::Receiver<Event>,
    upload: Option<Sending>,
    ended: bool,
    /// Keeps the connection open while the body is read.
    _connection: Arc<dyn Send + Sync>,
}

impl http_body::Body for Download {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        while !this.ended {
            let event = ready!(poll_event(&mut this.events, &mut this.upload, cx));
            let frame = match event {
                Some(Event::Data(bytes)) => Ok(Frame::data(bytes)),
                Some(Event::Failed(error)) => Err(error),
                None => Err(Error::Disconnected("the response body broke off".into())),
                Some(Event::End) => {
                    this.ended = true;
                    this.upload = None;
                    break;
                }
                Some(_) => continue,
            };
            this.ended = frame.is_err();
            return Poll::Ready(Some(frame));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// On the driver: issues the `request` call of `command` on `stub`, now; `held` (the call's
/// place among the client's calls in flight) is dropped when the call returns.
pub(crate) fn issue<H: 'static>(stub: &durable_object::Client, command: RequestCommand, held: H) {
    let RequestCommand {
        request,
        upload,
        events,
    } = command;
    let mut call = stub.request_request();
    convert::request_to_capnp(&request, call.get().init_request());
    call.get().set_body_follows(upload.is_some());
    call.get()
        .set_context(capnp_rpc::new_client(ResponseContext {
            events: events.clone(),
            answered: Cell::new(false),
        }));
    let sent = call.send();
    if let Some(upload) = upload {
        // Pipelined: the first writes travel with the call.
        let stream = sent.pipeline.get_request_body();
        tokio::task::spawn_local(write_body(upload, stream));
    }
    tokio::task::spawn_local(async move {
        let returned = tokio::select! {
            returned = sent.promise => returned,
            // The caller let go of the call: dropping the promise cancels it on the host.
            () = events.closed() => return,
        };
        drop(held);
        let event = match returned {
            Ok(_) => Event::Returned,
            Err(error) => Event::Failed(error.into()),
        };
        let _ = events.send(event).await;
    });
}

/// Writes the request body the caller hands over to `stream`, each write waiting for capnp's
/// flow control, then `end`; a body that broke off is released without `end`.
async fn write_body(mut upload: mpsc::Receiver<Upload>, stream: byte_stream::Client) {
    while let Some(next) = upload.recv().await {
        let Upload::Chunk(chunk) = next else {
            let _ = stream.end_request().send().promise.await;
            return;
        };
        if !write_chunk(&stream, &chunk).await {
            // The host refused the body (the object stopped reading it): stop reading it.
            return;
        }
    }
}

/// Writes `chunk` to `stream` in writes of at most [`STREAM_WRITE_BYTES`], each waiting for
/// capnp's flow control; whether every write was taken (a refused one ends the body).
pub(crate) async fn write_chunk(stream: &byte_stream::Client, chunk: &[u8]) -> bool {
    for piece in chunk.chunks(STREAM_WRITE_BYTES) {
        let mut write = stream.write_request();
        write.get().set_bytes(piece);
        if write.send().await.is_err() {
            return false;
        }
    }
    true
}

fn reader_gone() -> capnp::Error {
    capnp::Error::failed("the client stopped reading".into())
}

/// The caller's `ResponseContext` of one call: hands the answer to the caller.
struct ResponseContext {
    events: mpsc::Sender<Event>,
    /// Set by the first answer: there is one.
    answered: Cell<bool>,
}

impl ResponseContext {
    fn answer_once(&self) -> capnp::Result<()> {
        if self.answered.replace(true) {
            return Err(capnp::Error::failed("the call was answered already".into()));
        }
        Ok(())
    }
}

impl response_context::Server for ResponseContext {
    fn start_response(
        self: Rc<Self>,
        params: response_context::StartResponseParams,
        mut results: response_context::StartResponseResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let head = (|| -> capnp::Result<_> {
            self.answer_once()?;
            let params = params.get()?;
            let response = convert::response_from_capnp(params.get_response()?)?;
            Ok((response, params.get_body_follows()))
        })();
        let body = match &head {
            Ok((_, true)) => {
                let events = self.events.clone();
                results
                    .get()
                    .set_body(capnp_rpc::new_client(ResponseBody { events }));
                // The host pipelines its first writes: they reach the body at once.
                results.set_pipeline()
            }
            _ => Ok(()),
        };
        let events = self.events.clone();
        async move {
            body?;
            let (response, follows) = head?;
            let event = Event::Response(response, follows);
            events.send(event).await.map_err(|_| reader_gone())
        }
    }

    fn start_web_socket(
        self: Rc<Self>,
        params: response_context::StartWebSocketParams,
        mut results: response_context::StartWebSocketResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let started = (|| -> capnp::Result<_> {
            self.answer_once()?;
            let params = params.get()?;
            let mut headers = http::HeaderMap::new();
            convert::headers_from_capnp(params.get_headers()?, &mut headers)?;
            Ok((headers, params.get_up_socket()?))
        })();
        let ends = started.map(|(headers, up)| {
            let (incoming, from_host) = mpsc::channel(QUEUED_MAX);
            results
                .get()
                .set_down_socket(capnp_rpc::new_client(DownSocket { incoming }));
            let (outgoing, to_host) = mpsc::channel(QUEUED_MAX);
            let failure = Arc::default();
            tokio::task::spawn_local(send_messages(up, to_host, Arc::clone(&failure)));
            SocketEnds {
                headers,
                outgoing,
                incoming: from_host,
                failure,
            }
        });
        let events = self.events.clone();
        async move {
            let event = Event::WebSocket(ends?);
            events.send(event).await.map_err(|_| reader_gone())
        }
    }
}

/// The response body's `ByteStream`: each write returns once the caller's channel took it.
/// capnp-rpc runs its writes and `end` one after another, in order.
struct ResponseBody {
    events: mpsc::Sender<Event>,
}

impl byte_stream::Server for ResponseBody {
    fn write(
        self: Rc<Self>,
        params: byte_stream::WriteParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let bytes = params
            .get()
            .and_then(|params| Ok(Bytes::copy_from_slice(params.get_bytes()?)));
        async move {
            let event = Event::Data(bytes?);
            self.events.send(event).await.map_err(|_| reader_gone())
        }
    }

    async fn end(
        self: Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> capnp::Result<()> {
        self.events
            .send(Event::End)
            .await
            .map_err(|_| reader_gone())
    }
}

/// The caller's `downSocket`: the object's messages and close, handed to the
/// [`ClientWebSocket`] in order (capnp-rpc runs its calls one after another).
struct DownSocket {
    incoming: mpsc::Sender<WebSocketEvent>,
}

impl DownSocket {
    async fn hand_over(self: Rc<Self>, event: capnp::Result<WebSocketEvent>) -> capnp::Result<()> {
        self.incoming.send(event?).await.map_err(|_| reader_gone())
    }
}

impl web_socket::Server for DownSocket {
    fn send_text(
        self: Rc<Self>,
        params: web_socket::SendTextParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let text = params
            .get()
            .and_then(|params| Ok(params.get_text()?.to_string()?));
        self.hand_over(text.map(|text| WebSocketEvent::Message(WebSocketMessage::Text(text))))
    }

    fn send_data(
        self: Rc<Self>,
        params: web_socket::SendDataParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let data = params
            .get()
            .and_then(|params| Ok(Bytes::copy_from_slice(params.get_data()?)));
        self.hand_over(data.map(|data| WebSocketEvent::Message(WebSocketMessage::Binary(data))))
    }

    fn close(
        self: Rc<Self>,
        params: web_socket::CloseParams,
        _: web_socket::CloseResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let close = params.get().and_then(|params| {
            let reason = params.get_reason()?.to_string()?;
            Ok(WebSocketEvent::Close(params.get_code(), reason))
        });
        self.hand_over(close)
    }
}

/// Sends the caller's messages and close to the host's `upSocket`, each waiting for capnp's
/// flow control. Ends after the close, at the first failure (kept in `failure` for the
/// caller), or when the caller dropped its socket: `up` is then released without a close.
async fn send_messages(
    up: web_socket::Client,
    mut outgoing: mpsc::Receiver<Outgoing>,
    failure: Arc<Mutex<Option<Error>>>,
) {
    while let Some(next) = outgoing.recv().await {
        let (sent, last) = match next {
            Outgoing::Message(WebSocketMessage::Text(text)) => {
                let mut call = up.send_text_request();
                call.get().set_text(&text);
                (call.send().await, false)
            }
            Outgoing::Message(WebSocketMessage::Binary(data)) => {
                let mut call = up.send_data_request();
                call.get().set_data(&data);
                (call.send().await, false)
            }
            Outgoing::Close(code, reason) => {
                let mut call = up.close_request();
                call.get().set_code(code);
                call.get().set_reason(&reason);
                (call.send().promise.await.map(drop), true)
            }
        };
        if let Err(error) = sent {
            *failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.into());
            return;
        }
        if last {
            return;
        }
    }
}
