//! Runs of 512-byte sectors on a device-mapper device: the unit of dm-stats regions.
use std::fmt;

/// Device-mapper counts in 512-byte sectors, whatever the device's block size.
pub const SECTOR_SHIFT: u32 = 9;

/// `len` sectors from `start`, as in `@stats_create <start>+<len>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SectorRange {
    pub start: u64,
    pub len: u64,
}

impl SectorRange {
    pub fn new(start: u64, len: u64) -> Self {
        Self { start, len }
    }

    /// First sector after the range.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

impl fmt::Display for SectorRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.start, self.len)
    }
}

/// Sorts ranges and joins those that touch: the area a set of non-overlapping regions covers,
/// whether one region per extent or several tiling it.
pub fn join_adjacent(mut ranges: Vec<SectorRange>) -> Vec<SectorRange> {
    ranges.sort_unstable();
    let mut joined: Vec<SectorRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match joined.last_mut() {
            Some(last) if last.end() == range.start => last.len += range.len,
            _ => joined.push(range),
        }
    }
    joined
}

/// The sectors some of `ranges` hold (in any order, overlapping or not), as sorted disjoint
/// ranges.
pub fn union(mut ranges: Vec<SectorRange>) -> Vec<SectorRange> {
    ranges.sort_unstable();
    union_sorted(ranges)
}

/// [`union`] of ranges already sorted by start: one pass, no sort.
pub fn union_sorted(ranges: impl IntoIterator<Item = SectorRange>) -> Vec<SectorRange> {
    let mut joined: Vec<SectorRange> = Vec::new();
    for r in ranges {
        match joined.last_mut() {
            Some(last) if r.start <= last.end() => last.len = last.len.max(r.end() - last.start),
            _ => joined.push(r),
        }
    }
    joined
}

/// The parts of `range` that none of `taken` overlaps, in order (`taken` in any order, and
/// reaching past `range` or not).
pub fn parts_not_in(range: SectorRange, mut taken: Vec<SectorRange>) -> Vec<SectorRange> {
    taken.sort_unstable();
    let mut parts = Vec::new();
    let mut at = range.start;
    for t in taken {
        if t.start > at && at < range.end() {
            parts.push(SectorRange::new(at, t.start.min(range.end()) - at));
        }
        at = at.max(t.end());
    }
    if at < range.end() {
        parts.push(SectorRange::new(at, range.end() - at));
    }
    parts
}

/// The parts of `a` that `b` does not hold (both sorted and disjoint): one sweep over both.
pub fn difference(a: &[SectorRange], b: &[SectorRange]) -> Vec<SectorRange> {
    let mut parts = Vec::new();
    let mut j = 0;
    for r in a {
        let mut at = r.start;
        while j < b.len() && b[j].end() <= at {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < r.end() {
            if b[k].start > at {
                parts.push(SectorRange::new(at, b[k].start - at));
            }
            at = at.max(b[k].end());
            k += 1;
        }
        if at < r.end() {
            parts.push(SectorRange::new(at, r.end() - at));
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_makes_overlapping_ranges_one_cover() {
        let r = SectorRange::new;
        assert_eq!(
            union(vec![r(10, 5), r(0, 20), r(20, 5), r(30, 1)]),
            vec![r(0, 25), r(30, 1)]
        );
    }

    #[test]
    fn touching_ranges_join_and_gaps_stay() {
        let r = SectorRange::new;
        assert_eq!(
            join_adjacent(vec![r(16, 8), r(0, 8), r(8, 8), r(40, 8)]),
            vec![r(0, 24), r(40, 8)]
        );
        assert!(join_adjacent(Vec::new()).is_empty());
    }

    #[test]
    fn parts_not_in_leave_out_what_is_taken() {
        let r = SectorRange::new;
        assert_eq!(parts_not_in(r(0, 64), Vec::new()), vec![r(0, 64)]);
        // Taken parts inside, across either end, overlapping each other, and outside.
        assert_eq!(
            parts_not_in(
                r(16, 64),
                vec![r(40, 8), r(0, 24), r(44, 8), r(72, 16), r(100, 4)]
            ),
            vec![r(24, 16), r(52, 20)]
        );
        assert!(parts_not_in(r(16, 8), vec![r(0, 64)]).is_empty());
    }

    #[test]
    fn difference_keeps_what_the_other_lacks() {
        let r = SectorRange::new;
        let a = [r(0, 10), r(20, 10), r(40, 10)];
        let b = [r(5, 20), r(42, 2), r(100, 1)];
        assert_eq!(
            difference(&a, &b),
            vec![r(0, 5), r(25, 5), r(40, 2), r(44, 6)]
        );
        assert_eq!(difference(&a, &[]), a.to_vec());
        assert!(difference(&[], &b).is_empty());
        assert!(difference(&a, &a).is_empty());
    }
}
