//! User space's half of the in-kernel counting: a slot per watched file (its counters and
//! histogram bounds in the kernel), the file's sectors kept in the sector map after each
//! pass, and the counters read back. The kernel counts every bio of a watched file, whatever
//! regions exist: regions are a view, not the count.
use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, PerCpuValues},
    programs::{ProgramFd, RawTracePoint, RawTracePointRunOptions, TestRun as _},
};
use filemapd_common::{Bounds, FileCounters, names, sector_map::stamp};

use super::{
    batch_read,
    sector_map::{Changes, Held, SectorMap},
};
use crate::sectors::SectorRange;

/// How much older than a pass's reading of the file a recording must be for the pass to judge
/// it: a margin over the instant between an allocation's tracepoint and its extent showing in
/// FIEMAP. Words a pass writes are stamped twice as old, so that the next pass judges them.
const READING_MARGIN: Duration = Duration::from_millis(50);

/// The kernel's counting maps, shared by the event task, the monitors and the metrics.
pub struct Counting {
    map: SectorMap,
    counters: Mutex<PerCpuArray<MapData, FileCounters>>,
    /// The counters map again, for reading every slot at once.
    counters_fd: OwnedFd,
    bounds: Mutex<Array<MapData, Bounds>>,
    /// Which slots are in use.
    slots: Mutex<Vec<bool>>,
    /// The IO probe, whose skipped runs the kernel counts.
    io_probe: ProgramFd,
    /// Which programs count.
    hook: super::IoHook,
    /// The loaded object, for its charge service (set once the tracer has attached the rest).
    programs: OnceLock<Arc<Mutex<Ebpf>>>,
}

/// A file's slot, freed (its sectors taken out of the map) by [`Counting::close`].
#[derive(Clone)]
pub struct CountedFile {
    pub slot: u32,
    /// The dm device its sectors lie on (kernel dev_t).
    pub dev: u32,
    counting: Arc<Counting>,
    /// Its latency histogram's bounds.
    pub bounds: Arc<Bounds>,
}

/// When a pass read the file, and the stamps that follow from it.
#[derive(Clone, Copy, Debug)]
pub struct Reading {
    pub at_ns: u64,
}

impl Reading {
    pub fn now() -> Self {
        Self {
            at_ns: monotonic_ns(),
        }
    }

    /// Recordings stamped at or after this may be missing from the reading.
    fn since(&self) -> u64 {
        stamp::of(self.at_ns.saturating_sub(READING_MARGIN.as_nanos() as u64))
    }

    /// The stamp of the words a pass writes.
    fn stamp(&self) -> u64 {
        stamp::of(
            self.at_ns
                .saturating_sub(2 * READING_MARGIN.as_nanos() as u64),
        )
    }
}

impl Counting {
    pub fn new(
        map: SectorMap,
        counters: PerCpuArray<MapData, FileCounters>,
        counters_fd: OwnedFd,
        bounds: Array<MapData, Bounds>,
        io_probe: ProgramFd,
        hook: super::IoHook,
    ) -> Self {
        let room = counters.len() as usize;
        Self {
            map,
            counters: Mutex::new(counters),
            counters_fd,
            bounds: Mutex::new(bounds),
            slots: Mutex::new(vec![false; room]),
            io_probe,
            hook,
            programs: OnceLock::new(),
        }
    }

    /// Which programs count the files' IO.
    pub fn hook(&self) -> super::IoHook {
        self.hook
    }

    /// Whether the kernel counts a device's IO only while the device has a dm-stats region
    /// (see [`crate::stats::hook`]).
    pub fn needs_region(&self) -> bool {
        self.hook == super::IoHook::DmStats
    }

    /// Whether this hook can count the IO of files on the block device `dev`; else why not.
    pub fn can_count_on(&self, dev: u32) -> anyhow::Result<()> {
        if self.hook == super::IoHook::Bio && request_based(dev) {
            bail!(
                "its device {}:{} is request-based (multipath): the block layer does not trace its bios' completion, which the bio hook counts at",
                dev >> 20,
                dev & 0xfffff
            );
        }
        Ok(())
    }

    pub fn map(&self) -> &SectorMap {
        &self.map
    }

    /// Hands over the loaded object, whose charge service counts pretend IO.
    pub fn serve_from(&self, programs: Arc<Mutex<Ebpf>>) {
        let _ = self.programs.set(programs);
    }

    /// A free slot for a file on `dev` whose histogram has `bounds`, its counters starting
    /// from `base` (what an earlier daemon counted, carried over; kept in the kernel's
    /// counters, so that every reader of them sees it); `None` when every slot is taken.
    pub fn open(
        self: &Arc<Self>,
        dev: u32,
        bounds: Bounds,
        base: FileCounters,
    ) -> anyhow::Result<Option<CountedFile>> {
        self.can_count_on(dev)?;
        let Some(slot) = self.reserve(bounds, base)? else {
            return Ok(None);
        };
        Ok(Some(self.adopt(slot, dev, bounds)))
    }

