//! `kv`: one object's storage over HTTP, so any Cap'n Proto client can use duro as a store.
//!
//! A key is the rest of the path after `/k/`, percent-decoded: it may contain `/`, and once
//! decoded it may be any bytes (`/k/a%2Fb` and `/k/a/b` are the same key `a/b`). Values are
//! stored as raw bytes. Routes:
//!
//! - `PUT /k/{key}`, the body is the value → 204. With `?ttl=N` (whole seconds, 1 to
//!   [`TTL_SECONDS_MAX`]) the key expires N seconds later by the host's clock; without, a
//!   previous expiry is cleared.
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
//!   JSON strings; at most `batch_keys_max` ops. A put here stores without expiry.
//!
//! Expiry: a key past its time is absent to every route at once (`GET`, `list` and its
//! `limit`, the reads and conditions of `/txn`, `DELETE`'s answer), even before it is deleted.
//! The object's alarm is kept at or before the earliest expiry; `alarm()` deletes what is due
//! and sets the alarm again for the next. See [`EXPIRY_INDEX`] for how it is stored.
//!
//! Refusals: a key over `key_bytes_max`, a key in the reserved [`EXPIRY_INDEX`] range, too
//! many ops, a bad `ttl`, bad list options or a malformed transaction → 400; a value over
//! `value_bytes_max` → 413. Nothing is stored then. Other paths → 404; other methods → 405.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::host::{AlarmInfo, DurableObject, State};
use crate::message::{BoxError, Request, Response};
use crate::response::{json, text};
use crate::storage::{self, ListOptions, Storage, Transaction, value};

/// Where the expiry of keys is indexed, in the object's own key space: an entry
/// `EXPIRY_INDEX ‖ expiry ms (8 bytes, big-endian) ‖ key` with an empty value per key that has
/// a ttl, so the index is in time order and the alarm finds what is due, and the next expiry,
/// with one range read. Keys that begin with it are refused, and `list` jumps over its range.
///
/// The expiry itself is stored with the value rather than only in the index: a key with a ttl
/// holds the CBOR array `[expiry ms, value bytes]` (a typed value), a key without one holds
/// the raw bytes as before. So `GET` and `list` learn whether a key is live from the one
/// value they read anyway (no second read per key), values stored before expiry existed are
/// read unchanged, and a `PUT` without ttl clears the expiry by writing raw bytes.
pub const EXPIRY_INDEX: &[u8] = b"\x00ttl/";

/// The first key after [`EXPIRY_INDEX`]'s range (`/` + 1 is `0`).
const EXPIRY_INDEX_END: &[u8] = b"\x00ttl0";

/// Bytes an index entry adds to a key: the prefix and the expiry. A key with a ttl may be at
/// most `key_bytes_max` less this, so that its index entry fits the key limit.
const INDEX_KEY_OVERHEAD: usize = EXPIRY_INDEX.len() + 8;

/// Bytes the expiry may add to a stored value: the CBOR array header (1), the time (≤ 9) and
/// the byte string header (≤ 5). A value with a ttl may be at most `value_bytes_max` less this.
const EXPIRY_VALUE_OVERHEAD: usize = 16;

/// The longest ttl: ten years, in seconds. Longer is almost surely a unit mistake (ms for s).
pub const TTL_SECONDS_MAX: u64 = 10 * 365 * 24 * 3600;

/// Index entries one `delete_many` of the alarm removes: with their keys, at most 128 keys,
/// the default `batch_keys_max`.
const EXPIRE_BATCH: usize = 64;

