//! [`External`]: the class of a namespace bound to an external class. Its instance stands for
//! the object's instance in a provider: it asks a provider for one at the object's first
//! event, and passes each event on to it, in order and through the gate ([`super::turns`]).
//!
//! Everything the host guarantees for a Rust class follows from this being an ordinary class
//! to the host: the activation registry keeps one `External` per object, so at most one
//! provider instance per object; the mailbox delivers its events in E-order; the activation
//! holds each answer at the output gate until the writes made before it are durable, those
//! the instance made through its context included (see [`super::context`]); a reset drops
//! the `External`, which releases the provider's instance and makes its context useless.
//!
//! Requests: when the instance's provider registered with `usesRequest`, a request reaches the
//! instance's `DurableObject.request` with a host-side `ResponseContext` ([`super::respond`]):
//! its body is written to the instance's `requestBody` as it arrives, and `startResponse`
//! becomes the [`StreamResponse`] handed to the host, whose body the instance streams. The
//! event's turn ends when the head arrives, as a Rust class's handler ends when it returns the
//! head: the body may go on streaming (both ways) while the next events are delivered. Else a
//! request reaches `fetch` with its whole body, read here up to its transport's bound, and the
//! answer is a whole response.
//!
//! WebSockets: a request that offers an upgrade (an [`UpgradeToken`] in its extensions) makes
//! its token known to the context for its event ([`Core::offer`]), so that the instance's
//! `acceptWebSocket` accepts it through [`State::accept_web_socket`]; the instance answers 101
//! at `fetch` or `request`, and the activation hands the socket on as for a Rust class. The
//! socket's events come back here as `web_socket_*`, each in its turn as `fetch` is, and reach
//! the instance's `webSocketMessage`/`Close`/`Error` with an `ObjectSocket`
//! ([`super::sockets`]). The sockets are the host's: an eviction leaves them open, and the
//! next event binds a new instance; a reset (the provider went) closes them with 1011.
//!
//! Typed interfaces: the proxy exports a capability ([`Forwarder`]) that passes every call of
//! an interface other than `DurableObject` on to the instance, by interface ID, each in its
//! turn as `fetch` is; an instance that does not implement the interface answers
//! `unimplemented`, as a Rust class without one does.

use std::cell::RefCell;
use std::rc::Rc;

use capnp::ErrorKind;
use tokio::time::Instant;

use futures::future::LocalBoxFuture;

use super::context::{self, ContextCore, Upgrades};
use super::registry::{PROVIDER_WAIT, Provider, Registry, Served};
use super::respond::{self, Unanswered};
use super::sockets::{self, Alive};
use super::turns::{Place, Turn, Turns, Turnstile};
use crate::body::Body;
use crate::error::{Error, KindKept};
use crate::gate::{self, TaskId};
use crate::host::{
    AlarmInfo, DurableObject, Env, State, UpgradeToken, WebSocket, WebSocketMessage,
};
use crate::message::{BoxError, Request, StreamRequest, StreamResponse};
use crate::wire::duro_capnp::{durable_object, external_object, object_socket};
use crate::wire::{STREAM_WRITE_BYTES, convert};

/// The class of an external class's objects (see the module docs).
pub(crate) struct External {
    core: Rc<Core>,
}

struct Core {
    class: String,
    state: State,
    /// The host's namespaces, for the instance's env; weak, as a Rust class's `Env` is.
    env: Env,
    /// The providers of the host's external classes; `None` only for a host assembled
    /// without one, where every event fails.
    registry: Option<Rc<Registry>>,
    turns: Rc<Turns>,
    turnstile: Rc<Turnstile>,
    /// The instance, once a provider was asked for it.
    bound: RefCell<Option<Bound>>,
    /// The WebSocket upgrades offered by the requests in delivery, shared with the context
    /// (see [`ContextCore::upgrades`]).
    upgrades: Rc<Upgrades>,
}

/// The object's instance in a provider, and what it holds of the object.
struct Bound {
    instance: external_object::Client,
    /// As `fetch` and `request` are called: the `DurableObject` that `ExternalObject` extends.
    stub: durable_object::Client,
    /// Whether requests go to `request` (streamed) rather than `fetch` (its provider's
    /// `usesRequest`).
    uses_request: bool,
    /// What its context serves from: dropped with the binding, which makes it useless, and
    /// the capabilities to sockets it handed out with it.
    context: Rc<ContextCore>,
    /// Known to the provider's registration, which resets the object when the provider goes.
    _served: Rc<Served>,
}

