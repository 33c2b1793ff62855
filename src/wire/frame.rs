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

use std::future::Future;
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
/// Spare room in the buffer above which a read goes straight into it.
const READ_IN_PLACE_BYTES: usize = 4 << 10;
/// A buffer larger than this is shrunk once its messages are handed out.
const BUFFER_KEPT_BYTES: usize = 64 << 10;

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
    /// The bytes received and not yet handed to capnp: first whole messages (`..whole`), of
    /// which `..handed` are handed out already, then the start of the next message, which is
    /// held in the account until it is whole.
    buffer: Vec<u8>,
    whole: usize,
    handed: usize,
    /// When the message being received must be complete.
    deadline: Option<Pin<Box<Sleep>>>,
    /// When the connection counts as idle.
    idle: Pin<Box<Sleep>>,
    /// Dropped when the reading ends (end of stream, an error, or the reader dropped): see
    /// [`FramedReader::ended`].
    ended: Option<futures::channel::oneshot::Sender<()>>,
}

impl<R> FramedReader<R> {
    pub fn new(inner: R, account: Rc<Account>, limits: FrameLimits, busy: Busy) -> Self {
        FramedReader {
            inner,
            account,
            limits,
            busy,
            buffer: Vec::new(),
            whole: 0,
            handed: 0,
            deadline: None,
            idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            ended: None,
        }
    }

