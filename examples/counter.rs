//! A durable counter: one counter per object name, kept in the object's storage.
//!
//! Run it, with the HTTP gateway on:
//!
//! ```sh
//! cargo run --example counter -- --http 127.0.0.1:8787 --data ./counter-data
//! curl -X POST http://127.0.0.1:8787/counter/visits      # 1
//! curl -X POST http://127.0.0.1:8787/counter/visits      # 2
//! curl http://127.0.0.1:8787/counter/visits              # 2
//! curl -X DELETE http://127.0.0.1:8787/counter/visits    # 0
//! ```
//!
//! Stop it with Ctrl-C and start it again on the same `--data`: the counts are still there,
//! since an answer leaves the object only once the write behind it is durable. Cap'n Proto
//! clients reach the same objects on `--listen` (namespace `counter`, `getByName`).

use duro::{BoxError, Builder, DurableObject, Request, Response, State, response};
use http::{Method, StatusCode};

/// The storage key of the count.
const COUNT_KEY: &str = "count";

/// A counter: `POST` adds one, `GET` reads, `DELETE` resets; each answers the count.
pub struct Counter {
    state: State,
}

impl DurableObject for Counter {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        let count = storage.get::<u64>(COUNT_KEY).await?.unwrap_or(0);
        let count = match *request.method() {
            Method::GET => count,
            Method::POST => {
                storage.put(COUNT_KEY, &(count + 1)).await?;
                count + 1
            }
            Method::DELETE => {
                storage.delete(COUNT_KEY).await?;
                0
            }
            _ => {
                let allowed = "use GET, POST or DELETE\n";
                return Ok(response::text(StatusCode::METHOD_NOT_ALLOWED, allowed));
            }
        };
        Ok(response::text(StatusCode::OK, format!("{count}\n")))
    }
}

/// Registers the class and binds the namespace `counter` to it.
pub fn register(builder: Builder) -> Builder {
    builder
        .class("counter", |state, _env| Counter { state })
        .namespace("counter", "counter")
}

#[allow(dead_code)] // tests/examples.rs includes this file for the class alone.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// A durable counter per name.
    #[derive(clap::Parser)]
    struct Args {
        /// Cap'n Proto address: HOST:PORT or unix:PATH.
        #[arg(long, default_value = duro::DEFAULT_LISTEN)]
        listen: duro::ListenAddr,
        /// HTTP gateway address.
        #[arg(long, default_value = "127.0.0.1:8787")]
        http: std::net::SocketAddr,
        /// Data directory.
        #[arg(long, default_value = "counter-data")]
        data: std::path::PathBuf,
    }
    let args = <Args as clap::Parser>::parse();
    register(duro::Server::builder())
        .listen(args.listen)
        .http(args.http)
        .data_dir(args.data)
        .run()?;
    Ok(())
}
