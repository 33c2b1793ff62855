//! An activation: the one live instance of an object, with its input gate and storage.
//!
//! Lifecycle: built by the first `get` of its ID; lives while the host does; reset by a panic
//! in the object's code, a failed commit, or a failed `block_concurrency_while`. A reset drops
//! the instance and its unflushed writes and breaks every stub to it (`disconnected`); the next
//! `get` builds a new activation, which waits for the old one's in-flight commit to settle
//! before it delivers anything, so it never reads storage that is about to change under it.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;

use futures::FutureExt;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use futures::future::LocalBoxFuture;

use super::class::{AlarmInfo, ErasedObject, SocketEvent};
use super::socket::{CLOSE_GOING_AWAY, CLOSE_INTERNAL, ObjectSockets, SocketCore, WebSocket};
use super::state::{Reset, State};
use crate::body::{Body, BodyTooLarge};
use crate::clock::Clock;
use crate::error::{Error, KindKept};
use crate::gate::{self, Gated, InputGate};
use crate::id::ObjectId;
use crate::message::{BoxError, StreamRequest, StreamResponse};
use crate::metrics::{Method, NamespaceMetrics, Outcome};

/// The handler of one event, run on the instance.
type Handler<T> = LocalBoxFuture<'static, Result<T, BoxError>>;
use crate::storage::{ObjectStore, PRELOAD_KEYS_MAX, Storage};

pub(crate) struct Activation {
    /// `None` once reset: the instance is dropped at the reset.
    instance: RefCell<Option<Rc<dyn ErasedObject>>>,
    /// The interface the instance exports ([`DurableObject::interface`](super::DurableObject::interface)),
    /// asked for once after the constructor; typed calls go to it. Dropped with the instance.
    interface: RefCell<Option<capnp::capability::Client>>,
    gate: Rc<InputGate>,
    pub(crate) store: Rc<ObjectStore>,
    /// The object's `State`, as its constructor gets it: kept so the test harness can drive
    /// the object's storage through the same gate and store as the object
    /// (`duro::testing::state`). No cycle: the `State` refers back weakly.
    state: State,
    /// Set at the reset: every call of this activation ends with `disconnected`.
    broken: Cell<bool>,
    /// Why it was reset, which the calls it ends are told.
    reset_reason: RefCell<Option<Box<str>>>,
    /// The tasks of the calls in progress, aborted at a reset (their callers then get
    /// `disconnected`). A slot per call, reused.
    calls: RefCell<Calls>,
    /// Set when the host evicted the idle object: stubs then move to a new activation.
    evicted: Cell<bool>,
    /// Calls admitted and not yet finished; the object is idle only at 0.
    running: Cell<u32>,
    /// Response bodies still streaming out of the object (see [`Streaming`]); the object is
    /// idle only at 0, so it is not evicted under a stream it is writing.
    streams: Cell<u32>,
    /// When the last call was admitted, for least-recently-used eviction.
    last_used: Cell<std::time::Instant>,
    /// Most calls waiting for delivery before new ones are refused as overloaded (a `u32`,
    /// like the counts above: there is one of these per object).
    queue_max: u32,
    /// The WebSockets the host holds for the object; they outlive this activation.
    sockets: Rc<ObjectSockets>,
    /// Set until the constructor returned. The activation is in the registry by then, so that
    /// a constructor can get a stub to its own object, but it must not be evicted before it has
    /// an instance.
    constructing: Cell<bool>,
    /// The namespace's metrics: every call delivered is counted here, once.
    metrics: NamespaceMetrics,
}

