//! The eBPF trigger and counting: loads the kernel half, tells it each tracepoint's layout,
//! attaches what this kernel offers, and hands the events for watched inodes to user space;
//! with the kernel's BTF, also the programs that count every watched file's IO in the kernel
//! (the bio hook; or, without block tracepoints, a probe on dm-stats' accounting, which needs
//! dm-mod's BTF). Here: the [`Tracer`] and its event ring. The other programs' loading is in
//! `programs`, the choice of the IO hook in `io_hook`, a tracepoint's fields on this kernel
//! in `tracepoints`.
mod batch_read;
pub mod counting;
pub mod hub;
mod io_hook;
pub mod kernel_layout;
pub mod pins;
mod programs;
pub mod restart;
pub mod sector_map;
pub mod tracefs;
pub mod tracepoints;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, links::FdLink},
};
use filemapd_common::{
    BioLayout, DmLayout, ExtentEvent, InodeKey, LAYOUTS_LEN, Placement, SPARE_SLOTS,
    TracepointLayout, names, sector_map::TableLogs,
};
use std::sync::{Arc, Mutex};

pub use counting::{CountedFile, Counting};
pub use sector_map::{
    DEFAULT_MAP_EXTENTS, MOST_MAP_EXTENTS, check_map_extents, tables_for_extents, tables_size,
};
use tokio::io::unix::AsyncFd;

pub use hub::{EventFeed, Feed, Hub};
pub use io_hook::IoHook;
pub use programs::standalone_counting;
use programs::{
    NewFiles, OBJECT, attach_counting, attach_new_files, attach_region_probe, load_program,
    raise_memlock_limit, spawn_program_log, take_map, unattached_counting_over,
};
use tracepoints::layout_of;
pub use tracepoints::{Change, TRACEPOINTS, Tracepoint};

/// How big the sector map's tables are (log2 of their entries). A daemon that watches one
/// file: at least 32,768 chunks (2.4 MB, and 0.3 MB of their makers' words) and 8,192 blocks
/// (0.4 MB), more for a group of over 3,276 regions (see [`one_file_tables`]). `filemapd watch`: tables for
/// [`DEFAULT_MAP_EXTENTS`] unless `kernel_map_extents` asks for more or fewer (see
/// [`tables_for_extents`]). A table whose places are full leaves sectors uncounted, and says
/// so.
pub const ONE_FILE_TABLES: TableLogs = TableLogs {
    chunks: 15,
    blocks: 13,
};
pub const MANY_FILES_TABLES: TableLogs = tables_for_extents(DEFAULT_MAP_EXTENTS);

/// The tables of a daemon that watches one file whose group has `regions` regions now: room
/// for twice as many extents (the file may grow, and in path mode a new file is taken up
/// before the old one is let go), and never less than [`ONE_FILE_TABLES`]. A file with more
/// scattered extents than its tables hold would leave their IO uncounted, and be synced whole
/// at every pass. At most `watch`'s largest ([`MOST_MAP_EXTENTS`]).
pub fn one_file_tables(regions: usize) -> TableLogs {
    let extents = u32::try_from(regions.saturating_mul(2)).unwrap_or(u32::MAX);
    let wanted = tables_for_extents(extents.min(MOST_MAP_EXTENTS));
    if wanted.chunks > ONE_FILE_TABLES.chunks {
        wanted
    } else {
        ONE_FILE_TABLES
    }
}

/// Where the probes learn the kernel's structures from (see [`Tracer::load_pretending_device_mapper`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Kernel,
    Pretend,
    /// The kernel's own, without dm's (see [`Tracer::load_counting_any_device`]).
    AnyDevice,
}

/// How the kernel half counts the files' IO, decided before it loads.
struct CountingPlan {
    /// The kernel's structures as the counting programs read them; `None` where the kernel
    /// does not count the files' IO, and `unavailable` says why.
    known: Option<kernel_layout::KernelLayout>,
    unavailable: Option<String>,
    hook: IoHook,
    /// What the programs' layout globals are set to: the hook not chosen gets an all-zero
    /// layout, which keeps it idle, attached or not.
    globals: kernel_layout::KernelLayout,
}

