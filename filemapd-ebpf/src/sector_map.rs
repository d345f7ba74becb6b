//! The sector map (see `filemapd_common::sector_map`): the tables, the lookups the IO probe
//! makes, and the recording of a watched file's fresh allocation, made the moment its
//! tracepoint fires, before any write to the new blocks. User space adds the rest of a file's
//! sectors (what it had before it was watched) and takes out what the file gave back.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::bpf_loop,
    macros::map,
    maps::{Array, PerCpuArray},
};
use core::ffi::c_void;
use filemapd_common::{
    Placement,
    sector_map::{
        BLOCK_LOG, BLOCK_SECTORS, Block, CHUNK_LOG, CHUNK_SECTORS, Chunk, OWNERS_PER_BLOCK, PROBES,
        RECORDS_PER_CHUNK, TableLogs, entry, fits, meta, owner, packed, units_touched,
    },
};

use crate::{
    atomics::{cas, load, publish, set_bits},
    counting::count_unrecorded,
};

/// 256 KiB chunks with their spans. Sized by user space at load time (`TABLE_LOGS`).
#[map]
static CHUNKS: Array<Chunk> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// 16 MiB blocks: their whole-block owners and which chunks have entries.
#[map]
static BLOCKS: Array<Block> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Per chunk entry, for the chunks whose home it is: 1 while a claim makes an entry for such
/// a chunk. Two claims making the same chunk at once could otherwise take two entries (when
/// one frees between their looks), and lookups read only the first entry of a chunk.
#[map]
static MAKING: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// log2 of the tables' entries, set by user space at load time.
#[unsafe(no_mangle)]
static TABLE_LOGS: TableLogs = TableLogs {
    chunks: 0,
    blocks: 0,
};

/// Most rounds one allocation's recording takes: a whole block or a chunk each (64 GiB).
const MAX_RECORD_ROUNDS: u32 = 4096;

#[inline(always)]
fn logs() -> TableLogs {
    // SAFETY: plain data in .rodata that user space sets at load time.
    unsafe { core::ptr::read_volatile(&TABLE_LOGS) }
}

/// The block entry of `sector`'s block on `dev`, if any. Block entries are never freed, so
/// the first free entry of the window ends the search.
#[inline(always)]
pub fn find_block(dev: u32, sector: u64) -> Option<&'static mut Block> {
    let key = packed(dev, sector >> BLOCK_LOG);
    let log = logs().blocks;
    for probe in 0..PROBES {
        let block = block_entry(entry(key, probe, log))?;
        match load(&block.key) {
            k if k == key => return Some(block),
            0 => return None,
            _ => {}
        }
    }
    None
}

/// The block entry of `sector`'s block on `dev`, made when it has none; `None` when its
/// window is full. Two makers scan the window in the same order and no entry is ever freed:
/// they meet at the same free entry, and the one whose compare-and-swap fails finds the
/// other's key there.
#[inline(always)]
fn ensure_block(dev: u32, sector: u64) -> Option<&'static mut Block> {
    let key = packed(dev, sector >> BLOCK_LOG);
    let log = logs().blocks;
    for probe in 0..PROBES {
        let block = block_entry(entry(key, probe, log))?;
        let held = load(&block.key);
        if held == key || (held == 0 && (cas(&mut block.key, 0, key) || load(&block.key) == key)) {
            return Some(block);
        }
    }
    None
}

#[inline(always)]
fn block_entry(index: u32) -> Option<&'static mut Block> {
    // SAFETY: a live array value; its words are only changed atomically.
    BLOCKS.get_ptr_mut(index).map(|b| unsafe { &mut *b })
}

/// The entry of the chunk holding `sector` on `dev`, if it has one: every entry of its
/// window is looked at (an entry before it may have been freed since it was made).
#[inline(always)]
pub fn find_chunk(dev: u32, sector: u64) -> Option<&'static mut Chunk> {
    find_chunk_by_key(packed(dev, sector >> CHUNK_LOG))
}

#[inline(always)]
fn find_chunk_by_key(key: u64) -> Option<&'static mut Chunk> {
    let log = logs().chunks;
    for probe in 0..PROBES {
        if let Some(chunk) = chunk_entry(entry(key, probe, log))
            && load(&chunk.key) == key
        {
            return Some(chunk);
        }
    }
    None
}

