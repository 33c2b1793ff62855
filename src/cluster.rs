//! A node of a cluster: its lease keeper.
//!
//! Several `duro serve --store URL --node NAME` processes share one PostgreSQL store. Each
//! virtual shard is owned by one node under a lease in the store (see
//! `PostgresBackend::heartbeat` and `acquire`); this module keeps this node's part of it, on a
//! thread of its own, every [`tick`](ClusterOptions::tick):
//!
//! 1. **Heartbeat**: one transaction records the node alive, renews every lease it holds, and
//!    reads the cluster (nodes, every shard's owner and epoch, by the database's clock). The
//!    node's leases then hold, by its own monotonic clock, until the heartbeat's send time plus
//!    90% of the lease time ([`Ownership::renewed`]).
//! 2. **Losses**: a shard this node believed it owned that the store no longer gives it (its
//!    lease expired while the node was paused or cut off, and another node took it, raising the
//!    epoch) is dropped at once: its objects are reset on every event loop. Their commits were
//!    fenced already.
//! 3. **Balance**: the fair share is the shard count over the live nodes that are not draining,
//!    rounded up. Below it, the node takes free shards (no owner, or an expired lease) — all it
//!    needs at once, so that a dead node's shards are taken as soon as its leases expire.
//!    Above it, it hands at most [`MOVES_PER_SECOND`] shards off per second: it stops serving
//!    them, lets their calls in progress finish (for up to [`HANDOFF_CALLS_WAIT`], and at most a
//!    fifth of the lease, so that the heartbeats go on), resets their objects, waits for their
//!    commits, and releases the leases, which the nodes below their share then take.
//! 4. **Routes**: every shard another node holds a live lease on routes there; a call for one of
//!    its objects is passed to that node over a capnp link (`Host.nodeLink`).
//!
//! When the store cannot be reached, the node keeps serving until its leases lapse by its own
//! clock, then serves nothing until it reaches the store again. `SIGTERM` drains the node:
//! it says it drains (the others stop counting it), hands every shard off, and leaves the list
//! of nodes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::host::{Host, Job};
use crate::shards::Queues;
use crate::storage::cluster::{NodeAddr, Ownership};
use crate::storage::{ClusterView, PostgresBackend};

/// Most virtual shards a node hands off per second to even out ownership (a node taking a
/// dead node's shards, or free ones, is not bounded: they serve nobody meanwhile).
pub const MOVES_PER_SECOND: usize = 32;

/// How long a hand-off waits for the calls in progress on the shards' objects to finish before
/// it resets them (at most: see [`ClusterOptions::handoff_wait`]).
pub const HANDOFF_CALLS_WAIT: Duration = Duration::from_secs(2);

/// The lease time of a node started without `--lease-ms`.
pub const LEASE_DEFAULT: Duration = Duration::from_secs(5);

/// How long the lease keeper waits for the event loops to give up the objects of shards
/// before it goes on (a hand-off waits for calls in progress for part of it).
const GIVE_UP_WAIT: Duration = Duration::from_secs(10);

/// What makes a server a node of a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The node's name, unique in the cluster (`--node`).
    pub node: String,
    /// Where the other nodes reach this one, `HOST:PORT` (`--advertise`).
    pub advertise: String,
    /// How long a lease holds after its renewal, by the database's clock (`--lease-ms`). A
    /// dead node's shards are served again within about this time.
    pub lease: Duration,
    /// TLS on the links to the other nodes, whose listeners have it (`--tls-cert`): the
    /// authorities that vouch for their certificates (`--cluster-ca`). A node's certificate
    /// must be valid for the host of its advertised address. `None`: plain TCP.
    pub tls: Option<crate::tls::ClientTls>,
}

impl ClusterOptions {
    /// How often the node heartbeats: a fifth of the lease time, so that a renewal can fail a
    /// few times before the leases lapse.
    pub fn tick(&self) -> Duration {
        self.lease / 5
    }

    /// How long a hand-off waits for calls in progress: [`HANDOFF_CALLS_WAIT`], or a fifth of
    /// the lease when that is shorter, since the keeper does not heartbeat meanwhile.
    pub fn handoff_wait(&self) -> Duration {
        HANDOFF_CALLS_WAIT.min(self.lease / 5)
    }
}

