//! The HTTP gateway: HTTP/1.1 in front of the host, for clients that do not speak Cap'n Proto.
//!
//! A request to `/{namespace}/{name}/{rest}` goes to `host.namespace(namespace)
//! .get_by_name(name).fetch(request)`, with the path rewritten to `/{rest}` and the query kept:
//! `/counter/a/x/y?q=1` reaches the object `a` of `counter` as `/x/y?q=1`, and both
//! `/counter/a` and `/counter/a/` reach it as `/`. The namespace and name segments are
//! percent-decoded (`/counter/a%20b` is the object `a b`, `/counter/a%2Fb` the object `a/b`);
//! the rest is passed as sent. Method, headers and body go through unchanged, and the object's
//! response (status, headers, body) comes back as it is.
//!
//! When the server has a token ([`crate::Builder::token`]), every request must carry it as
//! `Authorization: Bearer <token>`, compared in constant time. A request without it (no header,
//! another scheme, an empty token) or with a wrong one gets 401 with `WWW-Authenticate: Bearer`
//! (and `error="invalid_token"` for a wrong token, after [`WRONG_TOKEN_DELAY`]), before its path
//! is looked at: it reaches no object. The `Authorization` header of an accepted request is
//! removed, so the token never reaches class code. Without a token every request is let in and
//! the header, if any, goes through like any other.
//!
//! What the gateway answers when the request does not reach the object, or the call fails:
//!
//! | situation | status |
//! |---|---|
//! | with a token set: no `Authorization: Bearer`, or a wrong token | 401, `WWW-Authenticate: Bearer` |
//! | path without a namespace and a name, an empty one, or one not UTF-8 once decoded | 400 |
//! | no namespace of that name | 404 |
//! | request body over [`GatewayOptions::body_bytes_max`], read whole | 413, and the connection closes |
//! | the request body broke off (client error) | 400, and the connection closes |
//! | bad argument ([`crate::error::Error::InvalidArgument`], e.g. a name over `name_bytes_max`) | 400 |
//! | the object's code returned an error ([`crate::error::Error::Remote`]) | 500, `x-request-id` |
//! | the object was reset, or the host is shutting down ([`crate::error::Error::Disconnected`]) | 502 |
//! | too many requests queued for the object ([`crate::error::Error::Overloaded`]) | 503, `Retry-After: 1` |
//! | a WebSocket upgrade past [`WEB_SOCKETS_MAX`] open sockets | 503, `Retry-After: 1` |
//!
//! Each of these has a plain-text body naming the rule or carrying the host's message. The
//! message of an object's error is the object's own text, which may tell more than its clients
//! should know: the 500 carries `internal error (request id ID)` and the header `x-request-id:
//! ID` instead, and the server logs the message with that ID (at warn). With
//! [`GatewayOptions::expose_errors`] the body carries the message. Every answer of a failed
//! call (400 for a bad argument, 500, 502, 503 of the object) carries its request ID in
//! `x-request-id`; the request's tracing span (at debug) carries it with the namespace and the
//! object's ID.
//!
//! A body over the limit is refused before it is read whole: at once when its `Content-Length`
//! is over, and as soon as a chunked body passes the limit. The rest of such a body is never
//! read, so the connection cannot carry another request and is closed after the 413.
//!
//! Bodies stream both ways: a request's body reaches the object as it arrives (an object that
//! reads it whole, with `fetch`, reads at most [`GatewayOptions::body_bytes_max`]; one that
//! streams it with `fetch_stream` reads any size), and a response's body goes out as the
//! object writes it (chunked, when it has no length: server-sent events pass as they are
//! written). Neither is ever held whole by the gateway.
//!
//! A WebSocket upgrade (`GET` with `Upgrade: websocket`, RFC 6455) goes to the object like
//! any request; when the object accepts it (`State::accept_web_socket`) and answers `101`, the
//! gateway completes the handshake and carries the socket, which the host holds from then on
//! (see `web_socket`). An upgrade the object does not accept gets the object's answer.
//!
//! Connections are HTTP/1.1 with keep-alive, one local task each, on the host's event loop.
//! A request is handled inside its connection's task: the gateway spawns nothing per request
//! (the host runs each call to an object as a task of its own).