/// Batches one alarm delivery removes before it sets the alarm again for now: thousands of
/// keys expiring at once are deleted a few thousand per turn, and requests interleave.
const EXPIRE_BATCHES_MAX: usize = 16;

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
        // One time for the whole request: every key it reads is live or expired at this time.
        let now_ms = self.state.now_ms();
        let (path, method) = (request.uri().path(), request.method());
        let query = request.uri().query().unwrap_or("");
        let answer = if let Some(key) = path.strip_prefix("/k/") {
            let key: Vec<u8> = percent_decode_str(key).collect();
            if let Err(rule) = check_not_reserved(&key) {
                return Ok(text(StatusCode::BAD_REQUEST, format!("{rule}\n")));
            }
            match *method {
                Method::GET => get(storage, &key, now_ms).await,
                Method::PUT => match ttl_option(query) {
                    Ok(ttl) => put(storage, &key, request.body(), ttl, now_ms).await,
                    Err(rule) => return Ok(text(StatusCode::BAD_REQUEST, format!("{rule}\n"))),
                },
                Method::DELETE => delete(storage, &key, now_ms).await,
                _ => return Ok(not_allowed("GET, PUT, DELETE")),
            }
        } else if path == "/list" {
            if method != Method::GET {
                return Ok(not_allowed("GET"));
            }
            list(storage, query, now_ms).await
        } else if path == "/txn" {
            if method != Method::POST {
                return Ok(not_allowed("POST"));
            }
            transaction(storage, request.body(), now_ms).await
        } else {
            return Ok(text(
                StatusCode::NOT_FOUND,
                "no such route: use /k/{key}, /list or /txn\n",
            ));
        };
        answer.or_else(refusal)
    }

    /// Deletes the keys whose expiry is due, then sets the alarm for the next expiry.
    async fn alarm(&self, _info: AlarmInfo) -> Result<(), BoxError> {
        let storage = self.state.storage();
        let now_ms = self.state.now_ms();
        let due = ListOptions {
            start: Some(EXPIRY_INDEX.to_vec()),
            end: Some(index_key(now_ms.saturating_add(1), b"")),
            limit: Some(EXPIRE_BATCH),
            ..ListOptions::default()
        };
        for _ in 0..EXPIRE_BATCHES_MAX {
            let entries = storage.list_encoded(&due)?;
            if entries.is_empty() {
                break;
            }
            let mut doomed = Vec::with_capacity(2 * entries.len());
            for (entry, _) in entries {
                // The key goes only if it still expires at this entry's time; the index is
                // kept exact, so this guards against nothing but a damaged entry.
                if let Some((at_ms, key)) = parse_index_key(&entry)
                    && let Some(stored) = storage.get_encoded(key)?
                    && decode_stored(&stored)?.1 == Some(at_ms)
                {
                    doomed.push(key.to_vec());
                }
                doomed.push(entry);
            }
            storage.delete_many(&doomed).await?;
        }
        // The earliest entry left: in the future, or now if due entries remain past the
        // batches of this delivery (the next delivery goes on with them).
        let first = ListOptions {
            prefix: Some(EXPIRY_INDEX.to_vec()),
            limit: Some(1),
            ..ListOptions::default()
        };
        let next = storage.list_encoded(&first)?;
        if let Some((at_ms, _)) = next.first().and_then(|(k, _)| parse_index_key(k)) {
            storage.set_alarm(at_ms).await?;
        }
        Ok(())
    }
}

/// Refuses keys in the range of the expiry index.
fn check_not_reserved(key: &[u8]) -> Result<(), String> {
    if key.starts_with(EXPIRY_INDEX) {
        return Err("keys beginning with \\x00ttl/ are reserved for the expiry index".into());
    }
    Ok(())
}

/// The `ttl` of a `PUT`'s query, in seconds; an error names the rule broken.
fn ttl_option(query: &str) -> Result<Option<u64>, String> {
    let mut ttl = None;
    for param in query.split('&').filter(|param| !param.is_empty()) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        if name != "ttl" {
            let name = percent_decode_str(name).decode_utf8_lossy();
            return Err(format!("unknown option {name:?} of PUT (known: ttl)"));
        }
        if ttl.is_some() {
            return Err("ttl may be given once".into());
        }
        let seconds = Some(value)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| (1..=TTL_SECONDS_MAX).contains(s));
        let rule = format!("ttl must be a whole number of seconds from 1 to {TTL_SECONDS_MAX}");
        ttl = Some(seconds.ok_or(rule)?);
    }
    Ok(ttl)
}

/// The index entry of `key` expiring at `at_ms`.
fn index_key(at_ms: u64, key: &[u8]) -> Vec<u8> {
    [EXPIRY_INDEX, &at_ms.to_be_bytes(), key].concat()
}

/// (expiry ms, key) of an index entry.
fn parse_index_key(entry: &[u8]) -> Option<(u64, &[u8])> {
    let rest = entry.strip_prefix(EXPIRY_INDEX)?;
    let (at, key) = rest.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*at), key))
}

/// A value with its expiry, as stored (see [`EXPIRY_INDEX`]).
fn expiring(at_ms: u64, value: &[u8]) -> ciborium::Value {
    ciborium::Value::Array(vec![
        ciborium::Value::Integer(at_ms.into()),
        ciborium::Value::Bytes(value.to_vec()),
    ])
}

