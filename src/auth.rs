//! What the Cap'n Proto side, the HTTP gateway and the admin server share to check a client's
//! token.

use std::time::Duration;

use http::{HeaderMap, header};

/// Pause before answering a wrong token, to slow down guessing (on either side: the capnp
/// `Host.authenticate` and the gateway's `Authorization: Bearer`).
pub const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(200);

/// Whether `a == b`, compared without an early exit, so the time taken does not tell how much
/// of a guess (a MAC, a token) was right. Only the length may leak.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why an HTTP request was refused for its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No `Authorization: Bearer <token>` (no header, another scheme, an empty token).
    NoBearerToken,
    /// A token, but not the server's.
    WrongToken,
}

impl Refused {
    /// The `WWW-Authenticate` challenge of the 401 (RFC 6750): the scheme to use, and why the
    /// token sent was refused.
    pub(crate) fn challenge(self) -> &'static str {
        match self {
            Refused::NoBearerToken => "Bearer",
            Refused::WrongToken => r#"Bearer error="invalid_token""#,
        }
    }
}

/// Lets an HTTP request in when it carries `token` as `Authorization: Bearer <token>`,
/// compared in constant time; a wrong token is refused after [`WRONG_TOKEN_DELAY`].
pub(crate) async fn check_bearer(headers: &HeaderMap, token: &str) -> Result<(), Refused> {
    let sent = bearer_token(headers).ok_or(Refused::NoBearerToken)?;
    if !constant_time_eq(sent, token.as_bytes()) {
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        return Err(Refused::WrongToken);
    }
    Ok(())
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's case does not
/// matter); none when the header is missing, repeated, of another scheme, or has no token.
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.as_bytes();
    if values.next().is_some() {
        return None;
    }
    let space = value.iter().position(|&byte| byte == b' ')?;
    let (scheme, token) = value.split_at(space);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_tokens_are_read_from_one_authorization_header() {
        let token = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::AUTHORIZATION, HeaderValue::from_static(value));
            }
            bearer_token(&headers).map(<[u8]>::to_vec)
        };
        assert_eq!(token(&["Bearer s3cret"]), Some(b"s3cret".to_vec()));
        assert_eq!(token(&["bearer  s3cret "]), Some(b"s3cret".to_vec()));
        assert_eq!(
            token(&["Bearer a b"]),
            Some(b"a b".to_vec()),
            "tokens may hold spaces"
        );
        for refused in [
            &[][..],
            &["Basic czNjcmV0"],
            &["Bearer"],
            &["Bearer "],
            &["Bearers3cret"],
            &["s3cret"],
            &["Bearer s3cret", "Bearer s3cret"],
        ] {
            assert_eq!(token(refused), None, "{refused:?}");
        }
    }
}
