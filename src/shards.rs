//! The links between the shards of a server: each shard is a host on an event-loop thread of
//! its own, and reaches the others' objects ([`Peers`]) over in-process Cap'n Proto
//! connections, one pipe per pair of shards, each served by the shard at its far end as a
//! privileged connection (no token, no bounds of its own: the calls that cross it were
//! admitted on the connections they came from). Work for another shard (a connection accepted
//! for it, a request its gateway serves) goes through its queue of jobs, which its event loop
//! runs in the order sent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::host::{Host, Job, Peers};
use crate::id::ObjectId;
use crate::wire::duro_capnp::{durable_object, host, namespace};

/// Bytes a link's pipe holds in each direction before its writer waits.
const LINK_PIPE_BYTES: usize = 256 << 10;

/// The queues of jobs of every shard, by shard.
pub(crate) type Queues = Arc<Vec<mpsc::UnboundedSender<Job>>>;

/// One shard's links to the others.
pub(crate) struct Links {
    queues: Queues,
    /// The `Host` of each other shard (`None` for this one).
    hosts: Vec<Option<host::Client>>,
    /// The namespaces asked for on each shard, by name: a `get` pipelines on them.
    namespaces: Vec<RefCell<HashMap<String, namespace::Client>>>,
}

impl Links {
    /// Links `host`'s shard to every other: a pipe to each, whose far end that shard serves
    /// (asked through its queue), and whose near end this shard's event loop drives. Must run
    /// on `host`'s event loop.
    pub(crate) fn open(host: &Host, queues: Queues) -> Rc<Links> {
        let me = host.placement().shard;
        let hosts = (0..queues.len())
            .map(|other| (other != me).then(|| link(&queues[other])))
            .collect();
        let namespaces = (0..queues.len()).map(|_| RefCell::default()).collect();
        Rc::new(Links {
            queues,
            hosts,
            namespaces,
        })
    }
}

/// A pipe to the shard of `queue`: its `Host`.
fn link(queue: &mpsc::UnboundedSender<Job>) -> host::Client {
    let (near, far) = tokio::io::duplex(LINK_PIPE_BYTES);
    let serve: Job = Box::new(move |host: &Host| {
        let (reader, writer) = tokio::io::split(far);
        let serving = crate::rpc::serve_peer_link(host, reader, writer);
        tokio::task::spawn_local(async move {
            if let Err(error) = serving.await {
                tracing::debug!(%error, "a link between shards ended");
            }
        });
    });
    // A shard that stopped takes no job: the link then fails its calls with `disconnected`.
    let _ = queue.send(serve);
    let (reader, writer) = tokio::io::split(near);
    let (host, system) = crate::rpc::connect_peer_link(reader, writer);
    tokio::task::spawn_local(async move {
        if let Err(error) = system.await {
            tracing::debug!(%error, "a link between shards ended");
        }
    });
    host
}

impl Peers for Links {
    fn stub(&self, shard: usize, name: &str, id: &ObjectId) -> durable_object::Client {
        let namespace = {
            let mut namespaces = self.namespaces[shard].borrow_mut();
            match namespaces.get(name) {
                Some(namespace) => namespace.clone(),
                None => {
                    let host = self.hosts[shard]
                        .as_ref()
                        .expect("a stub to another shard's object");
                    let mut request = host.namespace_request();
                    request.get().set_name(name);
                    let namespace = request.send().pipeline.get_namespace();
                    namespaces.insert(name.to_owned(), namespace.clone());
                    namespace
                }
            }
        };
        let mut request = namespace.get_request();
        let mut target = request.get().init_id();
        target.set_bytes(id.bytes());
        target.set_name(id.name().unwrap_or(""));
        request.send().pipeline.get_stub()
    }

    fn run_on(&self, shard: usize, job: Job) {
        let _ = self.queues[shard].send(job);
    }

    fn count(&self) -> usize {
        self.queues.len()
    }

    fn host(&self, shard: usize) -> Option<host::Client> {
        self.hosts.get(shard)?.clone()
    }
}

/// Runs the jobs other shards send to this one, in order, until every sender is gone.
pub(crate) async fn run_jobs(host: Host, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        job(&host);
    }
}
