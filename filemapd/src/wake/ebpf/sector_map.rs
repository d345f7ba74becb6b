//! User space's side of the sector map (see `filemapd_common::sector_map`): the tables mapped
//! into this process, read with plain copies and changed with the atomic steps the kernel's
//! claims use, one word at a time (writing a whole value back, as a map update does, could
//! undo a claim made meanwhile). The kernel records a watched file's fresh allocations the
//! moment they are made; here the file's other sectors are added (what it held before it was
//! watched, reflinked copies) and what it gave back is taken out, after each pass, from what
//! FIEMAP shows. Changes made here are serialised among themselves.
use std::{
    num::NonZeroUsize,
    os::fd::AsFd as _,
    ptr::NonNull,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::SeqCst},
    },
};

use anyhow::{Context as _, bail};
use aya::maps::{Map, MapData};
use filemapd_common::sector_map::{
    BLOCK_LOG, BLOCK_SECTORS, Block, CHUNK_LOG, CHUNK_SECTORS, Chunk, OWNERS_PER_BLOCK, PROBES,
    RECORDS_PER_CHUNK, TableLogs, UNIT_LOG, UNIT_SECTORS, entry, fits, meta, owner, packed, stamp,
    units_touched,
};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::sectors::{SectorRange, difference, union};

pub struct SectorMap {
    chunks: Table<Chunk>,
    blocks: Table<Block>,
    making: Table<u64>,
    logs: TableLogs,
    /// Held by each change, so that a word is read, planned and changed with no other change
    /// of this process between.
    changing: Mutex<()>,
}

/// What a [`SectorMap::set`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Words written (records' units and meta, whole-block owners).
    pub words: usize,
    /// Chunks or blocks with wanted sectors and no room (a chunk's records or a table's
    /// window full): their IO is not counted until room is made.
    pub no_room: usize,
    /// Judged sectors the file no longer has that stay, held by a recording too recent to
    /// judge: a later pass judges them again.
    pub deferred: Vec<SectorRange>,
}

impl std::ops::AddAssign for Changes {
    fn add_assign(&mut self, other: Changes) {
        self.words += other.words;
        self.no_room += other.no_room;
        self.deferred.extend(other.deferred);
    }
}

/// What one file holds in the map, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    pub dev: u32,
    pub range: SectorRange,
    /// Owned as a whole block (else a span of a chunk).
    pub whole_block: bool,
}

/// The extents a `watch`'s sector map is sized for unless its `kernel_map_extents` says: its
/// tables are 262,144 chunks (18.9 MB, and 2.1 MB of their makers' words) and 131,072 blocks
/// (6.3 MB): 27.3 MB.
pub const DEFAULT_MAP_EXTENTS: u32 = 50_000;
/// The most `kernel_map_extents` may ask for: 2^24 chunks and 2^23 blocks (about 1.7 GB of
/// the kernel's memory, with the chunk makers' words).
pub const MOST_MAP_EXTENTS: u32 = 3_000_000;

/// Tables for `extents` extents scattered over their devices, the worst case: one chunk
/// entry and one block entry each. Five chunk entries per extent keep the table at most a
/// fifth full, where an entry finds a free place among its `PROBES` with next to certainty
/// (the bench's native section: 100,000 extents in the tables of 50,000, 42 % full, found no
/// room for 28 runs); blocks are fewer than chunks (a block holds 64), half as many entries.
pub const fn tables_for_extents(extents: u32) -> TableLogs {
    let wanted = extents as u64 * 5;
    let chunks = wanted.next_power_of_two().trailing_zeros();
    // At least a window of probes in each table (8 blocks).
    let chunks = if chunks < 4 { 4 } else { chunks };
    TableLogs {
        chunks,
        blocks: chunks - 1,
    }
}

/// The kernel memory `tables` take, in kB, MB or GB with one decimal.
pub fn tables_size(tables: TableLogs) -> String {
    match tables.bytes() as f64 {
        b if b < 1e5 => format!("{:.1} kB", b / 1e3),
        b if b < 1e9 => format!("{:.1} MB", b / 1e6),
        b => format!("{:.1} GB", b / 1e9),
    }
}