mod web_socket;

use std::borrow::Cow;
use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::percent_decode_str;
use tokio::net::{TcpListener, TcpStream};

use crate::body::Body;
use crate::host::Host;
use crate::message::{StreamRequest, StreamResponse};
use crate::metrics::{Bound, Transport};
use crate::tls::ServerTls;
use crate::trace::RequestId;
use tracing::Instrument;

/// Most gateway connections open at once. Each costs a task, hyper's buffers (up to
/// `max_buf_size`) and an FD; past the bound new connections are closed at once, so a flood of
/// connections cannot exhaust memory or FDs (and the Cap'n Proto listener keeps its own FDs).
pub const CONNECTIONS_MAX: usize = 4096;

/// Most WebSockets open through the gateway at once. An upgraded connection leaves the
/// [`CONNECTIONS_MAX`] count of HTTP connections; each socket costs its buffers (a few KiB
/// while idle) and the host's record of it, so their number is bounded on its own. Past it,
/// upgrades get 503.
pub const WEB_SOCKETS_MAX: usize = 65_536;

/// Longest wait for a request's head, counted from when the connection is ready for the next
/// request, so also the longest a keep-alive connection may sit idle. Without it, clients that
/// open connections and send nothing (or send slowly) would hold the [`CONNECTIONS_MAX`] slots
/// forever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client refused with 503 is asked to wait before it tries again, in seconds: a
/// queue of the default depth drains in well under that.
const RETRY_AFTER_SECONDS: &str = "1";

/// Wait after a failed `accept` (out of FDs and the like), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The shape of a gateway path, named when a path is refused.
const PATH_SHAPE: &str = "expected /{namespace}/{name}/{path}";

pub use crate::auth::WRONG_TOKEN_DELAY;

/// The header that carries the ID of a request whose error is logged rather than sent.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Options of the HTTP gateway.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Largest request body an object reads whole (default 1 MiB); larger requests get 413.
    /// Bodies that an object streams (`fetch_stream`) are not bounded.
    pub body_bytes_max: usize,
    /// Whether the message of an object's error goes back in the 500's body (default false: the
    /// body carries a request ID, and the message goes to the log with it). Error messages may
    /// tell internals (keys, paths, other objects' names) to whoever sent the request.
    pub expose_errors: bool,
}

impl Default for GatewayOptions {
    fn default() -> GatewayOptions {
        GatewayOptions {
            body_bytes_max: 1 << 20,
            expose_errors: false,
        }
    }
}

/// The response type of the gateway: the object's body is handed to hyper as it is, whole or
/// streamed.
type HttpResponse = hyper::Response<OutBody>;