/// The bytes of a stored value and its expiry, if it has one.
fn decode_stored(stored: &Bytes) -> Result<(Bytes, Option<u64>), storage::Error> {
    if stored.first() != Some(&value::TAG_CBOR) {
        return Ok((value::decode_raw(stored)?, None));
    }
    let malformed = || storage::Error::Decode("a kv value that is not [expiry, bytes]".into());
    let ciborium::Value::Array(array) = value::decode::<ciborium::Value>(stored)? else {
        return Err(malformed());
    };
    match <[ciborium::Value; 2]>::try_from(array) {
        Ok([ciborium::Value::Integer(at), ciborium::Value::Bytes(bytes)]) => {
            let at_ms = u64::try_from(at).map_err(|_| malformed())?;
            Ok((Bytes::from(bytes), Some(at_ms)))
        }
        _ => Err(malformed()),
    }
}

/// The bytes of a stored value if it is live at `now_ms`; `None` once expired.
fn live_value(stored: &Bytes, now_ms: u64) -> Result<Option<Bytes>, storage::Error> {
    let (bytes, expiry) = decode_stored(stored)?;
    Ok(expiry.is_none_or(|at_ms| at_ms > now_ms).then_some(bytes))
}

/// The expiry of the value stored under `key`, if it has one (expired or not).
fn stored_expiry(stored: Option<Bytes>) -> Result<Option<u64>, storage::Error> {
    match stored {
        Some(stored) => Ok(decode_stored(&stored)?.1),
        None => Ok(None),
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

async fn get(storage: &Storage, key: &[u8], now_ms: u64) -> Result<Response, storage::Error> {
    let stored = storage.get_encoded(key)?;
    let Some(value) = stored
        .map(|s| live_value(&s, now_ms))
        .transpose()?
        .flatten()
    else {
        return Ok(text(StatusCode::NOT_FOUND, "no such key\n"));
    };
    let mut response = Response::new(value);
    let octets = http::HeaderValue::from_static("application/octet-stream");
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, octets);
    Ok(response)
}

async fn put(
    storage: &Storage,
    key: &[u8],
    value: &[u8],
    ttl_s: Option<u64>,
    now_ms: u64,
) -> Result<Response, storage::Error> {
    let old_expiry = stored_expiry(storage.get_encoded(key)?)?;
    let new_expiry = match ttl_s {
        None => {
            storage.put_bytes(key, value).await?;
            None
        }
        Some(ttl_s) => {
            if let Some(refused) = expiring_size_refusal(storage, key, value) {
                return Ok(refused);
            }
            let at_ms = now_ms.saturating_add(ttl_s * 1000);
            // The value and its index entry commit together: no await that waits between them.
            storage.put(key, &expiring(at_ms, value)).await?;
            storage.put_bytes(index_key(at_ms, key), b"").await?;
            if storage.get_alarm().await?.is_none_or(|alarm| alarm > at_ms) {
                storage.set_alarm(at_ms).await?;
            }
            Some(at_ms)
        }
    };
    // The old entry goes; an alarm set for it stays, and finds nothing due (or an earlier
    // key) when it fires.
    if let Some(old) = old_expiry.filter(|old| Some(*old) != new_expiry) {
        storage.delete(index_key(old, key)).await?;
    }
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

async fn delete(storage: &Storage, key: &[u8], now_ms: u64) -> Result<Response, storage::Error> {
    let (existed, expiry) = match storage.get_encoded(key)? {
        Some(stored) => (
            live_value(&stored, now_ms)?.is_some(),
            decode_stored(&stored)?.1,
        ),
        None => (false, None),
    };
    storage.delete(key).await?;
    if let Some(at_ms) = expiry {
        storage.delete(index_key(at_ms, key)).await?;
    }
    Ok(json(StatusCode::OK, &existed))
}

/// The refusal (413 or 400) of a value or key too large to store with an expiry, if it is;
/// see [`EXPIRY_VALUE_OVERHEAD`] and [`INDEX_KEY_OVERHEAD`].
fn expiring_size_refusal(storage: &Storage, key: &[u8], value: &[u8]) -> Option<Response> {
    let limits = storage.store().limits();
    let value_max = limits.value_bytes_max.saturating_sub(EXPIRY_VALUE_OVERHEAD);
    if value.len() > value_max {
        return Some(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "value is {} bytes; with a ttl a value may be at most {value_max} bytes \
                 (value_bytes_max less {EXPIRY_VALUE_OVERHEAD} for its expiry)\n",
                value.len()
            ),
        ));
    }
    let key_max = limits.key_bytes_max.saturating_sub(INDEX_KEY_OVERHEAD);
    if key.len() > key_max {
        return Some(text(
            StatusCode::BAD_REQUEST,
            format!(
                "key is {} bytes; with a ttl a key may be at most {key_max} bytes \
                 (key_bytes_max less {INDEX_KEY_OVERHEAD} for its expiry index entry)\n",
                key.len()
            ),
        ));
    }
    None
}

