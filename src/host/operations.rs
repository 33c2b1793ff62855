//! What an operator does to a running host (the `Admin` capability of the wire contract): read
//! an object's durable storage, export, import, back up. None of it activates an object or
//! waits on its gates: reads are of what has committed.
//!
//! Exports and backups are read on threads of their own, from one snapshot each, and handed
//! over in chunks through a bounded channel (or a pipe), so that a slow reader holds back the
//! reading, not the host's memory. An import is staged in an unlinked temporary file as its
//! bytes arrive, then applied by the engine in one transaction on a blocking thread; every
//! shard then takes the namespaces' new secrets, resets the live instances of the imported
//! objects (their caches knew the old data) and tells its alarm scheduler of their alarms.

use std::future::Future;
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::Host;
use crate::error::Error;
use crate::id::IdMinter;
use crate::storage::{self, Backend, DumpItem, ImportReport, ObjectKey, lines};

/// Exports and backups read at once, per shard: each holds a read snapshot (an LMDB reader
/// slot, and pages the writer may not reuse until it ends) and a thread.
pub const DUMPS_MAX: usize = 4;

/// Bytes of an export chunk: what the reading thread hands over at a time.
pub const CHUNK_BYTES: usize = 256 << 10;

/// Chunks read ahead of the client, per export.
const CHUNKS_AHEAD: usize = 4;

/// Most entries of one `read_storage` page, and the number when none is asked.
pub const READ_LIMIT_MAX: u32 = 1000;
pub const READ_LIMIT_DEFAULT: u32 = 100;

/// A page ends early once its keys and values pass this many bytes.
pub const PAGE_BYTES_MAX: usize = 4 << 20;

/// What the reset of an imported object's live instance tells its callers.
const IMPORTED: &str = "its storage was replaced by an import";

/// The range of [`Host::read_storage`].
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// Only keys that begin with it.
    pub prefix: Vec<u8>,
    /// From this key (included).
    pub start: Option<Vec<u8>>,
    /// After this key (excluded): the last key of the previous page.
    pub start_after: Option<Vec<u8>>,
    /// At most this many entries: 1 to [`READ_LIMIT_MAX`]; 0 means [`READ_LIMIT_DEFAULT`].
    pub limit: u32,
}

/// One page of an object's durable storage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoragePage {
    /// Keys and values as stored (see `storage::value`), in key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether keys remain in the range after this page.
    pub more: bool,
    /// The object's alarm, ms since the Unix epoch.
    pub alarm_ms: Option<u64>,
}

/// A stream of bytes read on another thread: an export's lines or a backup's file.
pub struct Chunks {
    source: Source,
}

enum Source {
    Channel(mpsc::Receiver<Result<Bytes, Error>>),
    Pipe {
        pipe: tokio::net::unix::pipe::Receiver,
        /// The copy's outcome, once it ended.
        copied: oneshot::Receiver<Result<(), Error>>,
        _permit: OwnedSemaphorePermit,
    },
}

impl Chunks {
    /// The next bytes (never empty), or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        match &mut self.source {
            Source::Channel(chunks) => chunks.recv().await.transpose(),
            Source::Pipe { pipe, copied, .. } => {
                use tokio::io::AsyncReadExt;
                let mut buffer = vec![0u8; CHUNK_BYTES];
                let read = pipe
                    .read(&mut buffer)
                    .await
                    .map_err(|e| storage_error(&format!("reading the backup: {e}")))?;
                if read > 0 {
                    buffer.truncate(read);
                    return Ok(Some(Bytes::from(buffer)));
                }
                match copied.await {
                    Ok(Ok(())) => Ok(None),
                    Ok(Err(error)) => Err(error),
                    Err(_) => Err(storage_error("the backup thread died")),
                }
            }
        }
    }
}

/// An import in progress: its bytes so far, staged on disk.
pub struct Import {
    host: Host,
    overwrite: bool,
    file: std::fs::File,
    bytes: u64,
}

