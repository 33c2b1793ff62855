//! Adds 1 to a built-in `counter` object with the Rust client and prints its new value.
//!
//! ```sh
//! duro serve &
//! cargo run --example client -- --connect 127.0.0.1:7450 visits
//! ```

use std::process::ExitCode;

use clap::Parser;
use duro::client::Client;

/// Adds 1 to a counter of a duro host and prints its new value.
#[derive(Parser)]
struct Args {
    /// The host's address: HOST:PORT, or unix:PATH.
    #[arg(long, default_value = duro::DEFAULT_LISTEN)]
    connect: String,
    /// The counter's name.
    #[arg(default_value = "example")]
    name: String,
}

/// An error of any kind, to print.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Adds 1 to the counter `name` of the host at `connect`, and returns its new value.
pub async fn increment(connect: &str, name: &str) -> Result<u64, BoxError> {
    let client = Client::connect(connect).await?;
    // `get_by_name` answers at once, so the stub and the call travel in one round trip.
    let stub = client.namespace("counter").get_by_name(name);
    let response = stub.call("POST", "/", "").await?;
    if !response.status().is_success() {
        return Err(format!("the counter answered {}", response.status()).into());
    }
    Ok(std::str::from_utf8(response.body())?.trim().parse()?)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match increment(&args.connect, &args.name).await {
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
