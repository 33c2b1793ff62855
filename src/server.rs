//! Hosting: the builder that assembles a host from classes and namespaces, the listeners, and
//! the event-loop thread.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, oneshot};

use crate::admin::{self, AdminContext};
use crate::cluster::{ClusterOptions, Keeper};
use crate::gateway::{self, GatewayOptions};
use crate::host::{
    Config, DurableObject, Env, Host, HostLimits, Placement, StartError, State, factory,
};
use crate::metrics::Metrics;
use crate::rpc::RpcOptions;
use crate::rpc::external::External;
use crate::rpc::external::registry::Registry;
use crate::shards::{Links, Queues, run_jobs};
use crate::storage::cluster::Ownership;
use crate::storage::{Backend, Limits, LmdbBackend, LmdbOptions, PostgresBackend, Writer};
use crate::tls::ServerTls;
use crate::wire::ListenAddr;
use crate::wire::frame::FrameLimits;

/// Most client connections at once. Each costs buffers and an RPC state; past the bound new
/// connections are closed at once, so a flood of connections cannot exhaust memory or FDs.
pub const CONNECTIONS_MAX: usize = 4096;

/// The default listen address: loopback.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7450";

/// The addresses a server listens on, once it does.
struct Ready {
    addr: ListenAddr,
    http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

/// The default address of the HTTP gateway of `duro serve`: loopback.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7451";

/// The default address of the admin server of `duro serve` (`/metrics`, the console):
/// loopback.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7452";

/// A duro server: a host reachable over the network.
pub struct Server;

impl Server {
    /// A builder with no classes, listening on [`DEFAULT_LISTEN`] (Cap'n Proto only), data in
    /// LMDB under `./duro-data`.
    pub fn builder() -> Builder {
        Builder {
            config: Config {
                metrics: Some(Metrics::new()),
                ..Config::default()
            },
            storage: StorageChoice::Lmdb {
                data_dir: PathBuf::from("duro-data"),
                options: LmdbOptions::default(),
            },
            wrap_backend: None,
            rpc: RpcOptions::default(),
            listen: DEFAULT_LISTEN.parse().expect("the default address parses"),
            http: None,
            admin: None,
            gateway: GatewayOptions::default(),
            tls: None,
            external: std::collections::BTreeSet::new(),
            shards: 1,
            writer_per_shard: false,
            cluster: None,
        }
    }
}

/// Where the host keeps its data.
enum StorageChoice {
    /// LMDB in a data dir, opened when the host starts.
    Lmdb {
        data_dir: PathBuf,
        options: LmdbOptions,
    },
    /// A PostgreSQL store, opened when the host starts.
    Postgres {
        url: String,
        options: crate::storage::PostgresOptions,
    },
    /// A backend the caller opened.
    Given(Arc<dyn Backend>),
}

/// Where the server's TLS certificate and key come from.
enum TlsChoice {
    /// PEM files, read when the server starts.
    Pem { cert: PathBuf, key: PathBuf },
    /// A configuration the caller made.
    Given(ServerTls),
}

/// A function that wraps the storage backend (see [`Builder::wrap_backend`]).
type WrapBackend = Arc<dyn Fn(Arc<dyn Backend>) -> Arc<dyn Backend> + Send + Sync>;

/// Assembles a server: classes, namespaces bound to them, storage, listeners, limits.
pub struct Builder {
    config: Config,
    storage: StorageChoice,
    /// Wraps the backend once opened, e.g. to inject faults in tests.
    wrap_backend: Option<WrapBackend>,
    rpc: RpcOptions,
    listen: ListenAddr,
    /// The HTTP gateway's address, if it is on.
    http: Option<SocketAddr>,
    /// The admin server's address, if it is on.
    admin: Option<SocketAddr>,
    gateway: GatewayOptions,
    /// TLS on the TCP listener and the gateway, if it is on.
    tls: Option<TlsChoice>,
    /// The classes that providers implement (see [`Builder::external`]).
    external: std::collections::BTreeSet<String>,
    /// Event-loop threads (see [`Builder::shards`]).
    shards: usize,
    /// Each shard commits with a writer of its own instead of the one they share.
    writer_per_shard: bool,
    /// The server is a node of a cluster (see [`Builder::cluster`]).
    cluster: Option<ClusterOptions>,
}

impl Builder {
    /// Registers a class under `class_name`, built by `constructor`.
    pub fn class<T, F>(mut self, class_name: &str, constructor: F) -> Builder
    where
        T: DurableObject,
        F: Fn(State, Env) -> T + Send + Sync + 'static,
    {
        self.config
            .classes
            .insert(class_name.to_owned(), factory(constructor));
        self
    }

