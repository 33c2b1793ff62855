//! Every snippet of README.md is one that a test runs: Rust snippets are copies of tested code
//! (the examples, whose tests include them), and shell lines run here against a live server.

use std::path::Path;
use std::process::Command;

mod common;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The fenced code blocks of `text` in the language `lang`.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        match current.as_mut() {
            None if line.trim() == format!("```{lang}") => current = Some(Vec::new()),
            Some(lines) if line.trim() == "```" => {
                blocks.push(lines.join("\n"));
                current = None;
            }
            Some(lines) => lines.push(line),
            None => {}
        }
    }
    blocks
}

fn normalized(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn rust_snippets_are_copies_of_tested_examples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources: Vec<String> = std::fs::read_dir(root.join("examples"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .map(|path| normalized(&std::fs::read_to_string(path).unwrap()))
        .collect();
    let snippets = blocks(&readme(), "rust");
    assert!(snippets.len() >= 3, "the README lost its Rust snippets");
    for snippet in snippets {
        let snippet = normalized(&snippet);
        assert!(
            sources.iter().any(|source| source.contains(&snippet)),
            "this README snippet is not in any example, so no test runs it:\n{snippet}"
        );
    }
}

fn python_ready() -> bool {
    let ready = Command::new("python3")
        .args(["-c", "import capnp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready && std::env::var("DURO_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
        panic!("python3 with pycapnp is required (DURO_REQUIRE_PYTHON=1)");
    }
    ready
}

#[test]
fn shell_snippets_run_against_a_live_server() {
    let dir = tempfile::tempdir().unwrap();
    let served = common::serve_with(dir.path(), &["--http", "127.0.0.1:0"]);
    let http = served.http.expect("the gateway address");
    let duro = env!("CARGO_BIN_EXE_duro");
    let mut ran = 0;
    for block in blocks(&readme(), "sh") {
        for line in block.lines() {
            let command = line.split(" # ").next().unwrap().trim();
            let runnable = ["duro ", "curl ", "python3 "]
                .iter()
                .any(|p| command.starts_with(p));
            if !runnable || command.starts_with("duro serve") {
                continue;
            }
            if command.starts_with("python3 ") && !python_ready() {
                println!("skipped (no pycapnp): {command}");
                continue;
            }
            let command = command
                .replace("127.0.0.1:7450", &served.addr.to_string())
                .replace("127.0.0.1:8787", &http.to_string());
            let command = match command.strip_prefix("duro ") {
                Some(rest) => format!("{duro} {rest}"),
                None => command,
            };
            // `duro` further along a pipeline, too.
            let command = command.replace("| duro ", &format!("| {duro} "));
            let output = Command::new("bash")
                .args(["-c", &format!("set -e; {command}")])
                // The commands' default server, as a user's shell would set it.
                .env("DURO_CONNECT", served.addr.to_string())
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "README line failed: {line}\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 8, "only {ran} README lines ran");
}
