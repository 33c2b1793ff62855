//! Helpers that build the responses objects answer with most often.
//!
//! ```
//! use duro::response;
//! use http::StatusCode;
//!
//! let ok = response::text(StatusCode::OK, "hello\n");
//! assert_eq!(ok.headers()["content-type"], "text/plain; charset=utf-8");
//! let missing = response::status(StatusCode::NOT_FOUND);
//! assert_eq!(missing.body().as_ref(), b"Not Found\n");
//! let json = response::json(StatusCode::CREATED, &serde_json::json!({"id": 7}));
//! assert_eq!(json.body().as_ref(), br#"{"id":7}"#);
//! ```

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use crate::message::Response;

/// A response with `status` and a plain-text (UTF-8) body.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response {
    with_type(status, body.into(), "text/plain; charset=utf-8")
}

/// A response with `status` and `body` serialized as JSON.
pub fn json<T: serde::Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => with_type(status, bytes.into(), "application/json"),
        // Only a type whose Serialize fails (e.g. a map with non-string keys) gets here.
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the response as JSON: {error}\n"),
        ),
    }
}

/// A response with `status` and its reason phrase as a plain-text body (`Not Found\n`).
pub fn status(status: StatusCode) -> Response {
    let reason = status.canonical_reason().unwrap_or("");
    text(status, format!("{reason}\n"))
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The answer to a WebSocket upgrade the object accepted
/// ([`State::accept_web_socket`](crate::State::accept_web_socket)): `101 Switching Protocols`.
/// Headers added to it (e.g. `Sec-WebSocket-Protocol`) go to the client with the handshake.
pub fn switching_protocols() -> crate::message::StreamResponse {
    let mut response = crate::message::StreamResponse::new(crate::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response
}

/// A streamed response with `status` and `content_type`, and the writer of its body: the
/// object returns the response and goes on writing (server-sent events, a large download).
/// The writer waits while the reader is behind; the body ends at
/// [`BodySender::finish`](crate::BodySender::finish).
pub fn stream(
    status: StatusCode,
    content_type: &'static str,
) -> (crate::body::BodySender, crate::message::StreamResponse) {
    let (sender, body) = crate::body::Body::channel();
    let mut response = crate::message::StreamResponse::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    (sender, response)
}
