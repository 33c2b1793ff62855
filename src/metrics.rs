//! The server's metrics: one registry per server, shared by its shards, rendered as
//! Prometheus text by the admin server (`/metrics`).
//!
//! Every series is an atomic (counters, gauges, and the buckets of [`Histogram`]), so the
//! shards and the storage writer update them without a lock. The label sets are resolved
//! once, when a namespace is opened ([`NamespaceMetrics`]) or a component starts, never per
//! call: a call costs a few relaxed atomic adds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// The content type of what [`Metrics::render`] writes: OpenMetrics text, which Prometheus
/// reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a call to an object was: the kind of event the host delivered to it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The label values, as Prometheus shows them.
pub enum Method {
    /// An HTTP request: `fetch` or `request` over Cap'n Proto, the gateway, or another
    /// object's stub.
    fetch,
    /// A call of the object's own (typed) interface.
    interface,
    /// An alarm.
    alarm,
    /// A message, close or error of one of the object's WebSockets.
    websocket,
}

impl Method {
    const ALL: [Method; 4] = [
        Method::fetch,
        Method::interface,
        Method::alarm,
        Method::websocket,
    ];
}

/// How a call ended, as the caller saw it (the exception type on the wire).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    ok,
    /// The object's error, a bad argument, a body too large.
    failed,
    /// Refused for a bound.
    overloaded,
    /// The object was reset, the host is shutting down, or the caller went away.
    disconnected,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::ok,
        Outcome::failed,
        Outcome::overloaded,
        Outcome::disconnected,
    ];

    /// The outcome of a call that ended with `error`.
    pub(crate) fn of(error: &crate::error::Error) -> Outcome {
        use crate::error::Error;
        match error {
            Error::Overloaded(_) => Outcome::overloaded,
            Error::Disconnected(_) => Outcome::disconnected,
            _ => Outcome::failed,
        }
    }
}

/// The bound a refusal with `overloaded` was for.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Bound {
    /// `object_queue_max`: calls in progress on one object.
    object_queue,
    /// `activations_max`: active objects, none idle.
    activations,
    /// `CONNECTION_CALLS_MAX`: calls in flight on one connection.
    connection_calls,
    /// `inflight_bytes_max`: bytes in flight, the connection's share or the host's budget.
    inflight_bytes,
    /// WebSockets per object, or open through the gateway.
    web_sockets,
    /// No provider of an external class came, or all are busy.
    providers,
}

impl Bound {
    const ALL: [Bound; 6] = [
        Bound::object_queue,
        Bound::activations,
        Bound::connection_calls,
        Bound::inflight_bytes,
        Bound::web_sockets,
        Bound::providers,
    ];
}

/// Which face of the server a connection came through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Transport {
    /// Cap'n Proto (TCP, unix socket, TLS).
    capnp,
    /// The HTTP gateway.
    http,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    namespace: String,
    method: Method,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    namespace: String,
    method: Method,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BoundLabels {
    bound: Bound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: Transport,
}

/// Upper bounds of the buckets of call latencies, in nanoseconds: 50 µs to 10 s.
const LATENCY_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds of the buckets of commit and sync latencies, in nanoseconds: 10 µs to 5 s.
const STORAGE_NS: &[u64] = &[
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// Upper bounds of the buckets of objects per commit (up to the writer's 4096 batches).
const OBJECTS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Upper bounds of the buckets of bytes per commit: 64 B to 64 MiB.
const BYTES: &[u64] = &[
    64,
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
];

/// Upper bounds of the buckets of how late an alarm fired, in nanoseconds: 1 ms to 1 min.
const LATENESS_NS: &[u64] = &[
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
    10_000_000_000,
    60_000_000_000,
];

/// A histogram of integer observations (nanoseconds, bytes, counts) with fixed buckets, each
/// an atomic: observing is a search of the bounds and two relaxed adds, with no lock
/// (prometheus-client's own histogram takes a mutex). Shown scaled by `scale` (1e-9 for
/// nanoseconds shown as seconds). Cheap to clone: the clones share the counts.
#[derive(Clone, Debug)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds, ascending; a last bucket (+Inf) follows them in `counts`.
    bounds: &'static [u64],
    /// Observations per bucket (not cumulative).
    counts: Box<[AtomicU64]>,
    /// The sum of the observations, in their unit.
    sum: AtomicU64,
    scale: f64,
}

