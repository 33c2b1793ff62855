//! Bytes fed into a real server connection: `duro::rpc::serve_connection` on an in-process host
//! with the built-in classes (opened once per process), over an in-memory pipe. The input is
//! what a peer writes before it closes its side; the server must answer or refuse, never panic,
//! and end the connection once the peer has left.
#![no_main]

use std::cell::Cell;
use std::time::Duration;

use duro_fuzz::LocalHost;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The connection must end this soon after the peer closed its side.
const CONNECTION_END_MAX: Duration = Duration::from_secs(10);
/// Inputs between two evictions of idle objects (the host's own sweep is once a minute).
const EVICT_EVERY: u64 = 1000;
/// Bytes in flight in the pipe, each way.
const PIPE_BYTES: usize = 64 << 10;

thread_local! {
    static HOST: LocalHost = LocalHost::open(duro::builtin::register(duro::Server::builder()).map_bytes(1 << 30));
    static INPUTS: Cell<u64> = const { Cell::new(0) };
}

fuzz_target!(|data: &[u8]| {
    HOST.with(|local| {
        local.block_on(serve(&local.host, data));
        let inputs = INPUTS.with(|n| {
            n.set(n.get() + 1);
            n.get()
        });
        if inputs % EVICT_EVERY == 0 {
            local.host.evict_idle();
        }
    });
});

async fn serve(host: &duro::Host, data: &[u8]) {
    let (client, server) = tokio::io::duplex(PIPE_BYTES);
    let (server_reader, server_writer) = tokio::io::split(server);
    let connection = duro::rpc::serve_connection(host, &Default::default(), server_reader, server_writer);
    let connection = tokio::task::spawn_local(connection);
    let (mut client_reader, mut client_writer) = tokio::io::split(client);
    let peer = async {
        let write = async {
            let _ = client_writer.write_all(data).await;
            let _ = client_writer.shutdown().await;
        };
        let mut answers = Vec::new();
        let read = client_reader.read_to_end(&mut answers);
        let _ = futures::join!(write, read);
        let _ = connection.await;
    };
    if tokio::time::timeout(CONNECTION_END_MAX, peer)
        .await
        .is_err()
    {
        panic!("the connection did not end within {CONNECTION_END_MAX:?} of its peer leaving");
    }
}
