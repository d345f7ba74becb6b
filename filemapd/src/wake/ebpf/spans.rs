//! The chunk table of the uncovered set (see `filemapd_common::CHUNK_LOG`): the small
//! allocations, one span each per chunk they touch. User space reads the table through a
//! read-only mapping of it but changes spans only through the kernel's span service (a
//! program run with BPF_PROG_TEST_RUN), whose atomic operations cannot undo a claim the
//! allocation programs make at the same instant, as a value rewritten from here could.
use std::{
    num::NonZeroUsize,
    os::fd::AsFd as _,
    ptr::NonNull,
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Map, MapData},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun as _},
};
use filemapd_common::{
    CHUNK_LOG, CHUNK_PROBES, CHUNK_TABLE_LEN, Chunk, ChunkKey, SPANS_PER_CHUNK, Span, names,
    span_op, span_state,
};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::sectors::SectorRange;

/// Ranges of more chunks than this are looked up by reading the whole hash instead.
const MOST_LOOKUPS: u64 = 64;

pub struct Spans {
    table: ChunkTable,
    /// The loaded object, for its span service (set once the tracer has attached the rest).
    programs: OnceLock<Arc<Mutex<Ebpf>>>,
}

/// One entry of the chunk table: its chunk and where it is (a chunk may have several).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkEntry {
    pub key: ChunkKey,
    pub entry: u32,
}

/// A live span as read, with where it lives.
#[derive(Clone, Copy, Debug)]
pub struct FoundSpan {
    pub key: ChunkKey,
    /// Its entry in the chunk table.
    pub entry: u32,
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
    pub fn chunk_entry(&self) -> ChunkEntry {
        ChunkEntry {
            key: self.key,
            entry: self.entry,
        }
    }

    pub fn sectors(&self) -> SectorRange {
        SectorRange::new(self.span.start, self.span.end - self.span.start)
    }

    /// Whether it lies on `dev` and shares a sector with `range`.
    pub fn overlaps(&self, dev: u32, range: SectorRange) -> bool {
        self.key.dev == dev && self.span.start < range.end() && range.start < self.span.end
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
            programs: OnceLock::new(),
        })
    }

    /// Hands over the loaded object whose span service changes spans.
    pub fn serve_from(&self, programs: Arc<Mutex<Ebpf>>) {
        let _ = self.programs.set(programs);
    }

    /// The live spans on `dev` overlapping `range`.
    pub fn in_range(&self, dev: u32, range: SectorRange) -> anyhow::Result<Vec<FoundSpan>> {
        if range.len == 0 {
            return Ok(Vec::new());
        }
        let first = range.start >> CHUNK_LOG;
        let last = (range.end() - 1) >> CHUNK_LOG;
        let overlaps = |s: &FoundSpan| s.overlaps(dev, range);
        if last - first >= MOST_LOOKUPS {
            return Ok(self.all()?.into_iter().filter(overlaps).collect());
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
                    found.extend(live(ChunkKey::unpacked(packed), entry, &value).filter(overlaps));
                }
            }
        }
        Ok(found)
    }

    /// Every live span.
    pub fn all(&self) -> anyhow::Result<Vec<FoundSpan>> {
        Ok(self.all_and_empty()?.0)
    }

    /// Every live span, and the table entries that have none.
    pub fn all_and_empty(&self) -> anyhow::Result<(Vec<FoundSpan>, Vec<ChunkEntry>)> {
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
            let key = ChunkKey::unpacked(packed);
            let before = found.len();
            found.extend(live(key, entry, &value));
            if found.len() == before {
                empty.push(ChunkEntry { key, entry });
            }
        }
        Ok((found, empty))
    }

    /// Gives `taken` (inside the span) to the region creation `ticket`; false when the span
    /// is gone.
    pub fn take(&self, s: &FoundSpan, taken: SectorRange, ticket: u64) -> anyhow::Result<bool> {
        Ok(self.run(span_op::TAKE, s, [taken.start, taken.end(), ticket])? == span_op::DONE)
    }

    pub fn untake(&self, s: &FoundSpan) -> anyhow::Result<()> {
        self.run(span_op::UNTAKE, s, [0; 3]).map(drop)
    }

    pub fn free(&self, s: &FoundSpan) -> anyhow::Result<()> {
        self.run(span_op::FREE, s, [0; 3]).map(drop)
    }

    /// Takes `gone` (a part no longer uncovered, or taken by a creation that is done) out of
    /// the span: frees, trims or splits it. Returns the part it could not take out (the span
    /// needed a split and its chunk had no free span), which is still in the span.
    pub fn remove_part(&self, s: &FoundSpan, gone: SectorRange) -> anyhow::Result<Removal> {
        let (start, end) = (s.span.start, s.span.end);
        let (gone_start, gone_end) = (gone.start.max(start), gone.end().min(end));
        if gone_start >= gone_end {
            return Ok(Removal::Nothing);
        }
        match (start < gone_start, gone_end < end) {
            (false, false) => {
                self.free(s)?;
                return Ok(Removal::Freed);
            }
            (false, true) => self.trim(s, gone_end, end)?,
            (true, false) => self.trim(s, start, gone_start)?,
            (true, true) => {
                // The new span takes what follows; the old one then ends where `gone` starts.
                let split = self.run(span_op::SPLIT, s, [gone_end, 0, 0])?;
                if split == span_op::NO_ROOM {
                    return Ok(Removal::NoRoom(SectorRange::new(gone_end, end - gone_end)));
                }
                if (split as usize) < SPANS_PER_CHUNK {
                    let shortened = FoundSpan {
                        span: Span {
                            end: gone_end,
                            ..s.span
                        },
                        ..*s
                    };
                    self.trim(&shortened, start, gone_start)?;
                }
            }
        }
        Ok(Removal::Trimmed)
    }

    /// Frees a table entry whose spans are all free (the kernel checks, atomically).
    pub fn drop_if_empty(&self, chunk: ChunkEntry) -> anyhow::Result<()> {
        let span = FoundSpan {
            key: chunk.key,
            entry: chunk.entry,
            index: 0,
            span: Span::default(),
            live_in_chunk: 0,
        };
        self.run(span_op::DROP_IF_EMPTY, &span, [0; 3]).map(drop)
    }

    fn trim(&self, s: &FoundSpan, start: u64, end: u64) -> anyhow::Result<()> {
        self.run(span_op::TRIM, s, [start, end, 0]).map(drop)
    }

    /// Charges a pretend IO over `range` on `dev` as the IO probe would charge a real one
    /// (for machines without device-mapper).
    pub fn charge(&self, dev: u32, range: SectorRange, write: bool) -> anyhow::Result<()> {
        let args = [
            span_op::CHARGE,
            u64::from(dev),
            range.start,
            range.end(),
            u64::from(write),
            0,
            0,
            0,
        ];
        self.run_with(args).map(drop)
    }

    /// Runs the span service on `s`; its answer (a `span_op` result, or a split's new index).
    fn run(&self, op: u64, s: &FoundSpan, rest: [u64; 3]) -> anyhow::Result<u32> {
        self.run_with([
            op,
            u64::from(s.key.dev),
            s.key.chunk,
            u64::from(s.entry) << 32 | s.index as u64,
            s.span.born_ns,
            rest[0],
            rest[1],
            rest[2],
        ])
    }

    fn run_with(&self, args: [u64; 8]) -> anyhow::Result<u32> {
        let Some(programs) = self.programs.get() else {
            bail!("the span service is not loaded");
        };
        let programs = programs.lock().expect("programs lock");
        let service: &RawTracePoint = programs
            .program(names::SPAN_SERVICE)
            .context("the span service is missing from the eBPF object")?
            .try_into()?;
        let mut options = RawTracePointRunOptions::new();
        options.args[..8].copy_from_slice(&args);
        let answer = service
            .test_run(options)
            .context("running the span service")?
            .return_value;
        Ok(answer)
    }
}

