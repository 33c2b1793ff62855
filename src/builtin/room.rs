//! `room`: a chat room over WebSockets, one object per room, that keeps its last
//! [`HISTORY_MAX`] messages.
//!
//! - `GET /` → the room's page (`room.html`: HTML with an inline script, no build step), which
//!   joins the room, shows its messages in order and sends what is typed:
//!   `http://127.0.0.1:7451/room/lobby/` in a browser.
//! - `GET /ws` with a WebSocket upgrade → joins the room; the host holds the socket. The socket
//!   gets the kept history first, oldest first, one message each, then every message posted
//!   from then on. Without an upgrade: 426.
//! - `GET /messages` → 200 with the kept history as JSON, oldest first:
//!   `[{"seq": 1, "text": "hello", "at": 1767225600000}, ...]`.
//!
//! What a socket may send:
//!
//! - A text of 1 to [`TEXT_BYTES_MAX`] bytes is posted: numbered with the next `seq`, kept, and
//!   sent to every socket of the room, the sender's too, as `{"seq": n, "text": t, "at": ms}`
//!   (`at` by the host's clock, in ms since the Unix epoch). Every socket gets the messages in
//!   `seq` order, none missing from its join on.
//! - An empty text, or a longer one, is refused: the sender alone gets `{"error": "..."}`, and
//!   nothing is kept. (A message over the host's bound, 1 MiB, closes its socket with 1009
//!   before the room sees it.)
//! - `ping` is answered `pong` by the host without waking the room (its auto-response,
//!   [`KEEP_ALIVE`]): keep-alives cost no activation however many sockets send them, and an
//!   evicted room stays evicted. So a text that is exactly `ping` is never posted; the page
//!   says so instead of sending it.
//! - A binary message closes the socket with 1003, unsupported data: a room is text.
//!
//! Hibernation: the room keeps nothing in memory. Its sockets are the host's, and the next
//! `seq` comes from storage, so a room evicted while its sockets stay open is built again by
//! the next message, which reaches every socket as before.
//!
//! Order: a post reads the last `seq`, writes, and sends to every socket without an await that
//! yields (storage calls other than `transaction` and `sync` never wait), so no other event of
//! the room runs in between: no two posts get the same `seq`, and each socket's queue gets them
//! in `seq` order. A join reads the history and accepts its socket in one such stretch too, so
//! a joiner misses no message and gets none twice. A message leaves once its write is durable
//! (the output gate): no client sees a message that a crash would lose.
//!
//! Storage: `msg/{seq:020}` → the message (`seq`, `text`, `at`), zero-padded so that key order
//! is `seq` order. A join reads the history with one `list`; a post writes its message and
//! deletes the one that falls out of the last [`HISTORY_MAX`], so a room holds at most that
//! many keys.

use http::{HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::body::Body;
use crate::error::Error;
use crate::host::{DurableObject, State, WebSocket, WebSocketMessage};
use crate::message::{BoxError, Response, StreamRequest, StreamResponse};
use crate::response;
use crate::storage::{self, ListOptions, Storage};

/// Messages a room keeps, and sends to a socket that joins; posting one more drops the oldest.
pub const HISTORY_MAX: u64 = 100;

/// Longest text a room posts, in bytes: a chat line, not a file. A room's storage stays under
/// 100 × 4 KiB, a message's JSON (at most 6 bytes a byte, escaped) far under the host's 1 MiB
/// bound, and a join's history far under a socket's 8 MiB queue bound.
pub const TEXT_BYTES_MAX: usize = 4096;

/// The keep-alive the host answers for the room, without waking it: a browser's script cannot
/// send WebSocket pings, so its keep-alive is a text message.
pub const KEEP_ALIVE: (&str, &str) = ("ping", "pong");

/// Close code of a socket that sent a binary message: unsupported data (RFC 6455 §7.4.1).
pub const CLOSE_UNSUPPORTED: u16 = 1003;

/// Prefix of the keys of messages.
const MESSAGE_PREFIX: &str = "msg/";

/// The room's page; its script's `TEXT_BYTES_MAX` is [`TEXT_BYTES_MAX`] (a test checks).
const PAGE: &str = include_str!("room.html");

/// A posted message: as it is kept, and (as JSON) as sockets and `GET /messages` get it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Its place in the room's one order: 1, 2, 3... with no gaps.
    pub seq: u64,
    pub text: String,
    /// When it was posted, by the host's clock: ms since the Unix epoch.
    pub at: u64,
}

