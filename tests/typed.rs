//! Typed interfaces on objects (`DurableObject::interface`), and stubs as capabilities
//! (`duro::rpc::stub_capability`). Each behaviour is checked twice: in-process, through local
//! capabilities of an embedded host (no network), and over a real two-party connection.

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capnp::capability::{FromClientHook, Rc as CapRc};
use duro::duro_capnp::{durable_object, host, namespace};
use duro::storage::FaultyBackend;
use duro::testing::{TestServer, fetch, fetch_call, request, run_local};
use duro::{BoxError, DurableObject, Env, Error, HostLimits, Request, Response, Server, State};

/// The code generated from `tests/typed.capnp`, which names the wire contract's types from
/// the crate's root.
mod typed_capnp {
    #![allow(clippy::all, dead_code, unused_qualifications)]
    include!(concat!(env!("OUT_DIR"), "/typed_capnp.rs"));
}
use duro::duro_capnp;
use typed_capnp::{probe, reader};

/// What the test sees of the probes, whichever thread runs them.
#[derive(Clone, Default)]
struct Events {
    /// Instances built, by object name.
    built: Arc<Mutex<HashMap<String, u64>>>,
    /// `record` calls that reached an object.
    records: Arc<AtomicUsize>,
    /// Transactions begun (`transact`).
    transactions: Arc<AtomicUsize>,
}

/// The class under test (see `tests/typed.capnp`). `fetch` answers `POST /record/<label>`
/// (as `record`), `POST /txn/<label>?sleep=MS` (as `transact`) and `GET /log`.
struct Probe {
    state: State,
    env: Env,
    log: Rc<RefCell<Vec<String>>>,
    /// Which construction of this object this is, from 1.
    instance: u64,
    events: Events,
}

impl Probe {
    fn new(state: State, env: Env, events: &Events) -> Probe {
        let name = state.id().name().unwrap_or("").to_owned();
        let instance = {
            let mut built = events.built.lock().unwrap();
            let count = built.entry(name).or_default();
            *count += 1;
            *count
        };
        Probe {
            state,
            env,
            log: Rc::default(),
            instance,
            events: events.clone(),
        }
    }

    fn log_label(&self, label: &str) -> u32 {
        self.events.records.fetch_add(1, Ordering::SeqCst);
        self.log.borrow_mut().push(label.to_owned());
        self.log.borrow().len() as u32
    }

    /// Logs the start, holds the input gate in a transaction for `sleep_ms`, logs the end.
    async fn hold_gate(&self, label: &str, sleep_ms: u64) -> Result<(), duro::storage::Error> {
        self.log.borrow_mut().push(format!("start {label}"));
        self.events.transactions.fetch_add(1, Ordering::SeqCst);
        let key = label.to_owned();
        self.state
            .storage()
            .transaction(|txn| {
                let key = key.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
                    txn.put(key.as_str(), &1u32).await
                }
            })
            .await?;
        self.log.borrow_mut().push(format!("end {label}"));
        Ok(())
    }

    /// A stub to the object `name` of the namespace `probe`, as a capability.
    fn stub_of(&self, name: &str) -> Result<durable_object::Client, capnp::Error> {
        let namespace = self
            .env
            .namespace("probe")
            .ok_or_else(|| failed("no namespace"))?;
        let stub = namespace.get_by_name(name)?;
        Ok(duro::rpc::stub_capability(stub))
    }
}

fn failed(message: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(message.to_string())
}

impl DurableObject for Probe {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let path = request.uri().path().to_owned();
        if let Some(label) = path.strip_prefix("/record/") {
            return Ok(Response::new(self.log_label(label).to_string().into()));
        }
        if let Some(label) = path.strip_prefix("/txn/") {
            let query = request.uri().query().unwrap_or("");
            let sleep_ms = query.strip_prefix("sleep=").unwrap_or("0").parse()?;
            self.hold_gate(label, sleep_ms).await?;
            return Ok(Response::new("ok".into()));
        }
        Ok(Response::new(self.log.borrow().join(",").into()))
    }

    fn interface(self: Rc<Self>) -> Option<capnp::capability::Client> {
        Some(capnp_rpc::new_client_from_rc::<probe::Client, _>(self).client)
    }
}

