//! The test harness: a real server on loopback with a temporary data dir, a real Cap'n Proto
//! client over TCP, a storage backend that fails on demand, and the live [`State`] of an object
//! of an in-process host ([`state`]) to drive its storage directly. duro's own tests use it; use
//! it to test your classes the same way.
//!
//! ```
//! use duro::testing::{TestServer, run_local};
//!
//! let server = TestServer::start(duro::builtin::register(duro::Server::builder()));
//! run_local(async {
//!     let host = server.connect().await;
//!     let response = duro::testing::fetch_by_name(&host, "counter", "a", "POST", "/", b"").await;
//!     assert_eq!(response.unwrap().body().as_ref(), b"1\n");
//! });
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use crate::error::Error;
use crate::host::{Host, State};
use crate::message::{Request, Response};
use crate::server::{Builder, ServerHandle};
use crate::tls::ClientTls;
use crate::wire::duro_capnp::{durable_object, host};
use crate::wire::{ListenAddr, convert};

pub use crate::clock::ManualClock;
pub use crate::storage::FaultyBackend;

/// Runs `future` on a current-thread runtime inside a `LocalSet`, as capnp-rpc needs.
pub fn run_local<F: Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime");
    tokio::task::LocalSet::new().block_on(&runtime, future)
}

/// The shards of the servers tests start, when `DURO_TEST_SHARDS` sets them: the suite runs
/// against a sharded host as well, where order and single-instance bugs hide.
fn test_shards() -> Option<usize> {
    std::env::var("DURO_TEST_SHARDS").ok()?.parse().ok()
}

/// The PostgreSQL store of the test server whose data dir is `dir`, when `DURO_TEST_STORE`
/// names a PostgreSQL server (`postgresql://USER@HOST:PORT/DB`, a user who may create
/// databases): the suite runs on that engine too. Each data dir gets a database of its own,
/// named in the dir, so that a server restarted on the dir finds its data again.
/// `builder` with the data dir `dir`; or, when `DURO_TEST_STORE` is set (see `test_store`),
/// with the PostgreSQL store that belongs to `dir`. For tests that open hosts themselves.
pub fn data_dir(builder: Builder, dir: &Path) -> Builder {
    let builder = builder.data_dir(dir);
    match test_store(dir) {
        Some(url) => builder.store(url),
        None => builder,
    }
}

fn test_store(dir: &Path) -> Option<String> {
    let admin = std::env::var("DURO_TEST_STORE")
        .ok()
        .filter(|url| !url.is_empty())?;
    let marker = dir.join("postgres-database");
    let name = match std::fs::read_to_string(&marker) {
        Ok(name) => name,
        Err(_) => {
            let mut suffix = [0u8; 8];
            getrandom::fill(&mut suffix).expect("the OS random source");
            let name = format!("duro_test_{}", crate::id::to_hex(&suffix));
            create_database(&admin, &name);
            std::fs::write(&marker, &name).expect("writing the test database's name");
            name
        }
    };
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    Some(format!("{base}/{name}"))
}

/// A fresh database on the PostgreSQL server that `DURO_TEST_PG` names
/// (`postgresql://USER@HOST:PORT/DB`, a user who may create databases): its URL. `None` when
/// the variable is not set, unless `DURO_REQUIRE_PG` is (CI sets both), which then panics: a
/// test that needs a real server must not pass by skipping there.
pub fn postgres_database() -> Option<String> {
    let admin = std::env::var("DURO_TEST_PG")
        .ok()
        .filter(|url| !url.is_empty());
    let Some(admin) = admin else {
        assert!(
            std::env::var("DURO_REQUIRE_PG").is_err(),
            "DURO_REQUIRE_PG is set but DURO_TEST_PG is not (see .ci/postgres)"
        );
        eprintln!("skipped: DURO_TEST_PG is not set (see .ci/postgres)");
        return None;
    };
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).expect("the OS random source");
    let name = format!("duro_test_{}", crate::id::to_hex(&suffix));
    create_database(&admin, &name);
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    Some(format!("{base}/{name}"))
}

/// Creates the database `name`, on a thread of its own: the caller may be inside a runtime.
fn create_database(admin: &str, name: &str) {
    let (admin, sql) = (admin.to_owned(), format!("CREATE DATABASE {name}"));
    let creating = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("connecting to DURO_TEST_STORE");
            tokio::spawn(connection);
            client
                .batch_execute(&sql)
                .await
                .expect("creating a test database");
        });
    });
    creating.join().expect("creating a test database");
}

/// A server on 127.0.0.1 with a port of its own and a temporary data dir (removed on drop).
pub struct TestServer {
    handle: Option<ServerHandle>,
    dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts `builder` on `127.0.0.1:0` with a fresh temporary data dir. Panics on failure.
    pub fn start(builder: Builder) -> TestServer {
        let dir = tempfile::tempdir().expect("creating a temporary data dir");
        TestServer::start_in(builder, dir)
    }

