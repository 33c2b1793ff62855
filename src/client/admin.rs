//! The operator's side of the client: [`RemoteAdmin`] reads an object's durable storage,
//! exports, imports and backs up (the `Admin` capability of the wire contract).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Client, Command, Pending, Shared, driver};
use crate::error::Error;
use crate::id::ObjectId;
use crate::wire::duro_capnp::{ValueEncoding, chunk_stream, host};

/// Chunks the client reads ahead of its caller, per export or backup.
const CHUNKS_AHEAD: usize = 2;

/// Writes of an import queued ahead of the connection.
const WRITES_AHEAD: usize = 4;

/// The range of [`RemoteAdmin::read_storage`] (see `ReadOptions` in the schema).
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    pub prefix: Vec<u8>,
    pub start: Option<Vec<u8>>,
    pub start_after: Option<Vec<u8>>,
    /// 1 to 1000; 0 for the host's default (100).
    pub limit: u32,
}

/// How a stored value was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Bytes as given (`put_bytes`, and every value of an external class).
    Raw,
    /// A typed value of a Rust class, as CBOR.
    Cbor,
}

/// One page of an object's durable storage.
#[derive(Clone, Debug, Default)]
pub struct StoragePage {
    /// Keys, values (without their encoding mark) and encodings, in key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>, Encoding)>,
    /// Whether keys remain after this page: pass the last key as `start_after` for them.
    pub more: bool,
    /// The object's alarm, in ms since the Unix epoch.
    pub alarm_ms: Option<u64>,
}

/// What an import wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportCounts {
    pub namespaces: u32,
    pub objects: u64,
    pub keys: u64,
}

/// The operator's capability of a host. Cheap to clone.
#[derive(Clone)]
pub struct RemoteAdmin {
    shared: Arc<Shared>,
}

impl Client {
    /// The host's operator capability (`Host.admin`).
    pub fn admin(&self) -> RemoteAdmin {
        RemoteAdmin {
            shared: self.shared.clone(),
        }
    }
}

impl RemoteAdmin {
    /// One page of the durable storage of the object `id` of `namespace`, and its alarm;
    /// no object is activated.
    pub fn read_storage(
        &self,
        namespace: &str,
        id: &ObjectId,
        options: ReadOptions,
    ) -> Pending<StoragePage> {
        let (namespace, id) = (namespace.to_owned(), id.clone());
        self.shared.call(move |reply| {
            Command::Admin(Box::new(move |host: &host::Client| {
                let admin = host.admin_request().send().pipeline.get_admin();
                let mut call = admin.read_storage_request();
                let mut params = call.get();
                params.set_namespace(&namespace);
                let mut out = params.reborrow().init_id();
                out.set_bytes(id.bytes());
                out.set_name(id.name().unwrap_or(""));
                let mut range = params.init_options();
                range.set_prefix(&options.prefix);
                if let Some(start) = &options.start {
                    range.set_start(start);
                }
                if let Some(after) = &options.start_after {
                    range.set_start_after(after);
                }
                range.set_limit(options.limit);
                driver::answer(reply, call.send().promise, |r| {
                    read_page(r.get()?.get_page()?)
                });
            }))
        })
    }

    /// An export of `namespaces` (every one when empty) as JSON Lines, read in chunks.
    pub fn export(&self, namespaces: &[String]) -> Chunks {
        let namespaces = namespaces.to_vec();
        self.chunks(move |host| {
            let admin = host.admin_request().send().pipeline.get_admin();
            let mut call = admin.export_request();
            let mut names = call.get().init_namespaces(namespaces.len() as u32);
            for (i, name) in namespaces.iter().enumerate() {
                names.set(i as u32, name);
            }
            call.send().pipeline.get_stream()
        })
    }

    /// A consistent copy of the host's store (an LMDB `data.mdb`), read in chunks.
    pub fn backup(&self) -> Chunks {
        self.chunks(|host| {
            let admin = host.admin_request().send().pipeline.get_admin();
            admin.backup_request().send().pipeline.get_stream()
        })
    }

    fn chunks(
        &self,
        open: impl FnOnce(&host::Client) -> chunk_stream::Client + Send + 'static,
    ) -> Chunks {
        let (sender, receiver) = mpsc::channel(CHUNKS_AHEAD);
        self.shared
            .send(Command::Admin(Box::new(move |host: &host::Client| {
                let stream = open(host);
                tokio::task::spawn_local(pull(stream, sender));
            })));
        Chunks {
            receiver,
            _client: self.shared.clone(),
        }
    }

