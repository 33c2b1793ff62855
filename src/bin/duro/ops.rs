//! The operator's commands: `inspect` (an object's storage), `export` and `import` (JSON
//! Lines), `backup` (a copy of the store). All but `backup --offline` work against a running
//! host over Cap'n Proto, like `fetch` and `ls`; none activates an object.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;

use duro::Error;
use duro::client::admin::{Encoding, ReadOptions, StoragePage};
use duro::id::ObjectId;

use crate::cli::{Connect, format_rfc3339_ms, report, with_client, write_stdout};

/// Keys asked of the host per page by `inspect` (the host's most).
const PAGE_KEYS: u32 = 1000;

/// Bytes read from the input per write of `import`.
const IMPORT_WRITE_BYTES: usize = 256 << 10;

/// Arguments of `duro inspect`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = INSPECT_HELP)]
pub struct InspectArgs {
    /// The object's namespace.
    pub namespace: String,
    /// The object's name (or give --id).
    pub name: Option<String>,
    /// The object's 64-hex-digit ID.
    #[arg(long, value_name = "HEX", conflicts_with = "name")]
    pub id: Option<String>,
    /// Only keys that begin with P.
    #[arg(long, value_name = "P", default_value = "")]
    pub prefix: String,
    /// From the key K (included).
    #[arg(long, value_name = "K", conflicts_with = "start_after")]
    pub start: Option<String>,
    /// After the key K: the last key shown by a previous, limited run.
    #[arg(long, value_name = "K")]
    pub start_after: Option<String>,
    /// Show at most N keys [default: all, read a page of 1000 at a time].
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Print one JSON document (streamed: keys are never all held in memory).
    #[arg(long)]
    pub json: bool,
}

const INSPECT_HELP: &str = "Shows what the object has stored, as it is durable now (writes not \
yet committed are not seen): its alarm, then one line per key, `KEY = VALUE`. A typed value of \
a Rust class is decoded to JSON; raw bytes show as a JSON string when they are UTF-8, else as \
base64 (`b64:...`); keys alike. The object is not activated and its requests are not held up.\n\n\
With --json: {\"namespace\", \"id\", \"name\", \"alarm_ms\", \"entries\": [{\"key\" or \
\"key_b64\", \"encoding\": \"cbor\" | \"raw\", \"value\" (decoded, or the text) or \"value_b64\"}], \
\"more\"}.\n\n\
Exit status: 0 on success; 1 when the host could not be reached; 2 when an argument was refused \
(an unknown namespace, a bad ID).";

