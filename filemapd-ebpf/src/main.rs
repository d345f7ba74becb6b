//! Kernel half of filemapd: one tiny program per block-allocation tracepoint. Each reads the
//! record's dev and ino, drops it unless user space put that inode in `WATCHED`, and otherwise
//! sends the raw start/length fields to user space. Field offsets come from `LAYOUTS`, which
//! user space fills from tracefs before loading (they differ between kernels); everything else
//! (units, kinds, what to re-read) is decided in user space. One kprobe more tells user space
//! when another process deletes a dm-stats region or rewrites its aux_data, so that a deleted
//! group is noticed without polling.
//!
//! The in-kernel accounting: an allocation for a watched file also puts its sectors in the
//! uncovered set, and a probe on dm-stats' own per-bio accounting charges the IO that lands
//! there to the file, until the region that covers it exists. That IO completed before any
//! user-space monitor could have made a region. The set has two homes: an allocation no
//! longer than a 256 KiB chunk claims a span of its chunk in a table (a compare-and-swap: what
//! random growth makes, thousands a second); a larger one goes into an LPM trie of aligned
//! power-of-two pieces. User space maps the table and changes spans with the same atomics.
#![no_std]
#![no_main]
// Compare-and-swap on map values: core's atomic types offer none on the eBPF target, whose
// instruction set (v3) has it.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{kprobe, kretprobe, map, tracepoint},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key, ring_buf::RingBufEntry},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
};
use aya_log_ebpf::{debug, info};
use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
};
use filemapd_common::{
    CHUNK_LOG, CHUNK_PROBES, CHUNK_SECTORS, CHUNK_TABLE_LEN, Chunk, ChunkKey, DmLayout,
    ExtentEvent, Field, InodeKey, LAYOUTS_LEN, MARKER_LEVELS, Piece, PieceAddress, Placement,
    SPANS_PER_CHUNK, TracepointLayout, UncoveredTotals, layout_flags, marker, piece_address,
    piece_kind, prefix_len, span_state, spread, time_arg, tracepoint as tp, walk_next,
};

/// Inodes user space watches, and where their blocks lie. Resized by user space at load time.
#[map]
static WATCHED: HashMap<InodeKey, Placement> = HashMap::with_max_entries(1024, 0);

/// The uncovered set: freshly allocated sectors of watched files that no region of theirs
/// covers yet, plus chunk markers. BPF_F_NO_PREALLOC, which LPM tries require.
#[map]
static UNCOVERED: LpmTrie<PieceAddress, Piece> = LpmTrie::with_max_entries(65536, 0);

/// The small allocations of the uncovered set, by 256 KiB chunk: an open-addressed table
/// (see `CHUNK_TABLE_LOG`), one entry per chunk. User space maps it to read and change it.
#[map]
static CHUNKS: Array<Chunk> = Array::with_max_entries(CHUNK_TABLE_LEN, BPF_F_MMAPABLE);

/// Per table entry, for the chunks whose home it is: 1 while a claim makes an entry for such
/// a chunk. Two claims making the same chunk at once could otherwise take two entries (when
/// one frees between their looks), and walks read only the first entry of a chunk.
#[map]
static MAKING: Array<u64> = Array::with_max_entries(CHUNK_TABLE_LEN, 0);

/// Nonzero while the trie may hold pieces: set here after recording one, cleared by user space
/// when it finds the trie empty (it looks again after clearing). A walk skips the trie while
/// it is clear: under random growth it is empty, every allocation being a span.
#[map]
static TRIE_USED: Array<u64> = Array::with_max_entries(1, 0);

/// Per file (by `Placement::slot`): IO counted in its uncovered sectors. Resized at load time.
#[map]
static TOTALS: PerCpuArray<UncoveredTotals> = PerCpuArray::with_max_entries(1024, 0);

/// Threads about to create a region: the ticket of the pieces that region covers.
#[map]
static COVERING: HashMap<u64, u64> = HashMap::with_max_entries(1024, 0);

