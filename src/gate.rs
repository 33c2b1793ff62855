//! The input gate of one object: the order in which events are delivered to it, and the lock
//! that keeps them out while a storage call or `block_concurrency_while` is in progress.
//!
//! Invariants:
//! - Calls are delivered (their handler starts) in the order they were enqueued, one at a time.
//!   Enqueueing happens synchronously when the call is made, which is what makes E-order hold.
//! - While the gate is held by a task, no call is delivered and no other task of the object is
//!   polled (its [`Gated`] future parks), so the holder sees no interleaving at its awaits.
//! - The holder may re-enter (nested `block_concurrency_while`, a transaction inside one).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::num::NonZeroU64;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Identifies a task that may hold an input gate: a delivered call, or a lock taken outside one.
pub(crate) type TaskId = u64;

thread_local! {
    /// The task being polled through a [`Gated`] future on this thread, or 0 for none.
    static CURRENT_TASK: Cell<TaskId> = const { Cell::new(0) };
    static NEXT_TASK: Cell<TaskId> = const { Cell::new(1) };
}

/// A fresh task id, never 0.
pub(crate) fn next_task_id() -> TaskId {
    NEXT_TASK.with(|next| {
        let id = next.get();
        next.set(id + 1);
        id
    })
}

/// The task being polled, if a gated one is.
pub(crate) fn current_task() -> Option<TaskId> {
    match CURRENT_TASK.with(Cell::get) {
        0 => None,
        id => Some(id),
    }
}

struct Waiting {
    ticket: u64,
    waker: Option<Waker>,
}

#[derive(Default)]
pub(crate) struct InputGate {
    /// The task holding the gate closed, and how many nested locks it holds.
    /// (Task IDs start at 1, so `None` takes no room of its own: there is a gate per object.)
    holder: Cell<Option<NonZeroU64>>,
    depth: Cell<u32>,
    /// Calls not yet delivered, in arrival order.
    queue: RefCell<VecDeque<Waiting>>,
    next_ticket: Cell<u64>,
    /// Tasks waiting for the gate to open (parked gated tasks and lock requests): one waker per
    /// waiting future, under its key, so one polled again and again takes one entry.
    /// Keyed by the gate's own serial numbers, not by anything a peer chooses, so hashed
    /// without the random state (which would take 16 bytes in each object's gate).
    parked: RefCell<HashMap<u64, Waker, BuildHasherDefault<DefaultHasher>>>,
    /// The key of the next future to park.
    next_waiter: Cell<u64>,
}

/// Returned when the queue of undelivered calls is full.
#[derive(Debug)]
pub(crate) struct QueueFull;

impl InputGate {
    /// Number of calls waiting for delivery.
    pub(crate) fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    /// Whether a task holds the gate closed.
    pub(crate) fn is_held(&self) -> bool {
        self.holder.get().is_some()
    }

    /// Number of wakers registered by waiters.
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.parked.borrow().len()
    }

    /// Gives back the memory of an empty delivery queue, for an object gone idle.
    pub(crate) fn trim(&self) {
        if let Ok(mut queue) = self.queue.try_borrow_mut()
            && queue.is_empty()
        {
            *queue = VecDeque::new();
        }
    }

    fn is_open_for(&self, task: Option<TaskId>) -> bool {
        match self.holder.get() {
            None => true,
            Some(holder) => Some(holder.get()) == task,
        }
    }

    /// Takes a place in the delivery queue. At most `queue_max` calls may wait.
    pub(crate) fn enqueue(self: &Rc<Self>, queue_max: usize) -> Result<Ticket, QueueFull> {
        let mut queue = self.queue.borrow_mut();
        if queue.len() >= queue_max {
            return Err(QueueFull);
        }
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        queue.push_back(Waiting {
            ticket,
            waker: None,
        });
        Ok(Ticket {
            gate: self.clone(),
            ticket,
            delivered: false,
        })
    }

    fn wake_front(&self) {
        // Taken out first: a waker may poll its task at once, which uses the queue.
        let waker = self
            .queue
            .borrow_mut()
            .front_mut()
            .and_then(|w| w.waker.take());
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn wake_parked(&self) {
        let parked = std::mem::take(&mut *self.parked.borrow_mut());
        for waker in parked.into_values() {
            waker.wake();
        }
        self.wake_front();
    }

    /// Registers `waker` to be woken when the gate opens, in place of the one the waiting
    /// future (its key in `waiter`, given at its first park) registered before.
    fn park(&self, waiter: &mut Option<u64>, waker: &Waker) {
        let key = *waiter.get_or_insert_with(|| {
            let key = self.next_waiter.get();
            self.next_waiter.set(key + 1);
            key
        });
        let mut parked = self.parked.borrow_mut();
        if parked.get(&key).is_some_and(|old| old.will_wake(waker)) {
            return;
        }
        let old = parked.insert(key, waker.clone());
        drop(parked);
        // Dropped outside the borrow: dropping a waker may run code of its own.
        drop(old);
    }

    /// Forgets the waker of a waiting future that goes away.
    fn unpark(&self, waiter: Option<u64>) {
        if let Some(key) = waiter {
            // Dropped outside the borrow, as in `park`.
            let old = self.parked.borrow_mut().remove(&key);
            drop(old);
        }
    }

    /// Closes the gate for `task` (re-entrant), waiting while another task holds it.
    pub(crate) fn lock(self: &Rc<Self>, task: TaskId) -> Lock {
        Lock {
            gate: self.clone(),
            task,
            held: false,
            waiter: None,
        }
    }

    fn try_acquire(&self, task: TaskId) -> bool {
        if !self.is_open_for(Some(task)) {
            return false;
        }
        debug_assert_ne!(task, 0, "task IDs start at 1");
        self.holder.set(NonZeroU64::new(task));
        self.depth.set(self.depth.get() + 1);
        true
    }

    fn release(&self) {
        let depth = self.depth.get() - 1;
        self.depth.set(depth);
        if depth == 0 {
            self.holder.set(None);
            self.wake_parked();
        }
    }
}

