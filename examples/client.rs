//! Adds 1 to a built-in `counter` object with the Rust client and prints its new value.
//!
//! ```sh
//! duro serve &
//! cargo run --example client -- --connect 127.0.0.1:7450 visits
//! ```
//!
//! Over TLS, to `duro serve --tls-cert cert.pem --tls-key key.pem`, trusting the CA in ca.pem:
//! `cargo run --example client -- --connect 127.0.0.1:7450 --tls-ca ca.pem visits`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use duro::client::{Client, ClientTls};

/// Adds 1 to a counter of a duro host and prints its new value.
#[derive(Parser)]
struct Args {
    /// The host's address: HOST:PORT, or unix:PATH.
    #[arg(long, default_value = duro::DEFAULT_LISTEN)]
    connect: String,
    /// Connect over TLS, trusting the CA certificate of this PEM file.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// The counter's name.
    #[arg(default_value = "example")]
    name: String,
}

/// An error of any kind, to print.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to the host at `connect`; over TLS when `tls_ca` names the PEM file of the CA that
/// signed the host's certificate.
pub async fn connect(connect: &str, tls_ca: Option<&Path>) -> Result<Client, BoxError> {
    let Some(ca) = tls_ca else {
        return Ok(Client::connect(connect).await?);
    };
    // `ClientTls::new()` would trust the public CAs instead; `.server_name(..)` checks the
    // certificate against a DNS name rather than the address connected to.
    let tls = ClientTls::with_ca_pem(ca)?;
    Ok(Client::connect_tls(connect, tls).await?)
}

/// Adds 1 to the counter `name` of the host, and returns its new value.
pub async fn increment(client: &Client, name: &str) -> Result<u64, BoxError> {
    // `get_by_name` answers at once, so the stub and the call travel in one round trip.
    let stub = client.namespace("counter").get_by_name(name);
    let response = stub.call("POST", "/", "").await?;
    if !response.status().is_success() {
        return Err(format!("the counter answered {}", response.status()).into());
    }
    Ok(std::str::from_utf8(response.body())?.trim().parse()?)
}

async fn run(args: &Args) -> Result<u64, BoxError> {
    let client = connect(&args.connect, args.tls_ca.as_deref()).await?;
    increment(&client, &args.name).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("client: {error}");
            ExitCode::FAILURE
        }
    }
}
