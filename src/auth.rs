//! What the Cap'n Proto side and the HTTP gateway share to check a client's token.

use std::time::Duration;

/// Pause before answering a wrong token, to slow down guessing (on either side: the capnp
/// `Host.authenticate` and the gateway's `Authorization: Bearer`).
pub const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(200);

/// Whether `a == b`, compared without an early exit, so the time taken does not tell how much
/// of a guess (a MAC, a token) was right. Only the length may leak.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