impl Import {
    /// Stages the next bytes of the export. A write to a file the OS caches: done at once,
    /// so that writes land in the order they were made.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.file
            .write_all(bytes)
            .map_err(|e| storage_error(&format!("staging the import: {e}")))?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Applies what was written, all or nothing, then brings every shard up to date.
    pub async fn finish(self) -> Result<ImportReport, Error> {
        let mut file = self.file;
        let backend = self.host.inner.storage.backend.clone();
        let served: Vec<String> = self.host.inner.namespaces.keys().cloned().collect();
        let overwrite = self.overwrite;
        let applied = tokio::task::spawn_blocking(move || {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| storage::Error::Io(format!("reading the staged import: {e}")))?;
            let mut reader = lines::Reader::new(BufReader::new(file), served);
            let line = reader.line();
            backend
                .import(&mut reader, overwrite)
                .map_err(|error| match error {
                    storage::Error::ImportConflict(message) => {
                        storage::Error::ImportConflict(format!("line {}: {message}", line.get()))
                    }
                    other => other,
                })
        })
        .await
        .map_err(|_| storage_error("the import thread died"))?;
        let report = applied.map_err(import_error)?;
        tracing::info!(
            bytes = self.bytes,
            objects = report.objects,
            keys = report.keys,
            "import applied"
        );
        let report = Arc::new(report);
        refresh_shards(&self.host, &report).await;
        Ok(Arc::try_unwrap(report).unwrap_or_else(|shared| (*shared).clone()))
    }
}

impl Host {
    /// One page of the durable storage of the object `id` (checked by its namespace, with
    /// `name` if given), and its alarm.
    ///
    /// The ID is checked at once; the page is read on a blocking thread when the engine's
    /// reads are remote (`Backend::remote_reads`), so the event loop never waits on it.
    pub fn read_storage(
        &self,
        namespace: &str,
        id: &[u8],
        name: Option<&str>,
        options: ReadOptions,
    ) -> impl Future<Output = Result<StoragePage, Error>> + use<> {
        let checked = self
            .namespace(namespace)
            .ok_or_else(|| unknown(namespace))
            .and_then(|ns| Ok((ns.core.tag, ns.check_id(id, name)?)));
        let backend = self.inner.storage.backend.clone();
        async move {
            let (tag, id) = checked?;
            let object = ObjectKey {
                tag,
                id: *id.bytes(),
            };
            if !backend.remote_reads() {
                return read_page(backend.as_ref(), &object, &options);
            }
            tokio::task::spawn_blocking(move || read_page(backend.as_ref(), &object, &options))
                .await
                .map_err(|_| storage_error("the read's thread died"))?
        }
    }

    /// An export of `namespaces` (every namespace of the host when empty) as JSON Lines
    /// (`storage::lines`), from one snapshot taken now.
    pub fn export(&self, namespaces: &[String]) -> Result<Chunks, Error> {
        let names = self.dump_namespaces(namespaces)?;
        let permit = self.dump_permit()?;
        let backend = self.inner.storage.backend.clone();
        let (sender, receiver) = mpsc::channel(CHUNKS_AHEAD);
        std::thread::Builder::new()
            .name("duro-export".into())
            .spawn(move || export_thread(backend, names, sender, permit))
            .map_err(|e| storage_error(&format!("starting the export: {e}")))?;
        Ok(Chunks {
            source: Source::Channel(receiver),
        })
    }

