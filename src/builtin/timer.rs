//! `timer`: tagged one-shot timers on an object's alarm, and a log of the ones that fired. A way
//! to use alarms from the shell or any Cap'n Proto client, and what the alarm crash test and
//! `duro bench` drive.
//!
//! - `POST /?at=MS&tag=T` (`MS` in milliseconds since the Unix epoch), or `POST /?in_ms=MS&tag=T`
//!   (from now) → 200 `{"tag": T, "at_ms": at}` once the timer is durable. The same tag at the
//!   same time again is the same timer.
//! - `GET /pending` → 200 `[{"tag": T, "at_ms": at}, ...]` by time.
//! - `GET /fired` → 200 `[{"tag": T, "due_ms": at, "fired_ms": f, "late_us": l}, ...]`, oldest
//!   first: the last [`FIRED_KEPT`] timers that fired, with when the alarm handler ran and how
//!   late, by the system's clock. A timer fires at least once; after a crash, maybe twice.
//! - `DELETE /pending` → 200 with how many timers were cancelled.
//!
//! Refusals: a missing or bad `at`/`in_ms`, a missing tag or one over [`TAG_BYTES_MAX`] → 400;
//! [`PENDING_MAX`] timers already pending → 429. Other paths → 404; other methods → 405.
//!
//! Storage: `p/{at_ms:020}/{tag}` → the tag, one per pending timer, so that they list by time;
//! `pending` → their count; `f/{seq:020}` → a fired record; `fired_seq` → the next `seq`. The
//! object's alarm is the earliest pending timer's time.

use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

use crate::host::{AlarmInfo, DurableObject, State};
use crate::message::{BoxError, Request, Response};
use crate::response::{json, text};
use crate::storage::{self, ListOptions, Storage};

/// Most timers pending in one object: each is a key, and the alarm handler lists them.
pub const PENDING_MAX: u64 = 1000;
/// Fired records kept per object: the oldest is deleted as a new one is written.
pub const FIRED_KEPT: u64 = 1000;
/// Longest tag: it is part of a key.
pub const TAG_BYTES_MAX: usize = 256;
/// Most timers one alarm delivery fires; the rest fire in the next, at once.
const FIRE_BATCH: usize = 64;

/// The `timer` class: see the module docs for its routes.
pub struct Timer {
    state: State,
}

impl Timer {
    /// A `timer` object over the storage of `state`.
    pub fn new(state: State) -> Timer {
        Timer { state }
    }
}

/// A timer that fired, as `GET /fired` lists it.
#[derive(Serialize, Deserialize)]
struct Fired {
    tag: String,
    due_ms: u64,
    fired_ms: u64,
    /// Microseconds from `due_ms` to when the handler ran (0 if the system's clock disagrees
    /// with the host's).
    late_us: u64,
}

/// A pending timer, as `GET /pending` lists it.
#[derive(Serialize)]
struct Pending {
    tag: String,
    at_ms: u64,
}

impl DurableObject for Timer {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        let query = request.uri().query().unwrap_or("");
        let answer = match (request.method(), request.uri().path()) {
            (&Method::POST, "/") => set(storage, query).await?,
            (&Method::GET, "/pending") => json(StatusCode::OK, &pending(storage, usize::MAX)?),
            (&Method::GET, "/fired") => json(StatusCode::OK, &fired(storage)?),
            (&Method::DELETE, "/pending") => json(StatusCode::OK, &cancel(storage).await?),
            (_, "/" | "/pending" | "/fired") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST /, GET /pending, GET /fired or DELETE /pending\n",
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "no such route: use /, /pending or /fired\n",
            ),
        };
        Ok(answer)
    }

    async fn alarm(&self, _info: AlarmInfo) -> Result<(), BoxError> {
        let storage = self.state.storage();
        let (now_ms, now_us) = now();
        // The alarm is the earliest timer's time and never fires early, so the earliest timer
        // is due whatever this process's clock says (a test may run the host on another).
        let mut due = pending(storage, FIRE_BATCH)?;
        let horizon_ms = due.first().map_or(now_ms, |first| first.at_ms.max(now_ms));
        due.retain(|timer| timer.at_ms <= horizon_ms);
        let mut seq = storage.get::<u64>("fired_seq").await?.unwrap_or(0);
        for timer in &due {
            let record = Fired {
                late_us: now_us.saturating_sub(timer.at_ms.saturating_mul(1000)),
                tag: timer.tag.clone(),
                due_ms: timer.at_ms,
                fired_ms: now_ms,
            };
            storage.put(fired_key(seq), &record).await?;
            if let Some(oldest) = seq.checked_sub(FIRED_KEPT) {
                storage.delete(fired_key(oldest)).await?;
            }
            storage.delete(pending_key(timer.at_ms, &timer.tag)).await?;
            seq += 1;
        }
        storage.put("fired_seq", &seq).await?;
        let count = storage.get::<u64>("pending").await?.unwrap_or(0);
        storage
            .put("pending", &count.saturating_sub(due.len() as u64))
            .await?;
        if let Some(next) = pending(storage, 1)?.first() {
            storage.set_alarm(next.at_ms).await?;
        }
        Ok(())
    }
}