/// Arguments of `duro export`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = EXPORT_HELP)]
pub struct ExportArgs {
    /// The namespaces to export [default: every namespace of the host].
    pub namespaces: Vec<String>,
    /// Write to FILE (created with mode 0600; an existing file is refused) instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

const EXPORT_HELP: &str = "Writes every object of the namespaces (keys, values, names, creation \
times, alarms) as JSON Lines, from one consistent snapshot taken while the host serves; the \
format is in the README (\"Export and import\"). The export holds each namespace's secret, which \
makes its IDs valid: keep it as safe as the data dir.\n\n\
Exit status: 0 on success; 1 when the host could not be reached or the export failed; 2 when \
an argument was refused.";

/// Arguments of `duro import`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = IMPORT_HELP)]
pub struct ImportArgs {
    /// Read the export from FILE instead of stdin.
    #[arg(long, short = 'i', value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Replace the data of objects that have some; without it they are conflicts.
    #[arg(long)]
    pub overwrite: bool,
}

const IMPORT_HELP: &str = "Writes an export into the host, all of it or nothing, in one \
transaction once the whole input arrived. An object that already has data is a conflict unless \
--overwrite; a namespace that has objects under another secret refuses the import; an empty one \
takes the export's secret, so the exported IDs stay valid. Live instances of the imported \
objects are reset.\n\n\
Exit status: 0 on success; 1 when the host could not be reached; 2 when the import was refused \
(a malformed line, a conflict: the message names the line).";

/// Arguments of `duro backup`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = BACKUP_HELP)]
pub struct BackupArgs {
    /// The dir to write the copy into (created; it must be empty).
    #[arg(value_name = "DIR")]
    pub dest: PathBuf,
    /// Copy a data dir that no host serves, instead of asking a running host.
    #[arg(long, requires = "data")]
    pub offline: bool,
    /// With --offline: the data dir to copy.
    #[arg(long, value_name = "DIR", requires = "offline")]
    pub data: Option<PathBuf>,
}

const BACKUP_HELP: &str = "Writes a consistent, compacted copy of the host's store into DIR as \
DIR/data.mdb, taken while the host serves (writers go on meanwhile); `duro serve --data DIR` \
serves the copy. With --offline --data SRC, copies a data dir no host has open.\n\n\
Exit status: 0 on success; 1 when the host could not be reached or the copy failed; 2 when an \
argument was refused (DIR not empty, SRC in use).";

/// `duro inspect`.
pub fn inspect(connect: &Connect, args: &InspectArgs) -> ExitCode {
    let id = match (&args.id, &args.name) {
        (Some(hex), _) => ObjectId::from_hex(hex).map(Some).map_err(Error::from),
        (None, Some(_)) => Ok(None),
        (None, None) => Err(Error::InvalidArgument(
            "give the object's NAME or its --id".into(),
        )),
    };
    let id = match id {
        Ok(id) => id,
        Err(error) => return report(&error),
    };
    with_client(connect, |client| async move {
        let id = match id {
            Some(id) => id,
            None => {
                let name = args.name.as_deref().unwrap_or_default();
                client.namespace(&args.namespace).id_from_name(name).await?
            }
        };
        let admin = client.admin();
        let mut options = ReadOptions {
            prefix: args.prefix.as_bytes().to_vec(),
            start: args.start.as_ref().map(|k| k.as_bytes().to_vec()),
            start_after: args.start_after.as_ref().map(|k| k.as_bytes().to_vec()),
            limit: PAGE_KEYS,
        };
        let mut left = args.limit.unwrap_or(u64::MAX);
        let mut printer = Printer::new(args, &id);
        loop {
            options.limit = PAGE_KEYS
                .min(u32::try_from(left).unwrap_or(PAGE_KEYS))
                .max(1);
            let page = admin
                .read_storage(&args.namespace, &id, options.clone())
                .await?;
            left -= page.entries.len() as u64;
            printer.page(&page);
            let last = page.entries.last().map(|(key, _, _)| key.clone());
            match last {
                Some(last) if page.more && left > 0 => {
                    options.start = None;
                    options.start_after = Some(last);
                }
                _ => {
                    printer.end(page.more && left == 0);
                    return Ok(());
                }
            }
        }
    })
}

/// Prints `inspect`'s pages as they come.
struct Printer {
    json: bool,
    /// Whether the alarm (and, in JSON, the header) was printed.
    started: bool,
    /// Whether no entry was printed yet.
    first: bool,
    /// The last key printed, for the hint of the next run.
    last: Option<Vec<u8>>,
    header: String,
}

impl Printer {
    fn new(args: &InspectArgs, id: &ObjectId) -> Printer {
        let header = serde_json::json!({
            "namespace": args.namespace,
            "id": id.to_hex(),
            "name": id.name(),
        });
        Printer {
            json: args.json,
            started: false,
            first: true,
            last: None,
            header: header.to_string(),
        }
    }