impl probe::Server for Probe {
    async fn record(
        self: CapRc<Self>,
        params: probe::RecordParams,
        mut results: probe::RecordResults,
    ) -> capnp::Result<()> {
        let count = self.log_label(params.get()?.get_label()?.to_str()?);
        results.get().set_count(count);
        results.get().set_instance(self.instance);
        Ok(())
    }

    async fn transact(
        self: CapRc<Self>,
        params: probe::TransactParams,
        _: probe::TransactResults,
    ) -> capnp::Result<()> {
        let label = params.get()?.get_label()?.to_string()?;
        let sleep_ms = u64::from(params.get()?.get_sleep_ms());
        self.hold_gate(&label, sleep_ms).await.map_err(failed)
    }

    async fn put(
        self: CapRc<Self>,
        params: probe::PutParams,
        _: probe::PutResults,
    ) -> capnp::Result<()> {
        let params = params.get()?;
        let value = params.get_value()?.to_string()?;
        let storage = self.state.storage();
        storage
            .put(params.get_key()?.to_str()?, &value)
            .await
            .map_err(failed)
    }

    async fn relay(
        self: CapRc<Self>,
        params: probe::RelayParams,
        mut results: probe::RelayResults,
    ) -> capnp::Result<()> {
        let params = params.get()?;
        let target: probe::Client = params.get_target()?.client.cast_to();
        let prefix = params.get_prefix()?.to_str()?;
        // Every call is sent before any answer is awaited: their order is the order sent.
        let calls: Vec<_> = (0..params.get_count())
            .map(|i| {
                let mut call = target.record_request();
                call.get().set_label(format!("{prefix}{i}"));
                call.send().promise
            })
            .collect();
        let mut counts = Vec::new();
        for call in calls {
            counts.push(call.await?.get()?.get_count());
        }
        let mut list = results.get().init_counts(counts.len() as u32);
        for (i, count) in counts.into_iter().enumerate() {
            list.set(i as u32, count);
        }
        Ok(())
    }

    async fn introduce(
        self: CapRc<Self>,
        params: probe::IntroduceParams,
        mut results: probe::IntroduceResults,
    ) -> capnp::Result<()> {
        let params = params.get()?;
        let to: probe::Client = params.get_to()?.client.cast_to();
        let mut call = to.relay_request();
        call.get()
            .set_target(self.stub_of(params.get_target()?.to_str()?)?);
        call.get().set_count(params.get_count());
        call.get().set_prefix("via-");
        let answer = call.send().promise.await?;
        results.get().set_counts(answer.get()?.get_counts()?)
    }

    async fn reader(
        self: CapRc<Self>,
        _: probe::ReaderParams,
        mut results: probe::ReaderResults,
    ) -> capnp::Result<()> {
        let log = LogReader {
            log: self.log.clone(),
        };
        results.get().set_reader(capnp_rpc::new_client(log));
        Ok(())
    }

    async fn fail(
        self: CapRc<Self>,
        params: probe::FailParams,
        _: probe::FailResults,
    ) -> capnp::Result<()> {
        Err(failed(params.get()?.get_message()?.to_str()?))
    }

    async fn crash(
        self: CapRc<Self>,
        _: probe::CrashParams,
        _: probe::CrashResults,
    ) -> capnp::Result<()> {
        panic!("the probe crashed on purpose")
    }

    async fn big(
        self: CapRc<Self>,
        params: probe::BigParams,
        mut results: probe::BigResults,
    ) -> capnp::Result<()> {
        let bytes = params.get()?.get_bytes() as usize;
        results.get().init_data(bytes as u32);
        Ok(())
    }

    async fn stub(
        self: CapRc<Self>,
        _: probe::StubParams,
        mut results: probe::StubResults,
    ) -> capnp::Result<()> {
        let name = self.state.id().name().unwrap_or("").to_owned();
        results.get().set_stub(self.stub_of(&name)?);
        Ok(())
    }
}

/// The object's own capability to its log.
struct LogReader {
    log: Rc<RefCell<Vec<String>>>,
}

impl reader::Server for LogReader {
    async fn count(
        self: CapRc<Self>,
        _: reader::CountParams,
        mut results: reader::CountResults,
    ) -> capnp::Result<()> {
        results.get().set_count(self.log.borrow().len() as u32);
        Ok(())
    }
}

