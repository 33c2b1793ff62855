//! Relays: capabilities that pass every call on to a capability of another connection, for
//! the objects of another shard (the stub a connection holds to them) and for the providers
//! of external classes as the other shards reach them.
//!
//! capnp-rpc would forward such calls by itself, but the answer it relays is published only
//! when the far call returns, so a call pipelined on it waits for that return. That breaks
//! `DurableObject.request`, which returns only once the response was handed over, while the
//! caller's writes of the request body, pipelined on its result, must flow before: a relay
//! publishes that result at once. It also gives a provider's `newInstance` its instance at once
//! (itself relayed, for the same reason). Every other call is passed on as it is, in the order
//! it arrived.
//!
//! With a connection, each call is first admitted against the connection's bounds, as a
//! [`StubServer`](super::stub)'s calls are, and what it answers is owed to the connection until
//! written; the writes of a request body relayed this way are admitted one by one, and a write
//! refused breaks the body off (it is never passed on with a hole in it).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;

use capnp::any_pointer;
use capnp::capability::{Params, Promise, Results};
use capnp::traits::HasTypeId;

use super::connection::{Connection, InFlight};
use super::measured::{Measured, message_bytes};
use crate::wire::duro_capnp::{class_provider, durable_object, external_object};

/// The ordinal of `DurableObject.request`.
const REQUEST_METHOD: u16 = 1;

/// A relay of `target`'s calls, admitted against `connection` when given.
pub(super) fn relay(
    target: capnp::capability::Client,
    connection: Option<Rc<Connection>>,
) -> capnp::capability::Client {
    capnp_rpc::new_client(Relay {
        target: RefCell::new(Some(target)),
        connection,
        stream: false,
    })
}

/// A relay of a provider (see the module docs): its instances are relayed too.
pub(super) fn relay_provider(target: class_provider::Client) -> class_provider::Client {
    capnp_rpc::new_client(ProviderRelay { target })
}

struct Relay {
    /// `None` once a refused write broke the stream off.
    target: RefCell<Option<capnp::capability::Client>>,
    connection: Option<Rc<Connection>>,
    /// A request body's stream: a refused write breaks it off.
    stream: bool,
}

serve_any_interface!(Relay, RelayDispatch);

impl Relay {
    fn call(
        &self,
        interface_id: u64,
        method_id: u16,
        params: Params<any_pointer::Owned>,
        results: Results<any_pointer::Owned>,
    ) -> Promise<(), capnp::Error> {
        let Some(target) = self.target.borrow().clone() else {
            return Promise::err(capnp::Error::overloaded(
                "the stream broke off: a write was refused past the connection's bounds".into(),
            ));
        };
        let in_flight = match &self.connection {
            Some(connection) => {
                let admitted = message_bytes(params.get())
                    .and_then(|bytes| InFlight::admit(connection, bytes));
                match admitted {
                    Ok(in_flight) => Some(in_flight),
                    Err(error) => {
                        if self.stream {
                            // Released without `end`: the object's read of the body fails.
                            self.target.borrow_mut().take();
                        }
                        return Promise::err(error);
                    }
                }
            }
            None => None,
        };
        if interface_id == durable_object::Client::TYPE_ID && method_id == REQUEST_METHOD {
            return match forward_request(&target, self.connection.clone(), params, results) {
                Ok(answer) => Promise::from_future(async move {
                    let answer = answer.await.map(drop).map_err(crossed);
                    drop(in_flight);
                    answer
                }),
                Err(error) => Promise::err(error),
            };
        }
        let bytes = Rc::new(Cell::new(0));
        let results = Box::new(Measured {
            inner: Some(results.hook),
            bytes: bytes.clone(),
            pipeline: true,
        });
        let answer = target
            .hook
            .call(interface_id, method_id, params.hook, results);
        let account = self.connection.as_ref().map(|c| c.account.clone());
        Promise::from_future(async move {
            let answer = answer.await.map_err(crossed);
            drop(in_flight);
            // Owed until the writer has sent it: a peer that does not read its answers stops
            // being read.
            if let Some(account) = account {
                account.owe(bytes.get());
            }
            answer
        })
    }
}

/// Passes a `request` call on to `target`, publishing its request body's stream in `results`
/// now (relayed within `connection`'s bounds when given); resolves when the far call returns.
fn forward_request(
    target: &capnp::capability::Client,
    connection: Option<Rc<Connection>>,
    params: Params<any_pointer::Owned>,
    mut results: Results<any_pointer::Owned>,
) -> capnp::Result<
    impl Future<
        Output = capnp::Result<capnp::capability::Response<durable_object::request_results::Owned>>,
    > + use<>,
> {
    let target = durable_object::Client {
        client: target.clone(),
    };
    let mut call = target.request_request();
    call.hook.get().set_as(params.get()?)?;
    let sent = call.send();
    let body = sent.pipeline.get_request_body().client;
    let body = match connection {
        Some(connection) => capnp_rpc::new_client(Relay {
            target: RefCell::new(Some(body)),
            connection: Some(connection),
            stream: true,
        }),
        None => body,
    };
    results
        .get()
        .init_as::<durable_object::request_results::Builder<'_>>()
        .set_request_body(crate::wire::duro_capnp::byte_stream::Client { client: body });
    results.set_pipeline()?;
    Ok(sent.promise)
}

/// An exception as it came back over the links it crossed, made what it was where it was
/// raised: capnp-rpc marks an exception for each connection it crossed, and the caller's own
/// connection will mark it once more.
fn crossed(mut error: capnp::Error) -> capnp::Error {
    error.extra = crate::error::uncrossed(&error.extra).to_owned();
    error
}

/// A provider as another shard reaches it (see the module docs).
struct ProviderRelay {
    target: class_provider::Client,
}

impl class_provider::Server for ProviderRelay {
    fn new_instance(
        self: Rc<Self>,
        params: class_provider::NewInstanceParams,
        mut results: class_provider::NewInstanceResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let sent = (|| -> capnp::Result<_> {
            let mut request = self.target.new_instance_request();
            request.get().set_context(params.get()?.get_context()?);
            let sent = request.send();
            let instance = relay(sent.pipeline.get_instance().client, None);
            results
                .get()
                .set_instance(external_object::Client { client: instance });
            results.set_pipeline()?;
            Ok(sent.promise)
        })();
        async move {
            sent?.await.map_err(crossed)?;
            Ok(())
        }
    }
}
