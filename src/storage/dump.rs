//! The rules of an import, shared by every engine: [`Importer`] walks the items of a dump
//! ([`DumpItem`]) and says what to write to an [`ImportTarget`], one engine's transaction in
//! progress. Whatever it refuses, the engine drops its transaction, so that an import writes all
//! of its items or nothing.
//!
//! Rules:
//! - A namespace comes once, before its objects; an object comes once, inside its namespace's
//!   part, before its keys.
//! - A namespace recorded with the same secret is used as it is. One recorded with another
//!   secret takes the dump's secret only if it has no objects: its IDs are checked by the
//!   secret, so two secrets cannot serve one namespace. One not recorded is created.
//! - An object that has data in the target is a conflict, unless the import overwrites: then
//!   its keys and alarm are deleted first, so that it ends exactly as the dump says.
//! - An object keeps its creation time and name from the dump. One with neither keys nor an
//!   alarm leaves no row (the registry holds only objects with data).

use std::collections::HashSet;

use super::Error;
use super::backend::{DumpItem, ImportReport, ObjectKey, ObjectRecord};

/// One engine's write transaction, as an import uses it.
pub(crate) trait ImportTarget {
    /// The tag and secret of the namespace `name`, if recorded.
    fn namespace(&mut self, name: &str) -> Result<Option<(u32, [u8; 32])>, Error>;
    /// Records a new namespace; returns its tag.
    fn create_namespace(&mut self, name: &str, secret: &[u8; 32]) -> Result<u32, Error>;
    /// Replaces the secret of a recorded namespace, keeping its tag.
    fn set_secret(&mut self, name: &str, tag: u32, secret: &[u8; 32]) -> Result<(), Error>;
    /// Whether the namespace `tag` has an object with data.
    fn has_objects(&mut self, tag: u32) -> Result<bool, Error>;
    /// Whether the object has data (a registry row).
    fn has_object(&mut self, object: &ObjectKey) -> Result<bool, Error>;
    /// Deletes every key, the alarm and the registry row of the object.
    fn clear_object(&mut self, object: &ObjectKey) -> Result<(), Error>;
    /// Writes the object's registry row.
    fn put_row(&mut self, object: &ObjectKey, created_ms: u64, name: &str) -> Result<(), Error>;
    /// Deletes the object's registry row.
    fn delete_row(&mut self, object: &ObjectKey) -> Result<(), Error>;
    /// Sets the object's alarm.
    fn put_alarm(&mut self, object: &ObjectKey, at_ms: u64) -> Result<(), Error>;
    /// Writes a key (its value as stored).
    fn put_key(&mut self, object: &ObjectKey, key: &[u8], value: &[u8]) -> Result<(), Error>;
}

/// The object being imported: where its keys go, and whether it holds data.
struct Current {
    object: ObjectKey,
    holds_data: bool,
}

/// Applies a dump's items to a target under the rules of the module docs.
pub(crate) struct Importer {
    overwrite: bool,
    namespace: Option<(String, u32)>,
    object: Option<Current>,
    namespaces_seen: HashSet<String>,
    objects_seen: HashSet<ObjectKey>,
    report: ImportReport,
}

impl Importer {
    pub(crate) fn new(overwrite: bool) -> Importer {
        Importer {
            overwrite,
            namespace: None,
            object: None,
            namespaces_seen: HashSet::new(),
            objects_seen: HashSet::new(),
            report: ImportReport::default(),
        }
    }

    /// Applies every item, then ends the last object; what was written.
    pub(crate) fn run(
        mut self,
        target: &mut dyn ImportTarget,
        items: &mut dyn Iterator<Item = Result<DumpItem, Error>>,
    ) -> Result<ImportReport, Error> {
        for item in items {
            self.apply(target, item?)?;
        }
        self.end_object(target)?;
        Ok(self.report)
    }

    fn apply(&mut self, target: &mut dyn ImportTarget, item: DumpItem) -> Result<(), Error> {
        match item {
            DumpItem::Namespace { name, secret } => self.namespace(target, name, &secret),
            DumpItem::Object { record, alarm_ms } => self.object(target, record, alarm_ms),
            DumpItem::Key { key, value } => {
                let Some(current) = &mut self.object else {
                    return Err(invalid("a key before any object"));
                };
                current.holds_data = true;
                target.put_key(&current.object, &key, &value)?;
                self.report.keys += 1;
                Ok(())
            }
        }
    }

    fn namespace(
        &mut self,
        target: &mut dyn ImportTarget,
        name: String,
        secret: &[u8; 32],
    ) -> Result<(), Error> {
        self.end_object(target)?;
        if !self.namespaces_seen.insert(name.clone()) {
            return Err(invalid(&format!("namespace {name:?} appears twice")));
        }
        let tag = match target.namespace(&name)? {
            Some((tag, recorded)) if recorded == *secret => tag,
            Some((tag, _)) => {
                if target.has_objects(tag)? {
                    return Err(Error::ImportConflict(format!(
                        "namespace {name:?} has objects under another secret: its IDs and the \
                         imported ones cannot both be valid; import into a host whose namespace \
                         {name:?} is empty"
                    )));
                }
                target.set_secret(&name, tag, secret)?;
                self.report.new_secrets.push(name.clone());
                tag
            }
            None => target.create_namespace(&name, secret)?,
        };
        self.report.namespaces += 1;
        self.namespace = Some((name, tag));
        Ok(())
    }

    fn object(
        &mut self,
        target: &mut dyn ImportTarget,
        record: ObjectRecord,
        alarm_ms: Option<u64>,
    ) -> Result<(), Error> {
        self.end_object(target)?;
        let Some((namespace, tag)) = &self.namespace else {
            return Err(invalid("an object before any namespace"));
        };
        let object = ObjectKey {
            tag: *tag,
            id: record.id,
        };
        let hex = crate::id::to_hex(&record.id);
        if !self.objects_seen.insert(object) {
            return Err(invalid(&format!("object {hex} appears twice")));
        }
        if target.has_object(&object)? {
            if !self.overwrite {
                return Err(Error::ImportConflict(format!(
                    "object {hex} of namespace {namespace:?} already has data (overwrite \
                     replaces it)"
                )));
            }
            target.clear_object(&object)?;
        }
        target.put_row(
            &object,
            record.created_ms,
            record.name.as_deref().unwrap_or(""),
        )?;
        if let Some(at_ms) = alarm_ms {
            target.put_alarm(&object, at_ms)?;
        }
        self.report.objects += 1;
        self.report.written.push((namespace.clone(), record.id));
        self.object = Some(Current {
            object,
            holds_data: alarm_ms.is_some(),
        });
        Ok(())
    }

    /// Ends the object being imported: one without data leaves no row.
    fn end_object(&mut self, target: &mut dyn ImportTarget) -> Result<(), Error> {
        match self.object.take() {
            Some(current) if !current.holds_data => target.delete_row(&current.object),
            _ => Ok(()),
        }
    }
}

fn invalid(message: &str) -> Error {
    Error::InvalidImport(message.to_owned())
}
