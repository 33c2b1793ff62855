//! The HTTP messages an object receives and answers with, and the messages of a WebSocket. A
//! leaf: the wire, the host, the gateway and the client all speak these.

use bytes::Bytes;

use crate::body::Body;

/// The HTTP request an object receives.
pub type Request = http::Request<Bytes>;
/// The HTTP response an object answers with.
pub type Response = http::Response<Bytes>;
/// The error an object's handler may return: any error converts into it with `?`.
pub type BoxError = Box<dyn std::error::Error>;
/// A request whose body may be streamed, as [`DurableObject::fetch_stream`](crate::DurableObject::fetch_stream) gets it.
pub type StreamRequest = http::Request<Body>;
/// A response whose body may be streamed.
pub type StreamResponse = http::Response<Body>;

/// A WebSocket message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebSocketMessage {
    Text(String),
    Binary(Bytes),
}

impl WebSocketMessage {
    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            WebSocketMessage::Text(text) => text.len(),
            WebSocketMessage::Binary(bytes) => bytes.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<String> for WebSocketMessage {
    fn from(text: String) -> Self {
        WebSocketMessage::Text(text)
    }
}

impl From<&str> for WebSocketMessage {
    fn from(text: &str) -> Self {
        WebSocketMessage::Text(text.to_owned())
    }
}

impl From<Bytes> for WebSocketMessage {
    fn from(bytes: Bytes) -> Self {
        WebSocketMessage::Binary(bytes)
    }
}
