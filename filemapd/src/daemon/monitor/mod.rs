//! The daemon: one file, one group (or none: the kernel's counters alone), one loop. Each
//! pass: is the group still there, does the file (or, in path mode, the file at the path)
//! still match its regions and the kernel's map of it, wait, is the file gone. All dm and
//! FIEMAP details live in other modules.
mod pass;
mod wait;

use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use log::{debug, info, warn};

use crate::{
    daemon::args::{DaemonArgs, FollowMode},
    daemon::metrics::{Reporter, Wakeup},
    daemon::tally::Tally,
    file::follow,
    file::identity::{FileId, check_mappable, tracepoint_category},
    file::view::FileView,
    reconcile::Mapping,
    sectors::SectorRange,
    stats::group::Group,
    stats::{Devices, RegionSettings, StatsDevice, new_group::GroupSpec},
    wake::ebpf::{CountedFile, Counting, EventFeed, Hub},
    wake::notify::{Notices, Notifier},
    wake::pacing::Pacer,
};

/// Why the daemon stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    GroupRemoved,
    NoExtents,
    UnlinkedAndClosed,
    /// SIGTERM, between passes.
    Terminated,
    /// Not an end: a file that had lost its group got a new one (see
    /// [`Monitor::regroup_when_refilled`]).
    Refilled,
}

impl Exit {
    pub fn message(self) -> &'static str {
        match self {
            Exit::GroupRemoved => "Filemap group removed: exiting.",
            Exit::NoExtents => "File contains no extents: exiting.",
            Exit::UnlinkedAndClosed => "File unlinked and closed: exiting.",
            Exit::Terminated => "Terminated: exiting.",
            Exit::Refilled => "File has blocks again: following its new group.",
        }
    }
}

/// What wakes the daemon besides its check interval.
enum Trigger {
    /// Nothing: every interval, look whether the file changed (lvm2's way).
    Poll,
    /// The kernel: block-allocation tracepoints filtered to the watched inode. The interval
    /// then only paces the checks for a deleted group or an unlinked file, and not even that
    /// when the kernel also reports region changes and inotify reports the file's fate.
    Ebpf {
        hub: Hub,
        feed: Box<EventFeed>,
        notices: Option<Notices>,
    },
}

/// How soon to look again after an event whose effect FIEMAP did not show yet (the tracepoints
/// fire while the file system is still inserting or removing the extent).
const SETTLE: Duration = Duration::from_millis(10);
/// How many such looks before giving up on an event's range (then the next event or change of
/// size catches up).
const SETTLE_TRIES: u32 = 100;
/// After a pass left creations for later (storm control), how long before the next takes up
/// the backlog: long enough that each such pass creates a batch, not one region.
const BACKLOG_PAUSE: Duration = Duration::from_millis(250);
/// After another process deleted or relabelled regions, how long to let it finish (dmstats
/// deletes a group region by region) before looking at the group.
const REGIONS_QUIET: Duration = Duration::from_millis(100);
/// Polling: how often to read the whole extent map even though size and block count are
/// unchanged. Defragmenters (e4defrag, xfs_fsr) and copy-on-write to a reflinked file move
/// blocks without changing either, and lvm2's test would never see it; one FIEMAP per file
/// every 10 s (no dm message unless the map differs) bounds how long regions point at
/// blocks the file gave away.
const SWEEP: Duration = Duration::from_secs(10);