/// Tickets whose region exists: set when dm-stats resumes the device after adding it, so that
/// every IO before counts in the kernel and every IO after in the region, none in both.
#[map]
static COVERED: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);

/// The dm devices the IO probe met: `[address of their struct dm_stats, dev_t]`, so that a
/// bio costs an array read instead of two probe reads of dm's structures. An entry is dropped
/// when its device goes (see `dm_stats_cleanup`, attached before the IO probe).
#[map]
static DEVICES: Array<[u64; 2]> = Array::with_max_entries(1 << DEVICES_LOG, 0);
const DEVICES_LOG: u32 = 6;
/// An entry's address while its writer fills it in (no `struct dm_stats` lives at 1).
const DEVICE_LOCKED: u64 = 1;

/// Threads inside xfs_bmapi_convert_delalloc, with the logical range `(start, end)` of the
/// delayed-allocation records seen so far in that call (their blocks are being allocated).
#[map]
static CONVERTING: HashMap<u64, [u64; 2]> = HashMap::with_max_entries(256, 0);

/// How many entries `CONVERTING` holds: the xfs record programs, which run for every
/// allocation, look there only while some thread converts (an array read costs less than a
/// hash lookup that finds nothing, and O_DIRECT growth converts nothing).
#[map]
static CONVERSIONS: Array<u64> = Array::with_max_entries(1, 0);

/// Set by user space at load time from the kernel's BTF; all zero leaves the IO probe idle.
#[unsafe(no_mangle)]
static DM_LAYOUT: DmLayout = DmLayout {
    stats_in_md: 0,
    disk_in_md: 0,
    major_in_disk: 0,
    first_minor_in_disk: 0,
    time_arg: 0,
    ns_per_jiffy: 0,
};

/// Most pieces one allocation is cut into (an aligned run of 2^32 blocks needs at most 64).
const MAX_PIECES: u32 = 64;
/// Most lookups one IO's walk takes: one per piece it meets, one per marked block of each
/// level and one per unmarked 16 GiB. Reached only by IO over many small pieces.
const MAX_STEPS: u32 = 1024;
const LEVELS: usize = MARKER_LEVELS.len();
/// Most chunks one IO's span walk looks at (256 MiB).
const MAX_CHUNK_STEPS: u32 = 1024;

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

/// `int xfs_bmapi_convert_delalloc(...)`: writeback turning a delayed allocation into blocks.
/// The record changes it makes (traced) tell which blocks are fresh.
#[kprobe]
pub fn xfs_bmapi_convert_delalloc(_ctx: ProbeContext) -> u32 {
    // Counted before it is there: a record program that sees no count finds no entry.
    count_conversions(1);
    if CONVERTING
        .insert(bpf_get_current_pid_tgid(), [0, 0], 0)
        .is_err()
    {
        count_conversions(u64::MAX);
    }
    0
}

#[kretprobe]
pub fn xfs_bmapi_convert_delalloc_return(_ctx: RetProbeContext) -> u32 {
    if CONVERTING.remove(bpf_get_current_pid_tgid()).is_ok() {
        count_conversions(u64::MAX);
    }
    0
}

