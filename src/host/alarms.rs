//! The alarm scheduler: delivers each object's alarm at or after its time.
//!
//! Alarms live in the backend's time-ordered index; the scheduler keeps a bounded window of the
//! next ones ([`WINDOW_MAX`]) and refills it from the index, so memory does not grow with the
//! number of alarms. Every committed change of an alarm reaches it (the `on_alarm` hook of the
//! storage), so the window stays exact up to its horizon. A due alarm is delivered like a
//! request ([`Activation::alarm`]), at most [`IN_FLIGHT_MAX`] at once so that a burst of due
//! alarms cannot starve requests. A failed delivery is retried with exponential backoff, at most
//! [`RETRIES_MAX`] times, then the alarm is deleted.
//!
//! [`Window`] is the state machine (no I/O); [`run`] is its shell.
//!
//! Retry counts live in memory: after a restart an overdue alarm fires at once with
//! `retry_count` 0, and an alarm whose retry is pending may leave the window when a thousand
//! earlier alarms enter it, to come back later with a count of 0.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use tokio::sync::Notify;

use super::HostInner;
use super::class::AlarmInfo;
use crate::clock::Clock;
use crate::metrics::AlarmMetrics;
use crate::storage::{AlarmEntry, ObjectKey};

/// Most alarms the scheduler keeps in memory: the next ones by time. It refills from the index
/// when half are gone.
pub(crate) const WINDOW_MAX: usize = 1024;

/// Most alarms being delivered at once, over the host: the others wait, so that requests keep
/// their share of the event loop and of the objects' queues.
pub(crate) const IN_FLIGHT_MAX: usize = 256;

/// Most retries of a failed alarm before it is deleted.
pub(crate) const RETRIES_MAX: u32 = 6;

/// The first retry's delay; each next one doubles it (± [`JITTER`]).
const BACKOFF_FIRST_MS: u64 = 2000;

/// Relative jitter of a retry delay: spreads the retries of alarms that failed together.
const JITTER: f64 = 0.2;

/// One alarm in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    /// When it is next delivered: its time, or later for a retry.
    due_ms: u64,
    /// Deliveries that failed so far.
    retries: u32,
}

/// What the scheduler knows of the next alarms: a window of the index, plus retry state.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// The alarms known, by (time, object): every index entry up to `horizon`.
    slots: BTreeMap<AlarmEntry, Slot>,
    /// The time of each object's alarm in `slots`.
    at_of: HashMap<ObjectKey, u64>,
    /// The last index entry loaded; `None` before the first load.
    horizon: Option<AlarmEntry>,
    /// Whether the window holds the whole index (the last load came back short).
    complete: bool,
    /// Objects whose alarm is being delivered: never two deliveries to one object at once.
    in_flight: HashSet<ObjectKey>,
}

/// What to do after a failed delivery.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Deliver again at `due_ms`.
    Retry { due_ms: u64 },
    /// Out of retries: delete the alarm.
    GiveUp,
    /// The alarm changed meanwhile: nothing to retry.
    Gone,
}

impl Window {
    /// Whether the window should be refilled from the index, and from where.
    pub(crate) fn wants_refill(&self) -> Option<Option<AlarmEntry>> {
        (!self.complete && self.slots.len() <= WINDOW_MAX / 2).then_some(self.horizon)
    }

    /// Adds index entries read after `horizon`, those of objects that are `mine` (the host's
    /// shard's: the index holds every shard's alarms); `asked` is how many were asked for.
    pub(crate) fn refill(
        &mut self,
        entries: Vec<AlarmEntry>,
        asked: usize,
        mine: impl Fn(&ObjectKey) -> bool,
    ) {
        self.complete = entries.len() < asked;
        for &(at_ms, object) in &entries {
            if mine(&object) && !self.at_of.contains_key(&object) {
                self.insert(at_ms, object, 0);
            }
        }
        if let Some(last) = entries.last() {
            self.horizon = Some(*last);
        }
    }

    /// How many entries a refill asks for.
    pub(crate) fn refill_size(&self) -> usize {
        WINDOW_MAX - self.slots.len()
    }

