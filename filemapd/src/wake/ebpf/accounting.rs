//! User space's half of the in-kernel accounting of uncovered IO. The kernel puts freshly
//! allocated sectors of a watched file into the uncovered set and charges the IO landing there
//! to the file; here the set is handed over to regions as they are created (exactly: the
//! kernel drops a piece from the count while dm-stats has the device suspended for the new
//! region), kept in step with the file (pieces the file gave back, or that a region already
//! covers, go), and each file's totals are read.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::ProgramFd,
};
use filemapd_common::{
    MARKER_LEVELS, Piece, PieceAddress, TOP_LEVEL, UncoveredTotals, marker, piece_address,
    piece_kind, prefix_len, walk_next,
};

use super::spans::{ChunkEntry, FoundSpan, Removal, Spans};
use crate::{
    sectors::{SectorRange, parts_not_in},
    stats::{CreationWitness, group::FuseShadow},
};

type Trie = LpmTrie<MapData, PieceAddress, Piece>;

/// The accounting maps, shared by the event task, the monitors and the metrics.
pub struct Accounting {
    uncovered: Mutex<Trie>,
    /// Whether walks look in the trie: cleared here when it is found empty (see `TRIE_USED`
    /// in the kernel half).
    trie_used: Mutex<Array<MapData, u64>>,
    /// The small allocations (a span per chunk they touch).
    spans: Spans,
    totals: Mutex<PerCpuArray<MapData, UncoveredTotals>>,
    covering: Mutex<HashMap<MapData, u64, u64>>,
    covered: Mutex<HashMap<MapData, u64, u8>>,
    /// Which totals slots are in use.
    slots: Mutex<Vec<bool>>,
    next_ticket: AtomicU64,
    /// Tickets handed out and not yet settled: the device and range their region covers.
    taken: Mutex<std::collections::HashMap<u64, (u32, SectorRange)>>,
    /// The IO probe, whose skipped runs the kernel counts.
    io_probe: ProgramFd,
}

/// A file's slot in the accounting, released (its pieces dropped) with the last handle.
#[derive(Clone)]
pub struct FileAccount {
    pub slot: u32,
    accounting: Arc<Accounting>,
}

impl Accounting {
    pub fn new(
        uncovered: Trie,
        trie_used: Array<MapData, u64>,
        spans: Spans,
        totals: PerCpuArray<MapData, UncoveredTotals>,
        covering: HashMap<MapData, u64, u64>,
        covered: HashMap<MapData, u64, u8>,
        io_probe: ProgramFd,
    ) -> Self {
        let room = totals.len() as usize;
        Self {
            uncovered: Mutex::new(uncovered),
            trie_used: Mutex::new(trie_used),
            spans,
            totals: Mutex::new(totals),
            covering: Mutex::new(covering),
            covered: Mutex::new(covered),
            slots: Mutex::new(vec![false; room]),
            next_ticket: AtomicU64::new(1),
            taken: Mutex::default(),
            io_probe,
        }
    }

    /// Charges a pretend IO over `range` on `dev` to the files whose uncovered sectors it
    /// meets, as the IO probe charges a real one: for tests and benchmarks on machines
    /// without device-mapper.
    pub fn charge_pretend_io(
        &self,
        dev: u32,
        range: SectorRange,
        write: bool,
    ) -> anyhow::Result<()> {
        self.spans.charge(dev, range, write)
    }

    /// Tells walks to look in the trie (after this process put pieces in it).
    fn trie_in_use(&self) -> anyhow::Result<()> {
        self.trie_used
            .lock()
            .expect("trie flag lock")
            .set(0, 1, 0)
            .context("flagging the trie in use")
    }

    /// After pieces left the trie: when it is empty, walks may skip it. Cleared first and
    /// looked at again after, as the kernel sets the flag after its pieces: whichever
    /// comes last, a piece in the trie leaves the flag set.
    fn settle_trie_flag(&self, trie: &Trie) -> anyhow::Result<()> {
        if trie.keys().next().is_some() {
            return Ok(());
        }
        let mut flag = self.trie_used.lock().expect("trie flag lock");
        flag.set(0, 0, 0).context("clearing the trie flag")?;
        if trie.keys().next().is_some() {
            flag.set(0, 1, 0).context("flagging the trie in use")?;
        }
        Ok(())
    }

    /// Hands over the loaded object, whose charge service charges pretend IO.
    pub fn serve_spans_from(&self, programs: Arc<Mutex<aya::Ebpf>>) {
        self.spans.serve_from(programs);
    }

