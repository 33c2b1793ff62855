//! The Cap'n Proto face of the host: servers for `Host`, `Namespace` and `DurableObject`
//! (stubs), and the serving of one connection. This layer only translates; the semantics live
//! in the host ([`crate::Host`]). `connection` keeps the bounds of one connection, which every
//! server of it shares; `stub` serves a stub: `fetch`, and the calls of the object's own
//! interface, dispatched by interface ID; `stream` serves `DurableObject.request`: streamed
//! bodies and WebSockets; `external` hosts the classes that provider processes implement
//! (`Host.registerProvider`).

use std::future::{Future, ready};
use std::sync::Arc;

use capnp::capability::Rc;
use capnp_rpc::rpc_twoparty_capnp::Side;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::Error;
use crate::host::{Host, Namespace, ObjectsPage, Stub};
use crate::id::{self, ObjectId};
use crate::storage::ObjectRecord;
use crate::wire::duro_capnp::{durable_object, host, namespace, object_id, registration};
use crate::wire::frame::{Busy, CountedWriter, FrameLimits, FramedReader};
use crate::wire::{Buffers, convert, rpc_system_corked};
use futures::future::Either;
use tokio_util::task::AbortOnDropHandle;

/// Lets capnp-rpc serve `$server` for any interface ID, through a dispatch type `$dispatch`
/// this defines: its method `call(&self, interface_id, method_id, params, results)`, which
/// returns a `Promise<(), capnp::Error>`, answers every call (none of them streaming).
macro_rules! serve_any_interface {
    ($server:ty, $dispatch:ident) => {
        impl capnp::capability::FromServer<$server> for capnp::capability::Client {
            type Dispatch = $dispatch;

            fn from_server(server: std::rc::Rc<$server>) -> $dispatch {
                $dispatch { server }
            }
        }

        #[derive(Clone)]
        struct $dispatch {
            server: std::rc::Rc<$server>,
        }

        impl std::ops::Deref for $dispatch {
            type Target = $server;

            fn deref(&self) -> &$server {
                &self.server
            }
        }

        impl capnp::capability::Server for $dispatch {
            fn dispatch_call(
                self,
                interface_id: u64,
                method_id: u16,
                params: capnp::capability::Params<capnp::any_pointer::Owned>,
                results: capnp::capability::Results<capnp::any_pointer::Owned>,
            ) -> capnp::capability::DispatchCallResult {
                let call = self.server.call(interface_id, method_id, params, results);
                capnp::capability::DispatchCallResult::new(call, false)
            }

            fn as_ptr(&self) -> usize {
                std::rc::Rc::as_ptr(&self.server) as usize
            }
        }
    };
}

mod admin;
mod connection;
pub(crate) mod external;
mod measured;
mod relay;
mod stream;
mod stub;

use connection::Connection;
pub use connection::{CONNECTION_CALLS_MAX, RESPONSE_BYTES_MAX};
use external::registry::Registry;
pub use external::{PROVIDER_WAIT, PROVIDERS_PER_CLASS_MAX};
pub use stub::stub_capability;

/// What the RPC layer adds to a host: who may use it.
#[derive(Clone, Debug, Default)]
pub struct RpcOptions {
    /// The token clients must present with `Host.authenticate` before anything else, if any.
    /// Compared in constant time; a wrong one is answered after a short delay.
    pub token: Option<Arc<str>>,
    /// The time bounds of a connection's reads: per message, and idle.
    pub frame: FrameLimits,
}

/// The bootstrap capability of one connection to `host`: the `Host` server, or, when
/// `options` set a token, a guard that asks for it first. Each connection gets its own, which
/// carries the connection's bound on calls in flight.
pub fn bootstrap(host: &Host, options: &RpcOptions) -> host::Client {
    bootstrap_of(host, options, Connection::open(host))
}

fn bootstrap_of(
    host: &Host,
    options: &RpcOptions,
    connection: std::rc::Rc<Connection>,
) -> host::Client {
    let real: host::Client = capnp_rpc::new_client(HostServer {
        host: host.clone(),
        connection: connection.clone(),
        node_link: false,
    });
    match &options.token {
        Some(token) => capnp_rpc::new_client(GuardServer {
            token: token.clone(),
            host: real,
            server: HostServer {
                host: host.clone(),
                connection,
                node_link: false,
            },
        }),
        None => real,
    }
}

