//! The host: namespaces, the registry of live objects, and their activations.
//!
//! Everything here runs on one event-loop thread (capnp-rpc is `!Send`): a tokio current-thread
//! runtime with a `LocalSet`. Storage writes go to the writer thread. Scaling past one core
//! means several such hosts (shards), each owning the objects whose ID hashes to it; nothing
//! here assumes there is only one.
//!
//! Files, each depending only on those before it: `class` (the [`DurableObject`] trait) →
//! `state` ([`State`]; it resets its activation through the `Reset` trait) → `activation` (one
//! live instance: mailbox, gate, reset; it keeps its object's `State`) → this file (the
//! registry, [`Host`], [`Namespace`], [`Stub`], [`Env`]) → `alarms` (the alarm scheduler,
//! which delivers alarms through the registry and activations). `socket` (the WebSockets the
//! host holds for objects) sits below `state`.

pub(crate) mod activation;
mod alarms;
pub(crate) mod class;
pub(crate) mod cluster;
pub(crate) mod operations;
pub(crate) mod shard;
pub(crate) mod socket;
pub(crate) mod state;
#[cfg(test)]
mod tests;

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use activation::Activation;
pub(crate) use activation::{InterfaceAnswer, InterfaceCall};
use bytes::Bytes;
use futures::future::Either;
use futures::{FutureExt, TryFutureExt};

use class::ErasedObject;
use class::SocketEvent;
pub use class::{AlarmInfo, DurableObject};
pub(crate) use shard::RemoteObject;
pub(crate) use shard::{Job, Peers, Placement};
pub(crate) use socket::UpgradeToken;
use socket::{ObjectSockets, SocketCore, SocketRegistry};
pub use socket::{SocketLimits, SocketSink, WebSocket, WebSocketMessage};
pub use state::State;

use crate::body::Body;
use crate::clock::{Clock, SystemClock};
use crate::error::Error;
use crate::id::{IdMinter, ObjectId};
use crate::message::{Request, Response, StreamRequest, StreamResponse};
use crate::metrics::{Bound, Metrics, NamespaceMetrics};
use crate::storage::cluster::{Ownership, Route};
use crate::storage::{
    self, Backend, Limits, ObjectKey, ObjectRecord, ObjectStore, Shared, Writer, WriterHandle,
    WriterStats,
};
use crate::wire::budget::Budget;

/// Bounds of the host. Past a bound, calls fail with `overloaded` or a named error.
#[derive(Clone, Debug)]
pub struct HostLimits {
    /// Calls admitted to one object and not answered yet, queued or running (default 1000).
    /// Past it, new calls are refused with `overloaded` while the object serves what it has:
    /// a hot or slow object cannot take all of the host's memory.
    pub object_queue_max: usize,
    /// Longest namespace name and object name, in bytes (default 1024, as the hosted service).
    pub name_bytes_max: usize,
    /// Most IDs one `listObjects` call returns (default 1000).
    pub list_objects_max: usize,
    /// Most objects active at once (default 200,000: at about 1 KiB each, a few hundred MiB).
    /// Past it, the least recently used idle objects are evicted; if none is idle, `get` is
    /// refused with `overloaded`.
    pub activations_max: usize,
    /// An object with no call for this long is evicted (default 60 s): its instance and cache
    /// are dropped, and its stubs build a new one on their next call.
    pub idle_evict_ms: u64,
    /// Bytes in flight over every connection (default 256 MiB): partly received messages,
    /// requests of calls not answered, responses not yet written. Each connection gets a fair
    /// share (never less than one message of the largest size); over it the connection is not
    /// read until it drains, and calls past the share or the budget fail with `overloaded`.
    /// Each shard of a server has this budget for the connections it serves.
    pub inflight_bytes_max: usize,
    /// The bounds on objects' WebSockets: message size, sockets per object, bytes queued.
    pub web_sockets: SocketLimits,
}

impl Default for HostLimits {
    fn default() -> HostLimits {
        HostLimits {
            object_queue_max: 1000,
            name_bytes_max: 1024,
            list_objects_max: 1000,
            activations_max: 200_000,
            idle_evict_ms: 60_000,
            inflight_bytes_max: 256 << 20,
            web_sockets: SocketLimits::default(),
        }
    }
}

/// Builds instances of a class.
pub(crate) type Factory = Arc<dyn Fn(State, Env) -> Rc<dyn ErasedObject> + Send + Sync>;

/// The [`Factory`] of a class built by `constructor`.
pub(crate) fn factory<T, F>(constructor: F) -> Factory
where
    T: DurableObject,
    F: Fn(State, Env) -> T + Send + Sync + 'static,
{
    Arc::new(move |state, env| Rc::new(constructor(state, env)) as Rc<dyn ErasedObject>)
}

/// What a host is made of, besides its storage; built by the server's `Builder`.
#[derive(Clone, Default)]
pub(crate) struct Config {
    pub(crate) classes: BTreeMap<String, Factory>,
    /// Namespace name → class name.
    pub(crate) bindings: BTreeMap<String, String>,
    pub(crate) limits: HostLimits,
    pub(crate) storage_limits: Limits,
    /// The wall clock of alarms; `None`: the system's.
    pub(crate) clock: Option<Arc<dyn crate::clock::Clock>>,
    /// The host's shard, when its server has several.
    pub(crate) placement: Placement,
    /// The writer the server's shards share; `None`: the host starts its own.
    pub(crate) writer: Option<WriterHandle>,
    /// The server's metrics, which its shards share; `None`: the host keeps its own.
    pub(crate) metrics: Option<Arc<Metrics>>,
    /// In a cluster, the virtual shards this node owns (see [`crate::storage::cluster`]).
    pub(crate) cluster: Option<Arc<Ownership>>,
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("namespace '{namespace}' is bound to class '{class}', which is not registered")]
    UnknownClass { namespace: String, class: String },
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error(transparent)]
    Open(#[from] storage::OpenError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::Error),
}

