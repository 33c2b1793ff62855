//! The console's JSON API, under `/api/`: read-only views of the namespaces, their objects and
//! an object's storage, as stored. Every answer is one bounded page, read from the engine on
//! a blocking thread (so a slow store never stalls the shard whose event loop serves the
//! admin server; a connection asks one thing at a time, so at most
//! [`CONNECTIONS_MAX`](crate::admin::CONNECTIONS_MAX) such reads run at once), and no object
//! is activated.
//!
//! - `namespaces` → `[{"name", "class"}]`
//! - `objects?namespace=NS&after=HEX&limit=N` → `{"objects": [{"id", "name", "created_ms",
//!   "alarm_ms"}], "more", "next"}`: one page of the object registry in ID order, from the
//!   cursor `after` (the `next` of the page before). A page costs the same however many
//!   objects the namespace holds (a range read of the registry from the cursor, never a
//!   count or a scan of the namespace), so a million objects page as fast as ten.
//! - `object?namespace=NS&id=HEX|name=NAME&prefix=P&start_after=K&limit=N` → `{"id", "name",
//!   "created_ms", "alarm_ms", "entries": [{"key"|"key_b64", "encoding", "value"|"value_b64",
//!   "bytes"}], "more", "next", "next_b64"}`: one page of the object's keys.
//!
//! Parameters are percent-decoded as a form encodes them (`+` is a space), so that a prefix
//! or key may be any bytes; `prefix_b64` and `start_after_b64` take them as base64 instead.
//! A parameter unknown, repeated or malformed is refused with 400 and a JSON `{"error"}`
//! naming it; an unknown namespace or an object with nothing stored is 404.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::admin::{AdminBody, AdminContext, AdminResponse};
use crate::host::operations::{READ_LIMIT_DEFAULT, READ_LIMIT_MAX, ReadOptions, read_page};
use crate::id::{self, IdMinter, ObjectId};
use crate::storage::value::{TAG_CBOR, TAG_RAW, cbor_to_json};
use crate::storage::{Backend, ObjectKey, ObjectRecord};

/// Objects of one `objects` page when none is asked.
const OBJECTS_LIMIT_DEFAULT: usize = 100;

/// Most objects of one `objects` page: each row is a registry read and an alarm read, so this
/// bounds the time and memory of one request.
const OBJECTS_LIMIT_MAX: usize = 1000;

/// Why a request of the API failed; each kind is its own status.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// A parameter is missing, unknown, repeated or malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such namespace, object or endpoint (404).
    #[error("{0}")]
    NotFound(String),
    /// The storage failed to read (500).
    #[error("storage error: {0}")]
    Storage(String),
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<crate::storage::Error> for Error {
    fn from(error: crate::storage::Error) -> Error {
        Error::Storage(error.to_string())
    }
}

impl From<crate::error::Error> for Error {
    fn from(error: crate::error::Error) -> Error {
        match error {
            crate::error::Error::InvalidArgument(message) => Error::BadRequest(message),
            other => Error::Storage(other.to_string()),
        }
    }
}

/// Answers `GET /api/{endpoint}?{query}`.
pub(super) async fn answer(
    context: &AdminContext,
    endpoint: &str,
    query: Option<&str>,
) -> AdminResponse {
    let answered = match Query::parse(query.unwrap_or("")) {
        Err(error) => Err(error),
        Ok(query) => match endpoint {
            "namespaces" => namespaces(context, query),
            "objects" => objects(context, query).await,
            "object" => object(context, query).await,
            _ => Err(Error::NotFound(format!("no API /api/{endpoint}"))),
        },
    };
    match answered {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(error) => json_response(error.status(), &json!({ "error": error.to_string() })),
    }
}

/// `namespaces`: every namespace served, with its class, by name.
fn namespaces(context: &AdminContext, query: Query) -> Result<Value, Error> {
    query.finish()?;
    let list: Vec<Value> = context
        .bindings
        .iter()
        .map(|(name, class)| json!({ "name": name, "class": class }))
        .collect();
    Ok(Value::Array(list))
}