    /// Binds the namespace `name` to the class `class_name`.
    pub fn namespace(mut self, name: &str, class_name: &str) -> Builder {
        self.config
            .bindings
            .insert(name.to_owned(), class_name.to_owned());
        self
    }

    /// Binds the namespace `name` to the external class `class_name`: a class whose instances
    /// live in provider processes, in any language, that connect and call
    /// `Host.registerProvider(class_name, provider)` (see `schema/duro.capnp`). Each object's
    /// events go to the instance one provider built for it, with the guarantees of any class:
    /// one instance per ID, E-order, the input and output gates, resets. While no provider is
    /// registered, calls wait up to [`PROVIDER_WAIT`](crate::rpc::PROVIDER_WAIT) for one, then
    /// fail with `overloaded`. A Rust class of the same name is replaced.
    pub fn external(mut self, name: &str, class_name: &str) -> Builder {
        let class = class_name.to_owned();
        self = self.class(class_name, move |state, env| {
            External::new(state, env, &class)
        });
        self.external.insert(class_name.to_owned());
        self.namespace(name, class_name)
    }

    /// Keeps the data in LMDB in the data dir `path` (created if missing; the default is
    /// `./duro-data`). One host at a time may use it.
    pub fn data_dir(mut self, path: impl AsRef<Path>) -> Builder {
        let options = match self.storage {
            StorageChoice::Lmdb { options, .. } => options,
            StorageChoice::Postgres { .. } | StorageChoice::Given(_) => LmdbOptions::default(),
        };
        self.storage = StorageChoice::Lmdb {
            data_dir: path.as_ref().to_owned(),
            options,
        };
        self
    }

    /// Keeps the data in the PostgreSQL database at `url` (`postgresql://USER@HOST:PORT/DB`)
    /// instead of LMDB in a data dir: duro creates its tables there. One host at a time may
    /// use a store.
    pub fn store(mut self, url: impl Into<String>) -> Builder {
        self.storage = StorageChoice::Postgres {
            url: url.into(),
            options: crate::storage::PostgresOptions::default(),
        };
        self
    }

    /// Makes the server a node of a cluster: several servers on one PostgreSQL store
    /// ([`Builder::store`]), each owning the virtual shards it holds leases on and passing calls
    /// for the others' objects to their owners (see [`crate::cluster`]). The server's token
    /// ([`Builder::token`]) is the cluster's: the nodes present it to each other.
    pub fn cluster(mut self, options: ClusterOptions) -> Builder {
        self.cluster = Some(options);
        self
    }

    /// Whether the data goes to a data dir (LMDB), as it does unless [`Builder::store`] or
    /// [`Builder::backend`] said otherwise.
    pub fn uses_data_dir(&self) -> bool {
        matches!(self.storage, StorageChoice::Lmdb { .. })
    }

    /// Keeps the data in `backend` instead of LMDB in a data dir: e.g. a
    /// [`crate::storage::MemoryBackend`] for tests that need no disk.
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> Builder {
        self.storage = StorageChoice::Given(backend);
        self
    }

    /// The listen address.
    pub fn listen(mut self, addr: ListenAddr) -> Builder {
        self.listen = addr;
        self
    }

    /// Serves the HTTP gateway on `addr` too (off by default): `/{namespace}/{name}/{rest}`
    /// goes to `getByName(name).fetch` with the path `/{rest}`.
    pub fn http(mut self, addr: SocketAddr) -> Builder {
        self.http = Some(addr);
        self
    }

    /// Serves the admin server on `addr`, or not at all with `None` (the default): `GET
    /// /metrics` answers the server's metrics as Prometheus text, and the console the other
    /// paths. It takes the server's token as the gateway does ([`Builder::token`]).
    pub fn admin(mut self, addr: Option<SocketAddr>) -> Builder {
        self.admin = addr;
        self
    }

    /// The HTTP gateway's options.
    pub fn gateway_options(mut self, options: GatewayOptions) -> Builder {
        self.gateway = options;
        self
    }

    /// Requires Cap'n Proto clients to call `Host.authenticate(token)` before anything else,
    /// and HTTP requests to the gateway to carry `Authorization: Bearer <token>`. The token is
    /// compared in constant time; a wrong one is answered after a short delay.
    pub fn token(mut self, token: impl Into<String>) -> Builder {
        self.rpc.token = Some(Arc::from(token.into()));
        self
    }