pub(crate) struct HostInner {
    namespaces: BTreeMap<String, Rc<NamespaceCore>>,
    pub(crate) storage: Rc<Shared>,
    pub(crate) limits: HostLimits,
    /// Activations in every namespace's registry.
    active: Cell<usize>,
    /// Set when shutdown begins: new calls are refused.
    closing: Cell<bool>,
    /// The writer thread, when the host started its own; taken at shutdown.
    writer: RefCell<Option<Writer>>,
    /// The objects this host serves: those of its shard.
    placement: Placement,
    /// The other shards, once the server linked them.
    peers: RefCell<Option<Rc<dyn Peers>>>,
    /// The stubs that the other shards' stubs to objects of this one hand their calls to.
    pub(crate) handoffs: shard::Handoffs,
    /// Bytes in flight over every connection of the host (see `inflight_bytes_max`).
    budget: Rc<Budget>,
    /// The wall clock alarms fire by; objects read it through [`State::now_ms`], so that a
    /// test's manual clock moves the objects' idea of time and the alarms' together.
    clock: Arc<dyn Clock>,
    /// What the layers above keep per host, one value per type: the RPC layer's registry of
    /// the providers of external classes, which its classes and its servers both reach.
    extensions: RefCell<HashMap<TypeId, Rc<dyn Any>>>,
    /// The server's metrics (shared with the other shards).
    metrics: Arc<Metrics>,
    /// Exports and backups running (see [`operations::DUMPS_MAX`]).
    dumps: Arc<tokio::sync::Semaphore>,
    /// The alarm scheduler, once started.
    scheduler: RefCell<Weak<alarms::Scheduler>>,
}

/// A running host, on the current thread (inside a tokio `LocalSet`). Cheap to clone.
#[derive(Clone)]
pub struct Host {
    inner: Rc<HostInner>,
}

impl Host {
    /// Builds the namespaces on `backend` and starts its writer. Must run inside a `LocalSet`.
    pub(crate) fn open(config: Config, backend: Arc<dyn Backend>) -> Result<Host, StartError> {
        for (namespace, class) in &config.bindings {
            if !config.classes.contains_key(class) {
                return Err(StartError::UnknownClass {
                    namespace: namespace.clone(),
                    class: class.clone(),
                });
            }
        }
        let metrics = config.metrics.clone().unwrap_or_else(Metrics::new);
        let (writer, handle) = match &config.writer {
            Some(shared) => (None, shared.clone()),
            None => {
                let writer = Writer::spawn_measured(backend.clone(), metrics.storage().clone())?;
                let handle = writer.handle();
                (Some(writer), handle)
            }
        };
        let mut shared = Shared::new(backend.clone(), handle, config.storage_limits.clone())?;
        shared.cluster = config.cluster.clone();
        let shared = Rc::new(shared);
        let records = config
            .bindings
            .iter()
            .map(|(name, class)| Ok((name.clone(), class.clone(), backend.namespace(name)?)))
            .collect::<Result<Vec<(String, String, storage::NamespaceRecord)>, storage::Error>>()?;
        let clock: Arc<dyn Clock> = config
            .clock
            .clone()
            .unwrap_or_else(|| Arc::new(SystemClock));
        let inner = Rc::new_cyclic(|host: &Weak<HostInner>| HostInner {
            namespaces: records
                .into_iter()
                .map(|(name, class, record)| {
                    let core = NamespaceCore {
                        minter: RefCell::new(IdMinter::new(&name, &record.secret)),
                        tag: record.tag,
                        factory: config.classes[&class].clone(),
                        name: name.clone(),
                        class_name: class,
                        activations: RefCell::default(),
                        sockets: Rc::default(),
                        host: host.clone(),
                        metrics: metrics.namespace(&name),
                    };
                    (name, Rc::new(core))
                })
                .collect(),
            storage: shared,
            limits: config.limits.clone(),
            active: Cell::new(0),
            closing: Cell::new(false),
            writer: RefCell::new(writer),
            placement: config.placement,
            peers: RefCell::default(),
            handoffs: shard::Handoffs::default(),
            budget: Budget::new(config.limits.inflight_bytes_max),
            clock: clock.clone(),
            extensions: RefCell::default(),
            metrics,
            dumps: Arc::new(tokio::sync::Semaphore::new(operations::DUMPS_MAX)),
            scheduler: RefCell::new(Weak::new()),
        });
        tokio::task::spawn_local(sweep_idle(Rc::downgrade(&inner)));
        alarms::Scheduler::start(&inner, clock);
        Ok(Host { inner })
    }

    /// The namespace bound to `name`.
    pub fn namespace(&self, name: &str) -> Option<Namespace> {
        self.inner.namespace(name)
    }

    /// Every namespace, as (name, class name), ordered by name.
    pub fn namespaces(&self) -> Vec<(String, String)> {
        let namespaces = self.inner.namespaces.values();
        namespaces
            .map(|ns| (ns.name.clone(), ns.class_name.clone()))
            .collect()
    }