/// The probes in `probe`, and the built-in classes (`counter` exports no interface).
fn builder(events: &Events) -> duro::Builder {
    let events = events.clone();
    duro::builtin::register(Server::builder())
        .class("probe", move |state, env| Probe::new(state, env, &events))
        .namespace("probe", "probe")
}

/// Runs `test` twice: on an in-process host, through local capabilities (no network), then
/// on a server over a real two-party connection.
fn on_both<F, Fut>(test: F)
where
    F: Fn(host::Client, Events) -> Fut,
    Fut: Future<Output = ()>,
{
    on_both_with(HostLimits::default(), test);
}

/// [`on_both`] on hosts with `limits`.
fn on_both_with<F, Fut>(limits: HostLimits, test: F)
where
    F: Fn(host::Client, Events) -> Fut,
    Fut: Future<Output = ()>,
{
    let events = Events::default();
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let builder = builder(&events).limits(limits.clone());
        let host = builder.data_dir(dir.path()).open_host().unwrap();
        test(duro::rpc::bootstrap(&host, &Default::default()), events).await;
        host.shutdown().await;
    });
    let events = Events::default();
    let server = TestServer::start(builder(&events).limits(limits));
    run_local(async { test(server.connect().await, events).await });
}

fn namespace(host: &host::Client, name: &str) -> namespace::Client {
    let mut call = host.namespace_request();
    call.get().set_name(name);
    call.send().pipeline.get_namespace()
}

/// The stub of `name` in `probe`, cast to `Probe`, pipelined.
fn probe(host: &host::Client, name: &str) -> probe::Client {
    stub(host, "probe", name).client.cast_to()
}

fn stub(host: &host::Client, namespace_name: &str, name: &str) -> durable_object::Client {
    let mut call = namespace(host, namespace_name).get_by_name_request();
    call.get().set_name(name);
    call.send().pipeline.get_stub()
}

/// Sends `record(label)` now; resolves with (count, instance).
fn record(
    probe: &probe::Client,
    label: &str,
) -> impl Future<Output = Result<(u32, u64), Error>> + use<> {
    let mut call = probe.record_request();
    call.get().set_label(label);
    let answer = call.send().promise;
    async move {
        let answer = answer.await?;
        let results = answer.get()?;
        Ok((results.get_count(), results.get_instance()))
    }
}

/// Sends `POST <path>` on `stub` now (taking its place in the stub's order); resolves with
/// the response's body.
fn post(
    stub: &durable_object::Client,
    path: &str,
) -> impl Future<Output = Result<String, Error>> + use<> {
    let call = fetch_call(stub, &request("POST", path, b"")).promise;
    async move {
        let answer = call.await?;
        let body = answer.get()?.get_response()?.get_body()?;
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }
}

/// Sends `POST /record/<label>` on `stub` now; resolves with the count.
fn fetch_record(
    stub: &durable_object::Client,
    label: &str,
) -> impl Future<Output = Result<u32, Error>> + use<> {
    let call = post(stub, &format!("/record/{label}"));
    async move { Ok(call.await?.parse().unwrap()) }
}

/// The object's log, through `fetch`.
async fn log(stub: &durable_object::Client) -> Vec<String> {
    let response = fetch(stub, request("GET", "/log", b"")).await.unwrap();
    let text = String::from_utf8(response.body().to_vec()).unwrap();
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(Into::into)
        .collect()
}

/// Waits until `condition` holds, at most a second.
async fn wait_for(condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("waited a second in vain");
}

#[test]
fn a_typed_call_round_trips_and_its_capabilities_pipeline() {
    on_both(|host, events| async move {
        let counter = probe(&host, "round-trip");
        assert_eq!(record(&counter, "a").await.unwrap(), (1, 1));
        assert_eq!(record(&counter, "b").await.unwrap(), (2, 1));
        // `reader` returns the object's own capability; a call on it pipelines.
        let count = counter
            .reader_request()
            .send()
            .pipeline
            .get_reader()
            .count_request()
            .send()
            .promise
            .await
            .unwrap();
        assert_eq!(count.get().unwrap().get_count(), 2);
        assert_eq!(events.records.load(Ordering::SeqCst), 2);
        // The same object answers fetch.
        let stub = stub(&host, "probe", "round-trip");
        assert_eq!(log(&stub).await, ["a", "b"]);
    });
}