    /// The time bounds of a Cap'n Proto connection's reads: a message must be whole within
    /// `message_timeout` of its first byte, and a connection with no call in progress is closed
    /// after `idle_timeout` of silence.
    pub fn frame_limits(mut self, limits: FrameLimits) -> Builder {
        self.rpc.frame = limits;
        self
    }

    /// Serves TLS on the Cap'n Proto listener (when it is TCP: a unix socket stays plain) and
    /// on the HTTP gateway, with the certificate chain of the PEM file `cert` and the private
    /// key of the PEM file `key`. The files are read when the server starts, which fails with
    /// [`StartError::Tls`] naming the file at fault.
    pub fn tls_pem(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Builder {
        self.tls = Some(TlsChoice::Pem {
            cert: cert.as_ref().to_owned(),
            key: key.as_ref().to_owned(),
        });
        self
    }

    /// [`Builder::tls_pem`] with a TLS configuration made by the caller.
    pub fn tls(mut self, tls: ServerTls) -> Builder {
        self.tls = Some(TlsChoice::Given(tls));
        self
    }

    /// The wall clock alarms fire by (default: the system's). A test gives a
    /// [`ManualClock`](crate::ManualClock) to run an alarm an hour away at once.
    pub fn clock(mut self, clock: Arc<dyn crate::Clock>) -> Builder {
        self.config.clock = Some(clock);
        self
    }

    /// The host's bounds.
    pub fn limits(mut self, limits: HostLimits) -> Builder {
        self.config.limits = limits;
        self
    }

    /// The storage limits.
    pub fn storage_limits(mut self, limits: Limits) -> Builder {
        self.config.storage_limits = limits;
        self
    }

    /// The LMDB map size: the most the data file may grow to. Only for LMDB in a data dir.
    pub fn map_bytes(mut self, bytes: usize) -> Builder {
        if let StorageChoice::Lmdb { options, .. } = &mut self.storage {
            options.map_bytes = bytes;
        }
        self
    }

    /// Wraps the storage backend, e.g. to inject faults in tests
    /// (see [`crate::storage::FaultyBackend`]).
    pub fn wrap_backend(
        mut self,
        wrap: impl Fn(Arc<dyn Backend>) -> Arc<dyn Backend> + Send + Sync + 'static,
    ) -> Builder {
        self.wrap_backend = Some(Arc::new(wrap));
        self
    }

    /// Serves with `count` event-loop threads (shards; 0: one per core). Each is a host of the
    /// objects whose IDs map to it (through the storage's virtual shards), always the same
    /// while the count stays; connections are accepted on the first and handed to each in
    /// turn, and a call to an object of another shard crosses to it keeping the contract
    /// (order, pipelining, gates, resets, bounds). The default is 1.
    pub fn shards(mut self, count: usize) -> Builder {
        self.shards = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            count => count,
        };
        self
    }

    /// The shards it will serve with.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn shard_count(&self) -> usize {
        self.shards
    }

    /// Gives each shard a storage writer of its own, each with its own group commits, instead
    /// of one writer whose commits fold every shard's writes (the default). For measuring.
    pub fn writer_per_shard(mut self, own: bool) -> Builder {
        self.writer_per_shard = own;
        self
    }

    /// Opens the host in the current thread, without a listener. Must run inside a tokio
    /// `LocalSet`. For embedding, and for testing capabilities in-process.
    pub fn open_host(self) -> Result<Host, StartError> {
        let backend = self.open_backend()?;
        let host = Host::open(self.config, backend)?;
        Registry::install(&host, self.external);
        Ok(host)
    }

    fn open_backend(&self) -> Result<Arc<dyn Backend>, StartError> {
        Ok(self.open_store()?.0)
    }

    /// The backend, and for a node of a cluster the PostgreSQL store it shares.
    #[allow(clippy::type_complexity)]
    fn open_store(&self) -> Result<(Arc<dyn Backend>, Option<Arc<PostgresBackend>>), StartError> {
        let mut shared = None;
        let backend: Arc<dyn Backend> = match &self.storage {
            StorageChoice::Lmdb { .. } | StorageChoice::Given(_) if self.cluster.is_some() => {
                return Err(StartError::Io(std::io::Error::other(
                    "a node of a cluster (--node) keeps its data in PostgreSQL: give --store",
                )));
            }
            StorageChoice::Lmdb { data_dir, options } => {
                Arc::new(LmdbBackend::open(data_dir, options)?)
            }
            StorageChoice::Postgres { url, options } => {
                let options = crate::storage::PostgresOptions {
                    cluster: self.cluster.is_some(),
                    ..options.clone()
                };
                let store = Arc::new(PostgresBackend::open(url, &options)?);
                if self.cluster.is_some() {
                    shared = Some(store.clone());
                }
                store
            }
            StorageChoice::Given(backend) => backend.clone(),
        };
        let backend = match &self.wrap_backend {
            Some(wrap) => wrap(backend),
            None => backend,
        };
        Ok((backend, shared))
    }