/// Serves HTTP on `listener` until the future is dropped, or HTTPS when `tls` is given. Runs on
/// the host's event loop (inside its `LocalSet`): each connection is a local task. With a
/// `token`, every request must carry it as `Authorization: Bearer <token>` (see the module
/// docs).
pub async fn serve(
    host: Host,
    listener: TcpListener,
    options: GatewayOptions,
    token: Option<Arc<str>>,
    tls: Option<ServerTls>,
) {
    let gateway = install(&host, options, token);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => gateway.spawn_connection(stream, tls.as_ref()),
            Err(error) => {
                tracing::warn!(%error, "gateway accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Sets the gateway up on this event loop's host (one shard of a server): it then serves the
/// connections handed to it ([`accept`]), and the requests other shards hand over for their
/// objects of this one.
pub(crate) fn install(
    host: &Host,
    options: GatewayOptions,
    token: Option<Arc<str>>,
) -> Rc<Gateway> {
    let gateway = Rc::new(Gateway::new(host.clone(), options, token));
    host.set_extension(gateway.clone());
    gateway
}

/// Serves a connection accepted for the gateway, on this shard; closed at once when the
/// gateway was not installed here.
pub(crate) fn accept(host: &Host, stream: TcpStream, tls: Option<&ServerTls>) {
    if let Some(gateway) = host.extension::<Gateway>() {
        gateway.spawn_connection(stream, tls);
    }
}

/// What every connection of the gateway (on one shard) shares.
pub(crate) struct Gateway {
    host: Host,
    options: GatewayOptions,
    /// The token every request must carry, when the server has one.
    token: Option<Arc<str>>,
    /// hyper's connection settings, built once.
    http: http1::Builder,
    /// WebSockets open through the gateway (see [`WEB_SOCKETS_MAX`]).
    web_sockets: Rc<Cell<usize>>,
    /// Connections open (see [`CONNECTIONS_MAX`]).
    open: Rc<Cell<usize>>,
}

/// A place among the [`CONNECTIONS_MAX`] open connections, given back when dropped (also when
/// the connection's task is dropped at shutdown).
struct ConnectionSlot {
    open: Rc<Cell<usize>>,
}

impl ConnectionSlot {
    fn take(open: &Rc<Cell<usize>>) -> Option<ConnectionSlot> {
        ConnectionSlot::take_within(open, CONNECTIONS_MAX)
    }

    /// A place among `max` counted by `open`.
    fn take_within(open: &Rc<Cell<usize>>, max: usize) -> Option<ConnectionSlot> {
        if open.get() >= max {
            return None;
        }
        open.set(open.get() + 1);
        Some(ConnectionSlot { open: open.clone() })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
    }
}

impl Gateway {
    fn new(host: Host, options: GatewayOptions, token: Option<Arc<str>>) -> Gateway {
        let mut http = http1::Builder::new();
        http.keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        Gateway {
            host,
            options,
            token,
            http,
            web_sockets: Rc::default(),
            open: Rc::default(),
        }
    }

    fn spawn_connection(self: &Rc<Self>, stream: TcpStream, tls: Option<&ServerTls>) {
        let Some(slot) = ConnectionSlot::take(&self.open) else {
            tracing::warn!(
                limit = CONNECTIONS_MAX,
                "gateway connection refused: too many connections"
            );
            return;
        };
        // Small responses would otherwise wait on Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let gateway = self.clone();
        let tls = tls.cloned();
        tokio::task::spawn_local(async move {
            // The handshake holds the slot, and is bounded by its own timeout.
            match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => gateway.serve_connection(stream).await,
                    Err(error) => tracing::debug!(%error, "gateway TLS handshake failed"),
                },
                None => gateway.serve_connection(stream).await,
            }
            drop(slot);
        });
    }

    /// Serves the requests of one connection, plain or TLS, until it ends.
    async fn serve_connection<S>(self: Rc<Self>, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let handler = self.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(request).await) }
        });
        let metrics = self.host.metrics().connections(Transport::http);
        let _open = metrics.opened();
        let connection = self
            .http
            .serve_connection(TokioIo::new(metrics.count(stream)), service)
            .with_upgrades();
        if let Err(error) = connection.await {
            tracing::debug!(%error, "gateway connection ended");
        }
    }

    /// Answers one request: the object's response, or the refusal's.
    /// The answer to a failed call carries the call's request ID (`x-request-id`), which the
    /// server's log of the call carries too.
    async fn handle(&self, request: hyper::Request<Incoming>) -> HttpResponse {
        let request_id = RequestId::next();
        match self.forward(request, request_id).await {
            Ok(response) => response.map(OutBody),
            Err(error) => {
                let mut response = error.response();
                if let Error::Call(_) | Error::Hidden { .. } = error {
                    // Hex digits only: always a valid header value.
                    if let Ok(id) = HeaderValue::from_str(&request_id.to_string()) {
                        response.headers_mut().insert(REQUEST_ID, id);
                    }
                }
                response
            }
        }
    }

    /// Lets the request in when no token is set, or when it carries the token; then removes
    /// its `Authorization` header, which has done its work and must not reach the object.
    async fn authorize(&self, headers: &mut HeaderMap) -> Result<(), Error> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        crate::auth::check_bearer(headers, token)
            .await
            .map_err(|refused| match refused {
                crate::auth::Refused::NoBearerToken => Error::NoBearerToken,
                crate::auth::Refused::WrongToken => Error::WrongToken,
            })?;
        headers.remove(header::AUTHORIZATION);
        Ok(())
    }

    /// Routes `request` to its object. The checks that cost nothing come first: a request
    /// refused for its token or its path neither activates an object nor has its body read.
    /// A request for an object of another shard is handed over to that shard's gateway.
    async fn forward(
        &self,
        mut request: hyper::Request<Incoming>,
        request_id: RequestId,
    ) -> Result<StreamResponse, Error> {
        let accept = web_socket::accept_key(request.method(), request.headers());
        // Taken before the request is given away: hyper hands the connection over through it.
        let upgrade = accept.as_ref().map(|_| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        self.authorize(&mut parts.headers).await?;
        // Taken out of `parts`, so the route can borrow it while `parts` becomes the request.
        let uri = std::mem::take(&mut parts.uri);
        let route = Route::parse(&uri)?;
        let namespace = self
            .host
            .namespace(&route.namespace)
            .ok_or_else(|| Error::UnknownNamespace(route.namespace.to_string()))?;
        let id = namespace
            .id_from_name(&route.name)
            .map_err(|error| self.call_failed(namespace.name(), &route.name, request_id, error))?;
        parts.uri = route.object_uri()?;
        let admitted = Admitted {
            parts,
            body,
            upgrade,
            accept,
            namespace: namespace.name().to_owned(),
            id,
            request_id,
        };
        match self.host.remote_shard(&admitted.id) {
            Some(shard) => self.hand_over(shard, admitted).await,
            None => self.serve_here(admitted).await,
        }
    }

    /// Serves a request admitted (on this shard or another) for an object of this shard.
    /// In the call's span (see [`crate::trace`]).
    async fn serve_here(&self, admitted: Admitted) -> Result<StreamResponse, Error> {
        let span = tracing::debug_span!(
            "request",
            namespace = admitted.namespace,
            id = %admitted.id,
            request_id = %admitted.request_id,
        );
        self.serve_in_span(admitted).instrument(span).await
    }

    async fn serve_in_span(&self, admitted: Admitted) -> Result<StreamResponse, Error> {
        let Admitted {
            parts,
            body,
            upgrade,
            accept,
            namespace,
            id,
            request_id,
        } = admitted;
        let name = id.name().unwrap_or_default().to_owned();
        let failed = |error| self.call_failed(&namespace, &name, request_id, error);
        let stub = self
            .host
            .namespace(&namespace)
            .ok_or_else(|| Error::UnknownNamespace(namespace.clone()))?
            .stub_of(id)
            .map_err(failed)?;
        let broken = Rc::new(Cell::new(false));
        let body = Body::from_stream(Watched {
            body,
            broken: broken.clone(),
        })
        .with_whole_bytes_max(self.options.body_bytes_max);
        let request = StreamRequest::from_parts(parts, body);
        let (Some(accept), Some(upgrade)) = (accept, upgrade) else {
            let response = stub.fetch_stream(request).await;
            return response.map_err(|error| self.body_failed(&broken, failed, error));
        };
        if stub.remote().is_some() {
            // Another node of the cluster owns the object: the socket would have to be passed
            // on through its `request`, which this gateway does not do yet.
            return Err(failed(crate::error::Error::Disconnected(
                "the object lives on another node of the cluster: a WebSocket reaches it through \
                 the gateway of the node that owns it, or over Cap'n Proto"
                    .into(),
            )));
        }
        let slot =
            ConnectionSlot::take_within(&self.web_sockets, WEB_SOCKETS_MAX).ok_or_else(|| {
                self.host.metrics().refused(Bound::web_sockets);
                Error::TooManyWebSockets
            })?;
        let (mut response, socket) = stub.fetch_upgrade(request).await.map_err(failed)?;
        if let Some(socket) = socket {
            let headers = response.headers_mut();
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
            tokio::task::spawn_local(web_socket::run(upgrade, socket, slot));
        }
        Ok(response)
    }

    /// Hands a request for an object of `shard` to the gateway there; its response comes
    /// back, the body a chunk at a time (a few chunks in flight: a client that does not read
    /// holds the object's writer back). A WebSocket it accepted is served there too.
    async fn hand_over(&self, shard: usize, admitted: Admitted) -> Result<StreamResponse, Error> {
        let peers = self.host.peers().ok_or_else(shard_gone)?;
        let (answer, answered) = tokio::sync::oneshot::channel::<HandedBack>();
        peers.run_on(
            shard,
            Box::new(move |host: &Host| {
                let Some(gateway) = host.extension::<Gateway>() else {
                    let _ = answer.send(Err(shard_gone()));
                    return;
                };
                tokio::task::spawn_local(async move {
                    let response = match gateway.serve_here(admitted).await {
                        Ok(response) => response,
                        Err(error) => return drop(answer.send(Err(error))),
                    };
                    let (parts, body) = response.into_parts();
                    if let Some(whole) = body.as_full() {
                        let _ = answer.send(Ok((parts, Err(whole.clone()))));
                        return;
                    }
                    let (chunks, receiver) = tokio::sync::mpsc::channel(HANDED_CHUNKS);
                    if answer.send(Ok((parts, Ok(receiver)))).is_ok() {
                        send_chunks(body, chunks).await;
                    }
                });
            }),
        );
        let (parts, body) = answered.await.map_err(|_| shard_gone())??;
        let body = match body {
            Err(whole) => Body::full(whole),
            Ok(chunks) => Body::from_stream(Chunks(chunks)),
        };
        Ok(StreamResponse::from_parts(parts, body))
    }

    /// [`Gateway::call_failed`], but a call that failed because the client's body broke off
    /// is the client's error.
    fn body_failed(
        &self,
        broken: &Cell<bool>,
        call_failed: impl FnOnce(crate::error::Error) -> Error,
        error: crate::error::Error,
    ) -> Error {
        if broken.get() {
            return Error::BodyRead(error.to_string());
        }
        if let crate::error::Error::TooLarge(_) = error {
            return Error::BodyTooLarge {
                max: self.options.body_bytes_max,
            };
        }
        call_failed(error)
    }

    /// The error to answer a failed call with. A failure of the object's code (its constructor
    /// too) is the object's text: unless errors are exposed, it goes to the log with a request
    /// ID and the client gets the ID. The other kinds carry the host's text; they go back as
    /// they are.
    fn call_failed(
        &self,
        namespace: &str,
        name: &str,
        request_id: RequestId,
        error: crate::error::Error,
    ) -> Error {
        let error = Error::Call(error);
        if self.options.expose_errors || error.status() != StatusCode::INTERNAL_SERVER_ERROR {
            tracing::debug!(%request_id, namespace, name, %error, "gateway: the call failed");
            return error;
        }
        tracing::warn!(
            %request_id,
            namespace = ?namespace,
            name = ?name,
            %error,
            "gateway: the object's call failed"
        );
        Error::Hidden { request_id }
    }
}