impl Message {
    /// `{"seq": n, "text": t, "at": ms}`.
    pub fn to_json(&self) -> String {
        json!({ "seq": self.seq, "text": self.text, "at": self.at }).to_string()
    }
}

/// What posting a text does to a room, decided from its last `seq` alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Post {
    /// Keep `message`, delete the kept message numbered `dropped` (it falls out of the
    /// history), and send `message` to every socket.
    Accepted {
        message: Message,
        dropped: Option<u64>,
    },
    /// Keep nothing; the sender alone gets `{"error": why}`.
    Refused { why: String },
}

/// What posting `text` at `at_ms` does to a room whose last message is numbered `last_seq`
/// (0 for none).
pub fn post(last_seq: u64, text: String, at_ms: u64) -> Post {
    if text.is_empty() {
        let why = "an empty message is not posted".into();
        return Post::Refused { why };
    }
    if text.len() > TEXT_BYTES_MAX {
        let why = format!(
            "a message of {} bytes, over the room's limit of {TEXT_BYTES_MAX}",
            text.len()
        );
        return Post::Refused { why };
    }
    let seq = last_seq + 1;
    Post::Accepted {
        message: Message {
            seq,
            text,
            at: at_ms,
        },
        dropped: seq.checked_sub(HISTORY_MAX).filter(|&oldest| oldest > 0),
    }
}

/// The key of message `seq`: zero-padded, so that keys sort as the numbers do.
pub fn message_key(seq: u64) -> String {
    format!("{MESSAGE_PREFIX}{seq:020}")
}

/// The `room` class: see the module docs.
pub struct Room {
    /// All the room has: what it knows lives in storage and in the host's sockets.
    state: State,
}

impl Room {
    /// A room over the storage and sockets of `state`.
    pub fn new(state: State) -> Room {
        // Set by every activation; the host keeps it with the room's sockets, so it holds
        // while the room is evicted.
        state.set_web_socket_auto_response(Some(KEEP_ALIVE));
        Room { state }
    }

    /// `GET /ws`: accepts the socket and queues the history to it, before anything else can
    /// be sent to it (see the module docs on order).
    async fn join(&self, request: &StreamRequest) -> Result<StreamResponse, BoxError> {
        let history = history(self.state.storage()).await?;
        let socket = match self.state.accept_web_socket(request, &[]) {
            Ok(socket) => socket,
            Err(Error::InvalidArgument(why)) => {
                let why = format!("GET /ws joins the room over a WebSocket: {why}\n");
                return Ok(response::text(StatusCode::UPGRADE_REQUIRED, why).map(Body::from));
            }
            Err(Error::Overloaded(why)) => {
                let why = format!("the room is full: {why}\n");
                let full = response::text(StatusCode::SERVICE_UNAVAILABLE, why);
                return Ok(full.map(Body::from));
            }
            Err(error) => return Err(error.into()),
        };
        for message in &history {
            socket.send(message.to_json())?;
        }
        Ok(response::switching_protocols())
    }
}

impl DurableObject for Room {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        let answer = match (request.method(), request.uri().path()) {
            (&Method::GET, "/ws") => return self.join(&request).await,
            (&Method::GET, "/") => page(),
            (&Method::GET, "/messages") => {
                response::json(StatusCode::OK, &history(self.state.storage()).await?)
            }
            (_, "/" | "/ws" | "/messages") => {
                response::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
            }
            _ => response::text(
                StatusCode::NOT_FOUND,
                "no such route: use / (the page), /ws (a WebSocket) or /messages\n",
            ),
        };
        Ok(answer.map(Body::from))
    }

    async fn web_socket_message(
        &self,
        socket: WebSocket,
        message: WebSocketMessage,
    ) -> Result<(), BoxError> {
        let WebSocketMessage::Text(text) = message else {
            socket.close(CLOSE_UNSUPPORTED, "a room takes text messages only")?;
            return Ok(());
        };
        let storage = self.state.storage();
        let last_seq = last_seq(storage).await?;
        match post(last_seq, text, self.state.now_ms()) {
            Post::Refused { why } => {
                // Fails only when the socket is closing: then nobody is left to tell.
                let _ = socket.send(json!({ "error": why }).to_string());
            }
            Post::Accepted { message, dropped } => {
                storage.put(message_key(message.seq), &message).await?;
                if let Some(oldest) = dropped {
                    storage.delete(message_key(oldest)).await?;
                }
                let text = message.to_json();
                for socket in self.state.get_web_sockets(None) {
                    // A socket closing meanwhile refuses it; the others still get it.
                    let _ = socket.send(text.clone());
                }
            }
        }
        Ok(())
    }
}

