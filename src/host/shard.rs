//! A host's place among the shards of its server, and its stubs to the objects of the others.
//!
//! A server runs N hosts, one per event-loop thread (a shard), over one storage. Every object
//! lives on one shard: the one its ID maps to ([`Placement::shard_of`]), through the storage's
//! fixed number of virtual shards, so that the mapping stays the same while the shard count
//! does, and a virtual shard can later move without rehashing objects. A host activates only
//! its own objects; for an object of another shard, [`Namespace::get`](super::Namespace::get)
//! gives a [`RemoteObject`] stub: it hands whole fetches off to the object's shard as jobs,
//! and sends every other call through a Cap'n Proto capability to the object there, carried
//! by an in-process connection between the two shards (its link), in the order the calls were
//! made.
//!
//! The layers above fill [`Peers`] in (the links are capnp connections, which the RPC layer
//! serves); this layer only asks it for capabilities, and for a shard to run a job on.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use futures::future::{FutureExt, LocalBoxFuture, Shared};
use futures::task::AtomicWaker;

use super::Host;
use crate::error::Error;
use crate::id::ObjectId;
use crate::message::{Request, Response, StreamRequest, StreamResponse};
use crate::storage::cluster::NodeAddr;
use crate::storage::{VIRTUAL_SHARDS_DEFAULT, virtual_shard};
use crate::wire::duro_capnp::durable_object;
use crate::wire::stream;

/// Work handed to another shard's event loop; it runs there with that shard's host.
pub type Job = Box<dyn FnOnce(&Host) + Send>;

/// Which objects a host serves: those of its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// This host's shard, in `0..shards`.
    pub(crate) shard: usize,
    /// The server's shards.
    pub(crate) shards: usize,
    /// The store's virtual shards (fixed when its data dir was made).
    pub(crate) virtual_shards: u32,
}

impl Default for Placement {
    /// The one shard of a server that has one.
    fn default() -> Placement {
        Placement {
            shard: 0,
            shards: 1,
            virtual_shards: VIRTUAL_SHARDS_DEFAULT,
        }
    }
}

impl Placement {
    /// The shard of the object `id`: its virtual shard, spread over the shards in turn.
    pub(crate) fn shard_of(&self, id: &[u8; 32]) -> usize {
        virtual_shard(id, self.virtual_shards) as usize % self.shards
    }

    /// Whether `id` is an object of another shard.
    pub(crate) fn is_remote(&self, id: &[u8; 32]) -> bool {
        self.shards > 1 && self.shard_of(id) != self.shard
    }
}

/// The other shards of the server, as one shard sees them.
pub(crate) trait Peers {
    /// The capability, through the link to `shard`, to the stub that shard keeps for stub
    /// `key` of this one (`Host.shardStub`; see [`RemoteObject`]). Answers at once: calls on
    /// it pipeline behind the call that finds the stub there. Only once the job that opened
    /// that stub ran there.
    fn shard_stub(&self, shard: usize, key: u64) -> durable_object::Client;

    /// Runs `job` on `shard`'s event loop, with its host, after the jobs sent there before.
    fn run_on(&self, shard: usize, job: Job);

    /// The server's shards, this one included.
    fn count(&self) -> usize;

    /// The `Host` of another shard, privileged (as a link from a shard is).
    fn host(&self, shard: usize) -> Option<crate::wire::duro_capnp::host::Client>;

    /// A capability to the object `id` of `namespace` on another node of the cluster, through
    /// this shard's link to that node (see `Host.nodeLink`). Answers at once, as
    /// [`Peers::shard_stub`] does.
    fn node_stub(&self, node: &NodeAddr, namespace: &str, id: &ObjectId) -> durable_object::Client;
}