enum Command {
    /// Hand every shard off and leave; answer when done.
    Drain(tokio::sync::oneshot::Sender<()>),
}

/// The lease keeper's thread.
pub(crate) struct Keeper {
    commands: mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    /// Joins the cluster and starts keeping this node's leases; `first` is told once the first
    /// round (which takes the node's share of free shards) is done.
    pub(crate) fn start(
        options: ClusterOptions,
        backend: Arc<PostgresBackend>,
        ownership: Arc<Ownership>,
        queues: Queues,
        first: tokio::sync::oneshot::Sender<Result<(), String>>,
    ) -> std::io::Result<Keeper> {
        let (commands, received) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("duro-cluster".into())
            .spawn(move || {
                let state = State {
                    options,
                    backend,
                    ownership,
                    queues,
                };
                state.run(received, first);
            })?;
        Ok(Keeper {
            commands,
            thread: Some(thread),
        })
    }

    /// Hands every shard off and leaves the cluster, then stops the keeper.
    pub(crate) async fn drain(mut self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.commands.send(Command::Drain(done)).is_ok() {
            let _ = wait.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

struct State {
    options: ClusterOptions,
    backend: Arc<PostgresBackend>,
    ownership: Arc<Ownership>,
    queues: Queues,
}

impl State {
    fn run(
        &self,
        commands: mpsc::Receiver<Command>,
        first: tokio::sync::oneshot::Sender<Result<(), String>>,
    ) {
        let node = &self.options.node;
        if let Err(error) = self
            .backend
            .join(node, &self.options.advertise, self.lease_ms())
        {
            let _ = first.send(Err(format!("joining the cluster as '{node}': {error}")));
            return;
        }
        tracing::info!(node = %node, advertise = %self.options.advertise, "joined the cluster");
        self.round();
        let _ = first.send(Ok(()));
        loop {
            match commands.recv_timeout(self.options.tick()) {
                Ok(Command::Drain(done)) => {
                    self.drain();
                    let _ = done.send(());
                    return;
                }
                // The server stopped without draining (its start failed): the leases lapse.
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => self.round(),
            }
        }
    }

    fn lease_ms(&self) -> u64 {
        self.options.lease.as_millis() as u64
    }

    /// One heartbeat, then what it calls for: losses, balance, routes.
    fn round(&self) {
        let sent = Instant::now();
        let node = &self.options.node;
        let view =
            match self
                .backend
                .heartbeat(node, &self.options.advertise, self.lease_ms(), false)
            {
                Ok(view) => view,
                Err(error) => {
                    tracing::warn!(%error, "the cluster's heartbeat failed");
                    if !self.ownership.leases_hold() {
                        // Cut off from the store past the leases: serve nothing of them. Their
                        // objects are reset; the shards are taken again once the store answers.
                        let lost: Vec<u32> =
                            self.ownership.owned().iter().map(|&(s, _)| s).collect();
                        if !lost.is_empty() {
                            tracing::warn!(shards = lost.len(), "leases lapsed: serving none");
                            self.drop_shards(&lost);
                        }
                    }
                    return;
                }
            };
        self.ownership.renewed(sent, self.options.lease);
        let mine: HashMap<u32, u64> = view
            .leases
            .iter()
            .filter(|lease| lease.owner.as_deref() == Some(node.as_str()))
            .map(|lease| (lease.shard, lease.epoch))
            .collect();
        // Shards taken from this node (or under another epoch than it holds).
        let lost: Vec<u32> = self
            .ownership
            .owned()
            .into_iter()
            .filter(|(shard, epoch)| mine.get(shard) != Some(epoch))
            .map(|(shard, _)| shard)
            .collect();
        if !lost.is_empty() {
            tracing::warn!(shards = ?lost, "virtual shards lost to other nodes");
            self.drop_shards(&lost);
        }
        // Shards the store gives this node that it did not record (an acquire whose answer
        // was lost): no other node wrote under their epoch since, so they are this node's.
        let mut adopted = false;
        for (&shard, &epoch) in &mine {
            if self.ownership.epoch(shard) != epoch && !lost.contains(&shard) {
                self.ownership.set_epoch(shard, epoch);
                adopted = true;
            }
        }
        self.set_routes(&view);
        let owned = self.ownership.owned().len();
        let target = fair_share(&view, self.ownership.count(), node);
        if owned < target {
            self.take(&view, target - owned, sent);
        } else if owned > target {
            let moves = MOVES_PER_SECOND as f64 * self.options.tick().as_secs_f64();
            let moves = (moves.ceil() as usize).max(1).min(owned - target);
            let mut owned: Vec<u32> = self.ownership.owned().iter().map(|&(s, _)| s).collect();
            // The last ones first: deterministic, and it spreads the hand-offs of the nodes.
            owned.reverse();
            owned.truncate(moves);
            self.hand_off(&owned);
        } else if adopted {
            self.on_every_shard(|host| host.took_shards());
        }
    }

    /// Takes up to `wanted` free shards (no owner, or an expired lease).
    fn take(&self, view: &ClusterView, wanted: usize, sent: Instant) {
        let node = &self.options.node;
        let mut free: Vec<u32> = view
            .leases
            .iter()
            .filter(|lease| lease.owner.is_none() || !lease.live)
            .filter(|lease| lease.owner.as_deref() != Some(node.as_str()))
            .map(|lease| lease.shard)
            .collect();
        if free.is_empty() {
            return;
        }
        // Start at a place of this node's own, so that nodes taking shards together mostly
        // ask for different ones.
        let start = (stable_hash(node) % free.len() as u64) as usize;
        free.rotate_left(start);
        free.truncate(wanted);
        match self.backend.acquire(node, &free, self.lease_ms()) {
            Ok(taken) if taken.is_empty() => {}
            Ok(taken) => {
                for &(shard, epoch) in &taken {
                    self.ownership.set_epoch(shard, epoch);
                }
                // The acquire's leases run from after `sent`.
                self.ownership.renewed(sent, self.options.lease);
                tracing::info!(shards = taken.len(), "took virtual shards");
                self.on_every_shard(|host| host.took_shards());
            }
            Err(error) => tracing::warn!(%error, "taking virtual shards failed"),
        }
    }

    /// Stops serving `shards`, lets their objects finish and settle, then releases them.
    fn hand_off(&self, shards: &[u32]) {
        for &shard in shards {
            self.ownership.set_epoch(shard, 0);
        }
        self.give_up(shards, self.options.handoff_wait());
        match self.backend.release(&self.options.node, shards) {
            Ok(()) => tracing::info!(shards = shards.len(), "handed virtual shards off"),
            // Their leases lapse instead; the node serves them no more either way.
            Err(error) => tracing::warn!(%error, "releasing virtual shards failed"),
        }
    }

    /// Stops serving `shards` at once, resetting their objects.
    fn drop_shards(&self, shards: &[u32]) {
        for &shard in shards {
            self.ownership.set_epoch(shard, 0);
        }
        self.give_up(shards, Duration::ZERO);
    }

    /// Has every event loop give up the objects of `shards`, and waits (bounded) until they
    /// have.
    fn give_up(&self, shards: &[u32], calls_wait: Duration) {
        let mut lost = vec![false; self.ownership.count() as usize];
        for &shard in shards {
            lost[shard as usize] = true;
        }
        let lost = Arc::new(lost);
        let waits = self.on_every_shard(move |host| {
            let host = host.clone();
            let lost = lost.clone();
            let giving_up: Pin<Box<dyn Future<Output = ()>>> =
                Box::pin(async move { host.give_up_shards(&lost, calls_wait).await });
            giving_up
        });
        let deadline = Instant::now() + GIVE_UP_WAIT;
        for wait in waits {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = wait.recv_timeout(left);
        }
    }

    /// Runs `work` on every event loop (as a local task); a receiver per loop that hears when
    /// it is done.
    fn on_every_shard<F, W>(&self, work: W) -> Vec<mpsc::Receiver<()>>
    where
        W: Fn(&Host) -> F + Clone + Send + 'static,
        F: Done,
    {
        let mut waits = Vec::new();
        for queue in self.queues.iter() {
            let (done, wait) = mpsc::channel();
            let work = work.clone();
            let job: Job = Box::new(move |host: &Host| {
                let finished = work(host);
                finished.then_send(done);
            });
            let _ = queue.send(job);
            waits.push(wait);
        }
        waits
    }

    /// The routes to the shards other nodes hold live leases on.
    fn set_routes(&self, view: &ClusterView) {
        let node = &self.options.node;
        let nodes: HashMap<&str, Arc<NodeAddr>> = view
            .nodes
            .iter()
            .map(|row| {
                let addr = NodeAddr {
                    name: row.name.clone(),
                    advertise: row.advertise.clone(),
                };
                (row.name.as_str(), Arc::new(addr))
            })
            .collect();
        let owners = view
            .leases
            .iter()
            .map(|lease| match &lease.owner {
                Some(owner) if lease.live && owner != node => nodes.get(owner.as_str()).cloned(),
                _ => None,
            })
            .collect();
        self.ownership.set_owners(owners);
    }

    /// SIGTERM: say the node drains, hand every shard off, leave.
    fn drain(&self) {
        let node = &self.options.node;
        tracing::info!(node = %node, "draining: handing every virtual shard off");
        let sent = Instant::now();
        match self
            .backend
            .heartbeat(node, &self.options.advertise, self.lease_ms(), true)
        {
            Ok(_) => self.ownership.renewed(sent, self.options.lease),
            Err(error) => tracing::warn!(%error, "the draining heartbeat failed"),
        }
        let owned: Vec<u32> = self.ownership.owned().iter().map(|&(s, _)| s).collect();
        if !owned.is_empty() {
            self.hand_off(&owned);
        }
        if let Err(error) = self.backend.leave(node) {
            tracing::warn!(%error, "leaving the list of nodes failed");
        }
        self.ownership.lapse();
    }
}

/// What a job's work gives back: nothing to wait for, or a future to run to its end.
trait Done {
    fn then_send(self, done: mpsc::Sender<()>);
}

impl Done for () {
    fn then_send(self, done: mpsc::Sender<()>) {
        let _ = done.send(());
    }
}

impl Done for Pin<Box<dyn Future<Output = ()>>> {
    fn then_send(self, done: mpsc::Sender<()>) {
        tokio::task::spawn_local(async move {
            self.await;
            let _ = done.send(());
        });
    }
}

/// The shards each live, non-draining node should own: the count over those nodes, rounded
/// up (this node counts as live: it just heartbeated).
fn fair_share(view: &ClusterView, count: u32, node: &str) -> usize {
    let live = view
        .nodes
        .iter()
        .filter(|row| (row.alive || row.name == node) && !row.draining)
        .count()
        .max(1);
    (count as usize).div_ceil(live)
}

/// A hash of `text` that is the same in every process (FNV-1a).
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::NodeRow;

    fn row(name: &str, alive: bool, draining: bool) -> NodeRow {
        NodeRow {
            name: name.into(),
            advertise: String::new(),
            alive,
            draining,
            heartbeat_age_ms: 0,
        }
    }

    #[test]
    fn the_fair_share_counts_live_nodes_that_do_not_drain() {
        let view = |nodes| ClusterView {
            nodes,
            leases: Vec::new(),
        };
        assert_eq!(
            fair_share(&view(vec![row("a", true, false)]), 256, "a"),
            256
        );
        let three = vec![
            row("a", true, false),
            row("b", true, false),
            row("c", true, false),
        ];
        assert_eq!(fair_share(&view(three), 256, "a"), 86);
        let some_gone = vec![
            row("a", true, false),
            row("b", false, false),
            row("c", true, true),
        ];
        assert_eq!(fair_share(&view(some_gone), 256, "a"), 256);
        // This node just heartbeated: it counts even if the view was read a moment before.
        assert_eq!(fair_share(&view(vec![row("a", false, false)]), 8, "a"), 8);
    }
}
