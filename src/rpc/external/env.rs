//! The env of an external instance: the host's namespaces, as any client reaches them, but
//! with stubs whose calls let the object's other events in until they return (see
//! [`Turns::pause`]), as an await on another object does for a Rust class.

use std::future::{Future, ready};
use std::ops::Deref;
use std::rc::{Rc, Weak};

use capnp::capability::{FromClientHook, FromServer, Promise};
use capnp::private::capability::ClientHook;

use super::super::{HostServer, NamespaceServer, stub_client, text};
use super::turns::Turns;
use crate::host::Host;
use crate::rpc::connection::Connection;
use crate::wire::duro_capnp::{host, namespace};

/// The env `Host` of an instance whose calls count against `connection` (its provider's) and
/// whose events take the gate through `turns`.
pub(super) fn host(host: &Host, connection: &Rc<Connection>, turns: &Rc<Turns>) -> host::Client {
    capnp_rpc::new_client(EnvHost {
        inner: Rc::new(HostServer {
            host: host.clone(),
            connection: connection.clone(),
            node_link: false,
        }),
        turns: Rc::downgrade(turns),
    })
}

struct EnvHost {
    /// The `Host` any client of the provider's connection gets, which the env answers as.
    inner: Rc<HostServer>,
    turns: Weak<Turns>,
}

impl host::Server for EnvHost {
    fn namespace(
        self: capnp::capability::Rc<Self>,
        params: host::NamespaceParams,
        mut results: host::NamespaceResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let name = text(params.get()?.get_name()?)?;
            let namespace = self
                .inner
                .host
                .namespace(name)
                .ok_or_else(|| capnp::Error::failed(format!("unknown namespace '{name}'")))?;
            let inner = Rc::new(NamespaceServer {
                namespace,
                connection: self.inner.connection.clone(),
                node_link: false,
            });
            let turns = self.turns.clone();
            let env: namespace::Client = capnp_rpc::new_client(EnvNamespace { inner, turns });
            results.get().set_namespace(env);
            Ok(())
        })())
    }

    fn list_namespaces(
        self: capnp::capability::Rc<Self>,
        params: host::ListNamespacesParams,
        results: host::ListNamespacesResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        host::Server::list_namespaces(self.inner.clone(), params, results)
    }

    fn authenticate(
        self: capnp::capability::Rc<Self>,
        _: host::AuthenticateParams,
        mut results: host::AuthenticateResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        // The provider authenticated when it connected: its env is in already.
        results.get().set_host(capnp_rpc::new_client_from_rc(self));
        ready(Ok(()))
    }

    fn register_provider(
        self: capnp::capability::Rc<Self>,
        _: host::RegisterProviderParams,
        _: host::RegisterProviderResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready(Err(capnp::Error::failed(
            "an object's env registers no providers: call registerProvider on the Host the \
             connection bootstrapped"
                .into(),
        )))
    }
}

struct EnvNamespace {
    inner: Rc<NamespaceServer>,
    turns: Weak<Turns>,
}

impl EnvNamespace {
    /// A stub of the env: the host's stub, its calls pausing the caller's event.
    fn stub(&self, stub: crate::host::Stub) -> crate::wire::duro_capnp::durable_object::Client {
        pausing(stub_client(stub, &self.inner.connection), &self.turns)
    }
}

impl namespace::Server for EnvNamespace {
    fn new_unique_id(
        self: capnp::capability::Rc<Self>,
        params: namespace::NewUniqueIdParams,
        results: namespace::NewUniqueIdResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        namespace::Server::new_unique_id(self.inner.clone(), params, results)
    }

    fn id_from_name(
        self: capnp::capability::Rc<Self>,
        params: namespace::IdFromNameParams,
        results: namespace::IdFromNameResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        namespace::Server::id_from_name(self.inner.clone(), params, results)
    }