    fn insert(&mut self, at_ms: u64, object: ObjectKey, retries: u32) {
        let slot = Slot {
            due_ms: at_ms,
            retries,
        };
        self.slots.insert((at_ms, object), slot);
        self.at_of.insert(object, at_ms);
    }

    fn remove(&mut self, object: &ObjectKey) -> Option<(u64, Slot)> {
        let at_ms = self.at_of.remove(object)?;
        let slot = self.slots.remove(&(at_ms, *object))?;
        Some((at_ms, slot))
    }

    /// A committed change: `object`'s alarm is now `alarm`.
    pub(crate) fn changed(&mut self, object: ObjectKey, alarm: Option<u64>) {
        self.remove(&object);
        let Some(at_ms) = alarm else { return };
        // Past the horizon, the index has it and a later refill brings it.
        let within = self.complete || self.horizon.is_some_and(|h| (at_ms, object) <= h);
        if within {
            self.insert(at_ms, object, 0);
            self.trim();
        }
    }

    /// Keeps the window at [`WINDOW_MAX`]: the latest alarms leave, and the horizon moves back.
    fn trim(&mut self) {
        while self.slots.len() > WINDOW_MAX {
            let Some(((at_ms, object), _)) = self.slots.pop_last() else {
                return;
            };
            self.at_of.remove(&object);
            self.complete = false;
            self.horizon = self.slots.last_key_value().map(|(k, _)| *k);
            if self.horizon.is_none() {
                self.horizon = Some((at_ms.saturating_sub(1), object));
            }
        }
    }

    /// Takes the alarms due at `now_ms`, at most up to [`IN_FLIGHT_MAX`] in flight: each as
    /// (object, time, retries so far). They stay in the window until they are done.
    pub(crate) fn take_due(&mut self, now_ms: u64) -> Vec<(ObjectKey, u64, u32)> {
        let mut due = Vec::new();
        for (&(at_ms, object), slot) in &self.slots {
            if self.in_flight.len() + due.len() >= IN_FLIGHT_MAX || at_ms > now_ms {
                break;
            }
            if slot.due_ms <= now_ms && !self.in_flight.contains(&object) {
                due.push((object, at_ms, slot.retries));
            }
        }
        for (object, _, _) in &due {
            self.in_flight.insert(*object);
        }
        due
    }

    /// When the next alarm not in flight is due, if any is known.
    pub(crate) fn next_due(&self) -> Option<u64> {
        let waiting = self.slots.iter();
        let waiting = waiting.filter(|((_, object), _)| !self.in_flight.contains(object));
        waiting.map(|(_, slot)| slot.due_ms).min()
    }

    /// The delivery of `object`'s alarm at `at_ms` succeeded. The alarm's deletion (or the
    /// object's new alarm) arrives through [`Window::changed`].
    pub(crate) fn succeeded(&mut self, object: ObjectKey) {
        self.in_flight.remove(&object);
    }

    /// The delivery of `object`'s alarm at `at_ms` failed at `now_ms`; `jitter` in [-1, 1].
    pub(crate) fn failed(
        &mut self,
        object: ObjectKey,
        at_ms: u64,
        now_ms: u64,
        jitter: f64,
    ) -> Failure {
        self.in_flight.remove(&object);
        let Some(slot) = self.slots.get_mut(&(at_ms, object)) else {
            return Failure::Gone;
        };
        if slot.retries >= RETRIES_MAX {
            self.remove(&object);
            return Failure::GiveUp;
        }
        slot.retries += 1;
        slot.due_ms = now_ms.saturating_add(backoff_ms(slot.retries, jitter));
        Failure::Retry {
            due_ms: slot.due_ms,
        }
    }
}

/// The delay before retry `n` (1-based): 2^n s, times 1 ± [`JITTER`] × `jitter`.
pub(crate) fn backoff_ms(n: u32, jitter: f64) -> u64 {
    let base = BACKOFF_FIRST_MS << n.saturating_sub(1).min(30);
    let factor = 1.0 + JITTER * jitter.clamp(-1.0, 1.0);
    (base as f64 * factor) as u64
}

