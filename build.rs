//! Compiles the Cap'n Proto schemas into Rust, into `OUT_DIR`: `schema/duro.capnp` (the wire
//! contract, the library's), `examples/typed_counter.capnp` (the interface of the typed counter
//! example, which the example, its tests and the bench include) and `tests/typed.capnp` (the
//! interface of the typed calls' tests). A file that includes generated code must make its
//! module reachable from its crate's root under the file's name (`crate::typed_counter_capnp`),
//! as generated code names its own types from there.
//!
//! The schema compiler runs embedded (`capnpc-embedded`), so building duro needs no system `capnp`.

/// The schemas, each with the directory it is named from (its `src_prefix`).
const SCHEMAS: &[(&str, &str)] = &[
    ("schema/duro.capnp", "schema"),
    ("examples/typed_counter.capnp", "examples"),
    ("tests/typed.capnp", "tests"),
];

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo");
    for (file, prefix) in SCHEMAS {
        println!("cargo:rerun-if-changed={file}");
        // `import "/duro.capnp"` finds the wire contract.
        let request = capnpc_embedded::CompileCommand::new()
            .file(file)
            .src_prefix(prefix)
            .import_path("schema")
            .compile()
            .unwrap_or_else(|e| panic!("compiling {file}: {e}"));
        capnpc::codegen::CodeGenerationCommand::new()
            .output_directory(&out_dir)
            .run(&request[..])
            .unwrap_or_else(|e| panic!("generating Rust code for {file}: {e}"));
    }
}
