//! WebSockets held by the host for objects (the hibernation model).
//!
//! An object accepts a WebSocket upgrade with [`State::accept_web_socket`](crate::State::accept_web_socket);
//! from then on the host holds the socket, not the object: the object may be evicted while its
//! sockets stay open, and the next event of a socket builds it again. What survives an eviction
//! lives here: the sockets with their tags and attachments ([`ObjectSockets`]), and the
//! auto-response that the host answers without waking the object.
//!
//! Each socket has an outbound queue drained by a pump task into its transport (the gateway's
//! WebSocket, or a capnp peer's `WebSocket` capability). A message the object sends after a
//! write waits in the queue until the write is durable (the output gate); a queue that passes
//! [`SocketLimits::queued_bytes_max`] (a peer that does not read) closes its socket with 1008,
//! so a slow reader costs the host a bounded amount of memory and slows only its own socket.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};

use bytes::Bytes;
use futures::future::LocalBoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
pub use crate::message::WebSocketMessage;
use crate::metrics::NamespaceMetrics;
use crate::storage::{ObjectStore, value};

/// Close code: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code: the host is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: a bound was passed (the socket's queue of unsent bytes).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: a message over the size bound.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: the object was reset (an error in the object or its storage).
pub const CLOSE_INTERNAL: u16 = 1011;

/// Largest attachment of one socket, in bytes (as encoded): it is kept in the host's memory
/// for the life of the socket, also while the object is evicted.
pub const ATTACHMENT_BYTES_MAX: usize = 16 << 10;
/// Most tags of one socket, and the longest tag in bytes: tags are kept for the socket's life
/// and matched on every `get_web_sockets`.
pub const TAGS_MAX: usize = 10;
pub const TAG_BYTES_MAX: usize = 256;
/// Longest close reason, in bytes: a close frame's payload is at most 125 bytes, 2 of them
/// the code.
pub const CLOSE_REASON_BYTES_MAX: usize = 123;

/// The bounds on an object's WebSockets (part of [`HostLimits`](crate::HostLimits)).
#[derive(Clone, Copy, Debug)]
pub struct SocketLimits {
    /// Largest message, either way (default 1 MiB). A peer's larger message closes its socket
    /// with 1009; an object's is refused.
    pub message_bytes_max: usize,
    /// Most sockets one object holds (default 32,768); past it `accept_web_socket` fails.
    pub sockets_per_object_max: usize,
    /// Most bytes queued to one socket and not yet taken by its peer (default 8 MiB); past it
    /// the socket is closed with 1008.
    pub queued_bytes_max: usize,
}

impl Default for SocketLimits {
    fn default() -> SocketLimits {
        SocketLimits {
            message_bytes_max: 1 << 20,
            sockets_per_object_max: 32_768,
            queued_bytes_max: 8 << 20,
        }
    }
}

/// Where a socket's outbound frames go: the transport's half (the gateway's WebSocket, or a
/// capnp peer's `WebSocket`). Driven by the socket's pump alone, one frame at a time; a send
/// completes when the transport took the frame (its own bounded buffer, or capnp's flow
/// control window), which is how a slow peer slows its pump and fills its queue.
pub trait SocketSink {
    /// Sends one message. `more` says that another frame is queued behind it, so that the
    /// sink may buffer this one rather than flush it alone; a sink flushes when it is false.
    fn send(
        &mut self,
        message: WebSocketMessage,
        more: bool,
    ) -> LocalBoxFuture<'_, Result<(), String>>;
    /// Sends a close frame; nothing is sent after it.
    fn close(&mut self, code: u16, reason: String) -> LocalBoxFuture<'_, Result<(), String>>;
}

/// One outbound frame, with the write it must wait for.
struct Outbound {
    frame: Frame,
    /// The store of the activation that sent it, and its written sequence number then: the
    /// frame leaves only once that write is durable.
    durable: Option<(Rc<ObjectStore>, u64)>,
}

enum Frame {
    Message(WebSocketMessage),
    Close(u16, String),
}

/// Where a socket is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    /// A close frame is queued (by the object, the host, or as the reply to the peer's):
    /// nothing more is sent, nor delivered.
    Closing,
}