    /// A consistent, compacted copy of the store, in the engine's format.
    pub fn backup(&self) -> Result<Chunks, Error> {
        let permit = self.dump_permit()?;
        let (sender, pipe) = tokio::net::unix::pipe::pipe()
            .map_err(|e| storage_error(&format!("making the backup pipe: {e}")))?;
        let fd = sender
            .into_blocking_fd()
            .map_err(|e| storage_error(&format!("making the backup pipe: {e}")))?;
        let backend = self.inner.storage.backend.clone();
        let (done, copied) = oneshot::channel();
        std::thread::Builder::new()
            .name("duro-backup".into())
            .spawn(move || {
                let outcome = backend.backup(std::fs::File::from(fd));
                let _ = done.send(outcome.map_err(|e| match e {
                    storage::Error::Unsupported(message) => Error::InvalidArgument(message),
                    other => storage_error(&other.to_string()),
                }));
            })
            .map_err(|e| storage_error(&format!("starting the backup: {e}")))?;
        Ok(Chunks {
            source: Source::Pipe {
                pipe,
                copied,
                _permit: permit,
            },
        })
    }

    /// Begins an import; see [`Import`].
    pub fn import(&self, overwrite: bool) -> Result<Import, Error> {
        if self.inner.storage.cluster.is_some() {
            // The other nodes' instances of the imported objects would keep their caches, and
            // the import's writes carry no shard's epoch.
            return Err(Error::InvalidArgument(
                "a node of a cluster does not import: stop the nodes, import with one \
                 `duro serve --store URL` (not a node), then start the nodes again"
                    .into(),
            ));
        }
        let file = tempfile::tempfile()
            .map_err(|e| storage_error(&format!("making the import's staging file: {e}")))?;
        Ok(Import {
            host: self.clone(),
            overwrite,
            file,
            bytes: 0,
        })
    }

    fn dump_namespaces(&self, namespaces: &[String]) -> Result<Vec<String>, Error> {
        if namespaces.is_empty() {
            return Ok(self.inner.namespaces.keys().cloned().collect());
        }
        let mut names = Vec::with_capacity(namespaces.len());
        for name in namespaces {
            if !self.inner.namespaces.contains_key(name) {
                return Err(unknown(name));
            }
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names.sort();
        Ok(names)
    }

    fn dump_permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.inner.dumps.clone().try_acquire_owned().map_err(|_| {
            Error::Overloaded(format!(
                "{DUMPS_MAX} exports or backups are running: wait for one to end"
            ))
        })
    }

    /// After an import: takes the new secrets, and resets and re-reads the alarms of the
    /// imported objects of this shard.
    fn imported(&self, report: &ImportReport) {
        let backend = &self.inner.storage.backend;
        for name in &report.new_secrets {
            let Some(core) = self.inner.namespaces.get(name) else {
                continue;
            };
            match backend.namespace(name) {
                Ok(record) => *core.minter.borrow_mut() = IdMinter::new(name, &record.secret),
                Err(error) => {
                    tracing::error!(%error, namespace = %name, "reading an imported secret")
                }
            }
        }
        for (name, id) in &report.written {
            if self.inner.placement.is_remote(id) {
                continue;
            }
            let Some(core) = self.inner.namespaces.get(name) else {
                continue;
            };
            let live = core.activations.borrow().get(id).cloned();
            if let Some(activation) = live {
                activation.reset(IMPORTED);
            }
            let object = ObjectKey {
                tag: core.tag,
                id: *id,
            };
            match backend.alarm(&object) {
                Ok(alarm) => self.inner.storage.alarm_committed(object, alarm),
                Err(error) => tracing::error!(%error, "reading an imported alarm"),
            }
        }
    }
}

