//! Per-file IO counted in the kernel: at each bio's start and end its sectors are looked up in
//! the sector map and each file that owns some of them is charged. Two hooks call it: by
//! default a probe on dm-stats' own per-bio accounting (`dm_stats_account_io`, called while
//! the device has a region), and, where asked or where dm's layout is unknown, the bio hook
//! (`bio_hook`: the block layer's tracepoints, no dm-stats region needed).
//! A bio costs a block lookup and a chunk lookup per 256 KiB chunk it touches that holds
//! spans (a bio inside blocks owned whole: one lookup per 16 MiB), whatever the number of
//! files or extents watched.
use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_loop, bpf_probe_read_kernel},
    macros::{kprobe, map},
    maps::{Array, PerCpuArray},
    programs::{ProbeContext, RawTracePointContext},
};
use core::{ffi::c_void, ptr::addr_of_mut};
use filemapd_common::{
    Bounds, DmLayout, FileCounters, HISTOGRAM_BUCKETS,
    sector_map::{
        BLOCK_LOG, BLOCK_SECTORS, CHUNK_SECTORS, OWNERS_PER_BLOCK, RECORDS_PER_CHUNK, chunk_bits,
        meta, owner, sectors_in_units, spread,
    },
    time_arg,
};

use crate::{
    atomics::{add, cas, load, publish, put},
    sector_map::{find_block, find_chunk},
};

/// Per file (by `Placement::slot`), per CPU: what it did. Resized by user space at load time.
#[map]
static COUNTERS: PerCpuArray<FileCounters> = PerCpuArray::with_max_entries(1, 0);

/// The pid of the daemon whose IO probe counts, 0: any (`names::GATE`). A service stopped for
/// a successor leaves its programs attached and this word pinned; the successor loads with
/// the same word and writes its own pid there once it has taken the files up, so that each
/// bio is counted by exactly one of the two, and none goes uncounted between them.
#[map]
static GATE: Array<u32> = Array::with_max_entries(1, 0);

/// What the carry service adds to a slot (one entry, written by user space before each run).
#[map]
static CARRY: Array<FileCounters> = Array::with_max_entries(1, 0);

/// Per file: its latency histogram's bounds (set by user space before it watches the file).
#[map]
static BOUNDS: Array<Bounds> = Array::with_max_entries(1, 0);

/// The walks of the bios being counted on this CPU, one per nesting level (`DEPTH`): the bio
/// hook's programs are not kept from nesting as kprobes are (a bio's completion in an
/// interrupt may come in the middle of another bio's queueing). In a map rather than on the
/// stack: the verifier tracks every stack slot of a `bpf_loop` callback's state, and a walk's
/// file table there multiplied its states; map memory it takes as it comes.
#[map]
static WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(WALK_LEVELS, 0);
const WALK_LEVELS: u32 = 4;

/// How many walks are under way on this CPU (each run that interrupts another has finished,
/// and put the word back, before the one it interrupted goes on).
#[map]
static DEPTH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The dm devices the IO probe met: `[address of their struct dm_stats, dev_t]`, so that a
/// bio costs an array read instead of two probe reads of dm's structures. An entry is dropped
/// when its device goes (see `dm_stats_cleanup`, attached before the IO probe).
#[map]
static DEVICES: Array<[u64; 2]> = Array::with_max_entries(1 << DEVICES_LOG, 0);
const DEVICES_LOG: u32 = 6;
/// An entry's address while its writer fills it in (no `struct dm_stats` lives at 1).
const DEVICE_LOCKED: u64 = 1;

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

/// Most chunks one bio's walk visits beyond the first two (256 MiB).
const MAX_WALK_ROUNDS: u32 = 1024;
/// Files one bio is counted once for (a bio over more files counts again for the others).
const MOST_FILES_PER_BIO: usize = 8;