    fn load_tls(&self) -> Result<Option<ServerTls>, StartError> {
        Ok(match &self.tls {
            None => None,
            Some(TlsChoice::Pem { cert, key }) => Some(ServerTls::from_pem_files(cert, key)?),
            Some(TlsChoice::Given(tls)) => Some(tls.clone()),
        })
    }

    /// Starts the server on a thread of its own, and returns once it listens.
    pub fn start(self) -> Result<ServerHandle, StartError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("duro-host".into())
            .spawn(move || {
                let ready = ready_tx.clone();
                let stop = || async {
                    let _ = stop_rx.await;
                };
                let result = self.serve(move |addr| drop(ready.send(Ok(addr))), stop);
                if let Err(error) = &result {
                    let _ = ready_tx.send(Err(error.to_string()));
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(ready)) => Ok(ServerHandle {
                addr: ready.addr,
                http: ready.http,
                admin: ready.admin,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(message)) => {
                let _ = thread.join();
                Err(StartError::Io(std::io::Error::other(message)))
            }
            Err(_) => Err(StartError::Io(std::io::Error::other(
                "the host thread died",
            ))),
        }
    }

    /// Serves on the current thread until Ctrl-C or SIGTERM, then shuts down gracefully. Once
    /// listening, prints `duro listening on ADDR` on stdout (with the port given for port 0),
    /// then `duro http gateway on ADDR` when the gateway is on, and `duro admin on ADDR` when
    /// the admin server is.
    pub fn run(self) -> Result<(), StartError> {
        // Said once, on stdout, where scripts read it; the log stays for what goes wrong.
        let on_ready = |ready: Ready| {
            use std::io::Write;
            let mut stdout = std::io::stdout();
            let _ = writeln!(stdout, "duro listening on {}", ready.addr);
            if let Some(http) = ready.http {
                let _ = writeln!(stdout, "duro http gateway on {http}");
            }
            if let Some(admin) = ready.admin {
                let _ = writeln!(stdout, "duro admin on {admin}");
            }
            let _ = stdout.flush();
        };
        self.serve(on_ready, shutdown_signal)
    }

    /// Serves until the future `stop` makes resolves. `stop` is made inside the runtime and
    /// before the server says it is ready, so that a stop asked for right after is not missed.
    /// Shard 0 runs on this thread and accepts every connection; the others on threads of
    /// their own.
    fn serve<F: Future<Output = ()>>(
        self,
        on_ready: impl FnOnce(Ready),
        stop: impl FnOnce() -> F,
    ) -> Result<(), StartError> {
        let tls = self.load_tls()?;
        let (backend, cluster_store) = self.open_store()?;
        // Made here, one after the other, before any shard reads them.
        for name in self.config.bindings.keys() {
            backend.namespace(name)?;
        }
        let shards = self.shards.max(1);
        // Fixed when the data dir was made: the same objects map to the same shards.
        let virtual_shards = backend.shard_map()?.count();
        // One writer for every shard, unless each starts its own.
        let writer = match self.writer_per_shard {
            true => None,
            false => Some(Writer::spawn_measured(
                backend.clone(),
                self.metrics().storage().clone(),
            )?),
        };
        let ownership = self
            .cluster
            .as_ref()
            .map(|options| Ownership::new(&options.node, virtual_shards));
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let queues: Queues = Arc::new(senders);
        let plan = |shard: usize| ShardPlan {
            config: Config {
                placement: Placement {
                    shard,
                    shards,
                    virtual_shards,
                },
                writer: writer.as_ref().map(Writer::handle),
                // Active objects are shared out; the budget of bytes in flight is each
                // shard's, as each reads its own connections (so a server with N shards may
                // hold N budgets).
                limits: HostLimits {
                    activations_max: (self.config.limits.activations_max / shards).max(1),
                    ..self.config.limits.clone()
                },
                cluster: ownership.clone(),
                ..self.config.clone()
            },
            token: self.rpc.token.clone(),
            node_tls: self.cluster.as_ref().and_then(|c| c.tls.clone()),
            backend: backend.clone(),
            external: self.external.clone(),
            gateway: self
                .http
                .map(|_| (self.gateway.clone(), self.rpc.token.clone())),
            queues: queues.clone(),
        };
        let (opened_tx, opened) = std::sync::mpsc::channel::<Result<(), String>>();
        // Shards leave together: a connection's socket is registered with the event loop
        // that accepted it, and another shard may still be writing to it (a WebSocket's close).
        let leaving = Arc::new(tokio::sync::Barrier::new(shards));
        let mut others = Vec::new();
        let mut receivers = receivers.into_iter();
        let jobs = receivers.next().expect("the first shard's jobs");
        for (index, jobs) in receivers.enumerate().map(|(i, jobs)| (i + 1, jobs)) {
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let shard = plan(index);
            let opened_tx = opened_tx.clone();
            let leaving = leaving.clone();
            let thread = std::thread::Builder::new()
                .name(format!("duro-shard-{index}"))
                .spawn(move || run_shard(shard, jobs, opened_tx, stop_rx, leaving))?;
            others.push((stop_tx, thread));
        }
        drop(opened_tx);
        let first = plan(0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        let served = local.block_on(&runtime, async move {
            let stop = stop();
            let host = first.open()?;
            tokio::task::spawn_local(run_jobs(host.clone(), jobs));
            for _ in 1..shards {
                match opened.recv() {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Err(StartError::Io(std::io::Error::other(error))),
                    Err(_) => return Err(StartError::Io(std::io::Error::other("a shard died"))),
                }
            }
            warn_if_clear_text(&self.listen, self.http, tls.is_some());
            let listener = Listener::bind(&self.listen).await?;
            warn_if_open(&self.listen, self.http, self.rpc.token.is_some());
            let keeper = match (&self.cluster, cluster_store, &ownership) {
                (Some(options), Some(store), Some(ownership)) => {
                    let options = ClusterOptions {
                        advertise: advertise(options, &listener.local_addr()?)?,
                        ..options.clone()
                    };
                    let (first_tx, first) = oneshot::channel();
                    let keeper =
                        Keeper::start(options, store, ownership.clone(), queues.clone(), first_tx)?;
                    match first.await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => return Err(StartError::Io(std::io::Error::other(error))),
                        Err(_) => {
                            let error = "the cluster's lease keeper died";
                            return Err(StartError::Io(std::io::Error::other(error)));
                        }
                    }
                    Some(keeper)
                }
                _ => None,
            };
            let dispatch = Dispatch::new(queues);
            let mut http_addr = None;
            let mut http = None;
            if let Some(addr) = self.http {
                let listener = TcpListener::bind(addr).await?;
                http_addr = Some(listener.local_addr()?);
                http = Some(listener);
            }
            warn_if_admin_open(self.admin, self.rpc.token.is_some());
            let (admin, admin_addr) = match self.admin {
                Some(addr) => {
                    let (listener, addr) = bind_admin(addr).await?;
                    (Some(listener), Some(addr))
                }
                None => (None, None),
            };
            on_ready(Ready {
                addr: listener.local_addr()?,
                http: http_addr,
                admin: admin_addr,
            });
            let admin = async {
                match admin {
                    Some(listener) => admin::serve(listener, self.admin_context(&backend)).await,
                    None => std::future::pending().await,
                }
            };
            let gateway = async {
                match &http {
                    Some(listener) => gateway_loop(&host, listener, tls.as_ref(), &dispatch).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = accept_loop(&host, &self.rpc, &listener, tls.as_ref(), &dispatch) => {}
                _ = gateway => {}
                _ = admin => {}
                _ = stop => {}
            }
            tracing::info!("shutting down");
            // A node hands its shards off while it still serves its connections: calls in
            // progress finish, then the other nodes take the shards.
            if let Some(keeper) = keeper {
                keeper.drain().await;
            }
            drop((listener, http));
            let stopped: Vec<_> = others
                .into_iter()
                .map(|(stop, thread)| {
                    let _ = stop.send(());
                    thread
                })
                .collect();
            host.shutdown().await;
            leave_together(&leaving).await;
            Ok(stopped)
        });
        let result = match served {
            Ok(threads) => {
                for thread in threads {
                    let _ = thread.join();
                }
                Ok(())
            }
            // The other shards' stop senders were dropped with the future: they stop too.
            Err(error) => Err(error),
        };
        drop(local);
        drop(runtime);
        if let Some(writer) = writer {
            writer.shutdown();
        }
        result
    }
}

/// Where the other nodes reach this one: `--advertise`, or the address it listens on when that
/// is a TCP address of one interface.
fn advertise(options: &ClusterOptions, listening: &ListenAddr) -> Result<String, StartError> {
    if !options.advertise.is_empty() {
        return Ok(options.advertise.clone());
    }
    match listening {
        ListenAddr::Tcp(addr) if !addr.ip().is_unspecified() => Ok(addr.to_string()),
        _ => Err(StartError::Io(std::io::Error::other(format!(
            "a node of a cluster must be reachable by the others: it listens on {listening}, so give --advertise HOST:PORT"
        )))),
    }
}

/// Binds the admin server's listener; a failure names the admin address.
async fn bind_admin(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bound = TcpListener::bind(addr).await.and_then(|listener| {
        let local = listener.local_addr()?;
        Ok((listener, local))
    });
    bound.map_err(|error| {
        let message = format!("binding the admin address {addr} (--admin): {error}");
        StartError::Io(std::io::Error::new(error.kind(), message))
    })
}

impl Builder {
    /// The server's metrics, which every shard shares.
    fn metrics(&self) -> Arc<Metrics> {
        self.config.metrics.clone().unwrap_or_else(Metrics::new)
    }

    /// What the admin server's handlers may use.
    fn admin_context(&self, backend: &Arc<dyn Backend>) -> AdminContext {
        AdminContext::new(
            backend.clone(),
            self.config.bindings.clone(),
            self.metrics(),
            self.rpc.token.clone(),
        )
    }
}

/// What a shard is made of; built on the serving thread, opened on the shard's own.
struct ShardPlan {
    config: Config,
    backend: Arc<dyn Backend>,
    external: std::collections::BTreeSet<String>,
    /// The gateway's options and token, when it is on.
    gateway: Option<(GatewayOptions, Option<Arc<str>>)>,
    queues: Queues,
    /// The server's token, which the nodes of a cluster present to each other.
    token: Option<Arc<str>>,
    /// TLS on the links to the other nodes of a cluster.
    node_tls: Option<crate::tls::ClientTls>,
}

impl ShardPlan {
    /// Opens the shard's host on the current event loop, with its gateway and its links to
    /// the other shards.
    fn open(self) -> Result<Host, StartError> {
        let clustered = self.config.cluster.is_some();
        let host = Host::open(self.config, self.backend)?;
        Registry::install(&host, self.external);
        if let Some((options, token)) = self.gateway {
            gateway::install(&host, options, token);
        }
        if self.queues.len() > 1 || clustered {
            host.set_peers(Links::open(&host, self.queues, self.token, self.node_tls));
        }
        Ok(host)
    }
}

/// A shard other than the first, on its own thread: opens its host, says so, runs the jobs
/// other shards send it until `stop`, then shuts its host down.
fn run_shard(
    plan: ShardPlan,
    jobs: tokio::sync::mpsc::UnboundedReceiver<crate::host::Job>,
    opened: std::sync::mpsc::Sender<Result<(), String>>,
    stop: oneshot::Receiver<()>,
    leaving: Arc<tokio::sync::Barrier>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return drop(opened.send(Err(error.to_string()))),
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let host = match plan.open() {
            Ok(host) => host,
            Err(error) => return drop(opened.send(Err(error.to_string()))),
        };
        tokio::task::spawn_local(run_jobs(host.clone(), jobs));
        let _ = opened.send(Ok(()));
        let _ = stop.await;
        host.shutdown().await;
        leave_together(&leaving).await;
    });
}