impl External {
    /// The instance of an object of `class` with `state`, before any provider is asked.
    pub(crate) fn new(state: State, env: Env, class: &str) -> External {
        let registry = env.host().and_then(|host| Registry::of(&host));
        let turns = Turns::new(state.gate().clone());
        External {
            core: Rc::new(Core {
                class: class.to_owned(),
                state,
                env,
                registry,
                turns,
                turnstile: Rc::default(),
                bound: RefCell::default(),
                upgrades: Rc::default(),
            }),
        }
    }
}

impl DurableObject for External {
    fn interface(self: Rc<Self>) -> Option<capnp::capability::Client> {
        Some(capnp_rpc::new_client(Forwarder {
            core: self.core.clone(),
        }))
    }

    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        let core = &self.core;
        // Taken at delivery, before any await: this keeps the events' order.
        let place = core.turnstile.take();
        let deadline = Instant::now() + PROVIDER_WAIT;
        let upgrade = request.extensions().get::<UpgradeToken>().copied();
        if core.instance(deadline).await?.uses_request {
            return core.request(place, deadline, request, upgrade).await;
        }
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, body.bytes().await?);
        let (bound, turn) = core.turn(place, deadline).await?;
        let offered = core.offer(&turn, upgrade);
        let mut call = bound.stub.fetch_request();
        convert::request_to_capnp(&request, call.get().init_request());
        let reply = call.send().promise.await.map_err(|e| core.failed(e))?;
        let response = convert::response_from_capnp(reply.get()?.get_response()?)?;
        drop(offered);
        drop(turn);
        Ok(response.map(Body::from))
    }

    async fn alarm(&self, info: AlarmInfo) -> Result<(), BoxError> {
        let core = &self.core;
        let place = core.turnstile.take();
        let deadline = Instant::now() + PROVIDER_WAIT;
        let (bound, turn) = core.turn(place, deadline).await?;
        let mut call = bound.instance.alarm_request();
        call.get().set_retry_count(info.retry_count);
        let reply = call.send().promise.await;
        drop(turn);
        match reply {
            Ok(_) => Ok(()),
            // As a Rust class's default `alarm`: nothing to do.
            Err(error) if error.kind == ErrorKind::Unimplemented => Ok(()),
            Err(error) => Err(core.failed(error)),
        }
    }

    async fn web_socket_message(
        &self,
        socket: WebSocket,
        message: WebSocketMessage,
    ) -> Result<(), BoxError> {
        self.core
            .socket_event(socket, move |instance, socket| {
                let mut call = instance.web_socket_message_request();
                call.get().set_socket(socket);
                let mut builder = call.get().init_message();
                match &message {
                    WebSocketMessage::Text(text) => builder.set_text(text),
                    WebSocketMessage::Binary(data) => builder.set_data(data),
                }
                let sent = call.send().promise;
                Box::pin(async move { sent.await.map(drop) })
            })
            .await
    }

    async fn web_socket_close(
        &self,
        socket: WebSocket,
        code: u16,
        reason: String,
    ) -> Result<(), BoxError> {
        self.core
            .socket_event(socket, move |instance, socket| {
                let mut call = instance.web_socket_close_request();
                call.get().set_socket(socket);
                call.get().set_code(code);
                call.get().set_reason(&reason);
                let sent = call.send().promise;
                Box::pin(async move { sent.await.map(drop) })
            })
            .await
    }

    async fn web_socket_error(&self, socket: WebSocket, error: String) -> Result<(), BoxError> {
        self.core
            .socket_event(socket, move |instance, socket| {
                let mut call = instance.web_socket_error_request();
                call.get().set_socket(socket);
                call.get().set_error(&error);
                let sent = call.send().promise;
                Box::pin(async move { sent.await.map(drop) })
            })
            .await
    }
}

/// Passes the calls of the object's own interface on to the instance (see the module docs).
/// The host delivers each through the activation, so it runs inside the delivered handler:
/// its place among the events is taken there, before any await.
struct Forwarder {
    core: Rc<Core>,
}

serve_any_interface!(Forwarder, ForwarderDispatch);