pub struct Monitor {
    path: PathBuf,
    mode: FollowMode,
    file: File,
    file_id: FileId,
    device: Arc<StatsDevice>,
    /// The file's group; `None`: no regions, the kernel counts the file alone.
    group_id: Option<u64>,
    interval: Duration,
    mapping: Mapping,
    trigger: Trigger,
    /// The file's extents as last read and what events said changed since.
    view: FileView,
    /// When to look at the file again regardless of its size (after events).
    recheck: Option<(Instant, u32)>,
    /// The recheck is for another process's region changes: not paced.
    regions_changed: bool,
    /// How often passes may run and create regions (storm control).
    pacer: Pacer,
    /// The device's completed IOs when a pass last asked whether it is idle.
    io_seen: Option<u64>,
    tally: Tally,
    /// The group as found at start-up for the first pass; afterwards, in event-driven mode
    /// only, as the last pass left it. Trusted until the kernel reports another process's
    /// region change (or lost events), so that a pass needs no `@stats_list` (costly for a
    /// file with thousands of regions). Polling lists every pass, as lvm2 does.
    /// Boxed, as `emptied` is: most monitors of a watch have no group, and a watch of
    /// thousands of files keeps one monitor each.
    known_group: Option<Box<Group>>,
    /// Polling: when the next whole-map read is due whatever stat says ([`SWEEP`]).
    next_sweep: Instant,
    /// The followed file's owner: path mode takes a replacement only from the same owner.
    owner: u32,
    /// Path mode: what the path named when a replacement was last refused (not retried, and
    /// not warned about again, until the path names something else).
    refused: Option<FileId>,
    /// How the monitor wakes, for the metrics (polling says why).
    wakeup: Wakeup,
    /// Where passes publish the group and tally for `--metrics`.
    report: Option<Reporter>,
    /// Where the file's blocks lie on its dm device (eBPF trigger only).
    placement: Option<filemapd_common::Placement>,
    /// `filemapd trace`: the kernel time of the oldest event no pass has answered yet.
    oldest_event_ns: Option<u64>,
    /// The group's settings when the monitor started: its histogram bounds are the kernel
    /// histogram's.
    settings: RegionSettings,
    /// In a watch: a file left with no extents (truncated to empty, about to be written
    /// anew) loses its group, whose regions lie on blocks it gave back, and gets a new one
    /// like it once it has blocks again, instead of ending the monitor (lvm2's way).
    regroup_when_refilled: bool,
    /// The lost group's alias, program id and settings, until the file has blocks again.
    emptied: Option<Box<GroupSpec>>,
    /// The in-kernel counting: every sector the file held at the last pass (what the sector
    /// map was set to), the device ranges events named since (allocations the kernel
    /// recorded, which FIEMAP may no longer show), and whether events were lost (the kernel
    /// may then hold the file's sectors anywhere).
    kernel_map: KernelMap,
}

/// What the monitor knows of its file's place in the kernel's sector map.
#[derive(Default)]
struct KernelMap {
    synced: Vec<SectorRange>,
    /// The version of the view's placed sectors (`ExtentMap::placed_version`) that `synced`
    /// holds; `None` when the last sync left some out.
    synced_version: Option<u64>,
    recorded: Vec<SectorRange>,
    unknown: bool,
}

