//! Types shared by the eBPF programs and the daemon. Every type is `#[repr(C)]` plain old data:
//! the kernel half writes them into maps and the ring buffer, the user half reads the same bytes.
#![no_std]

/// Key of the watched-inode map: a file system's device in the *kernel's* dev_t encoding
/// (`major << 20 | minor`, as tracepoints report it; user space's `st_dev` uses glibc's
/// encoding and must be converted) and the inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

/// Where one tracepoint field lives in the raw record. `size == 0` means the tracepoint has no
/// such field. Offsets differ between kernels, so user space reads them from tracefs at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    pub offset: u16,
    pub size: u16,
}

/// The fields the kernel side reads from one tracepoint. `start` and `length` are copied into
/// the event as raw numbers; their unit (file system blocks or bytes) is known to user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    pub dev: Field,
    pub ino: Field,
    pub start: Field,
    pub length: Field,
    /// Records whose `skip` field has every bit of `skip_mask` set are dropped in the kernel
    /// (xfs: extents still awaiting allocation carry such a magic start block).
    pub skip: Field,
    /// Where the allocated blocks lie, in file system blocks (xfs: AG-encoded), for the
    /// in-kernel accounting; `size == 0` on tracepoints that do not allocate fresh blocks.
    pub physical_start: Field,
    pub physical_length: Field,
    /// [`layout_flags`].
    pub flags: u32,
    pub skip_mask: u64,
    /// Allocations whose physical start has every bit of this set are not recorded (xfs:
    /// a delayed allocation's placeholder, which some tracepoints report too).
    pub physical_skip_mask: u64,
    /// Allocations are recorded only when this field has every bit of `data_mask` set
    /// (ext4: blocks for file data, not for the file's extent tree); `size == 0`: always.
    pub data_flags: Field,
    pub _pad2: u32,
    pub data_mask: u64,
}

pub mod layout_flags {
    /// Send no event to user space: the program only feeds the accounting.
    pub const SILENT: u32 = 1;
    /// An xfs extent-record change: during a delayed allocation's conversion, the real blocks
    /// a record gains inside the converted (formerly delayed) logical range are fresh.
    pub const XFS_CONVERSION: u32 = 2;
}

/// The value of the watched-inode map: where the inode's blocks lie on the device-mapper
/// device under its file system, so that the kernel turns an allocation's block numbers into
/// device sectors itself, before any user-space work. `dm_dev == 0`: not accounted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The dm device, kernel dev_t encoding (the file system sits on it directly).
    pub dm_dev: u32,
    /// Index of the file's totals in the per-CPU totals array.
    pub slot: u32,
    /// log2(block size / 512): block number << this = sector.
    pub sector_shift: u32,
    /// xfs: block numbers are `AG number << ag_block_log | block in AG`; 0 for a linear
    /// numbering (ext4).
    pub ag_block_log: u32,
    /// xfs: blocks per allocation group.
    pub ag_blocks: u64,
}

impl Placement {
    /// The first device sector of file system block `block` as an allocation tracepoint
    /// numbers it (xfs: AG number and block in the AG).
    pub const fn sector_of(&self, block: u64) -> u64 {
        let linear = if self.ag_block_log == 0 {
            block
        } else {
            let log = self.ag_block_log & 63;
            (block >> log) * self.ag_blocks + (block & ((1u64 << log) - 1))
        };
        linear << (self.sector_shift & 15)
    }

    /// Sectors in `blocks` file system blocks.
    pub const fn sectors_in(&self, blocks: u64) -> u64 {
        blocks << (self.sector_shift & 15)
    }
}

/// The LPM-trie key data of the uncovered set: the dm device (big-endian) then a sector
/// (big-endian), so that a prefix names an aligned power-of-two run of sectors on one device.
pub type PieceAddress = [u8; 12];

/// Bits of a piece key that name the device.
pub const DEVICE_BITS: u32 = 32;

/// Marker levels, as log2 of sectors: an aligned block of 2^level sectors that holds a piece
/// smaller than itself carries a marker, at every level above that piece. A walk over an IO
/// that finds no entry at a place knows no piece starts before the next top-level boundary;
/// one that finds a marker steps to the next boundary of the level below it. So a walk over
/// blocks without pieces costs one lookup per top-level block, and each level is 64 times
/// the one below it (64 KiB, 4 MiB, 256 MiB, 16 GiB).
pub const MARKER_LEVELS: [u32; 4] = [7, 13, 19, 25];
pub const TOP_LEVEL: u32 = MARKER_LEVELS[MARKER_LEVELS.len() - 1];