/// `objects`: one page of a namespace's objects, by cursor.
async fn objects(context: &AdminContext, mut query: Query) -> Result<Value, Error> {
    let namespace = query.namespace(context)?;
    let after = match query.text("after")? {
        None => None,
        Some(hex) => Some(id::from_hex(&hex).map_err(|e| bad(format!("after: {e}")))?),
    };
    let limit = query.limit(OBJECTS_LIMIT_DEFAULT, OBJECTS_LIMIT_MAX)?;
    query.finish()?;
    blocking(&context.backend, move |backend| {
        let tag = backend.namespace(&namespace)?.tag;
        let (records, more) = backend.list_objects(tag, after.as_ref(), limit)?;
        let mut objects = Vec::with_capacity(records.len());
        for record in &records {
            let alarm_ms = backend.alarm(&ObjectKey { tag, id: record.id })?;
            objects.push(json!({
                "id": id::to_hex(&record.id),
                "name": record.name,
                "created_ms": record.created_ms,
                "alarm_ms": alarm_ms,
            }));
        }
        let next = records.last().filter(|_| more).map(|r| id::to_hex(&r.id));
        Ok(json!({ "objects": objects, "more": more, "next": next }))
    })
    .await
}

/// `object`: one page of an object's keys and values, and what the registry says of it.
async fn object(context: &AdminContext, mut query: Query) -> Result<Value, Error> {
    let namespace = query.namespace(context)?;
    let wanted = match (query.text("id")?, query.text("name")?) {
        (Some(hex), None) => Wanted::Id(id::from_hex(&hex).map_err(|e| bad(format!("id: {e}")))?),
        (None, Some(name)) => Wanted::Name(name),
        _ => {
            return Err(bad(
                "give the object's id (64 hex digits) or its name, not both",
            ));
        }
    };
    let options = ReadOptions {
        prefix: query.bytes("prefix")?.unwrap_or_default(),
        start: None,
        start_after: query.bytes("start_after")?,
        limit: query.limit(READ_LIMIT_DEFAULT as usize, READ_LIMIT_MAX as usize)? as u32,
    };
    query.finish()?;
    blocking(&context.backend, move |backend| {
        let record = backend.namespace(&namespace)?;
        // The secret is read each time, not kept: an import may replace it.
        let minter = IdMinter::new(&namespace, &record.secret);
        let id = match wanted {
            Wanted::Id(bytes) => minter
                .check(&bytes, None)
                .map_err(|e| bad(format!("id: {e}")))?,
            Wanted::Name(name) => minter.from_name(&name),
        };
        let Some(row) = registry_row(backend, record.tag, &id)? else {
            return Err(Error::NotFound(format!(
                "no object {} in namespace {namespace:?} has stored anything",
                describe(&id)
            )));
        };
        let object = ObjectKey {
            tag: record.tag,
            id: *id.bytes(),
        };
        let page = read_page(backend, &object, &options)?;
        let entries: Vec<Value> = page.entries.iter().map(|(k, v)| entry(k, v)).collect();
        let last = page.entries.last().filter(|_| page.more).map(|(k, _)| k);
        Ok(json!({
            "id": id.to_hex(),
            "name": row.name.as_deref().or(id.name()),
            "created_ms": row.created_ms,
            "alarm_ms": page.alarm_ms,
            "entries": entries,
            "more": page.more,
            "next": last.and_then(|k| std::str::from_utf8(k).ok()),
            "next_b64": last.map(|k| STANDARD.encode(k)),
        }))
    })
    .await
}

/// The object an `object` request names.
enum Wanted {
    /// By its ID, still to be checked against the namespace's secret.
    Id([u8; id::ID_BYTES]),
    /// By its name, from which the namespace derives the ID.
    Name(String),
}