#[inline(always)]
fn chunk_entry(index: u32) -> Option<&'static mut Chunk> {
    // SAFETY: a live array value; its words are only changed atomically.
    CHUNKS.get_ptr_mut(index).map(|c| unsafe { &mut *c })
}

/// The chunk's entry, made in the first free entry of its window when it has none, under its
/// home's `MAKING` word (busy: `None`, the allocation goes unrecorded for now).
#[inline(always)]
fn ensure_chunk(key: u64) -> Option<&'static mut Chunk> {
    if let Some(chunk) = find_chunk_by_key(key) {
        return Some(chunk);
    }
    let making = MAKING.get_ptr_mut(entry(key, 0, logs().chunks))?;
    // SAFETY: an array value, only changed atomically.
    let making = unsafe { &mut *making };
    if !cas(making, 0, 1) {
        return None;
    }
    // Made meanwhile by a claim that held the word before?
    let made = find_chunk_by_key(key).or_else(|| make_chunk(key));
    publish(making, 0);
    made
}

#[inline(always)]
fn make_chunk(key: u64) -> Option<&'static mut Chunk> {
    let log = logs().chunks;
    for probe in 0..PROBES {
        if let Some(chunk) = chunk_entry(entry(key, probe, log))
            && load(&chunk.key) == 0
            && cas(&mut chunk.key, 0, key)
        {
            return Some(chunk);
        }
    }
    None
}

/// Records `[start, end)` (sectors inside one chunk) as `slot`'s: its units join the file's
/// record in the chunk, or a free record takes them. Then the chunk's bit in its block is
/// set, so that walks look in the chunk. False when there is no room.
#[inline(never)]
fn record_in_chunk(dev: u32, slot: u32, start: u64, end: u64, stamp: u64) -> bool {
    let Some(block) = ensure_block(dev, start) else {
        return false;
    };
    let key = packed(dev, start >> CHUNK_LOG);
    let Some(chunk) = ensure_chunk(key) else {
        return false;
    };
    let base = start & !(CHUNK_SECTORS - 1);
    let units = units_touched(start - base, end - base);
    let fresh = meta::word(slot, stamp);
    let mut done = false;
    for index in 0..RECORDS_PER_CHUNK {
        let record = &mut chunk.records[index];
        let held = load(&record.meta);
        // The stamp first: a pass that sees the new units sees them as recent. A record
        // freed or changed meanwhile fails the swap, and the units go elsewhere.
        if meta::live(held) && meta::slot(held) == slot && cas(&mut record.meta, held, fresh) {
            set_bits(&mut record.units, units);
            done = true;
            break;
        }
    }
    if !done {
        for index in 0..RECORDS_PER_CHUNK {
            let record = &mut chunk.records[index];
            // A plain look first: a locked compare-and-swap on every record in use would
            // cost more than the claim.
            if load(&record.meta) != 0 || !cas(&mut record.meta, 0, fresh | meta::FILLING) {
                continue;
            }
            // Stored, not added: a record's units may be left from its last owner.
            publish(&mut record.units, units);
            publish(&mut record.meta, fresh);
            // The entry freed (and perhaps given to another chunk) between the look and the
            // claim: give the record back.
            if load(&chunk.key) != key {
                cas(&mut record.meta, fresh, 0);
                return false;
            }
            done = true;
            break;
        }
    }
    if done {
        set_bits(&mut block.chunks, 1 << ((start >> CHUNK_LOG) & 63));
    }
    done
}

/// Records `slot` as an owner of the whole block holding `sector`; false when the block has
/// four other owners already (reflinked copies) or no entry could be made.
#[inline(never)]
fn claim_block(dev: u32, slot: u32, sector: u64, stamp: u64) -> bool {
    let Some(block) = ensure_block(dev, sector) else {
        return false;
    };
    let word = owner::word(slot, stamp);
    for index in 0..OWNERS_PER_BLOCK {
        let held = load(&block.owners[index]);
        if held != 0 && owner::slot(held) == slot {
            cas(&mut block.owners[index], held, word);
            return true;
        }
    }
    for index in 0..OWNERS_PER_BLOCK {
        let owned = &mut block.owners[index];
        if load(owned) == 0 && cas(owned, 0, word) {
            return true;
        }
    }
    false
}

