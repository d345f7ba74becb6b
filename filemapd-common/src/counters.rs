//! What the kernel counts for each watched file: all of its IO, whichever regions exist.

/// Buckets of a file's latency histogram; it has one bound fewer.
pub const HISTOGRAM_BUCKETS: usize = 24;
pub const MAX_BOUNDS: usize = HISTOGRAM_BUCKETS - 1;

/// One file's counters on one CPU (user space sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileCounters {
    pub reads: u64,
    pub read_sectors: u64,
    pub read_ns: u64,
    pub writes: u64,
    pub write_sectors: u64,
    pub write_ns: u64,
    /// Bios started minus bios ended, wrapping (a bio may end on another CPU than it began):
    /// the sum over CPUs is the file's IO in flight.
    pub in_flight: u64,
    /// Allocations the sector map could not hold whole (a table full): their IO may go
    /// uncounted until a pass records what FIEMAP shows.
    pub unrecorded: u64,
    /// Bios the probe stopped walking before their end (longer than it may walk).
    pub unwalked: u64,
    /// Bios by duration: bucket i counts durations below `Bounds::ns[i]` and at or above the
    /// bound before it; the last, those at or above every bound.
    pub histogram: [u64; HISTOGRAM_BUCKETS],
}

impl FileCounters {
    /// The sum of per-CPU counters.
    pub fn sum<'a>(values: impl IntoIterator<Item = &'a FileCounters>) -> FileCounters {
        let mut total = FileCounters::default();
        for v in values {
            total.reads += v.reads;
            total.read_sectors += v.read_sectors;
            total.read_ns += v.read_ns;
            total.writes += v.writes;
            total.write_sectors += v.write_sectors;
            total.write_ns += v.write_ns;
            total.in_flight = total.in_flight.wrapping_add(v.in_flight);
            total.unrecorded += v.unrecorded;
            total.unwalked += v.unwalked;
            for (sum, n) in total.histogram.iter_mut().zip(v.histogram) {
                *sum += n;
            }
        }
        total
    }

    /// Adds `other` (counters carried over from an earlier daemon).
    pub fn add(&mut self, other: &FileCounters) {
        *self = Self::sum([&*self, other]);
    }

    /// What was counted after `earlier` (an earlier reading of the same counters), wrapping
    /// as the counters do.
    pub fn since(&self, earlier: &FileCounters) -> FileCounters {
        let mut histogram = self.histogram;
        for (n, before) in histogram.iter_mut().zip(earlier.histogram) {
            *n = n.wrapping_sub(before);
        }
        FileCounters {
            reads: self.reads.wrapping_sub(earlier.reads),
            read_sectors: self.read_sectors.wrapping_sub(earlier.read_sectors),
            read_ns: self.read_ns.wrapping_sub(earlier.read_ns),
            writes: self.writes.wrapping_sub(earlier.writes),
            write_sectors: self.write_sectors.wrapping_sub(earlier.write_sectors),
            write_ns: self.write_ns.wrapping_sub(earlier.write_ns),
            in_flight: self.in_flight.wrapping_sub(earlier.in_flight),
            unrecorded: self.unrecorded.wrapping_sub(earlier.unrecorded),
            unwalked: self.unwalked.wrapping_sub(earlier.unwalked),
            histogram,
        }
    }

    /// IO in flight (never below 0: a bio that began before the file was counted may end
    /// after).
    pub fn in_flight(&self) -> u64 {
        (self.in_flight as i64).max(0) as u64
    }
}

/// A file's histogram bounds in nanoseconds, rising; `len` of them are used, the rest of the
/// 32 places hold u64::MAX (so that a bucket is found in five halvings).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub len: u32,
    pub _pad: u32,
    pub ns: [u64; 32],
}

/// How many bounds the default histogram has: powers of two from 16 µs (no bio through
/// device-mapper completes sooner) to 4.2 s (a stall). Each bucket is a series per file in a
/// scrape: fewer than the kernel could hold keeps 10,000 files' scrape small.
pub const DEFAULT_BOUNDS: usize = 19;

impl Default for Bounds {
    /// Powers of two from 16 µs to 4.2 s.
    fn default() -> Self {
        let mut ns = [u64::MAX; 32];
        let mut i = 0;
        while i < DEFAULT_BOUNDS {
            ns[i] = 16_000 << i;
            i += 1;
        }
        Bounds {
            len: DEFAULT_BOUNDS as u32,
            _pad: 0,
            ns,
        }
    }
}

