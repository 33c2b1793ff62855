//! The `duro` command: `duro serve` hosts the built-in classes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use duro::{ListenAddr, Server};

#[derive(Parser)]
#[command(name = "duro", version, about = "A Durable Objects host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hosts the built-in classes `echo`, `counter` and `kv`, each bound to a namespace of the
    /// same name, until Ctrl-C or SIGTERM.
    Serve {
        /// Where to listen: HOST:PORT, or unix:PATH for a unix socket (created with mode 0600).
        #[arg(long, default_value = duro::server::DEFAULT_LISTEN)]
        listen: ListenAddr,
        /// The data dir (created if missing). One server at a time may use it.
        #[arg(long, default_value = "./duro-data")]
        data: PathBuf,
        /// The LMDB map size in MiB: the most the data file may grow to.
        #[arg(long, default_value_t = 64 * 1024)]
        map_mib: usize,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            listen,
            data,
            map_mib,
        } => Server::builder()
            .builtins()
            .listen(listen)
            .data_dir(data)
            .map_bytes(map_mib << 20)
            .run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("duro: {error}");
            ExitCode::FAILURE
        }
    }
}
