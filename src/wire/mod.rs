//! The wire: the generated Cap'n Proto contract, HTTP messages in their capnp form, addresses,
//! and the one setup of a capnp connection that the server, the client, the test harness and
//! the bench share. A leaf: it knows nothing of hosts or storage.

pub mod budget;
pub mod convert;
pub mod cork;
pub mod frame;
pub(crate) mod stream;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

pub mod duro_capnp {
    //! Code generated from `schema/duro.capnp`, the wire contract.
    #![allow(clippy::all, missing_docs, unused_qualifications)]
    include!(concat!(env!("OUT_DIR"), "/duro_capnp.rs"));
}

/// Largest message accepted from a peer: far below capnp's 64 MiB default, and above the
/// largest body a request should carry.
pub const MESSAGE_BYTES_MAX: usize = 8 << 20;

/// Largest piece of a body that the host and the client put in one `ByteStream.write`: a
/// larger chunk goes as several writes. capnp's flow control lets a stream have about 64 KiB
/// in flight plus its largest message, so pieces of this size keep two writes in flight
/// while either side holds little; and each is far below [`MESSAGE_BYTES_MAX`].
pub const STREAM_WRITE_BYTES: usize = 64 << 10;

/// Reader options for every connection: the message size bound, and capnp's nesting bound.
pub fn reader_options() -> capnp::message::ReaderOptions {
    let mut options = capnp::message::ReaderOptions::new();
    options.traversal_limit_in_words(Some(MESSAGE_BYTES_MAX / 8));
    options.nesting_limit(64);
    options
}

/// Where a host listens, and where a client connects: a TCP address, or a unix socket
/// (`unix:/path`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<ListenAddr, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        text.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("invalid address {text:?}: expected HOST:PORT or unix:PATH"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The RPC system of one two-party connection, buffered and bounded: the only place a capnp
/// connection is set up. capnp writes a message as a segment table and then each segment, and
/// flushes after each message, so the buffers turn two or more syscalls per message into one;
/// [`reader_options`] bounds what a peer can make this side read. `bootstrap` is what this side
/// offers the peer (the server's `Host`; `None` for a client).
pub fn rpc_system<R, W>(
    reader: R,
    writer: W,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
) -> RpcSystem<Side>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    rpc_system_buffered(reader, writer, side, bootstrap, Buffers::default())
}

/// The buffer sizes of a connection (see [`rpc_system_buffered`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    /// Read buffer; 0 for none, when the reader buffers already (the server's framing reader).
    pub read_bytes: usize,
    /// Write buffer.
    pub write_bytes: usize,
}

impl Default for Buffers {
    /// 8 KiB each way: a few messages a syscall, and little memory per idle connection.
    fn default() -> Buffers {
        Buffers {
            read_bytes: 8 << 10,
            write_bytes: 8 << 10,
        }
    }
}

/// `capability`, taken from `pipeline` (a call's results, pipelined: usable at once), made to
/// resolve to the capability itself once the call returned. capnp-rpc resolves a pipelined
/// capability only while its pipeline lives; `pipeline.get_x()` alone keeps addressing every
/// later call through the call's answer, which the server then looks up and reads again for
/// each call. Held in a task of the event loop until the capability resolved (or failed).
pub fn resolving<T, P>(capability: T, pipeline: P) -> T
where
    T: capnp::capability::FromClientHook,
    P: 'static,
{
    let resolved = capnp::capability::Client::new(capability.as_client_hook().add_ref());
    let resolved = resolved.when_resolved();
    tokio::task::spawn_local(async move {
        let _ = resolved.await;
        drop(pipeline);
    });
    capability
}

/// [`rpc_system`] with the buffer sizes given: larger ones suit a client that pipelines many
/// calls (a load generator), none suits a reader that buffers itself.
pub fn rpc_system_buffered<R, W>(
    reader: R,
    writer: W,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
    buffers: Buffers,
) -> RpcSystem<Side>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let writer = futures::io::BufWriter::with_capacity(buffers.write_bytes, writer.compat_write());
    if buffers.read_bytes == 0 {
        let network = twoparty::VatNetwork::new(reader.compat(), writer, side, reader_options());
        return RpcSystem::new(Box::new(network), bootstrap);
    }
    let reader = futures::io::BufReader::with_capacity(buffers.read_bytes, reader.compat());
    let network = twoparty::VatNetwork::new(reader, writer, side, reader_options());
    RpcSystem::new(Box::new(network), bootstrap)
}