    /// Counters of the storage writer.
    pub fn writer_stats(&self) -> Arc<WriterStats> {
        self.inner.storage.writer.stats.clone()
    }

    /// The server's metrics.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Keeps `value` with the host, as the one value of its type (see `HostInner::extensions`).
    pub(crate) fn set_extension<T: Any>(&self, value: Rc<T>) {
        let mut extensions = self.inner.extensions.borrow_mut();
        extensions.insert(TypeId::of::<T>(), value);
    }

    /// The value of type `T` kept with the host, if one is.
    pub(crate) fn extension<T: Any>(&self) -> Option<Rc<T>> {
        let value = self
            .inner
            .extensions
            .borrow()
            .get(&TypeId::of::<T>())?
            .clone();
        value.downcast().ok()
    }

    /// The objects this host serves, among its server's shards.
    pub(crate) fn placement(&self) -> Placement {
        self.inner.placement
    }

    /// Links the host to the other shards of its server.
    pub(crate) fn set_peers(&self, peers: Rc<dyn Peers>) {
        *self.inner.peers.borrow_mut() = Some(peers);
    }

    /// The other shards of the server, once linked.
    pub(crate) fn peers(&self) -> Option<Rc<dyn Peers>> {
        self.inner.peers.borrow().clone()
    }

    /// The stub this shard keeps for stub `key` of another shard, which hands its calls off
    /// to it (see [`RemoteObject`]).
    pub(crate) fn handed_stub(&self, key: u64) -> Result<Stub, Error> {
        self.inner.handoffs.get(key)
    }

    /// The shard of `id` when it is not this host's.
    pub(crate) fn remote_shard(&self, id: &ObjectId) -> Option<usize> {
        let placement = self.inner.placement;
        let shard = placement.shard_of(id.bytes());
        (shard != placement.shard).then_some(shard)
    }

    /// The budget of bytes in flight that the host's connections share.
    pub(crate) fn budget(&self) -> &Rc<Budget> {
        &self.inner.budget
    }

    /// Bytes in flight now over every connection (see [`HostLimits::inflight_bytes_max`]).
    pub fn inflight_bytes(&self) -> usize {
        self.inner.budget.used()
    }

    /// Active objects, over all namespaces.
    pub fn activations(&self) -> usize {
        self.inner.active.get()
    }

    /// Evicts every idle object now (as the idle timeout would); how many.
    pub fn evict_idle(&self) -> usize {
        self.inner.evict(|_| true, usize::MAX)
    }

