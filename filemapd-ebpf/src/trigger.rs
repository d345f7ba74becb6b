//! The trigger: one tiny program per block-allocation tracepoint. Each reads the record's
//! dev and ino, drops it unless user space put that inode in `WATCHED`, and otherwise sends
//! the raw start/length fields to user space; an allocation of fresh blocks is also recorded
//! in the sector map at once (see `sector_map`). Field offsets come from `LAYOUTS`, which user
//! space fills from tracefs before loading (they differ between kernels); everything else
//! (units, kinds, what to re-read) is decided in user space. A kprobe pair more tells user
//! space when another process deletes a dm-stats region or rewrites its aux_data, so that a
//! deleted group is noticed without polling.
use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{kprobe, kretprobe, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use aya_log_ebpf::{debug, info};
use filemapd_common::{
    ExtentEvent, Field, InodeKey, LAYOUTS_LEN, Placement, TracepointLayout, layout_flags,
    tracepoint as tp,
};

use crate::{sector_map, xfs_conversion};

/// Inodes user space watches, and where their blocks lie. Resized by user space at load time.
#[map]
static WATCHED: HashMap<InodeKey, Placement> = HashMap::with_max_entries(1024, 0);

/// Events for watched inodes.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Nonzero while user space is reading: it reads the ring again before it sleeps, so events
/// need not wake it. Waking a reader costs an interrupt (an exit to the host in a VM): more
/// than the rest of a program's run, once per event under an allocation storm.
#[map]
static READING: Array<u32> = Array::with_max_entries(1, 0);

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
    physical_start: NO_FIELD,
    physical_length: NO_FIELD,
    flags: 0,
    skip_mask: 0,
    physical_skip_mask: 0,
    data_flags: NO_FIELD,
    _pad2: 0,
    data_mask: 0,
}; LAYOUTS_LEN];

const NO_FIELD: Field = Field { offset: 0, size: 0 };

/// Threads inside dm_stats_message with a message that changes regions (entry seen, return
/// not yet): the return reports it, once the change is made.
#[map]
static CHANGING: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

/// The daemon's own tgid: its own region changes are not news to it. Set at load time.
#[unsafe(no_mangle)]
static OWN_TGID: u32 = 0;

/// This daemon's tgid, as set at load time.
#[inline(always)]
pub fn own_tgid() -> u32 {
    // SAFETY: OWN_TGID is plain data in .rodata that user space sets at load time.
    unsafe { core::ptr::read_volatile(&OWN_TGID) }
}

#[tracepoint]
pub fn ext4_allocate_blocks(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::EXT4_ALLOCATE_BLOCKS, "ext4_allocate_blocks")
}

#[tracepoint]
pub fn xfs_map_blocks_alloc(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_MAP_BLOCKS_ALLOC, "xfs_map_blocks_alloc")
}

#[tracepoint]
pub fn xfs_iomap_alloc(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_IOMAP_ALLOC, "xfs_iomap_alloc")
}

#[tracepoint]
pub fn ext4_ext_remove_space(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::EXT4_EXT_REMOVE_SPACE, "ext4_ext_remove_space")
}

#[tracepoint]
pub fn xfs_bunmap(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_BUNMAP, "xfs_bunmap")
}

#[tracepoint]
pub fn xfs_iext_insert(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_IEXT_INSERT, "xfs_iext_insert")
}

#[tracepoint]
pub fn xfs_bmap_post_update(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_BMAP_POST_UPDATE, "xfs_bmap_post_update")
}

#[tracepoint]
pub fn ext4_es_remove_extent(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::EXT4_ES_REMOVE_EXTENT, "ext4_es_remove_extent")
}

#[tracepoint]
pub fn xfs_swap_extent_after(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_SWAP_EXTENT_AFTER, "xfs_swap_extent_after")
}

#[tracepoint]
pub fn xfs_bmap_pre_update(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_BMAP_PRE_UPDATE, "xfs_bmap_pre_update")
}