    /// The pieces over `range` on `dev` as the kernel's walk finds them, and as the set
    /// holds them (read whole): the two differ where a walk would miss IO.
    pub fn pieces_found_and_held(
        &self,
        dev: u32,
        range: SectorRange,
    ) -> anyhow::Result<(Vec<SectorRange>, Vec<SectorRange>)> {
        let trie = self.uncovered.lock().expect("uncovered lock");
        let mut found: Vec<SectorRange> = pieces_in(&trie, dev, range)
            .iter()
            .map(|(_, p)| sectors_of(p))
            .collect();
        let mut held: Vec<SectorRange> = Self::entries(&trie)?
            .iter()
            .filter(|(key, p)| {
                p.kind == piece_kind::RANGE
                    && device_of(key) == dev
                    && p.start < range.end()
                    && range.start < p.end
            })
            .map(|(_, p)| sectors_of(p))
            .collect();
        let overlapping = |s: &FoundSpan| s.sectors();
        found.extend(self.spans.in_range(dev, range).iter().map(overlapping));
        held.extend(
            self.spans
                .all()
                .iter()
                .filter(|s| s.overlaps(dev, range))
                .map(overlapping),
        );
        found.sort_unstable();
        held.sort_unstable();
        Ok((found, held))
    }

    /// Says, at a daemon's end, how many bios the IO probe never saw (when any, and when the
    /// kernel counts them).
    pub fn say_io_probe_skips(&self) {
        if let Some(skips) = self.io_probe_skips().filter(|&n| n > 0) {
            log::warn!(
                "The kernel skipped the in-kernel accounting's IO probe {skips} time(s) (another eBPF program was running on that CPU): what those bios wrote before their region existed is counted nowhere"
            );
        }
    }

    /// How many bios the IO probe never saw: the kernel skips a kprobe while another eBPF
    /// program runs on the same CPU (a bio completing in an interrupt over one of the
    /// allocation tracepoints' programs). Their sectors are counted by no one. `None` where
    /// the kernel does not count the skips (before Linux 6.7).
    pub fn io_probe_skips(&self) -> Option<u64> {
        if !kernel_counts_kprobe_skips() {
            return None;
        }
        recursion_misses(self.io_probe.as_fd())
    }

    /// A free slot with its totals zeroed; `None` when every slot is taken.
    pub fn open_account(self: &Arc<Self>) -> anyhow::Result<Option<FileAccount>> {
        let slot = {
            let mut slots = self.slots.lock().expect("slots lock");
            let Some(free) = slots.iter().position(|used| !used) else {
                return Ok(None);
            };
            slots[free] = true;
            free as u32
        };
        let zeros = PerCpuValues::try_from(vec![
            UncoveredTotals::default();
            aya::util::nr_cpus()
                .map_err(|(_, e)| e)
                .context("counting CPUs")?
        ])?;
        self.totals
            .lock()
            .expect("totals lock")
            .set(slot, zeros, 0)
            .context("zeroing a totals slot")?;
        Ok(Some(FileAccount {
            slot,
            accounting: Arc::clone(self),
        }))
    }

    /// Drops a slot's pieces and frees it (once the kernel no longer watches its inode).
    pub fn close_account(&self, slot: u32) {
        if let Err(e) = self.remove_where(|p| p.kind == piece_kind::RANGE && p.slot == slot) {
            log::warn!("dropping the uncovered pieces of slot {slot}: {e:#}");
        }
        let spans: Vec<FoundSpan> = self
            .spans
            .all()
            .into_iter()
            .filter(|s| s.span.slot == slot)
            .collect();
        for s in &spans {
            self.spans.free(s);
        }
        self.drop_empty_chunks(&spans);
        if let Some(used) = self
            .slots
            .lock()
            .expect("slots lock")
            .get_mut(slot as usize)
        {
            *used = false;
        }
    }

    /// A slot's totals, summed over CPUs.
    pub fn totals(&self, slot: u32) -> anyhow::Result<UncoveredTotals> {
        let values = self.totals.lock().expect("totals lock").get(&slot, 0)?;
        Ok(sum(values.iter()))
    }

    /// Every entry of the uncovered set, with its key.
    fn entries(trie: &Trie) -> anyhow::Result<Vec<(Key<PieceAddress>, Piece)>> {
        trie.iter()
            .collect::<Result<Vec<_>, MapError>>()
            .context("reading the uncovered set")
    }

    /// Removes the pieces `doomed` picks, then the markers of blocks left without pieces.
    fn remove_where(&self, doomed: impl Fn(&Piece) -> bool) -> anyhow::Result<usize> {
        let mut trie = self.uncovered.lock().expect("uncovered lock");
        let entries = Self::entries(&trie)?;
        let mut removed = 0;
        for (key, piece) in &entries {
            if piece.kind == piece_kind::RANGE && doomed(piece) {
                remove_key(&mut trie, key)?;
                removed += 1;
            }
        }
        if removed > 0 {
            drop_empty_markers(&mut trie)?;
            self.settle_trie_flag(&trie)?;
        }
        check_invariants(&trie, "after a tidy");
        Ok(removed)
    }