    /// Shuts down gracefully: refuses new calls and new stubs (`disconnected`), gives running
    /// calls up to [`SHUTDOWN_GRACE`] to finish (their writes commit and their responses leave),
    /// then breaks every stub, lets in-flight commits settle, and stops the writer.
    pub async fn shutdown(&self) {
        self.inner.closing.set(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while tokio::time::Instant::now() < deadline && !self.inner.all_idle() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut stores = Vec::new();
        for namespace in self.inner.namespaces.values() {
            // Sockets of evicted objects have no activation to close them.
            let holders: Vec<_> = namespace.sockets.borrow().values().cloned().collect();
            for sockets in holders {
                sockets.close_all(socket::CLOSE_GOING_AWAY, activation::SHUTTING_DOWN);
            }
            let activations = std::mem::take(&mut *namespace.activations.borrow_mut());
            self.inner
                .active
                .set(self.inner.active.get() - activations.len());
            namespace.metrics.add_active(-(activations.len() as i64));
            for activation in activations.into_values() {
                stores.push(activation.store.clone());
                activation.reset(activation::SHUTTING_DOWN);
            }
        }
        for store in stores {
            store.wait_idle().await;
        }
        // The sockets' close frames go out before the event loop stops (bounded: a peer that
        // does not read holds its pump no longer than this).
        let deadline = tokio::time::Instant::now() + SOCKETS_CLOSE_GRACE;
        while socket::pumps_running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // What the layers above keep with the host may hold the host (the gateway, the links
        // to other shards): let go of it, so that the host and its storage are dropped.
        self.inner.peers.borrow_mut().take();
        self.inner.handoffs.clear();
        std::mem::take(&mut *self.inner.extensions.borrow_mut());
        let writer = self.inner.writer.borrow_mut().take();
        if let Some(writer) = writer {
            tokio::task::spawn_blocking(move || writer.shutdown())
                .await
                .ok();
        }
    }
}

/// How long a graceful shutdown waits for WebSockets to send their close frames.
const SOCKETS_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a graceful shutdown waits for running calls.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl HostInner {
    /// Whether this host may serve the object `id` as far as its cluster goes: always outside
    /// one; in one, while its node owns the object's virtual shard and its leases hold.
    pub(crate) fn serves_shard_of(&self, id: &[u8; 32]) -> bool {
        match &self.storage.cluster {
            None => true,
            Some(cluster) => {
                let shard = self.storage.shards.shard_of(id);
                matches!(cluster.route(shard), Route::Here(_))
            }
        }
    }

    fn all_idle(&self) -> bool {
        let mut activations = self.namespaces.values().flat_map(|ns| {
            let registry = ns.activations.borrow();
            registry.values().cloned().collect::<Vec<_>>()
        });
        activations.all(|a| a.is_idle() || a.is_broken())
    }

    pub(crate) fn namespace(self: &Rc<Self>, name: &str) -> Option<Namespace> {
        let core = self.namespaces.get(name)?.clone();
        Some(Namespace { core })
    }

    /// Evicts idle objects that `pick` chooses, least recently used first, at most `count`;
    /// also drops reset activations whose last commit settled. How many were evicted.
    fn evict(&self, pick: impl Fn(&Activation) -> bool, count: usize) -> usize {
        let mut candidates: Vec<(std::time::Instant, Rc<NamespaceCore>, [u8; 32])> = Vec::new();
        for namespace in self.namespaces.values() {
            for (id, activation) in namespace.activations.borrow().iter() {
                let settled_reset = activation.is_broken() && !activation.store.is_flushing();
                if settled_reset || (activation.is_idle() && pick(activation)) {
                    candidates.push((activation.last_used(), namespace.clone(), *id));
                }
            }
        }
        candidates.sort_by_key(|(used, _, _)| *used);
        let mut evicted = Vec::new();
        for (_, namespace, id) in candidates {
            if evicted.len() >= count {
                break;
            }
            let mut registry = namespace.activations.borrow_mut();
            let Some(activation) = registry.get(&id).cloned() else {
                continue;
            };
            if activation.is_broken() || activation.mark_evicted() {
                registry.remove(&id);
                self.active.set(self.active.get() - 1);
                namespace.metrics.add_active(-1);
                if !activation.is_broken() {
                    namespace.metrics.evicted();
                    evicted.push(activation);
                }
            }
        }
        for activation in &evicted {
            activation.release();
        }
        evicted.len()
    }
}

/// Evicts objects idle for longer than `idle_evict_ms`, every half of it, while the host lives.
async fn sweep_idle(host: Weak<HostInner>) {
    let Some(idle_ms) = host.upgrade().map(|h| h.limits.idle_evict_ms) else {
        return;
    };
    let idle = std::time::Duration::from_millis(idle_ms.max(2));
    loop {
        tokio::time::sleep(idle / 2).await;
        let Some(host) = host.upgrade() else { return };
        let now = std::time::Instant::now();
        let evicted = host.evict(|a| now.duration_since(a.last_used()) >= idle, usize::MAX);
        if evicted > 0 {
            tracing::debug!(evicted, "evicted idle objects");
        }
    }
}

pub(crate) struct NamespaceCore {
    pub(crate) name: String,
    pub(crate) class_name: String,
    pub(crate) factory: Factory,
    /// Replaced when an import gives the namespace the secret of its source.
    pub(crate) minter: RefCell<IdMinter>,
    /// The namespace's prefix in storage.
    pub(crate) tag: u32,
    /// The registry: at most one live activation per ID. A reset activation stays until the
    /// next `get` of its ID replaces it (the successor waits on its last commit).
    activations: RefCell<HashMap<[u8; 32], Rc<Activation>>>,
    /// The objects that hold WebSockets, also while evicted (hibernation).
    sockets: Rc<SocketRegistry>,
    pub(crate) host: Weak<HostInner>,
    /// The namespace's series of the server's metrics, resolved once.
    pub(crate) metrics: NamespaceMetrics,
}

impl NamespaceCore {
    /// The live activation of `id`, built if there is none. The new activation is registered
    /// before its constructor runs, so a constructor that asks for a stub to its own ID gets
    /// one to this activation (its calls wait until the constructor returned).
    fn activation(self: &Rc<Self>, id: ObjectId) -> Result<Rc<Activation>, Error> {
        let host = self.host.upgrade().ok_or_else(activation::shutting_down)?;
        let existing = self.activations.borrow().get(id.bytes()).cloned();
        let predecessor: Option<Rc<ObjectStore>> = match existing {
            Some(activation) if !activation.is_broken() => return Ok(activation),
            Some(activation) => Some(activation.store.clone()),
            None => None,
        };
        // Once shutdown began, no object is built: its stub could take no call (see
        // `Stub::current`), and it would only keep shutdown waiting, then be reset.
        if host.closing.get() {
            return Err(activation::shutting_down());
        }
        if predecessor.is_none() {
            self.make_room(&host)?;
        }
        let key = ObjectKey {
            tag: self.tag,
            id: *id.bytes(),
        };
        let store = Rc::new(ObjectStore::new(
            host.storage.clone(),
            key,
            id.name().map(Into::into),
        ));
        let queue_max = host.limits.object_queue_max;
        let limits = host.limits.web_sockets;
        let sockets = ObjectSockets::of(&self.sockets, *id.bytes(), limits, &self.metrics);
        let activation = Activation::new(
            id.clone(),
            store,
            host.clock.clone(),
            queue_max,
            predecessor,
            sockets,
            self.metrics.clone(),
        );
        self.metrics.activated();
        let replaced = self
            .activations
            .borrow_mut()
            .insert(*id.bytes(), activation.clone());
        if replaced.is_none() {
            host.active.set(host.active.get() + 1);
            self.metrics.add_active(1);
        }
        let state = activation.state().clone();
        let env = Env {
            host: self.host.clone(),
        };
        if let Err(error) = activation.install(|| (self.factory)(state, env)) {
            self.unregister(&activation, replaced);
            return Err(error);
        }
        Ok(activation)
    }

    /// Takes an activation whose constructor failed out of the registry, so the next `get`
    /// builds again; the reset one it replaced goes back, as the next one must wait on it.
    fn unregister(&self, activation: &Rc<Activation>, replaced: Option<Rc<Activation>>) {
        let key = *activation.id().bytes();
        let mut registry = self.activations.borrow_mut();
        let ours = registry
            .get(&key)
            .is_some_and(|a| Rc::ptr_eq(a, activation));
        if !ours {
            return;
        }
        match replaced {
            Some(predecessor) => {
                registry.insert(key, predecessor);
            }
            None => {
                registry.remove(&key);
                if let Some(host) = self.host.upgrade() {
                    host.active.set(host.active.get() - 1);
                    self.metrics.add_active(-1);
                }
            }
        }
    }