/// A random jitter in [-1, 1].
fn random_jitter() -> f64 {
    let mut bytes = [0u8; 2];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.0;
    }
    f64::from(u16::from_be_bytes(bytes)) / f64::from(u16::MAX) * 2.0 - 1.0
}

/// The scheduler of one host: its window, its clock, and what wakes it.
pub(crate) struct Scheduler {
    window: RefCell<Window>,
    clock: Arc<dyn Clock>,
    /// Woken by alarm changes and finished deliveries.
    wake: Notify,
    host: Weak<HostInner>,
    /// The server's counts of alarms.
    metrics: AlarmMetrics,
    /// Bumped by every change to the window from outside its refills (a committed alarm
    /// change, a reload): a refill read off the event loop is applied only if none came
    /// meanwhile, since the index it read may be older than the change.
    changes: std::cell::Cell<u64>,
    /// Refills read off the event loop and dropped for a change meanwhile, in a row.
    refills_dropped: std::cell::Cell<u32>,
}

/// Refills dropped in a row before one is read on the event loop instead, so that a stream of
/// changes cannot keep the window from refilling.
const REFILLS_DROPPED_MAX: u32 = 3;

impl Scheduler {
    /// Starts the scheduler of `host` as a local task, hooked to the storage's alarm changes.
    pub(crate) fn start(host: &Rc<HostInner>, clock: Arc<dyn Clock>) {
        let scheduler = Rc::new(Scheduler {
            window: RefCell::default(),
            clock,
            wake: Notify::new(),
            host: Rc::downgrade(host),
            metrics: host.metrics.alarms().clone(),
            changes: std::cell::Cell::new(0),
            refills_dropped: std::cell::Cell::new(0),
        });
        *host.scheduler.borrow_mut() = Rc::downgrade(&scheduler);
        let hooked = Rc::downgrade(&scheduler);
        *host.storage.on_alarm.borrow_mut() = Some(Rc::new(move |object, alarm| {
            if let Some(scheduler) = hooked.upgrade() {
                if alarm.is_some() {
                    scheduler.metrics.set.inc();
                }
                scheduler.window.borrow_mut().changed(object, alarm);
                scheduler.changes.set(scheduler.changes.get() + 1);
                scheduler.wake.notify_one();
            }
        }));
        tokio::task::spawn_local(run(scheduler));
    }

    /// Forgets the window and reads it again from the start of the index: the objects the host
    /// serves changed (its node took virtual shards of the cluster), and the alarms of the new
    /// ones were skipped before. Deliveries in flight stay so until they settle.
    pub(crate) fn reload(&self) {
        {
            let mut window = self.window.borrow_mut();
            let in_flight = std::mem::take(&mut window.in_flight);
            *window = Window {
                in_flight,
                ..Window::default()
            };
        }
        self.changes.set(self.changes.get() + 1);
        self.wake.notify_one();
    }

    /// Refills the window from the index if it is low: off the event loop when the engine's
    /// reads are remote (a round trip to PostgreSQL), applied only if no change came meanwhile.
    async fn refill(&self, host: &Rc<HostInner>) {
        let (after, asked) = {
            let window = self.window.borrow();
            match window.wants_refill() {
                Some(after) => (after, window.refill_size()),
                None => return,
            }
        };
        let backend = host.storage.backend.clone();
        let off_loop = backend.remote_reads() && self.refills_dropped.get() < REFILLS_DROPPED_MAX;
        let read = match off_loop {
            true => {
                let before = self.changes.get();
                let read = tokio::task::spawn_blocking(move || backend.next_alarms(after, asked));
                let read = read.await.unwrap_or(Err(crate::storage::Error::Closed));
                if self.changes.get() != before {
                    // The window moved while the index was read: read again next time.
                    self.refills_dropped.set(self.refills_dropped.get() + 1);
                    self.wake.notify_one();
                    return;
                }
                read
            }
            false => backend.next_alarms(after, asked),
        };
        self.refills_dropped.set(0);
        match read {
            Ok(entries) => {
                let placement = host.placement;
                let mine = |object: &ObjectKey| {
                    !placement.is_remote(&object.id) && host.serves_shard_of(&object.id)
                };
                self.window.borrow_mut().refill(entries, asked, mine);
            }
            Err(error) => tracing::warn!(%error, "reading the alarm index"),
        }
    }

