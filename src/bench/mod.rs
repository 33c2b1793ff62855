//! `duro bench`: measures duro against its limits and a peer (to be built).

use std::process::ExitCode;

/// Arguments of `duro bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {}

/// Runs the benchmarks.
pub fn run(args: &BenchArgs) -> ExitCode {
    let _ = args;
    ExitCode::FAILURE
}
