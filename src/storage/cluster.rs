//! Ownership of virtual shards among the nodes of a cluster, as one node sees it.
//!
//! In a cluster (`duro serve --store URL --node NAME`), every virtual shard is owned by one
//! node at a time, under a lease kept in the store (see `PostgresBackend`'s cluster queries).
//! Taking a shard raises its epoch in the same transaction, so a node that owned it before can
//! never commit for it again (fencing, see [`super::shards`]). [`Ownership`] is what the
//! node's event loops read on every call: which shards this node owns, under which epoch, until
//! when its leases hold by its own monotonic clock, and which node owns each other shard, so
//! that a call for an object there is passed on to it. Only the node's lease keeper writes it.
//!
//! # Time
//!
//! A lease's expiry is the database's clock plus the lease time, set by the statement that
//! renews it. The node cannot read that clock, but it knows when it sent the renewal: the
//! expiry is at least that instant plus the lease time, in real time. So the node treats its
//! leases as held until the instant it sent the last successful renewal plus
//! [`LOCAL_SHARE`] of the lease time (by its monotonic clock, which a pause does not fool:
//! after a `SIGSTOP` the deadline has passed). Past its deadline a node serves no call of the
//! shards it believes it owns; another node takes them only once the database's clock passed
//! the expiry, which is later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// The share of the lease time a node counts its leases as held after it sent the renewal
/// that the database accepted: the rest covers its clock running at another rate than the
/// database's.
pub const LOCAL_SHARE: f64 = 0.9;

/// Another node of the cluster, as the store lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddr {
    /// Its name (`--node`), unique in the cluster.
    pub name: String,
    /// Where other nodes reach it (`--advertise`), `HOST:PORT`.
    pub advertise: String,
}

/// Where the objects of a virtual shard are served now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// On this node, under this epoch.
    Here(u64),
    /// On another node.
    Node(Arc<NodeAddr>),
    /// Nowhere now: no node holds a live lease on it (or this node's lapsed); retry shortly.
    Nobody,
}

/// Which virtual shards this node owns, under which epochs, until when; and who owns the
/// others. Shared by the node's event loops (read on every call) and its lease keeper (the one
/// writer).
pub struct Ownership {
    node: String,
    /// The instant the deadline counts from.
    base: Instant,
    /// The epoch under which this node owns virtual shard `i`; 0 when it does not.
    epochs: Vec<AtomicU64>,
    /// Nanoseconds after `base` until which this node's leases hold.
    deadline_ns: AtomicU64,
    /// The owner of every virtual shard this node does not own, by the last read of the store.
    owners: RwLock<Vec<Option<Arc<NodeAddr>>>>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("node", &self.node)
            .field("owned", &self.owned().len())
            .finish_non_exhaustive()
    }
}