    fn page(&mut self, page: &StoragePage) {
        let mut out = String::new();
        if !self.started {
            self.started = true;
            if self.json {
                // The header object, left open for the alarm and the entries.
                out.push_str(self.header.trim_end_matches('}'));
                let alarm = page.alarm_ms.map_or("null".to_owned(), |ms| ms.to_string());
                out.push_str(&format!(",\"alarm_ms\":{alarm},\"entries\":["));
            } else if let Some(ms) = page.alarm_ms {
                out.push_str(&format!("alarm {} ({ms})\n", format_rfc3339_ms(ms)));
            }
        }
        for (key, value, encoding) in &page.entries {
            if self.json {
                out.push_str(if self.first { "\n" } else { ",\n" });
                out.push_str(&entry_json(key, value, *encoding).to_string());
            } else {
                out.push_str(&format!(
                    "{} = {}\n",
                    show_bytes(key),
                    show_value(value, *encoding)
                ));
            }
            self.first = false;
            self.last = Some(key.clone());
        }
        write_stdout(out.as_bytes());
    }

    fn end(&mut self, more: bool) {
        if self.json {
            write_stdout(format!("\n],\"more\":{more}}}\n").as_bytes());
        }
        if more && let Some(last) = &self.last {
            eprintln!(
                "more keys follow; the next ones: add --start-after {}",
                shell_word(&String::from_utf8_lossy(last))
            );
        }
    }
}

/// A key or raw bytes for people: a JSON string when UTF-8, else `b64:` and base64.
fn show_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::Value::from(text).to_string(),
        Err(_) => format!("b64:{}", STANDARD.encode(bytes)),
    }
}

fn show_value(value: &[u8], encoding: Encoding) -> String {
    match encoding {
        Encoding::Raw => show_bytes(value),
        Encoding::Cbor => match duro::storage::value::cbor_to_json(value) {
            Ok(json) => json.to_string(),
            Err(_) => format!("cbor-undecodable:{}", STANDARD.encode(value)),
        },
    }
}

fn entry_json(key: &[u8], value: &[u8], encoding: Encoding) -> serde_json::Value {
    let mut entry = serde_json::Map::new();
    match std::str::from_utf8(key) {
        Ok(text) => entry.insert("key".into(), text.into()),
        Err(_) => entry.insert("key_b64".into(), STANDARD.encode(key).into()),
    };
    let decoded = match encoding {
        Encoding::Cbor => duro::storage::value::cbor_to_json(value).ok(),
        Encoding::Raw => std::str::from_utf8(value).ok().map(serde_json::Value::from),
    };
    let name = match encoding {
        Encoding::Cbor => "cbor",
        Encoding::Raw => "raw",
    };
    entry.insert("encoding".into(), name.into());
    match decoded {
        Some(json) => entry.insert("value".into(), json),
        None => entry.insert("value_b64".into(), STANDARD.encode(value).into()),
    };
    serde_json::Value::Object(entry)
}

/// `text` quoted for a POSIX shell.
fn shell_word(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `duro export`.
pub fn export(connect: &Connect, args: &ExportArgs) -> ExitCode {
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => match create_private(path) {
            Ok(file) => Box::new(std::io::BufWriter::new(file)),
            Err(error) => return report(&error),
        },
        None => Box::new(std::io::stdout().lock()),
    };
    let code = with_client(connect, |client| async move {
        let mut chunks = client.admin().export(&args.namespaces);
        while let Some(chunk) = chunks.next().await? {
            out.write_all(&chunk)
                .map_err(|e| Error::Disconnected(format!("writing the export: {e}")))?;
        }
        out.flush()
            .map_err(|e| Error::Disconnected(format!("writing the export: {e}")))?;
        Ok(())
    });
    if code != ExitCode::SUCCESS
        && let Some(path) = &args.output
    {
        // A partial export must not pass for a whole one.
        let _ = std::fs::remove_file(path);
    }
    code
}

/// Creates `path` for writing, readable by its owner only; refuses an existing file.
fn create_private(path: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::InvalidArgument(format!("creating {}: {e}", path.display())))
}