/// One accepted socket: what the host keeps of it.
pub struct SocketCore {
    /// Unique in the host, for equality and logs.
    serial: u64,
    tags: Vec<String>,
    attachment: RefCell<Option<Bytes>>,
    phase: Cell<Phase>,
    queue: RefCell<VecDeque<Outbound>>,
    /// Bytes of the messages in `queue`.
    queued_bytes: Cell<usize>,
    /// Wakes the pump when `queue` gets a frame.
    ready: tokio::sync::Notify,
    /// Set once the transport attached its sink and the pump runs.
    pumping: Cell<bool>,
    /// Set when the peer is gone: the pump stops.
    lost: Cell<bool>,
    /// Set when a close frame was queued (by the object, the host, or as an answer): the
    /// socket ended with a close, not by being lost.
    close_queued: Cell<bool>,
    /// Why the host ended the socket on its own (its queue overflowed, its peer could not be
    /// written to), until the object is told with `web_socket_error`.
    untold: RefCell<Option<String>>,
    /// Wakes the transport's reader when the socket starts closing, so that it stops waiting
    /// for a peer that never answers the close.
    closing: tokio::sync::Notify,
    /// Set when the pump ended: what it was to send is sent (or cannot be).
    pump_ended: Cell<bool>,
    /// Wakes who waits for the pump to end.
    pumped: tokio::sync::Notify,
    /// The object's sockets, to leave them at the close. Weak: they own this socket.
    owner: Weak<ObjectSockets>,
    limits: SocketLimits,
}

impl SocketCore {
    /// Queues `frame` (see the module docs); closes the socket with 1008 past the bound.
    fn push(self: &Rc<Self>, frame: Frame, durable: Option<(Rc<ObjectStore>, u64)>) {
        if let Frame::Message(message) = &frame {
            let queued = self.queued_bytes.get() + message.len();
            if queued > self.limits.queued_bytes_max {
                tracing::debug!(socket = self.serial, queued, "WebSocket queue full: closed");
                self.queue.borrow_mut().clear();
                self.queued_bytes.set(0);
                let why = "the peer does not read fast enough";
                self.close_now(CLOSE_POLICY, why);
                *self.untold.borrow_mut() = Some(format!("closed with 1008: {why}"));
                return;
            }
            self.queued_bytes.set(queued);
        }
        self.queue
            .borrow_mut()
            .push_back(Outbound { frame, durable });
        self.ready.notify_one();
    }

    /// Queues a close frame after what is queued, and leaves the object's sockets. Idempotent.
    fn close_now(self: &Rc<Self>, code: u16, reason: &str) {
        self.close_after(code, reason, None);
    }

    /// [`SocketCore::close_now`], the frame leaving once the write `durable` names is.
    fn close_after(
        self: &Rc<Self>,
        code: u16,
        reason: &str,
        durable: Option<(Rc<ObjectStore>, u64)>,
    ) {
        if self.phase.replace(Phase::Closing) == Phase::Closing {
            return;
        }
        self.close_queued.set(true);
        self.closing.notify_waiters();
        let mut reason = reason.to_owned();
        truncate_utf8(&mut reason, CLOSE_REASON_BYTES_MAX);
        self.queue.borrow_mut().push_back(Outbound {
            frame: Frame::Close(code, reason),
            durable,
        });
        self.ready.notify_one();
        if let Some(owner) = self.owner.upgrade() {
            owner.remove(self.serial);
        }
    }

    /// Resolves once the socket is closing (a close queued, or the peer lost).
    pub async fn until_closing(&self) {
        loop {
            let notified = self.closing.notified();
            if self.is_closing() {
                return;
            }
            notified.await;
        }
    }

    /// Whether the peer is gone (see [`SocketCore::lost`]).
    pub fn is_lost(&self) -> bool {
        self.lost.get()
    }

    /// Resolves once the pump has sent what was queued, the close frame included, or stopped:
    /// a transport whose peer's stream ended waits for it before it lets the connection go.
    pub async fn until_pumped(&self) {
        loop {
            let pumped = self.pumped.notified();
            if self.pump_ended.get() || !self.pumping.get() {
                return;
            }
            pumped.await;
        }
    }