fn pending_key(at_ms: u64, tag: &str) -> String {
    format!("p/{at_ms:020}/{tag}")
}

fn fired_key(seq: u64) -> String {
    format!("f/{seq:020}")
}

/// The system's time in ms and in µs since the Unix epoch.
fn now() -> (u64, u64) {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let us = u64::try_from(since.as_micros()).unwrap_or(u64::MAX);
    (us / 1000, us)
}

/// `POST /`: stores the timer and moves the alarm to it if it is the earliest.
async fn set(storage: &Storage, query: &str) -> Result<Response, storage::Error> {
    let (at_ms, tag) = match timer_of(query) {
        Ok(timer) => timer,
        Err(rule) => return Ok(text(StatusCode::BAD_REQUEST, format!("{rule}\n"))),
    };
    let key = pending_key(at_ms, &tag);
    if storage.get::<String>(&key).await?.is_none() {
        let count = storage.get::<u64>("pending").await?.unwrap_or(0);
        if count >= PENDING_MAX {
            let why = format!("{PENDING_MAX} timers are pending already\n");
            return Ok(text(StatusCode::TOO_MANY_REQUESTS, why));
        }
        storage.put(&key, &tag).await?;
        storage.put("pending", &(count + 1)).await?;
    }
    let earliest = pending(storage, 1)?
        .first()
        .map_or(at_ms, |first| first.at_ms);
    if storage.get_alarm().await? != Some(earliest) {
        storage.set_alarm(earliest).await?;
    }
    Ok(json(StatusCode::OK, &Pending { tag, at_ms }))
}

/// The time and tag of `POST /?at=MS&tag=T` or `?in_ms=MS&tag=T`; an error names the rule.
fn timer_of(query: &str) -> Result<(u64, String), String> {
    let (mut at_ms, mut tag) = (None, None);
    for param in query.split('&').filter(|param| !param.is_empty()) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let value = percent_decode_str(value).decode_utf8_lossy();
        let ms = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a whole number of ms"))
        };
        match name {
            "at" => at_ms = Some(ms()?),
            "in_ms" => at_ms = Some(now().0.saturating_add(ms()?)),
            "tag" => tag = Some(value.into_owned()),
            _ => {
                return Err(format!(
                    "unknown parameter {name:?} (known: at, in_ms, tag)"
                ));
            }
        }
    }
    let at_ms = at_ms.ok_or("give the time: at=MS (since the Unix epoch) or in_ms=MS")?;
    let tag = tag.filter(|t| !t.is_empty()).ok_or("give a tag: tag=T")?;
    if tag.len() > TAG_BYTES_MAX {
        return Err(format!("the tag is over {TAG_BYTES_MAX} bytes"));
    }
    Ok((at_ms, tag))
}

/// Up to `limit` pending timers, by time.
fn pending(storage: &Storage, limit: usize) -> Result<Vec<Pending>, storage::Error> {
    let options = ListOptions {
        prefix: Some(b"p/".to_vec()),
        limit: Some(limit.min(PENDING_MAX as usize)),
        ..ListOptions::default()
    };
    let mut timers = Vec::new();
    for (key, stored) in storage.list_encoded(&options)? {
        let tag: String = storage::value::decode(&stored)?;
        // The key is `p/`, 20 digits, `/`, the tag: written by `pending_key` only.
        let digits = key.get(2..22).and_then(|d| std::str::from_utf8(d).ok());
        let at_ms = digits.and_then(|d| d.parse().ok());
        timers.push(Pending {
            tag,
            at_ms: at_ms.unwrap_or(0),
        });
    }
    Ok(timers)
}

/// The fired records kept, oldest first.
fn fired(storage: &Storage) -> Result<Vec<Fired>, storage::Error> {
    let options = ListOptions {
        prefix: Some(b"f/".to_vec()),
        ..ListOptions::default()
    };
    storage
        .list_encoded(&options)?
        .iter()
        .map(|(_, stored)| storage::value::decode(stored))
        .collect()
}

/// `DELETE /pending`: every pending timer and the alarm.
async fn cancel(storage: &Storage) -> Result<usize, storage::Error> {
    let keys: Vec<String> = pending(storage, usize::MAX)?
        .iter()
        .map(|timer| pending_key(timer.at_ms, &timer.tag))
        .collect();
    for key in &keys {
        storage.delete(key).await?;
    }
    storage.put("pending", &0u64).await?;
    storage.delete_alarm().await?;
    Ok(keys.len())
}
