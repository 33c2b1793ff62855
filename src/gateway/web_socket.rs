//! WebSockets through the gateway: the handshake of an upgrade request (RFC 6455), and the
//! task that carries an accepted socket between the client's connection and the host.
//!
//! The protocol is tungstenite's, over the connection hyper hands over after the `101`: it
//! bounds incoming messages and frames (the host's `message_bytes_max`; past it the socket
//! closes with 1009), answers pings, and masks nothing (a server does not mask).

use std::time::Duration;

use futures::future::LocalBoxFuture;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, header};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::host::socket::CLOSE_TOO_BIG;
use crate::host::{HostSocket, SocketSink, WebSocketMessage};

/// How long a socket that is closing waits for the client's answering close frame before its
/// connection is dropped: a client that never answers must not hold the connection.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Bytes of outgoing frames tungstenite buffers before it writes them out: small messages of a
/// busy socket go out in a few writes rather than one each.
const WRITE_BUFFER_BYTES: usize = 32 << 10;

/// tungstenite's read buffer, allocated for every socket up front (its default is 128 KiB):
/// small, as most sockets of a room are idle most of the time; larger messages still pass.
const READ_BUFFER_BYTES: usize = 8 << 10;

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// The `Sec-WebSocket-Accept` of a valid WebSocket upgrade request (RFC 6455 §4.2.1: GET,
/// `Upgrade: websocket`, `Connection: upgrade`, version 13, a key); `None` when the request is
/// not one, and goes on as a plain request.
pub(super) fn accept_key(method: &Method, headers: &HeaderMap) -> Option<HeaderValue> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if method != Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
        || headers.get(header::SEC_WEBSOCKET_VERSION)? != "13"
    {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok()
}

/// Carries an accepted socket once hyper has switched the connection: sends what the object
/// sends (through the host's pump) and hands what the client sends to the host, one message at
/// a time (so a client that sends faster than its object handles is read no faster).
/// `slot` is the socket's place among the gateway's open sockets, held while it runs.
pub(super) async fn run<Slot: 'static>(upgrade: OnUpgrade, socket: HostSocket, slot: Slot) {
    let _slot = slot;
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            let _ = socket.failed(format!("the upgrade failed: {error}")).await;
            return;
        }
    };
    let max = socket.message_bytes_max();
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES);
    let stream =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let (sink, mut incoming) = stream.split();
    socket.attach(Box::new(Sink(sink)));
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            () = closed_for_long(&socket) => {
                let _ = socket.failed("the client did not answer the close".into()).await;
                break;
            }
        };
        let outcome = match next {
            None => {
                // After a close the host queued (a message too big, say), the peer's stream
                // may end before the close frame left: it leaves first.
                let _ = tokio::time::timeout(CLOSE_WAIT, socket.until_close_sent()).await;
                let _ = socket.failed("the client went away".into()).await;
                break;
            }
            Some(Ok(Message::Text(text))) => {
                let text = WebSocketMessage::Text(text.as_str().to_owned());
                socket.receive(text).await
            }
            Some(Ok(Message::Binary(data))) => socket.receive(WebSocketMessage::Binary(data)).await,
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = match frame {
                    Some(frame) => (u16::from(frame.code), frame.reason.as_str().to_owned()),
                    None => (1005, String::new()),
                };
                socket.closed(code, reason).await
            }
            // Pings are answered by tungstenite; pongs and raw frames mean nothing here.
            Some(Ok(_)) => Ok(()),
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                let why = format!("a message of {size} bytes, over the limit of {max_size}");
                socket.refuse(CLOSE_TOO_BIG, why).await
            }
            Some(Err(error)) => {
                let _ = socket.failed(error.to_string()).await;
                break;
            }
        };
        if let Err(error) = outcome {
            // The object could not take the event (reset, or the host is shutting down): the
            // socket is closed by then, or is lost now.
            tracing::debug!(%error, "WebSocket event not delivered");
            let _ = socket.failed(error.to_string()).await;
        }
    }
}

/// Resolves [`CLOSE_WAIT`] after the socket began closing.
async fn closed_for_long(socket: &HostSocket) {
    socket.until_closing().await;
    tokio::time::sleep(CLOSE_WAIT).await;
}

/// The client's half of the connection, as the host's pump drives it.
struct Sink(SplitSink<Socket, Message>);

impl SocketSink for Sink {
    fn send(
        &mut self,
        message: WebSocketMessage,
        more: bool,
    ) -> LocalBoxFuture<'_, Result<(), String>> {
        let message = match message {
            WebSocketMessage::Text(text) => Message::Text(Utf8Bytes::from(text)),
            WebSocketMessage::Binary(data) => Message::Binary(data),
        };
        Box::pin(async move {
            // With more to come, the frame waits in the write buffer (up to its size) and
            // goes out with the next ones.
            let sent = if more {
                self.0.feed(message).await
            } else {
                self.0.send(message).await
            };
            sent.map_err(|e| e.to_string())
        })
    }

    fn close(&mut self, code: u16, reason: String) -> LocalBoxFuture<'_, Result<(), String>> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(reason),
        };
        Box::pin(async move {
            self.0
                .send(Message::Close(Some(frame)))
                .await
                .map_err(|e| e.to_string())
        })
    }
}