/// Waits, with its event loop running, until every shard has shut its host down; bounded, for
/// a server whose start failed halfway.
async fn leave_together(leaving: &tokio::sync::Barrier) {
    let _ = tokio::time::timeout(SHARDS_LEAVE_WAIT, leaving.wait()).await;
}

/// How long a shard that shut down waits for the others before its event loop stops.
const SHARDS_LEAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Hands accepted connections to the shards in turn.
struct Dispatch {
    queues: Queues,
    next: std::cell::Cell<usize>,
}

impl Dispatch {
    fn new(queues: Queues) -> Dispatch {
        Dispatch {
            queues,
            next: std::cell::Cell::new(0),
        }
    }

    /// The shard of the next connection; `None` for this one (the first).
    fn next(&self) -> Option<usize> {
        let shard = self.next.get() % self.queues.len();
        self.next.set(shard + 1);
        (shard != 0).then_some(shard)
    }

    fn run_on(&self, shard: usize, job: crate::host::Job) {
        let _ = self.queues[shard].send(job);
    }
}

/// Warns when the host is reachable beyond this machine without a token.
fn warn_if_open(listen: &ListenAddr, http: Option<SocketAddr>, has_token: bool) {
    if let ListenAddr::Tcp(addr) = listen
        && !addr.ip().is_loopback()
        && !has_token
    {
        tracing::warn!(%addr, "listening beyond loopback without a token: anyone who can reach it can use every object (see --token-file)");
    }
    if let Some(addr) = http
        && !addr.ip().is_loopback()
        && !has_token
    {
        tracing::warn!(%addr, "the HTTP gateway listens beyond loopback without a token: anyone who can reach it can use every object (see --token-file)");
    }
}

