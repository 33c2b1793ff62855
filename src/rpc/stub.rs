//! A stub's server, which capnp-rpc dispatches to by interface ID. `DurableObject`'s methods
//! are the host's: `fetch` here, `request` in `stream`. A call of any other interface is a
//! typed call of the object's own interface
//! ([`DurableObject::interface`](crate::DurableObject::interface)), which the host delivers as
//! it delivers `fetch`: admitted against the connection's bounds and enqueued on the stub at
//! dispatch (so E-order holds across `fetch` and typed calls), then through the object's input
//! gate, its answer held at the output gate. The object's capability gets the caller's own
//! parameters and results (`ClientHook::call`): nothing is copied, and the capabilities in
//! either pass as they are.
//!
//! Also here: [`stub_capability`], a host [`Stub`] as a `DurableObject` capability, which an
//! object can pass in a call or return from one.

use std::future::Future;
use std::ops::Deref;
use std::rc::Rc;

use std::cell::{Cell, RefCell};

use capnp::any_pointer;
use capnp::capability::{DispatchCallResult, FromServer, Params, Promise, Results};
use capnp::traits::HasTypeId;
use futures::future::Either;
use futures::{FutureExt, TryFutureExt};

use super::connection::{Connection, InFlight, RESPONSE_BYTES_MAX};
use super::measured::{Measured, message_bytes};
use super::relay;
use super::stream;
use crate::error::Error;
use crate::host::{InterfaceCall, Stub};
use crate::message::Response;
use crate::trace::RequestId;
use crate::wire::convert;
use crate::wire::duro_capnp::{durable_object, http_request};
use tracing::Instrument;

/// A host [`Stub`] as a capability: the `DurableObject` interface (`fetch`, `request`) and the
/// interface the object's class exports, which a caller reaches by casting the capability to
/// it. An object can pass it in a call or return it from one, to another object or to a
/// client: whoever holds it reaches the same single instance, with the stub's semantics
/// (E-order, the gates, `disconnected` once the object was reset).
///
/// It belongs to no connection: the calls made on it are bounded by the object's queue
/// (`object_queue_max`) and by [`CONNECTION_CALLS_MAX`](super::CONNECTION_CALLS_MAX) in
/// flight through this capability, and their bytes are not counted in the host's budget of
/// bytes in flight (they are the caller's memory already when it is an object of the host).
pub fn stub_capability(stub: Stub) -> durable_object::Client {
    stub_client(stub, Connection::detached())
}

/// The capability of `stub`, served within `connection`'s bounds.
pub(super) fn stub_client(stub: Stub, connection: Rc<Connection>) -> durable_object::Client {
    if stub.remote().is_some() {
        let client = capnp_rpc::new_client(RemoteStubServer {
            stub,
            connection,
            link: Default::default(),
        });
        return durable_object::Client { client };
    }
    let client: capnp::capability::Client = capnp_rpc::new_client(StubServer { stub, connection });
    durable_object::Client { client }
}

/// A stub's server: `DurableObject`'s methods; [`StubDispatch`] sends it those calls, and
/// the object the calls of its own interface.
pub(super) struct StubServer {
    stub: Stub,
    connection: Rc<Connection>,
}

impl durable_object::Server for StubServer {
    fn fetch(
        self: Rc<Self>,
        params: durable_object::FetchParams,
        mut results: durable_object::FetchResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let request = params.get().and_then(|params| params.get_request());
        fetch(&self.stub, &self.connection, request, move |response| {
            convert::response_to_capnp(response, results.get().init_response())
        })
    }

    fn request(
        self: Rc<Self>,
        params: durable_object::RequestParams,
        results: durable_object::RequestResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let traced = Traced::start(&self.stub);
        let call = traced
            .span
            .in_scope(|| stream::request(&self.stub, &self.connection, params, results));
        traced.run(call)
    }
}

