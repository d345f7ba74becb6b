//! The chunk table of the uncovered set (see `filemapd_common::CHUNK_LOG`): the small
//! allocations, one span each per chunk they touch. User space maps the table and changes
//! spans in place with the atomic operations the kernel's claims use, one field at a time
//! (writing a whole value back, as a map update does, could undo a claim made meanwhile);
//! its changes are serialised among themselves.
use std::{
    num::NonZeroUsize,
    os::fd::AsFd as _,
    ptr::NonNull,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering::SeqCst},
    },
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Map, MapData},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun as _},
};
use filemapd_common::{
    CHUNK_LOG, CHUNK_PROBES, CHUNK_TABLE_LEN, Chunk, ChunkKey, SPANS_PER_CHUNK, Span, names,
    span_state,
};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::sectors::SectorRange;

/// Ranges of more chunks than this are looked up by reading the whole hash instead.
const MOST_LOOKUPS: u64 = 64;

pub struct Spans {
    table: ChunkTable,
    /// Held by each change: a span is looked at, then changed, with no other change between.
    changing: Mutex<()>,
    /// The loaded object, for its charge service (set once the tracer has attached the rest).
    programs: OnceLock<Arc<Mutex<Ebpf>>>,
}

/// One entry of the chunk table: its chunk and where it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkEntry {
    pub key: ChunkKey,
    pub entry: u32,
}

impl ChunkEntry {
    /// The key as the table holds it.
    fn packed(&self) -> u64 {
        ChunkKey::packed(self.key.dev, self.key.chunk)
    }
}

/// A live span as read, with where it lives.
#[derive(Clone, Copy, Debug)]
pub struct FoundSpan {
    pub chunk: ChunkEntry,
    pub index: usize,
    pub span: Span,
    /// Live spans in its entry when read, itself included: an entry whose live spans were all
    /// freed since is empty (unless the kernel claimed one meanwhile, which the freeing sees).
    pub live_in_chunk: usize,
}

/// What [`Spans::remove_part`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    Nothing,
    Trimmed,
    Freed,
    /// The span needed a split and its chunk had no free span: this part of it (what follows
    /// the part to remove) is still in it, and so is the part itself.
    NoRoom(SectorRange),
}

impl FoundSpan {
    pub fn sectors(&self) -> SectorRange {
        SectorRange::new(self.span.start, self.span.end - self.span.start)
    }

    /// Whether it lies on `dev` and shares a sector with `range`.
    pub fn overlaps(&self, dev: u32, range: SectorRange) -> bool {
        self.chunk.key.dev == dev && self.span.start < range.end() && range.start < self.span.end
    }

    /// The part a region creation has taken (empty without a ticket).
    pub fn taken(&self) -> SectorRange {
        if self.span.ticket == 0 {
            return SectorRange::new(self.span.start, 0);
        }
        let start = self.span.taken_start.max(self.span.start);
        let end = self.span.taken_end.min(self.span.end).max(start);
        SectorRange::new(start, end - start)
    }
}

impl Spans {
    pub fn new(chunks: Map) -> anyhow::Result<Self> {
        Ok(Self {
            table: ChunkTable::map(chunks)?,
            changing: Mutex::new(()),
            programs: OnceLock::new(),
        })
    }

    /// Hands over the loaded object whose charge service charges pretend IO.
    pub fn serve_from(&self, programs: Arc<Mutex<Ebpf>>) {
        let _ = self.programs.set(programs);
    }

    /// The live spans on `dev` overlapping `range`.
    pub fn in_range(&self, dev: u32, range: SectorRange) -> Vec<FoundSpan> {
        if range.len == 0 {
            return Vec::new();
        }
        let first = range.start >> CHUNK_LOG;
        let last = (range.end() - 1) >> CHUNK_LOG;
        let overlaps = |s: &FoundSpan| s.overlaps(dev, range);
        if last - first >= MOST_LOOKUPS {
            return self.all().into_iter().filter(overlaps).collect();
        }
        let mut found = Vec::new();
        for chunk in first..=last {
            if !ChunkKey::fits(dev, chunk) {
                continue;
            }
            let packed = ChunkKey::packed(dev, chunk);
            for probe in 0..CHUNK_PROBES {
                let entry = ChunkKey::entry(packed, probe);
                if self.table.key(entry) == packed
                    && let Some(value) = self.table.read(entry, packed)
                {
                    let chunk = ChunkEntry {
                        key: ChunkKey::unpacked(packed),
                        entry,
                    };
                    found.extend(live(chunk, &value).filter(overlaps));
                }
            }
        }
        found
    }

