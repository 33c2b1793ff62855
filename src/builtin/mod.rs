//! Built-in classes, each bound by `duro serve` to a namespace of the same name. They are also
//! short examples of classes.

pub mod counter;
pub mod echo;
pub mod kv;
pub mod room;
pub mod tally;
pub mod timer;

use crate::server::Builder;

/// Registers the built-in classes on `builder`, each bound to a namespace of the same name:
/// `echo`, `counter`, `kv`, `timer`, `room` and `tally`. This is what `duro serve` hosts.
///
/// ```
/// let builder = duro::builtin::register(duro::Server::builder());
/// # drop(builder);
/// ```
pub fn register(builder: Builder) -> Builder {
    builder
        .class("echo", |_state, _env| echo::Echo)
        .namespace("echo", "echo")
        .class("counter", |state, _env| counter::Counter::new(state))
        .namespace("counter", "counter")
        .class("kv", |state, _env| kv::Kv::new(state))
        .namespace("kv", "kv")
        .class("timer", |state, _env| timer::Timer::new(state))
        .namespace("timer", "timer")
        .class("room", |state, _env| room::Room::new(state))
        .namespace("room", "room")
        .class("tally", |state, _env| tally::Tally::new(state))
        .namespace("tally", "tally")
}
