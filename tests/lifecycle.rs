//! The lifecycle of activations, in process: how they are built, also when the constructor
//! reaches for its own object; and that none is built once shutdown has begun.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use duro::testing::{request, run_local};
use duro::{BoxError, DurableObject, Error, HostLimits, Request, Response, Server, State, Stub};

/// Takes a stub to itself in its constructor, as an object that hands out references to itself
/// does. `/self` asks itself for its ID through that stub; any other path answers the ID.
struct SelfReferencing {
    state: State,
    me: Stub,
}

impl DurableObject for SelfReferencing {
    async fn fetch(&self, req: Request) -> Result<Response, BoxError> {
        if req.uri().path() == "/self" {
            return Ok(self.me.fetch(request("GET", "/", b"")).await?);
        }
        Ok(Response::new(self.state.id().to_string().into()))
    }
}

/// A host with the class above as namespace `me`; `built` counts constructor runs, and the
/// first `panics` of them panic after taking the stub (and calling through it).
fn self_referencing_host(
    dir: &std::path::Path,
    built: Arc<AtomicUsize>,
    panics: usize,
) -> duro::Host {
    Server::builder()
        .class("me", move |state: State, env| {
            let me = env
                .namespace("me")
                .expect("namespace me")
                .get(state.id())
                .expect("a stub to itself");
            if built.fetch_add(1, Ordering::SeqCst) < panics {
                // A call made before the constructor failed: it must end, not hang.
                tokio::task::spawn_local(me.fetch(request("GET", "/", b"")));
                panic!("constructor fails");
            }
            SelfReferencing { state, me }
        })
        .namespace("me", "me")
        .data_dir(dir)
        .open_host()
        .unwrap()
}

#[test]
fn a_constructor_may_take_a_stub_to_its_own_object() {
    let dir = tempfile::tempdir().unwrap();
    let built = Arc::new(AtomicUsize::new(0));
    run_local(async {
        let host = self_referencing_host(dir.path(), built.clone(), 0);
        let stub = host.namespace("me").unwrap().get_by_name("a").unwrap();
        let response = stub.fetch(request("GET", "/self", b"")).await.unwrap();
        assert_eq!(response.body().as_ref(), stub.id().to_string().as_bytes());
        assert!(!stub.is_broken());
        assert_eq!(host.activations(), 1);
        assert_eq!(built.load(Ordering::SeqCst), 1);
        host.shutdown().await;
    });
}

#[test]
fn a_constructor_that_panics_leaves_no_activation_and_the_next_get_builds_again() {
    let dir = tempfile::tempdir().unwrap();
    let built = Arc::new(AtomicUsize::new(0));
    run_local(async {
        let host = self_referencing_host(dir.path(), built.clone(), 1);
        let namespace = host.namespace("me").unwrap();
        match namespace.get_by_name("a") {
            Ok(_) => panic!("the constructor panicked, yet get succeeded"),
            Err(error) => assert!(matches!(error, Error::Remote(_)), "{error}"),
        }
        assert_eq!(host.activations(), 0);
        // The call the failed constructor made through its stub is settled.
        tokio::task::yield_now().await;
        let stub = namespace.get_by_name("a").unwrap();
        let response = stub.fetch(request("GET", "/self", b"")).await.unwrap();
        assert_eq!(response.body().as_ref(), stub.id().to_string().as_bytes());
        assert_eq!(host.activations(), 1);
        assert_eq!(built.load(Ordering::SeqCst), 2);
        host.shutdown().await;
    });
}

/// Holds a stub to another object, got in its constructor (if the host had room for it).
struct WithPeer {
    _peer: Option<Stub>,
}

impl DurableObject for WithPeer {
    async fn fetch(&self, _req: Request) -> Result<Response, BoxError> {
        Ok(Response::new("ok".into()))
    }
}

#[test]
fn an_object_being_built_is_not_evicted_to_make_room_for_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    let built = Arc::new(AtomicUsize::new(0));
    let counted = built.clone();
    run_local(async {
        let host = Server::builder()
            .class("peer", move |state: State, env| {
                let mut peer = None;
                if state.id().name() == Some("a") {
                    counted.fetch_add(1, Ordering::SeqCst);
                    // The host is full with `a` itself, which is not idle while being built.
                    peer = env.namespace("peer").unwrap().get_by_name("b").ok();
                }
                WithPeer { _peer: peer }
            })
            .namespace("peer", "peer")
            .limits(HostLimits {
                activations_max: 1,
                ..HostLimits::default()
            })
            .data_dir(dir.path())
            .open_host()
            .unwrap();
        let a = host.namespace("peer").unwrap().get_by_name("a").unwrap();
        let response = a.fetch(request("GET", "/", b"")).await.unwrap();
        assert_eq!(response.body().as_ref(), b"ok");
        assert_eq!(built.load(Ordering::SeqCst), 1);
        assert_eq!(host.activations(), 1);
        host.shutdown().await;
    });
}

/// Answers once `release` is notified.
struct Slow {
    release: Arc<tokio::sync::Notify>,
}

impl DurableObject for Slow {
    async fn fetch(&self, _req: Request) -> Result<Response, BoxError> {
        self.release.notified().await;
        Ok(Response::new("done".into()))
    }
}

#[test]
fn no_object_is_built_during_the_grace_period_of_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let notify = release.clone();
    run_local(async {
        let host = Server::builder()
            .class("slow", move |_state, _env| Slow {
                release: notify.clone(),
            })
            .namespace("slow", "slow")
            .data_dir(dir.path())
            .open_host()
            .unwrap();
        let namespace = host.namespace("slow").unwrap();
        let running = namespace.get_by_name("running").unwrap();
        let call = tokio::task::spawn_local(running.fetch(request("GET", "/", b"")));
        let closing = Rc::new(Cell::new(false));
        let shutdown = tokio::task::spawn_local({
            let (host, closing) = (host.clone(), closing.clone());
            async move {
                closing.set(true);
                host.shutdown().await;
            }
        });
        // The shutdown has begun and waits for the running call.
        while !closing.get() {
            tokio::task::yield_now().await;
        }
        assert_eq!(host.activations(), 1);
        for attempt in [
            namespace.get_by_name("new"),
            namespace.get(&namespace.id_from_name("other").unwrap()),
        ] {
            match attempt {
                Ok(_) => panic!("an object was built while the host shuts down"),
                Err(error) => assert!(matches!(error, Error::Disconnected(_)), "{error}"),
            }
        }
        assert_eq!(host.activations(), 1);
        // The running call still finishes within the grace period.
        release.notify_one();
        let response = call.await.unwrap().unwrap();
        assert_eq!(response.body().as_ref(), b"done");
        shutdown.await.unwrap();
    });
}
