//! xfs's writeback (delayed allocation) allocates blocks inside `xfs_bmapi_convert_delalloc`,
//! and its tracepoints there name extent records, not fresh blocks: the records a conversion
//! changes tell which blocks are new. Probed on entry and return to know which threads
//! convert.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{kprobe, kretprobe, map},
    maps::{Array, HashMap},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use filemapd_common::{Placement, TracepointLayout};

use crate::{
    atomics::{add, load},
    sector_map,
    trigger::{read_field, rodata},
};

/// Threads inside xfs_bmapi_convert_delalloc, with the logical range `(start, end)` of the
/// delayed-allocation records seen so far in that call (their blocks are being allocated).
#[map]
static CONVERTING: HashMap<u64, [u64; 2]> = HashMap::with_max_entries(256, 0);

/// How many entries `CONVERTING` holds: the xfs record programs, which run for every
/// allocation, look there only while some thread converts (an array read costs less than a
/// hash lookup that finds nothing, and O_DIRECT growth converts nothing).
#[map]
static CONVERSIONS: Array<u64> = Array::with_max_entries(1, 0);

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
        add(count, delta);
    }
}

/// An xfs extent record changing inside a delayed allocation's conversion: a delayed record
/// widens the converted logical range; a real one's blocks inside that range are fresh
/// (what it had before lies outside: records do not overlap).
#[inline(always)]
pub fn note(ctx: &TracePointContext, layout: &TracepointLayout, placement: &Placement) {
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
        sector_map::record(placement, block + (lo - start), hi - lo, born_ns);
    }
}
