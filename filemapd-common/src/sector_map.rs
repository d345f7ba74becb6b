//! The sector map: which watched files own each sector of a dm device, so that the IO probe
//! charges a bio to its files with a few array reads, whatever the number of files or
//! extents. Two levels, both open-addressed tables in `BPF_F_MMAPABLE` arrays (a lookup is a
//! few inlined reads, a change a compare-and-swap, and user space maps both):
//!
//! - [`Block`]s of 16 MiB: up to [`OWNERS_PER_BLOCK`] files that own the whole block, and a
//!   bitmap of which of its 64 chunks have a [`Chunk`] entry. A bio looks its block up first;
//!   a block without an entry holds nothing of any watched file. Block entries are never
//!   freed: there is at most one per 16 MiB of a device that ever held a watched file's data.
//! - [`Chunk`]s of 256 KiB: up to [`RECORDS_PER_CHUNK`] files' [`Record`]s, each a bitmap of
//!   the chunk's 64 units of 4 KiB that the file owns: any fragmentation of a file inside the
//!   chunk is held exactly, an allocation is recorded with one atomic OR, a release with one
//!   atomic AND. Entries are freed when their records are.
//!
//! The unit is 4 KiB: a file system with smaller blocks cannot be counted in the kernel.
//! Two files may own the same sectors (reflinked copies): each has its own record or owner
//! word, and a bio there counts for both, as two dm-stats groups over those sectors would.

/// A chunk is 2^CHUNK_LOG sectors (256 KiB).
pub const CHUNK_LOG: u32 = 9;
pub const CHUNK_SECTORS: u64 = 1 << CHUNK_LOG;
/// A block is 2^BLOCK_LOG sectors (16 MiB): 64 chunks, one bit each in [`Block::chunks`].
pub const BLOCK_LOG: u32 = 15;
pub const BLOCK_SECTORS: u64 = 1 << BLOCK_LOG;
/// A chunk is 64 units of 8 sectors (4 KiB): one bit each in a [`Record`].
pub const UNIT_LOG: u32 = 3;
pub const UNIT_SECTORS: u64 = 1 << UNIT_LOG;
pub const RECORDS_PER_CHUNK: usize = 4;
pub const OWNERS_PER_BLOCK: usize = 4;
/// An entry lives in one of `PROBES` entries: its home, then 1, 3, 6, ... entries on
/// (triangular steps, which keep neighbouring homes' entries from piling into one run).
pub const PROBES: u32 = 8;

/// The largest slot a record or owner word can name (22 bits hold slot + 1).
pub const MAX_SLOTS: u32 = (1 << 22) - 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    /// [`packed`] (dev, sector >> CHUNK_LOG); 0 while the entry is free.
    pub key: u64,
    pub records: [Record; RECORDS_PER_CHUNK],
}

/// One file's units in a chunk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// [`meta`]: whose, and when last recorded to; 0 while free.
    pub meta: u64,
    /// Bit i: the file owns sectors `[8i, 8i + 8)` of the chunk.
    pub units: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Block {
    /// [`packed`] (dev, sector >> BLOCK_LOG); 0 while the entry is free.
    pub key: u64,
    /// Bit i: chunk i of the block may have an entry (set after its first span is claimed,
    /// cleared after the entry is freed; a walk skips the chunks whose bit is clear).
    pub chunks: u64,
    /// [`owner`] words: files that own every sector of the block; 0 is a free word.
    pub owners: [u64; OWNERS_PER_BLOCK],
}

/// The sizes of the two tables, as log2 of their entries: user space sets them at load time
/// (the maps' sizes and this global agree).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableLogs {
    pub chunks: u32,
    pub blocks: u32,
}

impl TableLogs {
    /// The bytes the tables take in the kernel, with the word per chunk entry that its makers
    /// take turns on (the kernel half's `MAKING`, a u64 each).
    pub const fn bytes(&self) -> u64 {
        (1u64 << self.chunks) * (core::mem::size_of::<Chunk>() as u64 + 8)
            + (1u64 << self.blocks) * core::mem::size_of::<Block>() as u64
    }
}

/// Whether the map can hold `sector` of `dev`: chunk numbers take 32 bits (the first PiB of
/// a device), and dev 0 would pack to a free entry's key.
#[inline(always)]
pub fn fits(dev: u32, sector: u64) -> bool {
    dev != 0 && sector >> (CHUNK_LOG + 32) == 0
}

/// The key of chunk or block `index` of `dev` as the tables hold it (never 0 when [`fits`]).
#[inline(always)]
pub fn packed(dev: u32, index: u64) -> u64 {
    (dev as u64) << 32 | (index & 0xffff_ffff)
}