impl Forwarder {
    fn call(
        &self,
        interface_id: u64,
        method_id: u16,
        params: capnp::capability::Params<capnp::any_pointer::Owned>,
        results: capnp::capability::Results<capnp::any_pointer::Owned>,
    ) -> capnp::capability::Promise<(), capnp::Error> {
        let core = self.core.clone();
        let place = core.turnstile.take();
        let deadline = Instant::now() + PROVIDER_WAIT;
        let call = async move {
            let (bound, turn) = core
                .turn(place, deadline)
                .await
                .map_err(|e| capnp::Error::failed(e.to_string()))?;
            let hook = bound.instance.client.hook;
            let answer = hook
                .call(interface_id, method_id, params.hook, results.hook)
                .await;
            drop(turn);
            match answer {
                Err(error) if error.kind != ErrorKind::Unimplemented => {
                    // A lost instance resets the object, as for `fetch`.
                    let _ = core.failed(error.clone());
                    Err(error)
                }
                answer => answer,
            }
        };
        capnp::capability::Promise::from_future(call)
    }
}

/// The instance's clients, for one event.
struct Instance {
    instance: external_object::Client,
    stub: durable_object::Client,
    uses_request: bool,
    /// The binding's [`Alive`], for the socket capabilities handed out in the event.
    alive: Alive,
}

/// A WebSocket upgrade offered to the instance by the request of one event, known to its
/// context until the event ends (see [`Core::offer`]).
struct Offered {
    upgrades: Rc<Upgrades>,
    task: Option<TaskId>,
}

impl Drop for Offered {
    fn drop(&mut self) {
        if let Some(task) = self.task {
            self.upgrades.borrow_mut().retain(|(t, _)| *t != task);
        }
    }
}

impl Core {
    /// Waits for the event's turn: the instance (bound now if need be), the events before it
    /// (`place`), and the gate, held until the returned [`Turn`] is dropped.
    async fn turn(
        self: &Rc<Self>,
        place: Place,
        deadline: Instant,
    ) -> Result<(Instance, Turn), BoxError> {
        let instance = self.instance(deadline).await?;
        place.reached().await;
        // The task the activation runs the event as: the gate is open for it alone.
        let task = gate::current_task().unwrap_or_else(gate::next_task_id);
        let turn = self.turns.begin(task).await;
        drop(place);
        Ok((instance, turn))
    }

    /// The object's instance, asking a provider for one if it has none, round robin; while
    /// none is registered, waiting for one until `deadline`, then failing `overloaded`.
    async fn instance(self: &Rc<Self>, deadline: Instant) -> Result<Instance, BoxError> {
        let registry = self.registry.clone().ok_or_else(|| {
            KindKept(Error::Disconnected(
                "the host has no registry of providers (it is shutting down)".into(),
            ))
        })?;
        loop {
            if let Some(bound) = &*self.bound.borrow() {
                return Ok(Instance {
                    instance: bound.instance.clone(),
                    stub: bound.stub.clone(),
                    uses_request: bound.uses_request,
                    alive: bound.context.alive.clone(),
                });
            }
            let Some(arrived) = registry.arrivals(&self.class) else {
                let why = format!("class '{}' is not an external class", self.class);
                return Err(KindKept(Error::InvalidArgument(why)).into());
            };
            let notified = arrived.notified();
            let mut notified = std::pin::pin!(notified);
            // A waiter before looking, so that a registration in between is not missed.
            notified.as_mut().enable();
            if let Some(provider) = registry.pick(&self.class) {
                self.bind(&provider)?;
                continue;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                registry.refused();
                return Err(KindKept(Error::Overloaded(format!(
                    "no provider of class '{}' is connected: waited {PROVIDER_WAIT:?} \
                     (PROVIDER_WAIT)",
                    self.class
                )))
                .into());
            }
        }
    }

    /// Asks `provider` for the object's instance, handing it a context of the object. The
    /// instance is usable at once (capnp pipelines calls on it behind `newInstance`); if
    /// `newInstance` fails, the object is reset.
    fn bind(self: &Rc<Self>, provider: &Rc<Provider>) -> Result<(), BoxError> {
        let context = Rc::new(ContextCore {
            state: self.state.clone(),
            turns: self.turns.clone(),
            connection: provider.connection.clone(),
            env: self.env.clone(),
            upgrades: self.upgrades.clone(),
            alive: Alive::default(),
        });
        let mut request = provider.client.new_instance_request();
        request.get().set_context(context::client(&context));
        let call = request.send();
        let instance = call.pipeline.get_instance();
        let served = Served::new(self.state.clone());
        provider.adopt(&served);
        let live = Rc::downgrade(&context);
        let class = provider.class().to_owned();
        tokio::task::spawn_local(async move {
            if let Err(error) = call.promise.await
                && let Some(context) = live.upgrade()
            {
                let reason = format!("the provider of class '{class}' built no instance: {error}");
                context.state.reset(&reason);
            }
        });
        let stub = durable_object::Client {
            client: instance.client.clone(),
        };
        *self.bound.borrow_mut() = Some(Bound {
            instance,
            stub,
            uses_request: provider.uses_request,
            context,
            _served: served,
        });
        Ok(())
    }