/// Warns when the admin server is reachable beyond this machine: it has no TLS, and without a
/// token anyone who reaches it reads the metrics and the console.
fn warn_if_admin_open(admin: Option<SocketAddr>, has_token: bool) {
    let Some(addr) = admin else { return };
    if addr.ip().is_loopback() {
        return;
    }
    match has_token {
        false => {
            tracing::warn!(%addr, "the admin server listens beyond loopback without a token: anyone who can reach it can read it (see --token-file)")
        }
        true => {
            tracing::warn!(%addr, "the admin server listens beyond loopback without TLS: its token crosses the network in clear text")
        }
    }
}

/// Warns when what crosses the network beyond this machine is not encrypted: a token, a
/// request, a response.
fn warn_if_clear_text(listen: &ListenAddr, http: Option<SocketAddr>, has_tls: bool) {
    if has_tls {
        return;
    }
    if let ListenAddr::Tcp(addr) = listen
        && !addr.ip().is_loopback()
    {
        tracing::warn!(%addr, "listening beyond loopback without TLS: the token and every call cross the network in clear text (see --tls-cert)");
    }
    if let Some(addr) = http
        && !addr.ip().is_loopback()
    {
        tracing::warn!(%addr, "the HTTP gateway listens beyond loopback without TLS (see --tls-cert)");
    }
}

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a SIGTERM sent as soon as the server said it
/// listens then shuts it down gracefully instead of killing it.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut signals = [SignalKind::interrupt(), SignalKind::terminate()].map(|kind| {
        signal(kind)
            .inspect_err(|error| tracing::warn!(%error, "cannot handle a signal"))
            .ok()
    });
    async move {
        let [interrupt, terminate] = &mut signals;
        tokio::select! {
            _ = received(interrupt) => {}
            _ = received(terminate) => {}
        }
    }
}

