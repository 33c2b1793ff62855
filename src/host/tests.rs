//! Unit tests of the registry and activations, on an in-memory backend: no disk, no sockets.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::{DurableObject, Host, HostLimits, State, Stub};
use crate::error::Error;
use crate::message::{BoxError, Request, Response};
use crate::server::Server;
use crate::storage::{Backend, FaultyBackend, MemoryBackend};

/// What the instances of [`Probe`] share with the test: `Send + Sync`, as a class's
/// constructor must be.
struct Shared {
    /// Constructor calls.
    built: AtomicUsize,
    /// Bodies of `/log` calls, in delivery order.
    log: Mutex<Vec<String>>,
    /// `/block` waits for a permit (given back at once, so one permit frees every waiter).
    open: Semaphore,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            built: AtomicUsize::new(0),
            log: Mutex::default(),
            open: Semaphore::new(0),
        }
    }
}

/// A class that counts its constructions and does what the path says.
struct Probe {
    state: State,
    shared: Arc<Shared>,
    /// Calls of `/count` on this instance: tells instances apart.
    count: Cell<u32>,
}

impl DurableObject for Probe {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        let body = String::from_utf8(request.body().to_vec())?;
        let answer = match request.uri().path() {
            "/count" => {
                self.count.set(self.count.get() + 1);
                self.count.get().to_string()
            }
            "/put" => {
                storage.put("n", &body).await?;
                body
            }
            "/get" => storage.get::<String>("n").await?.unwrap_or_default(),
            "/log" => {
                self.shared.log.lock().unwrap().push(body);
                String::new()
            }
            "/block" => {
                drop(self.shared.open.acquire().await?);
                String::new()
            }
            "/panic" => panic!("asked to"),
            path => return Err(format!("no route {path}").into()),
        };
        Ok(Response::new(answer.into()))
    }
}

