//! Virtual shards: the fixed partition of object IDs that ownership moves by.
//!
//! Every object ID maps to one of a fixed number of virtual shards ([`virtual_shard`]). The
//! count is chosen when the data dir is created, recorded in it, and never changes, so an
//! object's virtual shard never changes either: moving a virtual shard to another event-loop
//! thread or another machine moves its objects without rehashing any of them.
//!
//! Each virtual shard has an ownership epoch, a `u64` that starts at 1 and only grows
//! ([`Backend::raise_epoch`]). A writer records in every batch the epoch it believed it owned
//! the object's virtual shard under ([`ObjectBatch::epoch`]), and [`Backend::commit`] checks it
//! against the stored epoch in the commit's own transaction: a batch made under an older (or any
//! other) epoch is refused with [`Error::Fenced`], and writes nothing. Raising a shard's epoch
//! therefore fences every writer that still holds the old one: it can never commit for that
//! shard again. (Nothing raises epochs yet but tests; cluster leases will.)
//!
//! [`Backend::raise_epoch`]: super::Backend::raise_epoch
//! [`Backend::commit`]: super::Backend::commit
//! [`ObjectBatch::epoch`]: super::ObjectBatch::epoch
//! [`Error::Fenced`]: super::Error::Fenced

use super::OpenError;

/// Virtual shards of a data dir created without an explicit count.
///
/// Enough to spread objects evenly over many threads or machines (256 shards over 16 owners is
/// 16 each, so moving one shifts ~0.4% of the objects), and few enough that every owner keeps
/// one epoch per shard in memory (2 KiB) and the data dir one record per shard.
pub const VIRTUAL_SHARDS_DEFAULT: u32 = 256;

/// Most virtual shards a data dir may have: the shard map is kept whole in memory (512 KiB at
/// this bound) and read whole when a host opens.
pub const VIRTUAL_SHARDS_MAX: u32 = 65536;

/// The first epoch of every virtual shard.
pub const EPOCH_FIRST: u64 = 1;

/// The virtual shard of the object ID `id`, among `count` virtual shards: the first 4 bytes of
/// the ID read as a big-endian `u32`, modulo `count`. (`count` 0 is treated as 1.)
///
/// Stable forever: data dirs record which shard owns what by this formula, so it must never
/// change. It spreads evenly because the first bytes of an ID are uniformly distributed: they
/// are the start of its identity, random for a unique ID and a keyed hash for an ID from a name
/// (see [`crate::id`]).
pub fn virtual_shard(id: &[u8; 32], count: u32) -> u32 {
    let head = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
    head % count.max(1)
}

/// Checks a virtual shard count against the bounds `1..=`[`VIRTUAL_SHARDS_MAX`].
pub(crate) fn check_count(count: u32) -> Result<u32, OpenError> {
    if (1..=VIRTUAL_SHARDS_MAX).contains(&count) {
        Ok(count)
    } else {
        Err(OpenError::VirtualShardCount {
            count,
            max: VIRTUAL_SHARDS_MAX,
        })
    }
}

/// The count an existing data dir recorded, checked against the count the caller asked for
/// (`None`: whatever the dir has).
pub(crate) fn check_recorded(recorded: u32, requested: Option<u32>) -> Result<u32, OpenError> {
    match requested {
        Some(requested) if requested != recorded => Err(OpenError::VirtualShardsMismatch {
            recorded,
            requested,
        }),
        _ => Ok(recorded),
    }
}

/// A data dir's virtual shards: their count and each one's ownership epoch, as
/// [`Backend::shard_map`](super::Backend::shard_map) read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    /// The epoch of virtual shard `i` at index `i`; the length is the count (≥ 1).
    epochs: Vec<u64>,
}

impl ShardMap {
    /// A map of `epochs.len()` virtual shards with these epochs. Empty is refused.
    pub fn new(epochs: Vec<u64>) -> Result<ShardMap, OpenError> {
        let count = u32::try_from(epochs.len()).unwrap_or(u32::MAX);
        check_count(count)?;
        Ok(ShardMap { epochs })
    }

    /// How many virtual shards there are (fixed when the data dir was created).
    pub fn count(&self) -> u32 {
        // `new` bounds the length by VIRTUAL_SHARDS_MAX.
        self.epochs.len() as u32
    }

    /// The virtual shard of the object ID `id` (see [`virtual_shard`]).
    pub fn shard_of(&self, id: &[u8; 32]) -> u32 {
        virtual_shard(id, self.count())
    }

    /// The epoch of virtual shard `shard`, or `None` past the count.
    pub fn epoch(&self, shard: u32) -> Option<u64> {
        self.epochs.get(shard as usize).copied()
    }

    /// The epoch of the virtual shard of the object ID `id`.
    pub fn epoch_of(&self, id: &[u8; 32]) -> u64 {
        // `shard_of` is below the count, so the index is in bounds.
        self.epochs[self.shard_of(id) as usize]
    }

    /// Every virtual shard's epoch, in shard order.
    pub fn epochs(&self) -> &[u64] {
        &self.epochs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_out_of_bounds_are_refused() {
        assert!(check_count(0).is_err());
        assert!(check_count(VIRTUAL_SHARDS_MAX + 1).is_err());
        assert_eq!(check_count(1), Ok(1));
        assert_eq!(check_count(VIRTUAL_SHARDS_MAX), Ok(VIRTUAL_SHARDS_MAX));
        assert!(ShardMap::new(Vec::new()).is_err());
    }

    #[test]
    fn shard_map_answers_by_id() {
        let map = ShardMap::new(vec![1, 5, 9]).unwrap();
        let mut id = [0u8; 32];
        id[3] = 4; // 4 % 3 = 1
        assert_eq!(map.shard_of(&id), 1);
        assert_eq!(map.epoch_of(&id), 5);
        assert_eq!(map.epoch(2), Some(9));
        assert_eq!(map.epoch(3), None);
    }
}