/// `GET /`: the page, as HTML.
fn page() -> Response {
    let mut page = response::text(StatusCode::OK, PAGE);
    let html = HeaderValue::from_static("text/html; charset=utf-8");
    page.headers_mut().insert(header::CONTENT_TYPE, html);
    page
}

/// The kept messages, oldest first: the last [`HISTORY_MAX`], read with one `list`.
async fn history(storage: &Storage) -> Result<Vec<Message>, storage::Error> {
    let mut messages = newest(storage, HISTORY_MAX as usize).await?;
    messages.reverse();
    Ok(messages)
}

/// The number of the last message posted; 0 before the first.
async fn last_seq(storage: &Storage) -> Result<u64, storage::Error> {
    Ok(newest(storage, 1).await?.first().map_or(0, |last| last.seq))
}

/// Up to `count` messages, newest first.
async fn newest(storage: &Storage, count: usize) -> Result<Vec<Message>, storage::Error> {
    let options = ListOptions {
        prefix: Some(MESSAGE_PREFIX.into()),
        reverse: true,
        limit: Some(count),
        ..ListOptions::default()
    };
    let entries = storage.list::<Message>(&options).await?;
    Ok(entries.into_iter().map(|(_, message)| message).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(post: Post) -> (Message, Option<u64>) {
        match post {
            Post::Accepted { message, dropped } => (message, dropped),
            Post::Refused { why } => panic!("refused: {why}"),
        }
    }

    #[test]
    fn posts_are_numbered_after_the_last_and_drop_what_falls_out_of_the_history() {
        let (first, dropped) = accepted(post(0, "hello".into(), 7));
        let expected = Message {
            seq: 1,
            text: "hello".into(),
            at: 7,
        };
        assert_eq!((first, dropped), (expected, None));
        let (full, dropped) = accepted(post(HISTORY_MAX - 1, "a".into(), 8));
        assert_eq!(
            (full.seq, dropped),
            (HISTORY_MAX, None),
            "100 kept, none drops"
        );
        let (next, dropped) = accepted(post(HISTORY_MAX, "b".into(), 9));
        assert_eq!((next.seq, dropped), (HISTORY_MAX + 1, Some(1)));
        let (late, dropped) = accepted(post(1_000_000, "c".into(), 9));
        assert_eq!(
            (late.seq, dropped),
            (1_000_001, Some(1_000_001 - HISTORY_MAX))
        );
    }

    #[test]
    fn empty_and_over_long_texts_are_refused_with_the_rule() {
        let longest = "é".repeat(TEXT_BYTES_MAX / 2);
        assert!(matches!(post(3, longest, 0), Post::Accepted { .. }));
        let Post::Refused { why } = post(3, "x".repeat(TEXT_BYTES_MAX + 1), 0) else {
            panic!("an over-long text was posted");
        };
        assert!(why.contains("4097 bytes") && why.contains("4096"), "{why}");
        assert!(matches!(post(3, String::new(), 0), Post::Refused { .. }));
    }

    #[test]
    fn keys_sort_as_their_numbers() {
        let seqs = [1, 2, 9, 10, 99, 100, 101, 1_000_000, u64::MAX];
        let keys: Vec<String> = seqs.iter().map(|&seq| message_key(seq)).collect();
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "{keys:?}");
        assert_eq!(message_key(42), "msg/00000000000000000042");
    }

    #[test]
    fn messages_go_out_as_the_json_pages_read() {
        let message = Message {
            seq: 3,
            text: "a \"quoted\" <b>".into(),
            at: 1_767_225_600_000,
        };
        let sent: serde_json::Value = serde_json::from_str(&message.to_json()).unwrap();
        let expected = json!({ "seq": 3, "text": "a \"quoted\" <b>", "at": 1_767_225_600_000u64 });
        assert_eq!(sent, expected);
    }

    #[test]
    fn the_page_checks_the_rooms_bound() {
        let bound = format!("const TEXT_BYTES_MAX = {TEXT_BYTES_MAX};");
        assert!(PAGE.contains(&bound), "room.html must say {bound}");
        let keep_alive = format!("const KEEP_ALIVE = \"{}\";", KEEP_ALIVE.0);
        assert!(
            PAGE.contains(&keep_alive),
            "room.html must say {keep_alive}"
        );
    }
}
