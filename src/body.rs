//! Bodies of requests and responses that may be streamed: [`Body`], a frame-by-frame
//! [`http_body::Body`] of [`Bytes`] that is, in the simple case, one whole buffer.
//!
//! A streamed body flows through a [`BodySender`] with a bound on the bytes it holds: the writer
//! waits (backpressure) while the reader is behind, so a body of any size passes through the
//! host in bounded memory.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

/// As [`crate::BoxError`] (this file is below the one that names it).
type BoxError = Box<dyn std::error::Error>;

/// Bytes a [`Body::channel`] holds before its writer waits. One frame is always let in, however
/// large, so that a writer never deadlocks on a frame bigger than the bound.
pub const CHANNEL_BYTES_MAX: usize = 256 << 10;

/// A request or response body: whole, or a stream of frames.
pub struct Body {
    kind: Kind,
    /// Largest size [`Body::bytes`] collects: set by whoever made the body (the gateway's body
    /// limit, the wire's message size), as the bound of a whole-body read of it.
    whole_bytes_max: usize,
}

enum Kind {
    /// The whole body; `None` once read.
    Full(Option<Bytes>),
    Channel(Receiver),
    /// Any other body; not `Send`, as nothing on the event loop needs to be.
    Stream(Pin<Box<dyn http_body::Body<Data = Bytes, Error = BoxError>>>),
}

/// A whole-body read of a body over its bound ([`Body::bytes`]).
#[derive(Debug, thiserror::Error)]
#[error("the body is over {max} bytes")]
pub struct BodyTooLarge {
    /// The bound it passed.
    pub max: usize,
}

/// The writer of a body stream ended without [`BodySender::finish`]: the body broke off.
#[derive(Debug, thiserror::Error)]
#[error("the body broke off: {0}")]
pub struct BodyBroken(pub String);

impl Body {
    /// An empty body.
    pub fn empty() -> Body {
        Body::full(Bytes::new())
    }

    /// A whole body.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body {
            kind: Kind::Full(Some(bytes.into())),
            whole_bytes_max: usize::MAX,
        }
    }

    /// A body read from any `http_body::Body` of `Bytes` (hyper's `Incoming`, a `Full`...).
    pub fn from_stream<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        Body {
            kind: Kind::Stream(Box::pin(body.map_err(Into::into))),
            whole_bytes_max: usize::MAX,
        }
    }

    /// A streamed body and its writer. The writer's `send` waits while the body holds
    /// [`CHANNEL_BYTES_MAX`] bytes not yet read; the body ends at [`BodySender::finish`], and
    /// breaks off with an error if the writer is dropped before.
    pub fn channel() -> (BodySender, Body) {
        let shared = Rc::new(RefCell::new(Channel::default()));
        let body = Body {
            kind: Kind::Channel(Receiver(shared.clone())),
            whole_bytes_max: usize::MAX,
        };
        (BodySender(Some(shared)), body)
    }

    /// This body with `max` as the bound of [`Body::bytes`].
    pub fn with_whole_bytes_max(mut self, max: usize) -> Body {
        self.whole_bytes_max = max;
        self
    }

    /// The bound of [`Body::bytes`].
    pub fn whole_bytes_max(&self) -> usize {
        self.whole_bytes_max
    }

    /// The whole body, if it is one buffer (no stream to read).
    pub fn as_full(&self) -> Option<&Bytes> {
        match &self.kind {
            Kind::Full(bytes) => bytes.as_ref(),
            _ => None,
        }
    }

    /// Reads the whole body. Fails with [`BodyTooLarge`] as soon as it passes its bound
    /// ([`Body::with_whole_bytes_max`]), and with the stream's error if it broke off.
    pub async fn bytes(self) -> Result<Bytes, BoxError> {
        let max = self.whole_bytes_max;
        let mut body = self;
        if let Kind::Full(bytes) = &mut body.kind {
            let bytes = bytes.take().unwrap_or_default();
            if bytes.len() > max {
                return Err(BodyTooLarge { max }.into());
            }
            return Ok(bytes);
        }
        // A body that announces more than the bound (a Content-Length) is refused unread.
        if http_body::Body::size_hint(&body).lower() > max as u64 {
            return Err(BodyTooLarge { max }.into());
        }
        let mut first: Option<Bytes> = None;
        let mut joined = BytesMut::new();
        let mut len = 0usize;
        while let Some(chunk) = body.chunk().await {
            let chunk = chunk?;
            len += chunk.len();
            if len > max {
                return Err(BodyTooLarge { max }.into());
            }
            match first.take() {
                None if joined.is_empty() => first = Some(chunk),
                previous => {
                    if let Some(previous) = previous {
                        joined.extend_from_slice(&previous);
                    }
                    joined.extend_from_slice(&chunk);
                }
            }
        }
        // A body that came in one chunk is handed on without a copy.
        Ok(first.unwrap_or_else(|| joined.freeze()))
    }

    /// The next chunk of data, skipping trailers; `None` at the end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            match self.frame().await? {
                Ok(frame) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => return Some(Ok(data)),
                    Err(_trailers) => continue,
                },
                Err(error) => return Some(Err(error)),
            }
        }
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::empty()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full(bytes) => f.debug_tuple("Body::Full").field(bytes).finish(),
            Kind::Channel(_) | Kind::Stream(_) => f.write_str("Body::Stream"),
        }
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body::full(bytes)
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Body {
        Body::full(bytes)
    }
}