/// Resolves when `signal` arrives; never, for a signal that could not be handled.
async fn received(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => drop(signal.recv().await),
        None => std::future::pending().await,
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).await?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await;
                let listener = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                // Only the owner may connect: a unix socket has no other authentication.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<ListenAddr> {
        match self {
            Listener::Tcp(listener) => Ok(ListenAddr::Tcp(listener.local_addr()?)),
            Listener::Unix(_, path) => Ok(ListenAddr::Unix(path.clone())),
        }
    }
}

/// Removes a socket file nobody listens on (left by a killed server).
async fn remove_stale_socket(path: &Path) {
    if path.exists() && tokio::net::UnixStream::connect(path).await.is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// A connection accepted, as it crosses to the shard that serves it.
enum Accepted {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

async fn accept_loop(
    host: &Host,
    rpc: &RpcOptions,
    listener: &Listener,
    tls: Option<&ServerTls>,
    dispatch: &Dispatch,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = match listener {
            Listener::Tcp(listener) => listener.accept().await.map(|(stream, _)| {
                // Request/response RPC would otherwise wait on Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                Connection::Tcp(stream)
            }),
            Listener::Unix(listener, _) => listener
                .accept()
                .await
                .map(|(stream, _)| Connection::Unix(stream)),
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                // Out of FDs and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = take_slot(&slots) else {
            continue;
        };
        let Some(shard) = dispatch.next() else {
            serve_accepted(host, rpc, tls, slot, stream);
            continue;
        };
        let crossing = match stream {
            Connection::Tcp(stream) => stream.into_std().map(Accepted::Tcp),
            Connection::Unix(stream) => stream.into_std().map(Accepted::Unix),
        };
        let Ok(crossing) = crossing else { continue };
        let (rpc, tls) = (rpc.clone(), tls.cloned());
        dispatch.run_on(
            shard,
            Box::new(move |host: &Host| {
                let stream = match crossing {
                    Accepted::Tcp(stream) => {
                        tokio::net::TcpStream::from_std(stream).map(Connection::Tcp)
                    }
                    Accepted::Unix(stream) => {
                        tokio::net::UnixStream::from_std(stream).map(Connection::Unix)
                    }
                };
                match stream {
                    Ok(stream) => serve_accepted(host, &rpc, tls.as_ref(), slot, stream),
                    Err(error) => tracing::warn!(%error, "handing a connection over failed"),
                }
            }),
        );
    }
}

/// A connection accepted, on the shard that serves it.
enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Serves an accepted connection on this shard, holding `slot` while it lives.
fn serve_accepted(
    host: &Host,
    rpc: &RpcOptions,
    tls: Option<&ServerTls>,
    slot: tokio::sync::OwnedSemaphorePermit,
    stream: Connection,
) {
    match stream {
        Connection::Tcp(stream) => match tls {
            Some(tls) => spawn_tls_connection(host, rpc, slot, tls, stream),
            None => {
                let (reader, writer) = stream.into_split();
                spawn_connection(host, rpc, slot, reader, writer);
            }
        },
        Connection::Unix(stream) => {
            let (reader, writer) = stream.into_split();
            spawn_connection(host, rpc, slot, reader, writer);
        }
    }
}

/// Accepts the gateway's connections and hands them to the shards in turn.
async fn gateway_loop(
    host: &Host,
    listener: &TcpListener,
    tls: Option<&ServerTls>,
    dispatch: &Dispatch,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "gateway accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(shard) = dispatch.next() else {
            gateway::accept(host, stream, tls);
            continue;
        };
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let tls = tls.cloned();
        dispatch.run_on(
            shard,
            Box::new(
                move |host: &Host| match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => gateway::accept(host, stream, tls.as_ref()),
                    Err(error) => tracing::warn!(%error, "handing a connection over failed"),
                },
            ),
        );
    }
}

