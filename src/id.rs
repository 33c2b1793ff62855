//! Object IDs: minting, parsing and checking.
//!
//! An ID is 32 bytes: 16 bytes of identity followed by a 16-byte MAC of the identity under a key
//! derived from the namespace's secret. The text form is 64 lowercase hex digits.
//!
//! - `new_unique`: identity from the OS CSPRNG, so never repeated and unguessable.
//! - `from_name`: identity = keyed hash of the name, so the same (namespace, name) gives the same
//!   ID across restarts, and another namespace (another secret) gives another ID.
//! - `parse` / `check`: the MAC proves the ID was minted by this namespace; an altered digit, a
//!   forged ID or one of another namespace fails with [`Error::NotMinted`].

use std::fmt;

use crate::auth::constant_time_eq;

/// Length of an ID in bytes.
pub const ID_BYTES: usize = 32;
/// Length of the identity part.
const IDENTITY_BYTES: usize = 16;
/// Length of the text form.
pub const ID_HEX_LEN: usize = ID_BYTES * 2;

/// Why an ID was refused. Each message names the rule that was broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid object id: must be {ID_HEX_LEN} hex digits, got {0} characters")]
    TextLength(usize),
    #[error("invalid object id: must be {ID_BYTES} bytes, got {0}")]
    ByteLength(usize),
    #[error("invalid object id: character {0:?} at position {1} is not a hex digit")]
    NotHex(char, usize),
    #[error(
        "invalid object id: not minted by namespace '{0}' (altered, forged, or of another namespace)"
    )]
    NotMinted(String),
    #[error("invalid object id: name {0:?} does not match the id")]
    NameMismatch(String),
}

/// A checked object ID: its bytes, and the name it was derived from if known.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectId {
    bytes: [u8; ID_BYTES],
    name: Option<String>,
}

impl ObjectId {
    /// The 32 bytes of the ID.
    pub fn bytes(&self) -> &[u8; ID_BYTES] {
        &self.bytes
    }

    /// The name the ID was derived from, when it was made by name.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The text form: 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        to_hex(&self.bytes)
    }

    /// An ID from its text form (64 hex digits, either case), as a client holds it, e.g. read
    /// from its own database. Only its shape is checked here: whether a namespace minted it
    /// takes the namespace's secret, and the host checks that whenever the ID is used.
    pub fn from_hex(text: &str) -> Result<ObjectId, Error> {
        Ok(ObjectId::from_host(from_hex(text)?, None))
    }

    /// An ID as a host sent it to a client. Unchecked: only the namespace's secret can check
    /// it, and the host checks it again whenever it is used.
    pub(crate) fn from_host(bytes: [u8; ID_BYTES], name: Option<String>) -> ObjectId {
        ObjectId { bytes, name }
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "ObjectId({} {name:?})", self.to_hex()),
            None => write!(f, "ObjectId({})", self.to_hex()),
        }
    }
}

/// Mints and checks the IDs of one namespace.
#[derive(Clone)]
pub struct IdMinter {
    namespace: String,
    mac_key: [u8; 32],
    name_key: [u8; 32],
}

impl IdMinter {
    /// A minter for `namespace` keyed by its secret (kept in the data dir).
    pub fn new(namespace: &str, secret: &[u8; 32]) -> IdMinter {
        // Separate keys for the two uses, so a name hash can never double as a MAC.
        let mac_key = blake3::derive_key("duro 2026 object id mac", secret);
        let name_key = blake3::derive_key("duro 2026 object id from name", secret);
        IdMinter {
            namespace: namespace.to_owned(),
            mac_key,
            name_key,
        }
    }

    /// A fresh random ID.
    pub fn new_unique(&self) -> ObjectId {
        let mut identity = [0u8; IDENTITY_BYTES];
        // The OS CSPRNG failing leaves no safe way to mint an unguessable ID.
        getrandom::fill(&mut identity).expect("the OS random number generator failed");
        self.seal(identity, None)
    }

    /// The ID of `name` in this namespace.
    pub fn from_name(&self, name: &str) -> ObjectId {
        let hash = blake3::keyed_hash(&self.name_key, name.as_bytes());
        let mut identity = [0u8; IDENTITY_BYTES];
        identity.copy_from_slice(&hash.as_bytes()[..IDENTITY_BYTES]);
        self.seal(identity, Some(name.to_owned()))
    }

    /// Parses the text form (either case) and checks that this namespace minted it.
    pub fn parse(&self, text: &str) -> Result<ObjectId, Error> {
        let bytes = from_hex(text)?;
        self.check(&bytes, None)
    }

    /// Checks raw ID bytes, and the name given with them (which must derive the same ID).
    pub fn check(&self, bytes: &[u8], name: Option<&str>) -> Result<ObjectId, Error> {
        let bytes: [u8; ID_BYTES] = bytes
            .try_into()
            .map_err(|_| Error::ByteLength(bytes.len()))?;
        let mut identity = [0u8; IDENTITY_BYTES];
        identity.copy_from_slice(&bytes[..IDENTITY_BYTES]);
        let expected = self.mac(&identity);
        if !constant_time_eq(&expected, &bytes[IDENTITY_BYTES..]) {
            return Err(Error::NotMinted(self.namespace.clone()));
        }
        match name {
            Some(name) if self.from_name(name).bytes != bytes => {
                Err(Error::NameMismatch(name.to_owned()))
            }
            _ => Ok(ObjectId {
                bytes,
                name: name.map(str::to_owned),
            }),
        }
    }