#[test]
fn get_and_a_typed_call_take_one_round_trip() {
    let events = Events::default();
    let server = TestServer::start(builder(&events));
    run_local(async {
        let (addr, release) = common::holding_proxy(server.addr()).await;
        let host = duro::testing::connect(addr).await.unwrap();
        // bootstrap → namespace → getByName → record, and a call on the capability `reader`
        // returns: `record` reaches the object while no byte of any answer has reached the
        // client, so the chain cost one round trip.
        let counter = probe(&host, "one-trip");
        let recorded = record(&counter, "x");
        let reader = counter.reader_request().send().pipeline.get_reader();
        let count = reader.count_request().send().promise;
        wait_for(|| events.records.load(Ordering::SeqCst) == 1).await;
        release.send(()).unwrap();
        assert_eq!(recorded.await.unwrap(), (1, 1));
        assert_eq!(count.await.unwrap().get().unwrap().get_count(), 1);
    });
}

#[test]
fn fetch_and_typed_calls_on_one_stub_keep_one_order() {
    on_both(|host, _| async move {
        // Everything is sent before any answer arrives, typed calls and fetches alternating,
        // while the object is still activating.
        let stub = stub(&host, "probe", "ordered");
        let typed: probe::Client = stub.clone().client.cast_to();
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let label = i.to_string();
                if i % 2 == 0 {
                    let call = record(&typed, &label);
                    Box::pin(async move { call.await.map(|(count, _)| count) })
                        as std::pin::Pin<Box<dyn Future<Output = Result<u32, Error>>>>
                } else {
                    Box::pin(fetch_record(&stub, &label))
                }
            })
            .collect();
        // Polled together: a local capability dispatches a call when it is first polled.
        let counts = futures::future::join_all(calls).await;
        for (i, count) in counts.into_iter().enumerate() {
            assert_eq!(count.unwrap(), i as u32 + 1);
        }
        let expected: Vec<String> = (0..200).map(|i| i.to_string()).collect();
        assert_eq!(log(&stub).await, expected);
    });
}

#[test]
fn the_input_gate_holds_typed_calls_and_holds_for_them() {
    on_both(|host, _| async move {
        let stub = stub(&host, "probe", "gated");
        let typed: probe::Client = stub.clone().client.cast_to();
        // A fetch holds the gate in a transaction: the typed call queued behind it waits
        // until it ends, although the fetch's handler awaits in between.
        // (Polled together: a local capability dispatches a call when it is first polled.)
        let holding = post(&stub, "/txn/fetch?sleep=30");
        let waiting = record(&typed, "typed");
        let (held, waited) = tokio::join!(holding, waiting);
        held.unwrap();
        waited.unwrap();
        // A typed method holds the gate in a transaction (its storage calls are its handler's):
        // the fetch behind it waits.
        let mut transact = typed.transact_request();
        transact.get().set_label("method");
        transact.get().set_sleep_ms(30);
        let holding = transact.send().promise;
        let waiting = fetch_record(&stub, "fetched");
        let (held, waited) = tokio::join!(holding, waiting);
        held.unwrap();
        waited.unwrap();
        assert_eq!(
            log(&stub).await,
            [
                "start fetch",
                "end fetch",
                "typed",
                "start method",
                "end method",
                "fetched"
            ]
        );
    });
}

/// Where the test finds the faulty backend the builder wrapped.
type Slot = Arc<Mutex<Option<Arc<FaultyBackend>>>>;

fn faulty_builder(events: &Events, slot: &Slot) -> duro::Builder {
    let slot = slot.clone();
    builder(events).wrap_backend(move |inner| {
        let faulty = FaultyBackend::new(inner);
        *slot.lock().unwrap() = Some(faulty.clone());
        faulty
    })
}