    fn id_from_string(
        self: capnp::capability::Rc<Self>,
        params: namespace::IdFromStringParams,
        results: namespace::IdFromStringResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        namespace::Server::id_from_string(self.inner.clone(), params, results)
    }

    fn get(
        self: capnp::capability::Rc<Self>,
        params: namespace::GetParams,
        mut results: namespace::GetResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let id = params.get()?.get_id()?;
            let name = text(id.get_name()?)?;
            let name = (!name.is_empty()).then_some(name);
            let namespace = &self.inner.namespace;
            let id = namespace.check_id(id.get_bytes()?, name)?;
            results.get().set_stub(self.stub(namespace.get(&id)?));
            Ok(())
        })())
    }

    fn get_by_name(
        self: capnp::capability::Rc<Self>,
        params: namespace::GetByNameParams,
        mut results: namespace::GetByNameResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let name = text(params.get()?.get_name()?)?;
            let stub = self.inner.namespace.get_by_name(name)?;
            results.get().set_stub(self.stub(stub));
            Ok(())
        })())
    }

    fn list_objects(
        self: capnp::capability::Rc<Self>,
        params: namespace::ListObjectsParams,
        results: namespace::ListObjectsResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        namespace::Server::list_objects(self.inner.clone(), params, results)
    }

    fn list_object_info(
        self: capnp::capability::Rc<Self>,
        params: namespace::ListObjectInfoParams,
        results: namespace::ListObjectInfoResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        namespace::Server::list_object_info(self.inner.clone(), params, results)
    }
}

/// `target`, with each call made on it pausing the event holding `turns`' gate until it
/// returns. Every method of every interface of `target` is forwarded as it is, pipelining
/// included: a typed interface of an object too.
fn pausing<C: FromClientHook>(target: C, turns: &Weak<Turns>) -> C {
    let pausing = Pausing {
        target: target.into_client_hook(),
        turns: turns.clone(),
    };
    let client: Forwarded<C> = capnp_rpc::new_client(pausing);
    client.0
}

struct Pausing {
    target: Box<dyn ClientHook>,
    turns: Weak<Turns>,
}

/// A generated client type `C`, whose server is a [`Pausing`] forwarder.
struct Forwarded<C>(C);

impl<C: FromClientHook> FromClientHook for Forwarded<C> {
    fn new(hook: Box<dyn ClientHook>) -> Self {
        Forwarded(C::new(hook))
    }

    fn into_client_hook(self) -> Box<dyn ClientHook> {
        self.0.into_client_hook()
    }

    fn as_client_hook(&self) -> &dyn ClientHook {
        self.0.as_client_hook()
    }
}

impl<C: FromClientHook> FromServer<Pausing> for Forwarded<C> {
    type Dispatch = PausingDispatch;

    fn from_server(server: Rc<Pausing>) -> PausingDispatch {
        PausingDispatch(server)
    }
}

#[derive(Clone)]
struct PausingDispatch(Rc<Pausing>);

impl Deref for PausingDispatch {
    type Target = Pausing;

    fn deref(&self) -> &Pausing {
        &self.0
    }
}

impl capnp::capability::Server for PausingDispatch {
    fn dispatch_call(
        self,
        interface_id: u64,
        method_id: u16,
        params: capnp::capability::Params<capnp::any_pointer::Owned>,
        results: capnp::capability::Results<capnp::any_pointer::Owned>,
    ) -> capnp::capability::DispatchCallResult {
        let turns = self.0.turns.upgrade();
        let paused = turns.as_ref().and_then(|turns| turns.pause());
        let call = self
            .0
            .target
            .call(interface_id, method_id, params.hook, results.hook);
        let promise = Promise::from_future(async move {
            let result = call.await;
            if let (Some(turns), Some(task)) = (turns, paused) {
                turns.resume(task).await;
            }
            result
        });
        capnp::capability::DispatchCallResult::new(promise, false)
    }

    fn as_ptr(&self) -> usize {
        Rc::as_ptr(&self.0) as usize
    }
}
