//! Compiles `schema/duro.capnp` into Rust.
//!
//! The schema compiler runs embedded (`capnpc-embedded`), so building duro needs no system `capnp`.

fn main() {
    println!("cargo:rerun-if-changed=schema/duro.capnp");
    let request = capnpc_embedded::CompileCommand::new()
        .file("schema/duro.capnp")
        .src_prefix("schema")
        .compile()
        .expect("compiling schema/duro.capnp");
    capnpc::codegen::CodeGenerationCommand::new()
        .output_directory(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"))
        .run(&request[..])
        .expect("generating Rust code for schema/duro.capnp");
}