/// Adds `delta` (u64::MAX to subtract one) to `CONVERSIONS`.
#[inline(always)]
fn count_conversions(delta: u64) {
    if let Some(count) = CONVERSIONS.get_ptr_mut(0) {
        // SAFETY: an aligned u64 of an array value, only changed atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(count, delta) };
    }
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
        note_conversion(ctx, layout, &placement);
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
                log_uncovered(ctx, name, key.ino, physical_start, physical_length);
            }
            record_uncovered(&placement, physical_start, physical_length, ktime_ns);
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
fn rodata<T: Copy>(value: &T) -> T {
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
fn log_uncovered(ctx: &TracePointContext, name: &str, ino: u64, block: u64, blocks: u64) {
    info!(
        ctx,
        "{}: inode {} blocks {}+{} uncovered until their region exists", name, ino, block, blocks
    );
}

/// An xfs extent record changing inside a delayed allocation's conversion: a delayed record
/// widens the converted logical range; a real one's blocks inside that range are fresh
/// (what it had before lies outside: records do not overlap).
#[inline(always)]
fn note_conversion(ctx: &TracePointContext, layout: &TracepointLayout, placement: &Placement) {
    if CONVERSIONS.get(0).is_none_or(|count| load(count) == 0) {
        return;
    }
    let Some(range) = CONVERTING.get_ptr_mut(&bpf_get_current_pid_tgid()) else {
        return;
    };
    // SAFETY: this thread's own entry; only this thread writes it while the call lasts.
    let range = unsafe { &mut *range };
    let start = read_field(ctx, rodata(&layout.start));
    let end = start + read_field(ctx, rodata(&layout.length));
    let block = read_field(ctx, rodata(&layout.physical_start));
    let placeholder = rodata(&layout.physical_skip_mask);
    if block & placeholder == placeholder {
        if range[0] == range[1] {
            *range = [start, end];
        } else {
            range[0] = if start < range[0] { start } else { range[0] };
            range[1] = if end > range[1] { end } else { range[1] };
        }
        return;
    }
    let lo = if start > range[0] { start } else { range[0] };
    let hi = if end < range[1] { end } else { range[1] };
    if lo < hi {
        // SAFETY: a helper without arguments or preconditions.
        let born_ns = unsafe { bpf_ktime_get_ns() };
        record_uncovered(placement, block + (lo - start), hi - lo, born_ns);
    }
}

/// Puts a fresh allocation of `blocks` file system blocks at `block`, made at `born_ns`, into
/// the uncovered set: one span per chunk it touches when it is no longer than a chunk, pieces
/// of the trie otherwise (or when its chunk has no free span).
#[inline(always)]
fn record_uncovered(placement: &Placement, block: u64, blocks: u64, born_ns: u64) {
    let start = placement.sector_of(block);
    let end = start + placement.sectors_in(blocks);
    if end - start > CHUNK_SECTORS {
        record_pieces(placement, start, end, born_ns);
        return;
    }
    let boundary = (start | (CHUNK_SECTORS - 1)) + 1;
    let split = if boundary < end { boundary } else { end };
    for (from, to) in [(start, split), (split, end)] {
        if from < to && !claim_span(placement.dm_dev, placement.slot, from, to, born_ns) {
            record_pieces(placement, from, to, born_ns);
        }
    }
}

/// Records `[start, end)` (sectors, inside one chunk) in a free span of an entry of its chunk,
/// making one in a free entry of the table when need be; false when there is no room.
#[inline(never)]
fn claim_span(dev: u32, slot: u32, start: u64, end: u64, born_ns: u64) -> bool {
    if !ChunkKey::fits(dev, start >> CHUNK_LOG) {
        return false;
    }
    let key = ChunkKey::packed(dev, start >> CHUNK_LOG);
    let chunk = match find_entry(key) {
        Some(chunk) => chunk,
        None => {
            let Some(making) = MAKING.get_ptr_mut(ChunkKey::home(key)) else {
                return false;
            };
            // SAFETY: an array value, only changed atomically.
            let making = unsafe { &mut *making };
            // Another claim is making a chunk of this home right now: the trie takes this one.
            if !cas(making, 0, 1) {
                return false;
            }
            // Made meanwhile by a claim that held the word before?
            let made = find_entry(key).or_else(|| make_entry(key));
            publish(making, 0);
            match made {
                Some(chunk) => chunk,
                None => return false,
            }
        }
    };
    claim_checked(chunk, key, start, end, born_ns, slot)
}

/// The entry of a chunk, if it has one: every entry of its window is looked at (an entry
/// before it may have been freed since it was made).
#[inline(always)]
fn find_entry(key: u64) -> Option<&'static mut Chunk> {
    for probe in 0..CHUNK_PROBES {
        if let Some(chunk) = chunk_entry(key, probe)
            && load(&chunk.key) == key
        {
            return Some(chunk);
        }
    }
    None
}

