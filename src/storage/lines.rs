//! The export format: a dump ([`DumpItem`]s) as JSON Lines, one item a line, in dump order.
//! It is an API (files outlive builds): change it only with [`FORMAT`].
//!
//! ```text
//! {"duro_export":1}                                        first line: the format
//! {"namespace":"counter","secret":"<base64>"}              a namespace and its 32-byte secret
//! {"object":"<64 hex>","created_ms":1700000000000,"name":"alice","alarm_ms":1700000060000}
//! {"key":"count","cbor_b64":"GCo="}                        a key of the object above
//! ```
//!
//! - An object line belongs to the namespace line above it, a key line to the object line above
//!   it. `name` and `alarm_ms` are left out when the object has none.
//! - A key is `"key"` (its bytes as a JSON string) when it is UTF-8, else `"key_b64"`.
//! - A value is one of: `"cbor_b64"` (a typed value of a Rust class: its CBOR, base64),
//!   `"text"` (raw bytes that are UTF-8), `"raw_b64"` (other raw bytes), or `"stored_b64"`
//!   (a stored value of an encoding this build does not know, whole). Base64 is standard,
//!   with padding.
//! - Unknown fields are refused, so that a line is never half understood.
//!
//! Reading checks every line: the format line first, an object's ID is checked by its
//! namespace's secret (and its name, if any, derives it), and only the namespaces a host
//! serves are accepted. A line is at most [`LINE_BYTES_MAX`] bytes.

use std::cell::Cell;
use std::io::BufRead;
use std::rc::Rc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::Error;
use super::backend::{DumpItem, ObjectRecord};
use super::value::{TAG_CBOR, TAG_RAW};
use crate::id::{self, IdMinter};

/// The version of the format, on the first line.
pub const FORMAT: u32 = 1;

/// The longest line an import reads: a key and a value of the largest sizes the storage
/// limits allow, base64, fit well below it; it bounds what one line makes the host hold.
pub const LINE_BYTES_MAX: usize = 16 << 20;

/// Every field a line may have; which are set says what the line is.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(skip_serializing_if = "Option::is_none")]
    duro_export: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alarm_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cbor_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stored_b64: Option<String>,
}

impl Line {
    /// The names of the fields that are set.
    fn set_fields(&self) -> Vec<&'static str> {
        let fields: [(&'static str, bool); 13] = [
            ("duro_export", self.duro_export.is_some()),
            ("namespace", self.namespace.is_some()),
            ("secret", self.secret.is_some()),
            ("object", self.object.is_some()),
            ("created_ms", self.created_ms.is_some()),
            ("name", self.name.is_some()),
            ("alarm_ms", self.alarm_ms.is_some()),
            ("key", self.key.is_some()),
            ("key_b64", self.key_b64.is_some()),
            ("cbor_b64", self.cbor_b64.is_some()),
            ("text", self.text.is_some()),
            ("raw_b64", self.raw_b64.is_some()),
            ("stored_b64", self.stored_b64.is_some()),
        ];
        fields
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| name)
            .collect()
    }
}

/// The first line of every export.
pub fn header() -> Vec<u8> {
    let mut out = line_bytes(&Line {
        duro_export: Some(FORMAT),
        ..Line::default()
    });
    out.push(b'\n');
    out
}

/// Appends `item` as one line (with its newline) to `out`.
pub fn write_item(item: &DumpItem, out: &mut Vec<u8>) {
    let line = match item {
        DumpItem::Namespace { name, secret } => Line {
            namespace: Some(name.clone()),
            secret: Some(STANDARD.encode(secret)),
            ..Line::default()
        },
        DumpItem::Object { record, alarm_ms } => Line {
            object: Some(id::to_hex(&record.id)),
            created_ms: Some(record.created_ms),
            name: record.name.clone(),
            alarm_ms: *alarm_ms,
            ..Line::default()
        },
        DumpItem::Key { key, value } => key_line(key, value),
    };
    out.extend_from_slice(&line_bytes(&line));
    out.push(b'\n');
}