/// The marker at `MARKER_LEVELS[level]` over the block holding `sector`; its key is
/// `prefix_len(MARKER_LEVELS[level])` at `piece_address(dev, marker.start)`. A walk that
/// finds it steps by the level below (by the file system block, `2^block_log` sectors, at
/// the lowest level).
pub const fn marker(level: usize, sector: u64, block_log: u32, born_ns: u64) -> Piece {
    let log = MARKER_LEVELS[level];
    let start = sector & !((1u64 << log) - 1);
    let step_log = if level == 0 {
        block_log
    } else {
        MARKER_LEVELS[level - 1]
    };
    Piece {
        start,
        end: start + (1 << log),
        ticket: 0,
        slot: 0,
        kind: piece_kind::MARKER,
        step: 1 << step_log,
        born_ns,
    }
}

/// Where a walk over the uncovered set goes from `at`, given what the lookup at `at` found:
/// past a piece, to where a finer piece could start after a marker, or past the top-level
/// block when nothing is there. Always further than `at`.
pub const fn walk_next(at: u64, found: Option<&Piece>) -> u64 {
    let step = match found {
        Some(piece) if piece.kind == piece_kind::RANGE => {
            return if piece.end > at { piece.end } else { at + 1 };
        }
        Some(marker) if marker.step > 0 => marker.step,
        Some(_) => 1,
        None => 1 << TOP_LEVEL,
    };
    // Steps are powers of two.
    (at | (step - 1)) + 1
}

pub const fn piece_address(dev: u32, sector: u64) -> PieceAddress {
    let d = dev.to_be_bytes();
    let s = sector.to_be_bytes();
    [
        d[0], d[1], d[2], d[3], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
    ]
}

/// The prefix length of a key naming 2^span_log sectors.
pub const fn prefix_len(span_log: u32) -> u32 {
    DEVICE_BITS + 64 - span_log
}

/// One entry of the uncovered set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    /// The sectors the entry stands for, `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// 0 while uncovered; otherwise the region creation that covers it, which counts once
    /// `COVERED` holds the ticket (set in the kernel while the device is suspended).
    pub ticket: u64,
    pub slot: u32,
    /// [`piece_kind`].
    pub kind: u32,
    /// A marker's: how far a walk that finds it steps (see [`marker`]). A range's: the file
    /// system block in sectors.
    pub step: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the allocation was recorded: a pass only
    /// judges pieces older than its own reading of the file.
    pub born_ns: u64,
}

pub mod piece_kind {
    /// Freshly allocated sectors of one watched file.
    pub const RANGE: u32 = 1;
    /// A block holding a smaller range somewhere (see [`MARKER_LEVELS`](super::MARKER_LEVELS)).
    pub const MARKER: u32 = 2;
}

/// The uncovered set's second home, for the small allocations that storms are made of: a
/// table of 256 KiB chunks, each with a few slots ([`Span`]s) that an allocation inside the
/// chunk claims with one atomic compare-and-swap. Recording costs a few array reads and
/// stores instead of the trie's insert per aligned piece, and a walk reads one entry per
/// chunk. Allocations larger than a chunk, and those that find no free slot, go to the trie.
pub const CHUNK_LOG: u32 = 9;
pub const CHUNK_SECTORS: u64 = 1 << CHUNK_LOG;
pub const SPANS_PER_CHUNK: usize = 8;

/// The chunk table is an array used as an open-addressed hash: a chunk lives in one of the
/// `CHUNK_PROBES` entries from its home ([`ChunkKey::home`]). An array, not a BPF hash map:
/// its lookups are a few inlined instructions instead of a helper call that hashes, and
/// making a chunk is a compare-and-swap of the key instead of an insert that allocates and
/// copies a whole entry under a lock (most of an allocation's recording time, in a profile).
pub const CHUNK_TABLE_LOG: u32 = 14;
pub const CHUNK_TABLE_LEN: u32 = 1 << CHUNK_TABLE_LOG;
pub const CHUNK_PROBES: u32 = 4;

/// A slot among `1 << bits` for `value` (Fibonacci hashing: the top bits of a multiplication
/// by 2^64 / φ, which spread neighbouring values and aligned addresses alike).
#[inline(always)]
pub fn spread(value: u64, bits: u32) -> u32 {
    (value.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as u32
}

/// A chunk: the dm device (kernel dev_t) and `sector >> CHUNK_LOG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    pub dev: u32,
    pub _pad: u32,
    pub chunk: u64,
}

