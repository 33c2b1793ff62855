//! Export, import and backup of the LMDB engine: a dump read from one read transaction, a dump
//! written in one write transaction (the rules are `storage::dump`'s), and LMDB's own
//! compacting copy.

use std::ops::Bound;
use std::os::fd::AsRawFd;

use lmdb::{RwTransaction, Transaction, WriteFlags};

use super::super::backend::{AlarmWrite, DumpItem, ImportReport, ObjectKey};
use super::super::dump::{ImportTarget, Importer};
use super::*;

impl LmdbBackend {
    pub(super) fn export_dump(
        &self,
        namespaces: &[String],
        visit: &mut dyn FnMut(DumpItem) -> bool,
    ) -> Result<(), Error> {
        let err = |e| self.err(e);
        let txn = self.env.begin_ro_txn().map_err(err)?;
        for name in namespaces {
            let key = format!("{NS_PREFIX}{name}").into_bytes();
            let Some(bytes) = get_opt(&txn, self.meta, &key).map_err(err)? else {
                continue;
            };
            let record = decode_namespace(bytes)?;
            let item = DumpItem::Namespace {
                name: name.clone(),
                secret: record.secret,
            };
            if !visit(item) || !self.export_objects(&txn, record.tag, visit)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The objects of the namespace `tag` and their keys; false when `visit` asked to stop.
    fn export_objects(
        &self,
        txn: &lmdb::RoTransaction,
        tag: u32,
        visit: &mut dyn FnMut(DumpItem) -> bool,
    ) -> Result<bool, Error> {
        let err = |e| self.err(e);
        let cursor = txn.open_ro_cursor(self.objects).map_err(err)?;
        let tag_bytes = tag.to_be_bytes();
        let mut entry = cursor_get(&cursor, Some(&tag_bytes), MDB_SET_RANGE).map_err(err)?;
        while let Some((key, row)) = entry {
            if !key.starts_with(&tag_bytes) {
                break;
            }
            let record = decode_record(key, row)?;
            let object = ObjectKey { tag, id: record.id };
            let prefix = object_prefix(&object);
            let alarm_ms = match get_opt(txn, self.alarm_of, &prefix).map_err(err)? {
                Some(bytes) => {
                    Some(decode_u64(bytes).ok_or_else(|| Error::Corrupt(not_u64("alarm_of")))?)
                }
                None => None,
            };
            if !visit(DumpItem::Object { record, alarm_ms }) {
                return Ok(false);
            }
            let keys = txn.open_ro_cursor(self.kv).map_err(err)?;
            let mut walker = Walker::new(keys, prefix, false, self.map_bytes);
            walker.seek_forward(Bound::Unbounded)?;
            while let Some(chunk) = walker.next_chunk()? {
                for (key, value) in chunk {
                    if !visit(DumpItem::Key { key, value }) {
                        return Ok(false);
                    }
                }
            }
            entry = cursor_get(&cursor, None, MDB_NEXT).map_err(err)?;
        }
        Ok(true)
    }

    pub(super) fn import_dump(
        &self,
        items: &mut dyn Iterator<Item = Result<DumpItem, Error>>,
        overwrite: bool,
    ) -> Result<ImportReport, Error> {
        let txn = self.env.begin_rw_txn().map_err(|e| self.err(e))?;
        let mut target = Target { backend: self, txn };
        let report = Importer::new(overwrite).run(&mut target, items)?;
        // LMDB's commit fsyncs; on any error above, `txn` drops and aborts.
        target.txn.commit().map_err(|e| self.err(e))?;
        Ok(report)
    }

    pub(super) fn copy_compacted(&self, out: std::fs::File) -> Result<(), Error> {
        // SAFETY: the environment is open for the life of `self`; LMDB copies it from one
        // read transaction of its own, which may run beside the writer; `out` stays open
        // until the call returns.
        let rc = unsafe {
            lmdb_sys::mdb_env_copyfd2(self.env.env(), out.as_raw_fd(), lmdb_sys::MDB_CP_COMPACT)
        };
        match rc {
            0 => Ok(()),
            code => Err(self.err(lmdb::Error::from_err_code(code))),
        }
    }
}

/// An import's write transaction.
struct Target<'e> {
    backend: &'e LmdbBackend,
    txn: RwTransaction<'e>,
}

impl Target<'_> {
    fn err(&self, e: lmdb::Error) -> Error {
        self.backend.err(e)
    }
}