/// One page of the durable storage of `object`, and its alarm: what `Admin.readStorage` and
/// the console show. A read of the engine only, on the caller's thread; no object is
/// activated.
pub(crate) fn read_page(
    backend: &dyn Backend,
    object: &ObjectKey,
    options: &ReadOptions,
) -> Result<StoragePage, Error> {
    let limit = match options.limit {
        0 => READ_LIMIT_DEFAULT,
        n if n <= READ_LIMIT_MAX => n,
        n => {
            return Err(Error::InvalidArgument(format!(
                "limit must be at most {READ_LIMIT_MAX}, got {n}"
            )));
        }
    } as usize;
    let start = match (&options.start, &options.start_after) {
        (Some(_), Some(_)) => {
            let message = "start and startAfter cannot be given together";
            return Err(Error::InvalidArgument(message.into()));
        }
        (Some(start), None) => Bound::Included(std::cmp::max(start, &options.prefix).as_slice()),
        (None, Some(after)) if after.as_slice() >= options.prefix.as_slice() => {
            Bound::Excluded(after.as_slice())
        }
        _ => Bound::Included(options.prefix.as_slice()),
    };
    let end = storage::successor(&options.prefix);
    let end = end
        .as_ref()
        .map_or(Bound::Unbounded, |e| Bound::Excluded(e.as_slice()));
    // One more than asked says whether more remain.
    let mut entries = backend
        .scan(object, start, end, false, limit + 1)
        .map_err(|e| storage_error(&e.to_string()))?;
    let mut more = entries.len() > limit;
    entries.truncate(limit);
    let mut bytes = 0;
    if let Some(cut) = entries.iter().position(|(k, v)| {
        bytes += k.len() + v.len();
        bytes > PAGE_BYTES_MAX
    }) {
        // Always at least one entry, so that paging moves on.
        entries.truncate(cut.max(1));
        more = true;
    }
    let alarm_ms = backend
        .alarm(object)
        .map_err(|e| storage_error(&e.to_string()))?;
    Ok(StoragePage {
        entries,
        more,
        alarm_ms,
    })
}

/// Brings every shard up to date after an import, and waits until each has.
async fn refresh_shards(host: &Host, report: &Arc<ImportReport>) {
    host.imported(report);
    let Some(peers) = host.peers() else {
        return;
    };
    let mine = host.placement().shard;
    let mut waits = Vec::new();
    for shard in (0..peers.count()).filter(|&shard| shard != mine) {
        let (done, wait) = oneshot::channel();
        let report = report.clone();
        peers.run_on(
            shard,
            Box::new(move |host: &Host| {
                host.imported(&report);
                let _ = done.send(());
            }),
        );
        waits.push(wait);
    }
    for wait in waits {
        let _ = wait.await;
    }
}

/// Reads the dump of `names` from one snapshot and sends it as chunks of lines.
fn export_thread(
    backend: Arc<dyn Backend>,
    names: Vec<String>,
    sender: mpsc::Sender<Result<Bytes, Error>>,
    _permit: OwnedSemaphorePermit,
) {
    let mut buffer = lines::header();
    let mut open = true;
    let mut visit = |item: DumpItem| {
        lines::write_item(&item, &mut buffer);
        if buffer.len() >= CHUNK_BYTES {
            let chunk = Bytes::from(std::mem::take(&mut buffer));
            // The receiver is gone when the client released the stream: stop reading.
            open = sender.blocking_send(Ok(chunk)).is_ok();
        }
        open
    };
    let outcome = backend.export(&names, &mut visit);
    let last = match outcome {
        Ok(()) if buffer.is_empty() => return,
        Ok(()) => Ok(Bytes::from(buffer)),
        Err(error) => Err(storage_error(&error.to_string())),
    };
    let _ = sender.blocking_send(last);
}

fn unknown(namespace: &str) -> Error {
    Error::InvalidArgument(format!("unknown namespace {namespace:?}"))
}

fn storage_error(message: &str) -> Error {
    Error::Disconnected(format!("storage error: {message}"))
}

/// An import refused by its rules is a bad argument; the engine failing is not.
fn import_error(error: storage::Error) -> Error {
    match error {
        storage::Error::InvalidImport(_)
        | storage::Error::ImportConflict(_)
        | storage::Error::NamespaceNameTooLong { .. }
        | storage::Error::EngineKeyTooLarge { .. }
        | storage::Error::MapFull { .. } => Error::InvalidArgument(error.to_string()),
        other => storage_error(&other.to_string()),
    }
}