    /// Delivers `object`'s alarm, then settles the outcome.
    async fn deliver(self: Rc<Self>, object: ObjectKey, at_ms: u64, retries: u32) {
        if retries == 0 {
            let late_ms = self.clock.now_ms().saturating_sub(at_ms);
            let late = std::time::Duration::from_millis(late_ms);
            self.metrics.late_seconds.observe_duration(late);
        }
        let outcome = match self.host.upgrade() {
            Some(host) => deliver(&host, object, at_ms, retries).await,
            None => return,
        };
        let now_ms = self.clock.now_ms();
        match outcome {
            Ok(()) => {
                self.metrics.fired.inc();
                self.window.borrow_mut().succeeded(object);
            }
            Err(error) => {
                let failure =
                    self.window
                        .borrow_mut()
                        .failed(object, at_ms, now_ms, random_jitter());
                self.failed(object, at_ms, failure, &error);
            }
        }
        self.wake.notify_one();
    }

    fn failed(&self, object: ObjectKey, at_ms: u64, failure: Failure, error: &crate::Error) {
        match failure {
            Failure::Retry { due_ms } => {
                self.metrics.retried.inc();
                tracing::debug!(?object, at_ms, due_ms, %error, "alarm failed; retrying");
            }
            Failure::GiveUp => {
                self.metrics.given_up.inc();
                tracing::warn!(?object, at_ms, %error, "alarm failed {RETRIES_MAX} retries; dropped");
                if let Some(host) = self.host.upgrade() {
                    delete_if_unchanged(&host, object, at_ms);
                }
            }
            Failure::Gone => {}
        }
    }
}

