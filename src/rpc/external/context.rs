//! What an external instance is handed: its `ObjectContext`, with its ID, its `Storage` (and
//! the `Transaction`s it begins), its env, and its WebSockets (`acceptWebSocket` for the
//! upgrade offered by the event holding the gate, `getWebSockets`, the auto-response).
//!
//! Every server here reaches the object through a [`ContextCore`] that the proxy holds while
//! its binding to the instance lasts, and the servers only weakly: once the object is evicted
//! or reset, the context's calls fail with `disconnected`, so a provider that kept one can
//! never write to an object that has a newer activation. There is no call naming another
//! object's storage: a context is the storage of the object it was made for.
//!
//! Each storage call goes through the object's input gate ([`Turns::enter_now`]) and runs at
//! dispatch when it can: capnp-rpc dispatches the calls that arrive on a connection in order
//! before it reads the next message, so a write the instance sent before its answer is among
//! the object's writes (its `written_seq`) when the answer reaches the proxy, and the output
//! gate waits for it.

use std::cell::RefCell;
use std::future::{Future, ready};
use std::rc::{Rc, Weak};

use bytes::Bytes;

use super::env;
use super::sockets::{self, Alive};
use super::turns::Turns;
use crate::gate::TaskId;
use crate::host::{Env, State, UpgradeToken};
use crate::rpc::connection::{Connection, InFlight, RESPONSE_BYTES_MAX};
use crate::storage::{self, ListOptions, Outcome, Storage, value};
use crate::wire::duro_capnp::storage as storage_capnp;
use crate::wire::duro_capnp::{list_options, object_context, storage_entry, transaction};

/// Most bytes of keys and values one `Transaction` buffers before its commit. The writes of a
/// transaction wait in the host's memory until it ends, and a provider could otherwise make
/// them grow without end; past it a write fails, naming the bound.
pub const TRANSACTION_BYTES_MAX: usize = 16 << 20;

/// Entries a `list` reads from the storage at a time: it stops as soon as the answer would
/// pass what one message can carry, so its memory follows that bound, not the object's size.
const LIST_PAGE_ENTRIES: usize = 256;

/// What the servers of one instance's context share (see the module docs).
pub(super) struct ContextCore {
    pub(super) state: State,
    pub(super) turns: Rc<Turns>,
    /// The provider's connection: the instance's calls count against its bounds.
    pub(super) connection: Rc<Connection>,
    /// The host's namespaces, for the instance's env.
    pub(super) env: Env,
    /// The WebSocket upgrades offered by the requests being delivered, by the task of their
    /// event: `acceptWebSocket` accepts the one of the event holding the gate.
    pub(super) upgrades: Rc<Upgrades>,
    /// Held while the binding lasts: the sockets' capabilities handed out live as long.
    pub(super) alive: Alive,
}

/// The WebSocket upgrades offered to an instance by the requests in delivery (see
/// [`ContextCore::upgrades`]): few, one per request in progress.
pub(super) type Upgrades = RefCell<Vec<(TaskId, UpgradeToken)>>;

/// The `ObjectContext` of `core`'s instance.
pub(super) fn client(core: &Rc<ContextCore>) -> object_context::Client {
    let core = Rc::downgrade(core);
    let storage: storage_capnp::Client =
        capnp_rpc::new_client(StorageServer { core: core.clone() });
    capnp_rpc::new_client(ContextServer { core, storage })
}

fn gone() -> capnp::Error {
    capnp::Error::disconnected(
        "the object was evicted or reset: its context is no longer valid; the host asks for a \
         new instance when the object is used again"
            .into(),
    )
}

fn live(core: &Weak<ContextCore>) -> capnp::Result<Rc<ContextCore>> {
    core.upgrade().ok_or_else(gone)
}

/// The storage's errors at the capnp edge: a reset object's storage is `disconnected` (the
/// caller's stub breaks too); a limit or a bad argument is `failed`, naming the rule.
fn storage_error(error: storage::Error) -> capnp::Error {
    match error {
        storage::Error::Reset(_) | storage::Error::Closed => {
            capnp::Error::disconnected(error.to_string())
        }
        other => capnp::Error::failed(other.to_string()),
    }
}

struct ContextServer {
    core: Weak<ContextCore>,
    /// Made once: every `storage()` answers the same capability.
    storage: storage_capnp::Client,
}