/// `void dm_stats_account_io(struct dm_stats *stats, unsigned long bi_rw, sector_t bi_sector,
/// unsigned bi_sectors, bool end, unsigned long start_time (or a duration), ...)`: at a bio's
/// start its files' IO in flight goes up; at its end it goes down and the bio is counted.
#[kprobe]
pub fn dm_stats_account_io(ctx: ProbeContext) -> u32 {
    // SAFETY: plain data in .rodata that user space sets at load time.
    let layout: DmLayout = unsafe { core::ptr::read_volatile(&DM_LAYOUT) };
    if layout.disk_in_md == 0 || !counts_now() {
        return 0;
    }
    let (Some(stats), Some(rw), Some(sector), Some(sectors), Some(end), Some(time)) = (
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<u64>(2),
        ctx.arg::<u64>(3),
        ctx.arg::<u64>(4),
        ctx.arg::<u64>(5),
    ) else {
        return 0;
    };
    let Some(dev) = device_of(stats, &layout) else {
        return 0;
    };
    let ending = end & 0xff != 0;
    let duration_ns = match (ending, layout.time_arg) {
        (false, _) => 0,
        // SAFETY: a helper without arguments or preconditions.
        (true, time_arg::START_JIFFIES) => (unsafe { bpf_jiffies64() })
            .wrapping_sub(time)
            .wrapping_mul(layout.ns_per_jiffy as u64),
        (true, time_arg::DURATION_JIFFIES) => time.wrapping_mul(layout.ns_per_jiffy as u64),
        (true, time_arg::DURATION_NS) => time,
        _ => 0,
    };
    let how = How {
        write: rw & 1 == 1,
        end: ending,
    };
    charge(
        how.with(dev),
        sector,
        sector + (sectors & 0xffff_ffff),
        duration_ns,
    );
    0
}

/// Whether this daemon's IO probe counts (see `GATE`).
#[inline(always)]
pub fn counts_now() -> bool {
    // SAFETY: an aligned u32 that user space changes with one store.
    let gate = GATE
        .get_ptr(0)
        .map_or(0, |gate| unsafe { core::ptr::read_volatile(gate) });
    gate == 0 || gate == crate::trigger::own_tgid()
}

/// Adds `CARRY` to the counters of the slot given as the only argument, on the CPU it runs
/// on, with atomic adds: the IO probe may interrupt it there (a bio ending in an interrupt),
/// and neither add is lost. Run by user space with BPF_PROG_TEST_RUN, never attached: what a
/// predecessor counted joins a file's counters while the probe counts into them.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/carry_service")]
pub fn carry_service(ctx: *mut c_void) -> u32 {
    const WORDS: usize = core::mem::size_of::<FileCounters>() / 8;
    let slot: u64 = RawTracePointContext::new(ctx).arg(0);
    let (Some(carry), Some(counters)) = (CARRY.get_ptr(0), COUNTERS.get_ptr_mut(slot as u32))
    else {
        return 1;
    };
    let (from, to) = (carry as *const u64, counters as *mut u64);
    for i in 0..WORDS {
        // SAFETY: both point at a whole FileCounters, which is WORDS aligned u64s.
        unsafe { add(to.add(i), *from.add(i)) };
    }
    0
}

/// Counts a pretend IO as the IO probe counts a real one, for machines without
/// device-mapper (tests, the bench): run with BPF_PROG_TEST_RUN and never attached.
/// Arguments: the dm device, the IO's sectors `[start, end)`, nonzero for a write, the
/// phase (0: its start, else its end) and the duration to count.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/charge_service")]
pub fn charge_service(ctx: *mut c_void) -> u32 {
    let ctx = RawTracePointContext::new(ctx);
    let (dev, start, end, write, phase, duration): (u64, u64, u64, u64, u64, u64) = (
        ctx.arg(0),
        ctx.arg(1),
        ctx.arg(2),
        ctx.arg(3),
        ctx.arg(4),
        ctx.arg(5),
    );
    let how = How {
        write: write != 0,
        end: phase != 0,
    };
    charge(how.with(dev as u32), start, end, duration);
    0
}

/// A file's allocation could not be recorded whole.
#[inline(always)]
pub fn count_unrecorded(slot: u32) {
    if let Some(counters) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { (*counters).unrecorded += 1 };
    }
}

/// What a call to the probe is about: a read or a write, its start or its end. Packed with
/// the device into one argument (eBPF functions take at most five).
#[derive(Clone, Copy)]
pub struct How {
    pub write: bool,
    pub end: bool,
}

impl How {
    const WRITE: u64 = 1 << 32;
    pub const END: u64 = 1 << 33;
    /// (Only for `count_bio`: the walk did not count all of the bio.)
    const CUT_SHORT: u64 = 1 << 34;

    pub fn with(self, dev: u32) -> u64 {
        u64::from(dev)
            | if self.write { Self::WRITE } else { 0 }
            | if self.end { Self::END } else { 0 }
    }
}

