//! The console: what the admin server serves besides `/metrics`. Nothing yet: every path is
//! 404.

use http::StatusCode;
use hyper::body::Incoming;

use super::{AdminContext, AdminResponse, text};

/// Answers a request of the admin server that is not `/metrics`.
pub(crate) async fn route(
    _context: &AdminContext,
    _request: hyper::Request<Incoming>,
) -> AdminResponse {
    text(StatusCode::NOT_FOUND, "not found\n")
}