/// [`rpc_system_buffered`] with its writes corked (see [`cork`]): the messages of one turn of
/// the event loop leave in one write. The [`cork::Flusher`] must run beside the RPC system (it
/// writes what is due); it ends once the system is gone and its bytes are written.
pub fn rpc_system_corked<R, W>(
    reader: R,
    writer: W,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
    buffers: Buffers,
) -> (
    RpcSystem<Side>,
    cork::Flusher<tokio_util::compat::Compat<W>>,
)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let (writer, flusher) = cork::cork(writer.compat_write(), buffers.write_bytes);
    let system = if buffers.read_bytes == 0 {
        let network = twoparty::VatNetwork::new(reader.compat(), writer, side, reader_options());
        RpcSystem::new(Box::new(network), bootstrap)
    } else {
        let reader = futures::io::BufReader::with_capacity(buffers.read_bytes, reader.compat());
        let network = twoparty::VatNetwork::new(reader, writer, side, reader_options());
        RpcSystem::new(Box::new(network), bootstrap)
    };
    (system, flusher)
}

/// Connects to a host at `addr` and returns its bootstrap `Host` capability together with the
/// RPC system that drives the connection: spawn it (or await it) on a `LocalSet`, and the
/// connection lives until it ends or is dropped.
pub async fn connect(
    addr: &ListenAddr,
) -> std::io::Result<(duro_capnp::host::Client, RpcSystem<Side>)> {
    let (reader, writer) = open(addr, None).await?;
    let mut rpc = rpc_system(reader, writer, Side::Client, None);
    let host = rpc.bootstrap(Side::Server);
    Ok((host, rpc))
}

/// The two halves of a client's stream to `addr`: TCP (TCP_NODELAY), over TLS when `tls` is
/// given, or a unix socket (which has no TLS: the file's permissions guard it).
type Halves = (Box<dyn AsyncRead + Unpin>, Box<dyn AsyncWrite + Unpin>);

async fn open(addr: &ListenAddr, tls: Option<&crate::tls::ClientTls>) -> std::io::Result<Halves> {
    match (addr, tls) {
        (ListenAddr::Tcp(addr), tls) => {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            // Request/response RPC would otherwise wait on Nagle's algorithm.
            stream.set_nodelay(true)?;
            match tls {
                Some(tls) => {
                    let stream = tls.connect(addr.ip(), stream).await?;
                    let (reader, writer) = tokio::io::split(stream);
                    Ok((Box::new(reader), Box::new(writer)))
                }
                None => {
                    let (reader, writer) = stream.into_split();
                    Ok((Box::new(reader), Box::new(writer)))
                }
            }
        }
        (ListenAddr::Unix(path), None) => {
            let (reader, writer) = tokio::net::UnixStream::connect(path).await?.into_split();
            Ok((Box::new(reader), Box::new(writer)))
        }
        (ListenAddr::Unix(_), Some(_)) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a unix socket has no TLS: the file's permissions guard it",
        )),
    }
}

/// A connection to a host with its writes corked (see [`connect_corked`]): run `system` and
/// `flusher` side by side on a `LocalSet` (spawn both); the connection lives until the system
/// ends or is dropped.
pub struct CorkedConnection {
    /// The host's bootstrap `Host` capability.
    pub host: duro_capnp::host::Client,
    pub system: RpcSystem<Side>,
    /// Writes what the calls of each turn of the event loop wrote, together; ends once the
    /// system is gone and its bytes are written.
    pub flusher: futures::future::LocalBoxFuture<'static, ()>,
}

/// [`connect`], or [`connect_tls`] when `tls` is given, with the writes corked as a server's
/// are (see [`cork`]): the calls made in one turn of the event loop leave in one write, not
/// one `send` each. For a client that makes many calls at once (pipelined, or from many
/// tasks); a lone call leaves in the same turn as without.
pub async fn connect_corked(
    addr: &ListenAddr,
    tls: Option<&crate::tls::ClientTls>,
) -> std::io::Result<CorkedConnection> {
    let (reader, writer) = open(addr, tls).await?;
    let (mut system, flusher) =
        rpc_system_corked(reader, writer, Side::Client, None, Buffers::default());
    let host = system.bootstrap(Side::Server);
    Ok(CorkedConnection {
        host,
        system,
        flusher: Box::pin(flusher),
    })
}

/// [`connect`] over TLS: connects to the host at the TCP address `addr`, runs the handshake
/// with `tls` (which checks the server's certificate), and sets up the capnp connection on
/// the encrypted stream. A certificate that `tls` does not trust fails with an error saying
/// so. A unix socket has no TLS: the file's permissions guard it.
pub async fn connect_tls(
    addr: SocketAddr,
    tls: &crate::tls::ClientTls,
) -> std::io::Result<(duro_capnp::host::Client, RpcSystem<Side>)> {
    let (reader, writer) = open(&ListenAddr::Tcp(addr), Some(tls)).await?;
    let mut rpc = rpc_system(reader, writer, Side::Client, None);
    let host = rpc.bootstrap(Side::Server);
    Ok((host, rpc))
}
