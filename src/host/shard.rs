//! A host's place among the shards of its server, and its stubs to the objects of the others.
//!
//! A server runs N hosts, one per event-loop thread (a shard), over one storage. Every object
//! lives on one shard: the one its ID maps to ([`Placement::shard_of`]), through the storage's
//! fixed number of virtual shards, so that the mapping stays the same while the shard count
//! does, and a virtual shard can later move without rehashing objects. A host activates only
//! its own objects; for an object of another shard, [`Namespace::get`](super::Namespace::get)
//! gives a stub that reaches it through [`Peers`]: a Cap'n Proto capability to the object on
//! its shard, carried by an in-process connection between the two shards. capnp-rpc keeps the
//! contract across it: calls on one stub arrive in the order made, calls pipeline on a stub not
//! yet resolved, streams and capabilities pass through, and a reset there breaks it here.
//!
//! The layers above fill [`Peers`] in (the links are capnp connections, which the RPC layer
//! serves); this layer only asks it for capabilities, and for a shard to run a job on.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use super::Host;
use crate::error::Error;
use crate::id::ObjectId;
use crate::message::StreamRequest;
use crate::message::StreamResponse;
use crate::storage::cluster::NodeAddr;
use crate::storage::{VIRTUAL_SHARDS_DEFAULT, virtual_shard};
use crate::wire::duro_capnp::durable_object;
use crate::wire::stream;

/// Work handed to another shard's event loop; it runs there with that shard's host.
pub type Job = Box<dyn FnOnce(&Host) + Send>;

/// Which objects a host serves: those of its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// This host's shard, in `0..shards`.
    pub(crate) shard: usize,
    /// The server's shards.
    pub(crate) shards: usize,
    /// The store's virtual shards (fixed when its data dir was made).
    pub(crate) virtual_shards: u32,
}

impl Default for Placement {
    /// The one shard of a server that has one.
    fn default() -> Placement {
        Placement {
            shard: 0,
            shards: 1,
            virtual_shards: VIRTUAL_SHARDS_DEFAULT,
        }
    }
}

impl Placement {
    /// The shard of the object `id`: its virtual shard, spread over the shards in turn.
    pub(crate) fn shard_of(&self, id: &[u8; 32]) -> usize {
        virtual_shard(id, self.virtual_shards) as usize % self.shards
    }

    /// Whether `id` is an object of another shard.
    pub(crate) fn is_remote(&self, id: &[u8; 32]) -> bool {
        self.shards > 1 && self.shard_of(id) != self.shard
    }
}

/// The other shards of the server, as one shard sees them.
pub(crate) trait Peers {
    /// A capability to the object `id` of `namespace`, on `shard`. Answers at once: calls on
    /// it pipeline behind the `get` that finds the object there.
    fn stub(&self, shard: usize, namespace: &str, id: &ObjectId) -> durable_object::Client;

    /// Runs `job` on `shard`'s event loop, with its host, after the jobs sent there before.
    fn run_on(&self, shard: usize, job: Job);

    /// The server's shards, this one included.
    fn count(&self) -> usize;

    /// The `Host` of another shard, privileged (as a link from a shard is).
    fn host(&self, shard: usize) -> Option<crate::wire::duro_capnp::host::Client>;

    /// A capability to the object `id` of `namespace` on another node of the cluster, through
    /// this shard's link to that node (see `Host.nodeLink`). Answers at once, as
    /// [`Peers::stub`] does.
    fn node_stub(&self, node: &NodeAddr, namespace: &str, id: &ObjectId) -> durable_object::Client;
}

/// A stub to an object of another shard: the capability to it there.
pub(crate) struct RemoteObject {
    pub(crate) id: ObjectId,
    pub(crate) client: durable_object::Client,
    /// A call failed with `disconnected`: the object was reset (or its shard stopped).
    broken: Cell<bool>,
}

/// Largest request sent whole with its call; a larger one streams its body.
const WHOLE_REQUEST_BYTES_MAX: usize = crate::wire::MESSAGE_BYTES_MAX - (64 << 10);

impl RemoteObject {
    pub(crate) fn new(id: ObjectId, client: durable_object::Client) -> Rc<RemoteObject> {
        Rc::new(RemoteObject {
            id,
            client,
            broken: Cell::new(false),
        })
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.get()
    }

    /// Sends `request` now (its place in the object's order is taken here), as
    /// `DurableObject.request`: the body streams when it is not whole, and so may the
    /// response's.
    pub(crate) fn fetch_stream(
        self: &Rc<Self>,
        request: StreamRequest,
    ) -> impl Future<Output = Result<StreamResponse, Error>> + use<> {
        let client = self.client.clone();
        let send = Box::new(move |head, upload| {
            let (command, call) = stream::call(head, upload, Arc::new(()));
            stream::issue(&client, command, ());
            Ok(call)
        });
        let call = stream::fetch(request, WHOLE_REQUEST_BYTES_MAX, send);
        let this = self.clone();
        async move {
            let answer = call.await;
            if let Err(Error::Disconnected(_)) = &answer {
                this.broken.set(true);
            }
            answer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_go_to_the_shard_of_their_virtual_shard_in_turn() {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        let placement = Placement {
            shard: 1,
            shards: 3,
            virtual_shards: 256,
        };
        // Virtual shard 4 → shard 4 % 3 = 1: this one.
        assert_eq!(placement.shard_of(&id), 1);
        assert!(!placement.is_remote(&id));
        id[3] = 5;
        assert!(placement.is_remote(&id));
        assert!(!Placement::default().is_remote(&id));
    }
}
