//! The encoding of stored values. It is the on-disk format of values: keep it stable.
//!
//! A stored value is one tag byte followed by the payload:
//! - `0x01` ([`TAG_CBOR`]): a serde value as CBOR (RFC 8949), self-describing, so what is read
//!   back is the type that was written (integers stay integers, maps stay maps...).
//! - `0x00` ([`TAG_RAW`]): raw bytes, stored as given (`put_bytes` / `get_bytes`).
//!
//! The value size limit applies to the payload, not the tag byte.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;

pub const TAG_RAW: u8 = 0x00;
pub const TAG_CBOR: u8 = 0x01;

/// Encodes a serde value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, Error> {
    let mut out = BytesMut::with_capacity(64).writer();
    out.get_mut().put_u8(TAG_CBOR);
    ciborium::into_writer(value, &mut out).map_err(|e| Error::Encode(e.to_string()))?;
    Ok(out.into_inner().freeze())
}

/// Encodes raw bytes.
pub fn encode_raw(value: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(value.len() + 1);
    out.put_u8(TAG_RAW);
    out.put_slice(value);
    out.freeze()
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(stored: &[u8]) -> Result<T, Error> {
    match stored.split_first() {
        Some((&TAG_CBOR, payload)) => {
            ciborium::from_reader(payload).map_err(|e| Error::Decode(e.to_string()))
        }
        Some((&TAG_RAW, _)) => Err(Error::Decode(
            "the value was stored as raw bytes: read it with get_bytes".into(),
        )),
        _ => Err(Error::Corrupt("stored value has an unknown tag".into())),
    }
}

/// Decodes the values of listed entries, keeping their keys and order.
pub fn decode_entries<T: DeserializeOwned>(
    entries: Vec<(Vec<u8>, Bytes)>,
) -> Result<Vec<(Vec<u8>, T)>, Error> {
    entries
        .into_iter()
        .map(|(k, v)| Ok((k, decode(&v)?)))
        .collect()
}

/// The bytes of a value written by [`encode_raw`].
pub fn decode_raw(stored: &Bytes) -> Result<Bytes, Error> {
    match stored.first() {
        Some(&TAG_RAW) => Ok(stored.slice(1..)),
        Some(&TAG_CBOR) => Err(Error::Decode(
            "the value was stored as a typed value: read it with get".into(),
        )),
        _ => Err(Error::Corrupt("stored value has an unknown tag".into())),
    }
}

/// A CBOR payload (a typed value's, without its tag byte) as JSON, for people to read: maps
/// and arrays as such, byte strings as `{"bytes_b64": "..."}`, integers past what JSON
/// numbers carry exactly and floats that are not finite as strings, map keys that are not
/// text as their JSON, CBOR tags as the value they tag. Not a round trip: exports carry the
/// CBOR itself.
pub fn cbor_to_json(payload: &[u8]) -> Result<serde_json::Value, Error> {
    let value: ciborium::Value =
        ciborium::from_reader(payload).map_err(|e| Error::Decode(e.to_string()))?;
    Ok(json_of(value))
}

fn json_of(value: ciborium::Value) -> serde_json::Value {
    use base64::Engine;
    use ciborium::Value as Cbor;
    use serde_json::Value as Json;
    match value {
        Cbor::Integer(n) => {
            let n = i128::from(n);
            match (i64::try_from(n), u64::try_from(n)) {
                (Ok(n), _) => Json::from(n),
                (_, Ok(n)) => Json::from(n),
                _ => Json::String(n.to_string()),
            }
        }
        Cbor::Bytes(bytes) => {
            let text = base64::engine::general_purpose::STANDARD.encode(bytes);
            serde_json::json!({ "bytes_b64": text })
        }
        Cbor::Float(f) => serde_json::Number::from_f64(f)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(f.to_string())),
        Cbor::Text(text) => Json::String(text),
        Cbor::Bool(b) => Json::Bool(b),
        Cbor::Null => Json::Null,
        Cbor::Tag(_, inner) => json_of(*inner),
        Cbor::Array(items) => Json::Array(items.into_iter().map(json_of).collect()),
        Cbor::Map(pairs) => Json::Object(
            pairs
                .into_iter()
                .map(|(k, v)| {
                    let key = match json_of(k) {
                        Json::String(text) => text,
                        other => other.to_string(),
                    };
                    (key, json_of(v))
                })
                .collect(),
        ),
        // `ciborium::Value` is non-exhaustive; what it may add is shown, not dropped.
        other => Json::String(format!("{other:?}")),
    }
}

/// Length of the payload of an encoded value.
pub fn payload_len(stored: &[u8]) -> usize {
    stored.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn typed_values_come_back_as_the_same_type() {
        let map: BTreeMap<String, Vec<i64>> = [("a".to_string(), vec![1, -2, 3])].into();
        assert_eq!(
            decode::<BTreeMap<String, Vec<i64>>>(&encode(&map).unwrap()).unwrap(),
            map
        );
        assert_eq!(decode::<u64>(&encode(&42u64).unwrap()).unwrap(), 42);
        assert_eq!(decode::<String>(&encode("hi").unwrap()).unwrap(), "hi");
        assert!(decode::<String>(&encode(&42u64).unwrap()).is_err());
    }

    #[test]
    fn the_format_is_stable() {
        // Tag 1, then CBOR unsigned 42 (0x18 0x2a). A change here breaks existing data.
        assert_eq!(&encode(&42u64).unwrap()[..], &[0x01, 0x18, 0x2a]);
        assert_eq!(&encode_raw(b"ab")[..], &[0x00, b'a', b'b']);
    }

    #[test]
    fn typed_values_read_as_json() {
        let value = serde_json::json!({"n": -3, "list": [1.5, "x", null, true], "big": u64::MAX});
        let stored = encode(&value).unwrap();
        assert_eq!(cbor_to_json(&stored[1..]).unwrap(), value);
        let bytes = encode(&serde_bytes_like(b"\x00\xff")).unwrap();
        assert_eq!(
            cbor_to_json(&bytes[1..]).unwrap(),
            serde_json::json!({"bytes_b64": "AP8="})
        );
        let map: BTreeMap<u32, &str> = [(7, "seven")].into();
        assert_eq!(
            cbor_to_json(&encode(&map).unwrap()[1..]).unwrap(),
            serde_json::json!({"7": "seven"})
        );
        assert!(cbor_to_json(&[0xff, 0x00]).is_err());
    }

    /// A CBOR byte string (serde serializes `&[u8]` as an array of numbers).
    fn serde_bytes_like(bytes: &[u8]) -> ciborium::Value {
        ciborium::Value::Bytes(bytes.to_vec())
    }

    #[test]
    fn raw_and_typed_do_not_mix_silently() {
        let raw = encode_raw(b"bytes");
        assert_eq!(decode_raw(&raw).unwrap(), Bytes::from_static(b"bytes"));
        assert!(matches!(decode::<String>(&raw), Err(Error::Decode(_))));
        assert!(matches!(
            decode_raw(&encode("x").unwrap()),
            Err(Error::Decode(_))
        ));
        assert!(matches!(decode::<u8>(&[9, 1]), Err(Error::Corrupt(_))));
    }
}