/// The scheduler's loop: refill, start what is due, sleep until the next is due or a change.
async fn run(scheduler: Rc<Scheduler>) {
    loop {
        let Some(host) = scheduler.host.upgrade() else {
            return;
        };
        if host.closing.get() {
            return;
        }
        scheduler.refill(&host).await;
        drop(host);
        let now_ms = scheduler.clock.now_ms();
        let due = scheduler.window.borrow_mut().take_due(now_ms);
        for (object, at_ms, retries) in due {
            tokio::task::spawn_local(scheduler.clone().deliver(object, at_ms, retries));
        }
        let next = scheduler.window.borrow().next_due();
        let notified = scheduler.wake.notified();
        match next {
            Some(at_ms) => {
                tokio::select! {
                    () = scheduler.clock.sleep_until(at_ms) => {}
                    () = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Delivers the alarm to its object's activation, built if the object is not active.
async fn deliver(
    host: &Rc<HostInner>,
    object: ObjectKey,
    at_ms: u64,
    retries: u32,
) -> Result<(), crate::Error> {
    let namespace = host
        .namespaces
        .values()
        .find(|ns| ns.tag == object.tag)
        .cloned()
        .ok_or_else(|| crate::Error::InvalidArgument("no namespace of the alarm's tag".into()))?;
    if !host.serves_shard_of(&object.id) {
        let shard = host.storage.shards.shard_of(&object.id);
        return Err(super::cluster::not_owner(shard, None));
    }
    let id = namespace.minter.borrow().check(&object.id, None)?;
    let activation = namespace.activation(id)?;
    activation.alarm(at_ms, AlarmInfo::new(retries)).await
}

/// Deletes `object`'s alarm if it is still the one at `at_ms`.
fn delete_if_unchanged(host: &Rc<HostInner>, object: ObjectKey, at_ms: u64) {
    let Some(namespace) = host.namespaces.values().find(|ns| ns.tag == object.tag) else {
        return;
    };
    if !host.serves_shard_of(&object.id) {
        return;
    }
    let Ok(id) = namespace.minter.borrow().check(&object.id, None) else {
        return;
    };
    let Ok(activation) = namespace.activation(id) else {
        return;
    };
    if activation.store.alarm().ok() == Some(Some(at_ms)) {
        let _ = activation.store.write_alarm(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(id: u8) -> ObjectKey {
        ObjectKey {
            tag: 1,
            id: [id; 32],
        }
    }

    #[test]
    fn backoff_doubles_from_two_seconds_with_bounded_jitter() {
        let delays: Vec<u64> = (1..=6).map(|n| backoff_ms(n, 0.0)).collect();
        assert_eq!(delays, [2000, 4000, 8000, 16000, 32000, 64000]);
        assert_eq!(backoff_ms(1, 1.0), 2400);
        assert_eq!(backoff_ms(1, -1.0), 1600);
    }

    #[test]
    fn due_alarms_go_in_time_order_once() {
        let mut w = Window::default();
        w.refill(vec![(10, obj(1)), (20, obj(2)), (30, obj(3))], 8, |_| true);
        assert_eq!(w.wants_refill(), None);
        assert_eq!(w.take_due(5), vec![]);
        assert_eq!(w.next_due(), Some(10));
        assert_eq!(w.take_due(20), vec![(obj(1), 10, 0), (obj(2), 20, 0)]);
        assert_eq!(w.take_due(20), vec![], "in flight: not delivered twice");
        assert_eq!(w.next_due(), Some(30));
        w.succeeded(obj(1));
        w.changed(obj(1), None);
        assert_eq!(w.take_due(100), vec![(obj(3), 30, 0)]);
    }

    #[test]
    fn failures_retry_with_backoff_then_give_up() {
        let mut w = Window::default();
        w.refill(vec![(10, obj(1))], 8, |_| true);
        let mut now = 10;
        for n in 1..=RETRIES_MAX {
            assert_eq!(w.take_due(now), vec![(obj(1), 10, n - 1)]);
            let due_ms = now + backoff_ms(n, 0.0);
            assert_eq!(w.failed(obj(1), 10, now, 0.0), Failure::Retry { due_ms });
            assert_eq!(w.take_due(due_ms - 1), vec![]);
            now = due_ms;
        }
        assert_eq!(w.take_due(now), vec![(obj(1), 10, RETRIES_MAX)]);
        assert_eq!(w.failed(obj(1), 10, now, 0.0), Failure::GiveUp);
        assert_eq!(w.next_due(), None);
    }

    #[test]
    fn a_change_during_delivery_replaces_the_alarm() {
        let mut w = Window::default();
        w.refill(vec![(10, obj(1))], 8, |_| true);
        assert_eq!(w.take_due(10).len(), 1);
        w.changed(obj(1), Some(50));
        assert_eq!(w.failed(obj(1), 10, 11, 0.0), Failure::Gone);
        assert_eq!(w.take_due(49), vec![]);
        assert_eq!(w.take_due(50), vec![(obj(1), 50, 0)]);
    }

    #[test]
    fn the_window_is_bounded_and_refills_from_its_horizon() {
        let mut w = Window::default();
        let index: Vec<AlarmEntry> = (0..3000u64)
            .map(|i| {
                (
                    i,
                    ObjectKey {
                        tag: 1,
                        id: [0; 32],
                    },
                )
            })
            .map(|(i, mut o)| {
                o.id[..8].copy_from_slice(&i.to_be_bytes());
                (i, o)
            })
            .collect();
        let mut fired = 0;
        loop {
            if let Some(after) = w.wants_refill() {
                let start = after.map_or(0, |a| index.iter().position(|e| *e == a).unwrap() + 1);
                let asked = w.refill_size();
                let page = index[start..].iter().take(asked).copied().collect();
                w.refill(page, asked, |_| true);
            }
            assert!(w.slots.len() <= WINDOW_MAX);
            let due = w.take_due(u64::MAX);
            if due.is_empty() {
                break;
            }
            assert!(due.len() <= IN_FLIGHT_MAX);
            for (object, _, _) in due {
                w.succeeded(object);
                w.changed(object, None);
                fired += 1;
            }
        }
        assert_eq!(fired, index.len());
        // A change past the horizon of an incomplete window waits for a refill.
        let mut w = Window::default();
        w.refill(index[..4].to_vec(), 4, |_| true);
        w.changed(obj(9), Some(5000));
        assert!(!w.at_of.contains_key(&obj(9)));
        w.changed(obj(9), Some(1));
        assert!(w.at_of.contains_key(&obj(9)));
    }
}