#[tracepoint]
pub fn xfs_iext_remove(ctx: TracePointContext) -> u32 {
    report(&ctx, tp::XFS_IEXT_REMOVE, "xfs_iext_remove")
}

/// `int dm_stats_message(struct mapped_device *md, unsigned argc, char **argv, ...)`: every
/// `@stats_*` message to any dm device passes here. Notes `@stats_delete` and `@stats_set_aux`
/// from other processes; listing and printing (which every monitor does) are dropped here, so
/// monitors never wake each other up.
#[kprobe]
pub fn dm_stats_message(ctx: ProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    if (thread >> 32) as u32 == own_tgid() || !changes_regions(&ctx) {
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
    // SAFETY: a helper without arguments or preconditions.
    send(
        &notice(tp::DM_STATS_CHANGED, unsafe { bpf_ktime_get_ns() }),
        0,
    );
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

/// Whether `--ebpf-log` asked for the programs' own log (aya-log): set at load time.
#[unsafe(no_mangle)]
static LOG_EVENTS: u32 = 0;

#[inline(always)]
fn logging() -> bool {
    // SAFETY: plain data in .rodata that user space sets at load time.
    unsafe { core::ptr::read_volatile(&LOG_EVENTS) != 0 }
}

#[inline(always)]
fn report(ctx: &TracePointContext, source: u32, name: &str) -> u32 {
    // Fields are read one by one from .rodata rather than the layout copied: the programs'
    // stack is small and aya-log's records need their share.
    let layout = &LAYOUTS[source as usize % LAYOUTS_LEN];
    let key = InodeKey {
        dev: read_field(ctx, rodata(&layout.dev)) as u32,
        _pad: 0,
        ino: read_field(ctx, rodata(&layout.ino)),
    };
    // SAFETY: a copy is taken at once; user space only inserts and removes whole entries.
    let Some(placement) = (unsafe { WATCHED.get(&key) }).copied() else {
        if logging() {
            log_dropped(ctx, name, key.ino, "not watched");
        }
        return 0;
    };
    let flags = rodata(&layout.flags);
    if flags & layout_flags::XFS_CONVERSION != 0 && placement.dm_dev != 0 {
        xfs_conversion::note(ctx, layout, &placement);
    }
    if flags & layout_flags::SILENT != 0 {
        return 0;
    }
    let skip = rodata(&layout.skip);
    let skip_mask = rodata(&layout.skip_mask);
    if skip.size != 0 && read_field(ctx, skip) & skip_mask == skip_mask {
        if logging() {
            log_dropped(ctx, name, key.ino, "no blocks yet (delayed allocation)");
        }
        return 0;
    }
    let physical_start = read_field(ctx, rodata(&layout.physical_start));
    let physical_length = read_field(ctx, rodata(&layout.physical_length));
    // One clock read serves the event and the recording: a read can cost microseconds (a
    // guest whose clock source is an emulated HPET pays an exit to the host for each).
    // SAFETY: a helper without arguments or preconditions.
    let ktime_ns = unsafe { bpf_ktime_get_ns() };
    if rodata(&layout.physical_start).size != 0
        && placement.dm_dev != 0
        && flags & layout_flags::XFS_CONVERSION == 0
    {
        let placeholder = rodata(&layout.physical_skip_mask);
        let data_flags = rodata(&layout.data_flags);
        let data_mask = rodata(&layout.data_mask);
        let data = data_flags.size == 0 || read_field(ctx, data_flags) & data_mask == data_mask;
        if data && (placeholder == 0 || physical_start & placeholder != placeholder) {
            if logging() {
                log_recorded(ctx, name, key.ino, physical_start, physical_length);
            }
            sector_map::record(&placement, physical_start, physical_length, ktime_ns);
        }
    }
    let start = read_field(ctx, rodata(&layout.start));
    let length = read_field(ctx, rodata(&layout.length));
    if logging() {
        log_kept(ctx, name, key.ino, start, length);
    }
    // Written in place in the ring buffer, not built on the stack first.
    let Some(mut entry) = EVENTS.reserve::<ExtentEvent>(0) else {
        count_lost();
        return 0;
    };
    entry.write(ExtentEvent {
        key,
        source,
        _pad: 0,
        start,
        length,
        ktime_ns,
        physical_start,
        physical_length,
    });
    submit_quietly(entry);
    0
}

/// Watches an inode the kernel found itself (see `new_files`); false when it was watched.
#[inline(always)]
pub fn watch_new(key: &InodeKey, placement: &Placement) -> bool {
    // BPF_NOEXIST: what user space watched stays as it is.
    WATCHED.insert(key, placement, 1).is_ok()
}

/// Submits an event without waking user space while it is reading anyway. User space clears
/// `READING`, then reads the ring once more before it sleeps; an event submitted unheard in
/// that instant (flag read before the clear, submitted after the last read) is caught by the
/// second look at the flag, after the submit: a nudge then wakes the reader.
#[inline(always)]
fn submit_quietly(entry: RingBufEntry<ExtentEvent>) {
    if !reading() {
        entry.submit(0);
        return;
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    if !reading() {
        send(&notice(tp::NUDGE, 0), BPF_RB_FORCE_WAKEUP as u64);
    }
}

/// Whether user space says it is reading events (see `READING`).
#[inline(always)]
fn reading() -> bool {
    // SAFETY: read at once; volatile, so that the read after a submit is not folded into
    // the one before it.
    READING
        .get_ptr(0)
        .is_some_and(|flag| unsafe { core::ptr::read_volatile(flag) } != 0)
}

/// A value in .rodata that user space sets at load time; volatile keeps the compiler from
/// folding the all-zero initial value.
#[inline(always)]
pub fn rodata<T: Copy>(value: &T) -> T {
    // SAFETY: a plain read of plain data.
    unsafe { core::ptr::read_volatile(value) }
}

// The programs' own log (`--ebpf-log`), out of line: aya-log's records take stack that the
// programs' frames would otherwise have to share.
#[inline(never)]
fn log_dropped(ctx: &TracePointContext, name: &str, ino: u64, why: &str) {
    debug!(ctx, "{}: inode {} dropped: {}", name, ino, why);
}

#[inline(never)]
fn log_kept(ctx: &TracePointContext, name: &str, ino: u64, start: u64, length: u64) {
    info!(
        ctx,
        "{}: inode {} kept: start {} length {}", name, ino, start, length
    );
}

#[inline(never)]
fn log_recorded(ctx: &TracePointContext, name: &str, ino: u64, block: u64, blocks: u64) {
    info!(
        ctx,
        "{}: inode {} blocks {}+{} counted from now on", name, ino, block, blocks
    );
}

/// Queues an event for user space, or counts it lost when the ring buffer is full.
#[inline(always)]
pub fn send(event: &ExtentEvent, flags: u64) {
    if EVENTS.output::<ExtentEvent>(event, flags).is_err() {
        count_lost();
    }
}

/// An event that names no inode and no range: only its `source` (and time) says anything.
#[inline(always)]
fn notice(source: u32, ktime_ns: u64) -> ExtentEvent {
    ExtentEvent {
        key: InodeKey {
            dev: 0,
            _pad: 0,
            ino: 0,
        },
        source,
        _pad: 0,
        start: 0,
        length: 0,
        ktime_ns,
        physical_start: 0,
        physical_length: 0,
    }
}

/// An event found the ring buffer full: user space rescans everything when this moves.
#[inline(always)]
fn count_lost() {
    if let Some(lost) = LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *lost += 1 };
    }
}

/// Reads an unsigned field of 1, 2, 4 or 8 bytes; 0 when the tracepoint lacks it.
#[inline(always)]
pub fn read_field(ctx: &TracePointContext, field: Field) -> u64 {
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
