//! A flood: clients hammer one slow object far past the per-object queue and the
//! per-connection call bound for a few seconds. Calls that fail, fail with `overloaded`; memory
//! stays bounded; afterwards normal calls succeed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use duro::testing::{TestServer, connect, fetch_by_name, fetch_call, request, run_local};
use duro::{BoxError, DurableObject, Error, Request, Response, Server, State};

mod common;
use common::rss_kib;

/// A durable counter that takes its time: each call holds the input gate for 1 ms, so calls
/// arrive far faster than it serves them.
struct Slow {
    state: State,
}

impl DurableObject for Slow {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage().clone();
        let n = self
            .state
            .block_concurrency_while(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let n = storage.get::<u64>("n").await?.unwrap_or(0) + 1;
                storage.put("n", &n).await?;
                Ok::<_, duro::storage::Error>(n)
            })
            .await?;
        Ok(Response::new(n.to_string().into()))
    }
}

/// Connections flooding at once, and calls each keeps outstanding (past CONNECTION_CALLS_MAX).
const CONNECTIONS: usize = 6;
const OUTSTANDING: usize = 5000;
/// How long the flood lasts, and the most calls it sends in all.
const FLOOD: Duration = Duration::from_secs(3);
const CALLS_MAX: usize = 2_000_000;
/// The server's resident memory must stay under this during the flood.
const RSS_KIB_MAX: u64 = 512 * 1024;

#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    overloaded: usize,
    other: Vec<Error>,
}

async fn flood(addr: std::net::SocketAddr, deadline: Instant) -> Tally {
    let host = connect(addr).await.unwrap();
    let mut ns = host.namespace_request();
    ns.get().set_name("slow");
    let mut get = ns.send().pipeline.get_namespace().get_by_name_request();
    get.get().set_name("hot");
    let stub = get.send().pipeline.get_stub();
    let mut tally = Tally::default();
    let mut pending = FuturesUnordered::new();
    let mut sent = 0;
    loop {
        while Instant::now() < deadline
            && pending.len() < OUTSTANDING
            && sent < CALLS_MAX / CONNECTIONS
        {
            pending.push(fetch_call(&stub, &request("POST", "/", b"")).promise);
            sent += 1;
        }
        let Some(result) = pending.next().await else {
            break;
        };
        match result.map_err(Error::from) {
            Ok(_) => tally.ok += 1,
            Err(Error::Overloaded(_)) => tally.overloaded += 1,
            Err(other) => tally.other.push(other),
        }
    }
    tally
}

#[test]
fn a_flood_is_refused_with_overloaded_and_the_server_recovers() {
    let builder = duro::builtin::register(Server::builder())
        .class("slow", |state, _| Slow { state })
        .namespace("slow", "slow");
    let server = TestServer::start(builder);
    // The server runs in this process; its memory is most of the process's.
    let pid = std::process::id();
    let rss_before = rss_kib(pid);
    run_local(async {
        let deadline = Instant::now() + FLOOD;
        let floods: Vec<_> = (0..CONNECTIONS)
            .map(|_| tokio::task::spawn_local(flood(server.addr(), deadline)))
            .collect();
        let mut rss_max = 0;
        while Instant::now() < deadline {
            rss_max = rss_max.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut total = Tally::default();
        for flood in floods {
            let tally = flood.await.unwrap();
            total.ok += tally.ok;
            total.overloaded += tally.overloaded;
            total.other.extend(tally.other);
        }
        rss_max = rss_max.max(rss_kib(pid));
        println!(
            "flood: {} ok, {} overloaded, RSS {} KiB before, {} KiB at most",
            total.ok, total.overloaded, rss_before, rss_max
        );
        assert!(
            total.other.is_empty(),
            "calls failed otherwise than overloaded: {:?}",
            &total.other[..total.other.len().min(5)]
        );
        assert!(total.overloaded > 0, "the flood never reached a bound");
        assert!(total.ok > 0, "the object served nothing during the flood");
        assert!(rss_max < RSS_KIB_MAX, "the server grew to {rss_max} KiB");
        // Afterwards: normal calls succeed, and every acknowledged increment is there.
        let host = connect(server.addr()).await.unwrap();
        let started = Instant::now();
        let next = fetch_by_name(&host, "slow", "hot", "POST", "/", b"")
            .await
            .unwrap();
        let value: usize = std::str::from_utf8(next.body())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(value > total.ok, "{value} <= {} acknowledged", total.ok);
        let other = fetch_by_name(&host, "counter", "fresh", "POST", "/", b"")
            .await
            .unwrap();
        assert_eq!(other.body().as_ref(), b"1\n");
        println!("after the flood: two calls took {:?}", started.elapsed());
    });
}
