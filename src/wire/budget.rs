//! The host-wide budget of bytes in flight, and each connection's account in it.
//!
//! What a connection costs the host beyond its fixed buffers is what it sent and what it is
//! owed: the part of a message received so far, the parameters of its calls that have not
//! answered, and the responses produced for it that are not yet written to its socket. Each
//! connection's account counts these; the budget counts them over all connections.
//!
//! - A connection whose account is over its fair share (the budget divided among the open
//!   connections, but never less than one whole message) is not read until it drains: a client
//!   that does not read its answers, or floods calls, slows only itself.
//! - A call that would take its connection over its share, or the host over the budget, is
//!   refused (`overloaded`) and its parameters dropped.
//!
//! Everything here is on one event-loop thread: counters are `Cell`s.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::Waker;

use super::MESSAGE_BYTES_MAX;

/// The least share of a connection: one whole message of the largest size, and a read's
/// worth more, so that one connection alone can always make progress.
pub const SHARE_BYTES_MIN: usize = MESSAGE_BYTES_MAX + (64 << 10);

/// The bytes in flight of every connection of a host.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    used: Cell<usize>,
    connections: Cell<usize>,
}

impl Budget {
    /// A budget of `max` bytes in flight.
    pub fn new(max: usize) -> Rc<Budget> {
        Rc::new(Budget {
            max,
            used: Cell::new(0),
            connections: Cell::new(0),
        })
    }

    /// Bytes in flight now, over all connections.
    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// The budget.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A connection's fair share now.
    fn share(&self) -> usize {
        (self.max / self.connections.get().max(1)).max(SHARE_BYTES_MIN)
    }
}

/// One connection's account: what it holds in flight. Dropped with the connection, which gives
/// back whatever it still held.
#[derive(Debug)]
pub struct Account {
    budget: Rc<Budget>,
    /// Bytes received or admitted for this connection and not yet given back.
    held: Cell<usize>,
    /// Bytes of responses produced for it and not yet written to its socket: a lower bound of
    /// each (its payload), as the writer gives back every byte it writes, down to zero; an
    /// estimate above the real size would leave its excess owed for good.
    owed: Cell<usize>,
    /// The reader paused because the account is over its share.
    paused_reader: RefCell<Option<Waker>>,
}

impl Account {
    /// Opens an account for a new connection.
    pub fn open(budget: &Rc<Budget>) -> Rc<Account> {
        budget.connections.set(budget.connections.get() + 1);
        Rc::new(Account {
            budget: budget.clone(),
            held: Cell::new(0),
            owed: Cell::new(0),
            paused_reader: RefCell::new(None),
        })
    }

    /// Bytes this connection has in flight.
    pub fn in_flight(&self) -> usize {
        self.held.get() + self.owed.get()
    }

    /// Whether the connection is over its fair share: its reader should wait.
    pub fn over_share(&self) -> bool {
        self.in_flight() > self.budget.share()
    }

    /// Counts `bytes` that arrived (they are in memory whatever we decide).
    pub fn hold(&self, bytes: usize) {
        self.held.set(self.held.get() + bytes);
        self.budget.used.set(self.budget.used.get() + bytes);
    }

    /// Counts `bytes` for a new call if that keeps the connection within its share and the
    /// host within its budget; whether it did.
    pub fn try_hold(&self, bytes: usize) -> bool {
        let within_share = self.in_flight() + bytes <= self.budget.share();
        let within_budget = self.budget.used.get() + bytes <= self.budget.max;
        if !(within_share && within_budget) {
            return false;
        }
        self.hold(bytes);
        true
    }

    /// Gives back `bytes` held.
    pub fn release(&self, bytes: usize) {
        let bytes = bytes.min(self.held.get());
        self.held.set(self.held.get() - bytes);
        self.budget.used.set(self.budget.used.get() - bytes);
        self.wake_reader();
    }

    /// Counts a response of at least `bytes` produced for the connection, until it is written.
    /// `bytes` must not exceed what the writer will write for it (see the field `owed`).
    pub fn owe(&self, bytes: usize) {
        self.owed.set(self.owed.get() + bytes);
        self.budget.used.set(self.budget.used.get() + bytes);
    }

    /// `bytes` were written to the connection's socket.
    pub fn written(&self, bytes: usize) {
        let bytes = bytes.min(self.owed.get());
        if bytes == 0 {
            return;
        }
        self.owed.set(self.owed.get() - bytes);
        self.budget.used.set(self.budget.used.get() - bytes);
        self.wake_reader();
    }

    /// Parks the reader until the account is back under its share.
    pub fn pause_reader(&self, waker: &Waker) {
        *self.paused_reader.borrow_mut() = Some(waker.clone());
    }

    fn wake_reader(&self) {
        if self.over_share() {
            return;
        }
        let waker = self.paused_reader.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let budget = &self.budget;
        budget.used.set(budget.used.get() - self.in_flight());
        budget.connections.set(budget.connections.get() - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_the_budget_but_never_below_one_message() {
        let budget = Budget::new(100 * SHARE_BYTES_MIN);
        let a = Account::open(&budget);
        assert!(a.try_hold(50 * SHARE_BYTES_MIN));
        let b = Account::open(&budget);
        // Two connections: a is over its half now, b is not.
        assert!(!a.try_hold(1));
        assert!(b.try_hold(SHARE_BYTES_MIN));
        let many: Vec<_> = (0..1000).map(|_| Account::open(&budget)).collect();
        assert_eq!(budget.share(), SHARE_BYTES_MIN);
        drop(many);
        a.release(50 * SHARE_BYTES_MIN);
        assert_eq!(budget.used(), SHARE_BYTES_MIN);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_host_budget_bounds_every_connection_together() {
        let budget = Budget::new(SHARE_BYTES_MIN);
        let a = Account::open(&budget);
        let b = Account::open(&budget);
        assert!(a.try_hold(SHARE_BYTES_MIN - 10));
        assert!(!b.try_hold(11), "past the host's budget");
        assert!(b.try_hold(10));
    }

    #[test]
    fn what_is_owed_is_given_back_as_it_is_written() {
        let budget = Budget::new(2 * SHARE_BYTES_MIN);
        let a = Account::open(&budget);
        a.owe(3 * SHARE_BYTES_MIN);
        assert!(a.over_share());
        a.written(2 * SHARE_BYTES_MIN);
        assert!(!a.over_share());
        // Writes beyond what was owed (protocol messages, small returns) give back nothing.
        a.written(10 * SHARE_BYTES_MIN);
        assert_eq!(a.in_flight(), 0);
        assert_eq!(budget.used(), 0);
    }
}