/// The device a packed key names.
pub fn device_of(key: u64) -> u32 {
    (key >> 32) as u32
}

/// The chunk or block number a packed key names.
pub fn index_of(key: u64) -> u64 {
    key & 0xffff_ffff
}

/// A slot among `1 << bits` for `value` (Fibonacci hashing: the top bits of a multiplication
/// by 2^64 / φ, which spread neighbouring values and aligned addresses alike).
#[inline(always)]
pub fn spread(value: u64, bits: u32) -> u32 {
    (value.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> ((64 - bits) & 63)) as u32
}

/// The `probe`-th entry of a table of 2^table_log entries that `key` may live in.
#[inline(always)]
pub fn entry(key: u64, probe: u32, table_log: u32) -> u32 {
    let step = probe * (probe + 1) / 2;
    (spread(key, table_log).wrapping_add(step)) & ((1u32 << (table_log & 31)) - 1)
}

/// Birth stamps: CLOCK_MONOTONIC (`bpf_ktime_get_ns`) in units of 2^20 ns (about a
/// millisecond), 24 bits (wrapping after 4.9 hours). A pass judges only what was recorded
/// before it read the file: a span stamped at or after that reading may be missing from it.
pub mod stamp {
    pub const BITS: u32 = 24;
    pub const MASK: u64 = (1 << BITS) - 1;

    #[inline(always)]
    pub const fn of(ns: u64) -> u64 {
        (ns >> 20) & MASK
    }

    /// Whether `stamp` is no older than `since` (within half the wrap either way).
    pub const fn at_or_after(stamp: u64, since: u64) -> bool {
        stamp.wrapping_sub(since) & MASK < 1 << (BITS - 1)
    }
}

/// A record's meta word: `[0, 24)` its [`stamp`], `[24, 46)` slot + 1, bit 63 while its
/// claimer fills its units in. 0: free; all ones: its entry is being freed (nobody may
/// claim it).
pub mod meta {
    use super::stamp;

    pub const FILLING: u64 = 1 << 63;
    pub const DEAD: u64 = u64::MAX;

    #[inline(always)]
    pub const fn word(slot: u32, stamp: u64) -> u64 {
        (stamp & stamp::MASK) | (slot as u64 + 1) << 24
    }

    /// Whether the record holds a file's units (not free, dead or being filled).
    #[inline(always)]
    pub const fn live(word: u64) -> bool {
        word != 0 && word & FILLING == 0
    }

    #[inline(always)]
    pub const fn slot(word: u64) -> u32 {
        ((word >> 24) as u32 & ((1 << 22) - 1)).wrapping_sub(1)
    }

    #[inline(always)]
    pub const fn stamp(word: u64) -> u64 {
        word & stamp::MASK
    }
}

/// An owner word of a block: as a record's [`meta`] word (never filling). 0: free.
pub use meta as owner;

/// The units of a chunk that `[from, to)` (sectors from the chunk's start, `from < to <=
/// CHUNK_SECTORS`) touches.
#[inline(always)]
pub const fn units_touched(from: u64, to: u64) -> u64 {
    let first = (from >> UNIT_LOG) & 63;
    let last = ((to - 1) >> UNIT_LOG) & 63;
    let upto = if last == 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    upto & !((1u64 << first) - 1)
}

/// How many of the sectors `[from, to)` of a chunk lie in its units `units`.
#[inline(always)]
pub const fn sectors_in_units(units: u64, from: u64, to: u64) -> u64 {
    let first = (from >> UNIT_LOG) & 63;
    let last = ((to - 1) >> UNIT_LOG) & 63;
    let mut sectors = (units & units_touched(from, to)).count_ones() as u64 * UNIT_SECTORS;
    // The units at the ends count only the part of them inside `[from, to)`.
    if units & (1 << first) != 0 {
        sectors -= from & (UNIT_SECTORS - 1);
    }
    if units & (1 << last) != 0 {
        sectors -= (UNIT_SECTORS - (to & (UNIT_SECTORS - 1))) & (UNIT_SECTORS - 1);
    }
    sectors
}

