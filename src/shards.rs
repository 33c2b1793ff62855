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
use crate::storage::cluster::NodeAddr;
use crate::wire::duro_capnp::{durable_object, host, namespace};

/// Bytes a link's pipe holds in each direction before its writer waits.
const LINK_PIPE_BYTES: usize = 256 << 10;

/// The queues of jobs of every shard, by shard.
pub(crate) type Queues = Arc<Vec<mpsc::UnboundedSender<Job>>>;

/// How long a shard waits for a TCP connection to another node of the cluster.
const NODE_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One shard's links to the others, and to the other nodes of its cluster.
pub(crate) struct Links {
    queues: Queues,
    /// The `Host` of each other shard (`None` for this one).
    hosts: Vec<Option<host::Client>>,
    /// The namespaces asked for on each shard, by name: a `get` pipelines on them.
    namespaces: Vec<RefCell<HashMap<String, namespace::Client>>>,
    /// The token that other nodes' `Host.nodeLink` asks for (the cluster's, `--token-file`).
    token: Option<Arc<str>>,
    /// This shard's connection to each other node, by its advertised address.
    nodes: RefCell<HashMap<String, Rc<NodeLink>>>,
}

/// A connection to another node: its `Host` as `nodeLink` returned it.
struct NodeLink {
    host: host::Client,
    namespaces: RefCell<HashMap<String, namespace::Client>>,
    /// Cleared when the connection failed or ended: the next stub connects again.
    alive: Rc<std::cell::Cell<bool>>,
}

impl NodeLink {
    /// Connects to the node at `addr` (in the background: calls queue until it is up) and
    /// asks for its node link with `token`.
    fn connect(addr: &str, token: Option<Arc<str>>) -> NodeLink {
        let alive = Rc::new(std::cell::Cell::new(true));
        let ended = alive.clone();
        let addr = addr.to_owned();
        let host = capnp_rpc::new_future_client(async move {
            let connected =
                tokio::time::timeout(NODE_CONNECT_WAIT, tokio::net::TcpStream::connect(&addr))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                    .and_then(|stream| stream.set_nodelay(true).map(|()| stream));
            let stream = match connected {
                Ok(stream) => stream,
                Err(error) => {
                    ended.set(false);
                    return Err(capnp::Error::disconnected(format!(
                        "connecting to the node at {addr}: {error}"
                    )));
                }
            };
            let (reader, writer) = stream.into_split();
            let (bootstrap, system) = crate::rpc::connect_peer_link(reader, writer);
            tokio::task::spawn_local(async move {
                if let Err(error) = system.await {
                    tracing::debug!(%error, %addr, "a link to another node ended");
                }
                ended.set(false);
            });
            let mut request = bootstrap.node_link_request();
            request.get().set_token(token.as_deref().unwrap_or(""));
            Ok(request.send().pipeline.get_host())
        });
        NodeLink {
            host,
            namespaces: RefCell::default(),
            alive,
        }
    }
}

impl Links {
    /// Links `host`'s shard to every other: a pipe to each, whose far end that shard serves
    /// (asked through its queue), and whose near end this shard's event loop drives. Must run
    /// on `host`'s event loop.
    pub(crate) fn open(host: &Host, queues: Queues, token: Option<Arc<str>>) -> Rc<Links> {
        let me = host.placement().shard;
        let hosts = (0..queues.len())
            .map(|other| (other != me).then(|| link(&queues[other])))
            .collect();
        let namespaces = (0..queues.len()).map(|_| RefCell::default()).collect();
        Rc::new(Links {
            queues,
            hosts,
            namespaces,
            token,
            nodes: RefCell::default(),
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

/// The namespace `name` of `host`, asked for once and kept in `namespaces`.
fn namespace_of(
    host: &host::Client,
    namespaces: &RefCell<HashMap<String, namespace::Client>>,
    name: &str,
) -> namespace::Client {
    let mut namespaces = namespaces.borrow_mut();
    match namespaces.get(name) {
        Some(namespace) => namespace.clone(),
        None => {
            let mut request = host.namespace_request();
            request.get().set_name(name);
            let namespace = request.send().pipeline.get_namespace();
            namespaces.insert(name.to_owned(), namespace.clone());
            namespace
        }
    }
}

/// `namespace.get(id)`, pipelined.
fn get(namespace: &namespace::Client, id: &ObjectId) -> durable_object::Client {
    let mut request = namespace.get_request();
    let mut target = request.get().init_id();
    target.set_bytes(id.bytes());
    target.set_name(id.name().unwrap_or(""));
    request.send().pipeline.get_stub()
}

impl Peers for Links {
    fn stub(&self, shard: usize, name: &str, id: &ObjectId) -> durable_object::Client {
        let host = self.hosts[shard]
            .as_ref()
            .expect("a stub to another shard's object");
        get(&namespace_of(host, &self.namespaces[shard], name), id)
    }

    fn node_stub(&self, node: &NodeAddr, name: &str, id: &ObjectId) -> durable_object::Client {
        let link = {
            let mut nodes = self.nodes.borrow_mut();
            match nodes.get(&node.advertise) {
                Some(link) if link.alive.get() => link.clone(),
                _ => {
                    let link = Rc::new(NodeLink::connect(&node.advertise, self.token.clone()));
                    nodes.insert(node.advertise.clone(), link.clone());
                    link
                }
            }
        };
        get(&namespace_of(&link.host, &link.namespaces, name), id)
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