impl CountingPlan {
    fn make(layout: Layout, io_hook: Option<IoHook>) -> anyhow::Result<Self> {
        let mut unavailable = None;
        // Asked off, the kernel's BTF is not even read (seconds of start-up under emulation).
        let mut known = if layout == Layout::Pretend {
            unavailable = Some("the layout is made up: verification only".to_string());
            None
        } else if layout == Layout::AnyDevice {
            Some(kernel_layout::read_for_any_device()?)
        } else if std::env::var_os("FILEMAPD_NO_COUNTING").is_some() {
            log::info!("FILEMAPD_NO_COUNTING set: no in-kernel counting of the files' IO");
            unavailable = Some("FILEMAPD_NO_COUNTING is set".to_string());
            None
        } else {
            let started = std::time::Instant::now();
            let read = kernel_layout::read()
                .inspect_err(|e| {
                    log::info!("no in-kernel counting of the files' IO: {e:#}");
                    unavailable = Some(format!("{e:#}"));
                })
                .ok();
            log::debug!(
                "read the kernel's layout from BTF in {:.1?}",
                started.elapsed()
            );
            read
        };
        let hook = match (layout, &known) {
            (Layout::Pretend | Layout::AnyDevice, _) => IoHook::Bio,
            (Layout::Kernel, None) => IoHook::DmStats,
            (Layout::Kernel, Some(read)) => {
                match IoHook::choose(read.dm != DmLayout::default(), io_hook) {
                    Ok(hook) => hook,
                    Err(why) => {
                        log::info!("no in-kernel counting of the files' IO: {why}");
                        unavailable = Some(why);
                        known = None;
                        IoHook::DmStats
                    }
                }
            }
        };
        let mut globals = match layout {
            Layout::Pretend => kernel_layout::KernelLayout::made_up(),
            Layout::Kernel | Layout::AnyDevice => known.unwrap_or_default(),
        };
        // The hook not chosen stays idle (its layout all zero), attached or not.
        match (layout, hook) {
            (Layout::Pretend, _) => {}
            (_, IoHook::Bio) => globals.dm = DmLayout::default(),
            (_, IoHook::DmStats) => globals.bio = BioLayout::default(),
        }
        Ok(Self {
            known,
            unavailable,
            hook,
            globals,
        })
    }
}

/// Directories whose new files the kernel watches from birth, at most.
const MOST_WATCHED_DIRS: u32 = 256;

/// Loaded and attached eBPF programs plus their maps.
pub struct Tracer {
    // Keeps the programs attached for as long as the tracer lives (and the counting, which
    // runs its charge service).
    ebpf: Arc<Mutex<Ebpf>>,
    watched: HashMap<MapData, InodeKey, Placement>,
    events: AsyncFd<RingBuf<MapData>>,
    /// Set while events flow (see [`Tracer::next_events`]): the kernel submits without
    /// waking this process, which reads again after `GATHER`.
    reading: Array<MapData, u32>,
    gathering: bool,
    lost: PerCpuArray<MapData, u64>,
    attached: Vec<&'static Tracepoint>,
    /// Whether the kprobe on dm-stats' message handler is attached (it needs dm loaded).
    sees_region_changes: bool,
    /// The in-kernel counting of the watched files' IO, when its probes are attached; else
    /// why not.
    counting: Option<Arc<Counting>>,
    counting_unavailable: Option<String>,
    /// Its maps pinned for `filemapd show` and `report`, unpinned when the tracer goes.
    pins: Option<pins::PinDir>,
    /// Whose IO probe counts (see `restart`): this daemon's, or a stopped service's until
    /// this one takes over.
    gate: Array<MapData, u32>,
    /// The stopped service whose programs count until this one takes over.
    predecessor: Option<restart::Predecessor>,
    /// The programs' links, pinned for a successor when the service stops for one.
    links: restart::Links,
    /// With the counting, and the probes on new files attached: the watched directories and
    /// the spare slots the kernel gives new files.
    new_files: Option<NewFiles>,
}