impl Activation {
    /// Builds an activation of `id` on `store`, with its `State` and no instance yet (see
    /// [`Activation::install`]). `predecessor` is the store of a reset activation of the same ID,
    /// whose in-flight commit must settle before anything is delivered.
    pub(crate) fn new(
        id: ObjectId,
        store: Rc<ObjectStore>,
        clock: Arc<dyn Clock>,
        queue_max: usize,
        predecessor: Option<Rc<ObjectStore>>,
        sockets: Rc<ObjectSockets>,
        metrics: NamespaceMetrics,
    ) -> Rc<Activation> {
        let gate = Rc::new(InputGate::default());
        let preload = store.shared.backend.remote_reads();
        if predecessor.is_some() || preload {
            hold_gate_until_ready(&gate, predecessor, preload.then(|| store.clone()));
        }
        let activation = Rc::new_cyclic(|weak: &std::rc::Weak<Activation>| Activation {
            state: State::new(
                id,
                Storage::new(store.clone(), gate.clone()),
                clock,
                weak.clone(),
                sockets.clone(),
            ),
            sockets,
            instance: RefCell::new(None),
            interface: RefCell::new(None),
            gate,
            store: store.clone(),
            broken: Cell::new(false),
            reset_reason: RefCell::default(),
            calls: RefCell::default(),
            evicted: Cell::new(false),
            running: Cell::new(0),
            streams: Cell::new(0),
            last_used: Cell::new(std::time::Instant::now()),
            queue_max: u32::try_from(queue_max).unwrap_or(u32::MAX),
            constructing: Cell::new(true),
            metrics,
        });
        let weak = Rc::downgrade(&activation);
        store.set_on_failure(Box::new(move |error| {
            if let Some(activation) = weak.upgrade() {
                activation.reset(&format!("commit failed: {error}"));
            }
        }));
        activation
    }

    /// The object's ID, which its `State` keeps (one copy of the ID and its name).
    pub(crate) fn id(&self) -> &ObjectId {
        self.state.id()
    }