impl object_context::Server for ContextServer {
    fn id(
        self: capnp::capability::Rc<Self>,
        _: object_context::IdParams,
        mut results: object_context::IdResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let core = live(&self.core)?;
            let id = core.state.id();
            let mut results = results.get();
            results.set_hex(id.to_hex());
            let mut builder = results.init_id();
            builder.set_bytes(id.bytes());
            builder.set_name(id.name().unwrap_or(""));
            Ok(())
        })())
    }

    fn storage(
        self: capnp::capability::Rc<Self>,
        _: object_context::StorageParams,
        mut results: object_context::StorageResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        results.get().set_storage(self.storage.clone());
        ready(Ok(()))
    }

    fn env(
        self: capnp::capability::Rc<Self>,
        _: object_context::EnvParams,
        mut results: object_context::EnvResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let core = live(&self.core)?;
            let host = core.env.host().ok_or_else(gone)?;
            let env = env::host(&host, &core.connection, &core.turns);
            results.get().set_host(env);
            Ok(())
        })())
    }

    fn accept_web_socket(
        self: capnp::capability::Rc<Self>,
        params: object_context::AcceptWebSocketParams,
        mut results: object_context::AcceptWebSocketResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let tags = params.get()?.get_tags()?;
            let tags: Vec<&str> = tags
                .iter()
                .map(|tag| Ok(tag?.to_str()?))
                .collect::<capnp::Result<_>>()?;
            let socket = self.accept(&tags)?;
            let core = live(&self.core)?;
            results
                .get()
                .set_socket(sockets::client(socket, &core.alive, &core.turns));
            Ok(())
        })())
    }

    fn get_web_sockets(
        self: capnp::capability::Rc<Self>,
        params: object_context::GetWebSocketsParams,
        mut results: object_context::GetWebSocketsResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let core = live(&self.core)?;
            let params = params.get()?;
            let tag = if params.has_tag() {
                Some(params.get_tag()?.to_str()?)
            } else {
                None
            };
            let found = core.state.get_web_sockets(tag);
            let mut list = results.get().init_sockets(found.len() as u32);
            for (at, socket) in found.into_iter().enumerate() {
                let client = sockets::client(socket, &core.alive, &core.turns);
                list.set(at as u32, client.client.hook);
            }
            Ok(())
        })())
    }

    fn set_web_socket_auto_response(
        self: capnp::capability::Rc<Self>,
        params: object_context::SetWebSocketAutoResponseParams,
        _: object_context::SetWebSocketAutoResponseResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let core = live(&self.core)?;
            let params = params.get()?;
            if !params.has_request() {
                core.state.set_web_socket_auto_response(None);
                return Ok(());
            }
            let request = params.get_request()?.to_str()?;
            let response = params.get_response()?.to_str()?;
            core.state
                .set_web_socket_auto_response(Some((request, response)));
            Ok(())
        })())
    }
}

impl ContextServer {
    /// Accepts the upgrade of the event holding the gate (see `acceptWebSocket`).
    fn accept(&self, tags: &[&str]) -> capnp::Result<crate::host::WebSocket> {
        let core = live(&self.core)?;
        let task = core.turns.holder().ok_or_else(|| {
            capnp::Error::failed(
                "acceptWebSocket is called while handling the upgrade request (the event \
                 holding the object's input gate), and no event holds it now"
                    .into(),
            )
        })?;
        let token = core
            .upgrades
            .borrow()
            .iter()
            .find(|(holder, _)| *holder == task)
            .map(|(_, token)| *token);
        let token = token.ok_or_else(|| {
            capnp::Error::failed(
                "the request being handled is not a WebSocket upgrade (no Upgrade: websocket, \
                 or its caller cannot complete one)"
                    .into(),
            )
        })?;
        let mut request = http::Request::new(());
        request.extensions_mut().insert(token);
        Ok(core.state.accept_web_socket(&request, tags)?)
    }
}

/// A storage call taken in: done at dispatch, or waiting for the gate.
enum Step<T, F> {
    Done(capnp::Result<T>),
    Wait(F),
}