impl Tracer {
    /// Loads the programs with room for `max_watched` inodes and a sector map of `tables`, and
    /// attaches every tracepoint this kernel has. Fails (with the reason) when none can be
    /// attached.
    pub fn load(max_watched: u32, tables: TableLogs) -> anyhow::Result<Self> {
        Self::load_with(max_watched, tables, false, false, Layout::Kernel, None)
    }

    /// [`Tracer::load`] as `watch --check-config` tries it: the programs a watch with the IO
    /// hook `io_hook` (if asked for) and a sector map of `tables` would load, loaded and
    /// attached for a moment, to learn whether they can be here.
    pub fn load_to_check(tables: TableLogs, io_hook: Option<IoHook>) -> anyhow::Result<Self> {
        Self::load_with(1, tables, false, false, Layout::Kernel, io_hook)
    }

    /// [`Tracer::load`] that also verifies the programs a kernel without device-mapper cannot
    /// run as a dm host verifies them, for tests and the bench that price start-up: the IO and
    /// new-file probes get a made-up layout of the kernel's structures (an all-zero one makes
    /// them return at once, and the verifier would walk nothing else) and stay unattached.
    /// [`Tracer::counting_unattached`] then verifies the IO probe.
    pub fn load_pretending_device_mapper(
        max_watched: u32,
        tables: TableLogs,
    ) -> anyhow::Result<Self> {
        Self::load_with(max_watched, tables, false, false, Layout::Pretend, None)
    }

    /// [`Tracer::load`] whose counting, through the bio hook, counts the IO of files on any
    /// block device, not only on dm's: for tests of the hook on machines without
    /// device-mapper (a file's placement then names its own device).
    pub fn load_counting_any_device(max_watched: u32, tables: TableLogs) -> anyhow::Result<Self> {
        Self::load_with(max_watched, tables, false, false, Layout::AnyDevice, None)
    }

    /// [`Tracer::load`] for the service, which counts through a restart's gap (see
    /// `restart`): a stopped service's programs count until [`Tracer::take_over`]. With
    /// `ebpf_log`, the programs also log (aya-log, through this process's logger) which
    /// events their filter kept or dropped, and why. `io_hook`: the hook asked for, if any
    /// (see [`IoHook::choose`]).
    pub fn load_service(
        max_watched: u32,
        tables: TableLogs,
        ebpf_log: bool,
        io_hook: Option<IoHook>,
    ) -> anyhow::Result<Self> {
        Self::load_with(max_watched, tables, ebpf_log, true, Layout::Kernel, io_hook)
    }