impl ChunkKey {
    /// The key as the table stores it (0 marks a free entry). Only chunks that [`fit`] are
    /// stored; the key of one that does not names another chunk of its device, whose spans
    /// lie elsewhere, so a walk may look it up unchecked.
    ///
    /// [`fit`]: ChunkKey::fits
    #[inline(always)]
    pub fn packed(dev: u32, chunk: u64) -> u64 {
        (dev as u64) << 32 | (chunk & 0xffff_ffff)
    }

    /// Whether the table can hold the chunk (the first 1 PiB of its device); the others'
    /// allocations go to the trie.
    #[inline(always)]
    pub fn fits(dev: u32, chunk: u64) -> bool {
        dev != 0 && chunk >> 32 == 0
    }

    pub fn unpacked(packed: u64) -> Self {
        Self {
            dev: (packed >> 32) as u32,
            _pad: 0,
            chunk: packed & 0xffff_ffff,
        }
    }

    /// The first of the table entries a packed key may live in.
    #[inline(always)]
    pub fn home(packed: u64) -> u32 {
        spread(packed, CHUNK_TABLE_LOG)
    }

    /// The `probe`-th entry a packed key may live in.
    #[inline(always)]
    pub fn entry(packed: u64, probe: u32) -> u32 {
        (Self::home(packed) + probe) & (CHUNK_TABLE_LEN - 1)
    }
}

/// One allocation's sectors inside one chunk, uncovered except for `[taken_start, taken_end)`
/// once the region creation `ticket` is done (see `COVERED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
    pub taken_start: u64,
    pub taken_end: u64,
    /// 0 while nothing of the span is taken by a region creation.
    pub ticket: u64,
    /// `bpf_ktime_get_ns()` when recorded; also tells a span from a later one in its slot.
    pub born_ns: u64,
    /// The file's totals slot.
    pub slot: u32,
    pub _pad: u32,
    /// [`span_state`]; written only with atomic operations (64 bits: the eBPF target has
    /// no 32-bit compare-and-swap before its v3 instruction set).
    pub state: u64,
}

pub mod span_state {
    pub const FREE: u64 = 0;
    /// Claimed; its fields are being written. Walks pass over it.
    pub const FILLING: u64 = 1;
    pub const LIVE: u64 = 2;
    /// Its chunk is being deleted: nobody may claim it.
    pub const DEAD: u64 = 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    /// [`ChunkKey::packed`], 0 while the entry is free; set from 0 by compare-and-swap.
    pub key: u64,
    pub spans: [Span; SPANS_PER_CHUNK],
}

/// IO the kernel counted in a file's uncovered sectors, per CPU (summed by user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UncoveredTotals {
    pub reads: u64,
    pub read_sectors: u64,
    pub read_ns: u64,
    pub writes: u64,
    pub write_sectors: u64,
    pub write_ns: u64,
    /// Allocations that could not be put in the uncovered set whole (the set was full, or
    /// the range needed more pieces than one program may insert): their IO may go uncounted.
    pub unrecorded: u64,
    /// IOs the walk gave up on before their end (more steps than one program may take).
    pub unwalked: u64,
}

/// Where the IO probe finds what it needs in dm's structures (offsets from the kernel's
/// BTF), and what `dm_stats_account_io`'s time argument is on this kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmLayout {
    /// offsetof(struct mapped_device, stats): the probe gets `&md->stats`.
    pub stats_in_md: u32,
    /// offsetof(struct mapped_device, disk).
    pub disk_in_md: u32,
    /// offsetof(struct gendisk, major) and first_minor.
    pub major_in_disk: u32,
    pub first_minor_in_disk: u32,
    /// [`time_arg`].
    pub time_arg: u32,
    /// Nanoseconds per jiffy (1e9 / CONFIG_HZ); 0 when unknown (durations read 0).
    pub ns_per_jiffy: u32,
}

/// What the sixth argument of `dm_stats_account_io` holds (its name in BTF tells).
pub mod time_arg {
    pub const UNKNOWN: u32 = 0;
    /// `start_time`: jiffies when the IO started.
    pub const START_JIFFIES: u32 = 1;
    /// `duration_jiffies`.
    pub const DURATION_JIFFIES: u32 = 2;
    /// `duration_ns`.
    pub const DURATION_NS: u32 = 3;
}

/// One change to a watched inode's block mapping, as sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentEvent {
    pub key: InodeKey,
    /// Index into [`tracepoint`]: which event fired (user space derives the kind from it).
    pub source: u32,
    pub _pad: u32,
    /// Raw value of the tracepoint's start field, 0 when it has none.
    pub start: u64,
    /// Raw value of the tracepoint's length field, 0 when it has none.
    pub length: u64,
    /// `bpf_ktime_get_ns()` when the tracepoint fired.
    pub ktime_ns: u64,
    /// Raw values of the physical start (file system block; xfs: AG-encoded) and block count,
    /// on tracepoints that report them (0 otherwise): for `filemapd trace`.
    pub physical_start: u64,
    pub physical_length: u64,
}