    /// The object's `State`: what its constructor gets, with the object's gate and store.
    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// Builds the instance with `construct`, and asks it for the interface it exports. Calls
    /// made meanwhile (also by the constructor itself, on a stub to its own ID) wait: nothing
    /// is delivered before the constructor returned. A panic in the constructor (or in
    /// `interface`) resets the activation.
    pub(crate) fn install(
        &self,
        construct: impl FnOnce() -> Rc<dyn ErasedObject>,
    ) -> Result<(), Error> {
        let built = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let instance = construct();
            let interface = instance.clone().interface();
            (instance, interface)
        }));
        self.constructing.set(false);
        match built {
            Ok((instance, interface)) => {
                if !self.is_broken() {
                    *self.instance.borrow_mut() = Some(instance);
                    *self.interface.borrow_mut() = interface;
                }
                Ok(())
            }
            Err(panic) => {
                let message = format!("constructor panicked: {}", panic_message(&*panic));
                self.reset(&message);
                Err(Error::Remote(message))
            }
        }
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.get()
    }

    fn overloaded(&self) -> Error {
        self.metrics.queue_refused();
        Error::Overloaded(format!(
            "object {} has {} requests in progress (object_queue_max)",
            self.id(),
            self.queue_max
        ))
    }

    /// Calls waiting for delivery.
    pub(crate) fn queued(&self) -> usize {
        self.gate.queued()
    }

    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.get()
    }

    pub(crate) fn last_used(&self) -> std::time::Instant {
        self.last_used.get()
    }

    /// Nothing runs, waits or is being written: the instance can go without anyone noticing.
    pub(crate) fn is_idle(&self) -> bool {
        self.running.get() == 0
            && self.streams.get() == 0
            && !self.gate.is_held()
            && !self.store.is_flushing()
            && !self.constructing.get()
    }

    /// Marks the object evicted if it is idle: its stubs stay valid, and their next call builds
    /// a new activation from storage. Whether it was; then [`Activation::release`] must follow.
    pub(crate) fn mark_evicted(&self) -> bool {
        if !self.is_idle() || self.is_broken() || self.evicted.get() {
            return false;
        }
        self.evicted.set(true);
        true
    }

    /// Drops the instance and cache of an evicted object. Separate from the marking, so that
    /// the instance's own drop code runs outside the registry's borrow.
    pub(crate) fn release(&self) {
        let interface = self.interface.borrow_mut().take();
        drop(interface);
        let instance = self.instance.borrow_mut().take();
        drop(instance);
        self.store.release_cache();
    }

    /// Resets the object (see the module docs). Idempotent.
    pub(crate) fn reset(&self, reason: &str) {
        if self.broken.get() {
            return;
        }
        if reason == SHUTTING_DOWN {
            tracing::debug!(id = %self.id(), reason, "object reset");
        } else {
            tracing::warn!(id = %self.id(), reason, "object reset");
            self.metrics.reset();
        }
        self.broken.set(true);
        *self.reset_reason.borrow_mut() = Some(reason.into());
        let calls = std::mem::take(&mut self.calls.borrow_mut().slots);
        for call in calls.into_iter().flatten() {
            call.abort();
        }
        self.store
            .fail(crate::storage::Error::Reset(reason.to_owned()));
        let code = if reason == SHUTTING_DOWN {
            CLOSE_GOING_AWAY
        } else {
            CLOSE_INTERNAL
        };
        self.sockets.close_all(code, reason);
        let interface = self.interface.borrow_mut().take();
        drop(interface);
        let instance = self.instance.borrow_mut().take();
        drop(instance);
    }

    /// Delivers `request`. Its place in the delivery order is taken now, at the call, which is
    /// what keeps E-order; the returned future runs it. Dropping the future cancels the call.
    /// With `upgrade`, the request offers the object a WebSocket (see
    /// [`State::accept_web_socket`]): the socket it accepted comes back with the response.
    pub(crate) fn call(
        self: &Rc<Self>,
        request: StreamRequest,
        upgrade: bool,
    ) -> impl Future<Output = Result<Called, Error>> + use<> {
        let sockets = self.sockets.clone();
        let activation = Rc::downgrade(self);
        // Boxed until the handler runs: the call's task and its layers move 8 bytes, not the
        // request's few hundred, each time they are built.
        let request = Box::new(request);
        self.deliver(Method::fetch, true, move |instance, _| {
            Box::pin(async move {
                let mut request = *request;
                let offer = upgrade.then(|| Offered::new(&sockets, &mut request));
                let response = instance.fetch_stream(request).await?;
                let socket = offer.and_then(|offer| offer.accepted());
                if let Some(socket) = &socket
                    && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
                {
                    socket.lost();
                    return Err(format!(
                        "the object accepted a WebSocket but answered {}: answer with \
                         response::switching_protocols()",
                        response.status()
                    )
                    .into());
                }
                let response = Streaming::wrap(response, activation);
                Ok(Called { response, socket })
            })
        })
    }

    /// Delivers an event of one of the object's WebSockets, as a call: through the mailbox and
    /// the input gate. It ends when the handler returned, without waiting for its writes
    /// (nothing answers an event; the messages it sends wait for them).
    pub(crate) fn socket_event(
        self: &Rc<Self>,
        socket: Rc<SocketCore>,
        event: SocketEvent,
    ) -> impl Future<Output = Result<(), Error>> + use<> {
        self.deliver(Method::websocket, false, move |instance, store| {
            instance.web_socket_event(WebSocket::new(socket, store), event)
        })
    }

    /// Delivers the alarm set for `at_ms`, as a call: through the mailbox, the input gate and
    /// the output gate. `Ok` once the handler succeeded and its writes, and the deletion of
    /// the alarm (unless the handler changed it), are durable.
    pub(crate) fn alarm(
        self: &Rc<Self>,
        at_ms: u64,
        info: AlarmInfo,
    ) -> impl Future<Output = Result<(), Error>> + use<> {
        self.deliver(Method::alarm, true, move |instance, store| {
            Box::pin(async move {
                store.begin_alarm(at_ms);
                let result = instance.alarm(info).await;
                store.end_alarm(at_ms, result.is_ok())?;
                result
            })
        })
    }

    /// Delivers a call of the object's own interface (see
    /// [`DurableObject::interface`](super::DurableObject::interface)) as a request: its place
    /// in the delivery order is taken now, the call runs through the input gate, and its
    /// answer is held until the writes made before it are durable.
    ///
    /// The call goes to the exported capability from inside the delivered handler, with the
    /// caller's parameters and results as they are (`ClientHook::call`): capnp-rpc's local
    /// client runs the object's server method when the call's promise is first polled, and the
    /// method's future is then polled by whoever polls that promise, which is the handler
    /// alone. So the method runs as the handler's task, and its storage calls hold the gate
    /// for it.
    pub(crate) fn call_interface(
        self: &Rc<Self>,
        call: InterfaceCall,
    ) -> impl Future<Output = Result<InterfaceAnswer, Error>> + use<> {
        let activation = Rc::downgrade(self);
        self.deliver(Method::interface, true, move |_, _| {
            Box::pin(async move {
                let interface = activation
                    .upgrade()
                    .and_then(|a| a.interface.borrow().clone());
                Ok(forward(interface, call).await)
            })
        })
    }

    /// Delivers one event, which `handler` runs on the instance (see [`Activation::call`]).
    /// With `durable`, its result is held until the writes made before it are durable. The
    /// call is counted in the namespace's metrics as a `method` once it ends (a call dropped
    /// before it ended counts as disconnected: its caller went away).
    fn deliver<T, H>(
        self: &Rc<Self>,
        method: Method,
        durable: bool,
        handler: H,
    ) -> impl Future<Output = Result<T, Error>> + use<T, H>
    where
        T: Answer + 'static,
        H: FnOnce(Rc<dyn ErasedObject>, Rc<ObjectStore>) -> Handler<T> + 'static,
    {
        let inline = matches!(method, Method::fetch | Method::interface);
        // One reading of the clock for the call's latency and the object's last use.
        let now = std::time::Instant::now();
        let mut counted = Counted {
            activation: self.clone(),
            method,
            started: now,
            outcome: Outcome::disconnected,
        };
        let admitted = if self.is_broken() || self.evicted.get() {
            Err(self.disconnected())
        } else if self.running.get() >= self.queue_max {
            Err(self.overloaded())
        } else {
            // Queued calls are also running ones, so the running bound covers the queue.
            self.gate
                .enqueue(self.queue_max as usize)
                .map_err(|_| self.overloaded())
        };
        let task = admitted.map(|ticket| {
            self.last_used.set(now);
            let running = Running::new(self.clone());
            let slot = running.slot;
            let activation = self.clone();
            // In the span of the call that delivers it, when spans are recorded: what the
            // object logs is then tied to the call's request ID.
            let handled = async move { run(&activation, ticket, handler).await };
            let mut handled = Box::pin(handled.instrument(crate::trace::call_span()));
            // A call whose handler has nothing to wait for (its turn at the gate is now and
            // the handler does not wait) is handled here, as it is delivered: no task, no
            // wake-up round through the event loop. What is left is the output gate, which
            // needs no task either: the caller's future waits for the writes, and a reset
            // fails those not yet durable. Only for requests, whose callers (a connection, the gateway, an
            // object's stub) hold no borrow of the host while they deliver; WebSocket events
            // and alarms always run as tasks.
            if inline && let Some(_depth) = InlineDepth::enter() {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                if let std::task::Poll::Ready(result) = handled.as_mut().poll(&mut cx) {
                    let seq = durable.then(|| self.store.written_seq());
                    return Delivery::Handled {
                        result,
                        seq,
                        running,
                    };
                }
            }
            // A task of its own, so the call progresses whoever awaits it (an object awaiting
            // another object's call must not stall that object's handler while its gate is
            // shut). A poll above registered no waker that counts: the task polls it again.
            let call = async move {
                let result = handled.await;
                let seq = durable.then(|| running.activation.store.written_seq());
                output_gate(&running.activation, seq, result).await
            };
            let handle = tokio::task::spawn_local(call);
            match self.calls.borrow_mut().slots.get_mut(slot) {
                Some(entry) => *entry = Some(handle.abort_handle()),
                // Reset while it ran above: the reset aborted the tasks it saw, not this one.
                None => handle.abort(),
            }
            Delivery::Task(AbortOnDropHandle::new(handle))
        });
        async move {
            let result = match task {
                Ok(Delivery::Handled {
                    result,
                    seq,
                    running,
                }) => output_gate(&running.activation, seq, result).await,
                Ok(Delivery::Task(task)) => match task.await {
                    Ok(result) => result,
                    Err(_) => Err(counted.activation.disconnected()),
                },
                Err(error) => Err(error),
            };
            counted.end(match &result {
                Ok(answer) => answer.outcome(),
                Err(error) => Outcome::of(error),
            });
            result
        }
    }
}