    fn load_with(
        max_watched: u32,
        tables: TableLogs,
        ebpf_log: bool,
        service: bool,
        layout: Layout,
        io_hook: Option<IoHook>,
    ) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let mut layouts = [TracepointLayout::default(); LAYOUTS_LEN];
        let mut present = Vec::new();
        for tp in &TRACEPOINTS {
            match layout_of(tp)? {
                Some(layout) => {
                    layouts[tp.index as usize] = layout;
                    present.push(tp);
                }
                None => log::debug!("tracepoint {}:{} not available", tp.category, tp.name),
            }
        }
        if present.is_empty() {
            bail!("none of filemapd's tracepoints exist on this kernel");
        }
        let own_tgid = std::process::id();
        // The fault tests shrink the filter (more files than room) and the ring (overflow).
        let max_watched = test_size("FILEMAPD_TEST_WATCH_ROOM").unwrap_or(max_watched);
        let CountingPlan {
            mut unavailable,
            known: kernel_layout,
            hook,
            globals: layout_value,
        } = CountingPlan::make(layout, io_hook)?;
        let log_events = u32::from(ebpf_log);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::LAYOUTS, &layouts, true)
            .override_global(names::OWN_TGID, &own_tgid, true)
            .override_global(names::DM_LAYOUT, &layout_value.dm, true)
            .override_global(names::BIO_LAYOUT, &layout_value.bio, true)
            .override_global(names::VFS_LAYOUT, &layout_value.vfs, true)
            .override_global(names::LOG_EVENTS, &log_events, true)
            .override_global(names::TABLE_LOGS, &tables, true)
            .map_max_entries(names::WATCHED, max_watched.max(1))
            // Room for the spare slots of new files besides the watched ones.
            .map_max_entries(names::COUNTERS, max_watched.max(1) + SPARE_SLOTS)
            .map_max_entries(names::BOUNDS, max_watched.max(1) + SPARE_SLOTS)
            .map_max_entries(names::CHUNKS, 1 << tables.chunks)
            .map_max_entries(names::MAKING, 1 << tables.chunks)
            .map_max_entries(names::BLOCKS, 1 << tables.blocks)
            .map_max_entries(names::WATCHED_DIRS, MOST_WATCHED_DIRS);
        if let Some(bytes) = test_size("FILEMAPD_TEST_RING_BYTES") {
            loader.map_max_entries(names::EVENTS, bytes);
        }
        // The service's gate word is pinned: its successor shares it.
        let (predecessor, mut links) = match (service, &kernel_layout) {
            (true, Some(_)) => (
                restart::Predecessor::find(),
                restart::Links::for_successor(),
            ),
            _ => (None, restart::Links::default()),
        };
        let gate_pin = match &predecessor {
            Some(predecessor) => Some(predecessor.gate()),
            None if links.keeps() => {
                let dir = pins::own_dir();
                match std::fs::create_dir_all(&dir) {
                    Ok(()) => Some(dir.join(names::GATE)),
                    Err(e) => {
                        // No bpffs: nothing can be pinned for a successor either.
                        log::info!(
                            "a restart's gap goes uncounted: creating {}: {e}",
                            dir.display()
                        );
                        links = restart::Links::default();
                        None
                    }
                }
            }
            None => None,
        };
        // The bios in flight go with the gate word: a bio queued under one daemon may
        // complete under the next (a predecessor too old to share them has none pinned).
        let bios_pin = match (&predecessor, &gate_pin) {
            (Some(predecessor), _) => Some(predecessor.bios()).filter(|p| p.exists()),
            (None, Some(gate)) => gate.parent().map(|dir| dir.join(names::BIOS)),
            (None, None) => None,
        };
        if let Some(path) = &gate_pin {
            loader.map_pin_path(names::GATE, path.as_path());
        }
        if let Some(path) = &bios_pin {
            loader.map_pin_path(names::BIOS, path.as_path());
        }
        let started = std::time::Instant::now();
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
        log::debug!("loaded the eBPF object in {:.1?}", started.elapsed());
        let gate_map = take_map(&mut ebpf, names::GATE)?;
        if let Some(predecessor) = &predecessor {
            log::info!(
                "daemon {}'s programs count the files' IO until this one has taken them up",
                predecessor.pid
            );
            let own = pins::own_dir();
            let pinned = std::fs::create_dir_all(&own)
                .context("creating the pin directory")
                .and_then(|()| Ok(gate_map.pin(own.join(names::GATE))?))
                .and_then(|()| match ebpf.map(names::BIOS) {
                    Some(bios) => Ok(bios.pin(own.join(names::BIOS))?),
                    None => Ok(()),
                });
            if let Err(e) = pinned {
                log::warn!("the next restart's gap goes uncounted: {e:#}");
                links = restart::Links::default();
            }
        }
        let mut gate = Array::try_from(gate_map)?;
        if predecessor.is_none() {
            open_gate(&mut gate)?;
        }
        let started = std::time::Instant::now();
        if ebpf_log {
            spawn_program_log(&mut ebpf)?;
        }
        let mut attached = Vec::new();
        for tp in present {
            let program = load_program(&mut ebpf, tp.name, TracePoint::load)?;
            let link = program
                .attach(tp.category, tp.name)
                .with_context(|| format!("attaching to {}:{}", tp.category, tp.name))?;
            if links.keeps() {
                links.hold(tp.name, FdLink::try_from(program.take_link(link)?)?);
            }
            attached.push(tp);
        }
        log::debug!(
            "verified and attached {} tracepoint programs in {:.1?}",
            attached.len(),
            started.elapsed()
        );
        let sees_region_changes = match attach_region_probe(&mut ebpf, &mut links) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("no word of other processes' region changes: {e:#}");
                false
            }
        };
        let watched = take_map(&mut ebpf, names::WATCHED)?;
        let started = std::time::Instant::now();
        let (counting, pins) = match kernel_layout {
            Some(layout) => {
                match attach_counting(&mut ebpf, hook, &layout, &watched, tables, &mut links) {
                    Ok((counting, pins)) => (Some(Arc::new(counting)), pins),
                    Err(e) => {
                        log::info!("no in-kernel counting of the files' IO: {e:#}");
                        unavailable = Some(format!("{e:#}"));
                        (None, None)
                    }
                }
            }
            None => (None, None),
        };
        log::debug!("set up the counting in {:.1?}", started.elapsed());
        let new_files = match counting {
            Some(_) => match attach_new_files(&mut ebpf, &mut links) {
                Ok(new_files) => Some(new_files),
                Err(e) => {
                    log::info!(
                        "files made in a watched directory are counted from when they are taken up, not from birth: {e:#}"
                    );
                    None
                }
            },
            None => None,
        };
        let watched = HashMap::try_from(watched)?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)?;
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the fd stays
        // open for as long as it is registered.
        let events = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        let lost = PerCpuArray::try_from(take_map(&mut ebpf, names::LOST)?)?;
        let reading = Array::try_from(take_map(&mut ebpf, names::READING)?)?;
        let ebpf = Arc::new(Mutex::new(ebpf));
        if let Some(counting) = &counting {
            counting.serve_from(Arc::clone(&ebpf));
        }
        let tracer = Self {
            ebpf,
            watched,
            events,
            reading,
            gathering: false,
            lost,
            attached,
            sees_region_changes,
            counting,
            counting_unavailable: unavailable,
            pins,
            gate,
            predecessor,
            links,
            new_files,
        };
        log::debug!(
            "instructions the verifier walked, by program: {:?}",
            tracer.verified_instructions()
        );
        Ok(tracer)
    }

    /// The stopped service whose programs count this one's files until it takes over.
    pub fn predecessor(&self) -> Option<u32> {
        self.predecessor.as_ref().map(|p| p.pid)
    }

    /// This daemon's IO probe counts from now on, the stopped service's no more (one store:
    /// a bio is counted by one of them; only one ending in the same instant, as the two
    /// probes read the word one after the other, may be counted by both or by neither).
    pub fn take_over(&mut self) -> anyhow::Result<()> {
        open_gate(&mut self.gate)
    }

    /// Unpins the stopped service's links once this daemon has taken over: its programs stop.
    pub fn detach_predecessor(&mut self) {
        if let Some(predecessor) = self.predecessor.take() {
            predecessor.detach();
        }
    }

    /// Whether the kernel watches the new files of a watched directory from birth.
    pub fn watches_new_files(&self) -> bool {
        self.new_files.is_some()
    }

    /// Has the kernel watch every regular file made in the directory `key` from birth, with
    /// `placement` (its slot filled in by the kernel). Fails where the counting cannot count
    /// the directory's device: a new file the kernel took up there would stay in flight.
    pub fn watch_directory(&mut self, key: InodeKey, placement: Placement) -> anyhow::Result<()> {
        if let Some(counting) = &self.counting {
            counting.can_count_on(placement.dm_dev)?;
        }
        let Some(new_files) = &mut self.new_files else {
            return Ok(());
        };
        new_files
            .dirs
            .insert(key, placement, 0)
            .with_context(|| format!("watching directory {key:?}"))
    }

    pub fn unwatch_directory(&mut self, key: InodeKey) {
        if let Some(new_files) = &mut self.new_files {
            let _ = new_files.dirs.remove(&key);
        }
    }

    /// The places of the spare-slot table the kernel has taken (to be filled again).
    pub fn empty_spare_places(&self) -> Vec<u32> {
        let Some(new_files) = &self.new_files else {
            return Vec::new();
        };
        (0..SPARE_SLOTS)
            .filter(|&i| new_files.spare.get(&i, 0).is_ok_and(|v| v == 0))
            .collect()
    }

    /// Puts a slot ready in an empty place of the spare-slot table.
    pub fn put_spare(&mut self, place: u32, slot: u32) -> anyhow::Result<()> {
        let Some(new_files) = &mut self.new_files else {
            bail!("no probes on new files");
        };
        new_files
            .spare
            .set(place, u64::from(slot) + 1, 0)
            .context("putting a spare slot in place")
    }

    /// The in-kernel counting over this tracer's maps with its IO probe attached to nothing,
    /// for tests on machines without device-mapper: the allocation programs still record a
    /// file whose placement names a dm device, and the charge service counts pretend IO.
    /// Fails when the tracer has its counting.
    pub fn counting_unattached(&mut self, tables: TableLogs) -> anyhow::Result<Arc<Counting>> {
        if self.counting.is_some() {
            bail!("the tracer's counting is attached");
        }
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let counting = Arc::new(unattached_counting_over(&mut ebpf, tables)?);
        drop(ebpf);
        counting.serve_from(Arc::clone(&self.ebpf));
        self.counting = Some(Arc::clone(&counting));
        Ok(counting)
    }

    /// The in-kernel counting of the watched files' IO, when this kernel allows it.
    pub fn counting(&self) -> Option<&Arc<Counting>> {
        self.counting.as_ref()
    }

    /// Why the kernel does not count the files' IO, when it does not.
    pub fn counting_unavailable(&self) -> Option<&str> {
        self.counting_unavailable.as_deref()
    }

    /// How many instructions the kernel's verifier walked for each loaded program (what
    /// start-up costs), by name; empty before Linux 5.16, which does not say.
    pub fn verified_instructions(&self) -> Vec<(String, u32)> {
        let ebpf = self.ebpf.lock().expect("ebpf lock");
        let mut counts: Vec<(String, u32)> = ebpf
            .programs()
            .filter_map(|(name, program)| {
                let count = program.info().ok()?.verified_instruction_count()?;
                Some((name.to_string(), count))
            })
            .collect();
        counts.sort();
        counts
    }

    /// Whether events report other processes deleting regions or rewriting their aux_data
    /// (so a deleted group needs no polling to be noticed).
    pub fn sees_region_changes(&self) -> bool {
        self.sees_region_changes
    }

    /// The tracepoints the programs are attached to.
    pub fn attached(&self) -> &[&'static Tracepoint] {
        &self.attached
    }

    pub fn watch(&mut self, key: InodeKey, placement: Placement) -> anyhow::Result<()> {
        self.watched
            .insert(key, placement, 0)
            .with_context(|| format!("watching {key:?}"))
    }

    /// The kernel's entry for an inode, if it watches it.
    pub fn watched(&self, key: InodeKey) -> Option<Placement> {
        self.watched.get(&key, 0).ok()
    }

    pub fn unwatch(&mut self, key: InodeKey) -> anyhow::Result<()> {
        match self.watched.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("unwatching {key:?}")),
        }
    }

    /// Waits until at least one event is ready, then returns every event in the buffer.
    ///
    /// While events flow, the kernel does not wake this process for each one (a wake-up
    /// costs more than the program that sends the event): from a batch on, `READING` is set
    /// and the next call reads after `GATHER` instead of waiting to be woken. A read that
    /// finds nothing clears the flag and reads once more, which the kernel's side completes
    /// (`submit_quietly`): no event is left unread while this process waits. Cancel-safe: an
    /// interrupted call leaves the state for the next.
    pub async fn next_events(&mut self) -> anyhow::Result<Vec<ExtentEvent>> {
        if self.gathering {
            tokio::time::sleep(GATHER).await;
            let batch = take_events(self.events.get_mut());
            if !batch.is_empty() {
                return Ok(batch);
            }
            self.set_reading(false)?;
            // The flag's clear must be seen before the ring is read again (a store, then
            // a load: only a full fence keeps them in order).
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let batch = take_events(self.events.get_mut());
            if !batch.is_empty() {
                self.set_reading(true)?;
                return Ok(batch);
            }
        }
        loop {
            let mut guard = self.events.readable_mut().await?;
            let batch = take_events(guard.get_inner_mut());
            guard.clear_ready();
            if !batch.is_empty() {
                self.set_reading(true)?;
                return Ok(batch);
            }
        }
    }

    /// Sets `READING` in the kernel, and `gathering` with it.
    fn set_reading(&mut self, reading: bool) -> anyhow::Result<()> {
        self.gathering = reading;
        self.reading
            .set(0, u32::from(reading), 0)
            .context("telling the kernel whether events are being read")
    }

    /// Events dropped because the ring buffer was full, since load.
    pub fn lost_events(&self) -> anyhow::Result<u64> {
        Ok(self.lost.get(&0, 0)?.iter().sum())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Stopped for a successor, a service that counts leaves its programs counting.
        let counts = self.gate.get(&0, 0).ok() == Some(std::process::id());
        if pins::keeping_for_successor()
            && counts
            && let Some(pins) = &self.pins
        {
            self.links.pin_for_successor(pins.path());
        }
    }
}