/// A stub to an object of another shard.
///
/// Its calls reach the object on its shard in one of two ways:
///
/// - **Handed off**: a whole `fetch` goes to the object's shard as a [`Job`] with the request
///   (an `http::Request` of `Bytes`, which may cross threads), delivered there to a stub that
///   shard keeps for this one ([`Handoffs`]), and the response comes back through a oneshot.
///   No Cap'n Proto on the way: no second serialization, no RPC tables, no message segments.
/// - **Through the link**: every other call (a streamed request or response, a call of the
///   object's own interface) goes through the capability a `get` on the in-process Cap'n
///   Proto link between the two shards gave.
///
/// Calls on one stub keep their order across the two: a stub hands off until its first call
/// that needs the link; from then on every call takes the link (it is sticky), and the link
/// passes on no call before every handed-off call was delivered there. Both ways reach the
/// same activation, and a stub that saw `disconnected` either way stays broken.
pub(crate) struct RemoteObject {
    pub(crate) id: ObjectId,
    /// The capability to the object on its node, or to the stub its shard keeps for this one;
    /// for the latter, asked for at the first call that takes the link (most stubs only
    /// fetch, and never do).
    client: RefCell<Option<durable_object::Client>>,
    /// Why the stub is broken: a call failed with `disconnected` (the object was reset, or its
    /// shard stopped).
    broken: RefCell<Option<String>>,
    /// For an object of another shard of this server (not of another node): the hand-off.
    handoff: Option<Handoff>,
}

/// A stub's hand-off to the object's shard (see [`RemoteObject`]).
struct Handoff {
    peers: Rc<dyn Peers>,
    shard: usize,
    namespace: String,
    /// The stub's key in the far shard's [`Handoffs`].
    key: u64,
    undelivered: Arc<Undelivered>,
    /// Set by the first call that needed the link: every later call takes it.
    linked: Cell<bool>,
    /// Resolves once the last call that waited for its turn on the link was issued.
    last_issued: RefCell<Option<Shared<LocalBoxFuture<'static, ()>>>>,
}

/// When a call may go through a stub's link, and the link (see [`RemoteObject::link_turn`]).
pub(crate) struct LinkTurn {
    object: Rc<RemoteObject>,
    /// `None`: now. Else the turn comes once the future resolves; dropping the sender then
    /// tells the next call it was issued.
    after: Option<(
        LocalBoxFuture<'static, ()>,
        futures::channel::oneshot::Sender<()>,
    )>,
}

impl LinkTurn {
    /// Issues a call with `issue`, given the link, in this turn: at once when it is now (its
    /// place is taken here), else once the turn came, telling the next call then. The future
    /// gives what `issue` returned.
    pub(crate) fn issue<T: 'static>(
        self,
        issue: impl FnOnce(&durable_object::Client) -> T + 'static,
    ) -> impl Future<Output = T> + 'static {
        let LinkTurn { object, after } = self;
        match after {
            None => futures::future::Either::Left(std::future::ready(issue(&object.link()))),
            Some((turn, issued)) => futures::future::Either::Right(async move {
                turn.await;
                let call = issue(&object.link());
                drop(issued);
                call
            }),
        }
    }

    /// Runs `issue`, given the link, in this turn: now, or in a task once the turn came.
    pub(crate) fn run(self, issue: impl FnOnce(&durable_object::Client) + 'static) {
        match self.after {
            None => issue(&self.object.link()),
            Some(_) => {
                tokio::task::spawn_local(self.issue(issue));
            }
        }
    }
}

/// Keys of the stubs handed off to: unique in the process.
static HANDOFF_KEYS: AtomicU64 = AtomicU64::new(1);

/// Handed-off calls not yet delivered on the far shard, and who waits for there to be none.
#[derive(Default)]
struct Undelivered {
    count: AtomicUsize,
    waiter: AtomicWaker,
}

/// One call counted in [`Undelivered`] until dropped: when it was delivered, or when its job
/// was dropped unrun (the far shard stopped).
struct Delivery(Arc<Undelivered>);

impl Delivery {
    fn new(undelivered: &Arc<Undelivered>) -> Delivery {
        undelivered.count.fetch_add(1, Ordering::AcqRel);
        Delivery(undelivered.clone())
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waiter.wake();
        }
    }
}

/// Resolves once every handed-off call counted in `undelivered` was delivered.
async fn all_delivered(undelivered: Arc<Undelivered>) {
    std::future::poll_fn(|cx| {
        if undelivered.count.load(Ordering::Acquire) == 0 {
            return Poll::Ready(());
        }
        undelivered.waiter.register(cx.waker());
        match undelivered.count.load(Ordering::Acquire) {
            0 => Poll::Ready(()),
            _ => Poll::Pending,
        }
    })
    .await
}