fn key_line(key: &[u8], value: &[u8]) -> Line {
    let mut line = Line::default();
    match std::str::from_utf8(key) {
        Ok(text) => line.key = Some(text.to_owned()),
        Err(_) => line.key_b64 = Some(STANDARD.encode(key)),
    }
    match value.split_first() {
        Some((&TAG_CBOR, payload)) => line.cbor_b64 = Some(STANDARD.encode(payload)),
        Some((&TAG_RAW, payload)) => match std::str::from_utf8(payload) {
            Ok(text) => line.text = Some(text.to_owned()),
            Err(_) => line.raw_b64 = Some(STANDARD.encode(payload)),
        },
        _ => line.stored_b64 = Some(STANDARD.encode(value)),
    }
    line
}

fn line_bytes(line: &Line) -> Vec<u8> {
    // A struct of strings and integers always serializes.
    serde_json::to_vec(line).unwrap_or_default()
}

/// Reads a dump's lines back as items, checking each; an error names its line. Ends at the
/// first error.
pub struct Reader<R> {
    input: R,
    /// The namespaces the host serves: no other is accepted.
    served: Vec<String>,
    /// The number of the line read last, shared with whoever reports errors found later
    /// (e.g. a conflict the engine finds for the item of that line).
    line: Rc<Cell<u64>>,
    minter: Option<IdMinter>,
    /// Whether the last item was a namespace or an object: a key needs an object above it.
    in_object: bool,
    buffer: Vec<u8>,
    failed: bool,
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R, served: Vec<String>) -> Reader<R> {
        Reader {
            input,
            served,
            line: Rc::new(Cell::new(0)),
            minter: None,
            in_object: false,
            buffer: Vec::new(),
            failed: false,
        }
    }

    /// The number of the line read last (1 is the first).
    pub fn line(&self) -> Rc<Cell<u64>> {
        self.line.clone()
    }

    fn fail(&self, message: impl std::fmt::Display) -> Error {
        Error::InvalidImport(format!("line {}: {message}", self.line.get()))
    }

    /// The next line without its newline, or `None` at the end.
    fn read_line(&mut self) -> Result<Option<&[u8]>, Error> {
        self.buffer.clear();
        let limit = LINE_BYTES_MAX as u64 + 1;
        let read = <&mut R as std::io::Read>::take(&mut self.input, limit)
            .read_until(b'\n', &mut self.buffer)
            .map_err(|e| Error::Io(format!("reading the import: {e}")))?;
        if read == 0 {
            return Ok(None);
        }
        self.line.set(self.line.get() + 1);
        if self.buffer.last() == Some(&b'\n') {
            self.buffer.pop();
        } else if read as u64 == limit {
            return Err(self.fail(format_args!("longer than {LINE_BYTES_MAX} bytes")));
        }
        Ok(Some(&self.buffer))
    }

    fn next_item(&mut self) -> Result<Option<DumpItem>, Error> {
        let Some(bytes) = self.read_line()? else {
            if self.line.get() == 0 {
                return Err(Error::InvalidImport(
                    "empty input: not a duro export".into(),
                ));
            }
            return Ok(None);
        };
        let parsed: Result<Line, _> = serde_json::from_slice(bytes);
        let line = parsed.map_err(|e| self.fail(format_args!("not an export line: {e}")))?;
        if self.line.get() == 1 {
            return match line.duro_export {
                Some(FORMAT) => self.next_item(),
                Some(other) => Err(self.fail(format_args!(
                    "export format {other}; this build reads format {FORMAT}"
                ))),
                None => Err(self.fail("not a duro export (the first line names the format)")),
            };
        }
        self.item(line).map(Some)
    }

    fn item(&mut self, line: Line) -> Result<DumpItem, Error> {
        if let Some(name) = line.namespace.clone() {
            self.check_fields(&line, "a namespace", &["namespace", "secret"])?;
            return self.namespace(name, line);
        }
        if let Some(hex) = line.object.clone() {
            let allowed = ["object", "created_ms", "name", "alarm_ms"];
            self.check_fields(&line, "an object", &allowed)?;
            return self.object(&hex, line);
        }
        if line.key.is_some() || line.key_b64.is_some() {
            let allowed = [
                "key",
                "key_b64",
                "cbor_b64",
                "text",
                "raw_b64",
                "stored_b64",
            ];
            self.check_fields(&line, "a key", &allowed)?;
            return self.key(line);
        }
        Err(self.fail("neither a namespace, an object nor a key"))
    }

    fn namespace(&mut self, name: String, line: Line) -> Result<DumpItem, Error> {
        let Line { secret, .. } = line;
        if !self.served.contains(&name) {
            return Err(self.fail(format_args!(
                "namespace {name:?} is not served by this host"
            )));
        }
        let secret = secret.ok_or_else(|| self.fail("a namespace line needs its secret"))?;
        let secret: [u8; 32] = self
            .base64(&secret)?
            .try_into()
            .map_err(|_| self.fail("a secret is 32 bytes"))?;
        self.minter = Some(IdMinter::new(&name, &secret));
        self.in_object = false;
        Ok(DumpItem::Namespace { name, secret })
    }

    fn object(&mut self, hex: &str, line: Line) -> Result<DumpItem, Error> {
        let minter = self
            .minter
            .as_ref()
            .ok_or_else(|| self.fail("an object before any namespace"))?;
        let name = line.name.filter(|name| !name.is_empty());
        let checked = id::from_hex(hex)
            .and_then(|bytes| minter.check(&bytes, name.as_deref()))
            .map_err(|e| self.fail(format_args!("object {hex}: {e}")))?;
        let created_ms = line
            .created_ms
            .ok_or_else(|| self.fail("an object line needs created_ms"))?;
        self.in_object = true;
        Ok(DumpItem::Object {
            record: ObjectRecord {
                id: *checked.bytes(),
                name,
                created_ms,
            },
            alarm_ms: line.alarm_ms,
        })
    }

    fn key(&mut self, line: Line) -> Result<DumpItem, Error> {
        if !self.in_object {
            return Err(self.fail("a key before any object"));
        }
        let key = match (line.key, line.key_b64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => self.base64(&b64)?,
            _ => return Err(self.fail("a key line has one of key, key_b64")),
        };
        let fields = [&line.cbor_b64, &line.text, &line.raw_b64, &line.stored_b64];
        if fields.iter().filter(|f| f.is_some()).count() != 1 {
            return Err(
                self.fail("a key line has its key and one of cbor_b64, text, raw_b64, stored_b64")
            );
        }
        let value = match (line.cbor_b64, line.text, line.raw_b64, line.stored_b64) {
            (Some(b64), ..) => tagged(TAG_CBOR, &self.base64(&b64)?),
            (_, Some(text), ..) => tagged(TAG_RAW, text.as_bytes()),
            (_, _, Some(b64), _) => tagged(TAG_RAW, &self.base64(&b64)?),
            (.., Some(b64)) => self.base64(&b64)?,
            _ => unreachable!("one value field is set: checked above"),
        };
        Ok(DumpItem::Key { key, value })
    }

    /// Fails when `line` has a field that does not belong to its kind.
    fn check_fields(&self, line: &Line, kind: &str, allowed: &[&str]) -> Result<(), Error> {
        match line.set_fields().into_iter().find(|f| !allowed.contains(f)) {
            Some(field) => Err(self.fail(format_args!("{field} does not belong on {kind} line"))),
            None => Ok(()),
        }
    }

    fn base64(&self, text: &str) -> Result<Vec<u8>, Error> {
        STANDARD
            .decode(text)
            .map_err(|e| self.fail(format_args!("bad base64: {e}")))
    }
}

