//! The console: a page for operators, served by the admin server at `/`, and the read-only JSON
//! API it is drawn from, under `/api/` ([`api`]).
//!
//! The page is three static files (`console/index.html`, `console.js`, `console.css`) built
//! into the binary: no build step, nothing fetched from elsewhere (operators' machines often
//! have no internet). They hold no data, so they are served without the server's token
//! ([`is_public`]); the page asks for the token once and sends it with every request of the
//! API and of `/metrics`, which the admin server refuses without it.

mod api;

use http::{HeaderValue, Method, StatusCode, header};
use hyper::body::Incoming;

use super::{AdminBody, AdminContext, AdminResponse, text};

/// A file of the page: its path, content type and text.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// The page's files, by the path they are served at.
const ASSETS: [Asset; 3] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("console/index.html"),
    },
    Asset {
        path: "/console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("console/console.js"),
    },
    Asset {
        path: "/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("console/console.css"),
    },
];

/// What the page may load and run: its own files and API only. Names and values shown come
/// from storage, which clients wrote: the script puts them in the page as text, and this
/// policy stops any script but the console's own from running should one slip through.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the page's static files, served without the token: they hold
/// no data.
pub(crate) fn is_public(path: &str) -> bool {
    ASSETS.iter().any(|asset| asset.path == path)
}

/// Answers a request of the admin server that is not `/metrics`.
pub(crate) async fn route(
    context: &AdminContext,
    request: hyper::Request<Incoming>,
) -> AdminResponse {
    let path = request.uri().path();
    let asset = ASSETS.iter().find(|asset| asset.path == path);
    let endpoint = path.strip_prefix("/api/");
    if asset.is_none() && endpoint.is_none() {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        let allow = HeaderValue::from_static("GET, HEAD");
        response.headers_mut().insert(header::ALLOW, allow);
        return response;
    }
    if let Some(asset) = asset {
        return serve_asset(asset);
    }
    let endpoint = endpoint.unwrap_or_default();
    api::answer(context, endpoint, request.uri().query()).await
}

/// One of the page's files. `no-cache`: the browser may keep it, but asks again each time, so
/// that a new build's page is never mixed with an old script.
fn serve_asset(asset: &Asset) -> AdminResponse {
    let mut response = hyper::Response::new(AdminBody::from(asset.body));
    let headers = response.headers_mut();
    let content_type = HeaderValue::from_static(asset.content_type);
    headers.insert(header::CONTENT_TYPE, content_type);
    let no_cache = HeaderValue::from_static("no-cache");
    headers.insert(header::CACHE_CONTROL, no_cache);
    let nosniff = HeaderValue::from_static("nosniff");
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, nosniff);
    let policy = HeaderValue::from_static(CONTENT_SECURITY_POLICY);
    headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    response
}