    /// A free slot with its counters set to `base` (on one CPU; nothing counts in the slot
    /// yet) and histogram bounds set, not yet any file's (the kernel gives spare ones to
    /// files made in a watched directory); `None` when every slot is taken.
    pub fn reserve(&self, bounds: Bounds, base: FileCounters) -> anyhow::Result<Option<u32>> {
        let slot = {
            let mut slots = self.slots.lock().expect("slots lock");
            let Some(free) = slots.iter().position(|used| !used) else {
                return Ok(None);
            };
            slots[free] = true;
            free as u32
        };
        let result = (|| -> anyhow::Result<()> {
            let cpus = aya::util::nr_cpus()
                .map_err(|(_, e)| e)
                .context("counting CPUs")?;
            let mut start = vec![FileCounters::default(); cpus];
            start[0] = base;
            self.counters
                .lock()
                .expect("counters lock")
                .set(slot, PerCpuValues::try_from(start)?, 0)
                .context("setting a file's counters")?;
            self.bounds
                .lock()
                .expect("bounds lock")
                .set(slot, bounds, 0)
                .context("setting a file's histogram bounds")
        })();
        if let Err(e) = result {
            self.free_slot(slot);
            return Err(e);
        }
        Ok(Some(slot))
    }

    /// The file in a reserved slot (one the kernel gave it from birth keeps what it counted
    /// since), its histogram bounds set.
    pub fn adopt(self: &Arc<Self>, slot: u32, dev: u32, bounds: Bounds) -> CountedFile {
        if let Err(e) = self
            .bounds
            .lock()
            .expect("bounds lock")
            .set(slot, bounds, 0)
        {
            log::warn!("setting the histogram bounds of slot {slot}: {e:#}");
        }
        CountedFile {
            slot,
            dev,
            counting: Arc::clone(self),
            bounds: Arc::new(bounds),
        }
    }

    /// Takes a slot's sectors out of the map and frees it (once the kernel no longer watches
    /// its inode).
    pub fn close(&self, slot: u32) {
        let changes = self.map.clear(slot);
        log::debug!("slot {slot} closed: {} word(s) freed", changes.words);
        self.free_slot(slot);
    }

    fn free_slot(&self, slot: u32) {
        if let Some(used) = self
            .slots
            .lock()
            .expect("slots lock")
            .get_mut(slot as usize)
        {
            *used = false;
        }
    }

    /// A slot's counters as the kernel holds them, summed over CPUs.
    pub fn counters(&self, slot: u32) -> anyhow::Result<FileCounters> {
        let values = self.counters.lock().expect("counters lock").get(&slot, 0)?;
        Ok(FileCounters::sum(values.iter()))
    }

    /// Every slot's counters, summed over CPUs, in slot order: a few system calls for all of
    /// them (a scrape of thousands of files), where one lookup per slot would cost one each.
    pub fn all_counters(&self) -> anyhow::Result<Vec<FileCounters>> {
        let slots = self.slots.lock().expect("slots lock").len() as u32;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        match batch_read::per_cpu_values::<FileCounters>(self.counters_fd.as_fd(), slots, cpus)
            .context("reading the counters map")?
        {
            Some(mut values) => {
                // Summed in place (slot i's sum lands at or before its CPUs' values): no
                // second buffer of every slot's counters per scrape.
                let slots = values.len() / cpus;
                for slot in 0..slots {
                    values[slot] = FileCounters::sum(values[slot * cpus..(slot + 1) * cpus].iter());
                }
                values.truncate(slots);
                Ok(values)
            }
            None => (0..slots).map(|slot| self.counters(slot)).collect(),
        }
    }

    /// Counts a pretend IO over `range` on `dev` as the IO probe counts a real one (its start
    /// and its end, lasting `duration`): for tests and benchmarks on machines without
    /// device-mapper.
    pub fn charge_pretend_io(
        &self,
        dev: u32,
        range: SectorRange,
        write: bool,
        duration: Duration,
    ) -> anyhow::Result<()> {
        let Some(programs) = self.programs.get() else {
            bail!("the charge service is not loaded");
        };
        let programs = programs.lock().expect("programs lock");
        let service: &RawTracePoint = programs
            .program(names::CHARGE_SERVICE)
            .context("the charge service is missing from the eBPF object")?
            .try_into()?;
        // Its start, then its end.
        for phase in [0, 1] {
            let mut options = RawTracePointRunOptions::new();
            options.args[..6].copy_from_slice(&[
                u64::from(dev),
                range.start,
                range.end(),
                u64::from(write),
                phase,
                duration.as_nanos() as u64,
            ]);
            service
                .test_run(options)
                .context("running the charge service")?;
        }
        Ok(())
    }