/// A typed `put` is answered only once its write is durable: not while its commit is held.
async fn check_output_gate(host: host::Client, faulty: Arc<FaultyBackend>) {
    let typed = probe(&host, "durable");
    let put = |value: &str| {
        let mut call = typed.put_request();
        call.get().set_key("k");
        call.get().set_value(value);
        call.send().promise
    };
    put("first").await.unwrap();
    let before = faulty.commits();
    faulty.hold();
    let pending = tokio::task::spawn_local(put("second"));
    wait_for(|| faulty.commits() > before).await;
    assert_eq!(faulty.commits(), before + 1, "the write's commit started");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !pending.is_finished(),
        "the typed answer left before its write was durable"
    );
    faulty.release();
    pending.await.unwrap().unwrap();
}

#[test]
fn a_typed_answer_waits_until_its_writes_are_durable() {
    let (events, slot) = (Events::default(), Slot::default());
    let dir = tempfile::tempdir().unwrap();
    run_local(async {
        let builder = faulty_builder(&events, &slot).data_dir(dir.path());
        let host = builder.open_host().unwrap();
        let faulty = slot.lock().unwrap().clone().unwrap();
        check_output_gate(duro::rpc::bootstrap(&host, &Default::default()), faulty).await;
        host.shutdown().await;
    });
    let (events, slot) = (Events::default(), Slot::default());
    let server = TestServer::start(faulty_builder(&events, &slot));
    let faulty = slot.lock().unwrap().clone().unwrap();
    run_local(async { check_output_gate(server.connect().await, faulty).await });
}

#[test]
fn results_over_the_response_bound_fail_the_call_alone() {
    on_both(|host, _events| async move {
        let typed = probe(&host, "big");
        let big = |bytes: usize| {
            let mut call = typed.big_request();
            call.get().set_bytes(bytes as u32);
            let answer = call.send().promise;
            async move { Ok::<_, Error>(answer.await?.get()?.get_data()?.len()) }
        };
        assert_eq!(big(1 << 20).await.unwrap(), 1 << 20, "within the bound");
        let over = big(duro::rpc::RESPONSE_BYTES_MAX + 1).await;
        assert!(
            matches!(&over, Err(Error::Remote(message)) if message.contains("RESPONSE_BYTES_MAX")),
            "{over:?}"
        );
        // The connection and the object live on.
        assert_eq!(record(&typed, "after").await.unwrap(), (1, 1));
    });
}

#[test]
fn errors_stay_with_the_call_and_a_panic_breaks_the_stub() {
    on_both(|host, events| async move {
        let typed = probe(&host, "crashing");
        assert_eq!(record(&typed, "a").await.unwrap(), (1, 1));
        // An error of the method is the object's: `remote: `, and the object lives on.
        let mut fail = typed.fail_request();
        fail.get().set_message("no such thing");
        let failed = fail.send().promise.await.map(drop).map_err(Error::from);
        // Its own text; over a connection, then the call's request ID.
        let own = |m: &str| m == "no such thing" || m.starts_with("no such thing (request id ");
        assert!(
            matches!(&failed, Err(Error::Remote(m)) if own(m)),
            "{failed:?}"
        );
        assert_eq!(record(&typed, "b").await.unwrap(), (2, 1));
        // A panic resets the object: this stub breaks, for typed calls and fetch alike.
        let crashed = typed.crash_request().send().promise.await.map(drop);
        let crashed = crashed.map_err(Error::from);
        assert!(
            matches!(crashed, Err(Error::Disconnected(_))),
            "{crashed:?}"
        );
        let after = record(&typed, "c").await;
        assert!(matches!(after, Err(Error::Disconnected(_))), "{after:?}");
        let fetched = fetch_record(&typed.clone().client.cast_to(), "d").await;
        assert!(
            matches!(fetched, Err(Error::Disconnected(_))),
            "{fetched:?}"
        );
        // A new stub reaches a new instance, built from storage.
        let fresh = probe(&host, "crashing");
        assert_eq!(record(&fresh, "e").await.unwrap(), (1, 2));
        let built = events.built.lock().unwrap()["crashing"];
        assert_eq!(built, 2);
    });
}

