//! duro hosts Durable Objects: single-instance stateful objects, addressed by ID inside
//! namespaces, each with a transactional key-value storage beside it, reached through Cap'n
//! Proto capabilities.
//!
//! The path of a request: [`rpc`] (the wire) → [`host`] (activations, input gate, E-order) →
//! the object's class ([`DurableObject`]) → [`storage`] (cache, output gate, group commit, LMDB).

pub mod duro_capnp {
    //! Code generated from `schema/duro.capnp`, the wire contract.
    #![allow(clippy::all, missing_docs, unused_qualifications)]
    include!(concat!(env!("OUT_DIR"), "/duro_capnp.rs"));
}

pub mod bench;
pub mod builtin;
mod class;
pub mod cli;
pub mod client;
mod error;
pub mod gateway;
pub mod host;
pub mod id;
pub mod rpc;
pub mod server;
pub mod storage;
pub mod testing;

pub use class::{BoxError, DurableObject, Env, Request, Response, State};
pub use error::Error;
pub use host::{Host, HostLimits, Namespace, StartError, Stub};
pub use id::ObjectId;
pub use server::{Builder, ListenAddr, Server, ServerHandle};
pub use storage::{ListOptions, Storage, Transaction};