impl Monitor {
    /// Takes over the descriptor dmstats passed and checks everything that can be checked
    /// before the daemon detaches: the file, its device, the group.
    pub fn new(args: &DaemonArgs, interval: Duration) -> anyhow::Result<Self> {
        // SAFETY: fstat succeeds only on an open descriptor, which we then own: dmstats opened
        // it for us and keeps no use of it.
        nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(args.fd) })
            .with_context(|| format!("file descriptor {} is not open", args.fd))?;
        let file = unsafe { File::from_raw_fd(args.fd) };
        Self::with_file(
            file,
            &args.path,
            Some(args.group_id),
            args.mode,
            interval,
            &mut Devices::default(),
        )
    }

    /// Opens the file itself (for `filemapd watch`), sharing device handles through `devices`.
    /// Without a group, only the kernel counts the file (see [`Monitor::use_ebpf`]).
    pub fn open(
        path: &Path,
        group_id: Option<u64>,
        mode: FollowMode,
        interval: Duration,
        devices: &mut Devices,
    ) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // Path mode follows the file's own name: a symlink in the config is resolved once, here
        // (a symlink put at the path later is refused, see `follow::reopen`).
        let path = match mode {
            FollowMode::Path => &std::fs::canonicalize(path)
                .with_context(|| format!("resolving {}", path.display()))?,
            FollowMode::Inode => path,
        };
        Self::with_file(file, path, group_id, mode, interval, devices)
    }

    /// Takes over a file another process opened (a dmstats-launched daemon's hand-over).
    pub fn from_file(
        file: File,
        path: &Path,
        group_id: u64,
        mode: FollowMode,
        interval: Duration,
    ) -> anyhow::Result<Self> {
        Self::with_file(
            file,
            path,
            Some(group_id),
            mode,
            interval,
            &mut Devices::default(),
        )
    }

    fn with_file(
        file: File,
        path: &Path,
        group_id: Option<u64>,
        mode: FollowMode,
        interval: Duration,
        devices: &mut Devices,
    ) -> anyhow::Result<Self> {
        let metadata = check_mappable(&file, path)?;
        let device = devices
            .for_st_dev(metadata.dev())
            .with_context(|| format!("{} is not on a device-mapper device", path.display()))?;
        let group = match group_id {
            Some(id) => match devices.group_at_start(metadata.dev(), id)? {
                Some(group) => Some(group),
                None => bail!("group {id} does not exist on {}", device.name()),
            },
            None => None,
        };
        let settings = group
            .as_ref()
            .map(|g| g.settings.clone())
            .unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            mode,
            file_id: FileId::of(&metadata),
            file,
            device,
            group_id,
            interval,
            mapping: Mapping::Tiled,
            trigger: Trigger::Poll,
            view: FileView::default(),
            recheck: None,
            regions_changed: false,
            pacer: Pacer::default(),
            io_seen: None,
            tally: Tally::default(),
            // The first pass starts from the group just found.
            known_group: group.map(Box::new),
            next_sweep: Instant::now() + SWEEP,
            owner: metadata.uid(),
            refused: None,
            wakeup: Wakeup::Polling("eBPF not asked for"),
            report: None,
            placement: None,
            oldest_event_ns: None,
            settings,
            regroup_when_refilled: false,
            emptied: None,
            kernel_map: KernelMap::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The group and device, as a log line names them.
    pub fn describe(&self) -> String {
        match self.group_id {
            Some(id) => format!("group {id} on {}", self.device.name()),
            None => format!("no regions, on {}", self.device.name()),
        }
    }

    /// Deletes the group (its other members first, the leader last); for a watch whose file
    /// is gone. Returns how many regions went (none without a group).
    pub fn delete_group(&self) -> anyhow::Result<usize> {
        let Some(id) = self.group_id else {
            return Ok(0);
        };
        let regions = self.device.list(None)?;
        crate::stats::new_group::delete(&self.device, &regions, id)
    }

    /// A file left with no extents keeps its monitor: its group goes, and a new one like it
    /// is made once the file has blocks again (see `regroup_when_refilled`).
    pub fn regroup_when_refilled(&mut self) {
        self.regroup_when_refilled = true;
    }

    /// The group's alias as found at start-up (`None` without a group).
    pub fn alias(&self) -> Option<String> {
        self.known_group
            .as_ref()
            .map(|g| g.descriptor.alias.clone())
    }

    /// How many regions the group had when it was found at start-up (0 without a group).
    pub fn regions_at_start(&self) -> usize {
        self.known_group.as_ref().map_or(0, |g| g.member_count())
    }

    /// Whether the file has a group of regions.
    pub fn has_group(&self) -> bool {
        self.group_id.is_some()
    }

    /// A file without a group: the kernel histogram's bounds come from these settings (the
    /// `[[path]]`'s `bounds`).
    pub fn use_histogram_of(&mut self, settings: RegionSettings) {
        if self.group_id.is_none() {
            self.settings = settings;
        }
    }

    /// Keeps lvm2's mapping, one region per extent (a grown extent's region is replaced and
    /// its counters lost), instead of tiles.
    pub fn use_exact_mapping(&mut self) {
        self.mapping = Mapping::Exact;
    }

    /// Publishes the group and what the monitor did after each pass that updated it.
    pub fn report_to(&mut self, reporter: Reporter) {
        self.report = Some(reporter);
    }

    /// Why this monitor polls, when the eBPF trigger was asked for but could not be had.
    pub fn polling_because(&mut self, reason: &'static str) {
        self.wakeup = Wakeup::Polling(reason);
    }

    /// What the monitor did so far.
    pub fn tally(&self) -> Tally {
        self.tally
    }

    /// Switches to the eBPF trigger: the hub's programs now wake this monitor for its inode.
    /// With `notifier` too (and a hub that sees region changes), nothing else wakes it.
    /// A file on a file system none of the programs watch keeps polling (said once).
    pub async fn use_ebpf(&mut self, hub: &Hub, notifier: Option<&Notifier>) -> anyhow::Result<()> {
        let category = tracepoint_category(&self.file);
        if !category.is_some_and(|c| hub.covers(c)) {
            warn!(
                "{}: no eBPF tracepoint reports allocations on its file system ({}): polling every {:?}",
                self.path.display(),
                category.unwrap_or("unsupported"),
                self.interval
            );
            self.wakeup = Wakeup::Polling("no tracepoint for its file system");
            return Ok(());
        }
        self.placement = self.placement();
        let feed = match hub
            .watch(
                self.file_id.inode_key(),
                &self.path,
                self.placement,
                self.histogram_bounds(),
                Default::default(),
            )
            .await
        {
            Ok(feed) => Box::new(feed),
            Err(e) => {
                warn!(
                    "{}: the kernel filter has no room for it ({e:#}): polling every {:?}",
                    self.path.display(),
                    self.interval
                );
                self.wakeup = Wakeup::Polling("kernel filter full");
                return Ok(());
            }
        };
        if self.group_id.is_none() {
            if let Some(why) = self.not_counted(hub, &feed) {
                bail!("--regions none: {why}");
            }
            self.ensure_hook(hub.counting().map(|c| &**c));
        }
        let notices = match notifier.filter(|_| hub.sees_region_changes()) {
            Some(notifier) => Some(notifier.watch(&self.path, self.mode == FollowMode::Path)?),
            None => None,
        };
        self.trigger = Trigger::Ebpf {
            hub: hub.clone(),
            feed,
            notices,
        };
        self.wakeup = Wakeup::Events;
        self.prime_kernel_map().await
    }

    /// Puts the file's sectors in the kernel's map at once, before the monitor says it is up:
    /// the kernel records what the file allocates from now on, FIEMAP shows what it had.
    /// Then `filemapd report` lists the file.
    async fn prime_kernel_map(&mut self) -> anyhow::Result<()> {
        if self.counted().is_none() {
            return Ok(());
        }
        let read_at = crate::wake::ebpf::counting::Reading::now();
        self.view.read(&self.file, &self.path, false)?;
        self.sync_kernel_map(read_at);
        if let (Trigger::Ebpf { hub, .. }, Some(placement)) = (&self.trigger, self.placement) {
            hub.name(self.file_id.inode_key(), placement.generation, &self.path)
                .await;
        }
        Ok(())
    }

    /// Why the kernel does not count the file through `feed`, if it does not.
    fn not_counted(&self, hub: &Hub, feed: &EventFeed) -> Option<String> {
        if feed.counted().is_some() {
            return None;
        }
        Some(match (hub.counting(), &self.placement) {
            (None, _) => format!(
                "the kernel cannot count here ({})",
                hub.counting_unavailable().unwrap_or("no counting")
            ),
            (Some(_), None) => "the kernel cannot count this file's IO (said above)".to_string(),
            (Some(_), Some(_)) => "no room for it in the kernel's counters".to_string(),
        })
    }

    /// Makes sure the device has the region that keeps dm-stats' accounting, where the kernel
    /// counts, running (see [`crate::stats::hook`]), when `counting` counts there (the bio
    /// hook needs no region); said when it cannot.
    fn ensure_hook(&self, counting: Option<&Counting>) {
        if !counting.is_some_and(Counting::needs_region) {
            return;
        }
        match crate::stats::hook::ensure(&self.device) {
            Ok(true) => info!(
                "{}: made the region that keeps dm-stats' accounting on",
                self.device.name()
            ),
            Ok(false) => {}
            Err(e) => warn!(
                "{}: no region keeps dm-stats' accounting on, the kernel counts nothing on it: {e:#}",
                self.device.name()
            ),
        }
    }

    /// Where the file's blocks lie, for the in-kernel counting; `None` (said why) when that
    /// cannot be told.
    fn placement(&self) -> Option<filemapd_common::Placement> {
        match crate::file::placement::of(&self.file, self.file_id) {
            Ok(placement) => Some(placement),
            Err(e) => {
                warn!(
                    "{}: no in-kernel counting of its IO: {e:#}",
                    self.path.display()
                );
                None
            }
        }
    }

    /// The kernel histogram's bounds: the group's (dmstats --bounds), else powers of two.
    fn histogram_bounds(&self) -> filemapd_common::Bounds {
        let bounds = self.settings.bounds_ns();
        if bounds.is_empty() {
            return filemapd_common::Bounds::default();
        }
        filemapd_common::Bounds::from_ns(&bounds).unwrap_or_else(|| {
            warn!(
                "{}: the group's {} histogram bounds are more than the kernel's histogram holds ({}): it counts by powers of two",
                self.path.display(),
                bounds.len(),
                filemapd_common::MAX_BOUNDS
            );
            filemapd_common::Bounds::default()
        })
    }

    /// The file's slot in the in-kernel counting, when it has one.
    fn counted(&self) -> Option<&CountedFile> {
        match &self.trigger {
            Trigger::Ebpf { feed, .. } => feed.counted(),
            Trigger::Poll => None,
        }
    }

    /// The in-kernel counting this monitor's file is in, if any.
    pub fn counting(&self) -> Option<&Counting> {
        self.counted().map(CountedFile::counting)
    }

    /// All of the file's IO as the kernel counted it, when it counts this file.
    pub fn kernel_counters(&self) -> Option<filemapd_common::FileCounters> {
        match self.counted()?.counters() {
            Ok(counters) => Some(counters),
            Err(e) => {
                warn!(
                    "reading the in-kernel counters of {}: {e:#}",
                    self.path.display()
                );
                None
            }
        }
    }

    /// Whether only events wake this monitor (no interval timer at all).
    pub fn event_driven(&self) -> bool {
        matches!(
            self.trigger,
            Trigger::Ebpf {
                notices: Some(_),
                ..
            }
        )
    }

    /// Descriptors the daemon still needs after detaching.
    pub fn open_fds(&self) -> Vec<i32> {
        vec![self.file.as_raw_fd(), self.device.control_fd()]
    }

    /// Keeps the group in step until it, or the file, goes; or until SIGTERM, which ends the
    /// daemon between passes (a pass has no await point, so it is never cut short).
    pub async fn run_until_terminated(&mut self) -> anyhow::Result<Exit> {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let terminated = std::pin::pin!(async move {
            terminate.recv().await;
        });
        self.run_until_stopped(terminated).await
    }

    /// Runs until the file's monitoring ends, or until `stop` completes: the daemon is being
    /// stopped to be started again (a restart, an upgrade), and what the kernel counted waits
    /// for the next one. A watch gives each of its monitors the same stop, not a SIGTERM
    /// listener each.
    pub async fn run_until_stopped(
        &mut self,
        stop: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<Exit> {
        tokio::select! {
            exit = self.run() => exit,
            () = stop => {
                crate::wake::ebpf::pins::keep_for_successor();
                Ok(Exit::Terminated)
            }
        }
    }

    pub async fn run(&mut self) -> anyhow::Result<Exit> {
        loop {
            let exit = match self.group_id {
                None => self.run_without_group().await?,
                Some(_) => self.run_with_group().await?,
            };
            match exit {
                Exit::NoExtents if self.regroup_when_refilled => self.let_emptied_group_go()?,
                // A group was made for the file's new blocks: follow it.
                Exit::Refilled => {}
                exit => return Ok(exit),
            }
        }
    }

    /// The file has no extents: its group's regions lie on blocks it gave back, where they
    /// would count other files' IO. The group goes; what the kernel counts for the file goes
    /// on, and a group like it comes back with the file's next blocks.
    fn let_emptied_group_go(&mut self) -> anyhow::Result<()> {
        let deleted = self.delete_group()?;
        info!(
            "{}: no extents left: its group ({deleted} region(s)) goes until it has blocks again",
            self.path.display()
        );
        self.group_id = None;
        self.known_group = None;
        if self.kernel_counters().is_some() {
            self.ensure_hook(self.counting());
        }
        Ok(())
    }

    /// The file of a group let go at emptiness has blocks again: a group like the old one
    /// for them, made as dmstats makes one. Returns whether it was made.
    fn regroup(&mut self) -> anyhow::Result<bool> {
        let Some(spec) = &self.emptied else {
            return Ok(false);
        };
        // The pass's own reading says whether there are blocks: a synced FIEMAP only then.
        if self.view.map().is_empty() {
            return Ok(false);
        }
        let extents = crate::file::view::data_ranges(&self.file, true)?;
        if extents.is_empty() {
            return Ok(false);
        }
        let id = crate::stats::new_group::create(&self.device, &extents, spec, self.file_id)?;
        info!(
            "{}: has blocks again: group {id} made with {} region(s)",
            self.path.display(),
            extents.len()
        );
        self.emptied = None;
        self.group_id = Some(id);
        self.known_group = None;
        Ok(true)
    }

    async fn run_with_group(&mut self) -> anyhow::Result<Exit> {
        let mut force = true;
        loop {
            let remembered = self.known_group.is_some();
            let group = match self.known_group.take() {
                Some(group) => *group,
                None => match Group::load(&self.device, self.group_id.expect("a group"))? {
                    Some(group) => group,
                    None => return Ok(Exit::GroupRemoved),
                },
            };
            self.group_id = Some(group.id);
            if self.mode == FollowMode::Path && self.follow_path()? {
                Box::pin(self.watch_new_inode()).await?;
                force = true;
            }
            if self.sweep_due() {
                self.view.note_unknown_change();
                force = true;
            }
            let group = if force || self.view.changed(&self.file)? {
                let started = Instant::now();
                let Some(group) = self.update(group, remembered)? else {
                    return Ok(Exit::NoExtents);
                };
                if let Some(report) = &self.report {
                    report.observe_update(started.elapsed());
                    report.publish(
                        &self.path,
                        &self.device,
                        (&group, self.mapping),
                        self.tally,
                        self.wakeup,
                        self.counted(),
                    );
                }
                group
            } else {
                group
            };
            // Not held across the wait, where each file's task would keep room for it.
            if self.event_driven() {
                self.known_group = Some(Box::new(group));
            } else {
                drop(group);
            }
            force = self.wait().await?;
            if self.unlinked_and_closed()? {
                return Ok(Exit::UnlinkedAndClosed);
            }
        }
    }

    /// Whether the file (followed by inode) is unlinked and no other process holds it open.
    fn unlinked_and_closed(&self) -> anyhow::Result<bool> {
        if self.mode != FollowMode::Inode || !follow::unlinked(&self.file)? {
            return Ok(false);
        }
        if follow::held_elsewhere(self.file_id) {
            debug!(
                "{} is unlinked but held by another process",
                self.path.display()
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// The loop of a file without regions: the kernel's map of it kept in step, until it is
    /// unlinked and closed (inode mode) or SIGTERM. A file with no extents is kept watched.
    async fn run_without_group(&mut self) -> anyhow::Result<Exit> {
        let mut force = true;
        loop {
            if self.mode == FollowMode::Path && self.follow_path()? {
                Box::pin(self.watch_new_inode()).await?;
                force = true;
            }
            // Another process deleted regions: perhaps the hook.
            if std::mem::take(&mut self.regions_changed) {
                self.ensure_hook(self.counting());
            }
            if force || self.view.changed(&self.file)? {
                let started = Instant::now();
                self.count_only_pass()?;
                if self.regroup()? {
                    return Ok(Exit::Refilled);
                }
                if let Some(report) = &self.report {
                    report.observe_update(started.elapsed());
                    report.publish_without_regions(
                        &self.path,
                        self.device.name(),
                        self.tally,
                        self.wakeup,
                        self.counted(),
                    );
                }
            }
            force = self.wait().await?;
            if self.unlinked_and_closed()? {
                return Ok(Exit::UnlinkedAndClosed);
            }
        }
    }

    /// Path mode, after a switch: the kernel filter follows the new inode, or, when it has
    /// no room for it, the monitor polls from now on (said once). Awaited boxed: a rare step
    /// whose future would otherwise size every idle monitor's task (thousands of them).
    async fn watch_new_inode(&mut self) -> anyhow::Result<()> {
        if !matches!(self.trigger, Trigger::Ebpf { .. }) {
            return Ok(());
        }
        self.placement = self.placement();
        self.kernel_map = KernelMap::default();
        let bounds = self.histogram_bounds();
        let Trigger::Ebpf { hub, feed, notices } = &mut self.trigger else {
            return Ok(());
        };
        match hub
            .watch(
                self.file_id.inode_key(),
                &self.path,
                self.placement,
                bounds,
                Default::default(),
            )
            .await
        {
            Ok(new_feed) => {
                // Dropping the old feed unwatches the old inode.
                **feed = new_feed;
                if let Some(notices) = notices {
                    *notices = notices.notifier().watch(&self.path, true)?;
                }
                self.prime_kernel_map().await?;
            }
            Err(e) => {
                warn!(
                    "{}: the kernel filter has no room for the new file ({e:#}): polling every {:?}",
                    self.path.display(),
                    self.interval
                );
                self.trigger = Trigger::Poll;
                self.wakeup = Wakeup::Polling("kernel filter full");
            }
        }
        Ok(())
    }

    /// Polling: whether the whole extent map is due for a read ([`SWEEP`]).
    fn sweep_due(&mut self) -> bool {
        let now = Instant::now();
        if self.event_driven() || now < self.next_sweep {
            return false;
        }
        self.next_sweep = now + SWEEP;
        true
    }

    /// Path mode: if the path now names another file, switch to it, unless it is refused
    /// (see [`follow::reopen`]): then the group stays on the file it had, said once per file.
    /// Returns whether it switched.
    fn follow_path(&mut self) -> anyhow::Result<bool> {
        let now_there = follow::id_at(&self.path);
        if now_there == Some(self.file_id) || (now_there.is_some() && now_there == self.refused) {
            return Ok(false);
        }
        let replacement = match follow::reopen(&self.path, self.file_id.st_dev, self.owner)? {
            Ok(replacement) => replacement,
            Err(reason) => {
                warn!(
                    "{}: not following the file now at this path ({reason}); the group stays on the file it had",
                    self.path.display()
                );
                self.refused = now_there;
                return Ok(false);
            }
        };
        let id = FileId::of(&replacement.metadata);
        info!(
            "{} was replaced (inode {} -> {})",
            self.path.display(),
            self.file_id.ino,
            id.ino
        );
        self.file = replacement.file;
        self.file_id = id;
        self.refused = None;
        self.view.reset();
        Ok(true)
    }
}