/// Makes a chunk's entry in the first free entry of its window (under its home's `MAKING`).
#[inline(always)]
fn make_entry(key: u64) -> Option<&'static mut Chunk> {
    for probe in 0..CHUNK_PROBES {
        if let Some(chunk) = chunk_entry(key, probe)
            && load(&chunk.key) == 0
            && cas(&mut chunk.key, 0, key)
        {
            return Some(chunk);
        }
    }
    None
}

/// The table entry a packed chunk key may live in at `probe`.
#[inline(always)]
fn chunk_entry(key: u64, probe: u32) -> Option<&'static mut Chunk> {
    // SAFETY: a live array value; its key and spans' states are only touched atomically.
    CHUNKS
        .get_ptr_mut(ChunkKey::entry(key, probe))
        .map(|chunk| unsafe { &mut *chunk })
}

/// [`claim_in`], then a second look at the entry's key: when the entry was freed (and perhaps
/// given to another chunk) between the first look and the claim, the span is given back.
#[inline(always)]
fn claim_checked(
    chunk: &mut Chunk,
    key: u64,
    start: u64,
    end: u64,
    born_ns: u64,
    slot: u32,
) -> bool {
    let Some(index) = claim_in(chunk, start, end, born_ns, slot) else {
        return false;
    };
    if load(&chunk.key) == key {
        return true;
    }
    if let Some(span) = chunk.spans.get_mut(index) {
        cas(&mut span.state, span_state::LIVE, span_state::FREE);
    }
    false
}

/// Puts `[start, end)` (sectors) into the trie, cut into aligned power-of-two pieces, each
/// with markers on the blocks of the levels above it (see `MARKER_LEVELS`). The pieces go in
/// one per round of `bpf_loop`, whose body the verifier checks once: unrolled, a loop of 64
/// pieces with their markers is more than the verifier of Linux 6.18 will walk.
#[inline(never)]
fn record_pieces(placement: &Placement, start: u64, end: u64, born_ns: u64) {
    let mut recording = Recording {
        start,
        end,
        first: start,
        born_ns,
        dev: placement.dm_dev,
        slot: placement.slot,
        block_log: placement.sector_shift & 15,
        failed: 0,
    };
    // SAFETY: the callback is a static function of the signature bpf_loop wants, and its
    // context lives on this stack for the whole call.
    unsafe {
        bpf_loop(
            MAX_PIECES,
            record_piece as *mut c_void,
            &mut recording as *mut Recording as *mut c_void,
            0,
        )
    };
    if recording.start > start
        && let Some(used) = TRIE_USED.get_ptr_mut(0)
    {
        // SAFETY: an array slot; set after the pieces, so a walk that sees it clear comes
        // before them (and before the IO on them, which follows the allocation).
        let used = unsafe { &mut *used };
        if load(used) == 0 {
            publish(used, 1);
        }
    }
    if recording.start < recording.end || recording.failed != 0 {
        if let Some(totals) = TOTALS.get_ptr_mut(placement.slot) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
            unsafe { (*totals).unrecorded += 1 };
        }
    }
}

/// What [`record_piece`] works through: the allocation's sectors not yet recorded.
#[repr(C)]
struct Recording {
    start: u64,
    end: u64,
    /// Where the allocation starts.
    first: u64,
    born_ns: u64,
    dev: u32,
    slot: u32,
    block_log: u32,
    failed: u32,
}

