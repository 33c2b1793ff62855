//! Built-in classes, each bound by `duro serve` to a namespace of the same name. They are also
//! short examples of classes.

pub mod counter;
pub mod echo;
pub mod kv;

use crate::server::Builder;

pub(crate) fn register(builder: Builder) -> Builder {
    builder
        .class("echo", |_state, _env| echo::Echo)
        .namespace("echo", "echo")
        .class("counter", |state, _env| counter::Counter::new(state))
        .namespace("counter", "counter")
        .class("kv", |state, _env| kv::Kv::new(state))
        .namespace("kv", "kv")
}

/// A response with a status and a plain-text body.
pub(crate) fn text(status: http::StatusCode, body: impl Into<bytes::Bytes>) -> crate::Response {
    let mut response = crate::Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A response with a status and a JSON body.
pub(crate) fn json(status: http::StatusCode, body: &serde_json::Value) -> crate::Response {
    let mut response = crate::Response::new(body.to_string().into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