    /// Every live span.
    pub fn all(&self) -> Vec<FoundSpan> {
        self.all_and_empty().0
    }

    /// Every live span, and the table entries that have none.
    pub fn all_and_empty(&self) -> (Vec<FoundSpan>, Vec<ChunkEntry>) {
        let mut found = Vec::new();
        let mut empty = Vec::new();
        for entry in 0..CHUNK_TABLE_LEN {
            let packed = self.table.key(entry);
            // Free, or freed between the key and the value.
            let Some(value) = (packed != 0)
                .then(|| self.table.read(entry, packed))
                .flatten()
            else {
                continue;
            };
            let chunk = ChunkEntry {
                key: ChunkKey::unpacked(packed),
                entry,
            };
            let before = found.len();
            found.extend(live(chunk, &value));
            if found.len() == before {
                empty.push(chunk);
            }
        }
        (found, empty)
    }

    /// Gives `taken` (inside the span) to the region creation `ticket`; false when the span
    /// is gone.
    pub fn take(&self, s: &FoundSpan, taken: SectorRange, ticket: u64) -> bool {
        let _changing = self.changing.lock().expect("span changes lock");
        let Some(span) = self.table.live(s) else {
            return false;
        };
        // The range first: the ticket makes it count.
        span.taken_start.store(taken.start, SeqCst);
        span.taken_end.store(taken.end(), SeqCst);
        span.ticket.swap(ticket, SeqCst);
        true
    }

    pub fn untake(&self, s: &FoundSpan) {
        let _changing = self.changing.lock().expect("span changes lock");
        if let Some(span) = self.table.live(s) {
            span.ticket.swap(0, SeqCst);
        }
    }

    pub fn free(&self, s: &FoundSpan) {
        let _changing = self.changing.lock().expect("span changes lock");
        if let Some(span) = self.table.live(s) {
            let _ = span
                .state
                .compare_exchange(span_state::LIVE, span_state::FREE, SeqCst, SeqCst);
        }
    }

    /// Takes `gone` (a part no longer uncovered, or taken by a creation that is done) out of
    /// the span: frees, trims or splits it. Returns the part it could not take out (the span
    /// needed a split and its entry had no free span), which is still in the span.
    pub fn remove_part(&self, s: &FoundSpan, gone: SectorRange) -> Removal {
        let (start, end) = (s.span.start, s.span.end);
        let (gone_start, gone_end) = (gone.start.max(start), gone.end().min(end));
        if gone_start >= gone_end {
            return Removal::Nothing;
        }
        match (start < gone_start, gone_end < end) {
            (false, false) => {
                self.free(s);
                return Removal::Freed;
            }
            (false, true) => self.trim(s, gone_end, end),
            (true, false) => self.trim(s, start, gone_start),
            (true, true) => {
                let _changing = self.changing.lock().expect("span changes lock");
                let Some(span) = self.table.live(s) else {
                    return Removal::Trimmed;
                };
                // A free span of the entry takes what follows `gone` (same file and birth);
                // then the old one ends where `gone` starts. Until that store a walk may count
                // [gone_end, end) twice, never not at all.
                let after = SectorRange::new(gone_end, end - gone_end);
                if !self
                    .table
                    .claim(s.chunk.entry, after, s.span.born_ns, s.span.slot)
                {
                    return Removal::NoRoom(after);
                }
                // The end before the ticket goes: `gone` is a done creation's taken part.
                span.end.store(gone_start, SeqCst);
                span.ticket.swap(0, SeqCst);
            }
        }
        Removal::Trimmed
    }

    /// Frees a table entry whose spans are all free: each is made DEAD first, so that no
    /// kernel claim slips in between the look and the freeing; a span in use undoes it. The
    /// spans become FREE again only after the key is gone, so that a claim through a stale
    /// look at the key sees it on its second look (the kernel's `claim_checked`).
    pub fn drop_if_empty(&self, chunk: ChunkEntry) {
        let _changing = self.changing.lock().expect("span changes lock");
        let key = self.table.key_word(chunk.entry);
        if key.load(SeqCst) != chunk.packed() {
            return;
        }
        let states: Vec<&AtomicU64> = (0..SPANS_PER_CHUNK)
            .map(|index| self.table.span(chunk.entry, index).state)
            .collect();
        let dead = states
            .iter()
            .take_while(|state| {
                state
                    .compare_exchange(span_state::FREE, span_state::DEAD, SeqCst, SeqCst)
                    .is_ok()
            })
            .count();
        if dead == SPANS_PER_CHUNK {
            key.swap(0, SeqCst);
        }
        for state in &states[..dead] {
            state.swap(span_state::FREE, SeqCst);
        }
    }

