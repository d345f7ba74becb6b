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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_ranges_join_and_gaps_stay() {
        let r = SectorRange::new;
        assert_eq!(
            join_adjacent(vec![r(16, 8), r(0, 8), r(8, 8), r(40, 8)]),
            vec![r(0, 24), r(40, 8)]
        );
        assert!(join_adjacent(Vec::new()).is_empty());
    }
}