impl Ownership {
    /// Node `node`'s view of `count` virtual shards: none owned yet.
    pub fn new(node: &str, count: u32) -> Arc<Ownership> {
        Arc::new(Ownership {
            node: node.to_owned(),
            base: Instant::now(),
            epochs: (0..count).map(|_| AtomicU64::new(0)).collect(),
            deadline_ns: AtomicU64::new(0),
            owners: RwLock::new(vec![None; count as usize]),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The virtual shard count.
    pub fn count(&self) -> u32 {
        self.epochs.len() as u32
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Whether this node's leases still hold by its own clock.
    pub fn leases_hold(&self) -> bool {
        self.now_ns() < self.deadline_ns.load(Ordering::Acquire)
    }

    /// Where the objects of `shard` are served now.
    pub fn route(&self, shard: u32) -> Route {
        let epoch = self.epochs[shard as usize].load(Ordering::Acquire);
        if epoch != 0 {
            return match self.leases_hold() {
                true => Route::Here(epoch),
                false => Route::Nobody,
            };
        }
        let owners = self.owners.read().unwrap_or_else(PoisonError::into_inner);
        match &owners[shard as usize] {
            Some(node) => Route::Node(node.clone()),
            None => Route::Nobody,
        }
    }

    /// Whether an activation made under `epoch` for an object of `shard` may still serve a
    /// call: this node owns the shard under that same epoch and its leases hold.
    pub fn holds(&self, shard: u32, epoch: u64) -> bool {
        epoch != 0
            && self.epochs[shard as usize].load(Ordering::Acquire) == epoch
            && self.leases_hold()
    }

    /// The epoch this node owns `shard` under; 0 when it does not.
    pub fn epoch(&self, shard: u32) -> u64 {
        self.epochs[shard as usize].load(Ordering::Acquire)
    }

    /// The shards this node owns, with their epochs, in shard order.
    pub fn owned(&self) -> Vec<(u32, u64)> {
        let epochs = self.epochs.iter().map(|e| e.load(Ordering::Acquire));
        let owned = epochs.enumerate().filter(|&(_, epoch)| epoch != 0);
        owned.map(|(shard, epoch)| (shard as u32, epoch)).collect()
    }

    /// Records that this node owns `shard` under `epoch` (0: no longer owns it).
    pub fn set_epoch(&self, shard: u32, epoch: u64) {
        self.epochs[shard as usize].store(epoch, Ordering::Release);
    }

    /// This node's leases hold until `sent + lease × LOCAL_SHARE`, where `sent` is when the
    /// renewal the store accepted was sent. Never moves the deadline back.
    pub fn renewed(&self, sent: Instant, lease: Duration) {
        let until = sent + lease.mul_f64(LOCAL_SHARE);
        let ns = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.deadline_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Ends this node's leases now, by its own clock (it is draining, or lost the store).
    pub fn lapse(&self) {
        self.deadline_ns.store(0, Ordering::Release);
    }

    /// The owners of the shards this node does not own, from a read of the store.
    pub fn set_owners(&self, owners: Vec<Option<Arc<NodeAddr>>>) {
        let mut current = self.owners.write().unwrap_or_else(PoisonError::into_inner);
        *current = owners;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_is_served_here_only_while_the_leases_hold() {
        let ownership = Ownership::new("a", 4);
        assert_eq!(ownership.route(1), Route::Nobody);
        ownership.set_epoch(1, 7);
        // Owned, but no renewal yet: the lease does not hold.
        assert_eq!(ownership.route(1), Route::Nobody);
        assert!(!ownership.holds(1, 7));
        ownership.renewed(Instant::now(), Duration::from_secs(60));
        assert_eq!(ownership.route(1), Route::Here(7));
        assert!(ownership.holds(1, 7));
        // An activation made under another epoch may not serve.
        assert!(!ownership.holds(1, 6));
        assert!(!ownership.holds(1, 0));
        ownership.lapse();
        assert_eq!(ownership.route(1), Route::Nobody);
        assert!(!ownership.holds(1, 7));
    }

    #[test]
    fn a_renewal_sent_long_ago_does_not_hold() {
        let ownership = Ownership::new("a", 1);
        ownership.set_epoch(0, 1);
        let sent = Instant::now();
        ownership.renewed(sent, Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!ownership.leases_hold());
        // An older renewal does not move the deadline back.
        ownership.renewed(Instant::now(), Duration::from_secs(60));
        ownership.renewed(sent, Duration::from_millis(20));
        assert!(ownership.leases_hold());
    }

    #[test]
    fn other_shards_route_to_their_owner() {
        let ownership = Ownership::new("a", 3);
        let b = Arc::new(NodeAddr {
            name: "b".into(),
            advertise: "127.0.0.1:1".into(),
        });
        ownership.set_owners(vec![None, Some(b.clone()), None]);
        assert_eq!(ownership.route(1), Route::Node(b));
        assert_eq!(ownership.route(2), Route::Nobody);
        assert_eq!(ownership.owned(), vec![]);
        ownership.set_epoch(2, 3);
        assert_eq!(ownership.owned(), vec![(2, 3)]);
    }
}