/// A request let in by the gateway of the shard it came to: what another shard's gateway
/// needs to serve it (all of it `Send`).
struct Admitted {
    parts: http::request::Parts,
    body: Incoming,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    accept: Option<HeaderValue>,
    /// The object's namespace, and its ID (minted from its name here, once).
    namespace: String,
    id: crate::id::ObjectId,
    request_id: RequestId,
}

/// Chunks of a response body handed back from another shard, at most this many in flight.
const HANDED_CHUNKS: usize = 4;

/// A response handed back by another shard: its head, and its whole body (`Err`) or the
/// channel its chunks come through (a chunk's error as text).
type HandedBack = Result<
    (
        http::response::Parts,
        Result<tokio::sync::mpsc::Receiver<Result<Bytes, String>>, Bytes>,
    ),
    Error,
>;

/// The object's shard did not answer: it is shutting down.
fn shard_gone() -> Error {
    Error::Call(crate::error::Error::Disconnected(
        "the object's shard is shutting down".into(),
    ))
}

/// Sends `body` a chunk at a time, then ends; an error ends it as a broken body.
async fn send_chunks(mut body: Body, chunks: tokio::sync::mpsc::Sender<Result<Bytes, String>>) {
    while let Some(chunk) = body.chunk().await {
        let chunk = chunk.map_err(|error| error.to_string());
        let failed = chunk.is_err();
        if chunks.send(chunk).await.is_err() || failed {
            return;
        }
    }
}

