//! Bounds: the per-object queue, the number of active objects, idle eviction.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use duro::testing::{request, run_local};
use duro::{BoxError, DurableObject, Error, HostLimits, Request, Response, Server, State};

thread_local! {
    /// Released to let `/block` handlers finish.
    static RELEASE: RefCell<Option<Rc<tokio::sync::Notify>>> = const { RefCell::new(None) };
}

/// A durable counter that can also hold its input gate (`/block`) until released.
struct Blocker {
    state: State,
}

impl DurableObject for Blocker {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        if request.uri().path() == "/block" {
            let release = RELEASE
                .with(|r| r.borrow().clone())
                .ok_or("no release signal")?;
            self.state
                .block_concurrency_while(async move {
                    release.notified().await;
                    Ok::<_, String>(())
                })
                .await?;
        }
        let storage = self.state.storage();
        let n = storage.get::<u64>("n").await?.unwrap_or(0) + 1;
        storage.put("n", &n).await?;
        Ok(Response::new(n.to_string().into()))
    }
}

fn host(dir: &std::path::Path, limits: HostLimits, built: Arc<AtomicUsize>) -> duro::Host {
    let release = Rc::new(tokio::sync::Notify::new());
    RELEASE.with(|r| *r.borrow_mut() = Some(release));
    Server::builder()
        .class("blocker", move |state, _env| {
            built.fetch_add(1, Ordering::SeqCst);
            Blocker { state }
        })
        .namespace("blocker", "blocker")
        .data_dir(dir)
        .limits(limits)
        .open_host()
        .unwrap()
}

fn release_all() {
    RELEASE.with(|r| r.borrow().as_ref().unwrap().notify_waiters());
}

fn body(response: Response) -> String {
    String::from_utf8(response.into_body().to_vec()).unwrap()
}

#[test]
fn a_full_object_queue_refuses_calls_at_once_and_serves_what_it_queued() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let limits = HostLimits {
            object_queue_max: 5,
            ..HostLimits::default()
        };
        let host = host(dir.path(), limits, Arc::default());
        let stub = host.namespace("blocker").unwrap().get_by_name("q").unwrap();
        let blocked = tokio::task::spawn_local(stub.fetch(request("POST", "/block", b"")));
        tokio::task::yield_now().await;
        // The blocked call and four queued ones make five calls in progress.
        let queued: Vec<_> = (0..4)
            .map(|_| stub.fetch(request("POST", "/", b"")))
            .collect();
        assert_eq!(stub.queued(), 4);
        let refused = stub.fetch(request("POST", "/", b"")).await;
        assert!(
            matches!(refused, Err(Error::Overloaded(ref m)) if m.contains("object_queue_max")),
            "{refused:?}"
        );
        release_all();
        assert_eq!(body(blocked.await.unwrap().unwrap()), "1");
        let mut answers = Vec::new();
        for call in queued {
            answers.push(body(call.await.unwrap()));
        }
        assert_eq!(answers, ["2", "3", "4", "5"]);
        host.shutdown().await;
    });
}

#[test]
fn idle_objects_are_evicted_and_their_stubs_follow() {
    let dir = tempfile::tempdir().unwrap();
    let built = Arc::new(AtomicUsize::new(0));
    run_local(async {
        let limits = HostLimits {
            idle_evict_ms: 40,
            ..HostLimits::default()
        };
        let host = host(dir.path(), limits, built.clone());
        let stub = host
            .namespace("blocker")
            .unwrap()
            .get_by_name("idle")
            .unwrap();
        assert_eq!(
            body(stub.fetch(request("POST", "/", b"")).await.unwrap()),
            "1"
        );
        assert_eq!(host.activations(), 1);
        for _ in 0..200 {
            if host.activations() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(host.activations(), 0, "the idle object was not evicted");
        // The stub still works: a new instance, built from storage.
        assert_eq!(
            body(stub.fetch(request("POST", "/", b"")).await.unwrap()),
            "2"
        );
        assert_eq!(built.load(Ordering::SeqCst), 2);
        assert!(!stub.is_broken());
        host.shutdown().await;
    });
}

#[test]
fn past_the_active_object_bound_the_least_recently_used_idle_ones_go() {
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let limits = HostLimits {
            activations_max: 10,
            ..HostLimits::default()
        };
        let host = host(dir.path(), limits, Arc::default());
        let ns = host.namespace("blocker").unwrap();
        // Ten busy objects: nothing can be evicted, the eleventh is refused.
        let busy: Vec<_> = (0..10)
            .map(|i| {
                let stub = ns.get_by_name(&format!("busy{i}")).unwrap();
                tokio::task::spawn_local(stub.fetch(request("POST", "/block", b"")))
            })
            .collect();
        tokio::task::yield_now().await;
        let refused = ns.get_by_name("one-too-many").err().expect("refused");
        assert!(
            matches!(refused, Error::Overloaded(ref m) if m.contains("activations_max")),
            "{refused:?}"
        );
        release_all();
        for call in busy {
            call.await.unwrap().unwrap();
        }
        // Now idle: a new object evicts the least recently used ones, and every object keeps
        // its state.
        let first = ns.get_by_name("busy0").unwrap();
        first.fetch(request("POST", "/", b"")).await.unwrap();
        let newcomer = ns.get_by_name("newcomer").unwrap();
        assert_eq!(
            body(newcomer.fetch(request("POST", "/", b"")).await.unwrap()),
            "1"
        );
        assert!(host.activations() <= 10);
        assert_eq!(
            body(first.fetch(request("POST", "/", b"")).await.unwrap()),
            "3"
        );
        let evicted = ns.get_by_name("busy5").unwrap();
        assert_eq!(
            body(evicted.fetch(request("POST", "/", b"")).await.unwrap()),
            "2"
        );
        host.shutdown().await;
    });
}