/// The live spans of one table entry's value.
fn live(key: ChunkKey, entry: u32, value: &Chunk) -> impl Iterator<Item = FoundSpan> + '_ {
    let is_live = |span: &Span| span.state == span_state::LIVE && span.start < span.end;
    let live_in_chunk = value.spans.iter().filter(|s| is_live(s)).count();
    value
        .spans
        .iter()
        .enumerate()
        .filter(move |(_, span)| is_live(span))
        .map(move |(index, span)| FoundSpan {
            key,
            entry,
            index,
            span: *span,
            live_in_chunk,
        })
}

/// The chunk table, mapped read-only into this process (the map is `BPF_F_MMAPABLE`): reading
/// an entry is a copy from memory rather than a system call, so reading all 16,384 costs
/// what a lookup of a few used to.
struct ChunkTable {
    base: NonNull<Chunk>,
    len: NonZeroUsize,
    /// Keeps the map's descriptor open as long as the mapping is used.
    _map: MapData,
}

// SAFETY: the mapping is only read, with volatile copies, and lives as long as the table.
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
        // SAFETY: a fresh shared, read-only mapping of the map's memory, of its size; nothing
        // else in this process refers to that address range.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ,
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
        assert!(entry < CHUNK_TABLE_LEN);
        // SAFETY: inside the mapping (checked above), aligned; the kernel writes the key with
        // atomic operations, and an aligned 64-bit read is single-copy atomic.
        unsafe { std::ptr::read_volatile(&raw const (*self.base.as_ptr().add(entry as usize)).key) }
    }

    /// A copy of an entry while it holds `packed` (None when it no longer does). The kernel
    /// may change spans meanwhile: a span read mid-change is judged by the span service,
    /// which checks it is still the same one before it acts.
    fn read(&self, entry: u32, packed: u64) -> Option<Chunk> {
        assert!(entry < CHUNK_TABLE_LEN);
        // SAFETY: as in `key`; the value is plain integers, any bit pattern valid.
        let value = unsafe { std::ptr::read_volatile(self.base.as_ptr().add(entry as usize)) };
        (value.key == packed && self.key(entry) == packed).then_some(value)
    }
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
            key: ChunkKey::default(),
            entry: 0,
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
        let read: Vec<(usize, usize)> = live(ChunkKey::default(), 0, &chunk)
            .map(|s| (s.index, s.live_in_chunk))
            .collect();
        assert_eq!(read, vec![(1, 1)]);
    }
}
