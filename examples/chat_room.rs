//! Chat rooms: one object per room, keeping the room's last [`HISTORY_MAX`] messages in its
//! storage.
//!
//! - `POST /messages` with the message as the body (UTF-8, at most [`MESSAGE_BYTES_MAX`]
//!   bytes) posts it → 201 with `{"seq": n}`, the message's number in the room.
//! - `GET /messages` → 200 with the kept messages as JSON, oldest first:
//!   `[{"seq": 1, "text": "hello"}, ...]`.
//!
//! Run it, with the HTTP gateway on:
//!
//! ```sh
//! cargo run --example chat_room -- --http 127.0.0.1:8787 --data ./chat-data
//! curl -d 'hello' http://127.0.0.1:8787/chat/lobby/messages
//! curl -d 'anyone here?' http://127.0.0.1:8787/chat/lobby/messages
//! curl http://127.0.0.1:8787/chat/lobby/messages
//! ```
//!
//! Each message is a key of its own (`msg/` and its number, zero-padded so that key order is
//! posting order), so a post writes one message rather than the whole history, and reading the
//! history is one `list`.

use duro::storage::{self, ListOptions};
use duro::{BoxError, Builder, DurableObject, Request, Response, State, Storage, response};
use http::{Method, StatusCode};
use serde_json::json;

/// Messages a room keeps; posting one more drops the oldest.
pub const HISTORY_MAX: u64 = 100;

/// Longest message, in bytes: a room's history stays under 100 × 4 KiB, and each message is
/// well within storage's value limit.
pub const MESSAGE_BYTES_MAX: usize = 4096;

/// Prefix of the keys of messages.
const MESSAGE_PREFIX: &str = "msg/";
/// Key of the number the next message gets.
const NEXT_SEQ_KEY: &str = "next_seq";

/// A chat room: see the module docs for its routes.
pub struct ChatRoom {
    state: State,
}

impl DurableObject for ChatRoom {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        if request.uri().path() != "/messages" {
            let routes = "no such route: use /messages\n";
            return Ok(response::text(StatusCode::NOT_FOUND, routes));
        }
        let storage = self.state.storage();
        match *request.method() {
            Method::GET => Ok(response::json(StatusCode::OK, &history(storage).await?)),
            Method::POST => post(storage, request.body()).await,
            _ => Ok(response::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET or POST\n",
            )),
        }
    }
}

async fn post(storage: &Storage, body: &[u8]) -> Result<Response, BoxError> {
    if body.len() > MESSAGE_BYTES_MAX {
        let message = format!("a message is at most {MESSAGE_BYTES_MAX} bytes\n");
        return Ok(response::text(StatusCode::PAYLOAD_TOO_LARGE, message));
    }
    let Ok(message) = std::str::from_utf8(body) else {
        let refusal = "a message is UTF-8 text\n";
        return Ok(response::text(StatusCode::BAD_REQUEST, refusal));
    };
    // One transaction: the message, the counter and the dropped oldest message change together.
    let seq = storage
        .transaction(|txn| async move {
            let seq = txn.get::<u64>(NEXT_SEQ_KEY).await?.unwrap_or(1);
            txn.put(message_key(seq), message).await?;
            txn.put(NEXT_SEQ_KEY, &(seq + 1)).await?;
            if seq > HISTORY_MAX {
                txn.delete(message_key(seq - HISTORY_MAX)).await?;
            }
            Ok::<_, storage::Error>(seq)
        })
        .await?;
    Ok(response::json(StatusCode::CREATED, &json!({ "seq": seq })))
}

/// The kept messages, oldest first.
async fn history(storage: &Storage) -> Result<serde_json::Value, BoxError> {
    let options = ListOptions {
        prefix: Some(MESSAGE_PREFIX.into()),
        limit: Some(HISTORY_MAX as usize),
        ..Default::default()
    };
    let messages = storage.list::<String>(&options).await?;
    let messages = messages.into_iter().map(|(key, text)| {
        let seq = std::str::from_utf8(&key[MESSAGE_PREFIX.len()..])?.parse::<u64>()?;
        Ok::<_, BoxError>(json!({ "seq": seq, "text": text }))
    });
    messages.collect()
}

/// The key of message `seq`: zero-padded, so keys sort as the numbers do.
fn message_key(seq: u64) -> String {
    format!("{MESSAGE_PREFIX}{seq:020}")
}

/// Registers the class and binds the namespace `chat` to it.
pub fn register(builder: Builder) -> Builder {
    builder
        .class("chat_room", |state, _env| ChatRoom { state })
        .namespace("chat", "chat_room")
}

#[allow(dead_code)] // tests/examples.rs includes this file for the class alone.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// Chat rooms, one object per room.
    #[derive(clap::Parser)]
    struct Args {
        /// Cap'n Proto address: HOST:PORT or unix:PATH.
        #[arg(long, default_value = duro::DEFAULT_LISTEN)]
        listen: duro::ListenAddr,
        /// HTTP gateway address.
        #[arg(long, default_value = "127.0.0.1:8787")]
        http: std::net::SocketAddr,
        /// Data directory.
        #[arg(long, default_value = "chat-data")]
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