/// The stubs a shard keeps for the stubs of other shards that hand calls off to it, by key:
/// each made when the stub on the other shard was, and dropped with it.
#[derive(Default)]
pub(crate) struct Handoffs(RefCell<HashMap<u64, Result<super::Stub, Error>>>);

impl Handoffs {
    fn open(&self, host: &Host, key: u64, namespace: &str, id: ObjectId) {
        let stub = host
            .namespace(namespace)
            .ok_or_else(|| Error::InvalidArgument(format!("no namespace {namespace:?}")))
            .and_then(|namespace| namespace.stub_here(id));
        self.0.borrow_mut().insert(key, stub);
    }

    pub(super) fn get(&self, key: u64) -> Result<super::Stub, Error> {
        match self.0.borrow().get(&key) {
            Some(stub) => stub.clone(),
            None => Err(super::activation::shutting_down()),
        }
    }

    fn close(&self, key: u64) {
        self.0.borrow_mut().remove(&key);
    }

    /// Drops every stub kept (at shutdown).
    pub(crate) fn clear(&self) {
        std::mem::take(&mut *self.0.borrow_mut());
    }
}

/// Largest request sent whole with its call; a larger one streams its body.
const WHOLE_REQUEST_BYTES_MAX: usize = crate::wire::MESSAGE_BYTES_MAX - (64 << 10);

impl RemoteObject {
    /// A stub to `id` on another node, through `client` alone.
    pub(crate) fn linked(id: ObjectId, client: durable_object::Client) -> Rc<RemoteObject> {
        Rc::new(RemoteObject {
            id,
            client: RefCell::new(Some(client)),
            broken: RefCell::default(),
            handoff: None,
        })
    }

    /// A stub to `id` of `namespace` on `shard` of this server: it asks that shard now to make
    /// the stub it hands calls off to (and, through the link, at its first call that needs
    /// the link, for that same stub).
    pub(crate) fn on_shard(
        peers: Rc<dyn Peers>,
        shard: usize,
        namespace: &str,
        id: ObjectId,
    ) -> Rc<RemoteObject> {
        let key = HANDOFF_KEYS.fetch_add(1, Ordering::Relaxed);
        let undelivered = Arc::new(Undelivered::default());
        let delivery = Delivery::new(&undelivered);
        let (name, far_id) = (namespace.to_owned(), id.clone());
        peers.run_on(
            shard,
            Box::new(move |host: &Host| {
                host.inner.handoffs.open(host, key, &name, far_id);
                drop(delivery);
            }),
        );
        Rc::new(RemoteObject {
            id,
            client: RefCell::default(),
            broken: RefCell::default(),
            handoff: Some(Handoff {
                peers,
                shard,
                namespace: namespace.to_owned(),
                key,
                undelivered,
                linked: Cell::new(false),
                last_issued: RefCell::default(),
            }),
        })
    }

    /// The name of the object's namespace, for an object of another shard.
    pub(crate) fn namespace(&self) -> Option<&str> {
        self.handoff.as_ref().map(|h| h.namespace.as_str())
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.borrow().is_some()
    }

    /// Notes the outcome of a call: a `disconnected` breaks the stub for good.
    pub(crate) fn note(&self, error: &Error) {
        if let Error::Disconnected(message) = error {
            self.broken
                .borrow_mut()
                .get_or_insert_with(|| message.clone());
        }
    }

    pub(crate) fn broken_error(&self) -> Option<Error> {
        self.broken.borrow().clone().map(Error::Disconnected)
    }