/// What a delivered event answers, as far as the call's outcome goes.
pub(crate) trait Answer {
    fn outcome(&self) -> Outcome {
        Outcome::ok
    }
}

impl Answer for () {}

impl Answer for Called {}

impl Answer for InterfaceAnswer {
    /// The object's method returned an error: the caller gets it as `failed` (see the RPC
    /// layer), or as `unimplemented`, which is the caller's error too.
    fn outcome(&self) -> Outcome {
        match self {
            Ok(()) => Outcome::ok,
            Err(_) => Outcome::failed,
        }
    }
}

/// A call being delivered, counted in the metrics when it is dropped: when it ended, or when
/// its caller dropped it.
struct Counted {
    activation: Rc<Activation>,
    method: Method,
    started: std::time::Instant,
    outcome: Outcome,
}

impl Counted {
    fn end(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let metrics = &self.activation.metrics;
        metrics.call(self.method, self.outcome, elapsed);
    }
}

/// A call of a method of an object's own interface, as it arrived: the object's method reads
/// the caller's parameters and writes the caller's results, with no copy. The results leave
/// when the call's transport answers, after the output gate.
pub(crate) struct InterfaceCall {
    pub(crate) interface_id: u64,
    pub(crate) method_id: u16,
    pub(crate) params: capnp::capability::Params<capnp::any_pointer::Owned>,
    pub(crate) results: capnp::capability::Results<capnp::any_pointer::Owned>,
}

