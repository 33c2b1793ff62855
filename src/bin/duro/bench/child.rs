//! The servers under test as child processes (`duro serve`, `workerd serve`), and what /proc
//! tells about a process: CPU time and resident memory.
//!
//! A child is killed by its own PID when its [`Child`] is dropped, so a failing or interrupted
//! workload never leaves a server behind, and no other process is ever signalled.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a server may take to print its address before the workload gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A server process started by the bench; killed (SIGKILL, by PID) and reaped on drop.
pub struct Child {
    process: std::process::Child,
    /// The lines of the child's stdout. Kept until the child is killed, so that a late write
    /// to stdout never meets a closed pipe.
    stdout: mpsc::Receiver<String>,
    /// Where the child's stderr goes, to show when it fails.
    log: PathBuf,
}

impl Child {
    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The last lines of the child's stderr, to explain a failure.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// The next line the child prints, waiting at most [`START_TIMEOUT`].
    pub fn next_line(&mut self) -> Result<String, String> {
        match self.stdout.recv_timeout(START_TIMEOUT) {
            Ok(line) => Ok(line),
            Err(_) => Err(format!(
                "the server {} within {START_TIMEOUT:?}; its log ends with:\n{}",
                if self.exited() {
                    "exited"
                } else {
                    "printed nothing"
                },
                self.log_tail()
            )),
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.process.try_wait(), Ok(None))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // `kill` signals exactly this PID; `wait` reaps it so it does not linger as a zombie.
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A running `duro serve` and the addresses it printed.
pub struct Duro {
    pub child: Child,
    pub addr: SocketAddr,
    /// The HTTP gateway's address, when started with one.
    pub http: Option<SocketAddr>,
    pub data_dir: PathBuf,
}

/// Starts `duro serve` (this very binary) on loopback port 0 with the data dir `data_dir`,
/// and with the HTTP gateway on loopback port 0 when `http`.
pub fn start_duro(data_dir: &Path, http: bool) -> Result<Duro, String> {
    start_duro_with(data_dir, http, &[])
}

/// [`start_duro`] with more flags for `duro serve` (e.g. `--external NS=CLASS`).
pub fn start_duro_with(data_dir: &Path, http: bool, flags: &[&str]) -> Result<Duro, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the duro binary: {e}"))?;
    let mut command = Command::new(exe);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data_dir)
        .args(flags);
    // One shard unless the workload says otherwise: the figures of one event loop, comparable
    // from run to run and machine to machine (the `shards` workload measures more).
    if !flags.contains(&"--shards") {
        command.args(["--shards", "1"]);
    }
    // The gateway is on by default (on 7451): a bench child takes a port of its own, or none.
    command.args(["--http", if http { "127.0.0.1:0" } else { "off" }]);
    // The admin server is on by default (on 7452), which children running side by side
    // would fight over.
    if !flags.contains(&"--admin") {
        command.args(["--admin", "off"]);
    }
    command.env("RUST_LOG", "warn");
    let log = data_dir.with_extension("log");
    let mut child = spawn(command, &log)?;
    let addr = parse_addr(&child.next_line()?, "duro listening on ")?;
    let http = if http {
        Some(parse_addr(&child.next_line()?, "duro http gateway on ")?)
    } else {
        None
    };
    Ok(Duro {
        child,
        addr,
        http,
        data_dir: data_dir.to_owned(),
    })
}

/// Starts `command` with stdout piped (its lines read by a thread that ends with the pipe) and
/// stderr into `log`.
pub fn spawn(mut command: Command, log: &Path) -> Result<Child, String> {
    let log_file =
        std::fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let mut process = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", command.get_program()))?;
    let stdout = process.stdout.take();
    let (sender, receiver) = mpsc::channel();
    if let Some(stdout) = stdout {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
    }
    Ok(Child {
        process,
        stdout: receiver,
        log: log.to_owned(),
    })
}

/// The address in a line `{prefix}ADDR` that a server printed.
pub fn parse_addr(line: &str, prefix: &str) -> Result<SocketAddr, String> {
    line.trim()
        .strip_prefix(prefix)
        .and_then(|addr| addr.parse().ok())
        .ok_or_else(|| format!("expected {prefix:?}ADDR, got {line:?}"))
}

/// CPU time (user + system) a process or thread has used, from `/proc/.../stat`.
pub fn cpu_time(stat_path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15; after ')' the first is field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(
        (utime + stime) * 1_000_000_000 / ticks_per_s,
    ))
}

/// CPU time of the process `pid`.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    cpu_time(&format!("/proc/{pid}/stat"))
}

/// Resident memory of the process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The ID of the calling thread, to read its CPU time from `/proc/self/task/<tid>/stat`.
pub fn current_tid() -> i64 {
    // SAFETY: gettid has no preconditions.
    i64::from(unsafe { libc::gettid() })
}

/// Finds an executable: `given` if set, else `name` on PATH.
pub fn find_executable(given: Option<&Path>, name: &str) -> Option<PathBuf> {
    if let Some(path) = given {
        return path.is_file().then(|| path.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