/// Runs `op` on `core`'s storage through the gate (see the module docs), with `bytes` of
/// the call counted against the provider's connection while it is in progress.
fn run<T, F>(
    core: &Weak<ContextCore>,
    bytes: usize,
    op: F,
) -> impl Future<Output = capnp::Result<T>> + 'static + use<T, F>
where
    T: 'static,
    F: FnOnce(&Storage) -> Result<T, storage::Error> + 'static,
{
    let started = live(core).and_then(|core| {
        let in_flight = InFlight::admit(&core.connection, bytes)?;
        Ok((core, in_flight))
    });
    let step = match &started {
        Ok((core, _)) => match core.turns.enter_now() {
            Some(entry) => {
                let done = op(core.state.storage()).map_err(storage_error);
                drop(entry);
                Step::Done(done)
            }
            None => Step::Wait(op),
        },
        Err(_) => Step::Wait(op),
    };
    async move {
        let (core, _in_flight) = started?;
        match step {
            Step::Done(done) => done,
            Step::Wait(op) => {
                let _entry = core.turns.enter().await;
                op(core.state.storage()).map_err(storage_error)
            }
        }
    }
}

/// The bytes a list of keys takes in a call.
fn keys_bytes(keys: &[Vec<u8>]) -> usize {
    keys.iter().map(|key| key.len() + 16).sum()
}

fn keys_of(list: capnp::data_list::Reader<'_>) -> capnp::Result<Vec<Vec<u8>>> {
    list.iter().map(|key| Ok(key?.to_vec())).collect()
}

/// The raw value stored under `key`, if any.
fn get_raw(storage: &Storage, key: &[u8]) -> Result<Option<Bytes>, storage::Error> {
    match storage.get_encoded(key)? {
        Some(stored) => value::decode_raw(&stored).map(Some),
        None => Ok(None),
    }
}

type Entries = Vec<(Vec<u8>, Bytes)>;

/// The entries `options` asks for, with raw values, read a page at a time by `page`; an error
/// (the inner one) once they would pass what one answer can carry.
fn list_paged(
    mut options: ListOptions,
    mut page: impl FnMut(&ListOptions) -> Result<Entries, storage::Error>,
) -> Result<capnp::Result<Entries>, storage::Error> {
    let mut remaining = options.limit.unwrap_or(usize::MAX);
    let (mut entries, mut bytes) = (Vec::new(), 0);
    while remaining > 0 {
        let asked = remaining.min(LIST_PAGE_ENTRIES);
        options.limit = Some(asked);
        let read = page(&options)?;
        let full = read.len() == asked;
        remaining -= read.len();
        for (key, stored) in read {
            bytes += key.len() + stored.len() + 16;
            if bytes > RESPONSE_BYTES_MAX {
                return Ok(Err(too_large(bytes)));
            }
            entries.push((key, value::decode_raw(&stored)?));
        }
        let Some((last, _)) = entries.last().filter(|_| full) else {
            break;
        };
        // The next page: after the last key, in the walk's direction.
        if options.reverse {
            options.end = Some(last.clone());
        } else {
            options.start = None;
            options.start_after = Some(last.clone());
        }
    }
    Ok(Ok(entries))
}

fn too_large(bytes: usize) -> capnp::Error {
    capnp::Error::failed(format!(
        "the answer would take more than {bytes} bytes, over the limit of {RESPONSE_BYTES_MAX} \
         bytes (RESPONSE_BYTES_MAX): ask for fewer entries (ListOptions.limit)"
    ))
}

/// Writes `entries` into a results list, once their size is known to fit in a message.
fn write_entries(
    entries: &[(Vec<u8>, Bytes)],
    mut list: capnp::struct_list::Builder<'_, storage_entry::Owned>,
) {
    for (i, (key, value)) in entries.iter().enumerate() {
        let mut entry = list.reborrow().get(i as u32);
        entry.set_key(key);
        entry.set_value(value);
    }
}

/// Fails when `entries` would not fit in one message back; else counts their bytes as owed to
/// the connection until they are written.
fn check_answer(entries: &[(Vec<u8>, Bytes)], connection: &Connection) -> capnp::Result<()> {
    let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
    if bytes > RESPONSE_BYTES_MAX {
        return Err(too_large(bytes));
    }
    connection.account.owe(bytes);
    Ok(())
}

/// `Storage.list`'s options as the storage takes them: an unset (null) field sets no bound.
fn list_options(reader: list_options::Reader<'_>) -> capnp::Result<ListOptions> {
    let bound = |set: bool, data: capnp::Result<&[u8]>| -> capnp::Result<Option<Vec<u8>>> {
        Ok(if set { Some(data?.to_vec()) } else { None })
    };
    Ok(ListOptions {
        start: bound(reader.has_start(), reader.get_start())?,
        start_after: bound(reader.has_start_after(), reader.get_start_after())?,
        end: bound(reader.has_end(), reader.get_end())?,
        prefix: bound(reader.has_prefix(), reader.get_prefix())?,
        reverse: reader.get_reverse(),
        limit: match reader.get_limit() {
            0 => None,
            limit => Some(limit as usize),
        },
    })
}