    /// A new start and end for a live span; then drops its ticket (what is trimmed off is the
    /// taken range, done: counted by the region, and no longer by the kernel either way).
    fn trim(&self, s: &FoundSpan, start: u64, end: u64) {
        let _changing = self.changing.lock().expect("span changes lock");
        if let Some(span) = self.table.live(s) {
            span.start.store(start, SeqCst);
            span.end.store(end, SeqCst);
            span.ticket.swap(0, SeqCst);
        }
    }

    /// Charges a pretend IO over `range` on `dev` as the IO probe would charge a real one
    /// (for machines without device-mapper), through the kernel's charge service.
    pub fn charge(&self, dev: u32, range: SectorRange, write: bool) -> anyhow::Result<()> {
        let Some(programs) = self.programs.get() else {
            bail!("the charge service is not loaded");
        };
        let programs = programs.lock().expect("programs lock");
        let service: &RawTracePoint = programs
            .program(names::CHARGE_SERVICE)
            .context("the charge service is missing from the eBPF object")?
            .try_into()?;
        let mut options = RawTracePointRunOptions::new();
        options.args[..3].copy_from_slice(&[u64::from(dev), range.start, range.end()]);
        options.args[3] = u64::from(write);
        service
            .test_run(options)
            .context("running the charge service")?;
        Ok(())
    }
}

/// The live spans of one table entry's value.
fn live(chunk: ChunkEntry, value: &Chunk) -> impl Iterator<Item = FoundSpan> + '_ {
    let is_live = |span: &Span| span.state == span_state::LIVE && span.start < span.end;
    let live_in_chunk = value.spans.iter().filter(|s| is_live(s)).count();
    value
        .spans
        .iter()
        .enumerate()
        .filter(move |(_, span)| is_live(span))
        .map(move |(index, span)| FoundSpan {
            chunk,
            index,
            span: *span,
            live_in_chunk,
        })
}

/// The chunk table, mapped into this process (the map is `BPF_F_MMAPABLE`): reading an entry
/// is a copy from memory rather than a system call (reading all 16,384 costs what a lookup of
/// a few used to), and changing a span a few atomic operations rather than a program run.
struct ChunkTable {
    base: NonNull<Chunk>,
    len: NonZeroUsize,
    /// Keeps the map's descriptor open as long as the mapping is used.
    _map: MapData,
}

// SAFETY: the mapping is read with volatile copies and changed with atomic operations only,
// and lives as long as the table.
unsafe impl Send for ChunkTable {}
// SAFETY: as above.
unsafe impl Sync for ChunkTable {}