/// The tracepoints the kernel half has a program for, by index into [`LAYOUTS_LEN`]-long arrays.
pub mod tracepoint {
    pub const EXT4_ALLOCATE_BLOCKS: u32 = 0;
    pub const XFS_MAP_BLOCKS_ALLOC: u32 = 1;
    pub const XFS_IOMAP_ALLOC: u32 = 2;
    pub const EXT4_EXT_REMOVE_SPACE: u32 = 3;
    pub const XFS_BUNMAP: u32 = 4;
    pub const XFS_IEXT_INSERT: u32 = 5;
    pub const XFS_BMAP_POST_UPDATE: u32 = 6;
    pub const EXT4_ES_REMOVE_EXTENT: u32 = 7;
    pub const XFS_SWAP_EXTENT_AFTER: u32 = 8;
    /// Silent (accounting only): the records an xfs delayed-allocation conversion changes.
    pub const XFS_BMAP_PRE_UPDATE: u32 = 9;
    pub const XFS_IEXT_REMOVE: u32 = 10;
    /// Number of entries above.
    pub const COUNT: usize = 11;
    /// Not a tracepoint: dm-stats' message handler returned from another process's deletion
    /// of a region or rewrite of its aux_data (where groups live). The event names no inode.
    pub const DM_STATS_CHANGED: u32 = 0x100;
    /// Not a tracepoint: an empty event that only wakes user space (an event was submitted
    /// without waking it just as it stopped reading).
    pub const NUDGE: u32 = 0x101;
}

/// Length of the layout table the kernel half reads.
pub const LAYOUTS_LEN: usize = tracepoint::COUNT;

/// Names of the maps and globals in the eBPF object, so both halves spell them alike.
pub mod names {
    pub const WATCHED: &str = "WATCHED";
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    /// One u32, nonzero while user space reads events (they need not wake it).
    pub const READING: &str = "READING";
    pub const LAYOUTS: &str = "LAYOUTS";
    /// Global: the loading process's tgid, whose own dm-stats messages are not reported.
    pub const OWN_TGID: &str = "OWN_TGID";
    /// The kernel function whose calls tell of region changes, and the name of the kprobe
    /// program on its entry.
    pub const DM_STATS_MESSAGE: &str = "dm_stats_message";
    /// The kretprobe program on its return (when the change has been made).
    pub const DM_STATS_MESSAGE_RETURN: &str = "dm_stats_message_return";
    /// The in-kernel accounting: the uncovered set, per-file totals, and the tickets of
    /// region creations under way (by thread) and done (set while the device is suspended).
    pub const UNCOVERED: &str = "UNCOVERED";
    pub const TOTALS: &str = "TOTALS";
    pub const COVERING: &str = "COVERING";
    pub const COVERED: &str = "COVERED";
    /// The chunk table (see [`CHUNK_LOG`](super::CHUNK_LOG)).
    pub const CHUNKS: &str = "CHUNKS";
    /// Nonzero while the trie may hold pieces (walks skip it otherwise).
    pub const TRIE_USED: &str = "TRIE_USED";
    /// The program that charges a pretend IO as the IO probe would (no device-mapper needed).
    pub const CHARGE_SERVICE: &str = "charge_service";
    /// Global: nonzero when the programs log (aya-log) what their filter kept or dropped.
    pub const LOG_EVENTS: &str = "LOG_EVENTS";
    /// Global: the [`DmLayout`](super::DmLayout).
    pub const DM_LAYOUT: &str = "DM_LAYOUT";
    /// dm-mod's per-bio accounting function, and the program on it.
    pub const DM_STATS_ACCOUNT_IO: &str = "dm_stats_account_io";
    /// dm-mod's resume after a region creation's suspend, and the program on it.
    pub const DM_INTERNAL_RESUME_FAST: &str = "dm_internal_resume_fast";
    /// A dm device's statistics freed: the IO probe's memory of that device is dropped.
    pub const DM_STATS_CLEANUP: &str = "dm_stats_cleanup";
    /// xfs's conversion of a delayed allocation (writeback), probed on entry and return.
    pub const XFS_BMAPI_CONVERT_DELALLOC: &str = "xfs_bmapi_convert_delalloc";
    pub const XFS_BMAPI_CONVERT_DELALLOC_RETURN: &str = "xfs_bmapi_convert_delalloc_return";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and made only of integers with explicit padding.
    unsafe impl aya::Pod for InodeKey {}
    unsafe impl aya::Pod for Field {}
    unsafe impl aya::Pod for TracepointLayout {}
    unsafe impl aya::Pod for ExtentEvent {}
    unsafe impl aya::Pod for Placement {}
    unsafe impl aya::Pod for Piece {}
    unsafe impl aya::Pod for UncoveredTotals {}
    unsafe impl aya::Pod for DmLayout {}
    unsafe impl aya::Pod for ChunkKey {}
    unsafe impl aya::Pod for Chunk {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn a_chunk_key_packs_and_unpacks() {
        let dev = (253 << 20) | 7;
        let packed = ChunkKey::packed(dev, 12345);
        assert_ne!(packed, 0, "0 marks a free entry");
        assert_eq!(
            ChunkKey::unpacked(packed),
            ChunkKey {
                dev,
                _pad: 0,
                chunk: 12345
            }
        );
        assert!(ChunkKey::fits(dev, (1 << 32) - 1));
        assert!(!ChunkKey::fits(dev, 1 << 32), "past 1 PiB: the trie's");
        assert!(
            !ChunkKey::fits(0, 1),
            "dev 0 would pack to a free entry's key"
        );
    }

