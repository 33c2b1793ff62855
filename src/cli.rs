//! The client commands of the `duro` binary: `fetch`, `ids`, `ls` (to be built).

use std::process::ExitCode;

/// Where the server is.
#[derive(clap::Args, Debug, Clone)]
pub struct Connect {
    /// The server's address: HOST:PORT, or unix:PATH.
    #[arg(long, default_value = crate::server::DEFAULT_LISTEN)]
    pub connect: crate::ListenAddr,
}

/// Arguments of `duro fetch`.
#[derive(clap::Args, Debug, Clone)]
pub struct FetchArgs {}

/// Arguments of `duro ids`.
#[derive(clap::Args, Debug, Clone)]
pub struct IdsArgs {}

/// Arguments of `duro ls`.
#[derive(clap::Args, Debug, Clone)]
pub struct LsArgs {}

/// `duro fetch`.
pub fn fetch(connect: &Connect, args: &FetchArgs) -> ExitCode {
    let _ = (connect, args);
    ExitCode::FAILURE
}

/// `duro ids`.
pub fn ids(connect: &Connect, args: &IdsArgs) -> ExitCode {
    let _ = (connect, args);
    ExitCode::FAILURE
}

/// `duro ls`.
pub fn ls(connect: &Connect, args: &LsArgs) -> ExitCode {
    let _ = (connect, args);
    ExitCode::FAILURE
}
