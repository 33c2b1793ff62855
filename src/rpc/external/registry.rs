//! The providers of the host's external classes, per class: who registered, which one builds
//! the next instance (round robin), and what a provider that goes takes with it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::host::{Host, State};
use crate::rpc::connection::Connection;
use crate::wire::duro_capnp::{class_provider, registration};

/// How long a call to an object of an external class waits for a provider when none is
/// registered (one starting up, or taking over from one that went), before it fails with
/// `overloaded`: long enough for a provider to restart, short enough that a caller hears of
/// an outage instead of hanging.
pub const PROVIDER_WAIT: Duration = Duration::from_secs(5);

/// Most providers registered for one class at once. Each holds a capability and a slot in the
/// round robin; past it, `registerProvider` fails with `overloaded` (a provider that registers
/// again and again without releasing is a bug to hear of, not a load to serve).
pub const PROVIDERS_PER_CLASS_MAX: usize = 64;

/// The registry of one host (kept with it: [`Host::extension`]).
pub(crate) struct Registry {
    /// The host's external classes: only these take providers.
    classes: RefCell<HashMap<String, Class>>,
    /// The server's metrics, where refusals for want of a provider are counted.
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

struct Class {
    providers: Vec<Rc<Provider>>,
    /// The round robin's position.
    next: usize,
    /// Told of each registration, which the calls waiting for a provider wait on.
    arrived: Rc<Notify>,
}

/// A registered provider of a class.
pub(super) struct Provider {
    class: String,
    pub(super) client: class_provider::Client,
    /// The provider's connection: the calls of the instances it serves count against its
    /// bounds.
    pub(super) connection: Rc<Connection>,
    /// Whether its instances implement `DurableObject.request` (`registerProvider`'s
    /// `usesRequest`): requests then reach them there, with streamed bodies; else at `fetch`.
    pub(super) uses_request: bool,
    /// The objects whose instances it built, reset when it goes. Weak: an object evicted or
    /// reset meanwhile is gone from here by itself.
    objects: RefCell<Vec<Weak<Served>>>,
}

/// An object a provider serves, as the provider's registration knows it: held by the object's
/// proxy while the binding lasts.
pub(super) struct Served {
    state: State,
}

impl Served {
    pub(super) fn new(state: State) -> Rc<Served> {
        Rc::new(Served { state })
    }
}

impl Registry {
    /// Keeps a registry of the providers of `classes` with `host`.
    pub(crate) fn install(host: &Host, classes: impl IntoIterator<Item = String>) {
        let classes = classes.into_iter().map(|name| {
            let class = Class {
                providers: Vec::new(),
                next: 0,
                arrived: Rc::new(Notify::new()),
            };
            (name, class)
        });
        let registry = Registry {
            classes: RefCell::new(classes.collect()),
            metrics: host.metrics().clone(),
        };
        host.set_extension(Rc::new(registry));
    }

    /// Notes a call refused for want of a provider.
    pub(super) fn refused(&self) {
        self.metrics.refused(crate::metrics::Bound::providers);
    }

    /// The registry of `host`.
    pub(crate) fn of(host: &Host) -> Option<Rc<Registry>> {
        host.extension::<Registry>()
    }

    /// Registers `client` as a provider of `class`, serving over `connection`; the
    /// `Registration` that keeps it registered. With `uses_request`, its instances get requests
    /// at `request` (see [`Provider::uses_request`]).
    pub(crate) fn register(
        self: &Rc<Self>,
        class: &str,
        client: class_provider::Client,
        uses_request: bool,
        connection: &Rc<Connection>,
    ) -> capnp::Result<registration::Client> {
        let mut classes = self.classes.borrow_mut();
        let Some(entry) = classes.get_mut(class) else {
            return Err(capnp::Error::failed(format!(
                "no namespace is bound to the external class '{class}' (duro serve --external \
                 NAMESPACE={class})"
            )));
        };
        if entry.providers.len() >= PROVIDERS_PER_CLASS_MAX {
            self.metrics.refused(crate::metrics::Bound::providers);
            return Err(capnp::Error::overloaded(format!(
                "class '{class}' has {PROVIDERS_PER_CLASS_MAX} providers \
                 (PROVIDERS_PER_CLASS_MAX)"
            )));
        }
        let provider = Rc::new(Provider {
            class: class.to_owned(),
            client,
            connection: connection.clone(),
            uses_request,
            objects: RefCell::default(),
        });
        entry.providers.push(provider.clone());
        entry.arrived.notify_waiters();
        tracing::info!(class, "a provider registered");
        Ok(capnp_rpc::new_client(RegistrationServer {
            registry: Rc::downgrade(self),
            provider,
        }))
    }

    /// The provider of `class` that builds the next instance, round robin.
    pub(super) fn pick(&self, class: &str) -> Option<Rc<Provider>> {
        let mut classes = self.classes.borrow_mut();
        let entry = classes.get_mut(class)?;
        if entry.providers.is_empty() {
            return None;
        }
        let provider = entry.providers[entry.next % entry.providers.len()].clone();
        entry.next = entry.next.wrapping_add(1);
        Some(provider)
    }

    /// Told of each registration of a provider of `class`; `None` when `class` is not an
    /// external class of the host.
    pub(super) fn arrivals(&self, class: &str) -> Option<Rc<Notify>> {
        Some(self.classes.borrow().get(class)?.arrived.clone())
    }

    /// Takes `provider` out: no instance is asked of it any more, and the objects it serves
    /// are reset.
    fn unregister(&self, provider: &Rc<Provider>) {
        if let Some(entry) = self.classes.borrow_mut().get_mut(&provider.class) {
            entry.providers.retain(|p| !Rc::ptr_eq(p, provider));
        }
        let objects = std::mem::take(&mut *provider.objects.borrow_mut());
        let reason = format!("the provider of class '{}' went away", provider.class);
        let mut reset = 0;
        for served in objects.iter().filter_map(Weak::upgrade) {
            served.state.reset(&reason);
            reset += 1;
        }
        tracing::info!(class = provider.class, reset, "a provider unregistered");
    }
}

impl Provider {
    /// Records that the provider serves `served`'s object.
    pub(super) fn adopt(&self, served: &Rc<Served>) {
        let mut objects = self.objects.borrow_mut();
        // Forgets the objects gone since, when the list has doubled: amortized O(1), and the
        // list stays within twice the objects it serves.
        if objects.len() >= 16 && objects.len().is_power_of_two() {
            objects.retain(|object| object.strong_count() > 0);
        }
        objects.push(Rc::downgrade(served));
    }

    /// The class it provides.
    pub(super) fn class(&self) -> &str {
        &self.class
    }
}

/// A provider's `Registration`: dropped when the provider releases it or its connection is
/// lost (capnp-rpc then drops every capability the peer held), which unregisters it.
struct RegistrationServer {
    registry: Weak<Registry>,
    provider: Rc<Provider>,
}

impl registration::Server for RegistrationServer {}

impl Drop for RegistrationServer {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.unregister(&self.provider);
        }
    }
}