#[test]
fn an_interface_the_class_does_not_export_is_unimplemented() {
    on_both(|host, _| async move {
        // `counter` exports none.
        let counter: probe::Client = stub(&host, "counter", "plain").client.cast_to();
        let kind = counter.record_request().send().promise.await.map(drop);
        assert_eq!(
            kind.map_err(|e| e.kind),
            Err(capnp::ErrorKind::Unimplemented)
        );
        // `probe` exports `Probe`, not `Reader`.
        let reader: reader::Client = stub(&host, "probe", "p").client.cast_to();
        let kind = reader.count_request().send().promise.await.map(drop);
        assert_eq!(
            kind.map_err(|e| e.kind),
            Err(capnp::ErrorKind::Unimplemented)
        );
        // The stubs still work.
        let response = post(&stub(&host, "counter", "plain"), "/").await;
        assert_eq!(response.unwrap(), "1\n");
        assert_eq!(record(&probe(&host, "p"), "y").await.unwrap(), (1, 1));
    });
}

#[test]
fn a_stub_handed_from_object_to_object_reaches_the_one_instance_in_order() {
    on_both(|host, events| async move {
        // A gets a stub to C from its Env and hands it to B in a typed call; B calls C
        // through it, 50 calls sent before any answer.
        let a = probe(&host, "a");
        let b = stub(&host, "probe", "b");
        let mut call = a.introduce_request();
        call.get().set_to(b);
        call.get().set_target("c");
        call.get().set_count(50);
        let answer = call.send().promise.await.unwrap();
        let counts: Vec<u32> = answer.get().unwrap().get_counts().unwrap().iter().collect();
        assert_eq!(counts, (1..=50).collect::<Vec<u32>>());
        // C heard them in order, on its one instance, which the test's own stub reaches too.
        let c = probe(&host, "c");
        assert_eq!(record(&c, "direct").await.unwrap(), (51, 1));
        let mut expected: Vec<String> = (0..50).map(|i| format!("via-{i}")).collect();
        expected.push("direct".into());
        assert_eq!(log(&stub(&host, "probe", "c")).await, expected);
        assert_eq!(events.built.lock().unwrap()["c"], 1);
    });
}

#[test]
fn an_object_returns_a_stub_that_keeps_the_stub_semantics() {
    on_both(|host, events| async move {
        let direct = probe(&host, "returned");
        // The returned stub is a capability through the host, pipelined: a call on it waits
        // for the gate held by the direct stub's transaction, as any stub's call would.
        let returned = direct.stub_request().send().pipeline.get_stub();
        assert_eq!(record(&direct, "first").await.unwrap(), (1, 1));
        let mut transact = direct.transact_request();
        transact.get().set_label("t");
        transact.get().set_sleep_ms(30);
        let holding = tokio::task::spawn_local(transact.send().promise);
        wait_for(|| events.transactions.load(Ordering::SeqCst) == 1).await;
        let via_returned = fetch_record(&returned, "via-returned");
        let (held, via_returned) = tokio::join!(holding, via_returned);
        held.unwrap().unwrap();
        assert_eq!(via_returned.unwrap(), 4);
        let typed: probe::Client = returned.client.cast_to();
        assert_eq!(record(&typed, "typed").await.unwrap(), (5, 1));
        assert_eq!(
            log(&stub(&host, "probe", "returned")).await,
            ["first", "start t", "end t", "via-returned", "typed"]
        );
    });
}

#[test]
fn typed_calls_count_against_the_objects_queue() {
    let limits = HostLimits {
        object_queue_max: 5,
        ..HostLimits::default()
    };
    on_both_with(limits, |host, events| async move {
        let typed = probe(&host, "queued");
        // The transaction holds the gate: the calls behind it wait, and count.
        let mut transact = typed.transact_request();
        transact.get().set_label("t");
        transact.get().set_sleep_ms(100);
        let holding = tokio::task::spawn_local(transact.send().promise);
        wait_for(|| events.transactions.load(Ordering::SeqCst) == 1).await;
        let calls: Vec<_> = (0..5).map(|i| record(&typed, &i.to_string())).collect();
        let answers = futures::future::join_all(calls).await;
        holding.await.unwrap().unwrap();
        // One running and four queued make five; the fifth call was refused at once.
        let counts: Vec<u32> = answers[..4].iter().map(|a| a.clone().unwrap().0).collect();
        assert_eq!(counts, [3, 4, 5, 6]);
        let refused = &answers[4];
        assert!(
            matches!(refused, Err(Error::Overloaded(m)) if m.contains("object_queue_max")),
            "{refused:?}"
        );
    });
}