/// The bootstrap Host of a host with a token: nothing but `authenticate` (and `nodeLink`)
/// works.
struct GuardServer {
    token: std::sync::Arc<str>,
    host: host::Client,
    /// What `host` serves, from which `nodeLink` makes its link (a capability resolved
    /// already, not one pipelined through `host`).
    server: HostServer,
}

impl GuardServer {
    /// Checks `token` against the host's, in constant time; a wrong one is answered after a
    /// short delay.
    fn check(
        &self,
        token: capnp::Result<capnp::text::Reader<'_>>,
    ) -> impl Future<Output = capnp::Result<()>> + 'static + use<> {
        let right =
            token.map(|t| crate::auth::constant_time_eq(t.as_bytes(), self.token.as_bytes()));
        async move {
            if right? {
                return Ok(());
            }
            tokio::time::sleep(crate::auth::WRONG_TOKEN_DELAY).await;
            Err(unauthenticated())
        }
    }
}

fn unauthenticated() -> capnp::Error {
    capnp::Error::failed("unauthenticated: call authenticate with the host's token first".into())
}

impl host::Server for GuardServer {
    fn admin(
        self: Rc<Self>,
        _: host::AdminParams,
        _: host::AdminResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready(Err(unauthenticated()))
    }

    fn namespace(
        self: Rc<Self>,
        _: host::NamespaceParams,
        _: host::NamespaceResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready(Err(unauthenticated()))
    }

    fn list_namespaces(
        self: Rc<Self>,
        _: host::ListNamespacesParams,
        _: host::ListNamespacesResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready(Err(unauthenticated()))
    }

    fn register_provider(
        self: Rc<Self>,
        _: host::RegisterProviderParams,
        _: host::RegisterProviderResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready(Err(unauthenticated()))
    }

    fn node_link(
        self: Rc<Self>,
        params: host::NodeLinkParams,
        mut results: host::NodeLinkResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let checked = self.check(params.get().and_then(|p| p.get_token()));
        async move {
            checked.await?;
            results
                .get()
                .set_host(capnp_rpc::new_client(self.server.as_link()));
            Ok(())
        }
    }

    fn shard_stub(
        self: Rc<Self>,
        _: host::ShardStubParams,
        _: host::ShardStubResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready(Err(unauthenticated()))
    }

    fn authenticate(
        self: Rc<Self>,
        params: host::AuthenticateParams,
        mut results: host::AuthenticateResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let checked = self.check(params.get().and_then(|p| p.get_token()));
        async move {
            checked.await?;
            results.get().set_host(self.host.clone());
            Ok(())
        }
    }
}

/// How long a connection still tries to write what it answered once its peer can ask for
/// nothing more (its stream ended or broke a bound), and once its RPC system ended.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves the protocol on one connection: the returned future runs until the peer leaves (see
/// [`crate::wire::rpc_system`] for the buffering and bounds). It borrows nothing, so it can be
/// spawned; dropping it drops the connection, and with it every call the peer had in flight.
pub fn serve_connection<R, W>(
    host: &Host,
    options: &RpcOptions,
    reader: R,
    writer: W,
) -> impl Future<Output = Result<(), capnp::Error>> + 'static + use<R, W>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let connection = Connection::open(host);
    let account = connection.account.clone();
    let calls = connection.clone();
    let busy: Busy = std::rc::Rc::new(move || calls.in_flight.get() > 0 || calls.sockets.get() > 0);
    let metrics = host.metrics().connections(crate::metrics::Transport::capnp);
    let open = metrics.opened();
    let (reader, writer) = (metrics.count(reader), metrics.count(writer));
    let mut reader = FramedReader::new(reader, account.clone(), options.frame, busy);
    let read_ended = reader.ended();
    let writer = CountedWriter::new(writer, account);
    let bootstrap = bootstrap_of(host, options, connection).client;
    // The framing reader buffers already: a second buffer would only copy the bytes again.
    let buffers = Buffers {
        read_bytes: 0,
        ..Buffers::default()
    };
    let (system, flusher) =
        rpc_system_corked(reader, writer, Side::Server, Some(bootstrap), buffers);
    async move {
        let _open = open;
        // A task of its own, so that its passes of the event loop do not poll the RPC system
        // again; aborted when the connection ends.
        let mut flusher = AbortOnDropHandle::new(tokio::task::spawn_local(flusher));
        // Once the peer can ask for nothing more, the system only writes what it answered
        // (capnp-rpc's shutdown waits for its whole write queue): a peer that does not read it
        // is not waited for.
        let lingered = async move {
            read_ended.await;
            tokio::time::sleep(LINGER).await;
        };
        let result = match futures::future::select(system, std::pin::pin!(lingered)).await {
            Either::Left((result, _)) => result,
            Either::Right(((), _)) => {
                return Err(capnp::Error::disconnected(format!(
                    "the peer left and did not read its answers within {LINGER:?}"
                )));
            }
        };
        // The system is gone: what it wrote last (an abort message) leaves if the peer takes
        // it soon; a peer that does not read is not waited for.
        let _ = tokio::time::timeout(LINGER, &mut flusher).await;
        result
    }
}

