//! HTTP requests and responses to and from their Cap'n Proto form.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};

use super::duro_capnp::{header, http_request, http_response};
use crate::message::{Request, Response};

fn invalid(rule: String) -> capnp::Error {
    capnp::Error::failed(rule)
}

/// Reads a header list sent on the wire into `into` (appending, so repeated names stay).
pub fn headers_from_capnp(
    headers: capnp::struct_list::Reader<header::Owned>,
    into: &mut http::HeaderMap,
) -> capnp::Result<()> {
    for header in headers.iter() {
        let name = header.get_name()?.to_str()?;
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("invalid header name {name:?}")))?;
        let value = if header.has_raw_value() {
            header.get_raw_value()?
        } else {
            header.get_value()?.as_bytes()
        };
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| invalid(format!("invalid value of header {name}")))?;
        into.append(name, value);
    }
    Ok(())
}

/// Writes a header list for the wire; `list` has room for every value of `headers`
/// (`headers.len()`).
pub fn headers_to_capnp(
    headers: &http::HeaderMap,
    mut list: capnp::struct_list::Builder<header::Owned>,
) {
    for (i, (name, value)) in headers.iter().enumerate() {
        let mut header = list.reborrow().get(i as u32);
        header.set_name(name.as_str());
        match std::str::from_utf8(value.as_bytes()) {
            Ok(text) => header.set_value(text),
            Err(_) => {
                header.set_value(&*String::from_utf8_lossy(value.as_bytes()));
                header.set_raw_value(value.as_bytes());
            }
        }
    }
}

/// Reads a request sent on the wire. An empty method means GET; an empty URL means "/".
pub fn request_from_capnp(reader: http_request::Reader) -> capnp::Result<Request> {
    let method = match reader.get_method()?.to_str()? {
        "" => Method::GET,
        method => Method::from_bytes(method.as_bytes())
            .map_err(|_| invalid(format!("invalid HTTP method {method:?}")))?,
    };
    let uri = match reader.get_url()?.to_str()? {
        "" => Uri::from_static("/"),
        url => url
            .parse::<Uri>()
            .map_err(|e| invalid(format!("invalid URL {url:?}: {e}")))?,
    };
    let body = Bytes::copy_from_slice(reader.get_body()?);
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    headers_from_capnp(reader.get_headers()?, request.headers_mut())?;
    Ok(request)
}

/// Writes a request for the wire.
pub fn request_to_capnp(request: &Request, mut builder: http_request::Builder) {
    builder.set_method(request.method().as_str());
    builder.set_url(&*request.uri().to_string());
    let headers = builder
        .reborrow()
        .init_headers(request.headers().len() as u32);
    headers_to_capnp(request.headers(), headers);
    builder.set_body(request.body());
}

/// Reads a response sent on the wire.
pub fn response_from_capnp(reader: http_response::Reader) -> capnp::Result<Response> {
    let status = StatusCode::from_u16(reader.get_status())
        .map_err(|_| invalid(format!("invalid HTTP status {}", reader.get_status())))?;
    let mut response = Response::new(Bytes::copy_from_slice(reader.get_body()?));
    *response.status_mut() = status;
    headers_from_capnp(reader.get_headers()?, response.headers_mut())?;
    Ok(response)
}

/// Writes a response for the wire.
pub fn response_to_capnp(response: &Response, mut builder: http_response::Builder) {
    builder.set_status(response.status().as_u16());
    builder.set_status_text(response.status().canonical_reason().unwrap_or(""));
    let headers = builder
        .reborrow()
        .init_headers(response.headers().len() as u32);
    headers_to_capnp(response.headers(), headers);
    builder.set_body(response.body());
}

/// Bytes a header list, a method or a status line and such parts take on the wire besides
/// their own bytes (pointers, the NUL of a text, padding to a word), rounded well up.
const PART_OVERHEAD_BYTES: usize = 64;
/// The rest of a call's or a return's message (its headers, the struct of the request or
/// response, the segment table), rounded well up.
const MESSAGE_OVERHEAD_BYTES: usize = 1024;

/// An estimate of the bytes `headers` take on the wire, never below the real size.
pub fn headers_bytes(headers: &http::HeaderMap) -> usize {
    let value_bytes = |value: &HeaderValue| match std::str::from_utf8(value.as_bytes()) {
        Ok(_) => value.len(),
        // A lossy copy (at most 3 bytes a byte) and the raw bytes.
        Err(_) => 4 * value.len() + PART_OVERHEAD_BYTES,
    };
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value_bytes(value) + PART_OVERHEAD_BYTES)
        .sum()
}

/// The bytes of `response` that its message certainly carries on the wire (the status text,
/// the headers' names and values, the body): never above the real size. What a connection
/// owes for a message until its writer sent it must be such a lower bound, as the writer gives
/// back the bytes it writes: the excess of an estimate above them would stay owed for good,
/// and a long connection's share of the budget would shrink call after call.
pub fn response_payload_bytes<B: AsRef<[u8]>>(response: &http::Response<B>) -> usize {
    let status_text = response.status().canonical_reason().map_or(0, str::len);
    status_text + headers_payload_bytes(response.headers()) + response.body().as_ref().len()
}