    #[test]
    fn a_chunks_entries_are_consecutive_and_wrap() {
        let dev = (253 << 20) | 7;
        let mut homes = std::collections::BTreeSet::new();
        for chunk in 0..4096 {
            let packed = ChunkKey::packed(dev, chunk);
            let home = ChunkKey::home(packed);
            assert!(home < CHUNK_TABLE_LEN);
            homes.insert(home);
            for probe in 0..CHUNK_PROBES {
                assert_eq!(
                    ChunkKey::entry(packed, probe),
                    (home + probe) % CHUNK_TABLE_LEN
                );
            }
        }
        // Neighbouring chunks (what one file's growth makes) spread over the table.
        assert!(homes.len() > 3500, "{} homes for 4096 chunks", homes.len());
    }

    fn range(start: u64, end: u64) -> Piece {
        Piece {
            start,
            end,
            kind: piece_kind::RANGE,
            ..Piece::default()
        }
    }

    #[test]
    fn a_walk_passes_a_piece_whole() {
        assert_eq!(walk_next(10, Some(&range(8, 64))), 64);
        // A stale entry that ends before the place still moves the walk on.
        assert_eq!(walk_next(70, Some(&range(8, 64))), 71);
    }

    #[test]
    fn a_walk_that_finds_nothing_skips_to_the_next_top_level_block() {
        let top = 1u64 << TOP_LEVEL;
        assert_eq!(walk_next(0, None), top);
        assert_eq!(walk_next(top - 1, None), top);
        assert_eq!(walk_next(top, None), 2 * top);
    }

    #[test]
    fn a_marker_sends_the_walk_to_the_next_block_of_the_level_below() {
        let sector = (5 << 25) + (3 << 19) + 12345;
        let lowest = marker(0, sector, 3, 0);
        assert_eq!(lowest.start, sector & !127);
        assert_eq!(lowest.end - lowest.start, 128);
        assert_eq!(walk_next(sector, Some(&lowest)), (sector | 7) + 1);
        let second = marker(1, sector, 3, 0);
        assert_eq!(second.end - second.start, 1 << 13);
        assert_eq!(walk_next(sector, Some(&second)), (sector | 127) + 1);
        let top = marker(MARKER_LEVELS.len() - 1, sector, 3, 0);
        assert_eq!(top.start, 5 << 25);
        assert_eq!(
            walk_next(sector, Some(&top)),
            (sector | ((1 << 19) - 1)) + 1
        );
    }

    #[test]
    fn levels_rise_and_keys_name_their_blocks() {
        assert!(MARKER_LEVELS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(prefix_len(0), 96);
        assert_eq!(prefix_len(TOP_LEVEL), 96 - TOP_LEVEL);
        assert_eq!(
            piece_address(0x0fd0_0001, 0x0102),
            [0x0f, 0xd0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2]
        );
    }

    #[test]
    fn xfs_blocks_are_numbered_by_allocation_group() {
        // 4 KiB blocks; AGs of 1000 blocks, numbered in 10 bits.
        let xfs = Placement {
            sector_shift: 3,
            ag_block_log: 10,
            ag_blocks: 1000,
            ..Placement::default()
        };
        assert_eq!(xfs.sector_of((2 << 10) | 7), (2 * 1000 + 7) * 8);
        assert_eq!(xfs.sectors_in(16), 128);
        let ext4 = Placement {
            sector_shift: 3,
            ..Placement::default()
        };
        assert_eq!(ext4.sector_of(2055), 2055 * 8);
    }
}
