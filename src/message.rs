//! The HTTP messages an object receives and answers with. A leaf: the wire, the host, the
//! gateway and the client all speak these.

use bytes::Bytes;

/// The HTTP request an object receives.
pub type Request = http::Request<Bytes>;
/// The HTTP response an object answers with.
pub type Response = http::Response<Bytes>;
/// The error an object's handler may return: any error converts into it with `?`.
pub type BoxError = Box<dyn std::error::Error>;