impl Histogram {
    fn new(bounds: &'static [u64], scale: f64) -> Histogram {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            inner: Arc::new(HistogramInner {
                bounds,
                counts,
                sum: AtomicU64::new(0),
                scale,
            }),
        }
    }

    fn seconds(bounds: &'static [u64]) -> Histogram {
        Histogram::new(bounds, 1e-9)
    }

    /// Notes one observation of `value` (in the histogram's unit).
    pub fn observe(&self, value: u64) {
        let inner = &*self.inner;
        let bucket = inner.bounds.partition_point(|&bound| bound < value);
        inner.counts[bucket].fetch_add(1, Ordering::Relaxed);
        inner.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Notes a duration, in nanoseconds.
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        let bounds = inner.bounds.iter().map(|&bound| bound as f64 * inner.scale);
        let bounds = bounds.chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(inner.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, count)| count).sum();
        let sum = inner.sum.load(Ordering::Relaxed) as f64 * inner.scale;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The metrics of one server. Cheap to share (`Arc`); see the module docs.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: HistogramFamily<MethodLabels>,
    activations: Family<NamespaceLabels, Counter>,
    evictions: Family<NamespaceLabels, Counter>,
    resets: Family<NamespaceLabels, Counter>,
    objects_active: Family<NamespaceLabels, Gauge>,
    web_sockets_open: Family<NamespaceLabels, Gauge>,
    /// The series of `overloaded`, by [`Bound`] in the order of its `ALL`.
    refusals: [Counter; 6],
    received_bytes: Family<TransportLabels, Counter>,
    sent_bytes: Family<TransportLabels, Counter>,
    connections_open: Family<TransportLabels, Gauge>,
    storage: StorageMetrics,
    alarms: AlarmMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The storage writer's metrics (see [`Metrics`]).
#[derive(Clone, Debug)]
pub struct StorageMetrics {
    /// Transactions committed, the retries of a group included.
    pub commits: Counter,
    /// Transactions that failed (a full disk, a fence, an I/O error).
    pub commit_failures: Counter,
    /// Time of each transaction, from its start to its fsync's end.
    pub commit_seconds: Histogram,
    /// Time of the backend's sync (LMDB: the commit of its transaction, which writes and
    /// fsyncs), when the backend tells it.
    pub sync_seconds: Histogram,
    /// Batches (one object's writes each) per transaction.
    pub commit_objects: Histogram,
    /// Bytes of keys and values written per transaction.
    pub commit_bytes: Histogram,
}

/// The alarm scheduler's metrics (see [`Metrics`]).
#[derive(Clone, Debug)]
pub struct AlarmMetrics {
    /// Alarms set or moved by an object (committed).
    pub set: Counter,
    /// Deliveries that succeeded.
    pub fired: Counter,
    /// Deliveries that failed and will be tried again.
    pub retried: Counter,
    /// Alarms deleted after their last retry failed.
    pub given_up: Counter,
    /// How long after its time each alarm was delivered.
    pub late_seconds: Histogram,
}