/// `duro import`.
pub fn import(connect: &Connect, args: &ImportArgs) -> ExitCode {
    let mut input: Box<dyn Read> = match &args.input {
        Some(path) => match std::fs::File::open(path) {
            Ok(file) => Box::new(file),
            Err(e) => {
                let message = format!("opening {}: {e}", path.display());
                return report(&Error::InvalidArgument(message));
            }
        },
        None => Box::new(std::io::stdin().lock()),
    };
    with_client(connect, |client| async move {
        let mut import = client.admin().import(args.overwrite);
        let mut buffer = vec![0u8; IMPORT_WRITE_BYTES];
        loop {
            let read = input
                .read(&mut buffer)
                .map_err(|e| Error::InvalidArgument(format!("reading the import: {e}")))?;
            if read == 0 {
                break;
            }
            if import
                .write(Bytes::copy_from_slice(&buffer[..read]))
                .await
                .is_err()
            {
                break;
            }
        }
        let counts = import.finish().await?;
        eprintln!(
            "imported {} namespaces, {} objects, {} keys",
            counts.namespaces, counts.objects, counts.keys
        );
        Ok(())
    })
}

/// `duro backup`.
pub fn backup(connect: &Connect, args: &BackupArgs) -> ExitCode {
    let partial = match prepare_dest(&args.dest) {
        Ok(partial) => partial,
        Err(error) => return report(&error),
    };
    let outcome = match &args.data {
        Some(source) if args.offline => backup_offline(source, &partial),
        _ => {
            let path = partial.clone();
            let code = with_client(connect, |client| async move {
                let mut file = std::fs::File::create(&path).map_err(|e| io_error(&path, e))?;
                let mut chunks = client.admin().backup();
                while let Some(chunk) = chunks.next().await? {
                    file.write_all(&chunk).map_err(|e| io_error(&path, e))?;
                }
                file.sync_all().map_err(|e| io_error(&path, e))
            });
            if code != ExitCode::SUCCESS {
                let _ = std::fs::remove_file(&partial);
                return code;
            }
            Ok(())
        }
    };
    match outcome.and_then(|()| finish_dest(&args.dest, &partial)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            report(&error)
        }
    }
}

/// Makes `dest` (it must be missing or empty); the path the copy is written to first.
fn prepare_dest(dest: &Path) -> Result<PathBuf, Error> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{} is not empty: back up into a new dir",
                    dest.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dest)
                .map_err(|e| Error::InvalidArgument(format!("creating {}: {e}", dest.display())))?;
        }
        Err(e) => {
            return Err(Error::InvalidArgument(format!("{}: {e}", dest.display())));
        }
    }
    Ok(dest.join("data.mdb.partial"))
}

/// Puts the finished copy in place as `data.mdb`, durably.
fn finish_dest(dest: &Path, partial: &Path) -> Result<(), Error> {
    let done = dest.join("data.mdb");
    std::fs::rename(partial, &done).map_err(|e| io_error(&done, e))?;
    std::fs::File::open(dest)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| io_error(dest, e))?;
    eprintln!("backed up into {}", done.display());
    Ok(())
}

fn backup_offline(source: &Path, partial: &Path) -> Result<(), Error> {
    use duro::storage::{Backend, LmdbBackend, LmdbOptions, OpenError};
    if !source.join("data.mdb").is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a data dir (no data.mdb)",
            source.display()
        )));
    }
    let backend = LmdbBackend::open(source, &LmdbOptions::default()).map_err(|e| match e {
        OpenError::Locked(_) => Error::InvalidArgument(format!(
            "{e}: back up the running host with `duro backup DIR` instead"
        )),
        other => Error::InvalidArgument(format!("opening {}: {other}", source.display())),
    })?;
    let file = std::fs::File::create(partial).map_err(|e| io_error(partial, e))?;
    let copy = file.try_clone().map_err(|e| io_error(partial, e))?;
    backend
        .backup(copy)
        .map_err(|e| Error::Disconnected(format!("copying {}: {e}", source.display())))?;
    file.sync_all().map_err(|e| io_error(partial, e))
}

fn io_error(path: &Path, error: std::io::Error) -> Error {
    Error::Disconnected(format!("writing {}: {error}", path.display()))
}
