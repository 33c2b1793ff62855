//! The `Admin` capability: the operator's reads, exports, imports and backups (see
//! `host::operations` for what they do; this only translates).

use std::cell::RefCell;
use std::future::{Future, ready};

use capnp::capability::Rc;

use super::text;
use crate::error::Error;
use crate::host::Host;
use crate::host::operations::{Chunks, Import, ReadOptions, StoragePage};
use crate::storage::value::{TAG_CBOR, TAG_RAW};
use crate::wire::duro_capnp::{ValueEncoding, admin, chunk_stream, import_sink};

pub(super) struct AdminServer {
    pub(super) host: Host,
}

impl admin::Server for AdminServer {
    fn read_storage(
        self: Rc<Self>,
        params: admin::ReadStorageParams,
        mut results: admin::ReadStorageResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let read = (|| {
            let params = params.get()?;
            let namespace = text(params.get_namespace()?)?;
            let id = params.get_id()?;
            let name = text(id.get_name()?)?;
            let name = (!name.is_empty()).then_some(name);
            let options = params.get_options()?;
            let optional = |set: bool, data: capnp::Result<&[u8]>| -> capnp::Result<_> {
                Ok(if set { Some(data?.to_vec()) } else { None })
            };
            let options = ReadOptions {
                prefix: options.get_prefix()?.to_vec(),
                start: optional(options.has_start(), options.get_start())?,
                start_after: optional(options.has_start_after(), options.get_start_after())?,
                limit: options.get_limit(),
            };
            Ok::<_, capnp::Error>(
                self.host
                    .read_storage(namespace, id.get_bytes()?, name, options),
            )
        })();
        async move {
            let page = read?.await?;
            write_page(results.get().init_page(), &page)
        }
    }

    fn export(
        self: Rc<Self>,
        params: admin::ExportParams,
        mut results: admin::ExportResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let names = params.get()?.get_namespaces()?;
            let names = names
                .iter()
                .map(|name| Ok(text(name?)?.to_owned()))
                .collect::<capnp::Result<Vec<String>>>()?;
            let chunks = self.host.export(&names)?;
            results.get().set_stream(stream_client(chunks));
            Ok(())
        })())
    }

    fn import(
        self: Rc<Self>,
        params: admin::ImportParams,
        mut results: admin::ImportResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let import = self.host.import(params.get()?.get_overwrite())?;
            let sink = ImportSinkServer {
                import: RefCell::new(Some(import)),
            };
            results.get().set_sink(capnp_rpc::new_client(sink));
            Ok(())
        })())
    }

    fn backup(
        self: Rc<Self>,
        _: admin::BackupParams,
        mut results: admin::BackupResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            results.get().set_stream(stream_client(self.host.backup()?));
            Ok(())
        })())
    }
}

/// Writes a page of stored entries: each value without its encoding mark, and the encoding.
fn write_page(
    mut out: crate::wire::duro_capnp::storage_page::Builder<'_>,
    page: &StoragePage,
) -> capnp::Result<()> {
    out.set_more(page.more);
    if let Some(at_ms) = page.alarm_ms {
        out.set_has_alarm(true);
        out.set_alarm_ms(at_ms);
    }
    let mut entries = out.init_entries(page.entries.len() as u32);
    for (i, (key, stored)) in page.entries.iter().enumerate() {
        let mut entry = entries.reborrow().get(i as u32);
        entry.set_key(key);
        let (encoding, payload) = match stored.split_first() {
            Some((&TAG_CBOR, payload)) => (ValueEncoding::Cbor, payload),
            Some((&TAG_RAW, payload)) => (ValueEncoding::Raw, payload),
            _ => {
                return Err(capnp::Error::failed(format!(
                    "corrupt storage: the value of key {} has an unknown encoding",
                    String::from_utf8_lossy(key)
                )));
            }
        };
        entry.set_encoding(encoding);
        entry.set_value(payload);
    }
    Ok(())
}

fn stream_client(chunks: Chunks) -> chunk_stream::Client {
    capnp_rpc::new_client(ChunkStreamServer {
        chunks: std::rc::Rc::new(tokio::sync::Mutex::new(chunks)),
    })
}

/// Serves a [`Chunks`]; released, it drops them, which stops the reading thread.
struct ChunkStreamServer {
    /// Held across the wait for the next chunk; a second `next` waits for the first.
    chunks: std::rc::Rc<tokio::sync::Mutex<Chunks>>,
}

impl chunk_stream::Server for ChunkStreamServer {
    fn next(
        self: Rc<Self>,
        _: chunk_stream::NextParams,
        mut results: chunk_stream::NextResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let chunks = self.chunks.clone();
        async move {
            let next = chunks.lock().await.next().await?;
            match next {
                Some(chunk) => results.get().set_chunk(&chunk),
                None => results.get().set_done(true),
            }
            Ok(())
        }
    }
}

struct ImportSinkServer {
    /// Taken by `finish`.
    import: RefCell<Option<Import>>,
}

impl import_sink::Server for ImportSinkServer {
    fn write(
        self: Rc<Self>,
        params: import_sink::WriteParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        // Staged at dispatch, so the bytes land in the order they were sent.
        ready((|| {
            let bytes = params.get()?.get_bytes()?;
            let mut import = self.import.borrow_mut();
            let import = import.as_mut().ok_or_else(finished)?;
            Ok(import.write(bytes)?)
        })())
    }

    fn finish(
        self: Rc<Self>,
        _: import_sink::FinishParams,
        mut results: import_sink::FinishResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let import = self.import.borrow_mut().take();
        async move {
            let report = import.ok_or_else(finished)?.finish().await?;
            let mut out = results.get();
            out.set_namespaces(report.namespaces);
            out.set_objects(report.objects);
            out.set_keys(report.keys);
            Ok(())
        }
    }
}

fn finished() -> capnp::Error {
    Error::InvalidArgument("the import was finished already".into()).into()
}