    /// Keeps the host under `activations_max`, evicting the least recently used idle tenth.
    fn make_room(&self, host: &HostInner) -> Result<(), Error> {
        let max = host.limits.activations_max;
        if host.active.get() < max {
            return Ok(());
        }
        host.evict(|_| true, (max / 10).max(1));
        if host.active.get() >= max {
            host.metrics.refused(Bound::activations);
            return Err(Error::Overloaded(format!(
                "the host has {max} active objects and none is idle (activations_max)"
            )));
        }
        Ok(())
    }
}

/// A namespace of the host, for objects calling objects and for embedding. Cheap to clone.
#[derive(Clone)]
pub struct Namespace {
    core: Rc<NamespaceCore>,
}

/// A page of objects: each with its stored alarm, when asked for; and whether more remain.
pub(crate) type ObjectsPage = (Vec<(ObjectRecord, Option<u64>)>, bool);

impl Namespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The name of the class it is bound to.
    pub fn class_name(&self) -> &str {
        &self.core.class_name
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        let max = self.limits().name_bytes_max;
        if name.len() > max {
            return Err(Error::InvalidArgument(format!(
                "object name is {} bytes, over the limit of {max} bytes (name_bytes_max)",
                name.len()
            )));
        }
        Ok(())
    }

    fn limits(&self) -> HostLimits {
        self.core
            .host
            .upgrade()
            .map(|h| h.limits.clone())
            .unwrap_or_default()
    }

    /// A fresh random ID.
    pub fn new_unique_id(&self) -> ObjectId {
        self.core.minter.borrow().new_unique()
    }

    /// The ID of `name`.
    pub fn id_from_name(&self, name: &str) -> Result<ObjectId, Error> {
        self.check_name(name)?;
        Ok(self.core.minter.borrow().from_name(name))
    }

    /// Parses and checks the text form of an ID of this namespace.
    pub fn id_from_string(&self, text: &str) -> Result<ObjectId, Error> {
        Ok(self.core.minter.borrow().parse(text)?)
    }

    /// Checks raw ID bytes (and the name sent with them) as an ID of this namespace.
    pub fn check_id(&self, bytes: &[u8], name: Option<&str>) -> Result<ObjectId, Error> {
        if let Some(name) = name {
            self.check_name(name)?;
        }
        Ok(self.core.minter.borrow().check(bytes, name)?)
    }

    /// A stub for the object `id`, activating it if needed.
    pub fn get(&self, id: &ObjectId) -> Result<Stub, Error> {
        let id = self.check_id(id.bytes(), id.name())?;
        self.stub_of(id)
    }

    /// A stub for the object named `name`.
    pub fn get_by_name(&self, name: &str) -> Result<Stub, Error> {
        let id = self.id_from_name(name)?;
        self.stub_of(id)
    }

    /// A stub for `id`, an ID this namespace minted or checked already (no check again): to
    /// its activation here, or through the peers when it is an object of another shard (see
    /// [`shard`]).
    pub(crate) fn stub_of(&self, id: ObjectId) -> Result<Stub, Error> {
        self.stub_routed(id, true)
    }

    /// A stub for `id` of an object this node owns, never one passed on to another node of
    /// the cluster: what a node link asks for (see `Host.nodeLink`).
    pub(crate) fn stub_here(&self, id: ObjectId) -> Result<Stub, Error> {
        self.stub_routed(id, false)
    }

    /// [`Namespace::stub_of`]; in a cluster, an object of a virtual shard another node owns is
    /// reached there when `forward`, and refused with `disconnected` when not (or when no node
    /// owns its shard now).
    fn stub_routed(&self, id: ObjectId, forward: bool) -> Result<Stub, Error> {
        let host = self
            .core
            .host
            .upgrade()
            .ok_or_else(activation::shutting_down)?;
        if let Some(cluster) = &host.storage.cluster {
            let shard = host.storage.shards.shard_of(id.bytes());
            match cluster.route(shard) {
                Route::Here(_) => {}
                Route::Node(node) if forward => {
                    if host.closing.get() {
                        return Err(activation::shutting_down());
                    }
                    let peers = host.peers.borrow().clone().ok_or_else(|| {
                        Error::Disconnected("the node is not linked to the cluster yet".into())
                    })?;
                    let client = peers.node_stub(&node, &self.core.name, &id);
                    return Ok(Stub {
                        target: Target::Remote(RemoteObject::linked(id, client)),
                    });
                }
                Route::Node(node) => return Err(cluster::not_owner(shard, Some(&node.name))),
                Route::Nobody => return Err(cluster::not_owner(shard, None)),
            }
        }
        let shard = host.placement.shard_of(id.bytes());
        if shard == host.placement.shard {
            return Ok(Stub::new(self.core.clone(), self.core.activation(id)?));
        }
        if host.closing.get() {
            return Err(activation::shutting_down());
        }
        let peers = host.peers.borrow().clone().ok_or_else(|| {
            Error::Disconnected("the host is not linked to the other shards yet".into())
        })?;
        Ok(Stub {
            target: Target::Remote(RemoteObject::on_shard(peers, shard, &self.core.name, id)),
        })
    }