/// The object's row of the registry, which it has while it stores a key or an alarm: the
/// first row from just before its ID, one row read whatever the namespace's size.
fn registry_row(
    backend: &dyn Backend,
    tag: u32,
    id: &ObjectId,
) -> Result<Option<ObjectRecord>, Error> {
    let before = predecessor(id.bytes());
    let (mut rows, _) = backend.list_objects(tag, before.as_ref(), 1)?;
    Ok(rows.pop().filter(|row| row.id == *id.bytes()))
}

/// The ID just below `id` in byte order, `None` for the lowest.
fn predecessor(id: &[u8; id::ID_BYTES]) -> Option<[u8; id::ID_BYTES]> {
    let mut before = *id;
    for byte in before.iter_mut().rev() {
        if *byte > 0 {
            *byte -= 1;
            return Some(before);
        }
        *byte = 0xff;
    }
    None
}

/// How an error message names an object: by its name when it has one.
fn describe(id: &ObjectId) -> String {
    match id.name() {
        Some(name) => format!("named {name:?}"),
        None => id.to_hex(),
    }
}

/// A key and its stored value, for people to read: text when it is UTF-8, else base64; a
/// typed value decoded to JSON.
fn entry(key: &[u8], stored: &[u8]) -> Value {
    let mut entry = Map::new();
    match std::str::from_utf8(key) {
        Ok(text) => entry.insert("key".into(), text.into()),
        Err(_) => entry.insert("key_b64".into(), STANDARD.encode(key).into()),
    };
    let (encoding, payload) = match stored.split_first() {
        Some((&TAG_CBOR, payload)) => ("cbor", payload),
        Some((&TAG_RAW, payload)) => ("raw", payload),
        _ => ("unknown", stored),
    };
    entry.insert("encoding".into(), encoding.into());
    entry.insert("bytes".into(), payload.len().into());
    let decoded = match encoding {
        "cbor" => cbor_to_json(payload).map_err(|e| e.to_string()),
        "raw" => std::str::from_utf8(payload)
            .map(Value::from)
            .map_err(|_| String::new()),
        _ => Err(String::new()),
    };
    match decoded {
        Ok(value) => entry.insert("value".into(), value),
        Err(why) => {
            if !why.is_empty() {
                entry.insert("error".into(), why.into());
            }
            entry.insert("value_b64".into(), STANDARD.encode(payload).into())
        }
    };
    Value::Object(entry)
}

/// Runs `read` on a blocking thread with the storage.
async fn blocking<F>(backend: &Arc<dyn Backend>, read: F) -> Result<Value, Error>
where
    F: FnOnce(&dyn Backend) -> Result<Value, Error> + Send + 'static,
{
    let backend = backend.clone();
    tokio::task::spawn_blocking(move || read(backend.as_ref()))
        .await
        .map_err(|_| Error::Storage("the read ended abnormally".into()))?
}

fn bad(message: impl Into<String>) -> Error {
    Error::BadRequest(message.into())
}