    /// Whether the socket ended with a close frame queued (rather than being lost).
    pub fn close_queued(&self) -> bool {
        self.close_queued.get()
    }

    /// Why the host ended the socket on its own, if it did and the object was not told yet.
    pub fn take_untold(&self) -> Option<String> {
        self.untold.borrow_mut().take()
    }

    /// Whether a close was queued, or the socket is gone.
    pub fn is_closing(&self) -> bool {
        self.phase.get() == Phase::Closing
    }

    /// Attaches the transport's sink and starts the pump, which runs until the close frame is
    /// sent or the sink fails. What was queued before goes first.
    pub fn attach(self: &Rc<Self>, sink: Box<dyn SocketSink>) {
        if self.pumping.replace(true) {
            return;
        }
        tokio::task::spawn_local(pump(self.clone(), sink));
    }

    /// The peer went away (or its transport failed): the socket leaves its object at once, and
    /// nothing queued is sent.
    pub fn lost(self: &Rc<Self>) {
        self.phase.set(Phase::Closing);
        self.lost.set(true);
        self.closing.notify_waiters();
        self.queue.borrow_mut().clear();
        self.queued_bytes.set(0);
        self.ready.notify_one();
        if let Some(owner) = self.owner.upgrade() {
            owner.remove(self.serial);
        }
    }

    /// The largest message either way.
    pub fn message_bytes_max(&self) -> usize {
        self.limits.message_bytes_max
    }

    /// The auto-response to `message`, if the object set one that matches.
    pub fn auto_response(&self, message: &WebSocketMessage) -> Option<String> {
        let WebSocketMessage::Text(text) = message else {
            return None;
        };
        let owner = self.owner.upgrade()?;
        let pair = owner.auto_response.borrow();
        let (request, response) = pair.as_deref()?;
        (request == text).then(|| response.clone())
    }

    /// Sends `text` from the host, in order with the object's messages (auto-responses).
    pub fn send_from_host(self: &Rc<Self>, text: String) {
        if !self.is_closing() {
            self.push(Frame::Message(WebSocketMessage::Text(text)), None);
        }
    }

    /// Replies to the peer's close, unless a close was already queued.
    pub fn reply_close(self: &Rc<Self>, code: u16, reason: &str) {
        // 1005 and 1006 are never sent in a close frame: they mean "no code".
        let code = if matches!(code, 1005 | 1006) {
            CLOSE_NORMAL
        } else {
            code
        };
        self.close_now(code, reason);
    }
}