/// How the object's method ended: `Ok` once it wrote the call's results, or the error it
/// returned. The call's transport decides what the caller sees of the error.
pub(crate) type InterfaceAnswer = capnp::Result<()>;

/// Makes `call` on the object's exported `interface`, and awaits the object's answer.
async fn forward(
    interface: Option<capnp::capability::Client>,
    call: InterfaceCall,
) -> InterfaceAnswer {
    let Some(interface) = interface else {
        return Err(capnp::Error::unimplemented(format!(
            "the object's class exports no interface (asked for {:#018x})",
            call.interface_id
        )));
    };
    let InterfaceCall {
        interface_id,
        method_id,
        params,
        results,
    } = call;
    let hook = interface.hook;
    hook.call(interface_id, method_id, params.hook, results.hook)
        .await
}

/// What a call ends with: the response, and the WebSocket the object accepted, if any.
pub(crate) struct Called {
    pub(crate) response: StreamResponse,
    pub(crate) socket: Option<Rc<SocketCore>>,
}

/// An upgrade offered to the object for one call, withdrawn when the call ends (also when it
/// is cancelled), so that no offer outlives its call.
struct Offered {
    sockets: Rc<ObjectSockets>,
    token: super::socket::UpgradeToken,
    offer: Rc<super::socket::Offer>,
}

impl Offered {
    fn new(sockets: &Rc<ObjectSockets>, request: &mut StreamRequest) -> Offered {
        let (token, offer) = sockets.offer();
        request.extensions_mut().insert(token);
        Offered {
            sockets: sockets.clone(),
            token,
            offer,
        }
    }

    fn accepted(self) -> Option<Rc<SocketCore>> {
        self.offer.accepted()
    }
}

impl Drop for Offered {
    /// A socket accepted by a call that did not complete (it failed, or was cancelled) has no
    /// peer: it is let go.
    fn drop(&mut self) {
        self.sockets.withdraw(self.token);
        if let Some(socket) = self.offer.accepted() {
            socket.lost();
        }
    }
}

