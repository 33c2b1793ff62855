/// Errors of opening a storage backend: what only [`crate::storage::lmdb::LmdbBackend::open`]
/// can produce. Once open, operations fail with [`Error`].
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenError {
    /// The data dir holds data in a format this build cannot read.
    #[error(
        "data dir format version {found} is not supported (this build reads version {supported})"
    )]
    FormatVersion { found: u32, supported: u32 },
    /// The data dir is in use by another process.
    #[error("data dir {0} is in use by another duro process")]
    Locked(String),
    /// The data dir or the engine could not be opened.
    #[error("cannot open storage: {0}")]
    Io(String),
    /// The data dir's own records do not decode.
    #[error("corrupt storage: {0}")]
    Corrupt(String),
    /// A virtual shard count outside `1..=max` was asked for.
    #[error("virtual shard count {count} is out of bounds: it must be from 1 to {max}")]
    VirtualShardCount { count: u32, max: u32 },
    /// The data dir was created with another virtual shard count, which it keeps forever.
    #[error(
        "the data dir has {recorded} virtual shards (fixed when it was created), not the {requested} asked for"
    )]
    VirtualShardsMismatch { recorded: u32, requested: u32 },
}

/// Errors of duro's storage operations.
///
/// Kinds, so that a caller matches on what it must tell apart: the caller's mistakes (a limit
/// or a bad argument, nothing was stored), the engine's failures (`Io`, `MapFull`, `Corrupt`),
/// the lifecycle of the object or the host (`Reset`, `Closed`, `TransactionEnded`,
/// `Conflict`), and ownership (`Fenced`: the shard's epoch moved on).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The LMDB map is full; the configured map size must grow, or data be deleted.
    #[error("storage is full (LMDB map size {map_bytes} bytes reached)")]
    MapFull { map_bytes: usize },
    /// An I/O or engine error.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Stored bytes that do not decode.
    #[error("corrupt storage: {0}")]
    Corrupt(String),
    /// A key longer than the limit.
    #[error("key is {len} bytes, over the limit of {max} bytes (key_bytes_max)")]
    KeyTooLarge { len: usize, max: usize },
    /// A key longer than the storage engine can store at all (only reachable when
    /// `key_bytes_max` is set above it).
    #[error("key is {len} bytes, over the {max} bytes the storage engine can store")]
    EngineKeyTooLarge { len: usize, max: usize },
    /// A value larger than the limit.
    #[error("value is {len} bytes, over the limit of {max} bytes (value_bytes_max)")]
    ValueTooLarge { len: usize, max: usize },
    /// A batched call with too many keys.
    #[error("{count} keys in one call, over the limit of {max} (batch_keys_max)")]
    TooManyKeys { count: usize, max: usize },
    /// Bad list options; the message names the rule.
    #[error("invalid list options: {0}")]
    InvalidList(&'static str),
    /// A namespace name longer than the storage engine can record.
    #[error("namespace name is {len} bytes long; at most {max} are supported")]
    NamespaceNameTooLong { len: usize, max: usize },
    /// Every namespace tag has been given out.
    #[error("namespace tags exhausted: no new namespace can be created")]
    NamespaceTagsExhausted,
    /// A value that cannot be encoded.
    #[error("cannot encode value: {0}")]
    Encode(String),
    /// A stored value that does not decode as the type asked for.
    #[error("cannot decode value: {0}")]
    Decode(String),
    /// A call on a transaction after `rollback()`, or after it ended.
    #[error("the transaction was rolled back or has ended")]
    TransactionEnded,
    /// A transaction kept conflicting with concurrent writes.
    #[error("transaction conflicted {attempts} times; gave up")]
    Conflict { attempts: u32 },
    /// The object was reset (a failed commit or a panic): its storage handle is dead, and its
    /// uncommitted writes were dropped.
    #[error("the object was reset: {0}")]
    Reset(String),
    /// A batch was made under an ownership epoch of its virtual shard that is no longer the
    /// shard's epoch: whoever made it lost the shard, and may never commit for it again. The
    /// commit wrote nothing (see `storage::shards`).
    #[error(
        "fenced: virtual shard {virtual_shard} is at epoch {current}, the write was made under epoch {epoch}"
    )]
    Fenced {
        virtual_shard: u32,
        epoch: u64,
        current: u64,
    },
    /// A virtual shard number past the data dir's count.
    #[error("virtual shard {virtual_shard} does not exist: the data dir has {count}")]
    NoSuchShard { virtual_shard: u32, count: u32 },
    /// A virtual shard's epoch cannot be raised further.
    #[error("virtual shard {virtual_shard}'s epoch is at its maximum")]
    EpochsExhausted { virtual_shard: u32 },
    /// An import would write over data it was not allowed to: an object that has data
    /// (without `overwrite`), or a namespace that has objects under another secret.
    #[error("import conflict: {0}")]
    ImportConflict(String),
    /// An import's items break the dump's rules (order, duplicates).
    #[error("invalid import: {0}")]
    InvalidImport(String),
    /// The storage engine cannot do what was asked.
    #[error("{0}")]
    Unsupported(String),
    /// The storage writer has stopped (the host is shutting down).
    #[error("storage is shut down")]
    Closed,
}