/// Serves one connection in a task of its own, holding one of the [`CONNECTIONS_MAX`] slots:
/// a permit moved into the task, so it is given back however the task ends, by a panic too.
fn spawn_connection<R, W>(
    host: &Host,
    rpc: &RpcOptions,
    slot: tokio::sync::OwnedSemaphorePermit,
    reader: R,
    writer: W,
) where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    let (host, rpc) = (host.clone(), rpc.clone());
    tokio::task::spawn_local(async move {
        let _slot = slot;
        if let Err(error) = crate::rpc::serve_connection(&host, &rpc, reader, writer).await {
            tracing::debug!(%error, "connection ended");
        }
    });
}

/// [`spawn_connection`] for a TLS listener: the handshake runs inside the connection's task,
/// holding its slot, and is bounded by [`crate::tls::HANDSHAKE_TIMEOUT`]. A failed handshake
/// (a plain-TCP client, a client that does not trust the certificate) ends that connection
/// alone and is logged at debug: it is the client's to report.
fn spawn_tls_connection(
    host: &Host,
    rpc: &RpcOptions,
    slot: tokio::sync::OwnedSemaphorePermit,
    tls: &ServerTls,
    stream: tokio::net::TcpStream,
) {
    let (host, rpc, tls) = (host.clone(), rpc.clone(), tls.clone());
    tokio::task::spawn_local(async move {
        let _slot = slot;
        let stream = match tls.accept(stream).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "TLS handshake failed");
                return;
            }
        };
        let (reader, writer) = tokio::io::split(stream);
        if let Err(error) = crate::rpc::serve_connection(&host, &rpc, reader, writer).await {
            tracing::debug!(%error, "connection ended");
        }
    });
}

/// One of the [`CONNECTIONS_MAX`] slots, or `None` (said in the log) when all are taken.
fn take_slot(slots: &Arc<Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let slot = slots.clone().try_acquire_owned().ok();
    if slot.is_none() {
        tracing::warn!(
            limit = CONNECTIONS_MAX,
            "connection refused: too many connections"
        );
    }
    slot
}

/// A server running on its own thread. Dropping it shuts the server down.
pub struct ServerHandle {
    addr: ListenAddr,
    http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on (with the port it was given for port 0).
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The address of the HTTP gateway, when it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// The address of the admin server, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// Shuts the server down gracefully and waits until it has.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that panics when read: a connection task that dies.
    struct Panics;

    impl tokio::io::AsyncRead for Panics {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            panic!("the connection task panics");
        }
    }

    #[test]
    fn a_connection_that_panics_gives_its_slot_back() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async {
            let host = Server::builder().data_dir(dir.path()).open_host().unwrap();
            let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
            for _ in 0..3 {
                let (_, writer) = tokio::io::duplex(64);
                let slot = take_slot(&slots).unwrap();
                spawn_connection(&host, &RpcOptions::default(), slot, Panics, writer);
            }
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert_eq!(slots.available_permits(), CONNECTIONS_MAX);
            host.shutdown().await;
        });
    }
}