    /// After a pass: drops this file's untaken pieces that `stale` picks (sectors the file
    /// gave back, or that a region of its group covers already), given each piece's range and
    /// when it was recorded (CLOCK_MONOTONIC ns).
    pub fn tidy(
        &self,
        slot: u32,
        stale: impl Fn(SectorRange, u64) -> bool,
    ) -> anyhow::Result<usize> {
        let pieces = self.remove_where(|p| untaken_and_stale(p, slot, &stale))?;
        let (spans, empty) = self.spans.all_and_empty();
        // Entries left empty by removals that did not free them (see `drop_empty_chunks`).
        for chunk in empty {
            self.spans.drop_if_empty(chunk);
        }
        Ok(pieces + self.tidy_spans(slot, spans, &stale))
    }

    /// Takes what `stale` picks out of `slot`'s untaken spans among `spans`: judged by the
    /// aligned pieces the trie would hold, so that a span is tidied as its pieces would be.
    fn tidy_spans(
        &self,
        slot: u32,
        spans: Vec<FoundSpan>,
        stale: &impl Fn(SectorRange, u64) -> bool,
    ) -> usize {
        let mut tidied = 0;
        let mut freed = Vec::new();
        for s in spans {
            if s.span.slot != slot || s.span.ticket != 0 {
                continue;
            }
            let runs = stale_runs(s.sectors(), |piece| stale(piece, s.span.born_ns));
            // From the end backwards: each removal leaves the span's start where it was.
            let mut span = s;
            for run in runs.into_iter().rev() {
                match self.spans.remove_part(&span, run) {
                    Removal::NoRoom(kept) => {
                        log::debug!(
                            "no free span to split {} around {run}: {kept} stays",
                            s.sectors()
                        );
                        continue;
                    }
                    Removal::Freed => freed.push(s),
                    Removal::Trimmed | Removal::Nothing => {}
                }
                span.span.end = run.start;
                tidied += 1;
            }
        }
        self.drop_empty_chunks(&freed);
        tidied
    }

    /// Frees the table entries whose live spans, as read, are all among the `freed`: a try
    /// for an entry that is empty now, none for one that still holds spans. An entry the
    /// kernel claimed a span in meanwhile stays (the freeing checks); one emptied by frees
    /// spread over several calls is freed by the next whole tidy.
    fn drop_empty_chunks(&self, freed: &[FoundSpan]) {
        let mut freed_in: BTreeMap<ChunkEntry, (usize, usize)> = BTreeMap::new();
        for s in freed {
            let entry = freed_in.entry(s.chunk).or_insert((0, s.live_in_chunk));
            entry.0 += 1;
        }
        for (chunk, (freed, live)) in freed_in {
            if freed >= live {
                self.spans.drop_if_empty(chunk);
            }
        }
    }

    /// [`Accounting::tidy`] over the pieces near `ranges` only (found by lookups): a pass over
    /// a stretch costs what the stretch holds, not the whole set.
    pub fn tidy_near(
        &self,
        slot: u32,
        dev: u32,
        ranges: &[SectorRange],
        stale: impl Fn(SectorRange, u64) -> bool,
    ) -> anyhow::Result<usize> {
        let mut trie = self.uncovered.lock().expect("uncovered lock");
        let mut removed = 0;
        for &range in ranges {
            for (key, p) in pieces_in(&trie, dev, range) {
                if untaken_and_stale(&p, slot, &stale) {
                    remove_key(&mut trie, &key)?;
                    removed += 1;
                }
            }
            if removed > 0 {
                drop_empty_markers_in(&mut trie, dev, range)?;
            }
        }
        check_invariants(&trie, "after a tidy near a change");
        if removed > 0 {
            self.settle_trie_flag(&trie)?;
        }
        drop(trie);
        for &range in ranges {
            removed += self.tidy_spans(slot, self.spans.in_range(dev, range), &stale);
        }
        Ok(removed)
    }

    /// Charges `range` on `dev` to `slot` as if uncovered, where no piece lies already: IO
    /// there is counted in the kernel as well as by the region over it, until a creation
    /// takes the pieces over (see `FuseShadow`). `block`: the file system block in sectors.
    fn shadow(&self, slot: u32, dev: u32, range: SectorRange, block: u64) -> anyhow::Result<()> {
        let mut trie = self.uncovered.lock().expect("uncovered lock");
        let present = pieces_in(&trie, dev, range)
            .into_iter()
            .map(|(_, p)| sectors_of(&p))
            .chain(self.spans.in_range(dev, range).iter().map(|s| s.sectors()))
            .collect();
        let born_ns = monotonic_ns();
        for hole in parts_not_in(range, present) {
            insert_pieces(&mut trie, dev, hole, slot, born_ns, block)?;
            self.trie_in_use()?;
        }
        Ok(())
    }