thread_local! {
    /// Pumps running on this thread's event loop: a shutdown lets them hand their close
    /// frames to their transports before the event loop stops.
    static PUMPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Pumps running on this thread (see `PUMPS`).
pub(crate) fn pumps_running() -> usize {
    PUMPS.with(std::cell::Cell::get)
}

/// Counts a pump while it runs, and says when it ended.
struct Pumping(Rc<SocketCore>);

impl Pumping {
    fn start(socket: &Rc<SocketCore>) -> Pumping {
        PUMPS.with(|pumps| pumps.set(pumps.get() + 1));
        Pumping(socket.clone())
    }
}

impl Drop for Pumping {
    fn drop(&mut self) {
        PUMPS.with(|pumps| pumps.set(pumps.get() - 1));
        self.0.pump_ended.set(true);
        self.0.pumped.notify_waiters();
    }
}

/// Sends the socket's queued frames to `sink`, each once the write before it is durable.
async fn pump(socket: Rc<SocketCore>, mut sink: Box<dyn SocketSink>) {
    let _pumping = Pumping::start(&socket);
    loop {
        let next = socket.queue.borrow_mut().pop_front();
        let Some(outbound) = next else {
            if socket.lost.get() {
                return;
            }
            socket.ready.notified().await;
            continue;
        };
        if let Some((store, seq)) = outbound.durable
            && store.wait_durable(seq).await.is_err()
        {
            // The write the frame depends on was lost: the object was reset. Nothing sent
            // after it may leave either.
            socket.lost();
            let _ = sink
                .close(CLOSE_INTERNAL, "the object was reset".into())
                .await;
            return;
        }
        let sent = match outbound.frame {
            Frame::Message(message) => {
                socket
                    .queued_bytes
                    .set(socket.queued_bytes.get() - message.len());
                // Another frame that can leave at once: this one may wait in the sink's buffer.
                let more = socket.queue.borrow().front().is_some_and(|next| {
                    next.durable
                        .as_ref()
                        .is_none_or(|(store, seq)| store.is_durable(*seq))
                });
                sink.send(message, more).await
            }
            Frame::Close(code, reason) => {
                let _ = sink.close(code, reason).await;
                return;
            }
        };
        if let Err(error) = sent {
            tracing::debug!(socket = socket.serial, %error, "WebSocket send failed");
            if !socket.close_queued.get() {
                *socket.untold.borrow_mut() = Some(format!("sending failed: {error}"));
            }
            socket.lost();
            return;
        }
    }
}

/// The sockets of one object, kept by its namespace while any is open, so that they outlive
/// the object's activations.
pub struct ObjectSockets {
    sockets: RefCell<Vec<Rc<SocketCore>>>,
    /// Upgrades offered to the object by calls in progress, with their tokens (see
    /// [`UpgradeToken`]): a few at a time, so a list (every object has one of these, sockets
    /// or not, and an empty list is smaller than an empty map).
    offered: RefCell<Vec<(u64, Rc<Offer>)>>,
    /// A text message the host answers itself, and the answer (`set_web_socket_auto_response`);
    /// boxed, as few objects set one.
    auto_response: RefCell<Option<Box<(String, String)>>>,
    limits: SocketLimits,
    /// The namespace's map of objects with sockets, which holds this while it has any. Weak:
    /// the namespace outlives it.
    registry: Weak<SocketRegistry>,
    key: [u8; 32],
    /// The namespace's metrics: the sockets held, and the refusals.
    metrics: NamespaceMetrics,
}

/// A namespace's objects that hold sockets, by ID.
pub type SocketRegistry = RefCell<HashMap<[u8; 32], Rc<ObjectSockets>>>;

/// A WebSocket upgrade offered to an object by the transport of a call: the object accepts it
/// or not, and the transport learns which when the call returns.
#[derive(Default)]
pub struct Offer {
    accepted: RefCell<Option<Rc<SocketCore>>>,
}

impl Offer {
    /// The socket the object accepted, if it did; taken, so it is handed on once.
    pub fn accepted(&self) -> Option<Rc<SocketCore>> {
        self.accepted.borrow_mut().take()
    }
}

/// The mark, in a request's extensions, of a WebSocket upgrade the caller can complete.
/// Objects pass the request to [`State::accept_web_socket`](crate::State::accept_web_socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpgradeToken(pub(crate) u64);

static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_serial() -> u64 {
    NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl ObjectSockets {
    /// The sockets of the object `key`: those registered, or a new empty set.
    pub fn of(
        registry: &Rc<SocketRegistry>,
        key: [u8; 32],
        limits: SocketLimits,
        metrics: &NamespaceMetrics,
    ) -> Rc<Self> {
        if let Some(sockets) = registry.borrow().get(&key) {
            return sockets.clone();
        }
        Rc::new(ObjectSockets {
            sockets: RefCell::default(),
            offered: RefCell::default(),
            auto_response: RefCell::default(),
            limits,
            registry: Rc::downgrade(registry),
            key,
            metrics: metrics.clone(),
        })
    }

    /// Offers an upgrade to the object for one call; the token goes in the request.
    pub fn offer(&self) -> (UpgradeToken, Rc<Offer>) {
        let token = next_serial();
        let offer = Rc::new(Offer::default());
        self.offered.borrow_mut().push((token, offer.clone()));
        (UpgradeToken(token), offer)
    }

    /// Withdraws an offer once its call returned.
    pub fn withdraw(&self, token: UpgradeToken) {
        self.take_offer(token);
    }

    /// Accepts the upgrade offered under `token`, with `tags`.
    pub fn accept(
        self: &Rc<Self>,
        token: UpgradeToken,
        tags: &[&str],
    ) -> Result<Rc<SocketCore>, Error> {
        check_tags(tags)?;
        let offer = self.take_offer(token).ok_or_else(|| {
            Error::InvalidArgument(
                "the request is not a WebSocket upgrade of this call, or it was accepted already"
                    .into(),
            )
        })?;
        let count = self.sockets.borrow().len();
        if count >= self.limits.sockets_per_object_max {
            self.metrics.web_socket_refused();
            return Err(Error::Overloaded(format!(
                "the object holds {count} WebSockets (sockets_per_object_max)"
            )));
        }
        let socket = Rc::new(SocketCore {
            serial: next_serial(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            attachment: RefCell::default(),
            phase: Cell::new(Phase::Open),
            queue: RefCell::default(),
            queued_bytes: Cell::new(0),
            ready: tokio::sync::Notify::new(),
            pumping: Cell::new(false),
            lost: Cell::new(false),
            close_queued: Cell::new(false),
            untold: RefCell::default(),
            closing: tokio::sync::Notify::new(),
            pump_ended: Cell::new(false),
            pumped: tokio::sync::Notify::new(),
            owner: Rc::downgrade(self),
            limits: self.limits,
        });
        self.sockets.borrow_mut().push(socket.clone());
        self.metrics.add_web_sockets(1);
        if count == 0
            && let Some(registry) = self.registry.upgrade()
        {
            registry.borrow_mut().insert(self.key, self.clone());
        }
        *offer.accepted.borrow_mut() = Some(socket.clone());
        Ok(socket)
    }

    /// The open sockets, those with `tag` if given, in order of acceptance.
    pub fn list(&self, tag: Option<&str>) -> Vec<Rc<SocketCore>> {
        let sockets = self.sockets.borrow();
        sockets
            .iter()
            .filter(|s| tag.is_none_or(|tag| s.tags.iter().any(|t| t == tag)))
            .cloned()
            .collect()
    }

    pub fn set_auto_response(&self, pair: Option<(String, String)>) {
        *self.auto_response.borrow_mut() = pair.map(Box::new);
    }

    /// Takes the offer of `token` out of the list, if it is there.
    fn take_offer(&self, token: UpgradeToken) -> Option<Rc<Offer>> {
        let mut offered = self.offered.borrow_mut();
        let at = offered.iter().position(|(t, _)| *t == token.0)?;
        Some(offered.swap_remove(at).1)
    }

    /// Closes every socket with `code`: at a reset (1011) or a shutdown (1001).
    pub fn close_all(&self, code: u16, reason: &str) {
        let sockets = self.sockets.borrow().clone();
        for socket in sockets {
            socket.close_now(code, reason);
        }
    }

    fn remove(&self, serial: u64) {
        let empty = {
            let mut sockets = self.sockets.borrow_mut();
            let before = sockets.len();
            sockets.retain(|s| s.serial != serial);
            self.metrics
                .add_web_sockets(sockets.len() as i64 - before as i64);
            sockets.is_empty()
        };
        if empty && let Some(registry) = self.registry.upgrade() {
            let mut registry = registry.borrow_mut();
            let ours = registry
                .get(&self.key)
                .is_some_and(|s| std::ptr::eq(&**s, self));
            if ours {
                registry.remove(&self.key);
            }
        }
    }
}

fn check_tags(tags: &[&str]) -> Result<(), Error> {
    if tags.len() > TAGS_MAX {
        return Err(Error::InvalidArgument(format!(
            "{} tags, over the limit of {TAGS_MAX} (TAGS_MAX)",
            tags.len()
        )));
    }
    if let Some(tag) = tags.iter().find(|t| t.len() > TAG_BYTES_MAX) {
        return Err(Error::InvalidArgument(format!(
            "a tag of {} bytes, over the limit of {TAG_BYTES_MAX} (TAG_BYTES_MAX)",
            tag.len()
        )));
    }
    Ok(())
}

fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// A WebSocket the host holds for an object, as the object sees it: in events, from
/// [`State::accept_web_socket`](crate::State::accept_web_socket) and
/// [`State::get_web_sockets`](crate::State::get_web_sockets). Valid across evictions: the
/// socket is the host's.
#[derive(Clone)]
pub struct WebSocket {
    socket: Rc<SocketCore>,
    /// The store of the activation that holds this handle: a message sent after its writes
    /// waits for them.
    store: Rc<ObjectStore>,
}

impl WebSocket {
    pub(crate) fn new(socket: Rc<SocketCore>, store: Rc<ObjectStore>) -> WebSocket {
        WebSocket { socket, store }
    }

    /// Sends a message. It leaves once every write the object made before is durable (the
    /// output gate), after the messages sent before it. Fails when the socket is closing or
    /// the message is over [`SocketLimits::message_bytes_max`].
    pub fn send(&self, message: impl Into<WebSocketMessage>) -> Result<(), Error> {
        let message = message.into();
        let max = self.socket.limits.message_bytes_max;
        if message.len() > max {
            return Err(Error::InvalidArgument(format!(
                "a WebSocket message of {} bytes, over the limit of {max} (message_bytes_max)",
                message.len()
            )));
        }
        if self.socket.is_closing() {
            return Err(Error::InvalidArgument("the WebSocket is closed".into()));
        }
        let seq = self.store.written_seq();
        self.socket
            .push(Frame::Message(message), Some((self.store.clone(), seq)));
        Ok(())
    }

    /// Closes the socket with `code` (a code of RFC 6455 that an endpoint may send, or 3000 to
    /// 4999 for the application's own) and `reason` (cut to 123 bytes), after the messages sent
    /// before, and once the writes before it are durable, as a message would. The object gets
    /// no `web_socket_close` for a close of its own. Closing a closed socket does nothing.
    pub fn close(&self, code: u16, reason: &str) -> Result<(), Error> {
        // 1004 is reserved, and 1005, 1006 and 1015 are never sent: they mean no code, a
        // connection lost, and a failed TLS handshake.
        if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
            return Err(Error::InvalidArgument(format!(
                "close code {code}: an object closes with 1000-1003, 1007-1014 or 3000-4999"
            )));
        }
        let seq = self.store.written_seq();
        self.socket
            .close_after(code, reason, Some((self.store.clone(), seq)));
        Ok(())
    }

    /// The tags the socket was accepted with.
    pub fn tags(&self) -> &[String] {
        &self.socket.tags
    }

    /// Keeps `value` with the socket (at most 16 KiB encoded), replacing what
    /// was kept. It survives the object's eviction, not the host's restart.
    pub fn serialize_attachment<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        let encoded = value::encode(value).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if encoded.len() > ATTACHMENT_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "an attachment of {} bytes, over the limit of {ATTACHMENT_BYTES_MAX} \
                 (ATTACHMENT_BYTES_MAX)",
                encoded.len()
            )));
        }
        *self.socket.attachment.borrow_mut() = Some(encoded);
        Ok(())
    }

    /// Keeps `bytes` as they are with the socket (at most 16 KiB): the attachment of a class
    /// whose instance lives elsewhere (an external class's `ObjectSocket.setAttachment`).
    pub(crate) fn set_attachment_bytes(&self, bytes: Bytes) -> Result<(), Error> {
        if bytes.len() > ATTACHMENT_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "an attachment of {} bytes, over the limit of {ATTACHMENT_BYTES_MAX} \
                 (ATTACHMENT_BYTES_MAX)",
                bytes.len()
            )));
        }
        *self.socket.attachment.borrow_mut() = Some(bytes);
        Ok(())
    }

    /// The attachment's bytes as kept, if any.
    pub(crate) fn attachment_bytes(&self) -> Option<Bytes> {
        self.socket.attachment.borrow().clone()
    }

    /// The value kept with [`WebSocket::serialize_attachment`], if any.
    pub fn deserialize_attachment<T: DeserializeOwned>(&self) -> Result<Option<T>, Error> {
        let attachment = self.socket.attachment.borrow().clone();
        attachment
            .map(|bytes| value::decode(&bytes).map_err(|e| Error::InvalidArgument(e.to_string())))
            .transpose()
    }

    /// Whether the socket is closing or closed: sends fail.
    pub fn is_closed(&self) -> bool {
        self.socket.is_closing()
    }
}

impl PartialEq for WebSocket {
    fn eq(&self, other: &Self) -> bool {
        self.socket.serial == other.socket.serial
    }
}

impl Eq for WebSocket {}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("serial", &self.socket.serial)
            .field("tags", &self.socket.tags)
            .finish()
    }
}
