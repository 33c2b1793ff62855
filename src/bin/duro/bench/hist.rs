//! A latency histogram with log-linear buckets: exact below 64 ns, then 32 buckets per power of
//! two, so any percentile is within ~3% of the true value. Fixed size (1920 counters), no
//! allocation per record: recording is an index computation and an add, cheap enough to run
//! on the load generator's core for every call.

use std::time::Duration;

/// Sub-buckets per power of two, as a bit count: 2^5 = 32, so a bucket spans ≤ 1/32 of its value.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Values below this have a bucket each.
const LINEAR_MAX: u64 = 2 * SUB;
/// Enough buckets for any u64.
const BUCKETS: usize = ((64 - SUB_BITS) as usize) * SUB as usize + SUB as usize;

/// Counts of latencies in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            max_ns: 0,
        }
    }
}

fn index(value: u64) -> usize {
    if value < LINEAR_MAX {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let shift = exponent - SUB_BITS;
    // (value >> shift) is in [SUB, 2 * SUB): the top SUB_BITS + 1 bits of the value.
    (shift as usize) * SUB as usize + (value >> shift) as usize
}

/// The smallest value that falls in bucket `index`, and the bucket's width.
fn bucket(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < LINEAR_MAX {
        return (index, 1);
    }
    let shift = index / SUB - 1;
    let mantissa = index % SUB + SUB;
    (mantissa << shift, 1 << shift)
}

impl Histogram {
    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// The latency below which a fraction `q` (0..=1) of the counted ones fall, in
    /// nanoseconds: the middle of its bucket (never above the largest seen). 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = bucket(i);
                return (low + width / 2).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut previous_end = 0;
        for i in 0..BUCKETS {
            let (low, width) = bucket(i);
            assert_eq!(low, previous_end, "bucket {i}");
            assert_eq!(index(low), i);
            assert_eq!(index(low + (width - 1)), i);
            assert!(width == 1 || width * SUB <= low, "bucket {i} is too wide");
            previous_end = low.wrapping_add(width);
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_the_bucket_error() {
        let mut histogram = Histogram::default();
        for us in 1..=1000u64 {
            histogram.record(Duration::from_micros(us));
        }
        let p50 = histogram.quantile_ns(0.5) as f64;
        let p99 = histogram.quantile_ns(0.99) as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.04, "{p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.04, "{p99}");
        assert_eq!(histogram.quantile_ns(1.0), 1_000_000);
    }
}