/// A response body arriving from another shard.
struct Chunks(tokio::sync::mpsc::Receiver<Result<Bytes, String>>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.get_mut().0.poll_recv(cx).map(|chunk| {
            chunk.map(|chunk| {
                chunk
                    .map(http_body::Frame::data)
                    .map_err(std::io::Error::other)
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A request body that notes when it broke off (the client's error, not the object's).
    struct Watched {
        #[pin]
        body: Incoming,
        broken: Rc<Cell<bool>>,
    }
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(_))) = &polled {
            this.broken.set(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The body of a gateway response, as hyper takes it: the object's [`Body`], with its error
/// made one that hyper can carry (which only logs it and cuts the response off).
pub(crate) struct OutBody(Body);

impl hyper::body::Body for OutBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        let polled = std::pin::Pin::new(&mut self.0).poll_frame(cx);
        polled
            .map(|frame| frame.map(|frame| frame.map_err(|e| std::io::Error::other(e.to_string()))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}

/// The parts of a gateway path: `/{namespace}/{name}{rest}?{query}`.
struct Route<'a> {
    namespace: Cow<'a, str>,
    name: Cow<'a, str>,
    /// The path after the name, from its `/` on; empty when there is none.
    rest: &'a str,
    query: Option<&'a str>,
}

impl<'a> Route<'a> {
    fn parse(uri: &'a Uri) -> Result<Route<'a>, Error> {
        let path = uri
            .path()
            .strip_prefix('/')
            .ok_or(Error::BadPath(PATH_SHAPE))?;
        let (namespace, after) = path.split_once('/').ok_or(Error::BadPath(PATH_SHAPE))?;
        let (name, rest) = after.split_at(after.find('/').unwrap_or(after.len()));
        if namespace.is_empty() || name.is_empty() {
            return Err(Error::BadPath(PATH_SHAPE));
        }
        Ok(Route {
            namespace: decode(namespace)?,
            name: decode(name)?,
            rest,
            query: uri.query(),
        })
    }

    /// The URI the object sees: `/{rest}?{query}`.
    fn object_uri(&self) -> Result<Uri, Error> {
        let path = if self.rest.is_empty() { "/" } else { self.rest };
        let query_len = self.query.map_or(0, |query| query.len() + 1);
        let mut text = String::with_capacity(path.len() + query_len);
        text.push_str(path);
        if let Some(query) = self.query {
            text.push('?');
            text.push_str(query);
        }
        // Cannot fail: both parts come from a URI that parsed.
        Uri::try_from(text).map_err(|_| Error::BadPath("the path is not a valid URI"))
    }
}

/// Percent-decodes a path segment; borrowed when there is nothing to decode.
fn decode(segment: &str) -> Result<Cow<'_, str>, Error> {
    percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| Error::BadPath("a namespace or name is not UTF-8 once percent-decoded"))
}

/// Why a request got no answer from its object; each maps to a status (see the module docs).
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("unauthorized: send the server's token as Authorization: Bearer <token>")]
    NoBearerToken,
    #[error("unauthorized: wrong token")]
    WrongToken,
    #[error("bad path: {0}")]
    BadPath(&'static str),
    #[error("no namespace {0:?}")]
    UnknownNamespace(String),
    #[error("the request body is over {max} bytes (body_bytes_max)")]
    BodyTooLarge { max: usize },
    #[error("reading the request body failed: {0}")]
    BodyRead(String),
    #[error("overloaded: {WEB_SOCKETS_MAX} WebSockets are open (WEB_SOCKETS_MAX)")]
    TooManyWebSockets,
    #[error(transparent)]
    Call(#[from] crate::error::Error),
    /// A failure of the object whose message went to the log under `request_id`.
    #[error("internal error (request id {request_id})")]
    Hidden { request_id: RequestId },
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::NoBearerToken | Error::WrongToken => StatusCode::UNAUTHORIZED,
            Error::BadPath(_) | Error::BodyRead(_) => StatusCode::BAD_REQUEST,
            Error::UnknownNamespace(_) => StatusCode::NOT_FOUND,
            Error::TooManyWebSockets => StatusCode::SERVICE_UNAVAILABLE,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Call(error) => match error {
                crate::error::Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                crate::error::Error::Disconnected(_) => StatusCode::BAD_GATEWAY,
                crate::error::Error::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
                // `Remote`, and any kind added later: a failure of the call.
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Error::Hidden { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the connection must close: the body was left unread (or broke off), so the
    /// next request's head cannot be found on it.
    fn closes_connection(&self) -> bool {
        matches!(self, Error::BodyTooLarge { .. } | Error::BodyRead(_))
    }

    fn response(&self) -> HttpResponse {
        let body = OutBody(Body::full(format!("{self}\n")));
        let mut response = hyper::Response::new(body);
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        let text = HeaderValue::from_static("text/plain; charset=utf-8");
        headers.insert(header::CONTENT_TYPE, text);
        match self {
            Error::Call(crate::error::Error::Overloaded(_)) | Error::TooManyWebSockets => {
                let seconds = HeaderValue::from_static(RETRY_AFTER_SECONDS);
                headers.insert(header::RETRY_AFTER, seconds);
            }
            // RFC 6750: the scheme to use, and why the token sent was refused.
            Error::NoBearerToken => {
                let challenge = crate::auth::Refused::NoBearerToken.challenge();
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            Error::WrongToken => {
                let challenge = crate::auth::Refused::WrongToken.challenge();
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            _ => {}
        }
        if self.closes_connection() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(uri: &'static str) -> Result<(String, String, String), Error> {
        let uri = Uri::from_static(uri);
        let route = Route::parse(&uri)?;
        let object = route.object_uri()?.to_string();
        Ok((route.namespace.into(), route.name.into(), object))
    }

    fn owned(namespace: &str, name: &str, uri: &str) -> (String, String, String) {
        (namespace.into(), name.into(), uri.into())
    }

    #[test]
    fn paths_map_to_objects() {
        let cases = [
            ("/counter/a/x/y?q=1", owned("counter", "a", "/x/y?q=1")),
            ("/counter/a", owned("counter", "a", "/")),
            ("/counter/a/", owned("counter", "a", "/")),
            ("/counter/a?q=1", owned("counter", "a", "/?q=1")),
            ("/counter/a%20b/k/%2F", owned("counter", "a b", "/k/%2F")),
            ("/counter/a%2Fb//x", owned("counter", "a/b", "//x")),
        ];
        for (uri, expected) in cases {
            assert_eq!(route(uri).unwrap(), expected, "{uri}");
        }
    }

    #[test]
    fn bad_paths_are_refused() {
        for uri in [
            "/",
            "/counter",
            "/counter/",
            "//a",
            "/counter//x",
            "/counter/%FF",
        ] {
            let error = route(uri).err();
            assert!(matches!(error, Some(Error::BadPath(_))), "{uri}: {error:?}");
        }
    }

    #[test]
    fn errors_map_to_statuses() {
        let cases = [
            (crate::error::Error::Remote("boom".into()), 500),
            (crate::error::Error::Disconnected("reset".into()), 502),
            (crate::error::Error::Overloaded("full".into()), 503),
            (crate::error::Error::InvalidArgument("too long".into()), 400),
        ];
        for (error, status) in cases {
            let response = Error::Call(error.clone()).response();
            assert_eq!(response.status(), status, "{error}");
        }
        let overloaded = Error::Call(crate::error::Error::Overloaded("full".into())).response();
        assert_eq!(overloaded.headers()[header::RETRY_AFTER], "1");
        let too_large = Error::BodyTooLarge { max: 1 }.response();
        assert_eq!(too_large.headers()[header::CONNECTION], "close");
        let missing = Error::NoBearerToken.response();
        assert_eq!(missing.status(), 401);
        assert_eq!(missing.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let wrong = Error::WrongToken.response();
        assert_eq!(wrong.status(), 401);
        let challenge = r#"Bearer error="invalid_token""#;
        assert_eq!(wrong.headers()[header::WWW_AUTHENTICATE], challenge);
        let request_id = RequestId::next();
        let hidden = Error::Hidden { request_id }.response();
        assert_eq!(hidden.status(), 500);
        let body = format!("internal error (request id {request_id})\n");
        assert_eq!(hidden.body().0.as_full().unwrap(), body.as_bytes());
    }
}