    /// When the call about to be made may take the link. For a stub that hands off, the
    /// first call makes the link the way of every later call, and a call goes only once every
    /// call handed off was delivered (the job that opened the far stub included) and the link
    /// calls made before it were issued: issue it with [`LinkTurn::issue`] or
    /// [`LinkTurn::run`], which give it the link.
    pub(crate) fn link_turn(self: &Rc<Self>) -> LinkTurn {
        let now = LinkTurn {
            object: self.clone(),
            after: None,
        };
        let Some(handoff) = &self.handoff else {
            return now;
        };
        handoff.linked.set(true);
        let mut last_issued = handoff.last_issued.borrow_mut();
        let queue_idle = last_issued
            .as_ref()
            .is_none_or(|issued| issued.peek().is_some());
        let link_asked = self.client.borrow().is_some();
        if link_asked && queue_idle && handoff.undelivered.count.load(Ordering::Acquire) == 0 {
            *last_issued = None;
            return now;
        }
        let previous = last_issued.take();
        let delivered = all_delivered(handoff.undelivered.clone());
        let (issued, on_issued) = futures::channel::oneshot::channel::<()>();
        *last_issued = Some(on_issued.map(drop).boxed_local().shared());
        let object = self.clone();
        let turn = async move {
            if let Some(previous) = previous {
                previous.await;
            }
            delivered.await;
            object.link_resolved().await;
        };
        LinkTurn {
            after: Some((turn.boxed_local(), issued)),
            ..now
        }
    }

    /// Asks for the link if no call did yet, and then waits until it resolved: the first call
    /// through it goes only once `shardStub` answered. Calls pipelined on a capability that
    /// resolves while they stream (a `request`'s body writes, pipelined on a call on it) could
    /// overtake each other as capnp-rpc switched them from the question to the capability.
    async fn link_resolved(&self) {
        let asked = self.client.borrow().is_some();
        let client = self.link();
        if !asked {
            // Asked for just now, so not resolved yet: `when_resolved` answers.
            let _ = client.client.when_resolved().await;
        }
    }

    /// The capability calls take through the link: for a stub that hands off, asked for the
    /// first time in a call's turn (so once the far stub was opened).
    fn link(&self) -> durable_object::Client {
        let mut client = self.client.borrow_mut();
        if let Some(client) = &*client {
            return client.clone();
        }
        let handoff = self
            .handoff
            .as_ref()
            .expect("a stub without a hand-off has its link from the start");
        client
            .insert(handoff.peers.shard_stub(handoff.shard, handoff.key))
            .clone()
    }

    /// Whether a whole `fetch` is handed off (rather than sent through the link).
    pub(crate) fn hands_off(&self) -> bool {
        self.handoff
            .as_ref()
            .is_some_and(|handoff| !handoff.linked.get())
    }