/// Where a walk is in a bio, and what it found.
#[repr(C)]
pub struct Walk {
    at: u64,
    end: u64,
    /// The block whose whole-block owners were noted last (+1; 0: none).
    owners_of: u64,
    dev: u32,
    /// How many of `files` are set.
    found: u32,
    /// The files the bio met, and how many of its sectors each owns.
    files: [u32; MOST_FILES_PER_BIO],
    sectors: [u64; MOST_FILES_PER_BIO],
    /// 1 once the bio met more files than `MOST_FILES_PER_BIO` (those are not counted).
    missed: u32,
    _pad: u32,
    /// The live records of the chunk being walked (meta and units; 0: none), kept here
    /// rather than on the stack: the verifier would follow every mix of found and not found.
    records: [[u64; 2]; RECORDS_PER_CHUNK],
}

/// Walks the bio `[sector, end)` through the sector map, then counts it for each file it
/// met: once per file, with that file's sectors of it. `how`: the device, `How`'s bits.
/// Returns how many files it met (0: the bio is none of theirs). A run nested deeper than
/// `WALK_LEVELS` on its CPU counts nothing.
#[inline(always)]
pub fn charge(how: u64, sector: u64, end: u64, duration_ns: u64) -> u32 {
    let Some(depth) = DEPTH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's word; volatile, so that the raised level is stored before the walk.
    let level = unsafe { core::ptr::read_volatile(depth) };
    if level >= WALK_LEVELS {
        return 0;
    }
    unsafe { core::ptr::write_volatile(depth, level + 1) };
    let found = charge_at(level, how, sector, end, duration_ns);
    unsafe { core::ptr::write_volatile(depth, level) };
    found
}

/// [`charge`] with the walk of nesting level `level`.
#[inline(always)]
fn charge_at(level: u32, how: u64, sector: u64, end: u64, duration_ns: u64) -> u32 {
    let Some(walk) = this_walk(level) else {
        return 0;
    };
    walk.at = sector;
    walk.end = end;
    walk.owners_of = 0;
    walk.dev = how as u32;
    walk.found = 0;
    walk.missed = 0;
    // Most bios lie in one chunk: that one is walked without bpf_loop's calls.
    if walk_step(walk) {
        let mut context = u64::from(level);
        // SAFETY: the callback is a static function of the signature bpf_loop wants; it finds
        // the walk in `WALK` at the level the context, on this stack, holds.
        unsafe {
            bpf_loop(
                MAX_WALK_ROUNDS,
                walk_round as *mut c_void,
                &mut context as *mut u64 as *mut c_void,
                0,
            )
        };
    }
    let Some(walk) = this_walk(level) else {
        return 0;
    };
    let cut_short = walk.at < walk.end || walk.missed > 0;
    for index in 0..MOST_FILES_PER_BIO {
        if index as u32 >= walk.found {
            break;
        }
        let flags = how & (How::WRITE | How::END)
            | if cut_short && index == 0 {
                How::CUT_SHORT
            } else {
                0
            };
        count_bio(walk.files[index], walk.sectors[index], flags, duration_ns);
    }
    walk.found
}

#[inline(always)]
fn this_walk(level: u32) -> Option<&'static mut Walk> {
    // SAFETY: this CPU's entry of this nesting level, used by one program run at a time (see
    // `WALK`).
    WALK.get_ptr_mut(level).map(|w| unsafe { &mut *w })
}

extern "C" fn walk_round(_round: u64, context: *mut c_void) -> i64 {
    // SAFETY: `charge_at`'s context: the level, a u64 on its stack.
    let level = unsafe { *(context as *const u64) } as u32;
    match this_walk(level) {
        Some(w) => i64::from(!walk_step(w)),
        None => 1,
    }
}

/// One step of a walk: the whole-block owners of the block it is in (once per block), the
/// spans of the chunk it is in (when the block says the chunk has an entry); then on to the
/// next chunk, or past the block when none of its further chunks has one. False at the end.
#[inline(always)]
fn walk_step(w: &mut Walk) -> bool {
    if w.at >= w.end {
        return false;
    }
    let block_end = (w.at | (BLOCK_SECTORS - 1)) + 1;
    let block_stop = if block_end < w.end { block_end } else { w.end };
    let Some(block) = find_block(w.dev, w.at) else {
        w.at = block_stop;
        return w.at < w.end;
    };
    let block_number = (w.at >> BLOCK_LOG) + 1;
    if w.owners_of != block_number {
        w.owners_of = block_number;
        for index in 0..OWNERS_PER_BLOCK {
            let word = load(&block.owners[index]);
            if word != 0 {
                note(w, owner::slot(word), block_stop - w.at);
            }
        }
    }
    let chunk_end = (w.at | (CHUNK_SECTORS - 1)) + 1;
    let chunk_stop = if chunk_end < block_stop {
        chunk_end
    } else {
        block_stop
    };
    let chunks = load(&block.chunks);
    if chunks & chunk_bits(w.at, chunk_stop) != 0 {
        walk_chunk(w, chunk_stop);
    }
    w.at = if chunk_stop < block_stop && chunks & chunk_bits(chunk_stop, block_stop) != 0 {
        chunk_stop
    } else {
        block_stop
    };
    w.at < w.end
}

