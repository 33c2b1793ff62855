//! The order and the input gate of an external instance's events.
//!
//! A Rust class's storage calls run inside the host, so the input gate can hold other events
//! exactly while one is in progress. An external instance's storage calls travel from its
//! provider: the host sees one only when it arrives, not while it is on its way. If the host
//! delivered the next event meanwhile, the provider could run both handlers at once, and two
//! read-modify-writes would interleave (both read 5, both write 6). So an event of an external
//! instance holds the gate from its delivery until the instance answered it ([`Turns`]): its
//! storage calls arrive while it holds the gate, and no other event gets in. The one await that
//! lets others in, as it does for a Rust class, is a call on another object: the env's stubs
//! [`Turns::pause`] the event for the call and [`Turns::resume`] it before its result goes
//! back, so an object that calls another which calls it back does not deadlock.
//!
//! Events are delivered in E-order by the activation's mailbox, but one may wait for a provider
//! before its turn (the first events of an object that has no instance yet); [`Turnstile`]
//! keeps them in their order through that wait.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::rc::Rc;
use std::task::{Poll, Waker};

use crate::gate::{self, InputGate, Lock, TaskId};

/// Hands out places in the order events are delivered, and lets each go on only once every
/// place before it went on or was given up.
#[derive(Default)]
pub(super) struct Turnstile {
    /// The number of the next place handed out.
    issued: Cell<u64>,
    /// The lowest place not yet passed: the one that may go on.
    next: Cell<u64>,
    /// Places passed out of order (given up early), waiting for `next` to reach them.
    passed: RefCell<BTreeSet<u64>>,
    /// Places waiting to go on; all woken at each pass (there are few: the events of one
    /// object waiting for its first instance).
    waiting: RefCell<Vec<Waker>>,
}

impl Turnstile {
    /// The next place. Taken when the event is delivered, before any await.
    pub(super) fn take(self: &Rc<Self>) -> Place {
        let number = self.issued.get();
        self.issued.set(number + 1);
        Place {
            turnstile: self.clone(),
            number,
        }
    }

    fn pass(&self, number: u64) {
        self.passed.borrow_mut().insert(number);
        let mut next = self.next.get();
        while self.passed.borrow_mut().remove(&next) {
            next += 1;
        }
        self.next.set(next);
        // Woken outside the borrow: a waker may poll its task at once.
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        for waker in waiting {
            waker.wake();
        }
    }
}

/// A place in a [`Turnstile`]; passed when dropped, also when its event fails or is cancelled.
pub(super) struct Place {
    turnstile: Rc<Turnstile>,
    number: u64,
}