/// The bytes of list options in a call.
fn options_bytes(options: &ListOptions) -> usize {
    let bounds = [
        &options.start,
        &options.start_after,
        &options.end,
        &options.prefix,
    ];
    bounds.iter().map(|b| b.as_ref().map_or(0, Vec::len)).sum()
}

struct StorageServer {
    core: Weak<ContextCore>,
}

impl storage_capnp::Server for StorageServer {
    fn get(
        self: capnp::capability::Rc<Self>,
        params: storage_capnp::GetParams,
        mut results: storage_capnp::GetResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let key = params.get().and_then(|p| Ok(p.get_key()?.to_vec()));
        let call = key.map(|key| run(&self.core, key.len(), move |storage| get_raw(storage, &key)));
        async move {
            let found = call?.await?;
            let mut results = results.get();
            results.set_found(found.is_some());
            results.set_value(found.as_deref().unwrap_or_default());
            Ok(())
        }
    }

    fn get_many(
        self: capnp::capability::Rc<Self>,
        params: storage_capnp::GetManyParams,
        mut results: storage_capnp::GetManyResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let keys = params.get().and_then(|p| keys_of(p.get_keys()?));
        let call = keys.map(|mut keys| {
            run(&self.core, keys_bytes(&keys), move |storage| {
                storage.check_count(keys.len())?;
                keys.sort();
                keys.dedup();
                let mut found = Vec::new();
                for key in keys {
                    if let Some(value) = get_raw(storage, &key)? {
                        found.push((key, value));
                    }
                }
                Ok(found)
            })
        });
        let core = self.core.clone();
        async move {
            let found = call?.await?;
            check_answer(&found, &live(&core)?.connection)?;
            write_entries(&found, results.get().init_entries(found.len() as u32));
            Ok(())
        }
    }

    fn put(
        self: capnp::capability::Rc<Self>,
        params: storage_capnp::PutParams,
        _: storage_capnp::PutResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let entry = params
            .get()
            .and_then(|p| Ok((p.get_key()?.to_vec(), value::encode_raw(p.get_value()?))));
        match entry {
            Ok((key, value)) => {
                let bytes = key.len() + value.len();
                let call = run(&self.core, bytes, move |storage| {
                    storage.put_encoded(vec![(key, value)])
                });
                futures::future::Either::Left(call)
            }
            Err(error) => futures::future::Either::Right(ready(Err(error))),
        }
    }

    fn put_many(
        self: capnp::capability::Rc<Self>,
        params: storage_capnp::PutManyParams,
        _: storage_capnp::PutManyResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let entries = params.get().and_then(|p| {
            p.get_entries()?
                .iter()
                .map(|e| Ok((e.get_key()?.to_vec(), value::encode_raw(e.get_value()?))))
                .collect::<capnp::Result<Vec<_>>>()
        });
        match entries {
            Ok(entries) => {
                let bytes = entries.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
                let call = run(&self.core, bytes, move |storage| {
                    storage.check_count(entries.len())?;
                    storage.put_encoded(entries)
                });
                futures::future::Either::Left(call)
            }
            Err(error) => futures::future::Either::Right(ready(Err(error))),
        }
    }

    fn delete(
        self: capnp::capability::Rc<Self>,
        params: storage_capnp::DeleteParams,
        mut results: storage_capnp::DeleteResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let key = params.get().and_then(|p| Ok(p.get_key()?.to_vec()));
        let call = key.map(|key| {
            run(&self.core, key.len(), move |storage| {
                storage.delete_encoded(&[key.as_slice()])
            })
        });
        async move {
            let existed = call?.await?;
            results.get().set_existed(existed == 1);
            Ok(())
        }
    }

    fn delete_many(
        self: capnp::capability::Rc<Self>,
        params: storage_capnp::DeleteManyParams,
        mut results: storage_capnp::DeleteManyResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let keys = params.get().and_then(|p| keys_of(p.get_keys()?));
        let call = keys.map(|keys| {
            run(&self.core, keys_bytes(&keys), move |storage| {
                storage.check_count(keys.len())?;
                let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                storage.delete_encoded(&keys)
            })
        });
        async move {
            let count = call?.await?;
            results.get().set_count(count as u32);
            Ok(())
        }
    }

