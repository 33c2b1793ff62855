//! `kv`: one object's storage over HTTP, so any Cap'n Proto client can use duro as a store.
//!
//! A key is the rest of the path after `/k/`, percent-decoded: it may contain `/`, and once
//! decoded it may be any bytes (`/k/a%2Fb` and `/k/a/b` are the same key `a/b`). Values are
//! stored as raw bytes. Routes:
//!
//! - `PUT /k/{key}`, the body is the value → 204.
//! - `GET /k/{key}` → 200 with the value's bytes, or 404.
//! - `DELETE /k/{key}` → 200 with `true` or `false`: whether the key existed.
//! - `GET /list?start=&startAfter=&end=&prefix=&reverse=true&limit=N` → 200 with a JSON array
//!   of `{"key": k, "value": v}` in list order (see [`ListOptions`]). A key or value that is not
//!   UTF-8 comes as `"key_base64"` or `"value_base64"` instead (standard base64). Parameters
//!   are percent-decoded (`+` stays a `+`); absent ones are unset.
//! - `POST /txn` with
//!   `{"if": [{"key": k, "equals": v | null}], "ops": [{"op": "put", "key": k, "value": v} |
//!   {"op": "delete", "key": k} | {"op": "get", "key": k}]}` runs one transaction: if every
//!   value equals the one given (`null`: the key is absent), the ops are applied in order and
//!   the answer is 200 with a JSON array of what the gets read (a string, `null` if absent, or
//!   `{"value_base64": b}`); else nothing changes and the answer is 409. Keys and values are
//!   JSON strings; at most `batch_keys_max` ops.
//!
//! Refusals: a key over `key_bytes_max`, too many ops, bad list options or a malformed
//! transaction → 400; a value over `value_bytes_max` → 413. Nothing is stored then. Other
//! paths → 404; other methods → 405.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::host::{DurableObject, State};
use crate::message::{BoxError, Request, Response};
use crate::response::{json, text};
use crate::storage::{self, ListOptions, Storage, value};

/// The `kv` class: see the module docs for its routes.
pub struct Kv {
    state: State,
}

impl Kv {
    /// A `kv` object over the storage of `state`.
    pub fn new(state: State) -> Kv {
        Kv { state }
    }
}

impl DurableObject for Kv {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        let (path, method) = (request.uri().path(), request.method());
        let answer = if let Some(key) = path.strip_prefix("/k/") {
            let key: Vec<u8> = percent_decode_str(key).collect();
            match *method {
                Method::GET => get(storage, &key).await,
                Method::PUT => put(storage, &key, request.body()).await,
                Method::DELETE => delete(storage, &key).await,
                _ => return Ok(not_allowed("GET, PUT, DELETE")),
            }
        } else if path == "/list" {
            if method != Method::GET {
                return Ok(not_allowed("GET"));
            }
            list(storage, request.uri().query().unwrap_or("")).await
        } else if path == "/txn" {
            if method != Method::POST {
                return Ok(not_allowed("POST"));
            }
            transaction(storage, request.body()).await
        } else {
            return Ok(text(
                StatusCode::NOT_FOUND,
                "no such route: use /k/{key}, /list or /txn\n",
            ));
        };
        answer.or_else(refusal)
    }
}

/// The answer to a storage error that is the caller's fault; other errors fail the call.
fn refusal(error: storage::Error) -> Result<Response, BoxError> {
    let status = match error {
        storage::Error::KeyTooLarge { .. }
        | storage::Error::EngineKeyTooLarge { .. }
        | storage::Error::TooManyKeys { .. }
        | storage::Error::InvalidList(_) => StatusCode::BAD_REQUEST,
        storage::Error::ValueTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        // Not the caller's request: the object's state or the host's. The call fails.
        storage::Error::Decode(_)
        | storage::Error::Encode(_)
        | storage::Error::TransactionEnded
        | storage::Error::Conflict { .. }
        | storage::Error::Reset(_)
        | storage::Error::Closed => return Err(error.into()),
        // The engine's failures.
        _ => return Err(error.into()),
    };
    Ok(text(status, format!("{error}\n")))
}

fn not_allowed(allow: &'static str) -> Response {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, format!("use {allow}\n"));
    response
        .headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}

async fn get(storage: &Storage, key: &[u8]) -> Result<Response, storage::Error> {
    let Some(value) = storage.get_bytes(key).await? else {
        return Ok(text(StatusCode::NOT_FOUND, "no such key\n"));
    };
    let mut response = Response::new(value);
    let octets = http::HeaderValue::from_static("application/octet-stream");
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, octets);
    Ok(response)
}