/// Charges the records of the chunk entry holding `w.at` for their units in `[w.at, stop)`.
/// A record's meta is read again after its units, and the key after all: a record or an
/// entry given to another file or chunk meanwhile holds units that are not this bio's.
#[inline(always)]
fn walk_chunk(w: &mut Walk, stop: u64) {
    let Some(chunk) = find_chunk(w.dev, w.at) else {
        return;
    };
    let key = load(&chunk.key);
    for index in 0..RECORDS_PER_CHUNK {
        let record = &chunk.records[index];
        let before = load(&record.meta);
        let units = load(&record.units);
        let live = meta::live(before) && load(&record.meta) == before;
        w.records[index] = if live { [before, units] } else { [0, 0] };
    }
    if load(&chunk.key) != key {
        return;
    }
    let base = w.at & !(CHUNK_SECTORS - 1);
    let (from, to) = (w.at - base, stop - base);
    for index in 0..RECORDS_PER_CHUNK {
        // SAFETY: plain reads of the walk's own fields; volatile, so that the verifier sees
        // values read from the map, not the ones just stored.
        let [word, units] = unsafe { core::ptr::read_volatile(&w.records[index]) };
        if word == 0 {
            continue;
        }
        let sectors = sectors_in_units(units, from, to);
        if sectors > 0 {
            note(w, meta::slot(word), sectors);
        }
    }
}

/// Notes that the file in `slot` owns `sectors` more of the walk's bio.
#[inline(always)]
fn note(w: &mut Walk, slot: u32, sectors: u64) {
    for index in 0..MOST_FILES_PER_BIO {
        if (index as u32) < w.found && w.files[index] == slot {
            w.sectors[index] += sectors;
            return;
        }
    }
    if (w.found as usize) >= MOST_FILES_PER_BIO {
        w.missed = 1;
        return;
    }
    // Read again and masked (MOST_FILES_PER_BIO is a power of two): the verifier must see the
    // index's bound on the register that indexes, and the compiler would drop a mask that
    // the check above makes redundant.
    // SAFETY: a plain read of a field of the walk.
    let index = unsafe { core::ptr::read_volatile(&w.found) } as usize & (MOST_FILES_PER_BIO - 1);
    w.files[index] = slot;
    w.sectors[index] = sectors;
    w.found += 1;
}

/// Counts a bio for the file in `slot`, which owns `sectors` of it: its start raises the
/// file's IO in flight, its end lowers it and counts the bio, its sectors and its duration.
/// `flags`: `How`'s bits (with CUT_SHORT: the walk did not reach the bio's end, or met more
/// files than it counts).
#[inline(always)]
fn count_bio(slot: u32, sectors: u64, flags: u64, duration_ns: u64) {
    let Some(c) = COUNTERS.get_ptr_mut(slot) else {
        return;
    };
    // Atomic adds: a run nested on this CPU (see `WALK`) may count into the same slot.
    // SAFETY: fields of this CPU's value of the slot.
    unsafe {
        if flags & How::END == 0 {
            add(addr_of_mut!((*c).in_flight), 1);
            return;
        }
        add(addr_of_mut!((*c).in_flight), u64::MAX);
        if flags & How::WRITE != 0 {
            add(addr_of_mut!((*c).writes), 1);
            add(addr_of_mut!((*c).write_sectors), sectors);
            add(addr_of_mut!((*c).write_ns), duration_ns);
        } else {
            add(addr_of_mut!((*c).reads), 1);
            add(addr_of_mut!((*c).read_sectors), sectors);
            add(addr_of_mut!((*c).read_ns), duration_ns);
        }
        if flags & How::CUT_SHORT != 0 {
            add(addr_of_mut!((*c).unwalked), 1);
        }
    }
    let bucket = match BOUNDS.get(slot) {
        Some(bounds) => bounds.bucket(duration_ns),
        None => 0,
    };
    if bucket < HISTOGRAM_BUCKETS {
        // SAFETY: as above, the index checked.
        unsafe { add(addr_of_mut!((*c).histogram[bucket]), 1) };
    }
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
