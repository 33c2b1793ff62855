//! Bytes as a peer sends them, read as the server reads them: capnp-futures' message reader
//! (which capnp-rpc's two-party network uses) with duro's reader options, then the root read
//! as an RPC message and as every struct of duro's schema, walking every field, and converted
//! with `request_from_capnp` / `response_from_capnp`.
//!
//! A segment table costs the reader an allocation of the size it declares (up to
//! `MESSAGE_BYTES_MAX`, zeroed) before any segment is read: such inputs take milliseconds each,
//! and set the pace of this target.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Messages read from one input: a connection reads them one after another.
const MESSAGES_MAX: usize = 4;

fuzz_target!(|data: &[u8]| {
    let options = duro::wire::reader_options();
    let mut input = data;
    for _ in 0..MESSAGES_MAX {
        let read = capnp_futures::serialize::try_read_message(&mut input, options);
        match futures::executor::block_on(read) {
            Ok(Some(message)) => _ = duro_fuzz::walk_message(&message),
            _ => break,
        }
    }
});
