//! The admin server: a small HTTP/1.1 server for operators, apart from the gateway that
//! clients use. `GET /metrics` answers the server's metrics in the Prometheus (OpenMetrics)
//! text format; every other path goes to the console ([`console::route`]).
//!
//! It runs on the first shard's event loop, one local task per connection, at most
//! [`CONNECTIONS_MAX`] at once. With a token ([`crate::Builder::token`]) every request but
//! those of the console's static files (which hold no data) must carry it as
//! `Authorization: Bearer <token>`, checked as the gateway checks it; a request without it, or
//! with a wrong one, is answered 401 with `WWW-Authenticate: Bearer` and goes nowhere.

pub(crate) mod console;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::storage::Backend;

/// Most admin connections open at once: the admin server is for a few operators and a
/// scraper, and must not take the FDs or memory the clients' faces need. Past it, new
/// connections are closed at once.
pub const CONNECTIONS_MAX: usize = 64;

/// Longest wait for a request's head (and so the longest a keep-alive connection sits idle).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Wait after a failed `accept` (out of FDs and the like), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The body of the admin server's responses.
pub type AdminBody = http_body_util::Full<Bytes>;

/// A response of the admin server.
pub type AdminResponse = hyper::Response<AdminBody>;

/// What a handler of the admin server (`/metrics`, the console) may use. Shared by every
/// connection; it holds nothing of a shard, so it reads storage without activating objects.
pub struct AdminContext {
    /// The server's storage, shared with the shards: reads see what is committed.
    pub backend: Arc<dyn Backend>,
    /// The namespaces, each with the name of its class, ordered by name.
    pub bindings: BTreeMap<String, String>,
    /// The server's metrics.
    pub metrics: Arc<Metrics>,
    /// The token requests must carry, when the server has one.
    token: Option<Arc<str>>,
}

impl AdminContext {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        bindings: BTreeMap<String, String>,
        metrics: Arc<Metrics>,
        token: Option<Arc<str>>,
    ) -> AdminContext {
        AdminContext {
            backend,
            bindings,
            metrics,
            token,
        }
    }
}

/// Serves the admin server on `listener` until the future is dropped.
pub(crate) async fn serve(listener: TcpListener, context: AdminContext) {
    let context = Rc::new(context);
    let open = Rc::new(Cell::new(0usize));
    let mut http = http1::Builder::new();
    http.keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if open.get() >= CONNECTIONS_MAX {
            tracing::warn!(
                limit = CONNECTIONS_MAX,
                "admin connection refused: too many connections"
            );
            continue;
        }
        open.set(open.get() + 1);
        let slot = Slot(open.clone());
        let (context, http) = (context.clone(), http.clone());
        tokio::task::spawn_local(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let context = context.clone();
                async move { Ok::<_, Infallible>(handle(&context, request).await) }
            });
            if let Err(error) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%error, "admin connection ended");
            }
        });
    }
}

/// One of the [`CONNECTIONS_MAX`] places, given back when dropped.
struct Slot(Rc<Cell<usize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Answers one request: the token first, then the route.
async fn handle(context: &AdminContext, request: hyper::Request<Incoming>) -> AdminResponse {
    // The console's static files hold no data: the page must load to ask for the token.
    if let Some(token) = &context.token
        && !console::is_public(request.uri().path())
        && let Err(refused) = crate::auth::check_bearer(request.headers(), token).await
    {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "unauthorized: send the server's token as Authorization: Bearer <token>\n",
        );
        let challenge = HeaderValue::from_static(refused.challenge());
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
        return response;
    }
    if request.uri().path() == "/metrics" {
        return metrics(context, request.method());
    }
    console::route(context, request).await
}

/// `/metrics`: every metric, as OpenMetrics text.
fn metrics(context: &AdminContext, method: &Method) -> AdminResponse {
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        let allow = HeaderValue::from_static("GET, HEAD");
        response.headers_mut().insert(header::ALLOW, allow);
        return response;
    }
    let mut response = hyper::Response::new(AdminBody::from(context.metrics.render()));
    let content_type = HeaderValue::from_static(crate::metrics::CONTENT_TYPE);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut response = hyper::Response::new(AdminBody::from(body));
    *response.status_mut() = status;
    let content_type = HeaderValue::from_static("text/plain; charset=utf-8");
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}