/// One round of [`record_uncovered`]: the largest aligned piece at `start`, then its markers.
/// Returns 1 (stop) once all is recorded or the set is full.
extern "C" fn record_piece(_round: u64, context: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the context record_uncovered gave it.
    let r = unsafe { &mut *(context as *mut Recording) };
    if r.start >= r.end {
        return 1;
    }
    // The largest run that is aligned at `start` and fits before `end`.
    let fits = 63 - (r.end - r.start).leading_zeros();
    let span_log = if r.start.trailing_zeros() < fits {
        r.start.trailing_zeros()
    } else {
        fits
    };
    let span = 1u64 << (span_log & 63);
    let piece = Piece {
        start: r.start,
        end: r.start + span,
        ticket: 0,
        slot: r.slot,
        kind: piece_kind::RANGE,
        step: 1 << (r.block_log & 15),
        born_ns: r.born_ns,
    };
    let key = Key::new(prefix_len(span_log), piece_address(r.dev, r.start));
    if UNCOVERED.insert(&key, &piece, 0).is_err() {
        r.failed = 1;
        return 1;
    }
    // After the piece: a walk never meets a marker without what it marks. The pieces of
    // one allocation follow each other, so a piece needs a level's marker only when it is
    // the first in that level's block: the allocation's first piece, or one starting it.
    for level in 0..LEVELS {
        let size = 1u64 << MARKER_LEVELS[level];
        if span_log >= MARKER_LEVELS[level] || (r.start != r.first && r.start & (size - 1) != 0) {
            continue;
        }
        let marker = marker(level, r.start, r.block_log, r.born_ns);
        let key = Key::new(
            prefix_len(MARKER_LEVELS[level]),
            piece_address(r.dev, marker.start),
        );
        // Usually there already: a lookup costs less than an insert refused (which
        // allocates first). BPF_NOEXIST: a marker never replaces a piece that spans its
        // block.
        let there = UNCOVERED
            .get(&key)
            .is_some_and(|e| e.start == marker.start && e.end == marker.end);
        if !there {
            let _ = UNCOVERED.insert(&key, &marker, 1);
        }
    }
    r.start += span;
    0
}

/// Charges a pretend IO as the IO probe charges a real one, for machines without
/// device-mapper (tests, the bench): run with BPF_PROG_TEST_RUN and never attached. Arguments:
/// the dm device, the IO's sectors `[start, end)`, nonzero for a write.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/charge_service")]
pub fn charge_service(ctx: *mut c_void) -> u32 {
    let ctx = RawTracePointContext::new(ctx);
    let (dev, start, end, write): (u64, u64, u64, u64) =
        (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    charge(dev as u32, write != 0, start, end, 0);
    0
}

/// Claims a free span of `chunk` for `[start, end)`: its index.
#[inline(always)]
fn claim_in(chunk: &mut Chunk, start: u64, end: u64, born_ns: u64, slot: u32) -> Option<usize> {
    for index in 0..SPANS_PER_CHUNK {
        let span = &mut chunk.spans[index];
        // A plain look first: a locked compare-and-swap on every span in use would cost more
        // than the claim (under emulation, several times more). The state is only touched
        // atomically; the other fields only by whoever moved it from FREE to FILLING.
        if load(&span.state) != span_state::FREE
            || !cas(&mut span.state, span_state::FREE, span_state::FILLING)
        {
            continue;
        }
        put(&mut span.start, start);
        put(&mut span.end, end);
        put(&mut span.taken_start, 0);
        put(&mut span.taken_end, 0);
        put(&mut span.ticket, 0);
        put(&mut span.born_ns, born_ns);
        // SAFETY: a plain store to a field this claim owns.
        unsafe { core::ptr::write_volatile(&mut span.slot, slot) };
        publish(&mut span.state, span_state::LIVE);
        return Some(index);
    }
    None
}

/// A plain store that the compiler keeps in its place among the others.
#[inline(always)]
fn put(field: &mut u64, value: u64) {
    // SAFETY: a store to a field of a map value this program may write.
    unsafe { core::ptr::write_volatile(field, value) };
}

/// A store ordered after the ones before it (an atomic exchange), for the field that makes
/// them count.
#[inline(always)]
fn publish(field: &mut u64, value: u64) {
    // SAFETY: an aligned field of a map value (repr(C), all u64 but the last pair).
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(field, value) };
}

/// Compare-and-swap: whether `field` held `old` (and now holds `new`).
#[inline(always)]
fn cas(field: &mut u64, old: u64, new: u64) -> bool {
    // SAFETY: as in `publish`.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(field, old, new)
    }
    .1
}