    /// Once the creation of `ticket` is done: takes what it took out of the spans over
    /// `range`. A span that would need a split and has no room for one sends what follows
    /// the taken part to the trie first (for an instant counted twice, never not at all).
    fn drop_taken_spans(&self, dev: u32, range: SectorRange, ticket: u64) -> anyhow::Result<()> {
        let spans: Vec<FoundSpan> = self
            .spans
            .in_range(dev, range)
            .into_iter()
            .filter(|s| s.span.ticket == ticket)
            .collect();
        let mut freed = Vec::new();
        for s in &spans {
            let taken = s.taken();
            let removal = self.spans.remove_part(s, taken);
            if removal == Removal::Freed {
                freed.push(*s);
            }
            if let Removal::NoRoom(rest) = removal {
                let block: u64 = 1
                    << rest
                        .start
                        .trailing_zeros()
                        .min(rest.end().trailing_zeros())
                        .min(3);
                let mut trie = self.uncovered.lock().expect("uncovered lock");
                insert_pieces(&mut trie, dev, rest, s.span.slot, s.span.born_ns, block)?;
                drop(trie);
                self.trie_in_use()?;
                // Now only what comes before the taken part stays (the taken part is done).
                let shortened = FoundSpan {
                    span: filemapd_common::Span {
                        end: taken.end(),
                        ..s.span
                    },
                    ..*s
                };
                self.spans.remove_part(&shortened, taken);
            }
        }
        self.drop_empty_chunks(&freed);
        Ok(())
    }

    /// Drops `slot`'s untaken pieces inside `range` on `dev` (a region there counts them).
    fn unshadow(&self, slot: u32, dev: u32, range: SectorRange) -> anyhow::Result<()> {
        let mut trie = self.uncovered.lock().expect("uncovered lock");
        let inside = |p: SectorRange, _| range.start <= p.start && p.end() <= range.end();
        let mut removed = false;
        for (key, p) in pieces_in(&trie, dev, range) {
            if untaken_and_stale(&p, slot, inside) {
                remove_key(&mut trie, &key)?;
                removed = true;
            }
        }
        drop_empty_markers_in(&mut trie, dev, range)?;
        if removed {
            self.settle_trie_flag(&trie)?;
        }
        Ok(())
    }
}

/// A file's account as `Group::apply` shadows regions about to be fused with: on the file
/// system's dm device `dev`, whose blocks are `block` sectors.
pub struct FileShadow<'a> {
    pub account: &'a FileAccount,
    pub dev: u32,
    pub block: u64,
}

impl FuseShadow for FileShadow<'_> {
    fn shadow(&self, range: SectorRange) -> anyhow::Result<()> {
        let account = self.account;
        account
            .accounting
            .shadow(account.slot, self.dev, range, self.block)
    }

    fn unshadow(&self, range: SectorRange) {
        let account = self.account;
        if let Err(e) = account.accounting.unshadow(account.slot, self.dev, range) {
            log::warn!("dropping the shadow of {range}: {e:#}");
        }
    }
}

impl FileAccount {
    pub fn tidy_near(
        &self,
        dev: u32,
        ranges: &[SectorRange],
        stale: impl Fn(SectorRange, u64) -> bool,
    ) -> anyhow::Result<usize> {
        self.accounting.tidy_near(self.slot, dev, ranges, stale)
    }

    pub fn totals(&self) -> anyhow::Result<UncoveredTotals> {
        self.accounting.totals(self.slot)
    }

    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    pub fn tidy(&self, stale: impl Fn(SectorRange, u64) -> bool) -> anyhow::Result<usize> {
        self.accounting.tidy(self.slot, stale)
    }
}

impl CreationWitness for Accounting {
    /// Tickets the pieces the new region will cover (cutting those it covers in part), and
    /// tells the kernel which ticket this thread's creation settles.
    fn before_create(&self, device: (u32, u32), range: SectorRange) -> Option<u64> {
        let dev = (device.0 << 20) | (device.1 & 0xfffff);
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let result = (|| -> anyhow::Result<bool> {
            let mut trie = self.uncovered.lock().expect("uncovered lock");
            let mut any = false;
            for (key, piece) in pieces_in(&trie, dev, range) {
                if piece.ticket != 0 {
                    continue;
                }
                any = true;
                if range.start <= piece.start && piece.end <= range.end() {
                    trie.insert(&key, Piece { ticket, ..piece }, 0)?;
                    continue;
                }
                cut_piece(&mut trie, dev, &key, &piece, range, ticket)?;
            }
            check_invariants(&trie, "after cutting for a creation");
            drop(trie);
            for s in self.spans.in_range(dev, range) {
                let sectors = s.sectors();
                let start = sectors.start.max(range.start);
                let taken = SectorRange::new(start, sectors.end().min(range.end()) - start);
                if s.span.ticket == 0 && self.spans.take(&s, taken, ticket) {
                    any = true;
                }
            }
            if any {
                self.taken
                    .lock()
                    .expect("taken lock")
                    .insert(ticket, (dev, range));
                let thread = current_thread();
                self.covering
                    .lock()
                    .expect("covering lock")
                    .insert(thread, ticket, 0)?;
            }
            Ok(any)
        })();
        match result {
            Ok(true) => Some(ticket),
            Ok(false) => None,
            Err(e) => {
                log::warn!("handing uncovered sectors {range} over to a new region: {e:#}");
                None
            }
        }
    }