async fn put(storage: &Storage, key: &[u8], value: &[u8]) -> Result<Response, storage::Error> {
    storage.put_bytes(key, value).await?;
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

async fn delete(storage: &Storage, key: &[u8]) -> Result<Response, storage::Error> {
    let existed = storage.delete(key).await?;
    Ok(json(StatusCode::OK, &existed))
}

async fn list(storage: &Storage, query: &str) -> Result<Response, storage::Error> {
    let options = match list_options(query) {
        Ok(options) => options,
        Err(rule) => return Ok(text(StatusCode::BAD_REQUEST, format!("{rule}\n"))),
    };
    let mut entries = Vec::new();
    for (key, stored) in storage.list_encoded(&options)? {
        let mut entry = Map::new();
        insert_text_or_base64(&mut entry, "key", &key);
        insert_text_or_base64(&mut entry, "value", &value::decode_raw(&stored)?);
        entries.push(Value::Object(entry));
    }
    Ok(json(StatusCode::OK, &Value::Array(entries)))
}

/// Reads the query of `GET /list`; an error names the rule broken.
fn list_options(query: &str) -> Result<ListOptions, String> {
    let mut options = ListOptions::default();
    for param in query.split('&').filter(|param| !param.is_empty()) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let name = percent_decode_str(name).decode_utf8_lossy();
        let value: Vec<u8> = percent_decode_str(value).collect();
        match &*name {
            "start" => options.start = Some(value),
            "startAfter" => options.start_after = Some(value),
            "end" => options.end = Some(value),
            "prefix" => options.prefix = Some(value),
            "reverse" => {
                options.reverse = match &value[..] {
                    b"true" => true,
                    b"false" => false,
                    _ => return Err("reverse must be true or false".into()),
                }
            }
            "limit" => {
                let limit = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|v| v.parse().ok());
                options.limit = Some(limit.ok_or("limit must be a whole number")?);
            }
            _ => {
                return Err(format!(
                    "unknown list option {name:?} (known: start, startAfter, end, prefix, \
                     reverse, limit)"
                ));
            }
        }
    }
    Ok(options)
}

/// Inserts `name: "text"` if `bytes` are UTF-8, else `name_base64: "base64"`.
fn insert_text_or_base64(map: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => map.insert(name.to_owned(), text.into()),
        Err(_) => map.insert(format!("{name}_base64"), BASE64.encode(bytes).into()),
    };
}

/// The body of `POST /txn`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnRequest {
    #[serde(rename = "if", default)]
    conditions: Vec<Condition>,
    #[serde(default)]
    ops: Vec<Op>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Condition {
    key: String,
    /// Required: `null` means the key must be absent (`deserialize_with` stops serde from
    /// taking a missing field for `null`).
    #[serde(deserialize_with = "Option::deserialize")]
    equals: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Op {
    Put { key: String, value: String },
    Delete { key: String },
    Get { key: String },
}

async fn transaction(storage: &Storage, body: &[u8]) -> Result<Response, storage::Error> {
    // Through a map: serde would also take a struct from a JSON array of its fields.
    let request = serde_json::from_slice::<Map<String, Value>>(body)
        .and_then(|object| TxnRequest::deserialize(Value::Object(object)));
    let request = match request {
        Ok(request) => request,
        Err(e) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("invalid transaction: {e}\n"),
            ));
        }
    };
    // A built-in may read the configured limits; a class of your own would use a constant.
    let max = storage.store().limits().batch_keys_max;
    if request.ops.len() > max {
        return Err(storage::Error::TooManyKeys {
            count: request.ops.len(),
            max,
        });
    }
    let request = &request;
    let reads = storage
        .transaction(|txn| async move {
            for condition in &request.conditions {
                let current = txn.get_bytes(&condition.key).await?;
                if current.as_deref() != condition.equals.as_deref().map(str::as_bytes) {
                    txn.rollback();
                    return Ok(None);
                }
            }
            let mut reads = Vec::new();
            for op in &request.ops {
                match op {
                    Op::Put { key, value } => txn.put_bytes(key, value.as_bytes()).await?,
                    Op::Delete { key } => _ = txn.delete(key).await?,
                    Op::Get { key } => reads.push(match txn.get_bytes(key).await? {
                        None => Value::Null,
                        Some(value) => match std::str::from_utf8(&value) {
                            Ok(text) => text.into(),
                            Err(_) => json!({ "value_base64": BASE64.encode(&value) }),
                        },
                    }),
                }
            }
            Ok::<_, storage::Error>(Some(reads))
        })
        .await?;
    Ok(match reads {
        Some(reads) => json(StatusCode::OK, &Value::Array(reads)),
        None => text(
            StatusCode::CONFLICT,
            "a condition failed: nothing was changed\n",
        ),
    })
}