/// A read of a field that others change atomically. Aligned 64-bit loads are single-copy
/// atomic, and the eBPF ISA up to v3 has no acquire load: eBPF runs on x86-64 here, whose
/// loads are not reordered with each other.
#[inline(always)]
fn load(field: &u64) -> u64 {
    // SAFETY: as in `publish`.
    unsafe { core::ptr::read_volatile(field) }
}

/// `void dm_stats_account_io(struct dm_stats *stats, unsigned long bi_rw, sector_t bi_sector,
/// unsigned bi_sectors, bool end, unsigned long start_time (or a duration), ...)`: dm-stats
/// charging one bio to its regions. At the bio's end, charges the sectors of it that lie in
/// the uncovered set to their files.
#[kprobe]
pub fn dm_stats_account_io(ctx: ProbeContext) -> u32 {
    // SAFETY: plain data in .rodata that user space sets at load time.
    let layout: DmLayout = unsafe { core::ptr::read_volatile(&DM_LAYOUT) };
    // Half the calls are a bio's start: done with at once.
    if layout.disk_in_md == 0 || ctx.arg::<u64>(4).is_none_or(|end| end & 0xff == 0) {
        return 0;
    }
    let (Some(stats), Some(rw), Some(sector), Some(sectors), Some(time)) = (
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<u64>(2),
        ctx.arg::<u64>(3),
        ctx.arg::<u64>(5),
    ) else {
        return 0;
    };
    let Some(dev) = device_of(stats, &layout) else {
        return 0;
    };
    let duration_ns = match layout.time_arg {
        // SAFETY: a helper without arguments or preconditions.
        time_arg::START_JIFFIES => (unsafe { bpf_jiffies64() })
            .wrapping_sub(time)
            .wrapping_mul(layout.ns_per_jiffy as u64),
        time_arg::DURATION_JIFFIES => time.wrapping_mul(layout.ns_per_jiffy as u64),
        time_arg::DURATION_NS => time,
        _ => 0,
    };
    charge(
        dev,
        rw & 1 == 1,
        sector,
        sector + (sectors & 0xffff_ffff),
        duration_ns,
    );
    0
}

/// The dm device (kernel dev_t) whose `struct dm_stats` this is: from `DEVICES` when it was
/// seen before, read from the mapped_device (two probe reads) and remembered otherwise.
#[inline(always)]
fn device_of(stats: u64, layout: &DmLayout) -> Option<u32> {
    let seen = DEVICES.get_ptr_mut(device_entry(stats));
    if let Some(seen) = seen {
        // SAFETY: a live array value, changed only as `remember_device` says.
        let seen = unsafe { &*seen };
        if load(&seen[0]) == stats {
            let dev = load(&seen[1]);
            // Still this device's after the read: the number is its own.
            if load(&seen[0]) == stats {
                return Some(dev as u32);
            }
        }
    }
    let dev = read_device(stats, layout)?;
    if let Some(seen) = seen {
        // SAFETY: as above.
        remember_device(unsafe { &mut *seen }, stats, dev);
    }
    Some(dev)
}

/// `DEVICES`' entry for a `struct dm_stats` address.
#[inline(always)]
fn device_entry(stats: u64) -> u32 {
    spread(stats, DEVICES_LOG)
}

/// Puts `(stats, dev)` in an entry: locked by a compare-and-swap of its address to
/// `DEVICE_LOCKED`, so that two writers never mix their halves; a locked entry is left alone.
#[inline(always)]
fn remember_device(seen: &mut [u64; 2], stats: u64, dev: u32) {
    let held = load(&seen[0]);
    if held == DEVICE_LOCKED || !cas(&mut seen[0], held, DEVICE_LOCKED) {
        return;
    }
    put(&mut seen[1], u64::from(dev));
    publish(&mut seen[0], stats);
}