/// The bytes of `headers`' names and values: never above what they take on the wire (see
/// [`response_payload_bytes`]).
pub fn headers_payload_bytes(headers: &http::HeaderMap) -> usize {
    let pairs = headers.iter();
    pairs
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

/// An estimate of the bytes a call that carries `payload` bytes of data (a `ByteStream.write`,
/// a WebSocket message) takes on the wire, never below the real size.
pub fn call_bytes(payload: usize) -> usize {
    MESSAGE_OVERHEAD_BYTES + PART_OVERHEAD_BYTES + payload
}

/// An estimate of the bytes `request` takes on the wire as a `fetch` call, never below the
/// real size: its parts, plus room for the pointers and padding of each, plus the call's own.
pub fn request_bytes(request: &Request) -> usize {
    let uri = request.uri();
    // As `Uri`'s text form adds them up, without building it.
    let uri_bytes = uri.scheme_str().map_or(0, |scheme| scheme.len() + 3)
        + uri
            .authority()
            .map_or(0, |authority| authority.as_str().len())
        + uri.path_and_query().map_or(1, |path| path.as_str().len());
    MESSAGE_OVERHEAD_BYTES
        + request.method().as_str().len()
        + uri_bytes
        + headers_bytes(request.headers())
        + request.body().len()
}

/// An estimate of the bytes `response` takes on the wire as the return of a `fetch`, never
/// below the real size (see [`request_bytes`]): the headers count as well as the body.
pub fn response_bytes(response: &Response) -> usize {
    let status_text = response.status().canonical_reason().map_or(0, str::len);
    MESSAGE_OVERHEAD_BYTES
        + status_text
        + PART_OVERHEAD_BYTES
        + headers_bytes(response.headers())
        + response.body().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let request = http::Request::builder()
            .method("PATCH")
            .uri("/a/b?x=1&y=%20")
            .header("x-one", "1")
            .header("x-one", "2")
            .header("content-type", "text/plain")
            .body(Bytes::from_static(b"\x00body\xff"))
            .unwrap();
        let mut message = capnp::message::Builder::new_default();
        request_to_capnp(&request, message.init_root());
        let back = request_from_capnp(message.get_root_as_reader().unwrap()).unwrap();
        assert_eq!(back.method(), request.method());
        assert_eq!(back.uri(), request.uri());
        assert_eq!(back.headers(), request.headers());
        assert_eq!(back.body(), request.body());
    }

    #[test]
    fn responses_round_trip() {
        let response = http::Response::builder()
            .status(418)
            .header("x-a", "b")
            .body(Bytes::from_static(b"teapot"))
            .unwrap();
        let mut message = capnp::message::Builder::new_default();
        response_to_capnp(&response, message.init_root());
        let reader: http_response::Reader = message.get_root_as_reader().unwrap();
        assert_eq!(
            reader.get_status_text().unwrap().to_str().unwrap(),
            "I'm a teapot"
        );
        let back = response_from_capnp(reader).unwrap();
        assert_eq!(back.status(), 418);
        assert_eq!(back.headers(), response.headers());
        assert_eq!(back.body(), response.body());
    }

    #[test]
    fn header_values_that_are_not_utf8_keep_their_bytes() {
        let request = http::Request::builder()
            .header("x-latin1", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .header("x-text", "caf\u{e9}")
            .body(Bytes::new())
            .unwrap();
        let mut message = capnp::message::Builder::new_default();
        request_to_capnp(&request, message.init_root());
        let reader: http_request::Reader = message.get_root_as_reader().unwrap();
        let headers = reader.get_headers().unwrap();
        // An old reader sees a lossy copy; the raw bytes travel beside it, for this value only.
        assert_eq!(
            headers.get(0).get_value().unwrap().to_str(),
            Ok("caf\u{fffd}")
        );
        assert_eq!(headers.get(0).get_raw_value().unwrap(), b"caf\xe9");
        assert!(!headers.get(1).has_raw_value());
        let back = request_from_capnp(reader).unwrap();
        assert_eq!(back.headers(), request.headers());
        assert!(request_bytes(&request) >= message.size_in_words() * 8);
    }

    #[test]
    fn bad_requests_name_the_rule() {
        let mut message = capnp::message::Builder::new_default();
        let mut builder: http_request::Builder = message.init_root();
        builder.set_method("GE T");
        let error = request_from_capnp(message.get_root_as_reader().unwrap()).unwrap_err();
        assert!(error.extra.contains("invalid HTTP method"), "{error}");
        let mut builder: http_request::Builder = message.init_root();
        builder.set_url("http://[::1");
        let error = request_from_capnp(message.get_root_as_reader().unwrap()).unwrap_err();
        assert!(error.extra.contains("invalid URL"), "{error}");
    }
}