/// A place in the delivery queue; resolves when it is this call's turn to start.
pub(crate) struct Ticket {
    gate: Rc<InputGate>,
    ticket: u64,
    delivered: bool,
}

impl Future for Ticket {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.delivered {
            return Poll::Ready(());
        }
        let gate = self.gate.clone();
        let mut queue = gate.queue.borrow_mut();
        let at_front = queue.front().map(|w| w.ticket) == Some(self.ticket);
        if at_front && gate.holder.get().is_none() {
            queue.pop_front();
            drop(queue);
            self.delivered = true;
            // The next call may start once this one has run to its first await; it is polled
            // after the current poll returns, so order holds.
            gate.wake_front();
            return Poll::Ready(());
        }
        if let Some(waiting) = queue.iter_mut().find(|w| w.ticket == self.ticket) {
            waiting.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.delivered {
            return;
        }
        let mut queue = self.gate.queue.borrow_mut();
        let Some(pos) = queue.iter().position(|w| w.ticket == self.ticket) else {
            return;
        };
        queue.remove(pos);
        drop(queue);
        if pos == 0 {
            self.gate.wake_front();
        }
    }
}

/// A held (or awaited) lock of the gate; releases it when dropped.
pub(crate) struct Lock {
    gate: Rc<InputGate>,
    task: TaskId,
    held: bool,
    /// Its key among the parked, once it waited.
    waiter: Option<u64>,
}

impl Lock {
    /// Takes the lock now if the gate is open for the task; used so a lock taken at call time
    /// (e.g. from a constructor) closes the gate before any call is delivered.
    pub(crate) fn try_now(&mut self) -> bool {
        if !self.held {
            self.held = self.gate.try_acquire(self.task);
        }
        self.held
    }
}

impl Future for Lock {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.try_now() {
            return Poll::Ready(());
        }
        let lock = &mut *self;
        lock.gate.park(&mut lock.waiter, cx.waker());
        Poll::Pending
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.gate.unpark(self.waiter);
        if self.held {
            self.gate.release();
        }
    }
}

pin_project_lite::pin_project! {
    /// A task of an object: polled only while the gate is open or held by this task, and
    /// known as the current task while polled.
    pub(crate) struct Gated<F> {
        #[pin]
        inner: F,
        gate: Rc<InputGate>,
        task: TaskId,
        // Its key among the parked, once it waited.
        waiter: Option<u64>,
    }

    impl<F> PinnedDrop for Gated<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.gate.unpark(*this.waiter);
        }
    }
}

impl<F> Gated<F> {
    pub(crate) fn new(inner: F, gate: Rc<InputGate>, task: TaskId) -> Self {
        Gated {
            inner,
            gate,
            task,
            waiter: None,
        }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if !this.gate.is_open_for(Some(*this.task)) {
            this.gate.park(this.waiter, cx.waker());
            return Poll::Pending;
        }
        let _restore = RestoreCurrent(CURRENT_TASK.with(|current| current.replace(*this.task)));
        this.inner.poll(cx)
    }
}