/// Runs `test` with a host of one namespace `p` of [`Probe`] on `backend`, inside a LocalSet.
fn with_host<F: Future>(
    backend: Arc<dyn Backend>,
    limits: HostLimits,
    test: impl FnOnce(Host, Arc<Shared>) -> F,
) -> F::Output {
    let shared = Arc::new(Shared::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let built = shared.clone();
    let host = Server::builder()
        .class("probe", move |state, _env| {
            built.built.fetch_add(1, Ordering::SeqCst);
            Probe {
                state,
                shared: built.clone(),
                count: Cell::new(0),
            }
        })
        .namespace("p", "probe")
        .backend(backend)
        .limits(limits);
    local.block_on(&runtime, async move {
        let host = host.open_host().unwrap();
        let output = test(host.clone(), shared).await;
        host.shutdown().await;
        output
    })
}

fn memory() -> Arc<dyn Backend> {
    Arc::new(MemoryBackend::new())
}

fn get(host: &Host, name: &str) -> Result<Stub, Error> {
    host.namespace("p").unwrap().get_by_name(name)
}

/// The body of a successful call, as text.
async fn call(stub: &Stub, path: &str, body: &str) -> String {
    let response = stub.call("POST", path, body.to_owned()).await.unwrap();
    String::from_utf8(response.body().to_vec()).unwrap()
}

/// Lets spawned calls run until they block.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

fn built(shared: &Shared) -> usize {
    shared.built.load(Ordering::SeqCst)
}

#[test]
fn one_instance_per_id() {
    with_host(memory(), HostLimits::default(), |host, shared| async move {
        let (a1, a2) = (get(&host, "a").unwrap(), get(&host, "a").unwrap());
        assert_eq!(call(&a1, "/count", "").await, "1");
        assert_eq!(
            call(&a2, "/count", "").await,
            "2",
            "both stubs reach one instance"
        );
        assert_eq!((built(&shared), host.activations()), (1, 1));
        get(&host, "b").unwrap();
        assert_eq!((built(&shared), host.activations()), (2, 2));
    });
}

#[test]
fn evict_idle_spares_busy_objects_and_stubs_follow_through_storage() {
    with_host(memory(), HostLimits::default(), |host, shared| async move {
        let (idle, busy) = (get(&host, "idle").unwrap(), get(&host, "busy").unwrap());
        call(&idle, "/put", "kept").await;
        let blocked = tokio::task::spawn_local(busy.call("POST", "/block", ""));
        settle().await;
        assert_eq!(host.evict_idle(), 1, "only the idle object goes");
        assert_eq!(host.activations(), 1);
        assert_eq!(
            call(&idle, "/get", "").await,
            "kept",
            "rebuilt from storage"
        );
        assert_eq!((built(&shared), host.activations()), (3, 2));
        assert!(!idle.is_broken());
        shared.open.add_permits(1);
        blocked.await.unwrap().unwrap();
        assert_eq!(
            call(&busy, "/count", "").await,
            "1",
            "the busy one was not rebuilt"
        );
        assert_eq!(built(&shared), 3);
    });
}

#[test]
fn over_activations_max_the_least_recently_used_idle_object_goes() {
    let limits = HostLimits {
        activations_max: 2,
        ..HostLimits::default()
    };
    with_host(memory(), limits, |host, shared| async move {
        let old = get(&host, "old").unwrap();
        get(&host, "recent").unwrap();
        call(&old, "/count", "").await; // Now "recent" is the least recently used.
        get(&host, "new").unwrap();
        assert_eq!((built(&shared), host.activations()), (3, 2));
        get(&host, "old").unwrap();
        assert_eq!(built(&shared), 3, "old stayed");
        get(&host, "recent").unwrap();
        assert_eq!(built(&shared), 4, "recent was evicted and is built again");
    });
}

#[test]
fn over_activations_max_with_no_idle_object_get_is_overloaded() {
    let limits = HostLimits {
        activations_max: 2,
        ..HostLimits::default()
    };
    with_host(memory(), limits, |host, shared| async move {
        let stubs = [get(&host, "a").unwrap(), get(&host, "b").unwrap()];
        let calls = stubs.map(|s| tokio::task::spawn_local(s.call("POST", "/block", "")));
        settle().await;
        assert!(matches!(get(&host, "c"), Err(Error::Overloaded(_))));
        shared.open.add_permits(1);
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert!(get(&host, "c").is_ok(), "room again once an object is idle");
    });
}

#[test]
fn a_reset_breaks_the_stub_and_the_next_instance_waits_for_the_last_commit() {
    let faulty = FaultyBackend::new(memory());
    let held = faulty.clone();
    with_host(
        faulty.clone(),
        HostLimits::default(),
        |host, shared| async move {
            let _release = ReleaseOnDrop(held.clone());
            let stub = get(&host, "r").unwrap();
            call(&stub, "/put", "1").await;
            held.hold();
            let commits = held.commits();
            // The put's response waits at the output gate for its held commit.
            let put = tokio::task::spawn_local(stub.call("POST", "/put", "2"));
            while held.commits() == commits {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let panicked = stub.call("POST", "/panic", "").await;
            assert!(
                matches!(panicked, Err(Error::Disconnected(_))),
                "{panicked:?}"
            );
            assert!(matches!(put.await.unwrap(), Err(Error::Disconnected(_))));
            assert!(stub.is_broken());
            let after = stub.call("POST", "/count", "").await;
            assert!(matches!(after, Err(Error::Disconnected(_))), "{after:?}");

            let fresh = get(&host, "r").unwrap();
            assert_eq!(built(&shared), 2);
            let read = tokio::task::spawn_local(fresh.call("POST", "/get", ""));
            settle().await;
            assert!(
                !read.is_finished(),
                "nothing is delivered while the commit is in flight"
            );
            held.release();
            let read = read.await.unwrap().unwrap();
            assert_eq!(read.body().as_ref(), b"2", "it reads what the commit wrote");
        },
    );
}

#[test]
fn an_answer_whose_writes_are_durable_is_not_lost_to_a_later_reset() {
    with_host(memory(), HostLimits::default(), |host, shared| async move {
        let stub = get(&host, "r").unwrap();
        // Handled as it is delivered, then held at the output gate: its caller reads the
        // answer only after the commit landed and the object reset.
        let put = stub.call("POST", "/put", "1");
        // A later call's answer leaves once every earlier write is durable: the put's too.
        call(&stub, "/count", "").await;
        let panicked = stub.call("POST", "/panic", "").await;
        assert!(
            matches!(panicked, Err(Error::Disconnected(_))),
            "{panicked:?}"
        );
        assert!(stub.is_broken());
        let put = put.await.expect("its write was durable before the reset");
        assert_eq!(put.body().as_ref(), b"1");
        let fresh = get(&host, "r").unwrap();
        assert_eq!(call(&fresh, "/get", "").await, "1");
        assert_eq!(built(&shared), 2);
    });
}

/// Releases held commits even when an assertion fails, so the writer thread can stop.
struct ReleaseOnDrop(Arc<FaultyBackend>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[test]
fn past_object_queue_max_calls_are_overloaded() {
    let limits = HostLimits {
        object_queue_max: 2,
        ..HostLimits::default()
    };
    with_host(memory(), limits, |host, shared| async move {
        let stub = get(&host, "q").unwrap();
        // Two calls that do not end at once (a call that can end as it is delivered, ends
        // there, and holds no place in the queue).
        let first = stub.call("POST", "/block", "");
        let second = stub.call("POST", "/block", "");
        let refused = stub.call("POST", "/count", "").await;
        assert!(matches!(refused, Err(Error::Overloaded(_))), "{refused:?}");
        shared.open.add_permits(2);
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(
            call(&stub, "/count", "").await,
            "1",
            "admitted again once served, and the refused call was not run"
        );
    });
}

#[test]
fn calls_made_before_the_first_poll_are_delivered_in_the_order_made() {
    with_host(memory(), HostLimits::default(), |host, shared| async move {
        let stub = get(&host, "e").unwrap();
        let calls: Vec<_> = (0..5)
            .map(|i| stub.call("POST", "/log", i.to_string()))
            .collect();
        // Polled last first: the order is the order the calls were made.
        for result in futures::future::join_all(calls.into_iter().rev()).await {
            result.unwrap();
        }
        assert_eq!(*shared.log.lock().unwrap(), ["0", "1", "2", "3", "4"]);
    });
}
