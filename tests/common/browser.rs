//! A headless Chromium driven over the Chrome DevTools Protocol (CDP), for tests that open
//! duro's web pages and check what a user of them would see.
//!
//! One WebSocket to the browser carries the messages of every page: flat sessions
//! (`Target.attachToTarget` with `flatten`) tag a page's messages with its `sessionId`, and a
//! reader task hands each answer to the request waiting for its `id`. Events are not read.
//!
//! Chromium is `$DURO_CHROMIUM`, or the first of [`BINARY_NAMES`] on PATH. Without one,
//! [`Browser::launch`] returns `None` and the test skips, unless `DURO_REQUIRE_BROWSER` is set
//! (as in CI), which makes a missing browser a failure instead.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The names Chromium goes by on PATH, in the order they are looked for.
pub const BINARY_NAMES: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];
/// Chromium's flags, besides the profile dir: the full browser without a window; no sandbox,
/// which cannot start as root in CI's containers; no GPU, which CI machines lack; shared
/// memory in TMPDIR, as containers' small /dev/shm crashes tabs; no first-run dialogs; and a
/// free port of its own, which it writes to `DevToolsActivePort`.
const FLAGS: [&str; 6] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--remote-debugging-port=0",
];
/// How long Chromium may take to start and accept the DevTools connection: a cold start on a
/// busy two-core machine takes seconds.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one CDP request may wait for its answer; past it the browser is taken as hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Page::wait_loaded`] waits for a page and its subresources.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often polls ask again: quick next to the timeouts, slow enough to leave the cores to
/// the browser and the server under test.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The one connection to the browser, shared by the browser and its pages.
struct Connection {
    /// The sending half; a request holds it only while its message is written.
    sink: tokio::sync::Mutex<SplitSink<Socket, Message>>,
    /// The requests waiting for their answer, by `id`. An entry is removed when its answer
    /// comes or its wait times out, so this holds no more than the requests in flight.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    /// The next request's `id`: CDP matches answers by `id` alone, so ids are unique over the
    /// connection, across pages.
    next_id: AtomicU64,
}

impl Connection {
    /// Sends `method` to the page of `session` (to the browser when `None`); the `result` CDP
    /// answered, or its `error`.
    async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            request["sessionId"] = session.into();
        }
        let (answer_tx, answer_rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(id, answer_tx);
        let sent = self
            .sink
            .lock()
            .await
            .send(Message::text(request.to_string()))
            .await;
        let answer = match sent {
            Err(e) => Err(format!("{method}: sending failed: {e}")),
            Ok(()) => match tokio::time::timeout(CALL_TIMEOUT, answer_rx).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(_)) => Err(format!("{method}: the connection to the browser closed")),
                Err(_) => Err(format!("{method}: no answer in {CALL_TIMEOUT:?}")),
            },
        };
        self.waiting.lock().unwrap().remove(&id);
        let mut answer = answer?;
        match answer.get("error") {
            Some(error) => Err(format!("{method}: {error}")),
            None => Ok(answer["result"].take()),
        }
    }
}

/// Hands each answer to the request waiting for its `id` until the connection ends, then
/// drops the waiters left so that they fail at once instead of at their timeout.
async fn route_answers(mut stream: SplitStream<Socket>, connection: Arc<Connection>) {
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let message: Value = serde_json::from_str(&text).unwrap_or_default();
        // Events have no `id`; an answer past its timeout has no waiter.
        if let Some(id) = message["id"].as_u64()
            && let Some(waiter) = connection.waiting.lock().unwrap().remove(&id)
        {
            let _ = waiter.send(message);
        }
    }
    connection.waiting.lock().unwrap().clear();
}

/// The Chromium process and its files. A guard of its own, so that a launch that fails
/// half-way still kills what it started.
struct Process {
    child: Child,
    /// The profile (`--user-data-dir`), `stderr.log` and the browser's `TMPDIR`; removed once
    /// the process is gone.
    dir: tempfile::TempDir,
}