    fn seal(&self, identity: [u8; IDENTITY_BYTES], name: Option<String>) -> ObjectId {
        let mut bytes = [0u8; ID_BYTES];
        bytes[..IDENTITY_BYTES].copy_from_slice(&identity);
        bytes[IDENTITY_BYTES..].copy_from_slice(&self.mac(&identity));
        ObjectId { bytes, name }
    }

    fn mac(&self, identity: &[u8; IDENTITY_BYTES]) -> [u8; 16] {
        let hash = blake3::keyed_hash(&self.mac_key, identity);
        let mut mac = [0u8; 16];
        mac.copy_from_slice(&hash.as_bytes()[..16]);
        mac
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[(byte >> 4) as usize] as char);
        text.push(DIGITS[(byte & 0xf) as usize] as char);
    }
    text
}

/// Decodes the 64-hex-digit text form of an ID, without checking its MAC.
pub fn from_hex(text: &str) -> Result<[u8; ID_BYTES], Error> {
    let count = text.chars().count();
    if count != ID_HEX_LEN || text.len() != ID_HEX_LEN {
        return Err(Error::TextLength(count));
    }
    let mut bytes = [0u8; ID_BYTES];
    let digits = text.as_bytes();
    for (i, byte) in bytes.iter_mut().enumerate() {
        let hi = hex_value(digits[2 * i]).ok_or(Error::NotHex(digits[2 * i] as char, 2 * i))?;
        let lo = hex_value(digits[2 * i + 1])
            .ok_or(Error::NotHex(digits[2 * i + 1] as char, 2 * i + 1))?;
        *byte = (hi << 4) | lo;
    }
    Ok(bytes)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minter(name: &str, seed: u8) -> IdMinter {
        IdMinter::new(name, &[seed; 32])
    }

    #[test]
    fn unique_ids_differ_and_parse_back() {
        let m = minter("ns", 1);
        let a = m.new_unique();
        let b = m.new_unique();
        assert_ne!(a, b);
        assert_eq!(m.parse(&a.to_hex()).unwrap().bytes(), a.bytes());
        assert_eq!(a.to_hex().len(), 64);
        assert!(
            a.to_hex()
                .chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        );
    }

    #[test]
    fn names_are_deterministic_per_namespace() {
        let m = minter("ns", 1);
        assert_eq!(m.from_name("alice"), minter("ns", 1).from_name("alice"));
        assert_ne!(m.from_name("alice").bytes(), m.from_name("bob").bytes());
        assert_ne!(
            m.from_name("alice").bytes(),
            minter("other", 2).from_name("alice").bytes()
        );
        assert_eq!(m.from_name("alice").name(), Some("alice"));
    }

    #[test]
    fn uppercase_is_accepted() {
        let m = minter("ns", 1);
        let id = m.new_unique();
        assert_eq!(
            m.parse(&id.to_hex().to_uppercase()).unwrap().bytes(),
            id.bytes()
        );
    }

    #[test]
    fn bad_text_is_refused_with_the_rule() {
        let m = minter("ns", 1);
        let hex = m.new_unique().to_hex();
        assert_eq!(m.parse(&hex[..63]), Err(Error::TextLength(63)));
        assert_eq!(m.parse(&format!("{hex}0")), Err(Error::TextLength(65)));
        let bad = format!("{}g{}", &hex[..10], &hex[11..]);
        assert_eq!(m.parse(&bad), Err(Error::NotHex('g', 10)));
        // A multi-byte character keeps the byte length but is not hex.
        let wide = format!("é{}", &hex[2..]);
        assert!(m.parse(&wide).is_err());
    }

    #[test]
    fn every_altered_digit_is_refused() {
        let m = minter("ns", 1);
        let hex = m.new_unique().to_hex();
        for i in 0..hex.len() {
            let mut digits = hex.clone().into_bytes();
            digits[i] = if digits[i] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(digits).unwrap();
            assert_eq!(
                m.parse(&altered),
                Err(Error::NotMinted("ns".into())),
                "digit {i}"
            );
        }
    }

    #[test]
    fn ids_of_another_namespace_are_refused() {
        let id = minter("a", 1).new_unique();
        assert_eq!(
            minter("b", 2).parse(&id.to_hex()),
            Err(Error::NotMinted("b".into()))
        );
    }

    #[test]
    fn name_must_match_id() {
        let m = minter("ns", 1);
        let id = m.from_name("alice");
        assert!(m.check(id.bytes(), Some("alice")).is_ok());
        assert_eq!(
            m.check(id.bytes(), Some("bob")),
            Err(Error::NameMismatch("bob".into()))
        );
        assert_eq!(m.check(&id.bytes()[..31], None), Err(Error::ByteLength(31)));
    }
}