    /// Once the creation returned: its pieces go (the region counts their IO now); when it
    /// failed they stay uncovered, and the kernel never saw the ticket done.
    fn after_create(&self, ticket: u64, created: bool) {
        let _ = self
            .covering
            .lock()
            .expect("covering lock")
            .remove(&current_thread());
        if created {
            let taken = self.taken.lock().expect("taken lock").remove(&ticket);
            if let Some((dev, range)) = taken {
                let mut trie = self.uncovered.lock().expect("uncovered lock");
                let result = (|| -> anyhow::Result<()> {
                    let mut removed = false;
                    for (key, piece) in pieces_in(&trie, dev, range) {
                        if piece.ticket == ticket {
                            remove_key(&mut trie, &key)?;
                            removed = true;
                        }
                    }
                    if removed {
                        drop_empty_markers_in(&mut trie, dev, range)?;
                        self.settle_trie_flag(&trie)?;
                    }
                    Ok(())
                })();
                if let Err(e) = result {
                    log::warn!("dropping covered pieces: {e:#}");
                }
                check_invariants(&trie, "after a region's creation");
                drop(trie);
                if let Err(e) = self.drop_taken_spans(dev, range, ticket) {
                    log::warn!("dropping covered spans: {e:#}");
                }
            }
        } else if let Some((dev, range)) = self.taken.lock().expect("taken lock").remove(&ticket) {
            // Untaken again, so that a later creation (or a tidy) can take them.
            let mut trie = self.uncovered.lock().expect("uncovered lock");
            for (key, piece) in pieces_in(&trie, dev, range) {
                if piece.ticket == ticket
                    && let Err(e) = trie.insert(&key, Piece { ticket: 0, ..piece }, 0)
                {
                    log::warn!("untaking uncovered sectors after a failed creation: {e:#}");
                }
            }
            for s in self.spans.in_range(dev, range) {
                if s.span.ticket == ticket {
                    self.spans.untake(&s);
                }
            }
        }
        let _ = self.covered.lock().expect("covered lock").remove(&ticket);
    }
}