impl Drop for Process {
    /// Kills the browser started here and reaps it: a failing test leaves no browser behind.
    /// The signal goes to the process group the browser leads, whose id is its PID: its
    /// helpers (renderers, network and GPU processes) outlive a browser killed alone by up to
    /// a second, writing to the profile while it is removed. Only this browser's own
    /// processes are in that group.
    fn drop(&mut self) {
        // Until the browser is reaped, its PID (the group's id) cannot be reused: while this
        // says it runs, the group is this browser's.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) with a group id and a signal number touches no memory of ours.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

impl Process {
    /// The end of Chromium's stderr, for the message of a failed launch.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// A headless Chromium with one DevTools connection; killed when dropped.
pub struct Browser {
    /// The pages' connection too: a page is a session on it.
    connection: Arc<Connection>,
    /// Routes the answers; it owns the receiving half, so aborting it ends the connection.
    reader: tokio::task::JoinHandle<()>,
    /// Killed, and its files removed, when the browser is dropped.
    process: Process,
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Browser {
    /// Starts a headless Chromium and connects to it. `None` (saying why on stderr) when no
    /// Chromium is installed, a panic instead when `DURO_REQUIRE_BROWSER` is set; a panic
    /// with the browser's own stderr when it is installed but does not start.
    pub async fn launch() -> Option<Browser> {
        let Some(binary) = find_binary() else {
            let why = format!(
                "no Chromium: DURO_CHROMIUM is unset and none of {BINARY_NAMES:?} is on PATH"
            );
            if std::env::var_os("DURO_REQUIRE_BROWSER").is_some() {
                panic!(
                    "DURO_REQUIRE_BROWSER is set but {why}; install it: apt-get install chromium"
                );
            }
            eprintln!(
                "{why} (apt-get install chromium; DURO_REQUIRE_BROWSER=1 makes this a failure)"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("a temporary dir for the browser profile");
        let log =
            std::fs::File::create(dir.path().join("stderr.log")).expect("creating stderr.log");
        let child = Command::new(&binary)
            .args(FLAGS)
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .arg("about:blank")
            .process_group(0) // Of its own, for `Process::drop`.
            // Its temporary files go where they are removed with the profile: a killed browser
            // does not clean up.
            .env("TMPDIR", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut process = Process { child, dir };
        let (sink, stream) = connect(&mut process).await.split();
        let connection = Arc::new(Connection {
            sink: tokio::sync::Mutex::new(sink),
            waiting: Mutex::default(),
            next_id: AtomicU64::new(1),
        });
        let reader = tokio::spawn(route_answers(stream, connection.clone()));
        Some(Browser {
            connection,
            reader,
            process,
        })
    }

    /// Opens `url` in a new tab and returns once the navigation is under way; a panic with
    /// CDP's answer when the tab cannot be made or the URL cannot be loaded.
    pub async fn open(&self, url: &str) -> Page {
        let call = |method, params| self.connection.call(None, method, params);
        let target = call("Target.createTarget", json!({ "url": "about:blank" })).await;
        let target = target.unwrap_or_else(|e| panic!("opening {url}: {e}"));
        let params = json!({ "targetId": target["targetId"], "flatten": true });
        let attached = call("Target.attachToTarget", params).await;
        let attached = attached.unwrap_or_else(|e| panic!("opening {url}: {e}"));
        let session = attached["sessionId"]
            .as_str()
            .expect("a sessionId")
            .to_owned();
        let page = Page {
            connection: self.connection.clone(),
            session,
        };
        // Marks the blank document, so that `wait_loaded` cannot take it for the page: CDP does
        // not promise that `Page.navigate` answers only once the new document has replaced it
        // (Chromium 156 does, once the response has come).
        page.eval("document.duroBlank = true").await;
        let navigated = page.call("Page.navigate", json!({ "url": url })).await;
        let navigated = navigated.unwrap_or_else(|e| panic!("opening {url}: {e}"));
        if let Some(error) = navigated.get("errorText") {
            panic!("opening {url}: {error}");
        }
        page
    }
}

/// Dials the browser's WebSocket, at the port and path Chromium writes to
/// `DevToolsActivePort` once it listens. Polls, as the file appears (and is written) while
/// the browser starts; panics with the browser's stderr past [`LAUNCH_TIMEOUT`].
async fn connect(process: &mut Process) -> Socket {
    let port_file = process.dir.path().join("profile/DevToolsActivePort");
    let mut last_error = String::from("no DevToolsActivePort file");
    let dialed = tokio::time::timeout(LAUNCH_TIMEOUT, async {
        loop {
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(format!("Chromium exited ({status}) while starting"));
            }
            let text = std::fs::read_to_string(&port_file).unwrap_or_default();
            if let [port, path] = text.lines().collect::<Vec<_>>()[..] {
                let url = format!("ws://127.0.0.1:{port}{path}");
                match tokio_tungstenite::connect_async(url).await {
                    Ok((socket, _)) => return Ok(socket),
                    Err(e) => last_error = format!("connecting to port {port}: {e}"),
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await;
    let why = match dialed {
        Ok(Ok(socket)) => return socket,
        Ok(Err(why)) => why,
        Err(_) => format!("Chromium not ready in {LAUNCH_TIMEOUT:?} ({last_error})"),
    };
    panic!("{why}; its stderr ends:\n{}", process.log_tail());
}

/// `$DURO_CHROMIUM` when set, else the first executable of [`BINARY_NAMES`] on PATH.
fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("DURO_CHROMIUM") {
        return Some(path.into());
    }
    let dirs: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH")?).collect();
    let mut candidates = BINARY_NAMES
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)));
    candidates.find(|path| is_executable(path))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// A tab of the browser, addressed by its CDP session.
pub struct Page {
    connection: Arc<Connection>,
    session: String,
}

impl Page {
    async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        self.connection
            .call(Some(&self.session), method, params)
            .await
    }

    /// The value of `js` in the page (a promise is awaited), as JSON: `Null` for `undefined`.
    /// Panics with the exception's text when it throws.
    pub async fn eval(&self, js: &str) -> Value {
        self.try_eval(js)
            .await
            .unwrap_or_else(|e| panic!("evaluating {js:?}: {e}"))
    }

    /// [`Page::eval`], with the exception's text (or CDP's error) as `Err`.
    pub async fn try_eval(&self, js: &str) -> Result<Value, String> {
        let params = json!({ "expression": js, "returnByValue": true, "awaitPromise": true });
        let mut answer = self.call("Runtime.evaluate", params).await?;
        match answer.get("exceptionDetails") {
            Some(details) => Err(exception_text(details)),
            None => Ok(answer["result"]["value"].take()),
        }
    }

    /// Polls `condition` until it evaluates to the boolean `true` (`!!x` tests a value's
    /// truth), for at most `timeout`; the `Err` says what it was last. An exception counts as not yet,
    /// as the page may still be building what the condition looks at.
    pub async fn wait_for(&self, condition: &str, timeout: Duration) -> Result<(), String> {
        let mut last = Ok(Value::Null);
        let polled = tokio::time::timeout(timeout, async {
            loop {
                last = self.try_eval(condition).await;
                if last == Ok(Value::Bool(true)) {
                    return;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await;
        let last = match last {
            Ok(value) => format!("it was {value}"),
            Err(e) => format!("it failed: {e}"),
        };
        polled.map_err(|_| format!("{condition:?} not true in {timeout:?}: {last}"))
    }

    /// Waits until the page opened has loaded, subresources included.
    pub async fn wait_loaded(&self) -> Result<(), String> {
        let loaded = "document.readyState === 'complete' && !document.duroBlank";
        self.wait_for(loaded, LOAD_TIMEOUT).await
    }
}

/// What a thrown value says: an `Error`'s description (message and stack), or the value.
fn exception_text(details: &Value) -> String {
    let exception = &details["exception"];
    match (exception["description"].as_str(), exception.get("value")) {
        (Some(description), _) => description.to_owned(),
        (None, Some(value)) => format!("{} {value}", details["text"].as_str().unwrap_or("")),
        (None, None) => details.to_string(),
    }
}