impl Metrics {
    /// A registry with every metric of the server, and no namespace's series yet.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("duro");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Calls delivered to objects, by namespace, method and outcome",
            calls.clone(),
        );
        let call_seconds: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(|| Histogram::seconds(LATENCY_NS));
        registry.register_with_unit(
            "call",
            "Time from a call's admission to its answer (input gate, handler, output gate)",
            Unit::Seconds,
            call_seconds.clone(),
        );
        let per_namespace = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<NamespaceLabels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let activations = per_namespace(
            &mut registry,
            "activations",
            "Objects activated (an instance built)",
        );
        let evictions = per_namespace(&mut registry, "evictions", "Idle objects evicted");
        let resets = per_namespace(
            &mut registry,
            "resets",
            "Objects reset (a panic, a failed commit, a failed block_concurrency_while); not \
             those of a shutdown",
        );
        let objects_active = Family::<NamespaceLabels, Gauge>::default();
        registry.register("objects_active", "Active objects", objects_active.clone());
        let web_sockets_open = Family::<NamespaceLabels, Gauge>::default();
        registry.register(
            "web_sockets_open",
            "WebSockets the host holds for objects",
            web_sockets_open.clone(),
        );
        let overloaded = Family::<BoundLabels, Counter>::default();
        registry.register(
            "overloaded",
            "Calls and connections refused with overloaded, by the bound they hit",
            overloaded.clone(),
        );
        let refusals =
            Bound::ALL.map(|bound| overloaded.get_or_create(&BoundLabels { bound }).clone());
        let received_bytes = Family::<TransportLabels, Counter>::default();
        registry.register_with_unit(
            "received",
            "Bytes read from client connections (after TLS)",
            Unit::Bytes,
            received_bytes.clone(),
        );
        let sent_bytes = Family::<TransportLabels, Counter>::default();
        registry.register_with_unit(
            "sent",
            "Bytes written to client connections (before TLS)",
            Unit::Bytes,
            sent_bytes.clone(),
        );
        let connections_open = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Client connections open",
            connections_open.clone(),
        );
        for transport in [Transport::capnp, Transport::http] {
            let labels = TransportLabels { transport };
            drop(received_bytes.get_or_create(&labels));
            drop(sent_bytes.get_or_create(&labels));
            drop(connections_open.get_or_create(&labels));
        }
        let storage = StorageMetrics::register(&mut registry);
        let alarms = AlarmMetrics::register(&mut registry);
        Arc::new(Metrics {
            registry,
            calls,
            call_seconds,
            activations,
            evictions,
            resets,
            objects_active,
            web_sockets_open,
            refusals,
            received_bytes,
            sent_bytes,
            connections_open,
            storage,
            alarms,
        })
    }

    /// The metrics of the namespace `name`, its series made now (at 0).
    pub fn namespace(&self, name: &str) -> NamespaceMetrics {
        let namespace = NamespaceLabels {
            namespace: name.to_owned(),
        };
        let calls = Method::ALL.map(|method| {
            Outcome::ALL.map(|outcome| {
                let labels = CallLabels {
                    namespace: name.to_owned(),
                    method,
                    outcome,
                };
                self.calls.get_or_create(&labels).clone()
            })
        });
        let seconds = Method::ALL.map(|method| {
            let labels = MethodLabels {
                namespace: name.to_owned(),
                method,
            };
            self.call_seconds.get_or_create(&labels).clone()
        });
        NamespaceMetrics {
            inner: Arc::new(NamespaceInner {
                calls,
                seconds,
                activations: self.activations.get_or_create(&namespace).clone(),
                evictions: self.evictions.get_or_create(&namespace).clone(),
                resets: self.resets.get_or_create(&namespace).clone(),
                objects_active: self.objects_active.get_or_create(&namespace).clone(),
                web_sockets_open: self.web_sockets_open.get_or_create(&namespace).clone(),
                queue_refusals: self.refusals[Bound::object_queue as usize].clone(),
                socket_refusals: self.refusals[Bound::web_sockets as usize].clone(),
            }),
        }
    }

    /// Notes a refusal for `bound`.
    pub fn refused(&self, bound: Bound) {
        self.refusals[bound as usize].inc();
    }

    /// The counters of a connection of `transport`.
    pub fn connections(&self, transport: Transport) -> ConnectionMetrics {
        let labels = TransportLabels { transport };
        ConnectionMetrics {
            received: self.received_bytes.get_or_create(&labels).clone(),
            sent: self.sent_bytes.get_or_create(&labels).clone(),
            open: self.connections_open.get_or_create(&labels).clone(),
        }
    }

    /// The storage writer's metrics.
    pub fn storage(&self) -> &StorageMetrics {
        &self.storage
    }

    /// The alarm scheduler's metrics.
    pub fn alarms(&self) -> &AlarmMetrics {
        &self.alarms
    }

    /// Every metric, as OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail, and every metric here encodes.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl StorageMetrics {
    fn register(registry: &mut Registry) -> StorageMetrics {
        let metrics = StorageMetrics {
            commits: Counter::default(),
            commit_failures: Counter::default(),
            commit_seconds: Histogram::seconds(STORAGE_NS),
            sync_seconds: Histogram::seconds(STORAGE_NS),
            commit_objects: Histogram::new(OBJECTS, 1.0),
            commit_bytes: Histogram::new(BYTES, 1.0),
        };
        let storage = registry.sub_registry_with_prefix("storage");
        storage.register(
            "commits",
            "Write transactions committed, retries included",
            metrics.commits.clone(),
        );
        storage.register(
            "commit_failures",
            "Write transactions that failed",
            metrics.commit_failures.clone(),
        );
        storage.register_with_unit(
            "commit",
            "Time of a write transaction, fsync included",
            Unit::Seconds,
            metrics.commit_seconds.clone(),
        );
        storage.register_with_unit(
            "sync",
            "Time of the backend's durable commit (LMDB: writing the pages and fsync)",
            Unit::Seconds,
            metrics.sync_seconds.clone(),
        );
        storage.register(
            "commit_objects",
            "Objects' batches per write transaction",
            metrics.commit_objects.clone(),
        );
        storage.register_with_unit(
            "commit",
            "Bytes of keys and values per write transaction",
            Unit::Bytes,
            metrics.commit_bytes.clone(),
        );
        metrics
    }

    /// Handles that count into no registry: for a writer started outside a server (tests).
    pub(crate) fn detached() -> StorageMetrics {
        StorageMetrics::register(&mut Registry::default())
    }
}

