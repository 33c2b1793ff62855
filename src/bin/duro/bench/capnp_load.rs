//! Cap'n Proto clients for the load generator, and the `echo-baseline` server: a bare
//! `DurableObject` capability that copies the request body into the response, with no host,
//! object, gate or storage behind it. It is served on a thread of its own over real loopback
//! TCP with duro's transport settings (TCP_NODELAY, `duro::rpc::reader_options()`), so it
//! measures what capnp-rpc itself costs. Started corked ([`EchoBaseline::start_corked`]), its
//! answers leave through duro's server writer (`duro::wire::cork`), which gathers the answers
//! of one turn of the event loop into one send where capnp-rpc makes one per answer: the same
//! echo with duro's transport, to tell what duro's server gains from its writer from what its
//! host costs per call.

use std::future::{Future, ready};
use std::net::SocketAddr;
use std::thread::JoinHandle;

use capnp::capability::{FromClientHook, Rc};
use capnp_rpc::rpc_twoparty_capnp::Side;
use tokio::sync::oneshot;

use duro::duro_capnp::{durable_object, host, namespace};

/// The request body of every fetch workload (and so the body echo-baseline sends back): small,
/// like a counter call, but not empty, so the body path is exercised.
pub const PAYLOAD: &[u8] = b"0123456789abcdef";

/// The generator's and the echo baseline's buffers, each way: 64 KiB, so that the generator
/// (64 calls in flight on one connection) is not the bound. With 8 KiB the echo baseline at 64
/// in flight measured half of what it does with these.
const IO_BUFFERS: duro::wire::Buffers = duro::wire::Buffers {
    read_bytes: 64 << 10,
    write_bytes: 64 << 10,
};

/// Connects over TCP (TCP_NODELAY) and returns the peer's bootstrap capability. The connection
/// is driven by a local task: call inside a `LocalSet`.
///
/// The connection is set up by duro's one connection setup (`duro::wire::rpc_system_buffered`,
/// duro's reader bounds) with [`IO_BUFFERS`]: a capnp message written unbuffered costs two
/// `send`s (segment table, then segment) and read unbuffered two `recv`s, which would make the
/// generator, not the server, the bound.
pub async fn connect<C: FromClientHook>(addr: SocketAddr) -> Result<C, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (reader, writer) = stream.into_split();
    let mut rpc = duro::wire::rpc_system_buffered(reader, writer, Side::Client, None, IO_BUFFERS);
    let bootstrap: C = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    Ok(bootstrap)
}

/// `host.namespace(name)`, pipelined: usable at once.
pub fn namespace(host: &host::Client, name: &str) -> namespace::Client {
    let mut request = host.namespace_request();
    request.get().set_name(name);
    request.send().pipeline.get_namespace()
}

/// `namespace.getByName(name)`, pipelined: usable at once, and a call on it right away costs
/// one round trip in all.
pub fn stub(namespace: &namespace::Client, name: &str) -> durable_object::Client {
    let mut request = namespace.get_by_name_request();
    request.get().set_name(name);
    let pipeline = request.send().pipeline;
    // Resolved once the call returns, as a C++ or Python client's would be.
    duro::wire::resolving(pipeline.get_stub(), pipeline)
}

/// Sends a fetch on `stub` now (it takes its place in E-order at once) and resolves when the
/// answer arrives, with an error unless its status is one of `ok`.
pub fn fetch(
    stub: &durable_object::Client,
    method: &str,
    url: &str,
    body: &[u8],
    ok: &'static [u16],
) -> impl Future<Output = Result<(), String>> + use<> {
    let mut call = stub.fetch_request();
    {
        let mut request = call.get().init_request();
        request.set_method(method);
        request.set_url(url);
        request.set_body(body);
    }
    let promise = call.send().promise;
    async move {
        let reply = promise.await.map_err(|e| e.to_string())?;
        let status = reply
            .get()
            .and_then(|r| r.get_response())
            .map_err(|e| e.to_string())?
            .get_status();
        if ok.contains(&status) {
            Ok(())
        } else {
            Err(format!("answered HTTP {status}"))
        }
    }
}

/// `namespace.fetchByName(name, request)`, sent now: one call, holding no stub; resolves as
/// [`fetch`].
pub fn fetch_by_name(
    namespace: &namespace::Client,
    name: &str,
    method: &str,
    url: &str,
    body: &[u8],
    ok: &'static [u16],
) -> impl Future<Output = Result<(), String>> + use<> {
    let mut call = namespace.fetch_by_name_request();
    call.get().set_name(name);
    {
        let mut request = call.get().init_request();
        request.set_method(method);
        request.set_url(url);
        request.set_body(body);
    }
    let promise = call.send().promise;
    async move {
        let reply = promise.await.map_err(|e| e.to_string())?;
        let status = reply
            .get()
            .and_then(|r| r.get_response())
            .map_err(|e| e.to_string())?
            .get_status();
        if ok.contains(&status) {
            Ok(())
        } else {
            Err(format!("answered HTTP {status}"))
        }
    }
}

