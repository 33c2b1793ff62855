pub mod duro_capnp {
    include!(concat!(env!("OUT_DIR"), "/duro_capnp.rs"));
}