/// The dm device's number, read from its gendisk.
#[inline(always)]
fn read_device(stats: u64, layout: &DmLayout) -> Option<u32> {
    let md = stats.wrapping_sub(layout.stats_in_md as u64);
    // SAFETY: md is the mapped_device holding these stats; the helpers check every access.
    let disk: u64 =
        unsafe { bpf_probe_read_kernel((md + layout.disk_in_md as u64) as *const u64) }.ok()?;
    // `int major, first_minor` follow each other in struct gendisk: one read for both.
    if layout.first_minor_in_disk == layout.major_in_disk + 4 {
        let both: u64 =
            unsafe { bpf_probe_read_kernel((disk + layout.major_in_disk as u64) as *const u64) }
                .ok()?;
        return Some(((both as u32) << 20) | ((both >> 32) as u32 & 0xfffff));
    }
    let major: u32 =
        unsafe { bpf_probe_read_kernel((disk + layout.major_in_disk as u64) as *const u32) }
            .ok()?;
    let minor: u32 =
        unsafe { bpf_probe_read_kernel((disk + layout.first_minor_in_disk as u64) as *const u32) }
            .ok()?;
    Some(major << 20 | (minor & 0xfffff))
}

/// `void dm_stats_cleanup(struct dm_stats *stats)`, when a dm device goes away (no IO of its
/// own is in flight then): `DEVICES` forgets it, as its memory may hold another device next.
#[kprobe]
pub fn dm_stats_cleanup(ctx: ProbeContext) -> u32 {
    let Some(stats) = ctx.arg::<u64>(0) else {
        return 0;
    };
    if let Some(seen) = DEVICES.get_ptr_mut(device_entry(stats)) {
        // SAFETY: a live array value, changed only atomically here.
        let seen = unsafe { &mut *seen };
        cas(&mut seen[0], stats, 0);
    }
    0
}

/// Walks the IO `[sector, end)` through the uncovered set and charges each file its share,
/// a lookup per round of `bpf_loop` (its body is verified once, whatever the bound).
#[inline(always)]
fn charge(dev: u32, write: bool, sector: u64, end: u64, duration_ns: u64) {
    let mut walk = Walk {
        at: sector,
        end,
        duration_ns,
        dev,
        write: u32::from(write),
        last_slot: u32::MAX,
        _pad: 0,
    };
    // The trie first, when it may hold pieces at all.
    let trie_used = TRIE_USED.get(0).is_some_and(|used| load(used) != 0);
    let mut unwalked = false;
    if trie_used {
        // SAFETY: as in record_uncovered.
        unsafe {
            bpf_loop(
                MAX_STEPS,
                charge_step as *mut c_void,
                &mut walk as *mut Walk as *mut c_void,
                0,
            )
        };
        unwalked = walk.at < walk.end;
    }
    walk.at = sector;
    // Most IOs lie in one or two chunks: those are walked without bpf_loop's calls.
    if walk_chunk(&mut walk) && walk_chunk(&mut walk) {
        // SAFETY: as above.
        unsafe {
            bpf_loop(
                MAX_CHUNK_STEPS,
                charge_chunk as *mut c_void,
                &mut walk as *mut Walk as *mut c_void,
                0,
            )
        };
    }
    if unwalked || walk.at < walk.end {
        let slot = if walk.last_slot == u32::MAX {
            0
        } else {
            walk.last_slot
        };
        if let Some(totals) = TOTALS.get_ptr_mut(slot) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
            unsafe { (*totals).unwalked += 1 };
        }
    }
}

/// Where [`charge_step`] is in an IO.
#[repr(C)]
struct Walk {
    at: u64,
    end: u64,
    duration_ns: u64,
    dev: u32,
    write: u32,
    /// The file charged last: an IO counts once per file, its sectors in every piece.
    last_slot: u32,
    _pad: u32,
}

/// One lookup of [`charge`]'s walk; returns 1 (stop) at the IO's end.
extern "C" fn charge_step(_round: u64, context: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the context charge gave it.
    let w = unsafe { &mut *(context as *mut Walk) };
    if w.at >= w.end {
        return 1;
    }
    let key = Key::new(prefix_len(0), piece_address(w.dev, w.at));
    let found = UNCOVERED.get(&key).copied();
    let piece = match found {
        Some(piece) if piece.kind == piece_kind::RANGE && piece.end > w.at => piece,
        // Nothing here, or a marker: on to where a piece could start.
        other => {
            w.at = walk_next(w.at, other.as_ref());
            return 0;
        }
    };
    let stop = if piece.end < w.end { piece.end } else { w.end };
    if !done(piece.ticket) {
        charge_to(w, piece.slot, stop - w.at);
    }
    w.at = stop;
    0
}

