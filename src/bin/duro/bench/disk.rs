//! What the disk allows without duro: `lmdb-baseline`, LMDB used directly with one synced write
//! transaction per get + put (what a naive durable counter does), and the latency of
//! write + fdatasync of a small file (the floor of any durable acknowledgement).
//!
//! Both run on the bench's thread, serially (one in flight): that is the point of a baseline
//! without group commit.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use lmdb::{DatabaseFlags, Environment, EnvironmentFlags, Transaction, WriteFlags};

use super::hist::Histogram;
use super::measure::{Budget, Run};

/// Objects the baseline's keys are spread over, as `incr` over 1000 objects.
const KEYS: u64 = 1000;

/// An LMDB environment in a dir of its own, flagged as duro's (see `storage::lmdb`).
pub struct LmdbBaseline {
    env: Environment,
    db: lmdb::Database,
}

/// duro's address of a counter's `value` key: namespace tag ‖ 32-byte id ‖ user key.
fn record_key(object: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + 32 + 5);
    key.extend_from_slice(&1u32.to_be_bytes());
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&object.to_be_bytes());
    key.extend_from_slice(&id);
    key.extend_from_slice(b"value");
    key
}

impl LmdbBaseline {
    pub fn open(dir: &Path) -> Result<LmdbBaseline, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let env = Environment::new()
            .set_flags(EnvironmentFlags::NO_TLS | EnvironmentFlags::NO_READAHEAD)
            .set_max_dbs(3)
            .set_map_size(1 << 30)
            .open(dir)
            .map_err(|e| format!("opening LMDB in {}: {e}", dir.display()))?;
        let db = env
            .create_db(Some("kv"), DatabaseFlags::empty())
            .map_err(|e| format!("creating the database: {e}"))?;
        Ok(LmdbBaseline { env, db })
    }

    /// One increment: a write transaction that reads the counter, writes it + 1 in duro's
    /// value encoding (same record size), and commits with fsync.
    fn increment(&self, key: &[u8]) -> Result<(), lmdb::Error> {
        let mut txn = self.env.begin_rw_txn()?;
        let value = match txn.get(self.db, &key) {
            Ok(stored) => stored
                .get(1..)
                .and_then(|v| duro::storage::value::decode::<u64>(v).ok())
                .unwrap_or(0),
            Err(lmdb::Error::NotFound) => 0,
            Err(e) => return Err(e),
        };
        // duro stores a value as a marker byte (short key) ‖ the encoded value.
        let encoded = duro::storage::value::encode(&(value + 1)).unwrap_or_default();
        let mut stored = Vec::with_capacity(encoded.len() + 1);
        stored.push(0u8);
        stored.extend_from_slice(&encoded);
        txn.put(self.db, &key, &stored, WriteFlags::empty())?;
        txn.commit()
    }

    /// Increments counters round-robin over [`KEYS`] keys until `budget` is spent.
    pub fn run(&self, budget: Budget) -> Result<Run, String> {
        let keys: Vec<Vec<u8>> = (0..KEYS).map(record_key).collect();
        timed_loop(budget, |i| {
            self.increment(&keys[(i % KEYS) as usize])
                .map_err(|e| format!("LMDB: {e}"))
        })
    }
}

/// A small file overwritten and fdatasynced in place, one write at a time.
pub struct FsyncProbe {
    file: std::fs::File,
}

impl FsyncProbe {
    pub fn open(path: &Path) -> Result<FsyncProbe, String> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        file.write_all(&[0u8; 4096])
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(FsyncProbe { file })
    }

    /// Writes 64 bytes at the file's start and fdatasyncs, until `budget` is spent.
    pub fn run(&self, budget: Budget) -> Result<Run, String> {
        timed_loop(budget, |i| {
            let record = [(i % 251) as u8; 64];
            self.file
                .write_all_at(&record, 0)
                .and_then(|()| self.file.sync_data())
                .map_err(|e| format!("write + fdatasync: {e}"))
        })
    }
}

/// Calls `op(i)` one at a time until `budget` is spent, timing each.
fn timed_loop(
    budget: Budget,
    mut op: impl FnMut(u64) -> Result<(), String>,
) -> Result<Run, String> {
    let mut latency = Histogram::default();
    let begun = Instant::now();
    let mut ops = 0;
    while ops < budget.ops_max && Instant::now() < budget.until {
        let start = Instant::now();
        op(ops)?;
        latency.record(start.elapsed());
        ops += 1;
    }
    Ok(Run {
        ops,
        elapsed: begun.elapsed(),
        latency,
        server_cpu: None,
        generator_cpu: None,
    })
}
