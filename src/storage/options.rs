//! What one call may store and read: the limits, and the options of `list`.

use std::ops::Bound;

use super::keys;
use super::{Error, value};

/// Limits on what one call may store. Past a limit a call fails with an error naming it, and
/// writes nothing.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest key, in bytes (default 2048, as the hosted service).
    pub key_bytes_max: usize,
    /// Largest value, in bytes of its encoded payload (default 32 KiB, as the hosted service).
    pub value_bytes_max: usize,
    /// Most keys in one batched call (default 128, as the hosted service).
    pub batch_keys_max: usize,
    /// Memory the cache of one object may use before clean entries are evicted (default 8 MiB).
    /// Entries with writes not yet durable are never evicted.
    pub cache_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            key_bytes_max: 2048,
            value_bytes_max: 32 * 1024,
            batch_keys_max: 128,
            cache_bytes_max: 8 << 20,
        }
    }
}

/// A key range as (start, end) bounds, and a limit.
pub(crate) type Range = (Bound<Vec<u8>>, Bound<Vec<u8>>, usize);

/// Options of [`Storage::list`](super::Storage::list). The range is `start`/`start_after` (lower bound) to `end`
/// (exclusive upper bound), intersected with `prefix`.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// Keys `>= start`.
    pub start: Option<Vec<u8>>,
    /// Keys `> start_after` (not together with `start`).
    pub start_after: Option<Vec<u8>>,
    /// Keys `< end`.
    pub end: Option<Vec<u8>>,
    /// Keys that begin with `prefix`.
    pub prefix: Option<Vec<u8>>,
    /// Descending order (the same range).
    pub reverse: bool,
    /// At most this many entries (`Some(0)` is refused).
    pub limit: Option<usize>,
}

impl ListOptions {
    /// The range as (start, end) bounds.
    pub(crate) fn bounds(&self) -> Result<Range, Error> {
        if self.start.is_some() && self.start_after.is_some() {
            return Err(Error::InvalidList(
                "start and start_after cannot both be set",
            ));
        }
        if self.limit == Some(0) {
            return Err(Error::InvalidList("limit must be at least 1"));
        }
        let mut start = match (&self.start, &self.start_after) {
            (Some(key), _) => Bound::Included(key.clone()),
            (_, Some(key)) => Bound::Excluded(key.clone()),
            _ => Bound::Unbounded,
        };
        let mut end = self.end.clone().map_or(Bound::Unbounded, Bound::Excluded);
        if let Some(prefix) = &self.prefix {
            if lower_is_below(&start, prefix) {
                start = Bound::Included(prefix.clone());
            }
            if let Some(next) = keys::successor(prefix)
                && upper_is_above(&end, &next)
            {
                end = Bound::Excluded(next);
            }
        }
        Ok((start, end, self.limit.unwrap_or(usize::MAX)))
    }
}

fn lower_is_below(bound: &Bound<Vec<u8>>, key: &[u8]) -> bool {
    match bound {
        Bound::Unbounded => true,
        Bound::Included(b) | Bound::Excluded(b) => b.as_slice() < key,
    }
}

fn upper_is_above(bound: &Bound<Vec<u8>>, key: &[u8]) -> bool {
    match bound {
        Bound::Unbounded => true,
        Bound::Included(b) | Bound::Excluded(b) => b.as_slice() > key,
    }
}

impl Limits {
    pub(crate) fn check_key(&self, key: &[u8]) -> Result<(), Error> {
        let max = self.key_bytes_max;
        if key.len() > max {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max,
            });
        }
        Ok(())
    }

    pub(crate) fn check_value(&self, encoded: &[u8]) -> Result<(), Error> {
        let max = self.value_bytes_max;
        let len = value::payload_len(encoded);
        if len > max {
            return Err(Error::ValueTooLarge { len, max });
        }
        Ok(())
    }

    pub(crate) fn check_count(&self, count: usize) -> Result<(), Error> {
        let max = self.batch_keys_max;
        if count > max {
            return Err(Error::TooManyKeys { count, max });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_bounds_follow_the_rules() {
        let opts = |f: fn(&mut ListOptions)| {
            let mut o = ListOptions::default();
            f(&mut o);
            o.bounds()
        };
        assert!(matches!(
            opts(|o| {
                o.start = Some(b"a".to_vec());
                o.start_after = Some(b"b".to_vec());
            }),
            Err(Error::InvalidList(_))
        ));
        assert!(matches!(
            opts(|o| o.limit = Some(0)),
            Err(Error::InvalidList(_))
        ));
        let (start, end, _) = opts(|o| o.prefix = Some(b"ab".to_vec())).unwrap();
        assert_eq!(start, Bound::Included(b"ab".to_vec()));
        assert_eq!(end, Bound::Excluded(b"ac".to_vec()));
        let (start, end, _) = opts(|o| {
            o.prefix = Some(b"a\xff".to_vec());
            o.start_after = Some(b"a\xff1".to_vec());
        })
        .unwrap();
        assert_eq!(start, Bound::Excluded(b"a\xff1".to_vec()));
        assert_eq!(end, Bound::Excluded(b"b".to_vec()));
    }
}