impl AlarmMetrics {
    fn register(registry: &mut Registry) -> AlarmMetrics {
        let metrics = AlarmMetrics {
            set: Counter::default(),
            fired: Counter::default(),
            retried: Counter::default(),
            given_up: Counter::default(),
            late_seconds: Histogram::seconds(LATENESS_NS),
        };
        let alarms = registry.sub_registry_with_prefix("alarms");
        alarms.register(
            "set",
            "Alarms set or moved (committed)",
            metrics.set.clone(),
        );
        alarms.register("fired", "Alarms delivered", metrics.fired.clone());
        alarms.register(
            "retried",
            "Alarm deliveries that failed, to be tried again",
            metrics.retried.clone(),
        );
        alarms.register(
            "given_up",
            "Alarms deleted after their last retry failed",
            metrics.given_up.clone(),
        );
        alarms.register_with_unit(
            "late",
            "How long after its time an alarm was delivered",
            Unit::Seconds,
            metrics.late_seconds.clone(),
        );
        metrics
    }
}

/// The metrics of one namespace, resolved once (see the module docs). Cheap to clone.
#[derive(Clone, Debug)]
pub struct NamespaceMetrics {
    inner: Arc<NamespaceInner>,
}

#[derive(Debug)]
struct NamespaceInner {
    /// By [`Method`], then [`Outcome`], in the order of their `ALL`.
    calls: [[Counter; 4]; 4],
    seconds: [Histogram; 4],
    activations: Counter,
    evictions: Counter,
    resets: Counter,
    objects_active: Gauge,
    web_sockets_open: Gauge,
    /// The server's count of refusals for `object_queue_max`.
    queue_refusals: Counter,
    /// The server's count of refusals for WebSockets.
    socket_refusals: Counter,
}

