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
