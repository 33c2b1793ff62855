//! The `duro` command: `serve` hosts the built-in classes; `fetch`, `ids` and `ls` are clients;
//! `bench` measures. It uses the library as any program would, through its public API.

mod bench;
mod cli;
mod cluster;
mod ops;

// Generated code names its types from the crate's root (the bench's typed counter).
use bench::typed_counter_capnp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Parser, Subcommand};
use cli::{Connect, FetchArgs, IdsArgs, LsArgs};
use duro::{FrameLimits, GatewayOptions, HostLimits, ListenAddr, Server};
use std::time::Duration;

/// Every call allocates and frees many small blocks (capnp messages, futures, HTTP parts);
/// mimalloc serves them several times cheaper than glibc's allocator under this load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "duro", version, about = "A Durable Objects host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hosts the built-in classes `echo`, `counter`, `kv`, `timer` and `room`, each bound to a
    /// namespace of the same name, and the external classes of `--external`, until Ctrl-C or
    /// SIGTERM.
    Serve(ServeArgs),
    /// Sends an HTTP request to an object and prints the response like `curl -i`.
    Fetch {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        args: FetchArgs,
    },
    /// Prints the 64-hex-digit ID of an object.
    Ids {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        args: IdsArgs,
    },
    /// Lists the namespaces and their classes, or the objects of one namespace.
    Ls {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        args: LsArgs,
    },
    /// Shows an object's stored keys and values, and its alarm, without activating it.
    Inspect {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        args: ops::InspectArgs,
    },
    /// Writes namespaces' objects (keys, values, names, alarms) as JSON Lines, from one
    /// consistent snapshot of a running host.
    Export {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        args: ops::ExportArgs,
    },
    /// Writes an export into a running host, all or nothing.
    Import {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        args: ops::ImportArgs,
    },
    /// Copies a running host's store (or, --offline, a data dir) into a new data dir.
    Backup {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        args: ops::BackupArgs,
    },
    /// Shows the nodes of a cluster and the virtual shards each owns, from its store.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Measures duro against its limits and against workerd (see the README's Benchmarks section).
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where to listen: HOST:PORT, or unix:PATH for a unix socket (created with mode 0600).
    #[arg(long, default_value = duro::DEFAULT_LISTEN)]
    listen: ListenAddr,
    /// The data dir (created if missing). One server at a time may use it.
    #[arg(long, default_value = "./duro-data")]
    data: PathBuf,
    /// Keep the data in this PostgreSQL database instead of the data dir's LMDB:
    /// postgresql://USER@HOST:PORT/DB (duro creates and migrates its tables there). One host
    /// at a time may use a store.
    #[arg(long, value_name = "URL", env = "DURO_STORE")]
    store: Option<String>,
    /// The LMDB map size in MiB: the most the data file may grow to.
    #[arg(long, default_value_t = 64 * 1024)]
    map_mib: usize,
    /// Where the HTTP gateway listens, or `off`: /{namespace}/{name}/{rest} goes to the object
    /// `name`, with the path /{rest}.
    #[arg(long, default_value = duro::DEFAULT_HTTP, value_name = "HOST:PORT|off")]
    http: HttpListen,
    /// Where the admin server listens, or `off`: GET /metrics answers the server's metrics
    /// (Prometheus text); the console is served there too. It takes --token-file's token as
    /// the gateway does.
    #[arg(long, default_value = duro::DEFAULT_ADMIN, value_name = "HOST:PORT|off")]
    admin: HttpListen,
    /// The largest request body an object reads whole through the HTTP gateway; larger ones
    /// get 413. Bodies that objects stream are not bounded.
    #[arg(long, default_value_t = 1 << 20)]
    http_body_max_bytes: usize,
    /// The largest WebSocket message, either way; a client's larger one closes its socket
    /// with 1009.
    #[arg(long, default_value_t = 1 << 20)]
    ws_message_max_bytes: usize,
    /// The most WebSockets one object holds.
    #[arg(long, default_value_t = 32_768)]
    ws_sockets_per_object: usize,
    /// The most bytes queued to one WebSocket and not yet taken by its client; past it the
    /// socket is closed with 1008.
    #[arg(long, default_value_t = 8 << 20)]
    ws_queue_max_bytes: usize,
    /// Event-loop threads (shards), each the host of the objects whose IDs map to it; 0: one
    /// per core.
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Each shard commits with a storage writer of its own (by default one writer folds every
    /// shard's writes into its group commits). For measuring.
    #[arg(long)]
    writer_per_shard: bool,
    /// Run as the node NAME of a cluster: several servers on one PostgreSQL store (--store),
    /// each owning the virtual shards it holds leases on, passing calls for the others'
    /// objects to their owners. --token-file's token is the cluster's.
    #[arg(long, value_name = "NAME", requires = "store")]
    node: Option<String>,
    /// Where the other nodes reach this one, HOST:PORT [default: --listen, when it names one
    /// interface].
    #[arg(long, value_name = "HOST:PORT", requires = "node")]
    advertise: Option<String>,
    /// A node's lease time in ms: a dead node's objects are served again by the others within
    /// about this time; a node heartbeats every fifth of it.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..=600_000))]
    lease_ms: u64,
    /// The CA certificates (PEM) that vouch for the other nodes' certificates, when the nodes
    /// listen with TLS (--tls-cert): the links between nodes then use TLS too, and a node's
    /// certificate must be valid for the host of its --advertise address [default: the
    /// --tls-cert file itself, for nodes that share one self-signed certificate].
    #[arg(long, value_name = "PEM", requires = "node")]
    cluster_ca: Option<PathBuf>,
    /// Sends the message of an object's error to HTTP clients in the 500's body. Without it the
    /// body carries a request ID, and the message is logged with that ID.
    #[arg(long)]
    expose_errors: bool,
    /// A file holding the token Cap'n Proto clients must present with `Host.authenticate`
    /// before anything else, and HTTP clients as `Authorization: Bearer <token>` (surrounding
    /// whitespace is ignored). Without it, anyone who can connect may use every object: keep
    /// the default loopback addresses, or set a token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A Cap'n Proto message must be whole this many seconds after its first byte, or its
    /// connection is closed (slow senders cannot hold memory).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    message_timeout: u64,
    /// A Cap'n Proto connection with no call in progress that sends nothing for this many
    /// seconds is closed.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    idle_timeout: u64,
    /// MiB in flight over all connections: partly received messages, requests not answered,
    /// responses not yet written. Each connection gets a fair share; past it, it is not read
    /// until it drains, and its calls fail with `overloaded`.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    inflight_mib: usize,
    /// Serve TLS on the Cap'n Proto listener (when it is TCP) and the HTTP gateway, with the
    /// certificate chain of this PEM file (the server's certificate first). Needs --tls-key.
    /// Clients connect with `duro fetch --tls` (and --tls-ca for a private CA).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, a PEM file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Binds NAMESPACE to the external class CLASS, whose instances live in provider processes
    /// (any language) that connect and call `Host.registerProvider("CLASS", provider)`; see
    /// examples/provider_counter.py. Repeatable. While no provider is connected, calls to its
    /// objects wait up to 5 s for one, then fail with `overloaded`.
    #[arg(long, value_name = "NAMESPACE=CLASS")]
    external: Vec<ExternalBinding>,
    /// How log lines are written to stderr: `text` for people, `json` for log collectors
    /// (one object a line, with the fields of the event and of its spans, e.g. a call's
    /// request_id). `RUST_LOG` chooses what is logged (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The format of the log (`duro serve --log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr in `format`, what `RUST_LOG` asks for (default: info).
fn init_log(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => log.init(),
        LogFormat::Json => log.json().init(),
    }
}