/// Serves a link from another shard of the server (an in-process pipe): the host's `Host`
/// capability, without a token and without bounds of its own, as the calls that cross it were
/// admitted on the connections they came from. No time bounds either: a link is idle while
/// no object of this shard is called from the other.
pub(crate) fn serve_peer_link<R, W>(
    host: &Host,
    reader: R,
    writer: W,
) -> impl Future<Output = Result<(), capnp::Error>> + 'static + use<R, W>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let bootstrap = bootstrap_of(host, &RpcOptions::default(), Connection::peer()).client;
    crate::wire::rpc_system(reader, writer, Side::Server, Some(bootstrap))
}

/// The other end of [`serve_peer_link`]: the `Host` of the shard at the far end, and the RPC
/// system to spawn on this shard's event loop.
pub(crate) fn connect_peer_link<R, W>(
    reader: R,
    writer: W,
) -> (host::Client, capnp_rpc::RpcSystem<Side>)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let mut system = crate::wire::rpc_system(reader, writer, Side::Client, None);
    let host = system.bootstrap(Side::Server);
    (host, system)
}

fn text(reader: capnp::text::Reader<'_>) -> capnp::Result<&str> {
    reader
        .to_str()
        .map_err(|_| capnp::Error::failed("text is not valid UTF-8".into()))
}

struct HostServer {
    host: Host,
    connection: std::rc::Rc<Connection>,
    /// Reached through `nodeLink`: its namespaces serve only this node's objects.
    node_link: bool,
}

impl HostServer {
    /// The same host and connection, as `nodeLink` gives them.
    fn as_link(&self) -> HostServer {
        HostServer {
            host: self.host.clone(),
            connection: self.connection.clone(),
            node_link: true,
        }
    }
}

impl host::Server for HostServer {
    fn node_link(
        self: Rc<Self>,
        _: host::NodeLinkParams,
        mut results: host::NodeLinkResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        // The token (if the host has one) was checked by the guard in front.
        results
            .get()
            .set_host(capnp_rpc::new_client(self.as_link()));
        ready(Ok(()))
    }

    fn admin(
        self: Rc<Self>,
        _: host::AdminParams,
        mut results: host::AdminResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let admin = admin::AdminServer {
            host: self.host.clone(),
        };
        results.get().set_admin(capnp_rpc::new_client(admin));
        ready(Ok(()))
    }

    fn authenticate(
        self: Rc<Self>,
        _: host::AuthenticateParams,
        mut results: host::AuthenticateResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        // No token is set: every caller is in.
        results.get().set_host(capnp_rpc::new_client_from_rc(self));
        ready(Ok(()))
    }

