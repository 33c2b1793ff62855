//! The writing side of a server connection, between capnp and the socket: it gathers the
//! messages of one turn of the event loop into one write.
//!
//! capnp-rpc's write queue flushes after every message, so a buffered writer still makes one
//! `send` per answer: under pipelined load (64 calls in flight on a connection) that is a
//! syscall, a wakeup of the peer and a TCP segment per call, about a third of the server's CPU
//! per call. Here a flush only marks the bytes as due and wakes the [`Flusher`], a future the
//! connection runs beside its RPC system. The flusher lets the tasks that are ready run first
//! (answers completing in the same turn land in the same buffer), then writes everything due
//! at once. A flush is delayed by at most [`YIELDS_MAX`] passes of the event loop, not by a
//! timer: a lone call's answer leaves in the same turn as before.
//!
//! Answers released together by a commit ([`settled`]) reach the writer a few at a time: each
//! call's task ends, then the connection's task writes its answer, one wake-up apart, so over
//! more passes than a flush waits for. After a commit settled, the flusher's first wait lasts
//! until the event loop ran out of ready tasks, and they leave in one write, not one each.
//!
//! Bounds: the buffer holds at most its capacity; past it, the writer waits for the flusher to
//! drain it (a peer that does not read stops being written to, as with a buffered writer). A
//! write of at least the capacity into an empty buffer goes straight to the socket, as
//! `BufWriter` does, so a large message is not copied. Only the flusher writes into the socket
//! while bytes are buffered, so the two never wait on the socket at once.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use futures::io::AsyncWrite;

/// Passes of the event loop the flusher lets go by while new bytes keep arriving, before it
/// writes anyway: a bound on how long an answer waits for others to join it.
pub const YIELDS_MAX: u32 = 2;

/// A corked writer and its [`Flusher`], over `inner`, buffering at most `capacity` bytes.
pub fn cork<W: AsyncWrite + Unpin>(inner: W, capacity: usize) -> (CorkedWriter<W>, Flusher<W>) {
    let shared = Rc::new(RefCell::new(Cork {
        inner,
        buf: Vec::with_capacity(capacity),
        start: 0,
        capacity: capacity.max(1),
        due: false,
        fresh: false,
        yields: 0,
        flusher: None,
        writer: None,
        error: None,
        writer_gone: false,
        unflushed: false,
    }));
    (
        CorkedWriter {
            shared: shared.clone(),
        },
        Flusher {
            shared,
            pass: None,
            settled: SETTLED.get(),
        },
    )
}

struct Cork<W> {
    inner: W,
    /// Bytes not yet written: `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    capacity: usize,
    /// A flush was asked for and the bytes are not all written yet.
    due: bool,
    /// Bytes arrived since the flusher last looked.
    fresh: bool,
    /// Passes the flusher has let go by for the bytes now due.
    yields: u32,
    flusher: Option<Waker>,
    /// The writer, waiting for room or for the bytes to be written (at close).
    writer: Option<Waker>,
    /// The socket's error: every later write and flush fails with it.
    error: Option<(io::ErrorKind, String)>,
    /// The writer was dropped: the flusher ends once the bytes are written.
    writer_gone: bool,
    /// Bytes went into the socket since its last flush: a socket that buffers (TLS) may hold
    /// them until it is flushed, which the flusher does, waiting for it as long as it takes.
    unflushed: bool,
}

impl<W> Cork<W> {
    fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    fn error(&self) -> Option<io::Error> {
        self.error
            .as_ref()
            .map(|(kind, message)| io::Error::new(*kind, message.clone()))
    }