/// A namespace bound to an external class: `NAMESPACE=CLASS`.
#[derive(Clone, Debug)]
struct ExternalBinding {
    namespace: String,
    class: String,
}

impl FromStr for ExternalBinding {
    type Err = String;

    fn from_str(text: &str) -> Result<ExternalBinding, String> {
        match text.split_once('=') {
            Some((namespace, class)) if !namespace.is_empty() && !class.is_empty() => {
                Ok(ExternalBinding {
                    namespace: namespace.to_owned(),
                    class: class.to_owned(),
                })
            }
            _ => Err(format!(
                "invalid binding {text:?}: expected NAMESPACE=CLASS"
            )),
        }
    }
}

/// The address of the gateway or of the admin server, or none.
#[derive(Clone, Debug)]
struct HttpListen(Option<SocketAddr>);

impl FromStr for HttpListen {
    type Err = String;

    fn from_str(text: &str) -> Result<HttpListen, String> {
        if text == "off" {
            return Ok(HttpListen(None));
        }
        text.parse()
            .map(|addr| HttpListen(Some(addr)))
            .map_err(|_| format!("invalid address {text:?}: expected HOST:PORT or off"))
    }
}

fn serve(args: ServeArgs) -> Result<(), duro::StartError> {
    let token = match &args.token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    raise_file_limit();
    let limits = HostLimits {
        inflight_bytes_max: args.inflight_mib << 20,
        web_sockets: duro::SocketLimits {
            message_bytes_max: args.ws_message_max_bytes,
            sockets_per_object_max: args.ws_sockets_per_object,
            queued_bytes_max: args.ws_queue_max_bytes,
        },
        ..HostLimits::default()
    };
    let frame = FrameLimits {
        message_timeout: Duration::from_secs(args.message_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
    };
    let mut builder = duro::builtin::register(Server::builder())
        .limits(limits)
        .frame_limits(frame)
        .listen(args.listen)
        .data_dir(args.data)
        .map_bytes(args.map_mib << 20)
        .shards(args.shards)
        .writer_per_shard(args.writer_per_shard)
        .gateway_options(GatewayOptions {
            body_bytes_max: args.http_body_max_bytes,
            expose_errors: args.expose_errors,
        });
    if let Some(http) = args.http.0 {
        builder = builder.http(http);
    }
    builder = builder.admin(args.admin.0);
    if let Some(token) = token {
        builder = builder.token(token);
    }
    if let Some(url) = &args.store {
        builder = builder.store(url);
    }
    if let Some(node) = &args.node {
        let tls = match (&args.cluster_ca, &args.tls_cert) {
            (Some(ca), _) | (None, Some(ca)) => Some(duro::tls::ClientTls::with_ca_pem(ca)?),
            (None, None) => None,
        };
        builder = builder.cluster(duro::cluster::ClusterOptions {
            node: node.clone(),
            advertise: args.advertise.clone().unwrap_or_default(),
            lease: Duration::from_millis(args.lease_ms),
            tls,
        });
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        builder = builder.tls_pem(cert, key);
    }
    for binding in &args.external {
        builder = builder.external(&binding.namespace, &binding.class);
    }
    builder.run()
}

/// Raises the soft limit on open files to the hard limit, so that the connection bounds, not
/// the default of 1024 descriptors, decide how many clients the server takes; says the bound.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let wanted = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0
    };
    let files = if raised {
        limit.rlim_max
    } else {
        limit.rlim_cur
    };
    tracing::info!(files, "open file limit");
    if files < 2 * duro::CONNECTIONS_MAX as u64 {
        tracing::warn!(
            files,
            "the open file limit is below what the connection bounds allow; accepts will fail \
             (and back off) once it is reached"
        );
    }
}

fn read_token(path: &std::path::Path) -> Result<String, duro::StartError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("reading the token file {}: {e}", path.display()),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        let message = format!("the token file {} is empty", path.display());
        return Err(std::io::Error::other(message).into());
    }
    Ok(token.to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_log(match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Text,
    });
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("duro: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Fetch { connect, args } => cli::fetch(&connect, &args),
        Command::Ids { connect, args } => cli::ids(&connect, &args),
        Command::Ls { connect, args } => cli::ls(&connect, &args),
        Command::Inspect { connect, args } => ops::inspect(&connect, &args),
        Command::Export { connect, args } => ops::export(&connect, &args),
        Command::Import { connect, args } => ops::import(&connect, &args),
        Command::Backup { connect, args } => ops::backup(&connect, &args),
        Command::Cluster { command } => cluster::run(&command),
        Command::Bench(args) => bench::run(&args),
    }
}