/// `extents`, if a `watch` may size its sector map for that many (1 to [`MOST_MAP_EXTENTS`]).
pub fn check_map_extents(extents: u32) -> anyhow::Result<u32> {
    match extents {
        0 => bail!("0: the map needs room for one extent at least"),
        n if n > MOST_MAP_EXTENTS => bail!(
            "{n}: at most {MOST_MAP_EXTENTS} (2^24 chunk entries, about 1.7 GB of the kernel's memory)"
        ),
        n => Ok(n),
    }
}

impl SectorMap {
    pub fn new(chunks: Map, blocks: Map, making: Map, logs: TableLogs) -> anyhow::Result<Self> {
        Ok(Self {
            chunks: Table::map(chunks, logs.chunks, "the chunk table")?,
            blocks: Table::map(blocks, logs.blocks, "the block table")?,
            making: Table::map(making, logs.chunks, "the chunk makers' words")?,
            logs,
            changing: Mutex::new(()),
        })
    }

    pub fn logs(&self) -> TableLogs {
        self.logs
    }

    /// Adds `slot`'s `ranges` on `dev` (the file's sectors as FIEMAP showed them: sorted,
    /// disjoint) over every 16 MiB block that `over` touches, and takes out what it holds in
    /// `over` outside them, except what was recorded at or after `since` (a [`stamp`]; `None`:
    /// nothing is kept). Only `over` is judged: a pass that read a stretch of the file knows
    /// nothing of an allocation elsewhere whose event it has not taken yet, however old its
    /// recording. New words carry `stamp`.
    pub fn set(
        &self,
        dev: u32,
        slot: u32,
        over: &[SectorRange],
        ranges: &[SectorRange],
        since: Option<u64>,
        stamp: u64,
    ) -> Changes {
        let _changing = self.changing.lock().expect("sector map lock");
        let mut changes = Changes::default();
        let over = union(over.to_vec());
        for block in blocks_touched(&over) {
            if !fits(dev, block + BLOCK_SECTORS - 1) {
                changes.no_room += 1;
                continue;
            }
            changes += self.set_block(dev, slot, block, ranges, &over, since, stamp);
        }
        changes
    }

    /// Takes every sector of `slot` out of the map (its file is no longer watched): reads the
    /// whole tables, which a file's end may cost.
    pub fn clear(&self, slot: u32) -> Changes {
        let _changing = self.changing.lock().expect("sector map lock");
        let mut changes = Changes::default();
        for (_, dev, block) in self.blocks_in_use() {
            // Nothing wanted, nothing kept fresh, all judged: the file is gone from the map.
            let whole = [SectorRange::new(block, BLOCK_SECTORS)];
            changes += self.set_block(dev, slot, block, &[], &whole, None, 0);
        }
        changes
    }

