//! The reading side of a connection, between the socket and capnp: it hands capnp only whole
//! messages, so that memory follows the bytes a peer sent, not the bytes it announced.
//!
//! capnp's reader allocates (and zeroes) a message's full size as soon as it has read the
//! segment table: 16 bytes announcing 8 MB would cost 8 MB, 1,000 such connections 8 GB. Here
//! the bytes of a message gather in a buffer that grows as they arrive, and capnp sees the
//! message only once all of it is here. On the way, the reader enforces:
//!
//! - the size bound ([`super::MESSAGE_BYTES_MAX`]): a bigger announcement closes the connection
//!   at once;
//! - a deadline per message ([`FrameLimits::message_timeout`]): a message begun and not
//!   finished in time closes the connection (slow senders cannot hold memory forever);
//! - an idle bound ([`FrameLimits::idle_timeout`]): a connection that sends nothing for that
//!   long while it has no call in progress is closed;
//! - the connection's share of the host's budget ([`super::budget`]): over it, nothing more is
//!   read until what the connection holds drains.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::MESSAGE_BYTES_MAX;
use super::budget::Account;

/// Most segments a message may have (capnp's own reader refuses more).
const SEGMENTS_MAX: usize = 512;
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// The time bounds of a connection's reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Longest time between the first byte of a message and its last (default 30 s).
    pub message_timeout: Duration,
    /// Longest time a connection with no call in progress may send nothing (default 10 min).
    pub idle_timeout: Duration,
}

impl Default for FrameLimits {
    fn default() -> FrameLimits {
        FrameLimits {
            message_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Whether the connection has calls in progress (so silence is not idleness).
pub type Busy = Rc<dyn Fn() -> bool>;

/// Wraps a connection's reading half (see the module docs).
pub struct FramedReader<R> {
    inner: R,
    account: Rc<Account>,
    limits: FrameLimits,
    busy: Busy,
    /// The bytes of the message being received (held in the account), and of whatever
    /// followed it in the same read.
    partial: Vec<u8>,
    /// Whole messages being handed to capnp, and how far.
    ready: Vec<u8>,
    ready_at: usize,
    /// When the message being received must be complete.
    deadline: Option<Pin<Box<Sleep>>>,
    /// When the connection counts as idle.
    idle: Pin<Box<Sleep>>,
}

impl<R> FramedReader<R> {
    pub fn new(inner: R, account: Rc<Account>, limits: FrameLimits, busy: Busy) -> Self {
        FramedReader {
            inner,
            account,
            limits,
            busy,
            partial: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            deadline: None,
            idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
        }
    }

    /// Moves every whole message at the front of `partial` to `ready`; an error for a message
    /// that breaks a bound.
    fn take_whole_messages(&mut self) -> io::Result<()> {
        let mut whole = 0;
        while let Some(len) = frame_len(&self.partial[whole..])? {
            if self.partial.len() - whole < len {
                break;
            }
            whole += len;
        }
        if whole == 0 {
            return Ok(());
        }
        let rest = self.partial.split_off(whole);
        let messages = std::mem::replace(&mut self.partial, rest);
        self.account.release(messages.len());
        if self.ready_at == self.ready.len() {
            self.ready = messages;
            self.ready_at = 0;
        } else {
            self.ready.extend_from_slice(&messages);
        }
        if self.partial.is_empty() {
            // Give the memory of a large message back rather than keep it per connection.
            self.partial = Vec::new();
            self.deadline = None;
        } else {
            self.start_deadline();
        }
        Ok(())
    }

    fn start_deadline(&mut self) {
        let at = Instant::now() + self.limits.message_timeout;
        match &mut self.deadline {
            Some(deadline) => deadline.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Hands out what is ready; whether there was anything.
    fn copy_ready(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let available = &self.ready[self.ready_at..];
        if available.is_empty() {
            return false;
        }
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        self.ready_at += n;
        if self.ready_at == self.ready.len() {
            self.ready = Vec::new();
            self.ready_at = 0;
        }
        true
    }

    /// An error if a time bound has passed; registers for the wake-ups otherwise.
    fn check_time(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(deadline) = &mut self.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "a message was not complete {:?} after its first byte (message_timeout)",
                    self.limits.message_timeout
                ),
            ));
        }
        while self.idle.as_mut().poll(cx).is_ready() {
            if self.partial.is_empty() && !(self.busy)() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the connection sent nothing for {:?} (idle_timeout)",
                        self.limits.idle_timeout
                    ),
                ));
            }
            let at = Instant::now() + self.limits.idle_timeout;
            self.idle.as_mut().reset(at);
        }
        Ok(())
    }
}

/// Wraps a connection's writing half: every byte written is given back to the account, which
/// counted the responses produced for the connection (see [`Account::owe`]).
pub struct CountedWriter<W> {
    inner: W,
    account: Rc<Account>,
}