/// A response body that the object goes on writing after its call returned: it keeps the
/// object from being evicted until it ends, and it breaks off when the object is reset (as
/// the stub does).
struct Streaming {
    body: Body,
    activation: std::rc::Weak<Activation>,
}

impl Streaming {
    /// `response`, its body watched if it is a stream.
    fn wrap(response: StreamResponse, activation: std::rc::Weak<Activation>) -> StreamResponse {
        if response.body().as_full().is_some() {
            return response;
        }
        let Some(live) = activation.upgrade() else {
            return response;
        };
        live.streams.set(live.streams.get() + 1);
        response.map(|body| {
            let whole = body.whole_bytes_max();
            Body::from_stream(Streaming { body, activation }).with_whole_bytes_max(whole)
        })
    }
}

impl http_body::Body for Streaming {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        if self.activation.upgrade().is_none_or(|a| a.is_broken()) {
            return std::task::Poll::Ready(Some(Err("the object was reset".into())));
        }
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Some(activation) = self.activation.upgrade() {
            activation.streams.set(activation.streams.get() - 1);
        }
    }
}

/// The abort handles of the calls in progress.
#[derive(Default)]
struct Calls {
    slots: Vec<Option<tokio::task::AbortHandle>>,
    /// Slots free for reuse.
    free: Vec<usize>,
}

/// Counts a call as running, and holds its slot, for as long as it lives (also when aborted).
struct Running {
    activation: Rc<Activation>,
    slot: usize,
}

impl Running {
    fn new(activation: Rc<Activation>) -> Running {
        activation.running.set(activation.running.get() + 1);
        let slot = {
            let mut calls = activation.calls.borrow_mut();
            match calls.free.pop() {
                Some(slot) => slot,
                None => {
                    calls.slots.push(None);
                    calls.slots.len() - 1
                }
            }
        };
        Running { activation, slot }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let activation = &self.activation;
        let running = activation.running.get() - 1;
        activation.running.set(running);
        let mut calls = activation.calls.borrow_mut();
        if running == 0 {
            // The last call ended: an idle object keeps no buffers for its calls (most
            // objects are idle most of the time, and there can be very many of them).
            *calls = Calls::default();
            drop(calls);
            activation.gate.trim();
            return;
        }
        // After a reset the slots were taken; there is nothing to give back.
        if let Some(slot) = calls.slots.get_mut(self.slot) {
            *slot = None;
            calls.free.push(self.slot);
        }
    }
}

/// Most calls run inline inside one another on a thread: an object whose handler calls
/// another object, which calls another..., runs each inside its caller's poll, so the stack
/// grows with the chain. Past this depth calls run as tasks again, each on a stack of its own.
const INLINE_DEPTH_MAX: u32 = 16;