    /// Objects with stored data, in ID order, after `start_after`; and whether more remain.
    pub fn list_objects(
        &self,
        start_after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<(Vec<ObjectRecord>, bool), Error> {
        let (read, _) = self.list_objects_reader(start_after.copied(), limit, false)?;
        let (page, more) = read()?;
        Ok((page.into_iter().map(|(record, _)| record).collect(), more))
    }

    /// A page of [`Namespace::list_objects`], each object with its stored alarm when
    /// `alarms`, read off the event loop when the engine's reads are remote (a round trip to
    /// PostgreSQL), on it otherwise (LMDB answers from memory).
    pub(crate) fn list_objects_page(
        &self,
        start_after: Option<[u8; 32]>,
        limit: usize,
        alarms: bool,
    ) -> impl Future<Output = Result<ObjectsPage, Error>> + use<> {
        let checked = self.list_objects_reader(start_after, limit, alarms);
        async move {
            let (read, remote) = checked?;
            match remote {
                true => tokio::task::spawn_blocking(read).await.unwrap_or_else(|_| {
                    Err(Error::Disconnected("storage error: the read failed".into()))
                }),
                false => read(),
            }
        }
    }

    /// The read of [`Namespace::list_objects_page`], checked, and whether it is remote.
    fn list_objects_reader(
        &self,
        start_after: Option<[u8; 32]>,
        limit: usize,
        alarms: bool,
    ) -> Result<
        (
            impl FnOnce() -> Result<ObjectsPage, Error> + Send + use<>,
            bool,
        ),
        Error,
    > {
        let max = self.limits().list_objects_max;
        if limit == 0 || limit > max {
            return Err(Error::InvalidArgument(format!(
                "limit must be between 1 and {max} (list_objects_max), got {limit}"
            )));
        }
        let host = self
            .core
            .host
            .upgrade()
            .ok_or_else(activation::shutting_down)?;
        let backend = host.storage.backend.clone();
        let remote = backend.remote_reads();
        let tag = self.core.tag;
        let read = move || {
            let failed = |e: storage::Error| Error::Disconnected(format!("storage error: {e}"));
            let (records, more) = backend
                .list_objects(tag, start_after.as_ref(), limit)
                .map_err(failed)?;
            let mut page = Vec::with_capacity(records.len());
            for record in records {
                let alarm = match alarms {
                    true => backend
                        .alarm(&ObjectKey { tag, id: record.id })
                        .map_err(failed)?,
                    false => None,
                };
                page.push((record, alarm));
            }
            Ok((page, more))
        };
        Ok((read, remote))
    }

    /// The durable alarm of the object `id` (ms since the Unix epoch), if it has one: read from
    /// storage, without activating the object, so an alarm set by a write that has not
    /// committed yet is not seen.
    pub fn stored_alarm(&self, id: &[u8; 32]) -> Result<Option<u64>, Error> {
        let host = self
            .core
            .host
            .upgrade()
            .ok_or_else(activation::shutting_down)?;
        let object = ObjectKey {
            tag: self.core.tag,
            id: *id,
        };
        host.storage
            .backend
            .alarm(&object)
            .map_err(|e| Error::Disconnected(format!("storage error: {e}")))
    }
}

/// A stub: a reference to one object, through which calls arrive in the order made. It
/// follows its object across evictions; it breaks (for good) when the object is reset.
#[derive(Clone)]
pub struct Stub {
    target: Target,
}

/// Where a stub's calls go.
#[derive(Clone)]
enum Target {
    /// An object of this host.
    Local {
        namespace: Rc<NamespaceCore>,
        /// The activation calls go to; replaced when the host evicted it while idle.
        activation: Rc<RefCell<Rc<Activation>>>,
    },
    /// An object of another shard of the server.
    Remote(Rc<RemoteObject>),
}

impl Stub {
    fn new(namespace: Rc<NamespaceCore>, activation: Rc<Activation>) -> Stub {
        Stub {
            target: Target::Local {
                namespace,
                activation: Rc::new(RefCell::new(activation)),
            },
        }
    }

    /// The object's ID.
    pub fn id(&self) -> ObjectId {
        match &self.target {
            Target::Local { activation, .. } => activation.borrow().id().clone(),
            Target::Remote(remote) => remote.id.clone(),
        }
    }

    /// The name of the object's namespace; `None` for an object of another node.
    pub(crate) fn namespace_name(&self) -> Option<&str> {
        match &self.target {
            Target::Local { namespace, .. } => Some(&namespace.name),
            Target::Remote(remote) => remote.namespace(),
        }
    }

    /// The stub's way to the object when it lives on another shard or node: its hand-off,
    /// its link and whether it is broken (see [`RemoteObject`]).
    pub(crate) fn remote(&self) -> Option<&Rc<RemoteObject>> {
        match &self.target {
            Target::Remote(remote) => Some(remote),
            Target::Local { .. } => None,
        }
    }

    /// The live activation, building a new one if the last was evicted.
    fn current(&self) -> Result<Rc<Activation>, Error> {
        let Target::Local {
            namespace,
            activation,
        } = &self.target
        else {
            return Err(Error::Disconnected(
                "the object lives on another shard: its stub is called through its capability"
                    .into(),
            ));
        };
        let host = namespace
            .host
            .upgrade()
            .ok_or_else(activation::shutting_down)?;
        if host.closing.get() {
            return Err(activation::shutting_down());
        }
        let current = activation.borrow().clone();
        if let Some(cluster) = &host.storage.cluster {
            let shard = host.storage.shards.shard_of(current.id().bytes());
            if !cluster.holds(shard, current.store.epoch) {
                let error = cluster::not_owner(shard, None);
                // Owned again since, under a new epoch: this activation's cache may be stale.
                // (Not owned now: the node's lease keeper resets or hands its objects off.)
                let now = cluster.epoch(shard);
                if now != 0 && now != current.store.epoch {
                    current.reset(&error.to_string());
                }
                return Err(error);
            }
        }
        if !current.is_evicted() {
            return Ok(current);
        }
        let fresh = namespace.activation(current.id().clone())?;
        *activation.borrow_mut() = fresh.clone();
        Ok(fresh)
    }