impl<W> CountedWriter<W> {
    pub fn new(inner: W, account: Rc<Account>) -> Self {
        CountedWriter { inner, account }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountedWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.account.written(n);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The length of the message at the front of `bytes` (segment table and segments), once its
/// segment table is there; an error if it breaks a bound.
fn frame_len(bytes: &[u8]) -> io::Result<Option<usize>> {
    let Some(first) = bytes.get(..4) else {
        return Ok(None);
    };
    let segments = u32::from_le_bytes(first.try_into().expect("4 bytes")) as usize + 1;
    if segments > SEGMENTS_MAX {
        return Err(invalid(format!(
            "a message announces {segments} segments, over the limit of {SEGMENTS_MAX}"
        )));
    }
    // The count, a length per segment, padded to a whole word.
    let table = (4 + 4 * segments).next_multiple_of(8);
    let Some(lengths) = bytes.get(4..4 + 4 * segments) else {
        return Ok(None);
    };
    let words: u64 = lengths
        .chunks_exact(4)
        .map(|len| u64::from(u32::from_le_bytes(len.try_into().expect("4 bytes"))))
        .sum();
    let body = words.saturating_mul(8);
    if body > MESSAGE_BYTES_MAX as u64 {
        return Err(invalid(format!(
            "a message announces {body} bytes, over the limit of {MESSAGE_BYTES_MAX} bytes \
             (MESSAGE_BYTES_MAX)"
        )));
    }
    Ok(Some(table + body as usize))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<R: AsyncRead + Unpin> AsyncRead for FramedReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.copy_ready(buf) {
                return Poll::Ready(Ok(()));
            }
            this.take_whole_messages()?;
            if this.ready_at < this.ready.len() {
                continue;
            }
            this.check_time(cx)?;
            if this.account.over_share() {
                this.account.pause_reader(cx.waker());
                return Poll::Pending;
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    if this.partial.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    let message = "the peer left in the middle of a message";
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, message)));
                }
                Poll::Ready(Ok(())) => {
                    let bytes = read.filled();
                    if this.partial.is_empty() {
                        this.start_deadline();
                    }
                    this.partial.extend_from_slice(bytes);
                    this.account.hold(bytes.len());
                    let at = Instant::now() + this.limits.idle_timeout;
                    this.idle.as_mut().reset(at);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::budget::Budget;
    use tokio::io::AsyncReadExt;

    fn message(body_words: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&body_words.to_le_bytes());
        bytes.extend(std::iter::repeat_n(7u8, body_words as usize * 8));
        bytes
    }

    fn reader<R>(inner: R, budget: &Rc<Budget>, limits: FrameLimits) -> FramedReader<R> {
        FramedReader::new(inner, Account::open(budget), limits, Rc::new(|| false))
    }

    #[test]
    fn lengths_follow_the_segment_table_and_its_bounds() {
        assert_eq!(frame_len(&[0, 0, 0]).unwrap(), None);
        assert_eq!(frame_len(&message(3)).unwrap(), Some(8 + 24));
        // Two segments: count, two lengths, padding.
        let two = [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(frame_len(&two).unwrap(), Some(16 + 24));
        let huge = [0, 0, 0, 0, 0x80, 0x84, 0x1e, 0]; // 2,000,000 words
        let error = frame_len(&huge).unwrap_err();
        assert!(error.to_string().contains("MESSAGE_BYTES_MAX"), "{error}");
        assert!(frame_len(&[0, 2, 0, 0]).is_err(), "too many segments");
    }

    #[tokio::test(start_paused = true)]
    async fn whole_messages_pass_and_an_announcement_costs_nothing() {
        let budget = Budget::new(1 << 30);
        let (mut peer, inner) = tokio::io::duplex(1 << 20);
        let mut framed = reader(inner, &budget, FrameLimits::default());
        use tokio::io::AsyncWriteExt;
        let (first, second) = (message(2), message(1000));
        peer.write_all(&first).await.unwrap();
        peer.write_all(&second[..100]).await.unwrap();
        let mut out = vec![0; first.len()];
        framed.read_exact(&mut out).await.unwrap();
        assert_eq!(out, first);
        // The second message is held until whole: only its 100 bytes count.
        let mut one = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(10), framed.read(&mut one)).await;
        assert!(early.is_err(), "a partial message was handed out");
        assert_eq!(budget.used(), 100);
        assert!(
            framed.partial.capacity() < 64 << 10,
            "memory sized by the announcement"
        );
        peer.write_all(&second[100..]).await.unwrap();
        let mut out = vec![0; second.len()];
        framed.read_exact(&mut out).await.unwrap();
        assert_eq!(out, second);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_does_not_complete_in_time_ends_the_connection() {
        let budget = Budget::new(1 << 30);
        let (mut peer, inner) = tokio::io::duplex(1 << 20);
        let limits = FrameLimits {
            message_timeout: Duration::from_secs(2),
            ..FrameLimits::default()
        };
        let mut framed = reader(inner, &budget, limits);
        use tokio::io::AsyncWriteExt;
        peer.write_all(&message(4)[..10]).await.unwrap();
        let mut out = [0u8; 8];
        let error = framed.read(&mut out).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("message_timeout"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_unless_a_call_is_in_progress() {
        let budget = Budget::new(1 << 30);
        let limits = FrameLimits {
            idle_timeout: Duration::from_secs(5),
            ..FrameLimits::default()
        };
        let (_peer, inner) = tokio::io::duplex(64);
        let busy = Rc::new(std::cell::Cell::new(true));
        let flag = busy.clone();
        let mut framed = FramedReader::new(
            inner,
            Account::open(&budget),
            limits,
            Rc::new(move || flag.get()),
        );
        let mut out = [0u8; 8];
        let waited = tokio::time::timeout(Duration::from_secs(60), framed.read(&mut out)).await;
        assert!(waited.is_err(), "a busy connection was closed as idle");
        busy.set(false);
        let error = framed.read(&mut out).await.unwrap_err();
        assert!(error.to_string().contains("idle_timeout"), "{error}");
    }

    #[tokio::test]
    async fn an_oversized_announcement_ends_the_connection_at_once() {
        let budget = Budget::new(1 << 30);
        let (mut peer, inner) = tokio::io::duplex(64);
        let mut framed = reader(inner, &budget, FrameLimits::default());
        use tokio::io::AsyncWriteExt;
        peer.write_all(&[0, 0, 0, 0, 0x80, 0x84, 0x1e, 0])
            .await
            .unwrap();
        let mut out = [0u8; 8];
        let error = framed.read(&mut out).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            budget.used(),
            8,
            "what arrived is counted until the connection goes"
        );
    }
}