thread_local! {
    static INLINE_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// One level of calls run inline on this thread, while it lives.
struct InlineDepth;

impl InlineDepth {
    /// A level, or `None` at [`INLINE_DEPTH_MAX`].
    fn enter() -> Option<InlineDepth> {
        INLINE_DEPTH.with(|depth| {
            (depth.get() < INLINE_DEPTH_MAX).then(|| {
                depth.set(depth.get() + 1);
                InlineDepth
            })
        })
    }
}

impl Drop for InlineDepth {
    fn drop(&mut self) {
        INLINE_DEPTH.with(|depth| depth.set(depth.get() - 1));
    }
}

/// A delivered call: handled as it was delivered (its answer held only by the output gate,
/// when `seq` is set), or running as a task.
enum Delivery<T> {
    Handled {
        result: Result<T, Error>,
        /// The newest write when the handler ended, which the answer waits for.
        seq: Option<u64>,
        /// The call counts as running until its answer leaves the output gate.
        running: Running,
    },
    Task(AbortOnDropHandle<Result<T, Error>>),
}

/// Runs one call's handler: waits for its turn, then runs the handler through the gate. A
/// reset aborts the task wherever it is.
async fn run<T>(
    activation: &Rc<Activation>,
    ticket: gate::Ticket,
    handler: impl FnOnce(Rc<dyn ErasedObject>, Rc<ObjectStore>) -> Handler<T>,
) -> Result<T, Error> {
    ticket.await;
    let instance = activation
        .instance
        .borrow()
        .clone()
        .ok_or_else(|| activation.disconnected())?;
    let store = activation.store.clone();
    let handler = AssertUnwindSafe(handler(instance, store)).catch_unwind();
    let outcome = Gated::new(handler, activation.gate.clone(), gate::next_task_id()).await;
    let result = match outcome {
        Ok(result) => result,
        Err(panic) => {
            activation.reset(&format!("panic: {}", panic_message(&*panic)));
            return Err(activation.disconnected());
        }
    };
    // Reset while the handler ran (by the handler itself, or by a failed commit): the call
    // fails with the reset, whatever the handler answered.
    if activation.is_broken() {
        return Err(activation.disconnected());
    }
    result.map_err(|error| {
        if let Some(KindKept(kept)) = error.downcast_ref::<KindKept>() {
            return kept.clone();
        }
        match error.downcast_ref::<BodyTooLarge>() {
            Some(too_large) => Error::TooLarge(format!("the request {too_large}")),
            None => Error::Remote(error.to_string()),
        }
    })
}

/// The output gate: a call's `result` leaves once the writes up to `seq` (the newest when its
/// handler ended) are durable. Writes lost to a failed commit or a reset fail it instead.
async fn output_gate<T>(
    activation: &Activation,
    seq: Option<u64>,
    result: Result<T, Error>,
) -> Result<T, Error> {
    if let Some(seq) = seq
        && activation.store.wait_durable(seq).await.is_err()
    {
        // The store fails only with a reset of the object (a failed commit resets it), and
        // the reset's reason says why.
        return Err(activation.disconnected());
    }
    result
}

/// Closes `gate` until `predecessor` has no commit in flight, then, for an engine whose reads
/// are remote, until `preload`'s keys are in its cache: they are read on a blocking thread,
/// so the event loop never waits for the engine on the object's behalf.
fn hold_gate_until_ready(
    gate: &Rc<InputGate>,
    predecessor: Option<Rc<ObjectStore>>,
    preload: Option<Rc<ObjectStore>>,
) {
    let mut lock = gate.lock(gate::next_task_id());
    lock.try_now();
    tokio::task::spawn_local(async move {
        if let Some(predecessor) = predecessor {
            predecessor.wait_idle().await;
        }
        if let Some(store) = preload {
            let (backend, key) = (store.shared.backend.clone(), store.key);
            let read = tokio::task::spawn_blocking(move || {
                let (all, none) = (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded);
                let entries = backend.scan(&key, all, none, false, PRELOAD_KEYS_MAX + 1)?;
                Ok::<_, crate::storage::Error>((entries, backend.alarm(&key)?))
            })
            .await;
            match read {
                Ok(Ok((entries, alarm))) if entries.len() <= PRELOAD_KEYS_MAX => {
                    store.preload(entries, alarm);
                }
                // Too big to load whole, or the read failed: the object reads what it misses
                // as it goes (and meets the error there, if it lasts).
                Ok(_) | Err(_) => {}
            }
        }
        drop(lock);
    });
}

pub(crate) fn disconnected() -> Error {
    Error::Disconnected("the object was reset or the host is shutting down; get a new stub".into())
}

impl Activation {
    /// The answer of a call this activation cannot deliver: why it was reset, when it was.
    fn disconnected(&self) -> Error {
        match &*self.reset_reason.borrow() {
            Some(reason) if &**reason == SHUTTING_DOWN => shutting_down(),
            Some(reason) => {
                Error::Disconnected(format!("the object was reset ({reason}); get a new stub"))
            }
            None => disconnected(),
        }
    }
}

/// The reason of the resets of a shutdown, which are expected and so not worth a warning.
pub(crate) const SHUTTING_DOWN: &str = "the host is shutting down";

pub(crate) fn shutting_down() -> Error {
    Error::Disconnected("the host is shutting down".into())
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
}

impl Reset for Activation {
    fn reset(&self, reason: &str) {
        Activation::reset(self, reason);
    }
}