/// `DurableObject.fetch` of a local `stub` within `connection`'s bounds: `Namespace.fetchByName`
/// calls it too. The request is read, admitted and enqueued on the stub now, in the order
/// calls arrive (this is where E-order is kept); `write` writes the response into the call's
/// results once it passed the output gate.
pub(super) fn fetch<W>(
    stub: &Stub,
    connection: &Rc<Connection>,
    request: capnp::Result<http_request::Reader<'_>>,
    write: W,
) -> impl Future<Output = capnp::Result<()>> + 'static + use<W>
where
    W: FnOnce(&Response) + 'static,
{
    let traced = Traced::start(stub);
    let call = traced.span.in_scope(|| -> capnp::Result<_> {
        let request = convert::request_from_capnp(request?)?;
        let in_flight = InFlight::admit(connection, convert::request_bytes(&request))?;
        Ok((in_flight, stub.fetch(request)))
    });
    let account = connection.account.clone();
    // A combinator, not an async block: see `Traced::run`.
    let call = match call {
        Ok((in_flight, call)) => Either::Left(call.map(move |response| {
            let _in_flight = in_flight;
            let response = response?;
            let len = convert::response_bytes(&response);
            if len > RESPONSE_BYTES_MAX {
                return Err(capnp::Error::failed(format!(
                    "remote: the response takes about {len} bytes, over the limit of \
                     {RESPONSE_BYTES_MAX} bytes (RESPONSE_BYTES_MAX)"
                )));
            }
            // Owed until the writer has sent it: a peer that does not read stops being read.
            account.owe(convert::response_payload_bytes(&response));
            write(&response);
            Ok(())
        })),
        Err(error) => Either::Right(std::future::ready(Err(error))),
    };
    traced.run(call)
}

/// Lets capnp-rpc serve a [`StubServer`] through [`StubDispatch`].
impl FromServer<StubServer> for capnp::capability::Client {
    type Dispatch = StubDispatch;

    fn from_server(server: Rc<StubServer>) -> StubDispatch {
        StubDispatch { server }
    }
}

/// Dispatches the calls on a stub by interface ID (see the module docs).
#[derive(Clone)]
pub(super) struct StubDispatch {
    server: Rc<StubServer>,
}

impl Deref for StubDispatch {
    type Target = StubServer;

    fn deref(&self) -> &StubServer {
        &self.server
    }
}

impl capnp::capability::Server for StubDispatch {
    fn dispatch_call(
        self,
        interface_id: u64,
        method_id: u16,
        params: capnp::capability::Params<any_pointer::Owned>,
        results: Results<any_pointer::Owned>,
    ) -> DispatchCallResult {
        if interface_id == durable_object::Client::TYPE_ID {
            return durable_object::ServerDispatch::<StubServer>::dispatch_call_internal(
                self.server,
                method_id,
                params,
                results,
            );
        }
        // Not streaming, whatever the method: the object's own capability keeps `-> stream`
        // calls in order behind one another, and the stub's queue keeps the order of all.
        let traced = Traced::start(&self.stub);
        let call = traced
            .span
            .in_scope(|| call_typed(&self, interface_id, method_id, params, results));
        DispatchCallResult::new(Promise::from_future(traced.run(call)), false)
    }

    fn as_ptr(&self) -> usize {
        Rc::as_ptr(&self.server) as usize
    }
}

/// A call of a stub in its span: the namespace, the object's ID and the call's request ID,
/// which the errors the host answers it with carry (see [`crate::trace`]).
struct Traced {
    stub: Stub,
    request_id: RequestId,
    span: tracing::Span,
}

impl Traced {
    fn start(stub: &Stub) -> Traced {
        let request_id = RequestId::next();
        // The fields are computed only when the span is recorded.
        let span = tracing::debug_span!(
            "call",
            namespace = stub.namespace_name().unwrap_or_default(),
            id = %stub.id(),
            %request_id,
        );
        Traced {
            stub: stub.clone(),
            request_id,
            span,
        }
    }

    /// Runs `call` in the span; its error names the request ID.
    ///
    /// With a combinator, not an async block: an async block that awaits a future it owns
    /// holds it twice (rustc keeps the captured future and the awaited one apart), and a
    /// call's future is moved whole on each layer of capnp-rpc, and boxed by it.
    fn run(
        self,
        call: impl Future<Output = capnp::Result<()>> + 'static,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let Traced {
            stub,
            request_id,
            span,
        } = self;
        call.map_err(move |error| {
            let namespace = stub.namespace_name().unwrap_or_default();
            crate::trace::answer_error(error, request_id, namespace, &stub.id())
        })
        .instrument(span)
    }
}