/// Whether the region creation holding `ticket` is done (its region counts from then on).
#[inline(always)]
fn done(ticket: u64) -> bool {
    // SAFETY: the value is only tested for presence.
    ticket != 0 && unsafe { COVERED.get(&ticket) }.is_some()
}

/// Charges `sectors` of the walk's IO to the file in `slot`; the IO itself counts once per
/// file.
#[inline(always)]
fn charge_to(w: &mut Walk, slot: u32, sectors: u64) {
    let Some(totals) = TOTALS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
    let totals = unsafe { &mut *totals };
    let first = slot != w.last_slot;
    if w.write != 0 {
        totals.write_sectors += sectors;
        if first {
            totals.writes += 1;
            totals.write_ns += w.duration_ns;
        }
    } else {
        totals.read_sectors += sectors;
        if first {
            totals.reads += 1;
            totals.read_ns += w.duration_ns;
        }
    }
    w.last_slot = slot;
}

/// A round of [`charge`]'s second walk, through the spans; returns 1 (stop) at the IO's end.
extern "C" fn charge_chunk(_round: u64, context: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the context charge gave it.
    let w = unsafe { &mut *(context as *mut Walk) };
    i64::from(!walk_chunk(w))
}

/// Charges the spans of the chunk the walk is in, and moves it to the next chunk; false once
/// the IO's end is reached.
#[inline(always)]
fn walk_chunk(w: &mut Walk) -> bool {
    if w.at >= w.end {
        return false;
    }
    let boundary = (w.at | (CHUNK_SECTORS - 1)) + 1;
    let stop = if boundary < w.end { boundary } else { w.end };
    if let Some(chunk) = find_entry(ChunkKey::packed(w.dev, w.at >> CHUNK_LOG)) {
        walk_entry(w, chunk, stop);
    }
    w.at = stop;
    w.at < w.end
}

/// Charges the spans of one entry that meet `[w.at, stop)`. An entry freed and given to
/// another chunk while it is read holds spans elsewhere on the device, which this range does
/// not meet.
#[inline(never)]
fn walk_entry(w: &mut Walk, chunk: &Chunk, stop: u64) {
    for index in 0..SPANS_PER_CHUNK {
        let span = &chunk.spans[index];
        // The state first, atomically.
        if load(&span.state) != span_state::LIVE {
            continue;
        }
        let from = if span.start > w.at { span.start } else { w.at };
        let to = if span.end < stop { span.end } else { stop };
        if from >= to {
            continue;
        }
        let mut sectors = to - from;
        let ticket = span.ticket;
        if ticket != 0 {
            let taken_from = if span.taken_start > from {
                span.taken_start
            } else {
                from
            };
            let taken_to = if span.taken_end < to {
                span.taken_end
            } else {
                to
            };
            // The ticket's lookup only when its region could hold some of this IO.
            if taken_from < taken_to && done(ticket) {
                sectors -= taken_to - taken_from;
            }
        }
        if sectors > 0 {
            charge_to(w, span.slot, sectors);
        }
    }
}

/// `void dm_internal_resume_fast(struct mapped_device *md)`, which dm-stats calls after adding
/// a region while the device is suspended: the ticket of the thread creating it is done.
#[kprobe]
pub fn dm_internal_resume_fast(_ctx: ProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied at once.
    if let Some(ticket) = unsafe { COVERING.get(&thread) }.copied() {
        let _ = COVERED.insert(&ticket, &1, 0);
    }
    0
}

/// Queues an event for user space, or counts it lost when the ring buffer is full.
#[inline(always)]
fn send(event: &ExtentEvent, flags: u64) {
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
