//! The links between the shards of a server: each shard is a host on an event-loop thread of
//! its own, and reaches the others' objects ([`Peers`]) over in-process Cap'n Proto
//! connections, one pipe per pair of shards, each served by the shard at its far end as a
//! privileged connection (no token, no bounds of its own: the calls that cross it were
//! admitted on the connections they came from). Work for another shard (a connection accepted
//! for it, a request its gateway serves, a whole fetch a stub hands off to it) goes through its
//! queue of jobs, which its event loop runs in the order sent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::host::{Host, Job, Peers};
use crate::id::ObjectId;
use crate::storage::cluster::NodeAddr;
use crate::tls::ClientTls;
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
    /// The token that other nodes' `Host.nodeLink` asks for (the cluster's, `--token-file`).
    token: Option<Arc<str>>,
    /// TLS on the links to other nodes, when their listeners have it.
    tls: Option<ClientTls>,
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
    /// Connects to the node at `addr` (in the background: calls queue until it is up), over
    /// TLS when `tls` is given, and asks for its node link with `token`.
    ///
    /// The RPC system runs at once over an in-process pipe, whose far end a task joins to the
    /// TCP (or TLS) connection once it is made: so the node's `Host` is an ordinary capability
    /// of that system from the start, and calls made on it (from any task of the event loop)
    /// wait in the pipe. A connection that cannot be made closes the pipe: the calls fail with
    /// `disconnected`, and the next stub connects again.
    fn connect(addr: &str, token: Option<Arc<str>>, tls: Option<ClientTls>) -> NodeLink {
        let alive = Rc::new(std::cell::Cell::new(true));
        let (near, mut far) = tokio::io::duplex(LINK_PIPE_BYTES);
        let joined = alive.clone();
        let target = addr.to_owned();
        tokio::task::spawn_local(async move {
            let connecting = connect_node(&target, tls);
            let connected = tokio::time::timeout(NODE_CONNECT_WAIT, connecting)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            match connected {
                Ok(mut stream) => {
                    if let Err(error) = tokio::io::copy_bidirectional(&mut far, &mut stream).await {
                        tracing::debug!(%error, addr = %target, "a link to another node ended");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, addr = %target, "connecting to another node failed");
                }
            }
            joined.set(false);
        });
        let (reader, writer) = tokio::io::split(near);
        let (bootstrap, system) = crate::rpc::connect_peer_link(reader, writer);
        let ended = alive.clone();
        let target = addr.to_owned();
        tokio::task::spawn_local(async move {
            if let Err(error) = system.await {
                tracing::debug!(%error, addr = %target, "a link to another node ended");
            }
            ended.set(false);
        });
        let mut request = bootstrap.node_link_request();
        request.get().set_token(token.as_deref().unwrap_or(""));
        NodeLink {
            host: request.send().pipeline.get_host(),
            namespaces: RefCell::default(),
            alive,
        }
    }
}

impl Links {
    /// Links `host`'s shard to every other: a pipe to each, whose far end that shard serves
    /// (asked through its queue), and whose near end this shard's event loop drives. Must run
    /// on `host`'s event loop.
    pub(crate) fn open(
        host: &Host,
        queues: Queues,
        token: Option<Arc<str>>,
        tls: Option<ClientTls>,
    ) -> Rc<Links> {
        let me = host.placement().shard;
        let hosts = (0..queues.len())
            .map(|other| (other != me).then(|| link(&queues[other])))
            .collect();
        Rc::new(Links {
            queues,
            hosts,
            token,
            tls,
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

/// A connection to another node, with or without TLS.
trait NodeStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> NodeStream for S {}

/// A TCP connection to the node at `addr` (`HOST:PORT`), with TLS when `tls` is given (the
/// certificate must be valid for `HOST`).
async fn connect_node(addr: &str, tls: Option<ClientTls>) -> std::io::Result<Box<dyn NodeStream>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Box::new(stream));
    };
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = stream.peer_addr()?.ip();
    let tls = match host.parse::<std::net::IpAddr>() {
        Ok(_) => tls,
        Err(_) => tls
            .server_name(host)
            .map_err(|error| std::io::Error::other(error.to_string()))?,
    };
    Ok(Box::new(tls.connect(ip, stream).await?))
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
            let pipeline = request.send().pipeline;
            let namespace = crate::wire::resolving(pipeline.get_namespace(), pipeline);
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
    let pipeline = request.send().pipeline;
    crate::wire::resolving(pipeline.get_stub(), pipeline)
}

impl Peers for Links {
    fn shard_stub(&self, shard: usize, key: u64) -> durable_object::Client {
        let host = self.hosts[shard]
            .as_ref()
            .expect("a stub to another shard's object");
        let mut request = host.shard_stub_request();
        request.get().set_key(key);
        let pipeline = request.send().pipeline;
        crate::wire::resolving(pipeline.get_stub(), pipeline)
    }

    fn node_stub(&self, node: &NodeAddr, name: &str, id: &ObjectId) -> durable_object::Client {
        let link = {
            let mut nodes = self.nodes.borrow_mut();
            match nodes.get(&node.advertise) {
                Some(link) if link.alive.get() => link.clone(),
                _ => {
                    let link = Rc::new(NodeLink::connect(
                        &node.advertise,
                        self.token.clone(),
                        self.tls.clone(),
                    ));
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