/// Makes the task that was current before a [`Gated`] poll current again when dropped, also
/// when the inner future panics: else code polled later on the thread would pass the gate as
/// that task.
struct RestoreCurrent(TaskId);

impl Drop for RestoreCurrent {
    fn drop(&mut self) {
        CURRENT_TASK.with(|current| current.set(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::task::Poll;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let waker = futures::task::noop_waker();
        f.poll_unpin(&mut Context::from_waker(&waker))
    }

    #[test]
    fn tickets_are_delivered_in_order() {
        let gate = Rc::new(InputGate::default());
        let mut first = gate.enqueue(10).unwrap();
        let mut second = gate.enqueue(10).unwrap();
        assert!(poll_once(&mut second).is_pending());
        assert!(poll_once(&mut first).is_ready());
        assert!(poll_once(&mut second).is_ready());
    }

    #[test]
    fn a_dropped_ticket_gives_up_its_turn() {
        let gate = Rc::new(InputGate::default());
        let first = gate.enqueue(10).unwrap();
        let mut second = gate.enqueue(10).unwrap();
        drop(first);
        assert!(poll_once(&mut second).is_ready());
        assert_eq!(gate.queued(), 0);
    }

    #[test]
    fn the_queue_is_bounded() {
        let gate = Rc::new(InputGate::default());
        let _a = gate.enqueue(2).unwrap();
        let _b = gate.enqueue(2).unwrap();
        assert!(gate.enqueue(2).is_err());
    }

    #[test]
    fn a_held_gate_stops_delivery_and_other_tasks() {
        let gate = Rc::new(InputGate::default());
        let mut lock = gate.lock(1);
        assert!(lock.try_now());
        let mut ticket = gate.enqueue(10).unwrap();
        assert!(poll_once(&mut ticket).is_pending());
        let mut other = Gated::new(async { 7 }.boxed_local(), gate.clone(), 2);
        assert!(poll_once(&mut other).is_pending());
        let mut holder = Gated::new(async { 8 }.boxed_local(), gate.clone(), 1);
        assert_eq!(poll_once(&mut holder), Poll::Ready(8));
        // Re-entrant for the holder.
        let mut nested = gate.lock(1);
        assert!(nested.try_now());
        drop(nested);
        assert!(poll_once(&mut ticket).is_pending());
        drop(lock);
        assert_eq!(poll_once(&mut other), Poll::Ready(7));
        assert!(poll_once(&mut ticket).is_ready());
    }

    #[test]
    fn a_task_that_panics_is_no_longer_current() {
        let gate = Rc::new(InputGate::default());
        let mut task = Gated::new(async { panic!("boom") }.boxed_local(), gate, 3);
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = poll_once(&mut task);
        }));
        assert!(polled.is_err());
        assert_eq!(current_task(), None);
    }

    thread_local! {
        /// The gate that [`TouchGate`] reads when woken.
        static TOUCHED: RefCell<Option<Rc<InputGate>>> = const { RefCell::new(None) };
    }

    /// A waker that reads the gate when woken, as one that polls its task at once would.
    struct TouchGate;

    impl std::task::Wake for TouchGate {
        fn wake(self: std::sync::Arc<Self>) {
            TOUCHED.with(|gate| gate.borrow().as_ref().map(|gate| gate.queued()));
        }
    }

    #[test]
    fn a_waker_may_use_the_gate_when_woken() {
        let gate = Rc::new(InputGate::default());
        TOUCHED.with(|touched| *touched.borrow_mut() = Some(gate.clone()));
        let mut first = gate.enqueue(10).unwrap();
        let mut second = gate.enqueue(10).unwrap();
        let waker = Waker::from(std::sync::Arc::new(TouchGate));
        let polled = second.poll_unpin(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
        // Delivering the first wakes the second.
        assert!(poll_once(&mut first).is_ready());
        assert!(poll_once(&mut second).is_ready());
    }

    #[test]
    fn a_waiter_polled_again_and_again_is_parked_once() {
        let gate = Rc::new(InputGate::default());
        let mut lock = gate.lock(1);
        assert!(lock.try_now());
        let mut task = Gated::new(async { 7 }.boxed_local(), gate.clone(), 2);
        let mut waiting = gate.lock(3);
        for _ in 0..1000 {
            assert!(poll_once(&mut task).is_pending());
            assert!(poll_once(&mut waiting).is_pending());
        }
        assert_eq!(gate.parked(), 2);
        drop(waiting);
        assert_eq!(gate.parked(), 1);
        drop(lock);
        assert_eq!(gate.parked(), 0);
        assert_eq!(poll_once(&mut task), Poll::Ready(7));
    }
}
