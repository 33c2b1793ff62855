//! A rate limiter: a token bucket per key, one object per key, the bucket in its storage.
//!
//! - `POST /take` takes a token → 200 with the tokens left, or 429 with `Retry-After` (seconds)
//!   when the bucket is empty.
//!
//! A bucket holds at most [`CAPACITY`] tokens and earns one every [`REFILL_INTERVAL_MS`]: a
//! burst of ten, then one request every six seconds. Since the bucket lives in storage, a
//! restart forgets nothing, and since one object owns each key, two hosts never share a bucket.
//!
//! Run it, with the HTTP gateway on:
//!
//! ```sh
//! cargo run --example rate_limiter -- --http 127.0.0.1:8787 --data ./limiter-data
//! for i in $(seq 12); do curl -s -X POST http://127.0.0.1:8787/limiter/alice/take; echo; done
//! ```
//!
//! The bucket's arithmetic ([`take`]) is a function of the stored bucket and the time, so it is
//! tested with any clock; the class only reads the clock and storage around it.

use std::time::{SystemTime, UNIX_EPOCH};

use duro::storage;
use duro::{BoxError, Builder, DurableObject, Request, Response, State, response};
use http::{Method, StatusCode, header};
use serde::{Deserialize, Serialize};

/// Most tokens a bucket holds: the longest burst allowed.
pub const CAPACITY: u32 = 10;

/// A bucket earns one token per interval, in milliseconds (ten a minute).
pub const REFILL_INTERVAL_MS: u64 = 6_000;

/// Storage key of the bucket.
const BUCKET_KEY: &str = "bucket";

/// A token bucket as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub tokens: u32,
    /// When the tokens were last counted, in ms since the Unix epoch; earnings since then are
    /// not yet in `tokens`.
    pub refilled_at_ms: u64,
}

/// What a `take` came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A token was taken; this many are left.
    Taken { remaining: u32 },
    /// The bucket is empty; the next token comes in this many ms.
    Empty { retry_after_ms: u64 },
}

/// Takes a token from `bucket` (a full one when there is none yet) at `now_ms`; the bucket to
/// store, and the outcome.
pub fn take(bucket: Option<Bucket>, now_ms: u64) -> (Bucket, Outcome) {
    let full = Bucket {
        tokens: CAPACITY,
        refilled_at_ms: now_ms,
    };
    let bucket = refill(bucket.unwrap_or(full), now_ms);
    if bucket.tokens == 0 {
        let next_token_ms = bucket.refilled_at_ms + REFILL_INTERVAL_MS;
        let retry_after_ms = next_token_ms.saturating_sub(now_ms);
        return (bucket, Outcome::Empty { retry_after_ms });
    }
    let remaining = bucket.tokens - 1;
    let bucket = Bucket {
        tokens: remaining,
        ..bucket
    };
    (bucket, Outcome::Taken { remaining })
}

/// Adds the whole tokens earned since the last count, keeping the part of an interval already
/// elapsed. A clock that went back earns nothing.
fn refill(bucket: Bucket, now_ms: u64) -> Bucket {
    let earned = now_ms.saturating_sub(bucket.refilled_at_ms) / REFILL_INTERVAL_MS;
    let tokens = (u64::from(bucket.tokens) + earned).min(u64::from(CAPACITY)) as u32;
    let refilled_at_ms = if tokens == CAPACITY {
        // A full bucket earns nothing: the next token's interval starts at the next take.
        now_ms
    } else {
        bucket.refilled_at_ms + earned * REFILL_INTERVAL_MS
    };
    Bucket {
        tokens,
        refilled_at_ms,
    }
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH);
    since_epoch.map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// The rate limiter of one key: see the module docs.
pub struct RateLimiter {
    state: State,
}

impl DurableObject for RateLimiter {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        if request.uri().path() != "/take" {
            return Ok(response::text(
                StatusCode::NOT_FOUND,
                "no such route: use /take\n",
            ));
        }
        if request.method() != Method::POST {
            return Ok(response::text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"));
        }
        let now_ms = now_ms();
        let outcome = self
            .state
            .storage()
            .transaction(|txn| async move {
                let (bucket, outcome) = take(txn.get(BUCKET_KEY).await?, now_ms);
                txn.put(BUCKET_KEY, &bucket).await?;
                Ok::<_, storage::Error>(outcome)
            })
            .await?;
        Ok(answer(outcome))
    }
}

/// The response for `outcome`: the tokens left, or 429 with the seconds until the next token.
fn answer(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Taken { remaining } => response::text(StatusCode::OK, format!("{remaining}\n")),
        Outcome::Empty { retry_after_ms } => {
            let mut refusal = response::text(StatusCode::TOO_MANY_REQUESTS, "no tokens left\n");
            let seconds = http::HeaderValue::from(retry_after_ms.div_ceil(1000));
            refusal.headers_mut().insert(header::RETRY_AFTER, seconds);
            refusal
        }
    }
}

/// Registers the class and binds the namespace `limiter` to it.
pub fn register(builder: Builder) -> Builder {
    builder
        .class("rate_limiter", |state, _env| RateLimiter { state })
        .namespace("limiter", "rate_limiter")
}

#[allow(dead_code)] // tests/examples.rs includes this file for the class alone.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// A rate limiter, one token bucket per key.
    #[derive(clap::Parser)]
    struct Args {
        /// Cap'n Proto address: HOST:PORT or unix:PATH.
        #[arg(long, default_value = duro::DEFAULT_LISTEN)]
        listen: duro::ListenAddr,
        /// HTTP gateway address.
        #[arg(long, default_value = "127.0.0.1:8787")]
        http: std::net::SocketAddr,
        /// Data directory.
        #[arg(long, default_value = "limiter-data")]
        data: std::path::PathBuf,
    }
    let args = <Args as clap::Parser>::parse();
    register(duro::Server::builder())
        .listen(args.listen)
        .http(args.http)
        .data_dir(args.data)
        .run()?;
    Ok(())
}