    /// Begins an import: write the export's bytes, then [`Import::finish`].
    pub fn import(&self, overwrite: bool) -> Import {
        let (sender, receiver) = mpsc::channel(WRITES_AHEAD);
        let (done, outcome) = oneshot::channel();
        self.shared
            .send(Command::Admin(Box::new(move |host: &host::Client| {
                tokio::task::spawn_local(push(host.clone(), overwrite, receiver, done));
            })));
        Import {
            sender,
            outcome,
            _client: self.shared.clone(),
        }
    }
}

/// The bytes of an export or a backup, as the host sends them.
pub struct Chunks {
    receiver: mpsc::Receiver<Result<Bytes, Error>>,
    /// Keeps the connection open while the chunks are read.
    _client: Arc<Shared>,
}

impl Chunks {
    /// The next bytes, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        match self.receiver.recv().await {
            Some(chunk) => chunk.map(Some),
            None => Ok(None),
        }
    }
}

/// An import being written.
pub struct Import {
    sender: mpsc::Sender<Bytes>,
    outcome: oneshot::Receiver<Result<ImportCounts, Error>>,
    _client: Arc<Shared>,
}

impl Import {
    /// Sends the next bytes of the export (any split). Fails when the import already failed:
    /// [`Import::finish`] then says why.
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), Error> {
        self.sender
            .send(bytes)
            .await
            .map_err(|_| Error::Disconnected("the import ended early: finish says why".into()))
    }

    /// Applies what was written (all or nothing) and says what it wrote.
    pub async fn finish(self) -> Result<ImportCounts, Error> {
        drop(self.sender);
        self.outcome
            .await
            .unwrap_or_else(|_| Err(super::driver_stopped()))
    }
}

/// Reads `stream` to its end into `sender`, stopping when its reader is gone.
async fn pull(stream: chunk_stream::Client, sender: mpsc::Sender<Result<Bytes, Error>>) {
    loop {
        let answer = stream.next_request().send().promise;
        let answer = tokio::select! {
            answer = answer => answer,
            () = sender.closed() => return,
        };
        let chunk = answer.and_then(|answer| {
            let answer = answer.get()?;
            Ok((!answer.get_done())
                .then(|| Bytes::copy_from_slice(answer.get_chunk().unwrap_or(&[]))))
        });
        match chunk {
            Ok(Some(chunk)) => {
                if sender.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(error) => {
                let _ = sender.send(Err(error.into())).await;
                return;
            }
        }
    }
}

/// Streams the bytes of `receiver` to a new import's sink, then finishes it.
async fn push(
    host: host::Client,
    overwrite: bool,
    mut receiver: mpsc::Receiver<Bytes>,
    done: oneshot::Sender<Result<ImportCounts, Error>>,
) {
    let admin = host.admin_request().send().pipeline.get_admin();
    let mut call = admin.import_request();
    call.get().set_overwrite(overwrite);
    let sink = call.send().pipeline.get_sink();
    let outcome = async {
        while let Some(bytes) = receiver.recv().await {
            let mut write = sink.write_request();
            write.get().set_bytes(&bytes);
            write.send().await?;
        }
        let answer = sink.finish_request().send().promise.await?;
        let answer = answer.get()?;
        Ok::<_, capnp::Error>(ImportCounts {
            namespaces: answer.get_namespaces(),
            objects: answer.get_objects(),
            keys: answer.get_keys(),
        })
    };
    let _ = done.send(outcome.await.map_err(Error::from));
}

fn read_page(
    page: crate::wire::duro_capnp::storage_page::Reader<'_>,
) -> capnp::Result<StoragePage> {
    let entries = page
        .get_entries()?
        .iter()
        .map(|entry| {
            let encoding = match entry.get_encoding()? {
                ValueEncoding::Raw => Encoding::Raw,
                ValueEncoding::Cbor => Encoding::Cbor,
            };
            Ok((
                entry.get_key()?.to_vec(),
                entry.get_value()?.to_vec(),
                encoding,
            ))
        })
        .collect::<capnp::Result<_>>()?;
    Ok(StoragePage {
        entries,
        more: page.get_more(),
        alarm_ms: page.get_has_alarm().then(|| page.get_alarm_ms()),
    })
}