    fn list(
        self: capnp::capability::Rc<Self>,
        params: storage_capnp::ListParams,
        mut results: storage_capnp::ListResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let options = params.get().and_then(|p| list_options(p.get_options()?));
        let call = options.map(|options| {
            let bytes = options_bytes(&options);
            run(&self.core, bytes, move |storage| {
                list_paged(options, |page| storage.list_encoded(page))
            })
        });
        let core = self.core.clone();
        async move {
            let entries = call?.await??;
            check_answer(&entries, &live(&core)?.connection)?;
            write_entries(&entries, results.get().init_entries(entries.len() as u32));
            Ok(())
        }
    }

    fn delete_all(
        self: capnp::capability::Rc<Self>,
        _: storage_capnp::DeleteAllParams,
        _: storage_capnp::DeleteAllResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        run(&self.core, 0, |storage| storage.store().delete_all())
    }

    fn transaction(
        self: capnp::capability::Rc<Self>,
        _: storage_capnp::TransactionParams,
        mut results: storage_capnp::TransactionResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready(live(&self.core).map(|core| {
            let txn = storage::Transaction::begin(core.state.storage().store().clone());
            let server = TransactionServer {
                core: self.core.clone(),
                txn,
                ended: std::cell::Cell::new(false),
                buffered: std::cell::Cell::new(0),
            };
            results.get().set_txn(capnp_rpc::new_client(server));
        }))
    }

    fn sync(
        self: capnp::capability::Rc<Self>,
        _: storage_capnp::SyncParams,
        _: storage_capnp::SyncResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let started = live(&self.core).and_then(|core| {
            let in_flight = InFlight::admit(&core.connection, 0)?;
            // Every write made before the call: those that arrived before it.
            let seq = core.state.storage().store().written_seq();
            Ok((core, in_flight, seq))
        });
        async move {
            let (core, _in_flight, seq) = started?;
            // Held until durable: no event is delivered while a sync is in progress.
            let _entry = core.turns.enter().await;
            let store = core.state.storage().store().clone();
            store.wait_durable(seq).await.map_err(storage_error)
        }
    }

    fn get_alarm(
        self: capnp::capability::Rc<Self>,
        _: storage_capnp::GetAlarmParams,
        mut results: storage_capnp::GetAlarmResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let call = run(&self.core, 0, |storage| storage.store().alarm());
        async move {
            let alarm = call.await?;
            let mut results = results.get();
            results.set_has_alarm(alarm.is_some());
            results.set_at_ms(alarm.unwrap_or(0));
            Ok(())
        }
    }

    fn set_alarm(
        self: capnp::capability::Rc<Self>,
        params: storage_capnp::SetAlarmParams,
        _: storage_capnp::SetAlarmResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let at_ms = params.get().map(|p| p.get_at_ms());
        let call = at_ms.map(|at_ms| {
            run(&self.core, 0, move |storage| {
                storage.store().write_alarm(Some(at_ms))
            })
        });
        async move { call?.await }
    }

    fn delete_alarm(
        self: capnp::capability::Rc<Self>,
        _: storage_capnp::DeleteAlarmParams,
        _: storage_capnp::DeleteAlarmResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        run(&self.core, 0, |storage| storage.store().write_alarm(None))
    }
}

/// A `Transaction` (see the schema): optimistic, so it holds no lock a provider could keep
/// from the object. Its writes are buffered in the storage's own [`storage::Transaction`],
/// which applies them as one write at `commit`, unless a write of the object landed since it
/// began.
struct TransactionServer {
    core: Weak<ContextCore>,
    txn: storage::Transaction,
    /// Set by `commit` and `rollback`: later calls fail.
    ended: std::cell::Cell<bool>,
    /// The bytes of the writes buffered so far (see [`TRANSACTION_BYTES_MAX`]).
    buffered: std::cell::Cell<usize>,
}

impl TransactionServer {
    /// Counts a write of `bytes` against [`TRANSACTION_BYTES_MAX`].
    fn buffer(&self, bytes: usize) -> capnp::Result<()> {
        let buffered = self.buffered.get() + bytes;
        if buffered > TRANSACTION_BYTES_MAX {
            return Err(capnp::Error::failed(format!(
                "the transaction would buffer {buffered} bytes of writes, over the limit of \
                 {TRANSACTION_BYTES_MAX} (TRANSACTION_BYTES_MAX): commit in smaller ones"
            )));
        }
        self.buffered.set(buffered);
        Ok(())
    }
}

