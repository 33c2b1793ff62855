//! Byte-string keys and ranges of them: the helpers that the backends, the cache and
//! transactions share, so that every layer agrees on what a range holds.

use std::ops::Bound;

/// Whether no key lies between `start` and `end` (`BTreeMap::range` panics on some such
/// ranges, and a scan of one must answer nothing).
pub(crate) fn range_is_empty(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) => {
            s >= e
        }
        _ => false,
    }
}

/// The least key greater than every key that starts with `prefix`, if there is one (there is
/// none when `prefix` is empty or all `0xff`).
pub(crate) fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != 0xff)?;
    let mut next = prefix[..=last].to_vec();
    next[last] += 1;
    Some(next)
}

/// Borrows the key of an owned bound.
pub(crate) fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    bound.as_ref().map(Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_skips_trailing_ff() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(successor(b"\xff\xff"), None);
        assert_eq!(successor(b""), None);
    }

    #[test]
    fn empty_ranges_are_recognized() {
        let (a, b): (&[u8], &[u8]) = (b"a", b"b");
        assert!(!range_is_empty(Bound::Included(a), Bound::Included(a)));
        assert!(range_is_empty(Bound::Included(a), Bound::Excluded(a)));
        assert!(range_is_empty(Bound::Excluded(a), Bound::Included(a)));
        assert!(range_is_empty(Bound::Included(b), Bound::Included(a)));
        assert!(!range_is_empty(Bound::Excluded(a), Bound::Excluded(b)));
        assert!(!range_is_empty(Bound::Unbounded, Bound::Excluded(a)));
        assert!(!range_is_empty(Bound::Included(b), Bound::Unbounded));
    }
}