    /// The block entries in use: (entry, device, the block's first sector).
    fn blocks_in_use(&self) -> impl Iterator<Item = (u32, u32, u64)> + '_ {
        (0..self.blocks.len()).filter_map(|index| {
            let key = self.blocks.word(index, 0).load(SeqCst);
            (key != 0).then(|| {
                let dev = filemapd_common::sector_map::device_of(key);
                (
                    index,
                    dev,
                    filemapd_common::sector_map::index_of(key) << BLOCK_LOG,
                )
            })
        })
    }

    /// Every holding of `slot`, read from the whole tables (tests, `filemapd report`'s check).
    pub fn held(&self, slot: u32) -> Vec<Held> {
        let mut held = Vec::new();
        for (index, dev, block) in self.blocks_in_use() {
            let value = self.blocks.read(index);
            if value
                .owners
                .iter()
                .any(|&w| w != 0 && owner::slot(w) == slot)
            {
                held.push(Held {
                    dev,
                    range: SectorRange::new(block, BLOCK_SECTORS),
                    whole_block: true,
                });
            }
            for c in 0..64 {
                if value.chunks & (1 << c) == 0 {
                    continue;
                }
                let base = block + c * CHUNK_SECTORS;
                if let Some((_, chunk)) = self.find_chunk(dev, base) {
                    for record in chunk.records {
                        if meta::live(record.meta) && meta::slot(record.meta) == slot {
                            held.extend(unit_runs(record.units).into_iter().map(|r| Held {
                                dev,
                                range: SectorRange::new(base + r.start, r.len),
                                whole_block: false,
                            }));
                        }
                    }
                }
            }
        }
        held.sort_unstable();
        held
    }

    /// Entries in use: (chunks, blocks), for the memory the map takes now.
    pub fn entries_in_use(&self) -> (usize, usize) {
        let used = |t: &dyn Fn(u32) -> u64, len: u32| (0..len).filter(|&i| t(i) != 0).count();
        (
            used(&|i| self.chunks.word(i, 0).load(SeqCst), self.chunks.len()),
            used(&|i| self.blocks.word(i, 0).load(SeqCst), self.blocks.len()),
        )
    }

    /// One 16 MiB block (its first sector `block`): see [`SectorMap::set`].
    #[allow(clippy::too_many_arguments)]
    fn set_block(
        &self,
        dev: u32,
        slot: u32,
        block: u64,
        ranges: &[SectorRange],
        over: &[SectorRange],
        since: Option<u64>,
        stamp: u64,
    ) -> Changes {
        let mut changes = Changes::default();
        let block_range = SectorRange::new(block, BLOCK_SECTORS);
        let wanted = clip(ranges, block_range);
        let whole = wanted.len() == 1 && wanted[0] == block_range;
        let Some(entry) = self.block_entry(dev, block, !wanted.is_empty()) else {
            changes.no_room += usize::from(!wanted.is_empty());
            return changes;
        };
        let owner_word = |entry: u32| {
            (0..OWNERS_PER_BLOCK)
                .map(|i| (i, self.blocks.word(entry, owner_index(i)).load(SeqCst)))
                .find(|&(_, w)| w != 0 && owner::slot(w) == slot)
        };
        let mut owned = owner_word(entry);
        if whole && owned.is_none() {
            let word = owner::word(slot, stamp);
            owned = (0..OWNERS_PER_BLOCK).find_map(|i| {
                self.blocks
                    .word(entry, owner_index(i))
                    .compare_exchange(0, word, SeqCst, SeqCst)
                    .ok()
                    .map(|_| (i, word))
            });
            changes.words += usize::from(owned.is_some());
        }
        let fresh_owner = owned.is_some_and(|(_, w)| {
            since.is_some_and(|since| stamp::at_or_after(owner::stamp(w), since))
        });
        // Owned whole (now, or by a recording newer than the reading): the owner word counts
        // every sector, and any span of the file here would count them twice: all go.
        let owner_holds_all = owned.is_some() && (whole || fresh_owner);
        let over_here = clip(over, block_range);
        if fresh_owner && !whole {
            // What the owner word holds past the file's sectors waits for a later pass.
            changes.deferred.extend(difference(&over_here, &wanted));
        }
        let (spans_wanted, spans_since, judged) = match owner_holds_all {
            true => (Vec::new(), None, vec![block_range]),
            false => (wanted, since, over_here),
        };
        let chunks = self.blocks.word(entry, CHUNKS_WORD).load(SeqCst);
        for c in 0..64u64 {
            let chunk = SectorRange::new(block + c * CHUNK_SECTORS, CHUNK_SECTORS);
            let in_chunk = clip(&spans_wanted, chunk);
            let judged_in_chunk = clip(&judged, chunk);
            if in_chunk.is_empty() && (judged_in_chunk.is_empty() || chunks & (1 << c) == 0) {
                continue;
            }
            changes += self.set_chunk(
                dev,
                slot,
                entry,
                chunk.start,
                &in_chunk,
                &judged_in_chunk,
                spans_since,
                stamp,
            );
        }
        if let Some((index, word)) = owned
            && !whole
            && !fresh_owner
        {
            // The spans hold the wanted part now: the owner word goes.
            let _ = self
                .blocks
                .word(entry, owner_index(index))
                .compare_exchange(word, 0, SeqCst, SeqCst);
            changes.words += 1;
        }
        changes
    }

    /// One chunk (its first sector `base`, in the block entry `block_entry`): `slot`'s units
    /// there gain those of `wanted` and lose those of `judged` outside it, except units of a
    /// record stamped at or after `since`.
    #[allow(clippy::too_many_arguments)]
    fn set_chunk(
        &self,
        dev: u32,
        slot: u32,
        block_entry: u32,
        base: u64,
        wanted: &[SectorRange],
        judged: &[SectorRange],
        since: Option<u64>,
        stamp: u64,
    ) -> Changes {
        let mut changes = Changes::default();
        let units_of = |ranges: &[SectorRange]| {
            ranges.iter().fold(0u64, |units, r| {
                units | units_touched(r.start - base, r.end() - base)
            })
        };
        let want = units_of(wanted);
        // Units outside the judged sectors stay as they are.
        let keep = want | !units_of(judged);
        let found = match want {
            0 => self.find_chunk(dev, base).map(|(e, _)| e),
            _ => self.ensure_chunk(dev, base),
        };
        let Some(entry) = found else {
            changes.no_room += usize::from(want != 0);
            return changes;
        };
        let fresh = |m: u64| since.is_some_and(|since| stamp::at_or_after(meta::stamp(m), since));
        let mine = |m: u64| meta::live(m) && meta::slot(m) == slot;
        // What the file's records hold now; what is missing joins the first of them, or a
        // free record.
        let mut held = 0u64;
        let mut first = None;
        for i in 0..RECORDS_PER_CHUNK {
            let (units, m) = self.record(entry, i);
            if mine(m.load(SeqCst)) {
                held |= units.load(SeqCst);
                first.get_or_insert(i);
            }
        }
        let missing = want & !held;
        if missing != 0 {
            match first {
                Some(i) => {
                    self.record(entry, i).0.fetch_or(missing, SeqCst);
                    changes.words += 1;
                }
                None if self.claim_record(entry, slot, stamp, missing) => changes.words += 2,
                None => changes.no_room += 1,
            }
        }
        // What is no longer the file's leaves each of its records that is not fresh. The
        // units are read before the meta and changed by compare-and-swap: the kernel stamps a
        // record's meta before it adds units, so a record whose units moved since the read
        // reads as fresh the next time round.
        for i in 0..RECORDS_PER_CHUNK {
            let (units, m) = self.record(entry, i);
            loop {
                let now = units.load(SeqCst);
                let word = m.load(SeqCst);
                if !mine(word) {
                    break;
                }
                if fresh(word) {
                    changes.deferred.extend(
                        unit_runs(now & !keep)
                            .into_iter()
                            .map(|r| SectorRange::new(base + r.start, r.len)),
                    );
                    break;
                }
                let kept = now & keep;
                if kept == now {
                    // An empty record is freed, unless the kernel stamped it meanwhile.
                    if now == 0 && m.compare_exchange(word, 0, SeqCst, SeqCst).is_ok() {
                        changes.words += 1;
                    }
                    break;
                }
                if units.compare_exchange(now, kept, SeqCst, SeqCst).is_ok() {
                    changes.words += 1;
                }
            }
        }
        let bit = 1u64 << ((base >> CHUNK_LOG) & 63);
        let bits = self.blocks.word(block_entry, CHUNKS_WORD);
        if want == 0 {
            self.drop_if_empty(dev, base, entry, block_entry);
        } else if bits.load(SeqCst) & bit == 0 {
            bits.fetch_or(bit, SeqCst);
        }
        changes
    }

    /// Record `i` of chunk entry `entry`: its units and its meta word.
    fn record(&self, entry: u32, i: usize) -> (&AtomicU64, &AtomicU64) {
        (
            self.chunks.word(entry, 2 + 2 * i),
            self.chunks.word(entry, 1 + 2 * i),
        )
    }

    /// Claims a free record of `entry` for `slot` with `units`, as the kernel claims one.
    fn claim_record(&self, entry: u32, slot: u32, stamp: u64, units: u64) -> bool {
        let word = meta::word(slot, stamp);
        (0..RECORDS_PER_CHUNK).any(|i| {
            let (u, m) = self.record(entry, i);
            if m.compare_exchange(0, word | meta::FILLING, SeqCst, SeqCst)
                .is_err()
            {
                return false;
            }
            // Stored, not added: a record's units may be left from its last owner.
            u.swap(units, SeqCst);
            m.swap(word, SeqCst);
            true
        })
    }

    /// Frees a chunk entry whose records are all free: each is made DEAD first, so that no
    /// kernel claim slips in between the look and the freeing; a record in use undoes it.
    /// The records become free again only after the key is gone, so that a claim through a
    /// stale look at the key sees it on its second look. Then the chunk's bit in its block is
    /// cleared, and set again if the kernel made a new entry for the chunk meanwhile.
    fn drop_if_empty(&self, dev: u32, base: u64, entry: u32, block_entry: u32) {
        let key = packed(dev, base >> CHUNK_LOG);
        let key_word = self.chunks.word(entry, 0);
        if key_word.load(SeqCst) != key {
            return;
        }
        let metas: Vec<&AtomicU64> = (0..RECORDS_PER_CHUNK)
            .map(|i| self.record(entry, i).1)
            .collect();
        let dead = metas
            .iter()
            .take_while(|m| m.compare_exchange(0, meta::DEAD, SeqCst, SeqCst).is_ok())
            .count();
        let freed = dead == RECORDS_PER_CHUNK;
        if freed {
            key_word.swap(0, SeqCst);
        }
        for m in &metas[..dead] {
            m.swap(0, SeqCst);
        }
        if !freed {
            return;
        }
        let bit = 1u64 << ((base >> CHUNK_LOG) & 63);
        let bits = self.blocks.word(block_entry, CHUNKS_WORD);
        bits.fetch_and(!bit, SeqCst);
        if self.find_chunk(dev, base).is_some() {
            bits.fetch_or(bit, SeqCst);
        }
    }

    /// The block entry of `block` on `dev`; made when `make` and it has none.
    fn block_entry(&self, dev: u32, block: u64, make: bool) -> Option<u32> {
        let key = packed(dev, block >> BLOCK_LOG);
        for probe in 0..PROBES {
            let index = entry(key, probe, self.logs.blocks);
            let word = self.blocks.word(index, 0);
            match word.load(SeqCst) {
                held if held == key => return Some(index),
                0 if !make => return None,
                0 => match word.compare_exchange(0, key, SeqCst, SeqCst) {
                    Ok(_) => return Some(index),
                    Err(held) if held == key => return Some(index),
                    Err(_) => {}
                },
                _ => {}
            }
        }
        None
    }

    /// The entry of the chunk holding `sector`, and a copy of it.
    fn find_chunk(&self, dev: u32, sector: u64) -> Option<(u32, Chunk)> {
        let key = packed(dev, sector >> CHUNK_LOG);
        (0..PROBES)
            .map(|probe| entry(key, probe, self.logs.chunks))
            .find(|&index| self.chunks.word(index, 0).load(SeqCst) == key)
            .map(|index| (index, self.chunks.read(index)))
    }

    /// The entry of the chunk holding `sector`, made (under its home's making word, as the
    /// kernel makes one) when it has none.
    fn ensure_chunk(&self, dev: u32, sector: u64) -> Option<u32> {
        if let Some((index, _)) = self.find_chunk(dev, sector) {
            return Some(index);
        }
        let key = packed(dev, sector >> CHUNK_LOG);
        let making = self.making.word(entry(key, 0, self.logs.chunks), 0);
        // The kernel holds it only for an instant.
        while making.compare_exchange(0, 1, SeqCst, SeqCst).is_err() {
            std::hint::spin_loop();
        }
        let made = self.find_chunk(dev, sector).map(|(i, _)| i).or_else(|| {
            (0..PROBES)
                .map(|probe| entry(key, probe, self.logs.chunks))
                .find(|&index| {
                    self.chunks
                        .word(index, 0)
                        .compare_exchange(0, key, SeqCst, SeqCst)
                        .is_ok()
                })
        });
        making.swap(0, SeqCst);
        made
    }
}