fn tagged(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(payload.len() + 1);
    value.push(tag);
    value.extend_from_slice(payload);
    value
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = Result<DumpItem, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.next_item().transpose();
        self.failed = matches!(next, Some(Err(_)));
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> Vec<String> {
        vec!["ns".to_string()]
    }

    fn export(items: &[DumpItem]) -> Vec<u8> {
        let mut out = header();
        for item in items {
            write_item(item, &mut out);
        }
        out
    }

    fn read(bytes: &[u8]) -> Result<Vec<DumpItem>, Error> {
        Reader::new(bytes, served()).collect()
    }

    fn sample() -> Vec<DumpItem> {
        let secret = [7u8; 32];
        let minter = IdMinter::new("ns", &secret);
        let named = minter.from_name("a \"quoted\"\nname \u{1F600}\u{0}");
        let unique = minter.new_unique();
        vec![
            DumpItem::Namespace {
                name: "ns".into(),
                secret,
            },
            DumpItem::Object {
                record: ObjectRecord {
                    id: *named.bytes(),
                    name: named.name().map(str::to_owned),
                    created_ms: 1,
                },
                alarm_ms: Some(99),
            },
            DumpItem::Key {
                key: b"text".to_vec(),
                value: tagged(TAG_RAW, "h\u{e9}llo\n".as_bytes()),
            },
            DumpItem::Key {
                key: vec![0xff, 0, 1],
                value: tagged(TAG_RAW, &[0xfe, 0xff]),
            },
            DumpItem::Key {
                key: Vec::new(),
                value: tagged(TAG_CBOR, &[0x18, 0x2a]),
            },
            DumpItem::Key {
                key: b"odd".to_vec(),
                value: vec![0x07, 1, 2],
            },
            DumpItem::Object {
                record: ObjectRecord {
                    id: *unique.bytes(),
                    name: None,
                    created_ms: 2,
                },
                alarm_ms: None,
            },
            DumpItem::Key {
                key: b"k".to_vec(),
                value: vec![TAG_RAW],
            },
        ]
    }

    #[test]
    fn items_round_trip_exactly() {
        let items = sample();
        let bytes = export(&items);
        assert_eq!(
            bytes.iter().filter(|&&b| b == b'\n').count(),
            items.len() + 1
        );
        assert_eq!(read(&bytes).unwrap(), items);
    }

    #[test]
    fn bad_lines_are_named() {
        let good = export(&sample());
        let text = String::from_utf8(good.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let with = |index: usize, replacement: &str| {
            let mut lines = lines.clone();
            lines[index] = replacement;
            lines.join("\n").into_bytes()
        };
        let message = |bytes: Vec<u8>| read(&bytes).unwrap_err().to_string();
        assert!(message(Vec::new()).contains("empty input"));
        assert!(message(with(0, r#"{"duro_export":2}"#)).contains("format 2"));
        assert!(message(with(0, r#"{"namespace":"ns"}"#)).contains("line 1"));
        assert!(message(with(1, r#"{"namespace":"other","secret":""}"#)).contains("not served"));
        assert!(message(with(1, "not json")).contains("line 2: not an export line"));
        assert!(message(with(2, r#"{"object":"00","created_ms":1}"#)).contains("line 3"));
        // A forged ID: right length, wrong MAC.
        let forged = format!(r#"{{"object":"{}","created_ms":1}}"#, "ab".repeat(32));
        assert!(message(with(2, &forged)).contains("line 3: object"));
        assert!(message(with(3, r#"{"key":"k","text":"a","raw_b64":""}"#)).contains("line 4"));
        assert!(message(with(3, r#"{"key":"k","text":"a","extra":1}"#)).contains("extra"));
        assert!(message(with(3, r#"{"key":"k","text":"a","secret":"x"}"#)).contains("secret"));
        let key_first = [lines[0], lines[1], lines[3]].join("\n");
        assert!(message(key_first.into_bytes()).contains("line 3: a key before any object"));
        let mut long = good.clone();
        long.extend(std::iter::repeat_n(b' ', LINE_BYTES_MAX + 2));
        assert!(message(long).contains("longer than"));
    }
}