    /// Adds `counters` to a slot's in the kernel, atomically on one CPU (the carry service):
    /// also while the IO probe counts into the slot.
    pub fn carry(&self, slot: u32, counters: &FileCounters) -> anyhow::Result<()> {
        let Some(programs) = self.programs.get() else {
            bail!("the carry service is not loaded");
        };
        let mut programs = programs.lock().expect("programs lock");
        let mut carry: Array<&mut MapData, FileCounters> = Array::try_from(
            programs
                .map_mut(names::CARRY)
                .context("the carry map is missing from the eBPF object")?,
        )?;
        carry.set(0, counters, 0).context("setting what to carry")?;
        let service: &RawTracePoint = programs
            .program(names::CARRY_SERVICE)
            .context("the carry service is missing from the eBPF object")?
            .try_into()?;
        let mut options = RawTracePointRunOptions::new();
        options.args[0] = u64::from(slot);
        let result = service
            .test_run(options)
            .context("running the carry service")?;
        if result.return_value != 0 {
            bail!("the carry service found no slot {slot}");
        }
        Ok(())
    }

    /// Says, at a daemon's end, how many bios the IO probe never saw (when any, and when the
    /// kernel counts them).
    pub fn say_io_probe_skips(&self) {
        if let Some(skips) = self.io_probe_skips().filter(|&n| n > 0) {
            log::warn!(
                "The kernel skipped the counting's IO probe {skips} time(s) (another eBPF program was running on that CPU): those bios are counted for no file"
            );
        }
    }

    /// How many bios the IO probe never saw: the kernel skips a kprobe while another eBPF
    /// program runs on the same CPU (a bio completing in an interrupt over one of the
    /// allocation tracepoints' programs). `None` where the kernel does not count the skips
    /// (before Linux 6.7).
    pub fn io_probe_skips(&self) -> Option<u64> {
        if !kernel_counts_kprobe_skips() {
            return None;
        }
        recursion_misses(self.io_probe.as_fd())
    }
}

impl CountedFile {
    /// After a pass read the file at `reading`: the file's holdings over the 16 MiB blocks
    /// that `over` touches become `ranges` (all the file's sectors, sorted and disjoint),
    /// except what the kernel recorded too recently for the reading to show.
    pub fn sync(&self, over: &[SectorRange], ranges: &[SectorRange], reading: Reading) -> Changes {
        self.counting.map.set(
            self.dev,
            self.slot,
            over,
            ranges,
            Some(reading.since()),
            reading.stamp(),
        )
    }

    /// All the file's IO so far (what an earlier daemon counted included).
    pub fn counters(&self) -> anyhow::Result<FileCounters> {
        self.counting.counters(self.slot)
    }

    /// What the file holds in the map now (reads the whole tables).
    pub fn held(&self) -> Vec<Held> {
        self.counting.map.held(self.slot)
    }

    pub fn counting(&self) -> &Counting {
        &self.counting
    }
}

/// Whether the block device `dev` (kernel dev_t) queues requests (blk-mq: loop, disks,
/// request-based dm such as multipath) rather than taking bios (bio-based: dm-linear, thin,
/// crypt, zram). A request's bios end without `block:block_bio_complete`.
fn request_based(dev: u32) -> bool {
    std::path::Path::new(&format!(
        "/sys/dev/block/{}:{}/mq",
        dev >> 20,
        dev & 0xfffff
    ))
    .exists()
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

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns()` (the map's stamps).
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// One line for logs and `filemapd show`.
pub fn describe(c: &FileCounters) -> String {
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut line = format!(
        "{} reads ({} sectors, {:.1} ms), {} writes ({} sectors, {:.1} ms), {} in flight",
        c.reads,
        c.read_sectors,
        ms(c.read_ns),
        c.writes,
        c.write_sectors,
        ms(c.write_ns),
        c.in_flight()
    );
    if c.unrecorded > 0 {
        line += &format!(
            "; {} allocation(s) not recorded whole at once (their IO may be missing until a pass recorded them)",
            c.unrecorded
        );
    }
    if c.unwalked > 0 {
        line += &format!("; {} IO(s) too long to walk to the end", c.unwalked);
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
    fn a_pass_writes_words_that_the_next_pass_judges() {
        let first = Reading {
            at_ns: 10_000_000_000,
        };
        let next = Reading {
            at_ns: first.at_ns + 1_000_000,
        };
        assert!(!stamp::at_or_after(first.stamp(), next.since()));
        // A recording made just after the first reading is kept by it.
        let recorded = stamp::of(first.at_ns + 1);
        assert!(stamp::at_or_after(recorded, first.since()));
    }
}