/// A typed call: admitted and enqueued now, before any await (this is where E-order with
/// `fetch` is kept). The object's method writes `results` itself, through [`Measured`]; they
/// leave when this returns, after the output gate.
fn call_typed(
    server: &StubServer,
    interface_id: u64,
    method_id: u16,
    params: Params<any_pointer::Owned>,
    results: Results<any_pointer::Owned>,
) -> impl Future<Output = capnp::Result<()>> + 'static + use<> {
    let results_bytes = Rc::new(Cell::new(0));
    let results = Results::new(Box::new(Measured {
        inner: Some(results.hook),
        bytes: results_bytes.clone(),
        pipeline: false,
    }));
    let call = InterfaceCall {
        interface_id,
        method_id,
        params,
        results,
    };
    let started = message_bytes(call.params.get())
        .and_then(|bytes| InFlight::admit(&server.connection, bytes))
        .map(|in_flight| (in_flight, server.stub.call_interface(call)));
    let account = server.connection.account.clone();
    async move {
        let (_in_flight, answer) = started?;
        answer.await?.map_err(object_error)?;
        let len = results_bytes.get();
        if len > RESPONSE_BYTES_MAX {
            return Err(Error::Remote(format!(
                "the results take about {len} bytes, over the limit of {RESPONSE_BYTES_MAX} \
                 bytes (RESPONSE_BYTES_MAX)"
            ))
            .into());
        }
        // Owed until the writer has sent it: a peer that does not read stops being read.
        account.owe(len);
        Ok(())
    }
}

/// What the caller sees of an error the object's method returned. It is the object's own
/// error, so `failed` with the `remote: ` prefix, whatever its kind: `disconnected` and
/// `overloaded` tell a caller what to do with its stub, which is the host's to say. But an
/// `unimplemented` (a method or an interface the object does not have) stays one, so that a
/// capnp client can tell it from a failure.
fn object_error(error: capnp::Error) -> capnp::Error {
    match error.kind {
        capnp::ErrorKind::Unimplemented => error,
        _ => Error::Remote(error.extra).into(),
    }
}

/// The ordinal of `DurableObject.fetch`.
const FETCH_METHOD: u16 = 0;

/// The server of a stub to an object of another shard or node (see
/// [`RemoteObject`](crate::host::RemoteObject)): a whole `fetch` goes through the stub, which
/// hands it off to the object's shard; every other call is relayed through the stub's link,
/// in its turn, within the connection's bounds.
struct RemoteStubServer {
    stub: Stub,
    connection: Rc<Connection>,
    /// The relay of the stub's link, made at the first call that takes it.
    link: Rc<RefCell<Option<capnp::capability::Client>>>,
}

serve_any_interface!(RemoteStubServer, RemoteStubDispatch);

impl RemoteStubServer {
    fn call(
        &self,
        interface_id: u64,
        method_id: u16,
        params: Params<any_pointer::Owned>,
        mut results: Results<any_pointer::Owned>,
    ) -> Promise<(), capnp::Error> {
        let stub = &self.stub;
        let Some(remote) = stub.remote() else {
            return Promise::err(capnp::Error::failed(
                "a remote stub's server has a remote stub".into(),
            ));
        };
        if interface_id == durable_object::Client::TYPE_ID
            && method_id == FETCH_METHOD
            && remote.hands_off()
        {
            let request = params
                .get()
                .and_then(|p| p.get_as::<durable_object::fetch_params::Reader<'_>>())
                .and_then(|p| p.get_request());
            let call = fetch(stub, &self.connection, request, move |response| {
                let results = results
                    .get()
                    .init_as::<durable_object::fetch_results::Builder<'_>>();
                convert::response_to_capnp(response, results.init_response());
            });
            return Promise::from_future(call);
        }
        if let Some(error) = remote.broken_error() {
            return Promise::err(error.into());
        }
        let turn = remote.link_turn();
        let (link, connection) = (self.link.clone(), self.connection.clone());
        // Issued in its turn: now, when it is now, so that its place is taken at dispatch (a
        // `request`'s body is published when it is issued: capnp-rpc holds the writes
        // pipelined on it until then).
        let answer = turn.issue(move |target| {
            let link = link
                .borrow_mut()
                .get_or_insert_with(|| relay::relay(target.client.clone(), Some(connection)))
                .clone();
            link.hook
                .call(interface_id, method_id, params.hook, results.hook)
        });
        let remote = remote.clone();
        Promise::from_future(async move {
            let answer = answer.await.await;
            if let Err(error) = &answer
                && error.kind == capnp::ErrorKind::Disconnected
            {
                remote.note(&Error::Disconnected(error.extra.clone()));
            }
            answer
        })
    }
}