/// Sends a fetch on `stub` now and resolves with the answer's body, or an error unless its
/// status is 200.
pub fn fetch_body(
    stub: &durable_object::Client,
    method: &str,
    url: &str,
) -> impl Future<Output = Result<Vec<u8>, String>> + use<> {
    let mut call = stub.fetch_request();
    {
        let mut request = call.get().init_request();
        request.set_method(method);
        request.set_url(url);
    }
    let promise = call.send().promise;
    async move {
        let reply = promise.await.map_err(|e| e.to_string())?;
        let response = reply
            .get()
            .and_then(|r| r.get_response())
            .map_err(|e| e.to_string())?;
        match response.get_status() {
            200 => Ok(response.get_body().map_err(|e| e.to_string())?.to_vec()),
            status => Err(format!("answered HTTP {status}")),
        }
    }
}

/// The bare server: fetch copies the request body into a 200 response with one header, as
/// small as the counter's answers.
struct EchoServer;

impl durable_object::Server for EchoServer {
    fn fetch(
        self: Rc<Self>,
        params: durable_object::FetchParams,
        mut results: durable_object::FetchResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let body = params.get()?.get_request()?.get_body()?;
            let mut response = results.get().init_response();
            response.set_status(200);
            response.set_status_text("OK");
            let mut header = response.reborrow().init_headers(1).get(0);
            header.set_name("content-type");
            header.set_value("text/plain; charset=utf-8");
            response.set_body(body);
            Ok(())
        })())
    }
}

/// The echo-baseline server on its own thread; stopped and joined on drop.
pub struct EchoBaseline {
    pub addr: SocketAddr,
    /// The serving thread's ID, to read its CPU time.
    pub tid: i64,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoBaseline {
    /// Starts the server on 127.0.0.1, port 0, with buffered reads and writes as duro's
    /// connections have.
    pub fn start() -> Result<EchoBaseline, String> {
        EchoBaseline::start_with(false)
    }

    /// [`EchoBaseline::start`] with corked writes, as duro's server connections write.
    pub fn start_corked() -> Result<EchoBaseline, String> {
        EchoBaseline::start_with(true)
    }

    fn start_with(corked: bool) -> Result<EchoBaseline, String> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("echo-baseline".into())
            .spawn(move || serve_echo(ready_tx, stopped, corked))
            .map_err(|e| format!("starting the echo-baseline thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok((addr, tid))) => Ok(EchoBaseline {
                addr,
                tid,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err("the echo-baseline thread died".into()),
        }
    }
}

impl Drop for EchoBaseline {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type Ready = std::sync::mpsc::Sender<Result<(SocketAddr, i64), String>>;

fn serve_echo(ready: Ready, stopped: oneshot::Receiver<()>, corked: bool) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return drop(ready.send(Err(format!("tokio runtime: {e}")))),
    };
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(e) => return drop(ready.send(Err(format!("binding: {e}")))),
        };
        let addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(e) => return drop(ready.send(Err(format!("local address: {e}")))),
        };
        let _ = ready.send(Ok((addr, super::child::current_tid())));
        let accept = async {
            // Bounded by the workloads: a few connections per run; each ends with its client.
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let (reader, writer) = stream.into_split();
                spawn_echo_connection(reader, writer, corked);
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = stopped => {}
        }
    });
}

/// An echo connection: duro's connection setup with the generator's buffers (as the baseline
/// always had), without duro's framing reader and budget, which count as duro's cost per call;
/// `corked`, with duro's server writer.
fn spawn_echo_connection<R, W>(reader: R, writer: W, corked: bool)
where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    let echo: durable_object::Client = capnp_rpc::new_client(EchoServer);
    let bootstrap = Some(echo.client);
    if corked {
        let (rpc, flusher) =
            duro::wire::rpc_system_corked(reader, writer, Side::Server, bootstrap, IO_BUFFERS);
        tokio::task::spawn_local(rpc);
        tokio::task::spawn_local(flusher);
        return;
    }
    let rpc = duro::wire::rpc_system_buffered(reader, writer, Side::Server, bootstrap, IO_BUFFERS);
    tokio::task::spawn_local(rpc);
}
