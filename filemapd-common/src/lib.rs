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
    pub _pad: u32,
    pub skip_mask: u64,
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
    /// Number of entries above.
    pub const COUNT: usize = 9;
    /// Not a tracepoint: dm-stats' message handler returned from another process's deletion
    /// of a region or rewrite of its aux_data (where groups live). The event names no inode.
    pub const DM_STATS_CHANGED: u32 = 0x100;
}

/// Length of the layout table the kernel half reads.
pub const LAYOUTS_LEN: usize = tracepoint::COUNT;

/// Names of the maps and globals in the eBPF object, so both halves spell them alike.
pub mod names {
    pub const WATCHED: &str = "WATCHED";
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    pub const LAYOUTS: &str = "LAYOUTS";
    /// Global: the loading process's tgid, whose own dm-stats messages are not reported.
    pub const OWN_TGID: &str = "OWN_TGID";
    /// The kernel function whose calls tell of region changes, and the name of the kprobe
    /// program on its entry.
    pub const DM_STATS_MESSAGE: &str = "dm_stats_message";
    /// The kretprobe program on its return (when the change has been made).
    pub const DM_STATS_MESSAGE_RETURN: &str = "dm_stats_message_return";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and made only of integers with explicit padding.
    unsafe impl aya::Pod for InodeKey {}
    unsafe impl aya::Pod for Field {}
    unsafe impl aya::Pod for TracepointLayout {}
    unsafe impl aya::Pod for ExtentEvent {}
}