    fn namespace(
        self: Rc<Self>,
        params: host::NamespaceParams,
        mut results: host::NamespaceResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let name = text(params.get()?.get_name()?)?;
            let namespace = self
                .host
                .namespace(name)
                .ok_or_else(|| capnp::Error::failed(format!("unknown namespace '{name}'")))?;
            results
                .get()
                .set_namespace(capnp_rpc::new_client(NamespaceServer {
                    namespace,
                    connection: self.connection.clone(),
                    node_link: self.node_link,
                }));
            Ok(())
        })())
    }

    fn shard_stub(
        self: Rc<Self>,
        params: host::ShardStubParams,
        mut results: host::ShardStubResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            if !self.connection.peer {
                return Err(capnp::Error::failed(
                    "shardStub is only for the links between the shards of one server".into(),
                ));
            }
            let stub = self.host.handed_stub(params.get()?.get_key())?;
            results.get().set_stub(stub_client(stub, &self.connection));
            Ok(())
        })())
    }

    fn list_namespaces(
        self: Rc<Self>,
        _: host::ListNamespacesParams,
        mut results: host::ListNamespacesResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let namespaces = self.host.namespaces();
        let mut list = results.get().init_namespaces(namespaces.len() as u32);
        for (i, (name, class)) in namespaces.iter().enumerate() {
            let mut info = list.reborrow().get(i as u32);
            info.set_name(name);
            info.set_class_name(class);
        }
        ready(Ok(()))
    }

    fn register_provider(
        self: Rc<Self>,
        params: host::RegisterProviderParams,
        mut results: host::RegisterProviderResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let params = params.get()?;
            let class = text(params.get_class_name()?)?;
            let registry = Registry::of(&self.host).ok_or_else(|| {
                capnp::Error::failed(format!("the host has no external class '{class}'"))
            })?;
            let provider = params.get_provider()?;
            let uses_request = params.get_uses_request();
            let registration =
                registry.register(class, provider.clone(), uses_request, &self.connection)?;
            // The other shards' objects of the class need the provider too: it registers
            // with each of them, over the links (not again from a link, which is one of them).
            let mut elsewhere = Vec::new();
            if let Some(peers) = self.host.peers().filter(|_| !self.connection.peer) {
                let me = self.host.placement().shard;
                for shard in (0..peers.count()).filter(|&shard| shard != me) {
                    let Some(host) = peers.host(shard) else {
                        continue;
                    };
                    let mut request = host.register_provider_request();
                    request.get().set_class_name(class);
                    request
                        .get()
                        .set_provider(relay::relay_provider(provider.clone()));
                    request.get().set_uses_request(uses_request);
                    elsewhere.push(request.send().pipeline.get_registration());
                }
            }
            let registration = match elsewhere.is_empty() {
                true => registration,
                false => capnp_rpc::new_client(Registrations {
                    _here: registration,
                    _elsewhere: elsewhere,
                }),
            };
            results.get().set_registration(registration);
            Ok(())
        })())
    }
}

/// A provider's registrations with every shard: released together.
struct Registrations {
    _here: registration::Client,
    _elsewhere: Vec<registration::Client>,
}

impl registration::Server for Registrations {}

struct NamespaceServer {
    namespace: Namespace,
    connection: std::rc::Rc<Connection>,
    /// Reached through `Host.nodeLink`: a `get` is served here or refused, never passed on.
    node_link: bool,
}

fn write_id(id: &ObjectId, mut builder: object_id::Builder) {
    builder.set_bytes(id.bytes());
    builder.set_name(id.name().unwrap_or(""));
}

fn stub_client(stub: Stub, connection: &std::rc::Rc<Connection>) -> durable_object::Client {
    stub::stub_client(stub, connection.clone())
}

impl namespace::Server for NamespaceServer {
    fn new_unique_id(
        self: Rc<Self>,
        _: namespace::NewUniqueIdParams,
        mut results: namespace::NewUniqueIdResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        write_id(&self.namespace.new_unique_id(), results.get().init_id());
        ready(Ok(()))
    }

