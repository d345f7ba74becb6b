//! Types shared by the eBPF programs and the daemon. Every type is `#[repr(C)]` plain old data:
//! the kernel half writes them into maps and the ring buffer, the user half reads the same bytes.
//! Here: the trigger's (watched inodes, tracepoint layouts, events); [`sector_map`]: which
//! files own which sectors; [`counters`]: what the kernel counts per file.
#![no_std]

pub mod counters;
pub mod sector_map;

pub use counters::{Bounds, DEFAULT_BOUNDS, FileCounters, HISTOGRAM_BUCKETS, MAX_BOUNDS};

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
/// device sectors itself, before any user-space work. `dm_dev == 0`: not counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The dm device, kernel dev_t encoding (the file system sits on it directly).
    pub dm_dev: u32,
    /// The file's slot: its counters' index, and what the sector map names it by.
    pub slot: u32,
    /// log2(block size / 512): block number << this = sector.
    pub sector_shift: u32,
    /// xfs: block numbers are `AG number << ag_block_log | block in AG`; 0 for a linear
    /// numbering (ext4).
    pub ag_block_log: u32,
    /// xfs: blocks per allocation group.
    pub ag_blocks: u64,
    /// The inode's generation (FS_IOC_GETVERSION): with dev and ino, the file itself, so
    /// that counters carried over from an earlier daemon go to the same file, not to a new
    /// one that reuses the inode number.
    pub generation: u32,
    pub _pad: u32,
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

/// Where the bio hook finds what it needs in the block layer's structures (offsets from the
/// kernel's own BTF, no module's); all zero leaves it idle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BioLayout {
    /// offsetof(struct bio, bi_bdev) and bi_opf.
    pub bdev_in_bio: u32,
    pub opf_in_bio: u32,
    /// offsetof(struct bio, bi_iter) plus offsetof(struct bvec_iter, bi_sector), and bi_size.
    pub sector_in_bio: u32,
    pub size_in_bio: u32,
    /// offsetof(struct block_device, bd_dev).
    pub dev_in_bdev: u32,
    pub _pad: u32,
}

/// Where the new-file probe finds what it needs in the VFS's structures (offsets from the
/// kernel's BTF); all zero leaves it idle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfsLayout {
    /// offsetof(struct dentry, d_parent) and d_inode.
    pub parent_in_dentry: u32,
    pub inode_in_dentry: u32,
    /// offsetof(struct inode, i_mode), i_ino, i_sb and i_generation.
    pub mode_in_inode: u32,
    pub ino_in_inode: u32,
    pub sb_in_inode: u32,
    pub generation_in_inode: u32,
    /// offsetof(struct super_block, s_dev).
    pub dev_in_sb: u32,
    pub _pad: u32,
}

/// How many slots user space keeps ready for the files the kernel starts counting itself
/// (made in a watched directory: see `names::WATCHED_DIRS`).
pub const SPARE_SLOTS: u32 = 16;

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
    /// Not a tracepoint: a regular file was made in a watched directory, and the kernel
    /// counts it from now on: `key` names it, `start` holds its slot, `length` the
    /// directory's inode.
    pub const NEW_FILE: u32 = 0x102;
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
    /// The in-kernel counting: the sector map's tables ([`sector_map`]), chunk entries being
    /// made (by home), the tables' sizes, and per file its counters and histogram bounds.
    pub const CHUNKS: &str = "CHUNKS";
    pub const BLOCKS: &str = "BLOCKS";
    pub const MAKING: &str = "MAKING";
    pub const TABLE_LOGS: &str = "TABLE_LOGS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const BOUNDS: &str = "BOUNDS";
    /// The program that charges a pretend IO as the IO probe would (no device-mapper needed).
    pub const CHARGE_SERVICE: &str = "charge_service";
    /// One u32: the pid of the daemon whose IO probe counts (0: every daemon's). A service
    /// stopped for a successor leaves its programs attached and this word pinned; the
    /// successor shares the word and sets its own pid once it has taken the files up.
    pub const GATE: &str = "GATE";
    /// What the carry service adds to a slot's counters (one entry, set by user space), and
    /// the program that adds it atomically on its CPU while the IO probe counts.
    pub const CARRY: &str = "CARRY";
    pub const CARRY_SERVICE: &str = "carry_service";
    /// Global: nonzero when the programs log (aya-log) what their filter kept or dropped.
    pub const LOG_EVENTS: &str = "LOG_EVENTS";
    /// Global: the [`DmLayout`](super::DmLayout).
    pub const DM_LAYOUT: &str = "DM_LAYOUT";
    /// Global: the [`BioLayout`](super::BioLayout).
    pub const BIO_LAYOUT: &str = "BIO_LAYOUT";
    /// The bio hook: the block layer's tracepoints at a bio's queueing and its completion
    /// (the programs carry their names), and the bios they met in flight (by address).
    pub const BLOCK_BIO_QUEUE: &str = "block_bio_queue";
    pub const BLOCK_BIO_COMPLETE: &str = "block_bio_complete";
    pub const BIOS: &str = "BIOS";
    /// dm-mod's per-bio accounting function, and the program on it.
    pub const DM_STATS_ACCOUNT_IO: &str = "dm_stats_account_io";
    /// A dm device's statistics freed: the IO probe's memory of that device is dropped.
    pub const DM_STATS_CLEANUP: &str = "dm_stats_cleanup";
    /// Directories whose new regular files the kernel watches and counts from birth (by the
    /// directory's dev and inode: the placement the new files get), the slots it gives
    /// them, where it finds what it needs in the VFS, and the probes on the two functions
    /// that give a new inode its name.
    pub const WATCHED_DIRS: &str = "WATCHED_DIRS";
    pub const SPARE: &str = "SPARE";
    pub const VFS_LAYOUT: &str = "VFS_LAYOUT";
    pub const D_INSTANTIATE: &str = "d_instantiate";
    pub const D_INSTANTIATE_NEW: &str = "d_instantiate_new";
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
    unsafe impl aya::Pod for DmLayout {}
    unsafe impl aya::Pod for VfsLayout {}
    unsafe impl aya::Pod for BioLayout {}
    unsafe impl aya::Pod for FileCounters {}
    unsafe impl aya::Pod for Bounds {}
    unsafe impl aya::Pod for sector_map::Chunk {}
    unsafe impl aya::Pod for sector_map::Block {}
    unsafe impl aya::Pod for sector_map::TableLogs {}
}

#[cfg(test)]
mod tests {
    use super::*;

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