    /// Sends `request` to the object, with its whole body, and reads the whole response (at
    /// most [`WHOLE_RESPONSE_BYTES_MAX`]: use [`Stub::fetch_stream`] for more). The call
    /// takes its place in the object's delivery order when `fetch` is called, not when the
    /// future is first polled.
    pub fn fetch(&self, request: Request) -> impl Future<Output = Result<Response, Error>> + use<> {
        if let Target::Remote(remote) = &self.target
            && remote.hands_off()
        {
            return Either::Left(remote.hand_off(request));
        }
        // Combinators, not an async block: an async block that awaits a future it owns holds
        // it twice, and the callers of `fetch` move this future on each of their layers.
        let call = self.fetch_stream(request.map(Body::from));
        Either::Right(call.and_then(|response| {
            let (parts, body) = response.into_parts();
            let body = body.with_whole_bytes_max(WHOLE_RESPONSE_BYTES_MAX).bytes();
            body.map(move |body| match body {
                Ok(body) => Ok(Response::from_parts(parts, body)),
                Err(e) => Err(Error::Remote(format!("reading the response body: {e}"))),
            })
        }))
    }

    /// Sends `request` to the object, whose body may be a stream; the response's body may be
    /// one too. Ordered as [`Stub::fetch`].
    pub fn fetch_stream(
        &self,
        request: StreamRequest,
    ) -> impl Future<Output = Result<StreamResponse, Error>> + use<> {
        if let Target::Remote(remote) = &self.target {
            // Boxed: the far larger future of a call through capnp would otherwise set the
            // size of every local call's future, which is moved on each of its layers.
            return Either::Left(Box::pin(remote.fetch_stream(request)));
        }
        let call = self.start(request, false);
        Either::Right(call.map_ok(|called| called.response))
    }

    /// [`Stub::fetch_stream`] of a request that offers the object a WebSocket upgrade, for the
    /// transports that can complete one: the socket the object accepted comes back with the
    /// response (a `101`). Only for objects of this host: a transport hands an upgrade for
    /// another shard's object to that shard.
    pub(crate) fn fetch_upgrade(
        &self,
        request: StreamRequest,
    ) -> impl Future<Output = Result<(StreamResponse, Option<HostSocket>), Error>> + use<> {
        let call = self.start(request, true);
        let local = match &self.target {
            Target::Local { namespace, .. } => Some(namespace.clone()),
            Target::Remote(_) => None,
        };
        let id = self.id();
        async move {
            let called = call.await?;
            let socket = match (called.socket, local) {
                (Some(socket), Some(namespace)) => Some(HostSocket {
                    namespace,
                    id,
                    socket,
                }),
                _ => None,
            };
            Ok((called.response, socket))
        }
    }

    fn start(
        &self,
        request: StreamRequest,
        upgrade: bool,
    ) -> impl Future<Output = Result<activation::Called, Error>> + use<> {
        match self.current() {
            Ok(activation) => Either::Left(activation.call(request, upgrade)),
            Err(error) => Either::Right(std::future::ready(Err(error))),
        }
    }

    /// Delivers a call of the object's own interface (see [`DurableObject::interface`]),
    /// ordered as [`Stub::fetch`]: its place is taken now. `Ok` with what the object answered,
    /// its error included; `Err` when the host could not deliver it or the object was reset.
    /// Only for objects of this host (the RPC layer calls another shard's object through its
    /// capability).
    pub(crate) fn call_interface(
        &self,
        call: InterfaceCall,
    ) -> impl Future<Output = Result<InterfaceAnswer, Error>> + use<> {
        match self.current() {
            Ok(activation) => Either::Left(activation.call_interface(call)),
            Err(error) => Either::Right(std::future::ready(Err(error))),
        }
    }

    /// Whether the stub is broken (its object was reset): get a new one.
    pub fn is_broken(&self) -> bool {
        match &self.target {
            Target::Local { activation, .. } => activation.borrow().is_broken(),
            Target::Remote(remote) => remote.is_broken(),
        }
    }

    /// Calls waiting for delivery to the object (0 for an object of another shard: they wait
    /// there).
    pub fn queued(&self) -> usize {
        match &self.target {
            Target::Local { activation, .. } => activation.borrow().queued(),
            Target::Remote(_) => 0,
        }
    }

    /// The `State` of the object's live activation (built again if it was evicted): the
    /// object's own, for the test harness.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn state(&self) -> Result<State, Error> {
        Ok(self.current()?.state().clone())
    }
}

impl Stub {
    /// [`Stub::fetch`] of a request with `method`, `path` (with its query, e.g. `/a?b=1`) and
    /// `body`, and no headers. A method or path that does not parse fails with
    /// [`Error::InvalidArgument`].
    pub fn call<B: Into<Bytes>>(
        &self,
        method: &str,
        path: &str,
        body: B,
    ) -> impl Future<Output = Result<Response, Error>> + use<B> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .body(body.into());
        match request {
            Ok(request) => Either::Left(self.fetch(request)),
            Err(error) => Either::Right(std::future::ready(Err(Error::InvalidArgument(format!(
                "invalid request {method} {path:?}: {error}"
            ))))),
        }
    }
}