    fn wake_flusher(&mut self) {
        if let Some(waker) = self.flusher.take() {
            waker.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }

    fn wait_as_writer(&mut self, cx: &Context<'_>) {
        match &self.writer {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.writer = Some(cx.waker().clone()),
        }
    }
}

/// The writing half: hand it to capnp (see the module docs).
pub struct CorkedWriter<W> {
    shared: Rc<RefCell<Cork<W>>>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CorkedWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut cork = self.shared.borrow_mut();
        if let Some(error) = cork.error() {
            return Poll::Ready(Err(error));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let pending = cork.pending();
        if pending == 0 && !cork.unflushed && data.len() >= cork.capacity {
            // Nothing buffered or being flushed, so the flusher is not on the socket: write
            // through.
            cork.buf.clear();
            cork.start = 0;
            let written = Pin::new(&mut cork.inner).poll_write(cx, data);
            if let Poll::Ready(Ok(n)) = written {
                cork.unflushed |= n > 0;
            }
            return written;
        }
        let room = cork.capacity.saturating_sub(pending);
        if room == 0 {
            cork.due = true;
            cork.wait_as_writer(cx);
            cork.wake_flusher();
            return Poll::Pending;
        }
        if cork.start > 0 && cork.buf.len() + data.len().min(room) > cork.capacity {
            // Move what is left to the front rather than grow past the capacity.
            let start = cork.start;
            cork.buf.drain(..start);
            cork.start = 0;
        }
        let n = data.len().min(room);
        cork.buf.extend_from_slice(&data[..n]);
        cork.fresh = true;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut cork = self.shared.borrow_mut();
        if let Some(error) = cork.error() {
            return Poll::Ready(Err(error));
        }
        if cork.pending() > 0 || cork.unflushed {
            cork.due = true;
            cork.wake_flusher();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut cork = self.shared.borrow_mut();
        if let Some(error) = cork.error() {
            return Poll::Ready(Err(error));
        }
        if cork.pending() > 0 || cork.unflushed {
            cork.due = true;
            cork.wait_as_writer(cx);
            cork.wake_flusher();
            return Poll::Pending;
        }
        Pin::new(&mut cork.inner).poll_close(cx)
    }
}

impl<W> Drop for CorkedWriter<W> {
    fn drop(&mut self) {
        let mut cork = self.shared.borrow_mut();
        cork.writer_gone = true;
        cork.due = true;
        cork.wake_flusher();
    }
}

/// Writes what the [`CorkedWriter`] buffered when it is due. Run it beside the connection's
/// RPC system: it ends when the writer is gone and its bytes are written, or at the socket's
/// first error (which the writer then reports).
pub struct Flusher<W> {
    shared: Rc<RefCell<Cork<W>>>,
    /// A pass that lasts until the event loop ran out of ready tasks (see [`settled`]).
    pass: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// The count of [`settled`] calls as of this flusher's last such pass.
    settled: u64,
}

thread_local! {
    static SETTLED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Tells the flushers of this thread that many answers were just released at once (a commit
/// settled the calls waiting for it), to reach them over the next passes of the event loop
/// through several tasks each: a flusher that gets bytes then lets the event loop run out of
/// ready tasks (once) before it writes, so that they leave together, not a few per write.
pub(crate) fn settled() {
    SETTLED.set(SETTLED.get().wrapping_add(1));
}

impl<W: AsyncWrite + Unpin> Future for Flusher<W> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(pass) = &mut this.pass {
            if pass.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pass = None;
        }
        let mut cork = this.shared.borrow_mut();
        loop {
            if cork.error.is_some() {
                cork.wake_writer();
                return Poll::Ready(());
            }
            if cork.pending() == 0 && cork.unflushed {
                // Everything is in the socket: flush it (a TLS stream writes its records).
                let cork = &mut *cork;
                match Pin::new(&mut cork.inner).poll_flush(cx) {
                    Poll::Ready(Ok(())) => cork.unflushed = false,
                    Poll::Ready(Err(e)) => cork.error = Some((e.kind(), e.to_string())),
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if cork.pending() == 0 {
                cork.due = false;
                cork.yields = 0;
                cork.buf.clear();
                cork.start = 0;
                if cork.writer_gone {
                    return Poll::Ready(());
                }
                cork.wake_writer();
                cork.flusher = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if !cork.due {
                cork.flusher = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if cork.fresh && cork.yields < YIELDS_MAX && !cork.writer_gone {
                // Let the tasks that are ready run first: their answers join these bytes.
                cork.fresh = false;
                cork.yields += 1;
                let settled = SETTLED.get();
                if settled == this.settled {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                // Answers released together may still be on their way here through other
                // tasks: this pass lasts until the event loop ran out of ready tasks.
                this.settled = settled;
                let mut pass = Box::pin(tokio::task::yield_now());
                if pass.as_mut().poll(cx).is_pending() {
                    this.pass = Some(pass);
                    return Poll::Pending;
                }
                continue;
            }
            let cork = &mut *cork;
            match Pin::new(&mut cork.inner).poll_write(cx, &cork.buf[cork.start..]) {
                Poll::Ready(Ok(0)) => {
                    cork.error =
                        Some((io::ErrorKind::WriteZero, "the socket took no bytes".into()));
                }
                Poll::Ready(Ok(n)) => {
                    cork.start += n;
                    cork.fresh = false;
                    cork.yields = 0;
                    cork.unflushed = true;
                    // Room again: a writer waiting for it may go on.
                    cork.wake_writer();
                }
                Poll::Ready(Err(e)) => cork.error = Some((e.kind(), e.to_string())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::AsyncWriteExt;
    use std::cell::Cell;

    /// A socket that records each write it takes, and can refuse to take any (full).
    #[derive(Clone, Default)]
    struct Socket {
        writes: Rc<RefCell<Vec<Vec<u8>>>>,
        full: Rc<Cell<bool>>,
        waker: Rc<RefCell<Option<Waker>>>,
        broken: Rc<Cell<bool>>,
        /// Bytes taken and not yet flushed (a TLS stream's records in its buffer).
        unflushed: Rc<Cell<bool>>,
        /// Flushes wait until this is cleared (the socket is full).
        flush_blocked: Rc<Cell<bool>>,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken.get() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone")));
            }
            if self.full.get() {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            self.writes.borrow_mut().push(data.to_vec());
            self.unflushed.set(true);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.flush_blocked.get() {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            self.unflushed.set(false);
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Socket {
        fn drain(&self) {
            self.full.set(false);
            self.flush_blocked.set(false);
            if let Some(waker) = self.waker.borrow_mut().take() {
                waker.wake();
            }
        }
        fn bytes(&self) -> Vec<u8> {
            self.writes.borrow().concat()
        }
    }

    fn local() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (runtime, tokio::task::LocalSet::new())
    }

    #[test]
    fn messages_flushed_in_one_turn_leave_in_one_write() {
        let (runtime, set) = local();
        let socket = Socket::default();
        let (mut writer, flusher) = cork(socket.clone(), 8 << 10);
        set.block_on(&runtime, async move {
            tokio::task::spawn_local(flusher);
            // Ten "answers", each written and flushed as capnp's write queue does.
            for i in 0..10u8 {
                writer.write_all(&[i; 100]).await.unwrap();
                writer.flush().await.unwrap();
            }
            // Nothing was written before the event loop turned.
            assert!(socket.writes.borrow().is_empty());
            tokio::task::yield_now().await;
            for _ in 0..=YIELDS_MAX {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                socket.writes.borrow().len(),
                1,
                "one write for the turn's answers"
            );
            let expected: Vec<u8> = (0..10u8).flat_map(|i| [i; 100]).collect();
            assert_eq!(socket.bytes(), expected);
        });
    }

    /// Lets the tasks queued now run, then goes on, in the same pass of the event loop: what a
    /// wake-up through another task costs an answer on its way to the writer.
    async fn hop() {
        let mut hopped = false;
        std::future::poll_fn(|cx| {
            if hopped {
                return Poll::Ready(());
            }
            hopped = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    #[test]
    fn answers_released_together_leave_in_one_write_though_each_comes_a_hop_later() {
        let (runtime, set) = local();
        let socket = Socket::default();
        let (writer, flusher) = cork(socket.clone(), 8 << 10);
        set.block_on(&runtime, async move {
            tokio::task::spawn_local(flusher);
            tokio::task::yield_now().await;
            // Ten answers that reach the writer one hop apart (in tasks of the event loop, as
            // a connection's answers do): more hops than the passes a flush waits for.
            let answer = |mut writer: CorkedWriter<Socket>| {
                tokio::task::spawn_local(async move {
                    for i in 0..10u8 {
                        writer.write_all(&[i; 100]).await.unwrap();
                        writer.flush().await.unwrap();
                        hop().await;
                    }
                    writer
                })
            };
            let passes = || async {
                for _ in 0..=YIELDS_MAX + 1 {
                    tokio::task::yield_now().await;
                }
            };
            // Without a commit settling, they leave a few at a time.
            let writer = answer(writer).await.unwrap();
            passes().await;
            let apart = socket.writes.borrow().len();
            assert!(apart > 2, "{apart} writes: the flush waited for every hop");
            // Released by a commit, they leave in one write.
            settled();
            let _writer = answer(writer).await.unwrap();
            passes().await;
            assert_eq!(
                socket.writes.borrow().len(),
                apart + 1,
                "one write for ten answers"
            );
            let expected: Vec<u8> = (0..10u8).flat_map(|i| [i; 100]).collect();
            assert_eq!(socket.bytes(), [expected.clone(), expected].concat());
        });
    }

    #[test]
    fn a_flush_waits_at_most_a_few_passes_while_bytes_keep_coming() {
        let (runtime, set) = local();
        let socket = Socket::default();
        let (writer, flusher) = cork(socket.clone(), 1 << 20);
        set.block_on(&runtime, async move {
            tokio::task::spawn_local(flusher);
            // A writer that writes and flushes a byte on every pass, for 50 passes.
            let busy = tokio::task::spawn_local(async move {
                let mut writer = writer;
                for _ in 0..50 {
                    writer.write_all(b"x").await.unwrap();
                    writer.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
                writer
            });
            let writer = busy.await.unwrap();
            // Writes happened while the writer was still busy: it was not starved.
            assert!(
                socket.writes.borrow().len() >= 50 / (YIELDS_MAX as usize + 2),
                "{} writes for 50 passes",
                socket.writes.borrow().len()
            );
            drop(writer);
            for _ in 0..=YIELDS_MAX + 1 {
                tokio::task::yield_now().await;
            }
            assert_eq!(socket.bytes(), vec![b'x'; 50]);
        });
    }

    #[test]
    fn a_full_buffer_waits_for_the_socket_and_loses_nothing() {
        let (runtime, set) = local();
        let socket = Socket::default();
        socket.full.set(true);
        let (mut writer, flusher) = cork(socket.clone(), 1000);
        set.block_on(&runtime, async move {
            let flusher = tokio::task::spawn_local(flusher);
            let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
            let expected = data.clone();
            let sent = tokio::task::spawn_local(async move {
                // Chunks below the capacity, so that they go through the buffer.
                for chunk in data.chunks(300) {
                    writer.write_all(chunk).await.unwrap();
                    writer.flush().await.unwrap();
                }
                writer
            });
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            assert!(
                !sent.is_finished(),
                "the writer waits while the socket is full"
            );
            socket.drain();
            let writer = sent.await.unwrap();
            drop(writer);
            flusher.await.unwrap();
            assert_eq!(socket.bytes(), expected);
        });
    }

    #[test]
    fn what_the_socket_took_is_flushed_even_when_its_flush_waits() {
        let (runtime, set) = local();
        let socket = Socket::default();
        socket.flush_blocked.set(true);
        let (mut writer, flusher) = cork(socket.clone(), 1000);
        let checks = async move {
            let flusher = tokio::task::spawn_local(flusher);
            // A small answer through the buffer, then a large one straight through.
            writer.write_all(b"answer").await.unwrap();
            writer.flush().await.unwrap();
            for _ in 0..=YIELDS_MAX + 1 {
                tokio::task::yield_now().await;
            }
            assert_eq!(socket.bytes(), b"answer");
            assert!(socket.unflushed.get(), "the socket's flush is waiting");
            socket.drain();
            for _ in 0..=YIELDS_MAX + 1 {
                tokio::task::yield_now().await;
            }
            assert!(!socket.unflushed.get(), "flushed once the socket could");
            writer.write_all(&[7; 4000]).await.unwrap();
            writer.flush().await.unwrap();
            tokio::task::yield_now().await;
            assert!(
                !socket.unflushed.get(),
                "a write straight through is flushed too"
            );
            drop(writer);
            flusher.await.unwrap();
        };
        // A flusher that forgets the socket's flush can spin instead of ending: bounded.
        set.block_on(&runtime, async move {
            tokio::time::timeout(std::time::Duration::from_secs(10), checks)
                .await
                .expect("the flusher ended within 10 s");
        });
    }

    #[test]
    fn a_large_write_into_an_empty_buffer_goes_straight_through() {
        let (runtime, set) = local();
        let socket = Socket::default();
        let (mut writer, _flusher) = cork(socket.clone(), 1000);
        set.block_on(&runtime, async move {
            writer.write_all(&[7; 4000]).await.unwrap();
            assert_eq!(socket.writes.borrow().len(), 1);
            assert_eq!(socket.bytes(), vec![7; 4000]);
        });
    }

    #[test]
    fn a_socket_error_reaches_the_writer_and_ends_the_flusher() {
        let (runtime, set) = local();
        let socket = Socket::default();
        socket.broken.set(true);
        let (mut writer, flusher) = cork(socket.clone(), 1000);
        set.block_on(&runtime, async move {
            let flusher = tokio::task::spawn_local(flusher);
            writer.write_all(b"answer").await.unwrap();
            writer.flush().await.unwrap();
            flusher.await.unwrap();
            let error = writer.write_all(b"more").await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
            assert!(writer.flush().await.is_err());
        });
    }

    #[test]
    fn close_writes_what_is_buffered_first() {
        let (runtime, set) = local();
        let socket = Socket::default();
        let (mut writer, flusher) = cork(socket.clone(), 1000);
        set.block_on(&runtime, async move {
            let flusher = tokio::task::spawn_local(flusher);
            writer.write_all(b"last words").await.unwrap();
            writer.close().await.unwrap();
            assert_eq!(socket.bytes(), b"last words");
            drop(writer);
            flusher.await.unwrap();
        });
    }
}