/// Runs `op` on `server`'s transaction, as a storage call of the instance (through the gate).
fn in_txn<T, F>(
    server: &TransactionServer,
    bytes: usize,
    op: F,
) -> impl Future<Output = capnp::Result<T>> + 'static + use<T, F>
where
    T: 'static,
    F: FnOnce(&storage::Transaction) -> Result<T, storage::Error> + 'static,
{
    let ended = server.ended.get();
    let txn = server.txn.clone();
    run(&server.core, bytes, move |_| {
        if ended {
            return Err(storage::Error::TransactionEnded);
        }
        op(&txn)
    })
}

impl transaction::Server for TransactionServer {
    fn get(
        self: capnp::capability::Rc<Self>,
        params: transaction::GetParams,
        mut results: transaction::GetResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let key = params.get().and_then(|p| Ok(p.get_key()?.to_vec()));
        let call = key.map(|key| {
            in_txn(&self, key.len(), move |txn| {
                match txn.get_encoded(&key)? {
                    Some(stored) => value::decode_raw(&stored).map(Some),
                    None => Ok(None),
                }
            })
        });
        async move {
            let found = call?.await?;
            let mut results = results.get();
            results.set_found(found.is_some());
            results.set_value(found.as_deref().unwrap_or_default());
            Ok(())
        }
    }

    fn put(
        self: capnp::capability::Rc<Self>,
        params: transaction::PutParams,
        _: transaction::PutResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let entry = params
            .get()
            .and_then(|p| Ok((p.get_key()?.to_vec(), p.get_value()?.to_vec())));
        let call = entry.and_then(|(key, value)| {
            self.buffer(key.len() + value.len())?;
            Ok(in_txn(&self, key.len() + value.len(), move |txn| {
                txn.put_bytes(&key, &value).now_or_closed()
            }))
        });
        async move { call?.await }
    }

    fn delete(
        self: capnp::capability::Rc<Self>,
        params: transaction::DeleteParams,
        mut results: transaction::DeleteResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let key = params.get().and_then(|p| Ok(p.get_key()?.to_vec()));
        let call = key.and_then(|key| {
            self.buffer(key.len())?;
            Ok(in_txn(&self, key.len(), move |txn| {
                txn.delete(&key).now_or_closed()
            }))
        });
        async move {
            let existed = call?.await?;
            results.get().set_existed(existed);
            Ok(())
        }
    }

    fn list(
        self: capnp::capability::Rc<Self>,
        params: transaction::ListParams,
        mut results: transaction::ListResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let options = params.get().and_then(|p| list_options(p.get_options()?));
        let call = options.map(|options| {
            in_txn(&self, options_bytes(&options), move |txn| {
                list_paged(options, |page| txn.list_encoded(page))
            })
        });
        let core = self.core.clone();
        async move {
            let entries = call?.await??;
            check_answer(&entries, &live(&core)?.connection)?;
            write_entries(&entries, results.get().init_entries(entries.len() as u32));
            Ok(())
        }
    }

    fn commit(
        self: capnp::capability::Rc<Self>,
        _: transaction::CommitParams,
        mut results: transaction::CommitResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let call = in_txn(&self, 0, |txn| txn.finish(true));
        self.ended.set(true);
        async move {
            let outcome = call.await?;
            results
                .get()
                .set_committed(matches!(outcome, Outcome::Done));
            Ok(())
        }
    }

    fn rollback(
        self: capnp::capability::Rc<Self>,
        _: transaction::RollbackParams,
        _: transaction::RollbackResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        self.txn.rollback();
        self.ended.set(true);
        ready(Ok(()))
    }
}

/// The storage's async calls that never wait (a transaction's `put` and `delete` buffer in
/// memory), run to their end now.
trait NowOrClosed<T> {
    fn now_or_closed(self) -> Result<T, storage::Error>;
}

impl<T, F: Future<Output = Result<T, storage::Error>>> NowOrClosed<T> for F {
    fn now_or_closed(self) -> Result<T, storage::Error> {
        use futures::FutureExt;
        // They complete at their first poll; were one ever to wait, failing is safer than
        // blocking the event loop.
        std::pin::pin!(self)
            .now_or_never()
            .unwrap_or(Err(storage::Error::Closed))
    }
}
