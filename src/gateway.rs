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
//! What the gateway answers when the request does not reach the object, or the call fails:
//!
//! | situation | status |
//! |---|---|
//! | path without a namespace and a name, an empty one, or one not UTF-8 once decoded | 400 |
//! | no namespace of that name | 404 |
//! | request body over [`GatewayOptions::body_bytes_max`] | 413, and the connection closes |
//! | the request body broke off (client error) | 400, and the connection closes |
//! | bad argument ([`crate::error::Error::InvalidArgument`], e.g. a name over `name_bytes_max`) | 400 |
//! | the object's code returned an error ([`crate::error::Error::Remote`]) | 500 |
//! | the object was reset, or the host is shutting down ([`crate::error::Error::Disconnected`]) | 502 |
//! | too many requests queued for the object ([`crate::error::Error::Overloaded`]) | 503, `Retry-After: 1` |
//!
//! Each of these has a plain-text body naming the rule or carrying the error's message.
//!
//! A body over the limit is refused before it is read: at once when its `Content-Length` is
//! over, and as soon as a chunked body passes the limit. The rest of such a body is never read,
//! so the connection cannot carry another request and is closed after the 413.
//!
//! Connections are HTTP/1.1 with keep-alive, one local task each, on the host's event loop.
//! A request is handled inside its connection's task: the gateway spawns nothing per request
//! (the host runs each call to an object as a task of its own).

use std::borrow::Cow;
use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::percent_decode_str;
use tokio::net::{TcpListener, TcpStream};

use crate::host::Host;
use crate::message::{Request, Response};
use crate::tls::ServerTls;

/// Most gateway connections open at once. Each costs a task, hyper's buffers (up to
/// `max_buf_size`) and an FD; past the bound new connections are closed at once, so a flood of
/// connections cannot exhaust memory or FDs (and the Cap'n Proto listener keeps its own FDs).
pub const CONNECTIONS_MAX: usize = 4096;

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

/// Options of the HTTP gateway.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Largest request body accepted (default 1 MiB); larger requests get 413.
    pub body_bytes_max: usize,
}

impl Default for GatewayOptions {
    fn default() -> GatewayOptions {
        GatewayOptions {
            body_bytes_max: 1 << 20,
        }
    }
}

/// The response type of the gateway: the object's body is handed to hyper without a copy.
type HttpResponse = hyper::Response<Full<Bytes>>;

/// Serves HTTP on `listener` until the future is dropped, or HTTPS when `tls` is given. Runs on
/// the host's event loop (inside its `LocalSet`): each connection is a local task.
pub async fn serve(
    host: Host,
    listener: TcpListener,
    options: GatewayOptions,
    tls: Option<ServerTls>,
) {
    let gateway = Rc::new(Gateway::new(host, options));
    let open = Rc::new(Cell::new(0));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => gateway.spawn_connection(&open, stream, tls.as_ref()),
            Err(error) => {
                tracing::warn!(%error, "gateway accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// What every connection of the gateway shares.
struct Gateway {
    host: Host,
    options: GatewayOptions,
    /// hyper's connection settings, built once.
    http: http1::Builder,
}

/// A place among the [`CONNECTIONS_MAX`] open connections, given back when dropped (also when
/// the connection's task is dropped at shutdown).
struct ConnectionSlot {
    open: Rc<Cell<usize>>,
}

impl ConnectionSlot {
    fn take(open: &Rc<Cell<usize>>) -> Option<ConnectionSlot> {
        if open.get() >= CONNECTIONS_MAX {
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
    fn new(host: Host, options: GatewayOptions) -> Gateway {
        let mut http = http1::Builder::new();
        http.keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        Gateway {
            host,
            options,
            http,
        }
    }

    fn spawn_connection(
        self: &Rc<Self>,
        open: &Rc<Cell<usize>>,
        stream: TcpStream,
        tls: Option<&ServerTls>,
    ) {
        let Some(slot) = ConnectionSlot::take(open) else {
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
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    {
        let handler = self.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(request).await) }
        });
        let connection = self.http.serve_connection(TokioIo::new(stream), service);
        if let Err(error) = connection.await {
            tracing::debug!(%error, "gateway connection ended");
        }
    }

    /// Answers one request: the object's response, or the refusal's.
    async fn handle(&self, request: hyper::Request<Incoming>) -> HttpResponse {
        match self.forward(request).await {
            Ok(response) => response.map(Full::new),
            Err(error) => error.response(),
        }
    }

    /// Routes `request` to its object. The checks that cost nothing come first: a request
    /// refused for its path or its Content-Length neither activates an object nor has its body
    /// read, and a refused name is refused before the body is read.
    async fn forward(&self, request: hyper::Request<Incoming>) -> Result<Response, Error> {
        let (mut parts, body) = request.into_parts();
        let route = Route::parse(&parts.uri)?;
        let namespace = self
            .host
            .namespace(&route.namespace)
            .ok_or_else(|| Error::UnknownNamespace(route.namespace.to_string()))?;
        let max = self.options.body_bytes_max;
        // The exact length when Content-Length is given; 0 for a chunked body.
        if body.size_hint().lower() > max as u64 {
            return Err(Error::BodyTooLarge { max });
        }
        let uri = route.object_uri()?;
        let stub = namespace.get_by_name(&route.name)?;
        let body = read_body(body, max).await?;
        parts.uri = uri;
        Ok(stub.fetch(Request::from_parts(parts, body)).await?)
    }
}

/// Reads the whole body, but stops as soon as it passes `max` bytes.
async fn read_body(body: Incoming, max: usize) -> Result<Bytes, Error> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    match Limited::new(body, max).collect().await {
        // A body that came in one chunk is handed on without a copy.
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(Error::BodyTooLarge { max }),
        Err(error) => Err(Error::BodyRead(error.to_string())),
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
    #[error("bad path: {0}")]
    BadPath(&'static str),
    #[error("no namespace {0:?}")]
    UnknownNamespace(String),
    #[error("the request body is over {max} bytes (body_bytes_max)")]
    BodyTooLarge { max: usize },
    #[error("reading the request body failed: {0}")]
    BodyRead(String),
    #[error(transparent)]
    Call(#[from] crate::error::Error),
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::BadPath(_) | Error::BodyRead(_) => StatusCode::BAD_REQUEST,
            Error::UnknownNamespace(_) => StatusCode::NOT_FOUND,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Call(error) => match error {
                crate::error::Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                crate::error::Error::Disconnected(_) => StatusCode::BAD_GATEWAY,
                crate::error::Error::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
                // `Remote`, and any kind added later: a failure of the call.
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// Whether the connection must close: the body was left unread (or broke off), so the
    /// next request's head cannot be found on it.
    fn closes_connection(&self) -> bool {
        matches!(self, Error::BodyTooLarge { .. } | Error::BodyRead(_))
    }

    fn response(&self) -> HttpResponse {
        let mut response = hyper::Response::new(Full::new(Bytes::from(format!("{self}\n"))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        let text = HeaderValue::from_static("text/plain; charset=utf-8");
        headers.insert(header::CONTENT_TYPE, text);
        if matches!(self, Error::Call(crate::error::Error::Overloaded(_))) {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
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
    }
}