/// Words of a [`Block`]: its key, its chunk bits, then its owners.
const CHUNKS_WORD: usize = 1;
fn owner_index(i: usize) -> usize {
    2 + i
}

/// The first sectors of the 16 MiB blocks that `ranges` touch, each once, in order.
fn blocks_touched(ranges: &[SectorRange]) -> Vec<u64> {
    let mut blocks: Vec<u64> = ranges
        .iter()
        .filter(|r| r.len > 0)
        .flat_map(|r| (r.start >> BLOCK_LOG)..=((r.end() - 1) >> BLOCK_LOG))
        .map(|b| b << BLOCK_LOG)
        .collect();
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

/// The runs of sectors a record's units stand for, counted from the chunk's start.
fn unit_runs(units: u64) -> Vec<SectorRange> {
    let mut runs: Vec<SectorRange> = Vec::new();
    for unit in (0..64).filter(|u| units & (1 << u) != 0) {
        let start = unit << UNIT_LOG;
        match runs.last_mut() {
            Some(last) if last.end() == start => last.len += UNIT_SECTORS,
            _ => runs.push(SectorRange::new(start, UNIT_SECTORS)),
        }
    }
    runs
}

/// The parts of `ranges` (sorted, disjoint) inside `within`, joined where they touch.
fn clip(ranges: &[SectorRange], within: SectorRange) -> Vec<SectorRange> {
    let first = ranges.partition_point(|r| r.end() <= within.start);
    let mut parts: Vec<SectorRange> = Vec::new();
    for r in &ranges[first..] {
        if r.start >= within.end() {
            break;
        }
        let start = r.start.max(within.start);
        let end = r.end().min(within.end());
        match parts.last_mut() {
            Some(last) if last.end() == start => last.len += end - start,
            _ => parts.push(SectorRange::new(start, end - start)),
        }
    }
    parts
}

/// A table mapped into this process (the map is `BPF_F_MMAPABLE`): reading an entry is a
/// copy from memory rather than a system call, changing a word an atomic operation.
struct Table<T> {
    base: NonNull<T>,
    len: u32,
    bytes: NonZeroUsize,
    /// Keeps the map's descriptor open as long as the mapping is used.
    _map: MapData,
}

// SAFETY: the mapping is read with volatile copies and changed with atomic operations only,
// and lives as long as the table.
unsafe impl<T> Send for Table<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Table<T> {}

impl<T: Copy> Table<T> {
    fn map(map: Map, log: u32, what: &str) -> anyhow::Result<Self> {
        let Map::Array(data) = map else {
            bail!("{what} is not an array map");
        };
        let len = 1u32 << log;
        let page = 4096;
        let bytes = (len as usize * size_of::<T>()).div_ceil(page) * page;
        let bytes = NonZeroUsize::new(bytes).expect("a table of some size");
        // SAFETY: a fresh shared mapping of the map's memory, of its size; nothing else in
        // this process refers to that address range.
        let base = unsafe {
            mmap(
                None,
                bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                data.fd().as_fd(),
                0,
            )
        }
        .with_context(|| format!("mapping {what} (a kernel without BPF_F_MMAPABLE arrays?)"))?;
        Ok(Self {
            base: base.cast(),
            len,
            bytes,
            _map: data,
        })
    }

    fn len(&self) -> u32 {
        self.len
    }

    /// The `word`-th u64 of entry `index`, as an atomic.
    fn word(&self, index: u32, word: usize) -> &AtomicU64 {
        assert!(index < self.len && (word + 1) * 8 <= size_of::<T>());
        // SAFETY: inside the mapping (checked above) and 8-byte aligned (entries are made of
        // u64s); every writer, here and in the kernel, changes it atomically.
        unsafe {
            let entry = self.base.as_ptr().add(index as usize).cast::<u64>();
            AtomicU64::from_ptr(entry.add(word))
        }
    }

    /// A copy of entry `index` (the kernel may change it meanwhile: a change made from a copy
    /// is a compare-and-swap against the word as read).
    fn read(&self, index: u32) -> T {
        assert!(index < self.len);
        // SAFETY: inside the mapping; the value is plain integers, any bit pattern valid.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().add(index as usize)) }
    }
}

impl<T> Drop for Table<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length, no longer read.
        let _ = unsafe { munmap(self.base.cast(), self.bytes.get()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_grow_with_the_extents_asked_for() {
        assert_eq!(
            crate::wake::ebpf::MANY_FILES_TABLES,
            TableLogs {
                chunks: 18,
                blocks: 17
            },
            "watch's default, the tables the bench measures"
        );
        assert_eq!(
            tables_for_extents(MOST_MAP_EXTENTS),
            TableLogs {
                chunks: 24,
                blocks: 23
            }
        );
        assert_eq!(
            tables_for_extents(1),
            TableLogs {
                chunks: 4,
                blocks: 3
            }
        );
        for extents in [2, 10, 1000, 50_000, 100_000, MOST_MAP_EXTENTS] {
            let chunks = 1u64 << tables_for_extents(extents).chunks;
            let wanted = 5 * u64::from(extents);
            assert!(
                wanted <= chunks && chunks < 2 * wanted,
                "{extents}: {chunks}"
            );
        }
    }

    #[test]
    fn the_tables_size_counts_every_table_and_the_makers_words() {
        // Per chunk entry: the chunk (72 bytes) and its maker's word (8); per block: 48.
        assert_eq!(tables_for_extents(1).bytes(), 16 * (72 + 8) + 8 * 48);
        assert_eq!(tables_size(tables_for_extents(1)), "1.7 kB");
        assert_eq!(
            tables_size(tables_for_extents(DEFAULT_MAP_EXTENTS)),
            "27.3 MB"
        );
        assert_eq!(tables_size(tables_for_extents(MOST_MAP_EXTENTS)), "1.7 GB");
    }

    #[test]
    fn a_map_for_no_extent_or_past_the_most_is_refused() {
        assert_eq!(check_map_extents(1).unwrap(), 1);
        assert_eq!(
            check_map_extents(MOST_MAP_EXTENTS).unwrap(),
            MOST_MAP_EXTENTS
        );
        for bad in [0, MOST_MAP_EXTENTS + 1] {
            let err = check_map_extents(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{bad}: ")), "{err}");
        }
    }

    #[test]
    fn blocks_touched_are_listed_once_in_order() {
        let r = SectorRange::new;
        assert_eq!(
            blocks_touched(&[
                r(BLOCK_SECTORS + 5, 10),
                r(0, 1),
                r(BLOCK_SECTORS, 1),
                r(7, 0)
            ]),
            vec![0, BLOCK_SECTORS]
        );
        assert_eq!(
            blocks_touched(&[r(BLOCK_SECTORS - 1, 2)]),
            vec![0, BLOCK_SECTORS]
        );
    }

    #[test]
    fn units_become_runs_of_sectors() {
        let r = SectorRange::new;
        assert_eq!(unit_runs(0), vec![]);
        assert_eq!(unit_runs(0b1101), vec![r(0, 8), r(16, 16)]);
        assert_eq!(unit_runs(u64::MAX), vec![r(0, CHUNK_SECTORS)]);
    }

    #[test]
    fn clip_keeps_the_parts_inside() {
        let r = SectorRange::new;
        let ranges = [r(0, 10), r(10, 10), r(30, 10), r(100, 50)];
        assert_eq!(clip(&ranges, r(5, 30)), vec![r(5, 15), r(30, 5)]);
        assert_eq!(clip(&ranges, r(40, 60)), vec![]);
        assert_eq!(clip(&ranges, r(120, 100)), vec![r(120, 30)]);
    }
}
