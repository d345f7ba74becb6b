//! The daemon: one file, one group, one loop. Each pass: is the group still there, does the
//! file (or, in path mode, the file at the path) still match its regions, wait, is the file
//! gone. All dm and FIEMAP details live in other modules.
use std::{
    collections::HashMap,
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
    args::{DaemonArgs, FollowMode},
    dmstats::{StatsDevice, region::Region},
    ebpf::{Change, EventFeed, Feed, Hub, Tracepoint},
    file_device::{FileId, check_mappable, tracepoint_category},
    file_view::{FileView, Reading},
    follow,
    group::{Group, counted_nothing},
    notify::{Notices, Notifier},
    pacing::Pacer,
    reconcile::{self, Mapping, Plan},
    sectors::SectorRange,
    tally::Tally,
};

/// Why the daemon stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    GroupRemoved,
    NoExtents,
    UnlinkedAndClosed,
}

impl Exit {
    pub fn message(self) -> &'static str {
        match self {
            Exit::GroupRemoved => "Filemap group removed: exiting.",
            Exit::NoExtents => "File contains no extents: exiting.",
            Exit::UnlinkedAndClosed => "File unlinked and closed: exiting.",
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
        feed: EventFeed,
        notices: Option<Notices>,
    },
}

/// The dm devices of the files a process monitors, opened once each (one control descriptor
/// per device, however many files live on it), and each device's region listing as it was
/// when the monitors started: a thousand files on one device need one `@stats_list`, not a
/// thousand.
#[derive(Default)]
pub struct Devices(HashMap<u64, (Arc<StatsDevice>, Option<Vec<Region>>)>);

impl Devices {
    pub fn for_st_dev(&mut self, st_dev: u64) -> anyhow::Result<Arc<StatsDevice>> {
        if let Some((device, _)) = self.0.get(&st_dev) {
            return Ok(Arc::clone(device));
        }
        let device = Arc::new(StatsDevice::for_st_dev(st_dev)?);
        self.0.insert(st_dev, (Arc::clone(&device), None));
        Ok(device)
    }

    /// The group as the start-up listing of its device shows it.
    fn group_at_start(&mut self, st_dev: u64, group_id: u64) -> anyhow::Result<Option<Group>> {
        let device = self.for_st_dev(st_dev)?;
        let (_, listing) = self.0.get_mut(&st_dev).expect("opened above");
        if listing.is_none() {
            *listing = Some(device.list(None)?);
        }
        Group::load_from(&device, listing.as_deref().unwrap_or_default(), group_id)
    }
}

/// How soon to look again after an event whose effect FIEMAP did not show yet (the tracepoints
/// fire while the file system is still inserting or removing the extent).
const SETTLE: Duration = Duration::from_millis(10);
/// How many such looks before giving up on an event's range (then the next event or change of
/// size catches up).
const SETTLE_TRIES: u32 = 100;
/// After another process deleted or relabelled regions, how long to let it finish (dmstats
/// deletes a group region by region) before looking at the group.
const REGIONS_QUIET: Duration = Duration::from_millis(100);

