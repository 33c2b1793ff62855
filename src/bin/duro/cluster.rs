//! `duro cluster status`: the nodes of a cluster, their liveness and the virtual shards each
//! owns, read from the cluster's store (the database's clock decides who is alive).

use std::process::ExitCode;

use duro::storage::{ClusterView, PostgresBackend, PostgresOptions};

use crate::cli::EXIT_REFUSED;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ClusterCommand {
    /// Lists the nodes (alive, dead or draining: dead when its last heartbeat is older than its
    /// lease time, by the database's clock) and the virtual shards each owns; then the shards no node holds a live
    /// lease on.
    Status(StatusArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// The cluster's store: postgresql://USER@HOST:PORT/DB.
    #[arg(long, value_name = "URL", env = "DURO_STORE")]
    store: String,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(command: &ClusterCommand) -> ExitCode {
    let ClusterCommand::Status(args) = command;
    let options = PostgresOptions {
        cluster: true,
        ..PostgresOptions::default()
    };
    let store = match PostgresBackend::open(&args.store, &options) {
        Ok(store) => store,
        Err(error) => {
            eprintln!("error: opening the store: {error}");
            return match error {
                duro::storage::OpenError::Locked(_) => ExitCode::from(EXIT_REFUSED),
                _ => ExitCode::FAILURE,
            };
        }
    };
    let view = match store.cluster_view() {
        Ok(view) => view,
        Err(error) => {
            eprintln!("error: reading the cluster: {error}");
            return ExitCode::FAILURE;
        }
    };
    match args.json {
        true => println!("{}", json(&view)),
        false => print!("{}", text(&view)),
    }
    ExitCode::SUCCESS
}

/// The shards `node` holds a live lease on.
fn shards_of(view: &ClusterView, node: &str) -> Vec<u32> {
    let live = view.leases.iter().filter(|lease| lease.live);
    let owned = live.filter(|lease| lease.owner.as_deref() == Some(node));
    owned.map(|lease| lease.shard).collect()
}

/// Shards no node holds a live lease on.
fn unowned(view: &ClusterView) -> Vec<u32> {
    let free = view.leases.iter().filter(|l| !l.live || l.owner.is_none());
    free.map(|lease| lease.shard).collect()
}

fn json(view: &ClusterView) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = view
        .nodes
        .iter()
        .map(|node| {
            serde_json::json!({
                "name": node.name,
                "advertise": node.advertise,
                "alive": node.alive,
                "draining": node.draining,
                "heartbeat_age_ms": node.heartbeat_age_ms,
                "shards": shards_of(view, &node.name),
            })
        })
        .collect();
    serde_json::json!({
        "virtual_shards": view.leases.len(),
        "nodes": nodes,
        "unowned": unowned(view),
    })
}

fn text(view: &ClusterView) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} virtual shards, {} nodes\n",
        view.leases.len(),
        view.nodes.len()
    ));
    for node in &view.nodes {
        let state = match (node.alive, node.draining) {
            (true, false) => "alive",
            (true, true) => "draining",
            (false, _) => "dead",
        };
        let shards = shards_of(view, &node.name);
        out.push_str(&format!(
            "{}  {}  {}  heartbeat {} ms ago  {} shards  {}\n",
            node.name,
            node.advertise,
            state,
            node.heartbeat_age_ms,
            shards.len(),
            ranges(&shards)
        ));
    }
    let free = unowned(view);
    out.push_str(&format!(
        "without a live lease: {} shards  {}\n",
        free.len(),
        ranges(&free)
    ));
    out
}

/// `0-3,7,9-10`: shard numbers as ranges.
fn ranges(shards: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut iter = shards.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().unwrap_or(end);
        }
        parts.push(match start == end {
            true => start.to_string(),
            false => format!("{start}-{end}"),
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn shards_print_as_ranges() {
        assert_eq!(super::ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(super::ranges(&[]), "");
        assert_eq!(super::ranges(&[5]), "5");
    }
}
