//! What the servers of one connection share: its bounds on calls and bytes in flight.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use crate::host::Host;
use crate::metrics::{Bound, Metrics};
use crate::wire::MESSAGE_BYTES_MAX;
use crate::wire::budget::{Account, Budget};

/// Most calls one connection may have in flight. Each holds a task and its buffers, and
/// capnp-rpc has no flow limit of its own; past it, calls fail at once with `overloaded`.
pub const CONNECTION_CALLS_MAX: usize = 4096;

/// Largest response sent back, as [`response_bytes`](crate::wire::convert::response_bytes) counts it (body, headers and
/// all): a bigger message would be refused by the peer's reader (and take the whole
/// connection down with it), so the call fails alone instead.
pub const RESPONSE_BYTES_MAX: usize = MESSAGE_BYTES_MAX - (64 << 10);

/// What the servers of one connection share.
pub(crate) struct Connection {
    /// Most calls in flight: [`CONNECTION_CALLS_MAX`], but none for a link between shards,
    /// whose calls were admitted on the connections they came from.
    calls_max: usize,
    /// A link from another shard of the server.
    pub(super) peer: bool,
    /// Calls of this connection that have not answered yet.
    pub(super) in_flight: Cell<usize>,
    /// WebSockets started on this connection and not yet closed by the peer: a connection
    /// with one waits for messages, so its silence is not idleness.
    pub(super) sockets: Cell<usize>,
    /// The connection's bytes in flight, in the host's budget.
    pub(super) account: Rc<Account>,
    /// The server's metrics, where refusals are counted: `None` for what is no client's
    /// connection (a link between shards, a stub made a capability).
    metrics: Option<Arc<Metrics>>,
}

impl Connection {
    pub(super) fn open(host: &Host) -> Rc<Connection> {
        let metrics = Some(host.metrics().clone());
        Connection::with_budget(host.budget(), CONNECTION_CALLS_MAX, false, metrics)
    }

    /// The bounds of a capability that belongs to no connection (a stub an object made into
    /// a capability): its calls in flight are bounded as a connection's are, and their bytes
    /// are counted in a budget of its own, outside the host's, which bounds what peers make
    /// the host hold, not what its objects hold already.
    pub(super) fn detached() -> Rc<Connection> {
        Connection::with_budget(&Budget::new(usize::MAX), CONNECTION_CALLS_MAX, false, None)
    }

    /// The bounds of a link from another shard of the server: none of its own.
    pub(super) fn peer() -> Rc<Connection> {
        Connection::with_budget(&Budget::new(usize::MAX), usize::MAX, true, None)
    }

    fn with_budget(
        budget: &Rc<Budget>,
        calls_max: usize,
        peer: bool,
        metrics: Option<Arc<Metrics>>,
    ) -> Rc<Connection> {
        Rc::new(Connection {
            calls_max,
            peer,
            in_flight: Cell::new(0),
            sockets: Cell::new(0),
            account: Account::open(budget),
            metrics,
        })
    }
}

/// Counts a call of a connection, and the bytes of its request, while it lives.
pub(super) struct InFlight {
    connection: Rc<Connection>,
    bytes: usize,
}

impl InFlight {
    /// Admits a call whose request takes `bytes`, within the connection's bounds on calls and
    /// on bytes in flight, and the host's budget.
    pub(super) fn admit(
        connection: &Rc<Connection>,
        bytes: usize,
    ) -> Result<InFlight, capnp::Error> {
        let count = connection.in_flight.get();
        if count >= connection.calls_max {
            connection.refused(Bound::connection_calls);
            return Err(capnp::Error::overloaded(format!(
                "the connection has {count} calls in flight (CONNECTION_CALLS_MAX)"
            )));
        }
        if !connection.account.try_hold(bytes) {
            connection.refused(Bound::inflight_bytes);
            return Err(capnp::Error::overloaded(format!(
                "the connection has {} bytes in flight, and a call of {bytes} more would pass its \
                 share of the host's budget (inflight_bytes_max)",
                connection.account.in_flight()
            )));
        }
        connection.in_flight.set(count + 1);
        Ok(InFlight {
            connection: connection.clone(),
            bytes,
        })
    }
}

impl Connection {
    fn refused(&self, bound: Bound) {
        if let Some(metrics) = &self.metrics {
            metrics.refused(bound);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let connection = &self.connection;
        connection.in_flight.set(connection.in_flight.get() - 1);
        connection.account.release(self.bytes);
    }
}