    /// Starts `builder` on `127.0.0.1:0` with the data dir `dir`.
    pub fn start_in(builder: Builder, dir: tempfile::TempDir) -> TestServer {
        let listen = ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)));
        let builder = match test_shards() {
            Some(shards) if builder.shard_count() == 1 => builder.shards(shards),
            _ => builder,
        };
        let handle = data_dir(builder, dir.path())
            .listen(listen)
            .start()
            .expect("starting duro");
        TestServer {
            handle: Some(handle),
            dir,
        }
    }

    /// The TCP address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        match self.handle.as_ref().map(ServerHandle::addr) {
            Some(ListenAddr::Tcp(addr)) => *addr,
            _ => unreachable!("a test server listens on TCP"),
        }
    }

    /// The HTTP gateway's address, when the builder turned it on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.handle.as_ref().and_then(ServerHandle::http_addr)
    }

    /// The admin server's address, when the builder turned it on (`Builder::admin`; the
    /// harness leaves it off otherwise).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.handle.as_ref().and_then(ServerHandle::admin_addr)
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connects a client. Must be called inside a `LocalSet` (see [`run_local`]).
    pub async fn connect(&self) -> host::Client {
        connect(self.addr())
            .await
            .expect("connecting to the test server")
    }

    /// Shuts the server down gracefully and gives back its data dir, to start another on it.
    pub fn stop(mut self) -> tempfile::TempDir {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
        self.dir
    }
}

/// The live `State` of the object `name` in `namespace` of an in-process `host`, activating
/// the object if needed: the object's own, with its storage and input gate, so a test's
/// storage calls go through the same cache, gates and output gate as the object's, and see
/// exactly what it sees.
///
/// The `State` belongs to the activation live now. After the object is evicted
/// ([`Host::evict_idle`], or `idle_evict_ms` without a call) or reset, call `state` again:
/// the old one no longer speaks for the object.
///
/// ```
/// use duro::testing::{run_local, state};
///
/// let builder = duro::builtin::register(duro::Server::builder())
///     .backend(std::sync::Arc::new(duro::storage::MemoryBackend::new()));
/// run_local(async {
///     let host = builder.open_host().unwrap();
///     // Seed the counter's storage, then see the object read it.
///     let counter = state(&host, "counter", "a").unwrap();
///     counter.storage().put("value", &41u64).await.unwrap();
///     let stub = host.namespace("counter").unwrap().get_by_name("a").unwrap();
///     let response = stub.call("POST", "/", "").await.unwrap();
///     assert_eq!(response.body().as_ref(), b"42\n");
///     assert_eq!(counter.storage().get::<u64>("value").await.unwrap(), Some(42));
///     host.shutdown().await;
/// });
/// ```
pub fn state(host: &Host, namespace: &str, name: &str) -> Result<State, Error> {
    let namespace = host
        .namespace(namespace)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown namespace '{namespace}'")))?;
    namespace.get_by_name(name)?.state()
}

/// Connects to a duro server over TCP and returns its bootstrap `Host`. Must be called inside
/// a `LocalSet`: the connection is driven by a local task, which ends when the peer leaves.
pub async fn connect(addr: SocketAddr) -> std::io::Result<host::Client> {
    let (host, rpc) = crate::wire::connect(&ListenAddr::Tcp(addr)).await?;
    tokio::task::spawn_local(rpc);
    Ok(host)
}

/// `Host.authenticate` with `token` on `host` (the bootstrap of a server with a token): the
/// working `Host`, or the error a wrong token gets.
pub async fn authenticate(host: &host::Client, token: &str) -> Result<host::Client, Error> {
    let mut call = host.authenticate_request();
    call.get().set_token(token);
    let reply = call.send().promise.await?;
    Ok(reply.get()?.get_host()?)
}

/// [`connect`] over TLS, for a server started with [`Builder::tls_pem`]: `tls` says which CA
/// to trust.
pub async fn connect_tls(addr: SocketAddr, tls: &ClientTls) -> std::io::Result<host::Client> {
    let (host, rpc) = crate::wire::connect_tls(addr, tls).await?;
    tokio::task::spawn_local(rpc);
    Ok(host)
}

/// An HTTP request with `method`, `path` and `body`.
pub fn request(method: &str, path: &str, body: &[u8]) -> Request {
    http::Request::builder()
        .method(method)
        .uri(path)
        .body(bytes::Bytes::copy_from_slice(body))
        .expect("a valid test request")
}

/// `host.namespace(ns).getByName(name).fetch(request)`, pipelined into one round trip.
pub async fn fetch_by_name(
    host: &host::Client,
    namespace: &str,
    name: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Response, Error> {
    let mut ns = host.namespace_request();
    ns.get().set_name(namespace);
    let ns = ns.send().pipeline.get_namespace();
    let mut get = ns.get_by_name_request();
    get.get().set_name(name);
    let stub = get.send().pipeline.get_stub();
    fetch(&stub, request(method, path, body)).await
}

/// Sends `request` on a stub and reads the response.
pub async fn fetch(stub: &durable_object::Client, request: Request) -> Result<Response, Error> {
    let call = fetch_call(stub, &request);
    let reply = call.promise.await?;
    Ok(convert::response_from_capnp(reply.get()?.get_response()?)?)
}

/// Sends `request` on a stub now (taking its place in E-order) and returns the pending call.
pub fn fetch_call(
    stub: &durable_object::Client,
    request: &Request,
) -> capnp::capability::RemotePromise<durable_object::fetch_results::Owned> {
    let mut call = stub.fetch_request();
    convert::request_to_capnp(request, call.get().init_request());
    call.send()
}