/// Largest response body [`Stub::fetch`] reads whole: as large as a message of the wire.
pub const WHOLE_RESPONSE_BYTES_MAX: usize = crate::wire::MESSAGE_BYTES_MAX;

/// A WebSocket an object accepted, as its transport (the gateway, a capnp peer) holds it:
/// the transport attaches the sink that sends to the peer, and hands in what the peer sends.
pub(crate) struct HostSocket {
    namespace: Rc<NamespaceCore>,
    id: ObjectId,
    socket: Rc<SocketCore>,
}

impl HostSocket {
    /// Starts sending to the peer through `sink` (what the object sent meanwhile goes first).
    pub(crate) fn attach(&self, sink: Box<dyn SocketSink>) {
        self.socket.attach(sink);
    }

    /// The largest message the peer may send.
    pub(crate) fn message_bytes_max(&self) -> usize {
        self.socket.message_bytes_max()
    }

    /// Delivers a message of the peer: answered by the host if it is the object's
    /// auto-response request, else to the object (built again if it was evicted). Resolves
    /// when the object's handler returned, so that a peer that sends faster than the object
    /// handles is slowed at its transport. A message over the size bound closes the socket
    /// with 1009. Messages after a close are dropped.
    pub(crate) async fn receive(&self, message: WebSocketMessage) -> Result<(), Error> {
        if self.socket.is_closing() {
            return Ok(());
        }
        let max = self.socket.message_bytes_max();
        if message.len() > max {
            self.socket
                .reply_close(socket::CLOSE_TOO_BIG, "message over the size limit");
            let error = format!("a message of {} bytes, over {max}", message.len());
            return self.deliver(SocketEvent::Error(error)).await;
        }
        if let Some(response) = self.socket.auto_response(&message) {
            self.socket.send_from_host(response);
            return Ok(());
        }
        self.deliver(SocketEvent::Message(message)).await
    }

    /// Resolves once the socket is closing: a close was queued (by the object, the host, or
    /// as the answer to the peer's), or the peer was lost.
    pub(crate) async fn until_closing(&self) {
        self.socket.until_closing().await;
    }

    /// Resolves once a close frame the host queued was sent (or can no longer be), when one
    /// was queued; at once otherwise.
    pub(crate) async fn until_close_sent(&self) {
        if self.socket.close_queued() {
            self.socket.until_pumped().await;
        }
    }

    /// The peer broke a rule of the socket (a message over the size bound: 1009): the host
    /// closes it with `code`, and the object hears of it as an error.
    pub(crate) async fn refuse(&self, code: u16, why: String) -> Result<(), Error> {
        if self.socket.is_closing() {
            return Ok(());
        }
        self.socket.reply_close(code, &why);
        self.deliver(SocketEvent::Error(why)).await
    }

    /// The peer closed the socket: the object hears of it, then the host answers the close
    /// (unless the object closed the socket itself meanwhile).
    pub(crate) async fn closed(&self, code: u16, reason: String) -> Result<(), Error> {
        if self.socket.is_closing() {
            self.socket.lost();
            return self.tell_untold().await;
        }
        let result = self.deliver(SocketEvent::Close(code, reason.clone())).await;
        self.socket.reply_close(code, &reason);
        result
    }

    /// The peer went away without a close, or its transport failed: the socket is gone, and
    /// the object hears of it (unless the socket had ended with a close the object knows of).
    pub(crate) async fn failed(&self, error: String) -> Result<(), Error> {
        let known = self.socket.close_queued() || self.socket.is_lost();
        self.socket.lost();
        let untold = self.socket.take_untold();
        match (known, untold) {
            // The object knows how the socket ended (a close, or an earlier loss) unless the
            // host ended it on its own and has not said why yet.
            (true, None) => Ok(()),
            (_, Some(why)) => self.deliver(SocketEvent::Error(why)).await,
            (false, None) => self.deliver(SocketEvent::Error(error)).await,
        }
    }

    /// Tells the object why the host ended the socket on its own, if it did.
    async fn tell_untold(&self) -> Result<(), Error> {
        match self.socket.take_untold() {
            Some(why) => self.deliver(SocketEvent::Error(why)).await,
            None => Ok(()),
        }
    }

    async fn deliver(&self, event: SocketEvent) -> Result<(), Error> {
        let activation = self.namespace.activation(self.id.clone())?;
        activation.socket_event(self.socket.clone(), event).await
    }
}

impl Drop for HostSocket {
    /// A transport that lets its socket go without telling (its task was dropped) has lost
    /// the peer.
    fn drop(&mut self) {
        if !self.socket.is_closing() {
            self.socket.lost();
        }
    }
}

/// The host as an object sees it: its namespaces, to call other objects.
#[derive(Clone)]
pub struct Env {
    /// Weak: the host owns every instance, and instances own their `Env`.
    host: Weak<HostInner>,
}

impl Env {
    /// The namespace bound to `name`, if there is one (and the host is running).
    pub fn namespace(&self, name: &str) -> Option<Namespace> {
        self.host.upgrade()?.namespace(name)
    }

    /// The host, while it runs: for the classes of the layers above, which reach their
    /// per-host state through it (see [`Host::extension`]).
    pub(crate) fn host(&self) -> Option<Host> {
        self.host.upgrade().map(|inner| Host { inner })
    }
}