/// The runs of the eBPF program behind `program` (a descriptor of this process) that the
/// kernel skipped because another program was running on that CPU: fdinfo's
/// `recursion_misses`.
pub fn recursion_misses(program: BorrowedFd<'_>) -> Option<u64> {
    let fd = program.as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("recursion_misses:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Whether this kernel counts a kprobe's skipped runs in its `recursion_misses` (Linux 6.7
/// and later; before, the field shows 0 whatever was skipped).
fn kernel_counts_kprobe_skips() -> bool {
    nix::sys::utsname::uname()
        .is_ok_and(|uts| counts_kprobe_skips(&uts.release().to_string_lossy()))
}

fn counts_kprobe_skips(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (6, 7)
}

/// What a tidy drops: a piece of `slot` that no region creation has taken and that `stale`
/// judges, given its sectors and birth time.
fn untaken_and_stale(p: &Piece, slot: u32, stale: impl Fn(SectorRange, u64) -> bool) -> bool {
    p.slot == slot && p.ticket == 0 && stale(sectors_of(p), p.born_ns)
}

/// The sectors a piece stands for.
fn sectors_of(p: &Piece) -> SectorRange {
    SectorRange::new(p.start, p.end - p.start)
}

/// The key a piece (or marker) sits under: its start, with the prefix of its size.
fn key_of(dev: u32, p: &Piece) -> Key<PieceAddress> {
    let span_log = (p.end - p.start).trailing_zeros();
    Key::new(prefix_len(span_log), piece_address(dev, p.start))
}

/// The kernel's `bpf_get_current_pid_tgid()` for this thread.
fn current_thread() -> u64 {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u64;
    ((std::process::id() as u64) << 32) | tid
}

/// Cuts `piece` (under `key`) where `range` ends: the part inside takes `ticket`, the parts
/// outside stay untaken. Every sector keeps an entry throughout and a walk never loses its
/// way: the parts go in first (longer prefixes win lookups), then the markers they need,
/// then the whole piece makes way. A whole piece exactly the size of a marker level's block
/// holds that level's key, where its smaller parts need the marker: the marker takes its
/// place in one update.
fn cut_piece(
    trie: &mut Trie,
    dev: u32,
    key: &Key<PieceAddress>,
    piece: &Piece,
    range: SectorRange,
    ticket: u64,
) -> anyhow::Result<()> {
    let inner = (piece.start.max(range.start), piece.end.min(range.end()));
    let parts: Vec<(u64, u32, u64)> = [
        (piece.start, inner.0, 0),
        (inner.0, inner.1, ticket),
        (inner.1, piece.end, 0),
    ]
    .into_iter()
    .flat_map(|(start, end, ticket)| {
        aligned_pieces(start, end)
            .into_iter()
            .map(move |(start, span_log)| (start, span_log, ticket))
    })
    .collect();
    for &(start, span_log, ticket) in &parts {
        let part = Piece {
            start,
            end: start + (1 << span_log),
            ticket,
            ..*piece
        };
        trie.insert(&key_of(dev, &part), part, 0)?;
    }
    for &(start, span_log, _) in &parts {
        insert_markers(trie, dev, start, span_log, piece.step)?;
    }
    let span_log = (piece.end - piece.start).trailing_zeros();
    match MARKER_LEVELS.iter().position(|&log| log == span_log) {
        Some(level) => {
            let block_log = piece.step.max(1).trailing_zeros();
            trie.insert(key, marker(level, piece.start, block_log, 0), 0)?;
            Ok(())
        }
        None => remove_key(trie, key),
    }
}

/// Puts `range` into the trie as untaken pieces of `slot`, markers first: a walk must never
/// step over a piece already in. `block`: the file system block in sectors.
fn insert_pieces(
    trie: &mut Trie,
    dev: u32,
    range: SectorRange,
    slot: u32,
    born_ns: u64,
    block: u64,
) -> anyhow::Result<()> {
    for (start, span_log) in aligned_pieces(range.start, range.end()) {
        insert_markers(trie, dev, start, span_log, block)?;
        let piece = Piece {
            start,
            end: start + (1 << span_log),
            ticket: 0,
            slot,
            kind: piece_kind::RANGE,
            step: block,
            born_ns,
        };
        trie.insert(&key_of(dev, &piece), piece, 0)?;
    }
    Ok(())
}

/// The runs of `range` that `stale` picks, judged piece by aligned piece (as the trie would
/// hold them), adjacent stale pieces joined.
fn stale_runs(range: SectorRange, stale: impl Fn(SectorRange) -> bool) -> Vec<SectorRange> {
    let mut runs: Vec<SectorRange> = Vec::new();
    for (start, span_log) in aligned_pieces(range.start, range.end()) {
        let piece = SectorRange::new(start, 1 << span_log);
        if !stale(piece) {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.end() == piece.start => last.len += piece.len,
            _ => runs.push(piece),
        }
    }
    runs
}

/// The markers a piece of 2^span_log sectors at `start` needs (see `MARKER_LEVELS`), where
/// missing; `block` is the file system block in sectors.
fn insert_markers(
    trie: &mut Trie,
    dev: u32,
    start: u64,
    span_log: u32,
    block: u64,
) -> anyhow::Result<()> {
    let block_log = block.max(1).trailing_zeros();
    for (level, &log) in MARKER_LEVELS.iter().enumerate() {
        if span_log >= log {
            continue;
        }
        let marker = marker(level, start, block_log, 0);
        let key = Key::new(prefix_len(log), piece_address(dev, marker.start));
        if exact(trie, &key).is_none() {
            trie.insert(&key, marker, 0)?;
        }
    }
    Ok(())
}

/// The entry under exactly this key (a trie lookup answers with the longest prefix that
/// matches, which may be a coarser one).
fn exact(trie: &Trie, key: &Key<PieceAddress>) -> Option<Piece> {
    let entry = trie.get(key, 0).ok()?;
    let span_log = (entry.end - entry.start).trailing_zeros();
    (prefix_len(span_log) == key.prefix_len()
        && piece_address(0, entry.start)[4..] == key.data()[4..])
        .then_some(entry)
}

fn remove_key(trie: &mut Trie, key: &Key<PieceAddress>) -> anyhow::Result<()> {
    match trie.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing from the uncovered set"),
    }
}

/// Whether `piece` is one that `marker` stands for: a range smaller than its block, inside it.
fn marks(marker: &Piece, piece: &Piece) -> bool {
    piece.kind == piece_kind::RANGE
        && piece.end - piece.start < marker.end - marker.start
        && marker.start <= piece.start
        && piece.end <= marker.end
}

/// Removes markers whose block holds no smaller piece any more (also those left inside a
/// larger piece, which would hide it from walks). A piece the kernel adds meanwhile re-adds
/// its markers itself (after the piece), so a marker removed here in that instant comes
/// back; one re-read afterwards closes the rest of the window.
fn drop_empty_markers(trie: &mut Trie) -> anyhow::Result<()> {
    let occupied = |ranges: &BTreeMap<(u32, u64, u64), Piece>, dev: u32, marker: &Piece| {
        ranges
            .range((dev, marker.start, 0)..(dev, marker.end, 0))
            .any(|(_, p)| marks(marker, p))
    };
    let entries = Accounting::entries(trie)?;
    let ranges = ranges_by_place(&entries);
    let mut removed = Vec::new();
    for (key, marker) in entries.iter().filter(|(_, p)| p.kind == piece_kind::MARKER) {
        if !occupied(&ranges, device_of(key), marker) {
            remove_key(trie, key)?;
            removed.push((*key, *marker));
        }
    }
    if !removed.is_empty() {
        let again = ranges_by_place(&Accounting::entries(trie)?);
        // Coarsest first, so that a finer marker never stands without the ones above it.
        removed.sort_by_key(|(_, m)| std::cmp::Reverse(m.end - m.start));
        for (key, marker) in removed {
            if occupied(&again, device_of(&key), &marker) {
                trie.insert(&key, marker, 0)?;
            }
        }
    }
    Ok(())
}

/// The ranges among `entries`, by device and place.
fn ranges_by_place(entries: &[(Key<PieceAddress>, Piece)]) -> BTreeMap<(u32, u64, u64), Piece> {
    entries
        .iter()
        .filter(|(_, p)| p.kind == piece_kind::RANGE)
        .map(|(k, p)| ((device_of(k), p.start, p.end), *p))
        .collect()
}

fn device_of(key: &Key<PieceAddress>) -> u32 {
    let data = key.data();
    u32::from_be_bytes([data[0], data[1], data[2], data[3]])
}

/// The pieces overlapping `range` on device `dev`, found with lookups as the kernel's walk
/// finds them: the cost follows the pieces and markers in the range, not the size of the set.
fn pieces_in(trie: &Trie, dev: u32, range: SectorRange) -> Vec<(Key<PieceAddress>, Piece)> {
    let mut found = Vec::new();
    walk(trie, dev, range, 1 << TOP_LEVEL, |key, piece| {
        found.push((key, piece));
        true
    });
    found
}

/// Walks `range` as the kernel does, handing each piece met to `visit` until it says stop.
/// Where a lookup finds nothing it steps by `miss_step`: the kernel's top level, or, inside
/// a block whose marker may be gone, the level below it.
fn walk(
    trie: &Trie,
    dev: u32,
    range: SectorRange,
    miss_step: u64,
    mut visit: impl FnMut(Key<PieceAddress>, Piece) -> bool,
) {
    let mut at = range.start;
    while at < range.end() {
        let found = trie
            .get(&Key::new(prefix_len(0), piece_address(dev, at)), 0)
            .ok();
        if let Some(piece) = found
            && piece.kind == piece_kind::RANGE
            && piece.end > at
            && !visit(key_of(dev, &piece), piece)
        {
            return;
        }
        at = match found {
            None => (at | (miss_step - 1)) + 1,
            found => walk_next(at, found.as_ref()),
        };
    }
}

/// Removes the markers over `range` whose block holds no smaller piece any more, finest
/// level first (a coarser marker must outlive the finer ones under it); re-checked once
/// after, as [`drop_empty_markers`] does.
fn drop_empty_markers_in(trie: &mut Trie, dev: u32, range: SectorRange) -> anyhow::Result<()> {
    let holds_smaller = |trie: &Trie, marker: &Piece| {
        let mut any = false;
        let block = SectorRange::new(marker.start, marker.end - marker.start);
        walk(trie, dev, block, marker.step, |_, piece| {
            any = marks(marker, &piece);
            !any
        });
        any
    };
    let mut removed = Vec::new();
    for &log in &MARKER_LEVELS {
        let size = 1u64 << log;
        let mut at = range.start & !(size - 1);
        while at < range.end() {
            let key = Key::new(prefix_len(log), piece_address(dev, at));
            if let Some(marker) = exact(trie, &key)
                && marker.kind == piece_kind::MARKER
                && !holds_smaller(trie, &marker)
            {
                remove_key(trie, &key)?;
                removed.push((key, marker));
            }
            at += size;
        }
    }
    // Coarsest first, so that a finer marker never stands without the ones above it.
    for (key, marker) in removed.into_iter().rev() {
        if holds_smaller(trie, &marker) {
            trie.insert(&key, marker, 0)?;
        }
    }
    Ok(())
}

/// Debug builds: says (as warnings) where the uncovered set breaks what walks rely on: a piece
/// without the marker of a level above it (walks would step over it: its IO uncounted), or
/// two pieces overlapping (their IO counted twice). Pieces younger than 100 ms are left out:
/// the kernel inserts a piece before its markers. A check reads the whole set (two system
/// calls an entry), so it runs at most once a second, and not over sets of thousands.
fn check_invariants(trie: &Trie, when: &str) {
    const MOST_ENTRIES: usize = 2048;
    static LAST: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    if !cfg!(debug_assertions) {
        return;
    }
    {
        let mut last = LAST.lock().expect("check lock");
        if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        *last = Some(std::time::Instant::now());
    }
    let Ok(entries) = trie
        .iter()
        .take(MOST_ENTRIES + 1)
        .collect::<Result<Vec<_>, MapError>>()
    else {
        return;
    };
    if entries.len() > MOST_ENTRIES {
        return;
    }
    let settled = monotonic_ns().saturating_sub(100_000_000);
    let mut ranges: Vec<(u32, u64, u64)> = Vec::new();
    for (key, piece) in &entries {
        if piece.kind != piece_kind::RANGE {
            continue;
        }
        let dev = device_of(key);
        ranges.push((dev, piece.start, piece.end));
        if piece.born_ns > settled {
            continue;
        }
        let span_log = (piece.end - piece.start).trailing_zeros();
        for &log in MARKER_LEVELS.iter().filter(|&&log| span_log < log) {
            let block = piece.start & !((1u64 << log) - 1);
            let key = Key::new(prefix_len(log), piece_address(dev, block));
            if exact(trie, &key).is_none_or(|m| m.kind != piece_kind::MARKER) {
                log::warn!(
                    "uncovered set, {when}: piece {}+{} (slot {}, ticket {}) has no marker of 2^{log} sectors at {block}",
                    piece.start,
                    piece.end - piece.start,
                    piece.slot,
                    piece.ticket
                );
            }
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[0].0 == pair[1].0 && pair[1].1 < pair[0].2 {
            log::warn!(
                "uncovered set, {when}: pieces {}..{} and {}..{} overlap",
                pair[0].1,
                pair[0].2,
                pair[1].1,
                pair[1].2
            );
        }
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns()` (pieces' birth times).
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// `[start, end)` cut into aligned power-of-two runs: (start, log2 of length) each, as the
/// kernel cuts an allocation.
pub fn aligned_pieces(mut start: u64, end: u64) -> Vec<(u64, u32)> {
    let mut pieces = Vec::new();
    while start < end {
        let fits = 63 - (end - start).leading_zeros();
        let span_log = start.trailing_zeros().min(fits);
        pieces.push((start, span_log));
        start += 1 << span_log;
    }
    pieces
}

pub(super) fn sum<'a>(values: impl Iterator<Item = &'a UncoveredTotals>) -> UncoveredTotals {
    values.fold(UncoveredTotals::default(), |a, b| UncoveredTotals {
        reads: a.reads + b.reads,
        read_sectors: a.read_sectors + b.read_sectors,
        read_ns: a.read_ns + b.read_ns,
        writes: a.writes + b.writes,
        write_sectors: a.write_sectors + b.write_sectors,
        write_ns: a.write_ns + b.write_ns,
        unrecorded: a.unrecorded + b.unrecorded,
        unwalked: a.unwalked + b.unwalked,
    })
}

/// One line for logs and `filemapd show`.
pub fn describe(t: &UncoveredTotals) -> String {
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut line = format!(
        "{} reads ({} sectors, {:.1} ms), {} writes ({} sectors, {:.1} ms)",
        t.reads,
        t.read_sectors,
        ms(t.read_ns),
        t.writes,
        t.write_sectors,
        ms(t.write_ns)
    );
    if t.unrecorded > 0 {
        line += &format!(
            "; {} allocation(s) not recorded whole (their IO may be missing)",
            t.unrecorded
        );
    }
    if t.unwalked > 0 {
        line += &format!("; {} IO(s) too long to walk to the end", t.unwalked);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kprobe_skips_are_counted_from_linux_6_7() {
        for (release, counts) in [
            ("6.1.0-56-amd64", false),
            ("6.6.30", false),
            ("6.7.0", true),
            ("6.12.117+deb12-amd64", true),
            ("6.18.44-fc-v657", true),
            ("7.0.1", true),
            ("5.15.0-91-generic", false),
        ] {
            assert_eq!(counts_kprobe_skips(release), counts, "{release}");
        }
    }

    #[test]
    fn pieces_tile_the_range_aligned() {
        for (start, end) in [
            (0, 1),
            (8, 136),
            (1000, 100_000),
            (7, 8),
            (1 << 40, (1 << 40) + 4095),
        ] {
            let pieces = aligned_pieces(start, end);
            let mut at = start;
            for &(s, log) in &pieces {
                assert_eq!(s, at);
                assert_eq!(s % (1 << log), 0, "{s} not aligned to 2^{log}");
                at = s + (1 << log);
            }
            assert_eq!(at, end);
            assert!(pieces.len() <= 2 * 64);
        }
    }

    #[test]
    fn stale_runs_join_the_stale_pieces_of_a_span() {
        // 8+16+32+64 then 8 sectors (see below); the middle two are stale.
        let span = SectorRange::new(8, 128);
        let stale = |p: SectorRange| p.start == 16 || p.start == 32;
        assert_eq!(stale_runs(span, stale), vec![SectorRange::new(16, 48)]);
        assert_eq!(stale_runs(span, |_| true), vec![span]);
        assert_eq!(stale_runs(span, |_| false), vec![]);
        // Two runs apart.
        let ends = |p: SectorRange| p.start == 8 || p.start == 128;
        assert_eq!(
            stale_runs(span, ends),
            vec![SectorRange::new(8, 8), SectorRange::new(128, 8)]
        );
    }

    #[test]
    fn an_aligned_power_of_two_is_one_piece() {
        assert_eq!(aligned_pieces(4096, 8192), vec![(4096, 12)]);
    }

    #[test]
    fn a_64k_allocation_at_a_4k_boundary_takes_few_pieces() {
        // 128 sectors starting 8 sectors into a 64 KiB chunk: 8+16+32+64 then 8.
        let pieces = aligned_pieces(8, 136);
        assert_eq!(pieces, vec![(8, 3), (16, 4), (32, 5), (64, 6), (128, 3)]);
    }
}
