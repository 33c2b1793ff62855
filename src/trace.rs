//! Request IDs: each call that arrives over Cap'n Proto or through the gateway gets one. It
//! names the call's tracing span (with the namespace and the object's ID), and the errors the
//! host answers the call with carry it, so that a client's error and the server's log of that
//! call can be matched.
//!
//! An ID costs a thread-local add: a per-thread counter from a random start, mixed by a
//! bijection, so IDs do not repeat within a thread, look unrelated, and do not tell how many
//! calls the server served. Printed as 16 hex digits.

use std::cell::Cell;

/// The ID of one call (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RequestId(u64);

thread_local! {
    /// The next counter value of this thread; `None` until the first ID is made.
    static NEXT: Cell<Option<u64>> = const { Cell::new(None) };
}

impl RequestId {
    /// A new ID.
    pub(crate) fn next() -> RequestId {
        let counter = NEXT.with(|next| {
            let counter = next.get().unwrap_or_else(random_start);
            next.set(Some(counter.wrapping_add(1)));
            counter
        });
        RequestId(mix(counter))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A random start for a thread's counter; the time if the OS random source fails (which it
/// all but never does): the IDs then still differ from call to call.
fn random_start() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        return now.map_or(0, |now| now.as_nanos() as u64);
    }
    u64::from_le_bytes(bytes)
}

/// splitmix64's finalizer: a bijection of u64, so distinct counters give distinct IDs.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `error` as the caller of the call `request_id` gets it: a `failed`, `overloaded` or
/// `disconnected` exception ends with ` (request id ID)`; its start (`remote: ` and the
/// rest) is kept, and the other kinds (`unimplemented`) go as they are. Logged: at info when
/// the call failed, at debug when it was refused or cut off (which floods of calls do).
pub(crate) fn answer_error(
    mut error: capnp::Error,
    request_id: RequestId,
    namespace: &str,
    id: &dyn std::fmt::Display,
) -> capnp::Error {
    use capnp::ErrorKind;
    match error.kind {
        ErrorKind::Failed => {
            tracing::info!(%request_id, namespace, %id, error = %error.extra, "call failed");
        }
        ErrorKind::Overloaded | ErrorKind::Disconnected => {
            tracing::debug!(%request_id, namespace, %id, error = %error.extra, "call refused");
        }
        _ => return error,
    }
    error.extra = format!("{} (request id {request_id})", error.extra);
    error
}

/// The span to run the tasks a call starts in: the current one (the call's) when spans of
/// calls are recorded, none otherwise, so that a call costs no span lookup when they are not.
pub(crate) fn call_span() -> tracing::Span {
    match tracing::level_enabled!(tracing::Level::DEBUG) {
        true => tracing::Span::current(),
        false => tracing::Span::none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_16_hex_digits_and_differ() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| RequestId::next().to_string()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 16, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
    }

    #[test]
    fn errors_keep_their_kind_and_start_and_end_with_the_request_id() {
        let id = RequestId::next();
        let failed = answer_error(capnp::Error::failed("remote: boom".into()), id, "ns", &"x");
        assert_eq!(failed.kind, capnp::ErrorKind::Failed);
        assert_eq!(failed.extra, format!("remote: boom (request id {id})"));
        let overloaded = answer_error(capnp::Error::overloaded("full".into()), id, "ns", &"x");
        assert_eq!(overloaded.kind, capnp::ErrorKind::Overloaded);
        assert!(overloaded.extra.ends_with(&format!("(request id {id})")));
        let missing = answer_error(capnp::Error::unimplemented("no".into()), id, "ns", &"x");
        assert_eq!(missing.extra, "no");
    }
}