impl From<String> for Body {
    fn from(text: String) -> Body {
        Body::full(text)
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Body {
        Body::full(text)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Channel(receiver) => receiver
                .poll_chunk(cx)
                .map(|c| c.map(|c| c.map(Frame::data))),
            Kind::Stream(stream) => stream.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Channel(receiver) => receiver.is_end(),
            Kind::Stream(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Channel(_) => SizeHint::default(),
            Kind::Stream(stream) => stream.size_hint(),
        }
    }
}

/// What the two ends of a body channel share.
#[derive(Default)]
struct Channel {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    held: usize,
    /// Set by `finish`: the body ends once `chunks` are read.
    finished: bool,
    /// Set when the writer went away without `finish`, or aborted.
    broken: Option<String>,
    /// Set when the body was dropped: sends fail.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

struct Receiver(Rc<RefCell<Channel>>);

impl Receiver {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let mut channel = self.0.borrow_mut();
        if let Some(chunk) = channel.chunks.pop_front() {
            channel.held -= chunk.len();
            if let Some(writer) = channel.writer.take() {
                writer.wake();
            }
            return Poll::Ready(Some(Ok(chunk)));
        }
        if channel.finished {
            return Poll::Ready(None);
        }
        if let Some(reason) = &channel.broken {
            return Poll::Ready(Some(Err(BodyBroken(reason.clone()).into())));
        }
        channel.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end(&self) -> bool {
        let channel = self.0.borrow();
        channel.finished && channel.chunks.is_empty()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut channel = self.0.borrow_mut();
        channel.reader_gone = true;
        channel.chunks.clear();
        channel.held = 0;
        if let Some(writer) = channel.writer.take() {
            writer.wake();
        }
    }
}

/// The writer of a [`Body::channel`].
pub struct BodySender(Option<Rc<RefCell<Channel>>>);

/// The body's reader went away: what is sent now is read by no one.
#[derive(Debug, thiserror::Error)]
#[error("the body's reader went away")]
pub struct BodyClosed;

impl BodySender {
    /// Sends one chunk, after waiting while the body holds its bound of unread bytes.
    pub async fn send(&mut self, chunk: Bytes) -> Result<(), BodyClosed> {
        let shared = self.0.as_ref().ok_or(BodyClosed)?.clone();
        std::future::poll_fn(|cx| {
            let mut channel = shared.borrow_mut();
            if channel.reader_gone {
                return Poll::Ready(Err(BodyClosed));
            }
            if channel.held > 0 && channel.held + chunk.len() > CHANNEL_BYTES_MAX {
                channel.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        })
        .await?;
        if chunk.is_empty() {
            return Ok(());
        }
        let mut channel = shared.borrow_mut();
        channel.held += chunk.len();
        channel.chunks.push_back(chunk);
        if let Some(reader) = channel.reader.take() {
            reader.wake();
        }
        Ok(())
    }

    /// Whether the body's reader went away.
    pub fn is_closed(&self) -> bool {
        self.0.as_ref().is_none_or(|c| c.borrow().reader_gone)
    }

    /// Ends the body: its reader sees the end once it read what was sent.
    pub fn finish(mut self) {
        if let Some(shared) = self.0.take() {
            let mut channel = shared.borrow_mut();
            channel.finished = true;
            if let Some(reader) = channel.reader.take() {
                reader.wake();
            }
        }
    }

    /// Breaks the body off: its reader gets an error carrying `reason` after what was sent.
    pub fn abort(mut self, reason: &str) {
        if let Some(shared) = self.0.take() {
            shared.borrow_mut().break_off(reason);
        }
    }
}

impl Channel {
    fn break_off(&mut self, reason: &str) {
        if !self.finished && self.broken.is_none() {
            self.broken = Some(reason.to_owned());
        }
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared
                .borrow_mut()
                .break_off("the writer went away before the end");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, future)
    }