pub struct Monitor {
    path: PathBuf,
    mode: FollowMode,
    file: File,
    file_id: FileId,
    device: Arc<StatsDevice>,
    group_id: u64,
    interval: Duration,
    mapping: Mapping,
    trigger: Trigger,
    /// The file's extents as last read and what events said changed since.
    view: FileView,
    /// When to look at the file again regardless of its size (after events).
    recheck: Option<(Instant, u32)>,
    /// The recheck is for another process's region changes: not paced.
    regions_changed: bool,
    /// Region creations' budget of device time.
    pacer: Pacer,
    tally: Tally,
    /// The group as found at start-up for the first pass; afterwards, in event-driven mode
    /// only, as the last pass left it. Trusted until the kernel reports another process's
    /// region change (or lost events), so that a pass needs no `@stats_list` (costly for a
    /// file with thousands of regions). Polling lists every pass, as lvm2 does.
    known_group: Option<Group>,
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
            args.group_id,
            args.mode,
            interval,
            &mut Devices::default(),
        )
    }

    /// Opens the file itself (for `filemapd watch`), sharing device handles through `devices`.
    pub fn open(
        path: &Path,
        group_id: u64,
        mode: FollowMode,
        interval: Duration,
        devices: &mut Devices,
    ) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Self::with_file(file, path, group_id, mode, interval, devices)
    }

    fn with_file(
        file: File,
        path: &Path,
        group_id: u64,
        mode: FollowMode,
        interval: Duration,
        devices: &mut Devices,
    ) -> anyhow::Result<Self> {
        let metadata = check_mappable(&file, path)?;
        let device = devices
            .for_st_dev(metadata.dev())
            .with_context(|| format!("{} is not on a device-mapper device", path.display()))?;
        let Some(group) = devices.group_at_start(metadata.dev(), group_id)? else {
            bail!("group {group_id} does not exist on {}", device.name());
        };
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
            tally: Tally::default(),
            // The first pass starts from the group just found.
            known_group: Some(group),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps lvm2's mapping, one region per extent (a grown extent's region is replaced and
    /// its counters lost), instead of tiles.
    pub fn use_exact_mapping(&mut self) {
        self.mapping = Mapping::Exact;
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
            return Ok(());
        }
        let feed = hub.watch(self.file_id.inode_key()).await?;
        let notices = match notifier.filter(|_| hub.sees_region_changes()) {
            Some(notifier) => Some(notifier.watch(&self.path, self.mode == FollowMode::Path)?),
            None => None,
        };
        self.trigger = Trigger::Ebpf {
            hub: hub.clone(),
            feed,
            notices,
        };
        Ok(())
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

    pub async fn run(&mut self) -> anyhow::Result<Exit> {
        let mut force = true;
        loop {
            let remembered = self.known_group.is_some();
            let group = match self.known_group.take() {
                Some(group) => group,
                None => match Group::load(&self.device, self.group_id)? {
                    Some(group) => group,
                    None => return Ok(Exit::GroupRemoved),
                },
            };
            self.group_id = group.id;
            if self.mode == FollowMode::Path && self.follow_path()? {
                if let Trigger::Ebpf { hub, feed, notices } = &mut self.trigger {
                    // Dropping the old feed unwatches the old inode.
                    *feed = hub.watch(self.file_id.inode_key()).await?;
                    if let Some(notices) = notices {
                        *notices = notices.notifier().watch(&self.path, true)?;
                    }
                }
                force = true;
            }
            let group = if force || self.view.changed(&self.file)? {
                match self.update(group, remembered)? {
                    Some(group) => group,
                    None => return Ok(Exit::NoExtents),
                }
            } else {
                group
            };
            if self.event_driven() {
                self.known_group = Some(group);
            }
            force = self.wait().await?;
            if self.mode == FollowMode::Inode && follow::unlinked(&self.file)? {
                if !follow::held_elsewhere(self.file_id) {
                    return Ok(Exit::UnlinkedAndClosed);
                }
                debug!(
                    "{} is unlinked but held by another process",
                    self.path.display()
                );
            }
        }
    }

    /// Sleeps until the next check; true when the file must be mapped again whatever its size
    /// says (events arrived, or a recheck after events is due). A pass that is due waits while
    /// region creations have spent their budget (see [`crate::pacing`]); events arriving
    /// meanwhile join it.
    async fn wait(&mut self) -> anyhow::Result<bool> {
        let mut pass_due: Option<Instant> = None;
        let mut paced = false;
        loop {
            let now = Instant::now();
            let recheck_due = self.recheck.map(|(at, _)| at);
            let event_driven = self.event_driven();
            let due = pass_due.into_iter().chain(recheck_due).min();
            let deadline = due.map(|due| {
                if self.regions_changed {
                    return due;
                }
                let ready = self.pacer.ready_at(now);
                if ready > due && !paced {
                    paced = true;
                    self.tally.paced += 1;
                }
                due.max(ready)
            });
            if pass_due.is_some() && deadline.is_some_and(|at| at <= now) {
                return Ok(true);
            }
            let deadline = deadline
                .or((!event_driven).then(|| now + self.interval))
                .map(tokio::time::Instant::from);
            let Trigger::Ebpf { feed, notices, .. } = &mut self.trigger else {
                debug!("Waiting for check interval");
                tokio::time::sleep_until(deadline.expect("polling has a deadline")).await;
                return Ok(recheck_due.is_some());
            };
            let notice = async {
                match notices {
                    Some(notices) => notices.next().await,
                    None => std::future::pending().await,
                }
            };
            let timer = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                batch = feed.next() => {
                    if self.take_events(batch?)? {
                        pass_due.get_or_insert(Instant::now());
                    }
                    // Only region changes: wait for them to be over.
                }
                notice = notice => {
                    notice?;
                    return Ok(false);
                }
                _ = timer => return Ok(pass_due.is_some() || recheck_due.is_some()),
            }
        }
    }

    /// Notes what a batch of events says changed, and arranges a look shortly after. Returns
    /// whether the file's extents may have changed (not only other processes' regions).
    fn take_events(&mut self, batch: Vec<Feed>) -> anyhow::Result<bool> {
        let block_size = self.file.metadata()?.blksize();
        let mut extents_changed = false;
        for item in batch {
            match item {
                Feed::Lost => {
                    // Events were lost: read the whole file, list the group again.
                    self.view.note_unknown_change();
                    self.known_group = None;
                    extents_changed = true;
                }
                Feed::RegionsChanged => {
                    self.known_group = None;
                    self.regions_changed = true;
                    // Look again once the other process is done (each change postpones).
                    let at = Instant::now() + REGIONS_QUIET;
                    self.recheck = Some((at, SETTLE_TRIES));
                }
                Feed::Event(event) => {
                    let Some(tp) = Tracepoint::by_index(event.source) else {
                        continue;
                    };
                    let (start, len) = tp.byte_range(event.start, event.length, block_size);
                    debug!("event {}: {:?} bytes {start}+{len}", tp.name, tp.change);
                    self.view
                        .note_event(start, len, tp.change == Change::Allocated);
                    self.tally.events += 1;
                    extents_changed = true;
                }
            }
        }
        if extents_changed {
            // Removals fire before the blocks go: look once more shortly after.
            self.recheck = Some((Instant::now() + SETTLE, SETTLE_TRIES));
        }
        Ok(extents_changed)
    }

    /// Maps the file and brings the group in line. Returns the group as it is now, or `None`
    /// when the file has no extents. `remembered`: the group is as the last update left it,
    /// so a change that events confined to a stretch of the file is planned there alone.
    fn update(&mut self, group: Group, remembered: bool) -> anyhow::Result<Option<Group>> {
        self.tally.passes += 1;
        self.regions_changed = false;
        let reading = self.view.read(&self.file, &self.path, remembered)?;
        self.settle();
        if self.view.map().is_empty() {
            return Ok(None);
        }
        let plan = match reading {
            Reading::Stretch(change) if change.unchanged => return Ok(Some(group)),
            Reading::Stretch(change) => {
                let mut near: Vec<SectorRange> = change.before.clone();
                near.extend(&change.after);
                let members = group.places_near(&near);
                reconcile::plan_window(&members, &change.before, &change.after, self.mapping)
            }
            Reading::Whole => None,
        };
        let plan = match plan {
            Some(plan) => plan,
            None => match self.whole_plan(&group) {
                Some(plan) => plan,
                None => return Ok(Some(group)),
            },
        };
        let outcome = group.apply(&self.device, &plan, &counted_nothing)?;
        self.pacer.charge(outcome.creating, Instant::now());
        self.tally.created += outcome.created as u64;
        self.tally.deleted += outcome.deleted as u64;
        self.tally.fused += outcome.fused as u64;
        if outcome.created + outcome.deleted > 0 {
            info!(
                "Updated group {}: {} region(s), {} created, {} deleted",
                outcome.group.id,
                outcome.group.member_count(),
                outcome.created,
                outcome.deleted
            );
        }
        self.group_id = outcome.group.id;
        if cfg!(debug_assertions) && self.event_driven() {
            self.check_remembered(&outcome.group)?;
        }
        Ok(Some(outcome.group))
    }

    /// A plan over every extent and region; `None` while no extent has a place yet.
    fn whole_plan(&mut self, group: &Group) -> Option<Plan> {
        self.tally.whole_passes += 1;
        let ranges = self.view.map().device_ranges();
        if ranges.is_empty() {
            debug!("all extents of {} await allocation", self.path.display());
            return None;
        }
        Some(reconcile::plan(&group.places(), &ranges, self.mapping))
    }

    /// Debug builds (the tests): the group as an update says it left it must be what the
    /// kernel lists, or the event-driven mode, which lists only after others' changes, drifts.
    fn check_remembered(&self, remembered: &Group) -> anyhow::Result<()> {
        let listed = Group::load(&self.device, remembered.id)?;
        let fields = |g: &Group| -> Vec<(u64, SectorRange, String)> {
            g.members()
                .map(|r| (r.id, r.range, r.aux_data.clone()))
                .collect()
        };
        let listed = listed.as_ref().map(fields);
        if listed.as_ref() != Some(&fields(remembered)) {
            bail!(
                "group {} as remembered differs from the kernel's listing:\n  remembered {:?}\n  listed {:?}",
                remembered.id,
                fields(remembered),
                listed
            );
        }
        Ok(())
    }

    /// Decides whether to look again soon after events: while their ranges have not shown
    /// placed in FIEMAP, for at most SETTLE_TRIES looks.
    fn settle(&mut self) {
        self.recheck = match self.recheck.take() {
            None => None,
            Some((_, 0)) => {
                if !self.view.unsettled().is_empty() {
                    debug!(
                        "event ranges {:?} never showed in FIEMAP; giving up on them",
                        self.view.unsettled()
                    );
                }
                None
            }
            // The first look after events is always followed by one more (removals fire before
            // the blocks go); after that, look again only while event ranges are outstanding.
            Some((_, tries)) if tries < SETTLE_TRIES && self.view.unsettled().is_empty() => None,
            Some((_, tries)) => Some((Instant::now() + SETTLE, tries - 1)),
        };
        if self.recheck.is_none() {
            self.view.forget_span();
        }
    }

    /// Path mode: if the path now names another file, switch to it (same device only).
    /// Returns whether it switched.
    fn follow_path(&mut self) -> anyhow::Result<bool> {
        if follow::id_at(&self.path) == Some(self.file_id) {
            return Ok(false);
        }
        let file = follow::reopen(&self.path)?;
        let metadata = check_mappable(&file, &self.path)?;
        let id = FileId::of(&metadata);
        if id.st_dev != self.file_id.st_dev {
            bail!("{} moved to another device", self.path.display());
        }
        info!(
            "{} was replaced (inode {} -> {})",
            self.path.display(),
            self.file_id.ino,
            id.ino
        );
        self.file = file;
        self.file_id = id;
        self.view.reset();
        Ok(true)
    }
}