async fn list(storage: &Storage, query: &str, now_ms: u64) -> Result<Response, storage::Error> {
    let options = match list_options(query) {
        Ok(options) => options,
        Err(rule) => return Ok(text(StatusCode::BAD_REQUEST, format!("{rule}\n"))),
    };
    let mut entries = Vec::new();
    for (key, value) in list_live(storage, &options, now_ms)? {
        let mut entry = Map::new();
        insert_text_or_base64(&mut entry, "key", &key);
        insert_text_or_base64(&mut entry, "value", &value);
        entries.push(Value::Object(entry));
    }
    Ok(json(StatusCode::OK, &Value::Array(entries)))
}

/// The live entries `options` selects, with their values' bytes: without the expiry index
/// and expired keys, and with `limit` counting only those. Reads page after page, each asking
/// for as many as are still wanted, and jumps over the index's range when it meets it; so a
/// page is wasted only on expired keys the alarm has not deleted yet.
fn list_live(
    storage: &Storage,
    options: &ListOptions,
    now_ms: u64,
) -> Result<Vec<(Vec<u8>, Bytes)>, storage::Error> {
    let mut live = Vec::new();
    let mut page = options.clone();
    loop {
        page.limit = options.limit.map(|limit| limit - live.len());
        let entries = storage.list_encoded(&page)?;
        let exhausted = page.limit.is_none_or(|wanted| entries.len() < wanted);
        let Some(last) = entries.last().map(|(key, _)| key.clone()) else {
            return Ok(live);
        };
        for (key, stored) in entries {
            if !key.starts_with(EXPIRY_INDEX)
                && let Some(value) = live_value(&stored, now_ms)?
            {
                live.push((key, value));
            }
        }
        if exhausted || options.limit == Some(live.len()) {
            return Ok(live);
        }
        // The next page: past `last`, or past the whole index if `last` is in it.
        let in_index = last.starts_with(EXPIRY_INDEX);
        if options.reverse {
            page.end = Some(if in_index {
                EXPIRY_INDEX.to_vec()
            } else {
                last
            });
        } else if in_index {
            (page.start, page.start_after) = (Some(EXPIRY_INDEX_END.to_vec()), None);
        } else {
            (page.start, page.start_after) = (None, Some(last));
        }
    }
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

impl TxnRequest {
    /// Every key the request names.
    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let conditions = self.conditions.iter().map(|c| c.key.as_bytes());
        conditions.chain(self.ops.iter().map(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => key.as_bytes(),
        }))
    }
}

/// The value of `key` as the transaction sees it, if live at `now_ms`.
fn txn_live_value(
    txn: &Transaction,
    key: &str,
    now_ms: u64,
) -> Result<Option<Bytes>, storage::Error> {
    match txn.get_encoded(key.as_bytes())? {
        Some(stored) => live_value(&stored, now_ms),
        None => Ok(None),
    }
}

/// Deletes the index entry of `key`'s expiry, if it has one: the key is about to be
/// overwritten without expiry, or deleted.
async fn txn_forget_expiry(txn: &Transaction, key: &str) -> Result<(), storage::Error> {
    if let Some(at_ms) = stored_expiry(txn.get_encoded(key.as_bytes())?)? {
        txn.delete(index_key(at_ms, key.as_bytes())).await?;
    }
    Ok(())
}

async fn transaction(
    storage: &Storage,
    body: &[u8],
    now_ms: u64,
) -> Result<Response, storage::Error> {
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
    if let Err(rule) = request.keys().try_for_each(check_not_reserved) {
        return Ok(text(StatusCode::BAD_REQUEST, format!("{rule}\n")));
    }
    let request = &request;
    let reads = storage
        .transaction(|txn| async move {
            for condition in &request.conditions {
                let current = txn_live_value(&txn, &condition.key, now_ms)?;
                if current.as_deref() != condition.equals.as_deref().map(str::as_bytes) {
                    txn.rollback();
                    return Ok(None);
                }
            }
            let mut reads = Vec::new();
            for op in &request.ops {
                match op {
                    Op::Put { key, value } => {
                        txn_forget_expiry(&txn, key).await?;
                        txn.put_bytes(key, value.as_bytes()).await?;
                    }
                    Op::Delete { key } => {
                        txn_forget_expiry(&txn, key).await?;
                        txn.delete(key).await?;
                    }
                    Op::Get { key } => reads.push(match txn_live_value(&txn, key, now_ms)? {
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