impl Place {
    /// Resolves once every place before this one was passed.
    pub(super) async fn reached(&self) {
        std::future::poll_fn(|cx| {
            if self.turnstile.next.get() == self.number {
                return Poll::Ready(());
            }
            self.turnstile.waiting.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.turnstile.pass(self.number);
    }
}

/// The input gate as an external instance's events and calls take it (see the module docs).
pub(super) struct Turns {
    gate: Rc<InputGate>,
    /// The event holding the gate, with its lock: `None` while no event runs, or while those
    /// that run await calls on other objects.
    holder: RefCell<Option<(TaskId, Lock)>>,
    /// The events delivered and not answered yet, holding the gate or paused: a paused one
    /// takes the gate again when its call returns, unless it was answered meanwhile.
    live: RefCell<Vec<TaskId>>,
}

impl Turns {
    pub(super) fn new(gate: Rc<InputGate>) -> Rc<Turns> {
        Rc::new(Turns {
            gate,
            holder: RefCell::default(),
            live: RefCell::default(),
        })
    }

    /// Takes the gate for the event of `task` (the task the activation runs it as), waiting
    /// while another holds it; it is held until the returned [`Turn`] is dropped.
    pub(super) async fn begin(self: &Rc<Self>, task: TaskId) -> Turn {
        let mut lock = self.gate.lock(task);
        (&mut lock).await;
        self.live.borrow_mut().push(task);
        let old = self.holder.replace(Some((task, lock)));
        // Dropped outside the borrow; there is none (an event is delivered only through
        // the gate), but a lock is released by dropping it.
        drop(old);
        Turn {
            turns: self.clone(),
            task,
        }
    }

    /// The task of the event holding the gate, if one does.
    pub(super) fn holder(&self) -> Option<TaskId> {
        self.holder.borrow().as_ref().map(|(task, _)| *task)
    }

    /// Whether an event holds the gate: a call of the instance arriving now is that event's.
    pub(super) fn is_held(&self) -> bool {
        self.holder.borrow().is_some()
    }

    /// Lets other events in while the holder awaits a call on another object: releases the
    /// gate, and says whose it was (to [`Turns::resume`]).
    pub(super) fn pause(&self) -> Option<TaskId> {
        let (task, lock) = self.holder.borrow_mut().take()?;
        drop(lock);
        Some(task)
    }

    /// Takes the gate again for the paused event of `task`, before the result of its call
    /// goes back to it; nothing if it was answered meanwhile.
    pub(super) async fn resume(&self, task: TaskId) {
        let mut lock = self.gate.lock(task);
        (&mut lock).await;
        if !self.live.borrow().contains(&task) {
            return;
        }
        let old = self.holder.replace(Some((task, lock)));
        drop(old);
    }

    /// Lets a call of the instance in now, if it can be: as part of the event holding the
    /// gate, or under a lock of its own when the gate is open (work of the provider outside
    /// any event: no event is delivered until the call is done). `None` when another lock
    /// holds the gate (a storage call waiting for durability, or a reset predecessor's last
    /// commit settling): then [`Turns::enter`].
    pub(super) fn enter_now(&self) -> Option<Entry> {
        if self.is_held() {
            return Some(Entry(None));
        }
        let mut lock = self.gate.lock(gate::next_task_id());
        lock.try_now().then_some(Entry(Some(lock)))
    }

    /// [`Turns::enter_now`], waiting for the gate.
    pub(super) async fn enter(&self) -> Entry {
        if let Some(entry) = self.enter_now() {
            return entry;
        }
        let mut lock = self.gate.lock(gate::next_task_id());
        (&mut lock).await;
        Entry(Some(lock))
    }
}

/// An event's hold on the gate (see [`Turns::begin`]).
pub(super) struct Turn {
    turns: Rc<Turns>,
    task: TaskId,
}

impl Turn {
    /// The task the event runs as: [`Turns::holder`] while it holds the gate.
    pub(super) fn task(&self) -> TaskId {
        self.task
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.turns
            .live
            .borrow_mut()
            .retain(|task| *task != self.task);
        let mut holder = self.turns.holder.borrow_mut();
        if holder.as_ref().is_some_and(|(task, _)| *task == self.task) {
            let held = holder.take();
            drop(holder);
            drop(held);
        }
    }
}

/// A call of the instance let through the gate; its own lock, if it needed one, is released
/// when it is dropped.
pub(super) struct Entry(#[allow(dead_code)] Option<Lock>);

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn places_go_on_in_order_and_given_up_ones_are_skipped() {
        let turnstile = Rc::new(Turnstile::default());
        let first = turnstile.take();
        let second = turnstile.take();
        let third = turnstile.take();
        assert!(third.reached().now_or_never().is_none());
        assert!(second.reached().now_or_never().is_none());
        // Given up before the first went on: the third still waits for the first.
        drop(second);
        assert!(third.reached().now_or_never().is_none());
        assert!(first.reached().now_or_never().is_some());
        drop(first);
        assert!(third.reached().now_or_never().is_some());
    }

    #[test]
    fn an_event_holds_the_gate_until_it_ends_or_pauses() {
        let gate = Rc::new(InputGate::default());
        let turns = Turns::new(gate.clone());
        let turn = turns.begin(1).now_or_never().unwrap();
        assert!(gate.is_held() && turns.is_held());
        // A call of the instance during the event is the event's: no lock of its own.
        assert!(matches!(turns.enter_now(), Some(Entry(None))));
        assert_eq!(turns.pause(), Some(1));
        assert!(!gate.is_held());
        // Another event gets in while the first is paused...
        let other = turns.begin(2).now_or_never().unwrap();
        // ...and the first resumes only once it is done.
        let mut resume = Box::pin(turns.resume(1));
        assert!((&mut resume).now_or_never().is_none());
        drop(other);
        assert!(resume.now_or_never().is_some());
        assert!(turns.is_held());
        drop(turn);
        assert!(!gate.is_held());
        // Outside any event, a call takes a lock of its own.
        let entry = turns.enter_now().unwrap();
        assert!(gate.is_held() && !turns.is_held());
        drop(entry);
        assert!(!gate.is_held());
    }
}