    /// Makes the upgrade a request offers (its `upgrade` token) known to the context for the
    /// event of `turn`, until the returned guard is dropped: `acceptWebSocket` takes it.
    fn offer(&self, turn: &Turn, upgrade: Option<UpgradeToken>) -> Offered {
        let task = upgrade.map(|token| {
            self.upgrades.borrow_mut().push((turn.task(), token));
            turn.task()
        });
        Offered {
            upgrades: self.upgrades.clone(),
            task,
        }
    }

    /// Delivers `request` to the instance's `request` (see the module docs): the head in the
    /// call, the body written to `requestBody` as it arrives, and the answer from the host's
    /// `ResponseContext`. The event's turn ends when the response head arrives.
    async fn request(
        self: &Rc<Self>,
        place: Place,
        deadline: Instant,
        request: StreamRequest,
        upgrade: Option<UpgradeToken>,
    ) -> Result<StreamResponse, BoxError> {
        let (bound, turn) = self.turn(place, deadline).await?;
        let offered = self.offer(&turn, upgrade);
        let (context, head) = respond::context();
        let (parts, body) = request.into_parts();
        // A whole body that fits in one write travels in the call; else it follows.
        let whole = body
            .as_full()
            .filter(|bytes| bytes.len() <= STREAM_WRITE_BYTES)
            .cloned();
        let mut call = bound.stub.request_request();
        let head_only = Request::from_parts(parts, whole.clone().unwrap_or_default());
        convert::request_to_capnp(&head_only, call.get().init_request());
        call.get().set_context(context);
        call.get().set_body_follows(whole.is_none());
        let sent = call.send();
        let upload: LocalBoxFuture<'static, ()> = match whole {
            Some(_) => Box::pin(std::future::ready(())),
            None => Box::pin(respond::upload(body, sent.pipeline.get_request_body())),
        };
        let reply = sent.promise;
        let reply = Box::pin(async move { reply.await.map(drop) });
        let answered = respond::answer(reply, upload, head).await;
        drop(offered);
        drop(turn);
        match answered {
            Ok(response) => Ok(response),
            Err(Unanswered::Failed(error)) => Err(self.failed(error)),
            Err(Unanswered::Returned) => Err(KindKept(Error::Remote(
                "the instance returned from `request` without calling startResponse".into(),
            ))
            .into()),
        }
    }

    /// Delivers a WebSocket event: `make` calls the instance's handler with the socket's
    /// capability. An instance that does not implement it ignores the event.
    async fn socket_event<F>(self: &Rc<Self>, socket: WebSocket, make: F) -> Result<(), BoxError>
    where
        F: FnOnce(
            &external_object::Client,
            object_socket::Client,
        ) -> LocalBoxFuture<'static, capnp::Result<()>>,
    {
        let place = self.turnstile.take();
        let deadline = Instant::now() + PROVIDER_WAIT;
        let (bound, turn) = self.turn(place, deadline).await?;
        let socket = sockets::client(socket, &bound.alive, &self.turns);
        let reply = make(&bound.instance, socket).await;
        drop(turn);
        match reply {
            Ok(()) => Ok(()),
            Err(error) if error.kind == ErrorKind::Unimplemented => Ok(()),
            Err(error) => Err(self.failed(error)),
        }
    }

    /// What a failed call of the instance ends the event with. A lost instance (its provider
    /// went, or it answered `disconnected`) resets the object: every stub to it breaks, and
    /// the next `get` asks a provider again.
    fn failed(&self, error: capnp::Error) -> BoxError {
        let message = crate::error::uncrossed(&error.extra).to_owned();
        let kept = match error.kind {
            ErrorKind::Disconnected | ErrorKind::PrematureEndOfFile => {
                let reason = format!("the instance of class '{}' was lost: {message}", self.class);
                self.state.reset(&reason);
                Error::Disconnected(reason)
            }
            ErrorKind::Overloaded => Error::Overloaded(message),
            _ => Error::Remote(message),
        };
        KindKept(kept).into()
    }
}
