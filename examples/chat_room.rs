//! Chat rooms over WebSockets: one object per room, which keeps the room's last
//! [`HISTORY_MAX`] messages in its storage and sends each new one to everyone in the room.
//!
//! - `GET /ws` with a WebSocket upgrade joins the room. The socket gets the kept messages
//!   first, oldest first, then every message posted, each as `{"seq": n, "text": "hello"}`.
//!   Every text it sends (at most [`MESSAGE_BYTES_MAX`] bytes) is posted to everyone, itself
//!   included; a longer one gets `{"error": "..."}` back, a binary one closes the socket (1003).
//!   `ping` gets `pong` from the host, without waking the room.
//! - `GET /messages` → 200 with the kept messages as JSON, oldest first.
//!
//! Run it, with the HTTP gateway on, and join with any WebSocket client:
//!
//! ```sh
//! cargo run --example chat_room -- --http 127.0.0.1:8787 --data ./chat-data
//! websocat ws://127.0.0.1:8787/chat/lobby/ws      # each line typed is posted
//! curl http://127.0.0.1:8787/chat/lobby/messages
//! ```
//!
//! The host holds the sockets, not the object: the room may be evicted while people stay
//! connected, and their next message builds it again. So the room keeps nothing in memory: the
//! next number comes from storage, where each message is a key of its own (`msg/` and its
//! number, zero-padded so that key order is posting order). A post writes one message and
//! deletes the one that falls out; the history is one `list`. (`duro serve`'s built-in `room`
//! is this with a web page; see `src/builtin/room.rs`.)

use duro::storage::{self, ListOptions};
use duro::{BoxError, Builder, DurableObject, State, Storage, StreamRequest, StreamResponse};
use duro::{Error, WebSocket, WebSocketMessage, response};
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// Messages a room keeps, and sends to whoever joins; posting one more drops the oldest.
pub const HISTORY_MAX: u64 = 100;

/// Longest message, in bytes: a room's history stays under 100 × 4 KiB, and each message is
/// well within storage's value limit.
pub const MESSAGE_BYTES_MAX: usize = 4096;

/// Prefix of the keys of messages.
const MESSAGE_PREFIX: &str = "msg/";

/// A posted message, as it is kept and as it is sent.
#[derive(Serialize, Deserialize)]
struct Message {
    seq: u64,
    text: String,
}

/// A chat room: see the module docs.
pub struct ChatRoom {
    state: State,
}

impl ChatRoom {
    fn new(state: State) -> ChatRoom {
        // The host answers keep-alives itself: they never wake an evicted room.
        state.set_web_socket_auto_response(Some(("ping", "pong")));
        ChatRoom { state }
    }
}

impl DurableObject for ChatRoom {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        let history = history(self.state.storage()).await?;
        let answer = match (request.method(), request.uri().path()) {
            (&Method::GET, "/ws") => {
                let socket = match self.state.accept_web_socket(&request, &[]) {
                    Ok(socket) => socket,
                    Err(Error::InvalidArgument(why)) => {
                        let status = StatusCode::UPGRADE_REQUIRED;
                        return Ok(response::text(status, why).map(Into::into));
                    }
                    Err(error) => return Err(error.into()),
                };
                // Nothing waits between reading the history and here, so no post falls in
                // between: the joiner misses none and gets none twice.
                for message in &history {
                    socket.send(serde_json::to_string(message)?)?;
                }
                return Ok(response::switching_protocols());
            }
            (&Method::GET, "/messages") => response::json(StatusCode::OK, &history),
            _ => {
                let routes = "use GET /ws (a WebSocket) or GET /messages\n";
                response::text(StatusCode::NOT_FOUND, routes)
            }
        };
        Ok(answer.map(Into::into))
    }

    async fn web_socket_message(
        &self,
        socket: WebSocket,
        message: WebSocketMessage,
    ) -> Result<(), BoxError> {
        let WebSocketMessage::Text(text) = message else {
            socket.close(1003, "text messages only")?;
            return Ok(());
        };
        if text.len() > MESSAGE_BYTES_MAX {
            let error = format!("a message is at most {MESSAGE_BYTES_MAX} bytes");
            socket.send(serde_json::json!({ "error": error }).to_string())?;
            return Ok(());
        }
        let storage = self.state.storage();
        let seq = last_seq(storage).await? + 1;
        let message = Message { seq, text };
        storage.put(message_key(seq), &message).await?;
        if seq > HISTORY_MAX {
            storage.delete(message_key(seq - HISTORY_MAX)).await?;
        }
        // Storage calls but `transaction` and `sync` never wait, so no other event runs
        // between the read of `seq` and here: posts are numbered and sent in one order. Each
        // copy leaves once the put is durable (the output gate).
        let json = serde_json::to_string(&message)?;
        for member in self.state.get_web_sockets(None) {
            // Fails only for a socket closing meanwhile.
            let _ = member.send(json.clone());
        }
        Ok(())
    }
}

/// The kept messages, oldest first.
async fn history(storage: &Storage) -> Result<Vec<Message>, storage::Error> {
    messages(storage, false, HISTORY_MAX as usize).await
}

/// The number of the last message posted; 0 before the first.
async fn last_seq(storage: &Storage) -> Result<u64, storage::Error> {
    let last = messages(storage, true, 1).await?;
    Ok(last.first().map_or(0, |message| message.seq))
}

/// Up to `limit` kept messages, newest first if `reverse`.
async fn messages(
    storage: &Storage,
    reverse: bool,
    limit: usize,
) -> Result<Vec<Message>, storage::Error> {
    let options = ListOptions {
        prefix: Some(MESSAGE_PREFIX.into()),
        reverse,
        limit: Some(limit),
        ..Default::default()
    };
    let messages = storage.list::<Message>(&options).await?;
    Ok(messages
        .into_iter()
        .map(|(_key, message)| message)
        .collect())
}

/// The key of message `seq`: zero-padded, so keys sort as the numbers do.
fn message_key(seq: u64) -> String {
    format!("{MESSAGE_PREFIX}{seq:020}")
}

/// Registers the class and binds the namespace `chat` to it.
pub fn register(builder: Builder) -> Builder {
    builder
        .class("chat_room", |state, _env| ChatRoom::new(state))
        .namespace("chat", "chat_room")
}

#[allow(dead_code)] // tests/examples.rs includes this file for the class alone.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// Chat rooms over WebSockets, one object per room.
    #[derive(clap::Parser)]
    struct Args {
        /// Cap'n Proto address: HOST:PORT or unix:PATH.
        #[arg(long, default_value = duro::DEFAULT_LISTEN)]
        listen: duro::ListenAddr,
        /// HTTP gateway address: rooms are /chat/{room}/ws and /chat/{room}/messages.
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