impl Bounds {
    /// Bounds given in nanoseconds (rising; at most [`MAX_BOUNDS`] of them).
    pub fn from_ns(bounds: &[u64]) -> Option<Bounds> {
        if bounds.is_empty() || bounds.len() > MAX_BOUNDS || bounds.windows(2).any(|w| w[0] >= w[1])
        {
            return None;
        }
        let mut ns = [u64::MAX; 32];
        ns[..bounds.len()].copy_from_slice(bounds);
        Some(Bounds {
            len: bounds.len() as u32,
            _pad: 0,
            ns,
        })
    }

    pub fn used(&self) -> &[u64] {
        &self.ns[..(self.len as usize).min(MAX_BOUNDS)]
    }

    /// The bucket of a duration: how many bounds are at or below it, found in five halvings
    /// (no loop for the kernel's verifier to walk bound by bound).
    #[inline(always)]
    pub fn bucket(&self, duration_ns: u64) -> usize {
        let mut below = 0usize;
        for step in [16, 8, 4, 2, 1] {
            if duration_ns >= self.ns[(below + step - 1) & 31] {
                below += step;
            }
        }
        // Only u64::MAX passes the unused places.
        let len = self.len as usize;
        if below > len { len } else { below }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    #[test]
    fn what_came_since_an_earlier_reading_adds_back_to_the_later_one() {
        let mut earlier = FileCounters {
            writes: 3,
            write_sectors: 24,
            in_flight: 1,
            ..Default::default()
        };
        earlier.histogram[2] = 3;
        let mut later = earlier;
        later.writes += 2;
        later.write_sectors += 16;
        // A bio that began before the earlier reading ended since: one fewer in flight.
        later.in_flight = 0;
        later.histogram[2] += 2;
        let since = later.since(&earlier);
        assert_eq!((since.writes, since.write_sectors), (2, 16));
        assert_eq!(since.in_flight as i64, -1);
        assert_eq!(since.histogram[2], 2);
        let mut sum = earlier;
        sum.add(&since);
        assert_eq!(sum, later);
    }

    #[test]
    fn durations_fall_into_dm_stats_buckets() {
        // dm-stats: below the first bound, between two bounds, at or above the last.
        let b = Bounds::from_ns(&[1_000_000, 5_000_000, 20_000_000]).unwrap();
        assert_eq!(b.bucket(0), 0);
        assert_eq!(b.bucket(999_999), 0);
        assert_eq!(b.bucket(1_000_000), 1);
        assert_eq!(b.bucket(19_999_999), 2);
        assert_eq!(b.bucket(20_000_000), 3);
        assert_eq!(b.bucket(u64::MAX), 3);
    }

    #[test]
    fn the_default_bounds_are_powers_of_two_microseconds() {
        let b = Bounds::default();
        assert_eq!(b.used().len(), DEFAULT_BOUNDS);
        assert_eq!(b.used()[0], 16_000);
        assert_eq!(*b.used().last().unwrap(), 4_194_304_000);
        assert_eq!(b.bucket(15_999), 0);
        assert_eq!(b.bucket(24_000), 1);
        assert_eq!(b.bucket(u64::MAX), DEFAULT_BOUNDS);
    }

    #[test]
    fn halvings_find_what_counting_finds() {
        for bounds in [
            vec![5u64],
            vec![1, 2, 3],
            (1..=23).map(|i| i * 10).collect::<Vec<_>>(),
        ] {
            let b = Bounds::from_ns(&bounds).unwrap();
            for d in 0..300 {
                let counted = bounds.iter().filter(|&&x| x <= d).count();
                assert_eq!(b.bucket(d), counted, "{bounds:?} {d}");
            }
            assert_eq!(b.bucket(u64::MAX), bounds.len());
        }
    }

    #[test]
    fn bad_bounds_are_refused() {
        assert!(Bounds::from_ns(&[]).is_none());
        assert!(Bounds::from_ns(&[5, 5]).is_none());
        assert!(Bounds::from_ns(&[1; MAX_BOUNDS + 1]).is_none());
    }

    #[test]
    fn in_flight_sums_across_cpus_and_never_reads_below_zero() {
        let started = FileCounters {
            in_flight: 2,
            ..Default::default()
        };
        let ended = FileCounters {
            in_flight: 1u64.wrapping_neg(),
            ..Default::default()
        };
        assert_eq!(FileCounters::sum([&started, &ended]).in_flight(), 1);
        assert_eq!(FileCounters::sum([&ended]).in_flight(), 0);
    }
}