impl ChunkTable {
    fn map(chunks: Map) -> anyhow::Result<Self> {
        let Map::Array(data) = chunks else {
            bail!("the chunk table is not an array map");
        };
        let page = 4096;
        let bytes = (CHUNK_TABLE_LEN as usize * size_of::<Chunk>()).div_ceil(page) * page;
        let len = NonZeroUsize::new(bytes).expect("a table of some size");
        // SAFETY: a fresh shared mapping of the map's memory, of its size; nothing else in
        // this process refers to that address range.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                data.fd().as_fd(),
                0,
            )
        }
        .context("mapping the chunk table (a kernel without BPF_F_MMAPABLE arrays?)")?;
        Ok(Self {
            base: base.cast(),
            len,
            _map: data,
        })
    }

    /// The packed key an entry holds now (0: free).
    fn key(&self, entry: u32) -> u64 {
        self.key_word(entry).load(SeqCst)
    }

    fn key_word(&self, entry: u32) -> &AtomicU64 {
        assert!(entry < CHUNK_TABLE_LEN);
        // SAFETY: inside the mapping (checked above) and 8-byte aligned (entries are u64s);
        // every writer, here and in the kernel, changes it atomically.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.base.as_ptr().add(entry as usize)).key) }
    }

    /// The fields of one span, as atomics.
    fn span(&self, entry: u32, index: usize) -> SpanWords<'_> {
        assert!(entry < CHUNK_TABLE_LEN && index < SPANS_PER_CHUNK);
        // SAFETY: inside the mapping (checked above); every field is aligned to its size.
        unsafe {
            let span = &raw mut (*self.base.as_ptr().add(entry as usize)).spans[index];
            SpanWords {
                start: AtomicU64::from_ptr(&raw mut (*span).start),
                end: AtomicU64::from_ptr(&raw mut (*span).end),
                taken_start: AtomicU64::from_ptr(&raw mut (*span).taken_start),
                taken_end: AtomicU64::from_ptr(&raw mut (*span).taken_end),
                ticket: AtomicU64::from_ptr(&raw mut (*span).ticket),
                born_ns: AtomicU64::from_ptr(&raw mut (*span).born_ns),
                slot: AtomicU32::from_ptr(&raw mut (*span).slot),
                state: AtomicU64::from_ptr(&raw mut (*span).state),
            }
        }
    }

    /// The span as read, when it is still that one: its entry holds the same chunk, and it
    /// is live with the same birth.
    fn live(&self, s: &FoundSpan) -> Option<SpanWords<'_>> {
        let span = self.span(s.chunk.entry, s.index);
        let same = self.key(s.chunk.entry) == s.chunk.packed()
            && span.state.load(SeqCst) == span_state::LIVE
            && span.born_ns.load(SeqCst) == s.span.born_ns;
        same.then_some(span)
    }

    /// Claims a free span of `entry` for `range` as the kernel's claims do: FREE to FILLING by
    /// compare-and-swap, the fields, then LIVE.
    fn claim(&self, entry: u32, range: SectorRange, born_ns: u64, slot: u32) -> bool {
        for index in 0..SPANS_PER_CHUNK {
            let span = self.span(entry, index);
            if span
                .state
                .compare_exchange(span_state::FREE, span_state::FILLING, SeqCst, SeqCst)
                .is_err()
            {
                continue;
            }
            span.start.store(range.start, SeqCst);
            span.end.store(range.end(), SeqCst);
            span.taken_start.store(0, SeqCst);
            span.taken_end.store(0, SeqCst);
            span.ticket.store(0, SeqCst);
            span.born_ns.store(born_ns, SeqCst);
            span.slot.store(slot, SeqCst);
            span.state.swap(span_state::LIVE, SeqCst);
            return true;
        }
        false
    }

    /// A copy of an entry while it holds `packed` (None when it no longer does). The kernel
    /// may change spans meanwhile: a change made from a copy first checks that the span is
    /// still the same one (see `live`).
    fn read(&self, entry: u32, packed: u64) -> Option<Chunk> {
        assert!(entry < CHUNK_TABLE_LEN);
        // SAFETY: as in `key`; the value is plain integers, any bit pattern valid.
        let value = unsafe { std::ptr::read_volatile(self.base.as_ptr().add(entry as usize)) };
        (value.key == packed && self.key(entry) == packed).then_some(value)
    }
}

/// One span of the mapped table, field by field.
struct SpanWords<'a> {
    start: &'a AtomicU64,
    end: &'a AtomicU64,
    taken_start: &'a AtomicU64,
    taken_end: &'a AtomicU64,
    ticket: &'a AtomicU64,
    born_ns: &'a AtomicU64,
    slot: &'a AtomicU32,
    state: &'a AtomicU64,
}

impl Drop for ChunkTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length, no longer read.
        let _ = unsafe { munmap(self.base.cast(), self.len.get()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(span: Span) -> FoundSpan {
        FoundSpan {
            chunk: ChunkEntry::default(),
            index: 0,
            span,
            live_in_chunk: 1,
        }
    }

    #[test]
    fn a_span_without_a_ticket_has_nothing_taken() {
        let s = found(Span {
            start: 100,
            end: 200,
            taken_start: 120,
            taken_end: 140,
            ..Span::default()
        });
        assert_eq!(s.taken().len, 0);
        assert_eq!(s.sectors(), SectorRange::new(100, 100));
    }

    #[test]
    fn the_taken_part_lies_inside_the_span() {
        let taken = |taken_start, taken_end| {
            found(Span {
                start: 100,
                end: 200,
                taken_start,
                taken_end,
                ticket: 7,
                ..Span::default()
            })
            .taken()
        };
        assert_eq!(taken(120, 140), SectorRange::new(120, 20));
        // Trimmed since: what the span no longer holds is not taken from it.
        assert_eq!(taken(50, 140), SectorRange::new(100, 40));
        assert_eq!(taken(180, 260), SectorRange::new(180, 20));
        assert_eq!(taken(20, 60).len, 0);
    }

    #[test]
    fn only_live_spans_are_read() {
        let mut chunk = Chunk::default();
        chunk.spans[1] = Span {
            start: 10,
            end: 20,
            state: span_state::LIVE,
            ..Span::default()
        };
        chunk.spans[2] = Span {
            start: 30,
            end: 40,
            state: span_state::FILLING,
            ..Span::default()
        };
        chunk.spans[3] = Span {
            start: 50,
            end: 60,
            state: span_state::DEAD,
            ..Span::default()
        };
        let read: Vec<(usize, usize)> = live(ChunkEntry::default(), &chunk)
            .map(|s| (s.index, s.live_in_chunk))
            .collect();
        assert_eq!(read, vec![(1, 1)]);
    }
}
