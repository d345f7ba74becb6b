//! Kernel half of filemapd: one tiny program per block-allocation tracepoint. Each reads the
//! record's dev and ino, drops it unless user space put that inode in `WATCHED`, and otherwise
//! sends the raw start/length fields to user space. Field offsets come from `LAYOUTS`, which
//! user space fills from tracefs before loading (they differ between kernels); everything else
//! (units, kinds, what to re-read) is decided in user space. One kprobe more tells user space
//! when another process deletes a dm-stats region or rewrites its aux_data, so that a deleted
//! group is noticed without polling.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{kprobe, kretprobe, map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use filemapd_common::{
    ExtentEvent, Field, InodeKey, LAYOUTS_LEN, TracepointLayout, tracepoint as tp,
};

/// Inodes user space watches; the value is unused. Resized by user space at load time.
#[map]
static WATCHED: HashMap<InodeKey, u8> = HashMap::with_max_entries(1024, 0);

/// Events for watched inodes.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Events that found the ring buffer full; user space rescans everything when this moves.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-tracepoint field layout, indexed by `filemapd_common::tracepoint`. Read-only data that
/// user space sets at load time, so the verifier sees the offsets as constants.
#[unsafe(no_mangle)]
static LAYOUTS: [TracepointLayout; LAYOUTS_LEN] = [TracepointLayout {
    dev: NO_FIELD,
    ino: NO_FIELD,
    start: NO_FIELD,
    length: NO_FIELD,
    skip: NO_FIELD,
    _pad: 0,
    skip_mask: 0,
}; LAYOUTS_LEN];

const NO_FIELD: Field = Field { offset: 0, size: 0 };

/// Threads inside dm_stats_message with a message that changes regions (entry seen, return
/// not yet): the return reports it, once the change is made.
#[map]
static CHANGING: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

/// The daemon's own tgid: its own region changes are not news to it. Set at load time.
#[unsafe(no_mangle)]
static OWN_TGID: u32 = 0;

#[tracepoint]
pub fn ext4_allocate_blocks(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::EXT4_ALLOCATE_BLOCKS)
}

#[tracepoint]
pub fn xfs_map_blocks_alloc(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_MAP_BLOCKS_ALLOC)
}

#[tracepoint]
pub fn xfs_iomap_alloc(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_IOMAP_ALLOC)
}

#[tracepoint]
pub fn ext4_ext_remove_space(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::EXT4_EXT_REMOVE_SPACE)
}

#[tracepoint]
pub fn xfs_bunmap(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_BUNMAP)
}

#[tracepoint]
pub fn xfs_iext_insert(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_IEXT_INSERT)
}

#[tracepoint]
pub fn xfs_bmap_post_update(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_BMAP_POST_UPDATE)
}

#[tracepoint]
pub fn ext4_es_remove_extent(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::EXT4_ES_REMOVE_EXTENT)
}

#[tracepoint]
pub fn xfs_swap_extent_after(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_SWAP_EXTENT_AFTER)
}

/// `int dm_stats_message(struct mapped_device *md, unsigned argc, char **argv, ...)`: every
/// `@stats_*` message to any dm device passes here. Notes `@stats_delete` and `@stats_set_aux`
/// from other processes; listing and printing (which every monitor does) are dropped here, so
/// monitors never wake each other up.
#[kprobe]
pub fn dm_stats_message(ctx: ProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: OWN_TGID is plain data in .rodata that user space sets at load time.
    let own = unsafe { core::ptr::read_volatile(&OWN_TGID) };
    if (thread >> 32) as u32 == own || !changes_regions(&ctx) {
        return 0;
    }
    let _ = CHANGING.insert(&thread, &1, 0);
    0
}

/// The return of a noted call: the region change is made, tell user space.
#[kretprobe]
pub fn dm_stats_message_return(_ctx: RetProbeContext) -> u32 {
    if CHANGING.remove(&bpf_get_current_pid_tgid()).is_err() {
        return 0;
    }
    let event = ExtentEvent {
        key: InodeKey {
            dev: 0,
            _pad: 0,
            ino: 0,
        },
        source: tp::DM_STATS_CHANGED,
        _pad: 0,
        start: 0,
        length: 0,
        // SAFETY: a helper without arguments or preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    };
    send(&event);
    0
}

/// Whether the message (argv[0]) is `@stats_delete` or `@stats_set_aux`.
#[inline(always)]
fn changes_regions(ctx: &ProbeContext) -> bool {
    let Some(argv) = ctx.arg::<*const *const u8>(2) else {
        return false;
    };
    // SAFETY: argv is the kernel's argument vector for this call; the helpers check access.
    let Ok(word) = (unsafe { bpf_probe_read_kernel(argv) }) else {
        return false;
    };
    // Zeroed, so that what follows the string's NUL is zero too.
    let mut text = [0u8; 16];
    // SAFETY: as above; the helper stops at the buffer's end.
    if unsafe { bpf_probe_read_kernel_str_bytes(word, &mut text) }.is_err() {
        return false;
    }
    // Compared as two integers (no memcmp in BPF). dmstats spells messages in lower case.
    let halves = |t: &[u8; 16]| {
        let mut head = [0u8; 8];
        let mut tail = [0u8; 8];
        head.copy_from_slice(&t[..8]);
        tail.copy_from_slice(&t[8..]);
        (u64::from_le_bytes(head), u64::from_le_bytes(tail))
    };
    let word = halves(&text);
    word == halves(b"@stats_delete\0\0\0") || word == halves(b"@stats_set_aux\0\0")
}

#[inline(always)]
fn report(ctx: &TracePointContext, source: u32) -> u32 {
    // SAFETY: LAYOUTS is plain data in .rodata; volatile keeps the compiler from folding the
    // all-zero initial value that user space replaces at load time.
    let layout: TracepointLayout =
        unsafe { core::ptr::read_volatile(&LAYOUTS[source as usize % LAYOUTS_LEN]) };
    let key = InodeKey {
        dev: read_field(ctx, layout.dev) as u32,
        _pad: 0,
        ino: read_field(ctx, layout.ino),
    };
    // SAFETY: the value is only tested for presence, never read through the reference.
    if unsafe { WATCHED.get(&key) }.is_none() {
        return 0;
    }
    if layout.skip.size != 0 && read_field(ctx, layout.skip) & layout.skip_mask == layout.skip_mask
    {
        return 0;
    }
    let event = ExtentEvent {
        key,
        source,
        _pad: 0,
        start: read_field(ctx, layout.start),
        length: read_field(ctx, layout.length),
        // SAFETY: a helper without arguments or preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    };
    send(&event);
    0
}

/// Queues an event for user space, or counts it lost when the ring buffer is full.
#[inline(always)]
fn send(event: &ExtentEvent) {
    if EVENTS.output::<ExtentEvent>(event, 0).is_err() {
        if let Some(lost) = LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
            unsafe { *lost += 1 };
        }
    }
}

/// Reads an unsigned field of 1, 2, 4 or 8 bytes; 0 when the tracepoint lacks it.
#[inline(always)]
fn read_field(ctx: &TracePointContext, field: Field) -> u64 {
    let offset = field.offset as usize;
    // SAFETY: the offset and size come from this tracepoint's tracefs format description.
    unsafe {
        match field.size {
            8 => ctx.read_at::<u64>(offset).unwrap_or(0),
            4 => ctx.read_at::<u32>(offset).map(u64::from).unwrap_or(0),
            2 => ctx.read_at::<u16>(offset).map(u64::from).unwrap_or(0),
            1 => ctx.read_at::<u8>(offset).map(u64::from).unwrap_or(0),
            _ => 0,
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
