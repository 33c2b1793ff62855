//! The wall clock of alarms, injectable: [`SystemClock`] in production, [`ManualClock`] in tests,
//! so that a test of an alarm an hour away runs in milliseconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Longest a [`SystemClock`] sleep lasts before it looks at the clock again: the wall clock
/// may be set forward or back meanwhile, and an alarm must not fire early nor much too late.
const SLEEP_MS_MAX: u64 = 1000;

/// Milliseconds since the Unix epoch of `at` (0 before the epoch): the unit of alarm times.
pub fn system_time_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A wall clock in milliseconds since the Unix epoch, with a way to wait for a time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Resolves at `at_ms` or later, or earlier: the caller checks [`Clock::now_ms`] again.
    fn sleep_until(&self, at_ms: u64) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        system_time_ms(std::time::SystemTime::now())
    }

    fn sleep_until(&self, at_ms: u64) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let wait_ms = at_ms.saturating_sub(self.now_ms()).min(SLEEP_MS_MAX);
        Box::pin(tokio::time::sleep(Duration::from_millis(wait_ms)))
    }
}

/// A clock that moves only when told to ([`ManualClock::advance`], [`ManualClock::set`]); each
/// move wakes whoever sleeps on it. Cheap to clone; every clone is the same clock.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now_ms: Arc<tokio::sync::watch::Sender<u64>>,
}

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: u64) -> ManualClock {
        ManualClock {
            now_ms: Arc::new(tokio::sync::watch::Sender::new(now_ms)),
        }
    }

    /// A clock standing at the system's time now.
    pub fn at_system_time() -> ManualClock {
        ManualClock::new(SystemClock.now_ms())
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now_ms.send_modify(|now| *now = now.saturating_add(ms));
    }

    /// Sets the clock to `now_ms` (also backward).
    pub fn set(&self, now_ms: u64) {
        self.now_ms.send_replace(now_ms);
    }

    /// The clock as an `Arc<dyn Clock>`, for `Builder::clock`.
    pub fn shared(&self) -> Arc<dyn Clock> {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        *self.now_ms.borrow()
    }

    fn sleep_until(&self, at_ms: u64) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut changes = self.now_ms.subscribe();
        Box::pin(async move {
            // Fails only when the clock is dropped, which no sleeper outlives in practice.
            let _ = changes.wait_for(|now| *now >= at_ms).await;
        })
    }
}
