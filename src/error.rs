//! The errors a call to an object can end with, as every caller sees them: objects calling
//! objects, the Rust client, and (as Cap'n Proto exception types) any client on the wire.

/// Why a call to an object failed. The variant tells the caller what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The object's code returned an error: an application error. The object lives on.
    #[error("remote: {0}")]
    Remote(String),
    /// The stub is broken (object reset, host shutting down, connection lost): get a new stub.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// Too many requests are queued for the object or the host: back off, do not retry at once.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A bad argument (invalid ID, unknown namespace, a limit exceeded); the message names the rule.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request body over the bound of a whole-body read (the gateway answers 413). On the
    /// wire it is a `failed` like a bad argument.
    #[error("{0}")]
    TooLarge(String),
}

/// An error a class hands back with its kind kept: it reaches the caller as `error` is, not as
/// the object's own `remote` error. For the host's own classes that stand in for an instance
/// living elsewhere: an external class refuses with `overloaded` when no provider came.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct KindKept(pub(crate) Error);

/// Prefix of the message of an application error on the wire.
pub(crate) const REMOTE_PREFIX: &str = "remote: ";

impl From<Error> for capnp::Error {
    fn from(error: Error) -> capnp::Error {
        match error {
            Error::Remote(message) => capnp::Error::failed(format!("{REMOTE_PREFIX}{message}")),
            Error::Disconnected(message) => capnp::Error::disconnected(message),
            Error::Overloaded(message) => capnp::Error::overloaded(message),
            Error::InvalidArgument(message) | Error::TooLarge(message) => {
                capnp::Error::failed(message)
            }
        }
    }
}

/// The message of an exception without the marks capnp-rpc puts on one for each connection
/// it crossed (a call to an object of another shard, or to a provider's instance, crosses
/// more than one).
pub(crate) fn uncrossed(message: &str) -> &str {
    let mut message = message;
    while let Some(rest) = message.strip_prefix("remote exception: ") {
        message = rest;
    }
    message
}

impl From<capnp::Error> for Error {
    /// Maps by exception type; only `failed` needs its message, to tell the object's own errors
    /// (sent with the `remote: ` prefix) from refused arguments.
    fn from(error: capnp::Error) -> Error {
        use capnp::ErrorKind;
        let message = uncrossed(&error.extra);
        match error.kind {
            // A connection that broke off inside a message is as lost as one reset: e.g. a
            // TLS listener's alert to a client that spoke plain capnp.
            ErrorKind::Disconnected | ErrorKind::PrematureEndOfFile => {
                Error::Disconnected(message.to_owned())
            }
            ErrorKind::Overloaded => Error::Overloaded(message.to_owned()),
            _ => match message.strip_prefix(REMOTE_PREFIX) {
                Some(message) => Error::Remote(message.to_owned()),
                None => Error::InvalidArgument(message.to_owned()),
            },
        }
    }
}

impl From<crate::id::Error> for Error {
    fn from(error: crate::id::Error) -> Error {
        Error::InvalidArgument(error.to_string())
    }
}