impl NamespaceMetrics {
    /// Notes a call that ended with `outcome` after `elapsed`.
    pub fn call(&self, method: Method, outcome: Outcome, elapsed: Duration) {
        let inner = &*self.inner;
        inner.calls[method as usize][outcome as usize].inc();
        inner.seconds[method as usize].observe_duration(elapsed);
    }

    /// Notes a call refused for `object_queue_max`.
    pub fn queue_refused(&self) {
        self.inner.queue_refusals.inc();
    }

    /// Notes a WebSocket refused for `sockets_per_object_max`.
    pub fn web_socket_refused(&self) {
        self.inner.socket_refusals.inc();
    }

    /// Notes an object activated.
    pub fn activated(&self) {
        self.inner.activations.inc();
    }

    /// Notes an idle object evicted.
    pub fn evicted(&self) {
        self.inner.evictions.inc();
    }

    /// Notes an object reset.
    pub fn reset(&self) {
        self.inner.resets.inc();
    }

    /// Adds `delta` to the active objects.
    pub fn add_active(&self, delta: i64) {
        self.inner.objects_active.inc_by(delta);
    }

    /// Adds `delta` to the WebSockets held.
    pub fn add_web_sockets(&self, delta: i64) {
        self.inner.web_sockets_open.inc_by(delta);
    }
}

/// The counters of one kind of connection (see [`Metrics::connections`]).
#[derive(Clone, Debug)]
pub struct ConnectionMetrics {
    received: Counter,
    sent: Counter,
    open: Gauge,
}

impl ConnectionMetrics {
    /// Counts a connection open until the guard is dropped.
    pub fn opened(&self) -> OpenConnection {
        self.open.inc();
        OpenConnection(self.open.clone())
    }

    /// `stream` (or one half of it), its bytes counted as they are read and written.
    pub fn count<S>(&self, stream: S) -> Counted<S> {
        Counted {
            inner: stream,
            received: self.received.clone(),
            sent: self.sent.clone(),
        }
    }
}

/// A connection counted open while it lives (see [`ConnectionMetrics::opened`]).
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pin_project_lite::pin_project! {
    /// A stream whose bytes read and written are counted (see [`ConnectionMetrics::count`]).
    pub struct Counted<S> {
        #[pin]
        inner: S,
        received: Counter,
        sent: Counter,
    }
}

impl<S: tokio::io::AsyncRead> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.received.inc_by(read as u64);
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(written)) = &polled {
            this.sent.inc_by(*written as u64);
        }
        polled
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(written)) = &polled {
            this.sent.inc_by(*written as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets_scaled() {
        let metrics = Metrics::new();
        let namespace = metrics.namespace("counter");
        namespace.call(Method::fetch, Outcome::ok, Duration::from_micros(70));
        namespace.call(Method::fetch, Outcome::ok, Duration::from_micros(30));
        namespace.call(Method::fetch, Outcome::failed, Duration::from_secs(20));
        let text = metrics.render();
        let line = |prefix: &str| {
            let found = text.lines().find(|line| line.starts_with(prefix));
            found
                .unwrap_or_else(|| panic!("no {prefix} in {text}"))
                .to_owned()
        };
        let bucket =
            "duro_call_seconds_bucket{le=\"0.0001\",namespace=\"counter\",method=\"fetch\"}";
        assert!(
            text.contains("# TYPE duro_call_seconds histogram"),
            "{text}"
        );
        let ok = "duro_calls_total{namespace=\"counter\",method=\"fetch\",outcome=\"ok\"}";
        assert_eq!(line(ok), format!("{ok} 2"));
        assert!(
            text.lines().any(|l| l.ends_with(" 2")
                && l.contains("le=\"0.0001\"")
                && l.contains("method=\"fetch\"")),
            "{bucket}: {text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