/// The bits of [`Block::chunks`] for the chunks that `[start, end)` (inside one block, not
/// empty) touches.
#[inline(always)]
pub const fn chunk_bits(start: u64, end: u64) -> u64 {
    let first = (start >> CHUNK_LOG) & 63;
    let last = ((end - 1) >> CHUNK_LOG) & 63;
    let upto = if last == 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    upto & !((1u64 << first) - 1)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn a_meta_word_packs_and_unpacks() {
        let w = meta::word(12345, 0xabcdef);
        assert!(meta::live(w));
        assert_eq!((meta::slot(w), meta::stamp(w)), (12345, 0xabcdef));
        assert_eq!(meta::slot(meta::word(MAX_SLOTS, 0)), MAX_SLOTS);
        assert!(!meta::live(0) && !meta::live(meta::DEAD));
        assert!(!meta::live(w | meta::FILLING));
        assert_eq!(meta::slot(w | meta::FILLING), 12345);
        assert_ne!(meta::word(MAX_SLOTS, stamp::MASK), meta::DEAD);
    }

    #[test]
    fn sectors_in_units_count_only_the_part_inside() {
        let all = u64::MAX;
        assert_eq!(sectors_in_units(all, 0, CHUNK_SECTORS), CHUNK_SECTORS);
        assert_eq!(sectors_in_units(0, 0, CHUNK_SECTORS), 0);
        assert_eq!(sectors_in_units(all, 3, 5), 2, "inside one unit");
        assert_eq!(sectors_in_units(all, 5, 19), 14, "across three units");
        assert_eq!(sectors_in_units(0b010, 5, 19), 8, "the middle unit whole");
        assert_eq!(sectors_in_units(0b101, 5, 19), 3 + 3, "the ends' parts");
        assert_eq!(
            sectors_in_units(1 << 63, 500, 512),
            8,
            "unit 62 is not owned"
        );
        assert_eq!(units_touched(8, 16), 0b10);
        assert_eq!(units_touched(7, 9), 0b11);
        assert_eq!(units_touched(0, CHUNK_SECTORS), u64::MAX);
    }

    #[test]
    fn sectors_in_units_agree_with_counting_sector_by_sector() {
        let units = 0x8421_0f0f_f0f0_1248u64;
        for from in 0..CHUNK_SECTORS {
            for to in (from + 1..=CHUNK_SECTORS).step_by(7) {
                let expected = (from..to)
                    .filter(|s| units & (1 << (s >> UNIT_LOG)) != 0)
                    .count();
                assert_eq!(
                    sectors_in_units(units, from, to),
                    expected as u64,
                    "{from}..{to}"
                );
            }
        }
    }

    #[test]
    fn stamps_compare_across_the_wrap() {
        assert!(stamp::at_or_after(10, 10));
        assert!(stamp::at_or_after(11, 10));
        assert!(!stamp::at_or_after(9, 10));
        assert!(stamp::at_or_after(2, stamp::MASK - 2), "after the wrap");
        assert!(!stamp::at_or_after(stamp::MASK - 2, 2), "before the wrap");
    }

    #[test]
    fn chunk_bits_cover_the_chunks_a_range_touches() {
        assert_eq!(chunk_bits(0, 1), 1);
        assert_eq!(chunk_bits(0, CHUNK_SECTORS), 1);
        assert_eq!(chunk_bits(CHUNK_SECTORS - 1, CHUNK_SECTORS + 1), 0b11);
        assert_eq!(chunk_bits(0, BLOCK_SECTORS), u64::MAX);
        assert_eq!(chunk_bits(63 * CHUNK_SECTORS, BLOCK_SECTORS), 1 << 63);
        // Blocks further on the device: only the place inside the block counts.
        let b = 7 * BLOCK_SECTORS;
        assert_eq!(
            chunk_bits(b + 2 * CHUNK_SECTORS, b + 4 * CHUNK_SECTORS),
            0b1100
        );
    }

    #[test]
    fn keys_are_never_free_and_entries_wrap() {
        let dev = (253 << 20) | 7;
        assert!(fits(dev, (1 << 41) - 1));
        assert!(!fits(dev, 1 << 41), "past 1 PiB");
        assert!(!fits(0, 8));
        let key = packed(dev, 12345);
        assert_ne!(key, 0);
        assert_eq!((device_of(key), index_of(key)), (dev, 12345));
        let mut homes = std::collections::BTreeSet::new();
        for chunk in 0..4096 {
            let key = packed(dev, chunk);
            let home = entry(key, 0, 14);
            homes.insert(home);
            for probe in 0..PROBES {
                let step = probe * (probe + 1) / 2;
                assert_eq!(entry(key, probe, 14), (home + step) % (1 << 14));
            }
        }
        // Neighbouring chunks (what one file's growth makes) spread over the table.
        assert!(homes.len() > 3500, "{} homes for 4096 chunks", homes.len());
    }
}
