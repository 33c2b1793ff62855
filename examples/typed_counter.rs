//! A durable counter with a typed Cap'n Proto interface: `Counter` of
//! `examples/typed_counter.capnp`, which its stubs answer besides `fetch`.
//!
//! Run it, then call it from Rust (this example as a client: [`increment`]) or from Python:
//!
//! ```sh
//! cargo run --example typed_counter -- --data ./typed-counter-data &
//! cargo run --example typed_counter -- --increment visits --by 5   # 5
//! python3 examples/typed_client.py 127.0.0.1:7450 visits --by 2    # 7
//! ```
//!
//! A client casts the stub that `getByName` returns to `Counter` and calls `increment`: the
//! stub and the call travel in one round trip, and the answer leaves once the new value is
//! durable. The same objects answer `fetch` too (`POST` adds 1, `GET` reads), in one order
//! with the typed calls of the same stub.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use duro::client::Client;
use duro::{BoxError, Builder, DurableObject, Request, Response, State, response};
use http::{Method, StatusCode};

/// The code generated from `examples/typed_counter.capnp` (by `build.rs`).
pub mod typed_counter_capnp {
    #![allow(clippy::all, missing_docs, unused_qualifications)]
    include!(concat!(env!("OUT_DIR"), "/typed_counter_capnp.rs"));
}

use typed_counter_capnp::counter;

/// The storage key of the value.
const VALUE_KEY: &str = "value";

/// A counter: `increment(by)` and `get()` over Cap'n Proto, `POST` (adds 1) and `GET` over
/// `fetch`.
pub struct TypedCounter {
    state: State,
}

impl TypedCounter {
    /// Adds `by` to the stored value; the new value.
    async fn add(&self, by: i64) -> Result<i64, BoxError> {
        let storage = self.state.storage();
        let value = storage.get::<i64>(VALUE_KEY).await?.unwrap_or(0);
        let value = value.checked_add(by).ok_or("the counter would overflow")?;
        storage.put(VALUE_KEY, &value).await?;
        Ok(value)
    }

    async fn value(&self) -> Result<i64, BoxError> {
        Ok(self
            .state
            .storage()
            .get::<i64>(VALUE_KEY)
            .await?
            .unwrap_or(0))
    }
}

impl DurableObject for TypedCounter {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let value = match *request.method() {
            Method::GET => self.value().await?,
            Method::POST => self.add(1).await?,
            _ => {
                let allowed = "use GET or POST\n";
                return Ok(response::text(StatusCode::METHOD_NOT_ALLOWED, allowed));
            }
        };
        Ok(response::text(StatusCode::OK, format!("{value}\n")))
    }

    fn interface(self: Rc<Self>) -> Option<capnp::capability::Client> {
        Some(capnp_rpc::new_client_from_rc::<counter::Client, _>(self).client)
    }
}

impl counter::Server for TypedCounter {
    async fn increment(
        self: CapRc<Self>,
        params: counter::IncrementParams,
        mut results: counter::IncrementResults,
    ) -> capnp::Result<()> {
        let by = params.get()?.get_by();
        let value = self.add(by).await.map_err(failed)?;
        results.get().set_value(value);
        Ok(())
    }

    async fn get(
        self: CapRc<Self>,
        _: counter::GetParams,
        mut results: counter::GetResults,
    ) -> capnp::Result<()> {
        results.get().set_value(self.value().await.map_err(failed)?);
        Ok(())
    }
}

/// An error of the object's code, as its interface's methods return it.
fn failed(error: BoxError) -> capnp::Error {
    capnp::Error::failed(error.to_string())
}

/// Adds `by` to the counter `name` through `Counter.increment`; the new value.
pub async fn increment(client: &Client, name: &str, by: i64) -> Result<i64, duro::Error> {
    // `get_by_name` answers at once: the stub and the call travel in one round trip.
    let stub = client.namespace("counter").get_by_name(name);
    stub.with_capability(move |counter: counter::Client| {
        let mut call = counter.increment_request();
        call.get().set_by(by);
        let answer = call.send().promise;
        async move { Ok(answer.await?.get()?.get_value()) }
    })
    .await
}

/// Registers the class and binds the namespace `counter` to it.
pub fn register(builder: Builder) -> Builder {
    builder
        .class("typed-counter", |state, _env| TypedCounter { state })
        .namespace("counter", "typed-counter")
}

#[allow(dead_code)] // tests/examples.rs and the bench include this file for the class alone.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// A durable counter per name, with a typed interface; or, with --increment, its client.
    #[derive(clap::Parser)]
    struct Args {
        /// Cap'n Proto address: HOST:PORT or unix:PATH.
        #[arg(long, default_value = duro::DEFAULT_LISTEN)]
        listen: duro::ListenAddr,
        /// Data directory.
        #[arg(long, default_value = "typed-counter-data")]
        data: std::path::PathBuf,
        /// Instead of serving, adds --by to the counter of this name of the host at --listen
        /// and prints its new value.
        #[arg(long, value_name = "NAME")]
        increment: Option<String>,
        /// What --increment adds.
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    }
    let args = <Args as clap::Parser>::parse();
    if let Some(name) = &args.increment {
        let runtime = tokio::runtime::Runtime::new()?;
        let value = runtime.block_on(async {
            let client = Client::connect(&args.listen).await?;
            increment(&client, name, args.by).await
        })?;
        println!("{value}");
        return Ok(());
    }
    register(duro::Server::builder())
        .listen(args.listen)
        .data_dir(args.data)
        .run()?;
    Ok(())
}
