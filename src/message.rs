//! The HTTP messages an object receives and answers with. A leaf: the wire, the host, the
//! gateway and the client all speak these.

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