impl ImportTarget for Target<'_> {
    fn namespace(&mut self, name: &str) -> Result<Option<(u32, [u8; 32])>, Error> {
        if name.len() > MAX_NAMESPACE_NAME {
            return Err(Error::NamespaceNameTooLong {
                len: name.len(),
                max: MAX_NAMESPACE_NAME,
            });
        }
        let key = format!("{NS_PREFIX}{name}").into_bytes();
        match get_opt(&self.txn, self.backend.meta, &key).map_err(|e| self.err(e))? {
            Some(bytes) => decode_namespace(bytes).map(|r| Some((r.tag, r.secret))),
            None => Ok(None),
        }
    }

    fn create_namespace(&mut self, name: &str, secret: &[u8; 32]) -> Result<u32, Error> {
        let meta = self.backend.meta;
        let tag = match get_opt(&self.txn, meta, NEXT_TAG_KEY).map_err(|e| self.err(e))? {
            Some(bytes) => decode_u32(bytes).ok_or_else(|| Error::Corrupt(not_u32("next_tag")))?,
            None => 1,
        };
        let next = tag.checked_add(1).ok_or(Error::NamespaceTagsExhausted)?;
        self.set_secret(name, tag, secret)?;
        self.txn
            .put(
                meta,
                &NEXT_TAG_KEY,
                &next.to_be_bytes(),
                WriteFlags::empty(),
            )
            .map_err(|e| self.backend.err(e))?;
        Ok(tag)
    }

    fn set_secret(&mut self, name: &str, tag: u32, secret: &[u8; 32]) -> Result<(), Error> {
        let key = format!("{NS_PREFIX}{name}").into_bytes();
        let mut record = Vec::with_capacity(36);
        record.extend_from_slice(&tag.to_be_bytes());
        record.extend_from_slice(secret);
        let meta = self.backend.meta;
        self.txn
            .put(meta, &key, &record, WriteFlags::empty())
            .map_err(|e| self.backend.err(e))
    }

    fn has_objects(&mut self, tag: u32) -> Result<bool, Error> {
        let err = |e| self.backend.err(e);
        let cursor = self.txn.open_ro_cursor(self.backend.objects).map_err(err)?;
        let tag_bytes = tag.to_be_bytes();
        let first = cursor_get(&cursor, Some(&tag_bytes), MDB_SET_RANGE).map_err(err)?;
        Ok(first.is_some_and(|(key, _)| key.starts_with(&tag_bytes)))
    }

    fn has_object(&mut self, object: &ObjectKey) -> Result<bool, Error> {
        let prefix = object_prefix(object);
        let row = get_opt(&self.txn, self.backend.objects, &prefix).map_err(|e| self.err(e))?;
        Ok(row.is_some())
    }

    fn clear_object(&mut self, object: &ObjectKey) -> Result<(), Error> {
        let prefix = object_prefix(object);
        let backend = self.backend;
        backend
            .clear_object(&mut self.txn, &prefix)
            .map_err(|e| backend.err(e))?;
        backend.write_alarm(&mut self.txn, &prefix, AlarmWrite::Delete)?;
        self.delete_row(object)
    }

    fn put_row(&mut self, object: &ObjectKey, created_ms: u64, name: &str) -> Result<(), Error> {
        let row = encode_record(created_ms, name);
        let objects = self.backend.objects;
        self.txn
            .put(objects, &object_prefix(object), &row, WriteFlags::empty())
            .map_err(|e| self.backend.err(e))
    }

    fn delete_row(&mut self, object: &ObjectKey) -> Result<(), Error> {
        let objects = self.backend.objects;
        match self.txn.del(objects, &object_prefix(object), None) {
            Ok(()) | Err(lmdb::Error::NotFound) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    fn put_alarm(&mut self, object: &ObjectKey, at_ms: u64) -> Result<(), Error> {
        let prefix = object_prefix(object);
        self.backend
            .write_alarm(&mut self.txn, &prefix, AlarmWrite::Set(at_ms))
    }

    fn put_key(&mut self, object: &ObjectKey, key: &[u8], value: &[u8]) -> Result<(), Error> {
        if key.len() > MAX_KEY {
            return Err(Error::EngineKeyTooLarge {
                len: key.len(),
                max: MAX_KEY,
            });
        }
        let prefix = object_prefix(object);
        let stored = encode_value(key, value)?;
        let kv = self.backend.kv;
        self.txn
            .put(kv, &kv_address(&prefix, key), &stored, WriteFlags::empty())
            .map_err(|e| self.backend.err(e))
    }
}