/// Records a fresh allocation of `blocks` file system blocks (of 4 KiB or more: user space
/// counts no file with smaller ones) at `block` for the file placed by `placement`, stamped
/// `now_ns`. An allocation inside one or two chunks (what random
/// writes make) is recorded inline; a longer one a block or a chunk per round of `bpf_loop`
/// (whose body the verifier checks once). What cannot be recorded is counted as unrecorded:
/// the next pass of the file's monitor records what FIEMAP shows.
#[inline(always)]
pub fn record(placement: &Placement, block: u64, blocks: u64, now_ns: u64) {
    let start = placement.sector_of(block);
    let end = start + placement.sectors_in(blocks);
    let (dev, slot) = (placement.dm_dev, placement.slot);
    let stamp = filemapd_common::sector_map::stamp::of(now_ns);
    if end <= start || !fits(dev, end - 1) {
        count_unrecorded(slot);
        return;
    }
    if end - start > CHUNK_SECTORS {
        record_long(dev, slot, start, end, stamp);
        return;
    }
    let boundary = (start | (CHUNK_SECTORS - 1)) + 1;
    let split = if boundary < end { boundary } else { end };
    let mut whole = record_in_chunk(dev, slot, start, split, stamp);
    if split < end {
        whole &= record_in_chunk(dev, slot, split, end, stamp);
    }
    if !whole {
        count_unrecorded(slot);
    }
}

/// What [`record_round`] works through.
#[repr(C)]
struct Recording {
    at: u64,
    end: u64,
    stamp: u64,
    /// A block whose whole-block owners were full: recorded chunk by chunk up to here.
    by_chunk_until: u64,
    dev: u32,
    slot: u32,
    failed: u32,
    _pad: u32,
}

/// A long recording's state, in map memory rather than on the stack: the verifier tracks
/// every stack value a `bpf_loop` callback reads and walks its body again while they differ
/// from round to round; values it reads from a map are unknown, so one walk of the body does.
/// One entry per CPU is enough: the recording programs are tracepoint programs, which run
/// with preemption disabled and which the kernel skips while another one runs on the CPU.
#[map]
static RECORDING: PerCpuArray<Recording> = PerCpuArray::with_max_entries(1, 0);

#[inline(never)]
fn record_long(dev: u32, slot: u32, start: u64, end: u64, stamp: u64) -> u32 {
    let Some(r) = RECORDING.get_ptr_mut(0) else {
        count_unrecorded(slot);
        return 0;
    };
    // SAFETY: this CPU's entry, used by one recording at a time (see `RECORDING`).
    let r = unsafe { &mut *r };
    *r = Recording {
        at: start,
        end,
        stamp,
        by_chunk_until: 0,
        dev,
        slot,
        failed: 0,
        _pad: 0,
    };
    // SAFETY: the callback is a static function of the signature bpf_loop wants; it finds
    // its state in `RECORDING`.
    unsafe {
        bpf_loop(
            MAX_RECORD_ROUNDS,
            record_round as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    // Looked up again: the rounds changed it through references of their own.
    let Some(r) = RECORDING.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: as above.
    let r = unsafe { &*r };
    if r.at < r.end || r.failed != 0 {
        count_unrecorded(slot);
    }
    0
}

/// One round of [`record_long`]: a whole block as an owner, else the chunk at `at`.
extern "C" fn record_round(_round: u64, _context: *mut c_void) -> i64 {
    let Some(r) = RECORDING.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's entry (see `RECORDING`).
    let r = unsafe { &mut *r };
    if r.at >= r.end {
        return 1;
    }
    let block_end = (r.at | (BLOCK_SECTORS - 1)) + 1;
    if r.at & (BLOCK_SECTORS - 1) == 0 && block_end <= r.end && r.at >= r.by_chunk_until {
        if claim_block(r.dev, r.slot, r.at, r.stamp) {
            r.at = block_end;
        } else {
            r.by_chunk_until = block_end;
        }
        return 0;
    }
    let chunk_end = (r.at | (CHUNK_SECTORS - 1)) + 1;
    let stop = if chunk_end < r.end { chunk_end } else { r.end };
    if !record_in_chunk(r.dev, r.slot, r.at, stop, r.stamp) {
        r.failed = 1;
    }
    r.at = stop;
    0
}
