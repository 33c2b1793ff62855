//! duro hosts Durable Objects: single-instance stateful objects, addressed by ID inside
//! namespaces, each with a transactional key-value storage beside it, reached through Cap'n
//! Proto capabilities.
//!
//! What a class author uses: [`DurableObject`], [`State`] and its [`Storage`], [`Env`] with its
//! [`Namespace`]s and [`Stub`]s ([`rpc::stub_capability`] makes a stub a capability to pass in
//! a call of a typed interface), the [`response`] helpers, and a [`Server`] [`Builder`] to host
//! the classes. What a client uses: [`client::Client`] (or any Cap'n Proto client of
//! [`duro_capnp`], the wire contract). What a test uses: `testing` (feature `testing`).
//!
//! The path of a request: `wire` (the contract, one connection setup) → `rpc` (the capnp
//! servers) → `host` (activations, input gate, E-order) → the object's class → [`storage`]
//! (cache, output gate, group commit, LMDB). Each module depends only on those below it; the
//! README's "Layout" section draws the layers.

// Leaves: no dependency inside the crate (but on other leaves).
mod auth;
pub mod body;
mod clock;
mod error;
mod gate;
pub mod id;
mod message;
mod metrics;
pub mod response;
pub mod tls;
mod trace;
pub mod wire;
// Storage, then the host on top of it.
mod host;
pub mod storage;
// The faces of the host, and what assembles them.
mod admin;
pub mod cluster;
pub mod gateway;
pub mod rpc;
mod server;
mod shards;
// Above the server: the built-in classes and their registration, the client, the test harness.
pub mod builtin;
pub mod client;
#[cfg(feature = "testing")]
pub mod testing;

pub use body::{Body, BodySender};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::Error;
pub use gateway::GatewayOptions;
pub use host::{
    AlarmInfo, DurableObject, Env, Host, HostLimits, Namespace, SHUTDOWN_GRACE, SocketLimits,
    StartError, State, Stub, WHOLE_RESPONSE_BYTES_MAX, WebSocket, WebSocketMessage,
};
pub use id::ObjectId;
pub use message::{BoxError, Request, Response, StreamRequest, StreamResponse};
pub use server::{
    Builder, CONNECTIONS_MAX, DEFAULT_ADMIN, DEFAULT_HTTP, DEFAULT_LISTEN, Server, ServerHandle,
};
pub use storage::{ListOptions, Storage, Transaction};
pub use wire::frame::FrameLimits;
pub use wire::{ListenAddr, duro_capnp};