/// Sets the gate word to this process: its IO probe counts.
fn open_gate(gate: &mut Array<MapData, u32>) -> anyhow::Result<()> {
    gate.set(0, std::process::id(), 0)
        .context("opening the IO probe's gate")
}

/// How long events gather unheard while they flow: under an allocation storm the kernel wakes
/// the reader not at all, and an event waits at most this long (a region is created
/// meanwhile only where its pass would have run anyway).
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// Every event in the ring, in order (nudges, which only wake the reader, left out).
fn take_events(ring: &mut RingBuf<MapData>) -> Vec<ExtentEvent> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<ExtentEvent>() {
            // SAFETY: the kernel half writes exactly one ExtentEvent per record;
            // read_unaligned because ring records are only 8-byte aligned.
            let event = unsafe { item.as_ptr().cast::<ExtentEvent>().read_unaligned() };
            if event.source != filemapd_common::tracepoint::NUDGE {
                batch.push(event);
            }
        }
    }
    batch
}

/// A size the fault tests set through the environment (never set in production).
fn test_size(variable: &str) -> Option<u32> {
    let value = std::env::var(variable).ok()?.parse().ok()?;
    log::warn!("{variable}={value}: a test size, not for production");
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemons_tables_grow_with_its_group_beyond_the_least() {
        assert_eq!(one_file_tables(0), ONE_FILE_TABLES);
        assert_eq!(one_file_tables(1), ONE_FILE_TABLES);
        // Today's tables hold 6,553 extents (five chunk entries each): twice 3,276 regions.
        assert_eq!(one_file_tables(3_276), ONE_FILE_TABLES);
        assert_eq!(one_file_tables(3_277), tables_for_extents(6_554));
        assert!(one_file_tables(3_277).chunks > ONE_FILE_TABLES.chunks);
        // A 30,000-region group (the bench's largest): room for 60,000 extents.
        assert_eq!(one_file_tables(30_000), tables_for_extents(60_000));
        assert_eq!(tables_size(one_file_tables(30_000)), "54.5 MB");
        assert_eq!(
            one_file_tables(usize::MAX),
            tables_for_extents(MOST_MAP_EXTENTS)
        );
    }
}
