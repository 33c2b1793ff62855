//! examples/client.py, the pycapnp client, against a live server: the wire contract works for a
//! client written against schema/duro.capnp alone.
//!
//! Needs `python3` with pycapnp (`pip install pycapnp`). Without it the test is skipped with a
//! message, unless `DURO_REQUIRE_PYTHON=1` (as in CI), which makes it fail instead.

mod common;

use std::process::Command;

use duro::testing::TestServer;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/client.py");

/// Whether `python3` can import pycapnp; why not, when it cannot.
fn pycapnp() -> Result<(), String> {
    let output = Command::new("python3")
        .args(["-c", "import capnp"])
        .output()
        .map_err(|e| format!("python3 cannot be run: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "python3 cannot import pycapnp: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Runs the example; its stdout, or a panic with its stderr.
fn run_example(server: &TestServer, name: &str) -> String {
    run_example_with(server, &[], name)
}

/// [`run_example`] with `flags` before the address.
fn run_example_with(server: &TestServer, flags: &[&str], name: &str) -> String {
    let output = Command::new("python3")
        .arg(SCRIPT)
        .args(flags)
        .arg(server.addr().to_string())
        .arg(name)
        .output()
        .expect("running python3");
    assert!(
        output.status.success(),
        "examples/client.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Whether the test `name` can run; says why not when it is skipped, and fails instead when
/// `DURO_REQUIRE_PYTHON=1`.
fn python_ready(name: &str) -> bool {
    let Err(why) = pycapnp() else {
        return true;
    };
    if std::env::var("DURO_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("DURO_REQUIRE_PYTHON=1 but {why}; install it with: pip install pycapnp");
    }
    eprintln!("SKIPPED {name}: {why}");
    eprintln!("(pip install pycapnp to run it; DURO_REQUIRE_PYTHON=1 makes this a failure)");
    false
}

#[test]
fn the_python_example_increments_the_counter() {
    if !python_ready("the_python_example_increments_the_counter") {
        return;
    }
    let server = TestServer::start(duro::builtin::register(duro::Server::builder()));
    assert_eq!(run_example(&server, "py"), "1\n");
    assert_eq!(run_example(&server, "py"), "2\n");
    assert_eq!(run_example(&server, "other"), "1\n");
    // A refused call exits non-zero and says why.
    let long_name = "x".repeat(2000);
    let output = Command::new("python3")
        .args([SCRIPT, &server.addr().to_string(), &long_name])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("name_bytes_max"), "{stderr}");
}

#[test]
fn the_python_example_talks_tls() {
    if !python_ready("the_python_example_talks_tls") {
        return;
    }
    let files = common::tls_files();
    let builder = duro::builtin::register(duro::Server::builder());
    let server = TestServer::start(builder.tls_pem(&files.cert, &files.key));
    let trusting = ["--tls-ca", files.ca_str()];
    assert_eq!(run_example_with(&server, &trusting, "py"), "1\n");
    assert_eq!(run_example_with(&server, &trusting, "py"), "2\n");
    // Another CA, or no TLS: refused, said on stderr, and the server serves on.
    let other = common::tls_files();
    let refusals = [
        (
            &["--tls-ca", other.ca_str()][..],
            "CERTIFICATE_VERIFY_FAILED",
        ),
        (&[][..], "DISCONNECTED"),
    ];
    for (flags, said) in refusals {
        let output = Command::new("python3")
            .arg(SCRIPT)
            .args(flags)
            .args([&server.addr().to_string(), "py"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{flags:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(said), "{flags:?}: {stderr}");
    }
    assert_eq!(run_example_with(&server, &trusting, "py"), "3\n");
}
