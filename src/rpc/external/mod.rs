//! External classes: classes whose instances live in a provider process, written in any
//! language that speaks Cap'n Proto (`Host.registerProvider` in `schema/duro.capnp`).
//!
//! The host stands between callers and such instances as it does for a Rust class: a
//! namespace bound to an external class (`Builder::external`) is hosted by [`External`], an
//! ordinary class to the host, whose instance asks a provider for the object's instance and
//! passes each event on to it. So one instance per ID, E-order, the input and output gates,
//! resets and bounds hold as they do for any class.
//!
//! Files, each depending only on those before it: `turns` (the order and the input gate of an
//! instance's events) → `env` (the host's namespaces as an instance sees them) → `sockets`
//! (`ObjectSocket`: one of the object's WebSockets as an instance sees it) → `context` (the
//! `ObjectContext` an instance is handed: its ID, its `Storage`, its env, its WebSockets) →
//! `registry` (the providers per class and their `Registration`s) → `respond` (the host's
//! side of `DurableObject.request`: the request body written to the instance, its
//! `ResponseContext` and streamed response body) → `proxy` ([`External`]).

mod context;
mod env;
mod proxy;
pub(crate) mod registry;
mod respond;
mod sockets;
mod turns;

pub(crate) use proxy::External;
pub use registry::{PROVIDER_WAIT, PROVIDERS_PER_CLASS_MAX};