    #[test]
    fn a_channel_carries_chunks_in_order_to_the_end() {
        run(async {
            let (mut sender, body) = Body::channel();
            tokio::task::spawn_local(async move {
                for i in 0..100u32 {
                    sender.send(Bytes::from(i.to_string())).await.unwrap();
                }
                sender.finish();
            });
            let all = body.bytes().await.unwrap();
            let expected: String = (0..100u32).map(|i| i.to_string()).collect();
            assert_eq!(all, expected.as_bytes());
        });
    }

    #[test]
    fn the_writer_waits_while_the_reader_is_behind() {
        run(async {
            let (mut sender, mut body) = Body::channel();
            let chunk = Bytes::from(vec![0u8; 64 << 10]);
            let sent = Rc::new(std::cell::Cell::new(0usize));
            let counter = sent.clone();
            tokio::task::spawn_local(async move {
                for _ in 0..64 {
                    sender.send(chunk.clone()).await.unwrap();
                    counter.set(counter.get() + 1);
                }
                sender.finish();
            });
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            // Unread, the channel holds its bound and no more.
            assert_eq!(sent.get(), CHANNEL_BYTES_MAX / (64 << 10));
            let mut total = 0;
            while let Some(chunk) = body.chunk().await {
                total += chunk.unwrap().len();
            }
            assert_eq!(total, 64 * (64 << 10));
        });
    }

    #[test]
    fn a_writer_dropped_before_the_end_breaks_the_body() {
        run(async {
            let (mut sender, body) = Body::channel();
            sender.send(Bytes::from_static(b"half")).await.unwrap();
            drop(sender);
            let error = body.bytes().await.unwrap_err();
            assert!(error.is::<BodyBroken>(), "{error}");
        });
    }

    #[test]
    fn a_dropped_body_fails_its_writer() {
        run(async {
            let (mut sender, body) = Body::channel();
            drop(body);
            assert!(sender.is_closed());
            assert!(sender.send(Bytes::from_static(b"x")).await.is_err());
        });
    }

    #[test]
    fn whole_reads_stop_past_their_bound() {
        run(async {
            let body = Body::full(vec![1u8; 10]).with_whole_bytes_max(9);
            assert!(body.bytes().await.unwrap_err().is::<BodyTooLarge>());
            let (mut sender, body) = Body::channel();
            let body = body.with_whole_bytes_max(100);
            tokio::task::spawn_local(async move {
                // Never finished: the read must stop at the bound, not wait for the end.
                for _ in 0..1000 {
                    if sender.send(Bytes::from(vec![0u8; 10])).await.is_err() {
                        return;
                    }
                }
            });
            assert!(body.bytes().await.unwrap_err().is::<BodyTooLarge>());
        });
    }
}
