//! What a host does as a node of a cluster: it serves the objects of the virtual shards its
//! node owns (see [`crate::storage::cluster`]), refuses the others' calls with `disconnected`
//! (a `get` through any node then finds the owner), and gives up the objects of a shard its
//! node lost or hands off.

use std::time::Duration;

use super::Host;
use super::activation::Activation;
use crate::error::Error;
use std::rc::Rc;

/// The error of a call for an object whose virtual shard this node does not serve now.
pub(crate) fn not_owner(shard: u32, owner: Option<&str>) -> Error {
    Error::Disconnected(match owner {
        Some(owner) => format!(
            "this node does not own virtual shard {shard} (node '{owner}' does): get the object again"
        ),
        None => format!(
            "no node holds a lease on virtual shard {shard} now (its owner moved or is being replaced): get the object again"
        ),
    })
}

impl Host {
    /// Gives up the objects of the virtual shards `lost` marks (indexed by shard): first waits
    /// up to `calls_wait` for the calls in progress on them (a hand-off); then resets them (their stubs break with `disconnected`) and waits until their
    /// commits in flight settled. The node must already have stopped owning those shards, so
    /// that no new call reaches them meanwhile.
    pub(crate) async fn give_up_shards(&self, lost: &[bool], calls_wait: Duration) {
        let shards = &self.inner.storage.shards;
        let of_lost = |host: &Host| -> Vec<Rc<Activation>> {
            let mut found = Vec::new();
            for namespace in host.inner.namespaces.values() {
                for (id, activation) in namespace.activations.borrow().iter() {
                    let shard = shards.shard_of(id) as usize;
                    if lost.get(shard).copied().unwrap_or(false) && !activation.is_broken() {
                        found.push(activation.clone());
                    }
                }
            }
            found
        };
        if !calls_wait.is_zero() {
            let deadline = tokio::time::Instant::now() + calls_wait;
            while tokio::time::Instant::now() < deadline
                && !of_lost(self).iter().all(|a| a.is_idle())
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let activations = of_lost(self);
        for activation in &activations {
            let shard = shards.shard_of(activation.id().bytes());
            activation.reset(&not_owner(shard, None).to_string());
        }
        for activation in activations {
            activation.store.wait_idle().await;
        }
    }

    /// The node took virtual shards: the alarm scheduler reads its window again, now with the
    /// alarms of their objects.
    pub(crate) fn took_shards(&self) {
        let scheduler = self.inner.scheduler.borrow().upgrade();
        if let Some(scheduler) = scheduler {
            scheduler.reload();
        }
    }
}