/// A JSON answer. `no-store`: it shows storage as it is now.
fn json_response(status: StatusCode, value: &Value) -> AdminResponse {
    let body = Bytes::from(value.to_string());
    let mut response = hyper::Response::new(AdminBody::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let content_type = HeaderValue::from_static("application/json");
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A request's parameters, percent-decoded, each taken once by its handler.
struct Query {
    /// Name and value of each parameter not taken yet.
    params: Vec<(String, Vec<u8>)>,
}

impl Query {
    /// Splits and decodes a query string; a parameter named twice, or whose name is not
    /// UTF-8, is refused.
    fn parse(query: &str) -> Result<Query, Error> {
        let mut params: Vec<(String, Vec<u8>)> = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = String::from_utf8(form_decode(name))
                .map_err(|_| bad("a parameter's name is not UTF-8"))?;
            if params.iter().any(|(seen, _)| *seen == name) {
                return Err(bad(format!("parameter {name:?} is given twice")));
            }
            params.push((name, form_decode(value)));
        }
        Ok(Query { params })
    }

    /// The bytes of parameter `name`, taken.
    fn take(&mut self, name: &str) -> Option<Vec<u8>> {
        let at = self.params.iter().position(|(seen, _)| seen == name)?;
        Some(self.params.swap_remove(at).1)
    }

    /// Parameter `name` as text.
    fn text(&mut self, name: &str) -> Result<Option<String>, Error> {
        self.take(name)
            .map(|bytes| String::from_utf8(bytes).map_err(|_| bad(format!("{name} is not UTF-8"))))
            .transpose()
    }

    /// Parameter `name` as bytes: percent-encoded as `name`, or base64 as `name_b64`.
    fn bytes(&mut self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let b64 = format!("{name}_b64");
        match (self.take(name), self.take(&b64)) {
            (Some(_), Some(_)) => Err(bad(format!("give {name} or {b64}, not both"))),
            (Some(bytes), None) => Ok(Some(bytes)),
            (None, Some(text)) => STANDARD
                .decode(text)
                .map(Some)
                .map_err(|e| bad(format!("{b64} is not base64: {e}"))),
            (None, None) => Ok(None),
        }
    }

    /// `namespace`, which must be one the server serves.
    fn namespace(&mut self, context: &AdminContext) -> Result<String, Error> {
        let name = self
            .text("namespace")?
            .ok_or_else(|| bad("parameter namespace is missing"))?;
        if !context.bindings.contains_key(&name) {
            return Err(Error::NotFound(format!("no namespace {name:?}")));
        }
        Ok(name)
    }

    /// `limit`: 1 to `max`, `default` when not given.
    fn limit(&mut self, default: usize, max: usize) -> Result<usize, Error> {
        let Some(text) = self.text("limit")? else {
            return Ok(default);
        };
        match text.parse::<usize>() {
            Ok(limit) if (1..=max).contains(&limit) => Ok(limit),
            _ => Err(bad(format!(
                "limit must be a number from 1 to {max}, got {text:?}"
            ))),
        }
    }

    /// Refuses the parameters no one took.
    fn finish(self) -> Result<(), Error> {
        match self.params.first() {
            None => Ok(()),
            Some((name, _)) => Err(bad(format!("unknown parameter {name:?}"))),
        }
    }
}

/// Decodes a part of a query as a form encodes it: `+` is a space, `%XX` a byte.
fn form_decode(part: &str) -> Vec<u8> {
    let spaced = part.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_to_bytes_and_refuse_what_they_cannot_use() {
        let mut query = Query::parse("prefix=a%FF+b&limit=5&name=%22x%0Ay%22").unwrap();
        assert_eq!(query.bytes("prefix").unwrap().unwrap(), b"a\xff b");
        assert_eq!(query.limit(1, 10).unwrap(), 5);
        assert_eq!(query.text("name").unwrap().unwrap(), "\"x\ny\"");
        query.finish().unwrap();

        let mut query = Query::parse("start_after_b64=AP8%3D").unwrap();
        assert_eq!(query.bytes("start_after").unwrap().unwrap(), b"\x00\xff");
        assert!(Query::parse("a=1&a=2").is_err());
        assert!(Query::parse("limit=0").unwrap().limit(1, 10).is_err());
        assert!(Query::parse("limit=11").unwrap().limit(1, 10).is_err());
        assert!(Query::parse("limit=x").unwrap().limit(1, 10).is_err());
        assert!(Query::parse("p=1&p_b64=AA==").unwrap().bytes("p").is_err());
        assert!(Query::parse("p_b64=!").unwrap().bytes("p").is_err());
        assert!(Query::parse("name=%FF").unwrap().text("name").is_err());
        assert!(Query::parse("other=1").unwrap().finish().is_err());
    }

    #[test]
    fn the_predecessor_of_an_id_is_the_one_just_below() {
        assert_eq!(predecessor(&[0; 32]), None);
        let mut id = [0u8; 32];
        id[31] = 1;
        assert_eq!(predecessor(&id), Some([0; 32]));
        id = [0; 32];
        id[30] = 1;
        let mut below = [0u8; 32];
        below[31] = 0xff;
        assert_eq!(predecessor(&id), Some(below));
    }
}