    /// Hands a whole `request` off to the object's shard (see [`RemoteObject`]); its place in
    /// the object's order is taken there, after the calls handed off before it. For a stub
    /// that [`hands_off`](Self::hands_off).
    pub(crate) fn hand_off(
        self: &Rc<Self>,
        request: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Response, Error>>>> {
        if let Some(error) = self.broken_error() {
            return Box::pin(std::future::ready(Err(error)));
        }
        let Some(handoff) = &self.handoff else {
            return Box::pin(std::future::ready(Err(Error::Disconnected(
                "the object lives on another node: its stub calls it through its link".into(),
            ))));
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        let delivery = Delivery::new(&handoff.undelivered);
        let key = handoff.key;
        handoff.peers.run_on(
            handoff.shard,
            Box::new(move |host: &Host| {
                let call = host.inner.handoffs.get(key).map(|stub| stub.fetch(request));
                drop(delivery);
                let mut call = match call {
                    Ok(call) => Box::pin(call),
                    Err(error) => {
                        let _ = answer.send(Err(error));
                        return;
                    }
                };
                // A call that has nothing to wait for ends here, without a task.
                let mut cx = Context::from_waker(Waker::noop());
                if let Poll::Ready(response) = call.as_mut().poll(&mut cx) {
                    let _ = answer.send(response);
                    return;
                }
                // The caller may drop its call: then this one is dropped too (cancelled).
                let mut answer = answer;
                tokio::task::spawn_local(async move {
                    let response = std::future::poll_fn(|cx| {
                        if let Poll::Ready(response) = call.as_mut().poll(cx) {
                            return Poll::Ready(Some(response));
                        }
                        match answer.poll_closed(cx) {
                            Poll::Ready(()) => Poll::Ready(None),
                            Poll::Pending => Poll::Pending,
                        }
                    })
                    .await;
                    if let Some(response) = response {
                        let _ = answer.send(response);
                    }
                });
            }),
        );
        let this = self.clone();
        Box::pin(async move {
            let response = answered.await.unwrap_or_else(|_| {
                Err(Error::Disconnected(
                    "the object's shard stopped before it answered".into(),
                ))
            });
            if let Err(error) = &response {
                this.note(error);
            }
            response
        })
    }

    /// Sends `request` now (its place in the object's order is taken here) through the link,
    /// as `DurableObject.request`: the body streams when it is not whole, and so may the
    /// response's.
    pub(crate) fn fetch_stream(
        self: &Rc<Self>,
        request: StreamRequest,
    ) -> impl Future<Output = Result<StreamResponse, Error>> + use<> {
        let broken = self.broken_error();
        let turn = self.link_turn();
        let send = Box::new(move |head, upload| {
            if let Some(error) = broken {
                return Err(error);
            }
            let (command, call) = stream::call(head, upload, Arc::new(()));
            turn.run(move |client| stream::issue(client, command, ()));
            Ok(call)
        });
        let call = stream::fetch(request, WHOLE_REQUEST_BYTES_MAX, send);
        let this = self.clone();
        async move {
            let answer = call.await;
            if let Err(error) = &answer {
                this.note(error);
            }
            answer
        }
    }
}

impl Drop for RemoteObject {
    fn drop(&mut self) {
        if let Some(handoff) = &self.handoff {
            let key = handoff.key;
            handoff.peers.run_on(
                handoff.shard,
                Box::new(move |host: &Host| host.inner.handoffs.close(key)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::duro_capnp::host;

    /// The peers of a shard whose one other shard takes jobs into `queue`, and never serves a
    /// link: what `shards::Links::run_on` does for a shard that stopped (its queue closed, or
    /// dropped with the jobs in it) is what the receiver's end decides here.
    struct Queue(tokio::sync::mpsc::UnboundedSender<Job>);

    impl Peers for Queue {
        fn shard_stub(&self, _shard: usize, _key: u64) -> durable_object::Client {
            unreachable!("these tests hand calls off, and take no link")
        }

        fn run_on(&self, _shard: usize, job: Job) {
            let _ = self.0.send(job);
        }

        fn count(&self) -> usize {
            2
        }

        fn host(&self, _shard: usize) -> Option<host::Client> {
            None
        }

        fn node_stub(&self, _: &NodeAddr, _: &str, _: &ObjectId) -> durable_object::Client {
            unreachable!("these tests have no cluster")
        }
    }

    fn post() -> Request {
        http::Request::post("/").body(bytes::Bytes::new()).unwrap()
    }

    fn stopped_before_it_answered() -> Error {
        Error::Disconnected("the object's shard stopped before it answered".into())
    }

    #[test]
    fn calls_handed_off_to_a_shard_that_stops_before_answering_fail_disconnected_and_break_the_stub()
     {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (queue, mut jobs) = tokio::sync::mpsc::unbounded_channel();
            let id = crate::id::IdMinter::new("counter", &[7; 32]).from_name("a");
            let stub = RemoteObject::on_shard(Rc::new(Queue(queue)), 1, "counter", id);
            let first = stub.hand_off(post());
            let second = stub.hand_off(post());
            // The far shard took the job that opens its stub and the first call, and stopped
            // before it ran them (its loop ended with them in hand); the second was still in
            // its queue, which closed with it.
            let opening = jobs.recv().await.expect("the job that opens the far stub");
            let taken = jobs.recv().await.expect("the first call's job");
            drop((opening, taken));
            jobs.close();
            drop(jobs);
            assert_eq!(first.await.unwrap_err(), stopped_before_it_answered());
            assert_eq!(second.await.unwrap_err(), stopped_before_it_answered());
            // The stub stays broken: a later call fails at once.
            assert!(stub.is_broken());
            assert_eq!(
                stub.hand_off(post()).await.unwrap_err(),
                stopped_before_it_answered()
            );
        });
    }

    #[test]
    fn objects_go_to_the_shard_of_their_virtual_shard_in_turn() {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        let placement = Placement {
            shard: 1,
            shards: 3,
            virtual_shards: 256,
        };
        // Virtual shard 4 → shard 4 % 3 = 1: this one.
        assert_eq!(placement.shard_of(&id), 1);
        assert!(!placement.is_remote(&id));
        id[3] = 5;
        assert!(placement.is_remote(&id));
        assert!(!Placement::default().is_remote(&id));
    }
}