    /// A future that completes once this reader has handed out its last byte: at the end of
    /// the stream, at its first error (a broken bound included), or when it is dropped. From
    /// then on the peer can ask for nothing more, so what is left to do for it (writing what
    /// it was answered) can be given a bound of time.
    pub fn ended(&mut self) -> impl Future<Output = ()> + 'static + use<R> {
        let (sender, receiver) = futures::channel::oneshot::channel();
        self.ended = Some(sender);
        async move {
            let _ = receiver.await;
        }
    }

    /// Bytes of the message being received.
    fn partial(&self) -> usize {
        self.buffer.len() - self.whole
    }

    /// Counts the messages completed by the bytes received; an error for a message that
    /// breaks a bound.
    fn find_whole_messages(&mut self) -> io::Result<()> {
        let before = self.whole;
        while let Some(len) = frame_len(&self.buffer[self.whole..])? {
            if self.partial() < len {
                break;
            }
            self.whole += len;
        }
        if self.whole == before {
            return Ok(());
        }
        self.account.release(self.whole - before);
        if self.partial() == 0 {
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

    /// Hands out whole messages; whether there was anything to hand out.
    fn hand_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let available = &self.buffer[self.handed..self.whole];
        if available.is_empty() {
            return false;
        }
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        self.handed += n;
        if self.handed == self.whole {
            self.buffer.drain(..self.whole);
            (self.whole, self.handed) = (0, 0);
            // Give back the memory of a large message rather than keep it per connection.
            if self.buffer.capacity() > BUFFER_KEPT_BYTES {
                self.buffer
                    .shrink_to(self.buffer.len().max(READ_CHUNK_BYTES));
            }
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
            if self.partial() == 0 && !(self.busy)() {
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
        let filled = buf.filled().len();
        let polled = this.poll_messages(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() == filled => this.ended = None,
            Poll::Ready(Err(_)) => this.ended = None,
            _ => {}
        }
        polled
    }
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    /// Hands out the bytes of whole messages, reading more when there are none: what
    /// `poll_read` does, with no bytes handed out at the end of the stream.
    fn poll_messages(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            if this.hand_out(buf) {
                return Poll::Ready(Ok(()));
            }
            this.find_whole_messages()?;
            if this.handed < this.whole {
                continue;
            }
            this.check_time(cx)?;
            if this.account.over_share() {
                this.account.pause_reader(cx.waker());
                return Poll::Pending;
            }
            match this.read_more(cx)? {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(0) if this.partial() == 0 => return Poll::Ready(Ok(())),
                Poll::Ready(0) => {
                    let message = "the peer left in the middle of a message";
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, message)));
                }
                Poll::Ready(_) => {}
            }
        }
    }

    /// Reads what the socket has into the buffer (held in the account); how many bytes.
    ///
    /// Into the buffer's spare room when it has some; else into the stack, and then only the
    /// bytes that came are added: a connection that sent 16 bytes costs 16 bytes, not a chunk.
    fn read_more(&mut self, cx: &mut Context<'_>) -> io::Result<Poll<usize>> {
        let n = if self.buffer.capacity() - self.buffer.len() >= READ_IN_PLACE_BYTES {
            let len = self.buffer.len();
            let spare = self.buffer.spare_capacity_mut();
            let room = spare.len().min(READ_CHUNK_BYTES);
            let mut read = ReadBuf::uninit(&mut spare[..room]);
            match Pin::new(&mut self.inner).poll_read(cx, &mut read)? {
                Poll::Pending => return Ok(Poll::Pending),
                Poll::Ready(()) => {}
            }
            let n = read.filled().len();
            // SAFETY: `ReadBuf` initialised and filled the first `n` bytes of the spare room.
            unsafe { self.buffer.set_len(len + n) };
            n
        } else {
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut read)? {
                Poll::Pending => return Ok(Poll::Pending),
                Poll::Ready(()) => {}
            }
            self.buffer.extend_from_slice(read.filled());
            read.filled().len()
        };
        if n > 0 {
            if self.partial() == n {
                self.start_deadline();
            }
            self.account.hold(n);
            let at = Instant::now() + self.limits.idle_timeout;
            self.idle.as_mut().reset(at);
        }
        Ok(Poll::Ready(n))
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
            framed.buffer.capacity() < 64 << 10,
            "memory sized by the announcement"
        );
        peer.write_all(&second[100..]).await.unwrap();
        let mut out = vec![0; second.len()];
        framed.read_exact(&mut out).await.unwrap();
        assert_eq!(out, second);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn any_split_of_many_messages_comes_out_byte_for_byte() {
        use tokio::io::AsyncWriteExt;
        let budget = Budget::new(1 << 30);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut stream = Vec::new();
        for _ in 0..300 {
            let words = if next(10) == 0 {
                next(200_000)
            } else {
                next(40)
            };
            stream.extend(message(words as u32));
        }
        let (mut peer, inner) = tokio::io::duplex(1 << 16);
        let mut framed = reader(inner, &budget, FrameLimits::default());
        let sent = stream.clone();
        let chunks: Vec<usize> = (0..2000).map(|_| 1 + next(70_000) as usize).collect();
        let writer = tokio::spawn(async move {
            let mut at = 0;
            for chunk in chunks.iter().cycle() {
                if at == sent.len() {
                    break;
                }
                let end = (at + chunk).min(sent.len());
                peer.write_all(&sent[at..end]).await.unwrap();
                at = end;
            }
        });
        let mut out = Vec::new();
        framed.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        assert!(out == stream, "the messages came out changed");
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn over_its_share_a_connection_is_not_read() {
        use tokio::io::AsyncWriteExt;
        let budget = Budget::new(0);
        let account = Account::open(&budget);
        let (mut peer, inner) = tokio::io::duplex(1 << 20);
        let mut framed = FramedReader::new(
            inner,
            account.clone(),
            FrameLimits::default(),
            Rc::new(|| false),
        );
        account.owe(crate::wire::budget::SHARE_BYTES_MIN + 1);
        peer.write_all(&message(1)).await.unwrap();
        let mut out = [0u8; 16];
        let paused = tokio::time::timeout(Duration::from_millis(50), framed.read(&mut out)).await;
        assert!(paused.is_err(), "read while over its share");
        account.written(usize::MAX);
        framed.read_exact(&mut out).await.unwrap();
        assert_eq!(out.to_vec(), message(1));
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

    #[tokio::test]
    async fn the_end_of_reading_is_announced_at_the_end_of_the_stream_or_an_error() {
        use futures::FutureExt;
        use tokio::io::AsyncWriteExt;
        let budget = Budget::new(1 << 30);
        // The end of the stream, after a whole message.
        let (mut peer, inner) = tokio::io::duplex(1 << 10);
        let mut framed = reader(inner, &budget, FrameLimits::default());
        let mut ended = Box::pin(framed.ended());
        let whole = message(1);
        peer.write_all(&whole).await.unwrap();
        let mut out = vec![0; whole.len()];
        framed.read_exact(&mut out).await.unwrap();
        assert!((&mut ended).now_or_never().is_none(), "ended while reading");
        drop(peer);
        assert_eq!(framed.read(&mut out).await.unwrap(), 0);
        assert!(ended.now_or_never().is_some(), "the end of the stream");
        // An error: an announcement over the bound.
        let (mut peer, inner) = tokio::io::duplex(64);
        let mut framed = reader(inner, &budget, FrameLimits::default());
        let ended = framed.ended();
        peer.write_all(&[0, 0, 0, 0, 0x80, 0x84, 0x1e, 0])
            .await
            .unwrap();
        framed.read(&mut out).await.unwrap_err();
        assert!(ended.now_or_never().is_some(), "an error");
        // A reader dropped while the peer is still there.
        let (_peer, inner) = tokio::io::duplex(64);
        let mut framed = reader(inner, &budget, FrameLimits::default());
        let ended = framed.ended();
        drop(framed);
        assert!(ended.now_or_never().is_some(), "a dropped reader");
    }
}