    fn id_from_name(
        self: Rc<Self>,
        params: namespace::IdFromNameParams,
        mut results: namespace::IdFromNameResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let name = text(params.get()?.get_name()?)?;
            write_id(&self.namespace.id_from_name(name)?, results.get().init_id());
            Ok(())
        })())
    }

    fn id_from_string(
        self: Rc<Self>,
        params: namespace::IdFromStringParams,
        mut results: namespace::IdFromStringResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let text = text(params.get()?.get_id()?)?;
            write_id(
                &self.namespace.id_from_string(text)?,
                results.get().init_id(),
            );
            Ok(())
        })())
    }

    fn get(
        self: Rc<Self>,
        params: namespace::GetParams,
        mut results: namespace::GetResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let id = params.get()?.get_id()?;
            let name = text(id.get_name()?)?;
            let name = (!name.is_empty()).then_some(name);
            let id = self.namespace.check_id(id.get_bytes()?, name)?;
            let stub = match self.node_link {
                true => self.namespace.stub_here(id)?,
                false => self.namespace.stub_of(id)?,
            };
            results.get().set_stub(stub_client(stub, &self.connection));
            Ok(())
        })())
    }

    fn get_by_name(
        self: Rc<Self>,
        params: namespace::GetByNameParams,
        mut results: namespace::GetByNameResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let name = text(params.get()?.get_name()?)?;
            let stub = match self.node_link {
                true => self
                    .namespace
                    .stub_here(self.namespace.id_from_name(name)?)?,
                false => self.namespace.get_by_name(name)?,
            };
            results.get().set_stub(stub_client(stub, &self.connection));
            Ok(())
        })())
    }

    fn fetch_by_name(
        self: Rc<Self>,
        params: namespace::FetchByNameParams,
        mut results: namespace::FetchByNameResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let stub = (|| {
            let name = text(params.get()?.get_name()?)?;
            let stub = match self.node_link {
                // Through a node link: served here or refused, never passed on again.
                true => self
                    .namespace
                    .stub_here(self.namespace.id_from_name(name)?)?,
                false => self.namespace.get_by_name(name)?,
            };
            Ok::<_, capnp::Error>(stub)
        })();
        let stub = match stub {
            Ok(stub) => stub,
            Err(error) => return Either::Left(ready(Err(error))),
        };
        let request = params.get().and_then(|params| params.get_request());
        // An object of another shard: its stub hands the call off to it there.
        let call = stub::fetch(&stub, &self.connection, request, move |response| {
            convert::response_to_capnp(response, results.get().init_response())
        });
        Either::Right(call)
    }

    fn list_objects(
        self: Rc<Self>,
        params: namespace::ListObjectsParams,
        mut results: namespace::ListObjectsResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let page = self.page(params.get(), false);
        async move {
            let (records, more) = page?.await?;
            let mut results = results.get();
            results.set_more(more);
            let mut ids = results.init_ids(records.len() as u32);
            for (i, (record, _)) in records.iter().enumerate() {
                write_record_id(record, ids.reborrow().get(i as u32));
            }
            Ok(())
        }
    }

    fn list_object_info(
        self: Rc<Self>,
        params: namespace::ListObjectInfoParams,
        mut results: namespace::ListObjectInfoResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let page = self.page(params.get(), true);
        async move {
            let (records, more) = page?.await?;
            let mut results = results.get();
            results.set_more(more);
            let mut objects = results.init_objects(records.len() as u32);
            for (i, (record, alarm)) in records.iter().enumerate() {
                let mut info = objects.reborrow().get(i as u32);
                write_record_id(record, info.reborrow().init_id());
                info.set_created_ms(record.created_ms);
                info.set_has_alarm(alarm.is_some());
                info.set_alarm_ms(alarm.unwrap_or(0));
            }
            Ok(())
        }
    }
}

/// The parameters `listObjects` and `listObjectInfo` share.
trait PageParams {
    fn start_after(&self) -> capnp::Result<capnp::text::Reader<'_>>;
    fn limit(&self) -> u32;
}

impl PageParams for namespace::list_objects_params::Reader<'_> {
    fn start_after(&self) -> capnp::Result<capnp::text::Reader<'_>> {
        self.get_start_after()
    }
    fn limit(&self) -> u32 {
        self.get_limit()
    }
}

impl PageParams for namespace::list_object_info_params::Reader<'_> {
    fn start_after(&self) -> capnp::Result<capnp::text::Reader<'_>> {
        self.get_start_after()
    }
    fn limit(&self) -> u32 {
        self.get_limit()
    }
}

/// A page of the namespace's objects being read (off the event loop when the engine's reads
/// are remote).
type PageRead = std::pin::Pin<Box<dyn Future<Output = Result<ObjectsPage, Error>>>>;

impl NamespaceServer {
    /// One page of the namespace's objects, as `listObjects` and `listObjectInfo` ask for it,
    /// with each object's alarm when `alarms`.
    fn page<P: PageParams>(
        &self,
        params: capnp::Result<P>,
        alarms: bool,
    ) -> capnp::Result<PageRead> {
        let params = params?;
        let start_after = start_after(text(params.start_after()?)?)?;
        let limit = params.limit() as usize;
        Ok(Box::pin(self.namespace.list_objects_page(
            start_after,
            limit,
            alarms,
        )))
    }
}

/// The `startAfter` of a listing: a hex ID, or empty for the start.
fn start_after(hex: &str) -> Result<Option<[u8; 32]>, Error> {
    match hex {
        "" => Ok(None),
        hex => Ok(Some(id::from_hex(hex)?)),
    }
}

/// The ID of a listed object, with its name when it was reached by name.
fn write_record_id(record: &ObjectRecord, mut id: object_id::Builder<'_>) {
    id.set_bytes(&record.id);
    id.set_name(record.name.as_deref().unwrap_or(""));
}
