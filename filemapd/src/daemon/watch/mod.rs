//! `filemapd watch [--config FILE] [PATH...]`: one process and one set of eBPF programs for
//! many (file, group) pairs, as a VM host with many images wants: what to watch comes from
//! [`config`] and [`paths`]; here, a task per file, reloads, new files in directories, ends.
mod check;
mod config;
mod handed_record;
mod handoffs;
mod new_files;
mod paths;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{error, info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::{AbortHandle, JoinError, JoinSet},
};

use crate::{
    daemon::handoff,
    daemon::metrics::{self, Board},
    daemon::monitor::{Exit, Monitor},
    daemon::regions::Regions,
    reconcile::Mapping,
    stats::Devices,
    wake::ebpf::{DEFAULT_MAP_EXTENTS, Hub, IoHook, Tracer, tables_for_extents, tables_size},
    wake::notify::Notifier,
};

pub use config::{Config, PathSpec, WatchEntry, one_word, parse_config, parse_toml, read_config};
use handed_record::Recorded;
use handoffs::Offer;
use new_files::NewFiles;
pub use paths::{Resolved, resolve};
use paths::{entry_for, files_under};

/// Room in the kernel filter beyond twice the files at start (a path-mode monitor watches its
/// new file before letting the old go), for files a reload adds. Past it, files poll.
const FILTER_ROOM: u32 = 4096;

/// What `filemapd watch` was asked to do.
pub struct Options {
    pub config: Option<PathBuf>,
    /// The command line's PATHs, each with the command line's options for them.
    pub paths: Vec<PathSpec>,
    pub interval: Duration,
    pub ebpf: bool,
    /// Where files' counters live besides the kernel, unless their `[[path]]` says.
    pub regions: Regions,
    /// Where to serve metrics (checked by [`metrics::check_address`]).
    pub metrics: Option<SocketAddr>,
    /// Take over files that dmstats-launched daemons hand over ([`handoff`]).
    pub handoff: bool,
    /// The eBPF programs log what their filter kept or dropped (`filemapd trace --ebpf-log`).
    pub ebpf_log: bool,
    /// Which programs count the files' IO (`--io-hook`, over the config's `io_hook`); `None`:
    /// as [`IoHook`] chooses.
    pub io_hook: Option<IoHook>,
    /// The extents the kernel's sector map is sized for (`--kernel-map-extents`, over the
    /// config's `kernel_map_extents`); `None`: [`DEFAULT_MAP_EXTENTS`].
    pub kernel_map_extents: Option<u32>,
}

/// The option that makes the kernel's counting a condition of the start, as the user spelled
/// it: without the counting, `--regions none` counts nothing and a hook asked for is not had.
fn counting_demanded_by(regions: Regions, io_hook: Option<IoHook>) -> Option<String> {
    match (regions, io_hook) {
        (Regions::None, _) => Some("--regions none".to_string()),
        (_, Some(hook)) => Some(format!("--io-hook {hook}")),
        _ => None,
    }
}

/// Whether the watch loads the eBPF programs: asked to (`--ebpf`), or some file is to be
/// counted by the kernel alone, or an IO hook is asked for.
fn loads_ebpf(asked: bool, files_need_counting: bool, io_hook: Option<IoHook>) -> bool {
    asked || files_need_counting || io_hook.is_some()
}

/// `watch --check-config`: prints what the config and PATHs would have watched, and how, and
/// whether the kernel's programs load here, changing nothing; returns whether every file
/// named can be watched and the watch would start.
pub fn check_config(options: &Options) -> anyhow::Result<bool> {
    check::check(options)
}

/// Why the watch cannot start with the kernel's programs as they loaded (`loaded`): an option
/// that needs the kernel's counting (`demanded`, see [`counting_demanded_by`]) where the
/// kernel cannot count.
fn refusal(loaded: &anyhow::Result<Tracer>, demanded: Option<&str>) -> Option<String> {
    let option = demanded?;
    let why = match loaded {
        Err(e) => format!("{e:#}"),
        Ok(tracer) => tracer.counting_unavailable()?.to_string(),
    };
    Some(format!(
        "{option}: the kernel cannot count the files' IO here: {why}"
    ))
}

/// The extents the kernel's sector map is sized for, and what set them: `--kernel-map-extents`
/// (`asked`, checked when parsed) over the config's `kernel_map_extents` over the default.
fn map_extents(asked: Option<u32>, configured: Option<u32>) -> (u32, &'static str) {
    match (asked, configured) {
        (Some(n), _) => (n, "--kernel-map-extents"),
        (None, Some(n)) => (n, "kernel_map_extents in the config"),
        (None, None) => (DEFAULT_MAP_EXTENTS, "the default"),
    }
}

/// Monitors the config's files until each one's group is gone (or its file is). SIGHUP reads
/// the config again: files no longer named stop being watched (between passes; their groups
/// stay), new ones start; the others go on untouched. SIGTERM ends every monitor between
/// passes, with exit 0. Returns false if any monitor stopped on an error.
pub async fn run(options: Options) -> anyhow::Result<bool> {
    let Options {
        config,
        paths,
        interval,
        ebpf,
        regions,
        metrics,
        handoff,
        ebpf_log,
        io_hook,
        kernel_map_extents,
    } = options;
    let config = config.as_deref();
    let Resolved {
        entries,
        mut directories,
        metrics: configured_metrics,
        handoff: configured_handoff,
        io_hook: configured_io_hook,
        kernel_map_extents: configured_map_extents,
    } = resolve(config, &paths, regions)?;
    let io_hook = io_hook.or(configured_io_hook);
    let (map_extents, _) = map_extents(kernel_map_extents, configured_map_extents);
    // `--handoff` takes hand-overs on the config's socket, or on the one daemons look for.
    let handoff_socket = match (handoff, &configured_handoff) {
        (_, Some(socket)) => Some(socket.clone()),
        (true, None) => Some(std::path::PathBuf::from(handoff::SOCKET)),
        (false, None) => None,
    };
    // The command line's address wins over the config's.
    let metrics = match (metrics, configured_metrics) {
        (Some(address), _) => Some(address),
        (None, Some(configured)) => Some(
            metrics::check_address(configured.address, configured.remote)
                .context("the config's metrics address")?,
        ),
        (None, None) => None,
    };
    // Files without regions are counted by the kernel alone: that needs the eBPF programs.
    let counting_needed = regions == Regions::None
        || entries.iter().any(|e| e.group_id.is_none())
        || directories.iter().any(|d| d.regions == Some(Regions::None));
    let ebpf = loads_ebpf(ebpf, counting_needed, io_hook);
    let source = match config {
        Some(config) => config.display().to_string(),
        None => "the paths given".to_string(),
    };
    raise_open_file_limit();
    crate::memory::map_large_buffers_apart();
    let board = Arc::new(Board::default());
    // Before any file: a port in use fails the start, not a running watch.
    let server = match metrics {
        Some(address) => Some(metrics::serve(address, Arc::clone(&board)).await?),
        None => None,
    };
    let tables = tables_for_extents(map_extents);
    let trigger = if ebpf {
        let loaded = Tracer::load_service(
            2 * entries.len() as u32 + FILTER_ROOM,
            tables,
            ebpf_log,
            io_hook,
        );
        if let Some(refused) = refusal(&loaded, counting_demanded_by(regions, io_hook).as_deref()) {
            bail!("{refused}");
        }
        match loaded {
            Ok(tracer) => Some((Hub::spawn(tracer), Notifier::spawn_or_warn())),
            Err(e) => {
                warn!("eBPF trigger unavailable ({e:#}): polling every {interval:?}");
                None
            }
        }
    } else {
        None
    };
    // Loading parsed the kernel's BTF, now freed.
    crate::memory::give_back_freed();
    if let Some((hub, _)) = &trigger
        && hub.counting_unavailable().is_none()
    {
        info!(
            "the kernel's sector map is sized for {map_extents} scattered extents ({})",
            tables_size(tables)
        );
    }
    let mut watch = Watch {
        interval,
        regions,
        ebpf_unavailable: ebpf && trigger.is_none(),
        trigger,
        board: metrics.map(|_| board),
        tasks: JoinSet::new(),
        watching: HashMap::new(),
        handed: HashMap::new(),
        new_files: NewFiles::default(),
        stop: tokio::sync::watch::channel(false).0,
        all_ok: true,
    };
    // Before anything that takes time: a stop during start-up (or the moment READY=1 is
    // sent) ends the watch as any stop does, once it is up, instead of killing it midway.
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // SIGTERM stops every monitor (through `Watch::stop`), then the watch once they ended.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Before any file and before the watch says it is up: a file made in a directory from now
    // on is counted from its first write, and noticed.
    watch.count_new_files_in(&[], &directories).await;
    watch.new_files.watch(&directories);
    // A file that cannot be watched (gone, not on dm, no group) is said and skipped: one bad
    // line must not leave a host's other images unwatched.
    for entry in &entries {
        if let Err(e) = watch.start(entry).await {
            let why = format!("{e:#}");
            error!("{}: not watched: {why}", entry.path.display());
            watch.new_files.waits(&entry.path, why);
            watch.all_ok = false;
        }
    }
    if watch.watching.is_empty() && !entries.is_empty() {
        bail!("none of the files in {source} can be watched");
    }
    // Files made since the directories were listed, before they were noticed.
    let mut named = entries.len();
    if watch.new_files.are_noticed() {
        named += watch.take_up_new_files(&directories).await;
    }
    if named == 0 {
        info!("{source} names no files yet: waiting for SIGHUP");
    }
    if watch.trigger.is_some() {
        info!("eBPF trigger for {} file(s)", watch.watching.len());
    }
    info!("watching {} file(s)", watch.watching.len());
    let mut offers = match &handoff_socket {
        Some(socket) => Some(handoffs::listen(socket)?),
        None => None,
    };
    if handoff_socket.is_some() {
        watch.take_up_handed_before().await;
    }
    // Every file is taken up: a stopped service's programs, which counted through the
    // restart's gap, stop, and this one's count.
    if let Some((hub, _)) = &watch.trigger {
        hub.take_over().await;
    }
    if let Some(server) = server {
        tokio::spawn(server);
    }
    // systemd's Type=notify: the service is up once every file is watched.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!("could not tell systemd the service is ready: {e}");
    }
    // Files the config names now (`named`): once all of them have ended, so does the watch.
    // With none named it waits for a reload.
    loop {
        tokio::select! {
            Some(joined) = watch.tasks.join_next(), if !watch.tasks.is_empty() => {
                // A file of a directory replaced by rename: its new file is taken up now,
                // not at its next write.
                if watch.ended(joined) == Some(Exit::UnlinkedAndClosed) {
                    named += watch.take_up_new_files(&directories).await;
                }
                // With directories the watch outlives any one file (until SIGTERM).
                let stopping = *watch.stop.borrow();
                if watch.tasks.is_empty() && (stopping || named > 0 && directories.is_empty()) {
                    break;
                }
            }
            _ = hangup.recv() => match resolve(config, &paths, regions) {
                Ok(resolved) => {
                    if resolved.metrics != configured_metrics {
                        warn!("SIGHUP: the config's metrics address changes at the next start, not on reload");
                    }
                    if resolved.handoff != configured_handoff {
                        warn!("SIGHUP: the config's hand-over settings change at the next start, not on reload");
                    }
                    if resolved.kernel_map_extents != configured_map_extents {
                        warn!("SIGHUP: the config's kernel_map_extents changes at the next start, not on reload");
                    }
                    named = resolved.entries.len();
                    watch.reload(&resolved.entries).await;
                    if resolved.directories != directories {
                        watch.count_new_files_in(&directories, &resolved.directories).await;
                        directories = resolved.directories;
                        watch.new_files.watch(&directories);
                    }
                    // The directories' files that wait for their first blocks are heard
                    // again from now on.
                    named += watch.take_up_new_files(&directories).await;
                }
                Err(e) => error!("SIGHUP: keeping the files watched now: {e:#}"),
            },
            _ = terminate.recv() => {
                watch.stop.send_replace(true);
                if watch.tasks.is_empty() {
                    break;
                }
            }
            Some(offer) = next_offer(&mut offers) => watch.take(offer).await,
            noticed = watch.new_files.next() => {
                noticed?;
                named += watch.take_up_new_files(&directories).await;
            }
        }
    }
    if let Some(counting) = watch.trigger.as_ref().and_then(|(hub, _)| hub.counting()) {
        counting.say_io_probe_skips();
    }
    // No daemon of its own follows a handed-over file now: each is named, and the next
    // service takes them up from the record.
    for recorded in watch.handed.values() {
        warn!(
            "{} (group {}): followed by nobody until the service starts again",
            recorded.path.display(),
            recorded.alias
        );
    }
    Ok(watch.all_ok)
}

/// The next hand-over, or never without `--handoff`.
async fn next_offer(offers: &mut Option<tokio::sync::mpsc::Receiver<Offer>>) -> Option<Offer> {
    match offers {
        Some(offers) => offers.recv().await,
        None => std::future::pending().await,
    }
}

/// The files being watched, each by its own task.
struct Watch {
    interval: Duration,
    /// The watch's `--regions`: how files of groups made beforehand map them (tiled when it
    /// is none), and how files a PATH names are kept unless their `[[path]]` says.
    regions: Regions,
    /// --ebpf was given but the programs could not be loaded (every file polls).
    ebpf_unavailable: bool,
    trigger: Option<(Hub, Option<Notifier>)>,
    /// Where monitors publish, when metrics are served.
    board: Option<Arc<Board>>,
    tasks: JoinSet<(WatchEntry, anyhow::Result<Exit>)>,
    watching: HashMap<WatchEntry, AbortHandle>,
    /// Files dmstats-launched daemons handed over, as recorded for a restarted service.
    handed: HashMap<WatchEntry, Recorded>,
    /// Files that turn up in the directories.
    new_files: NewFiles,
    /// Set on SIGTERM: every monitor, started before or after, ends as stopped.
    stop: tokio::sync::watch::Sender<bool>,
    all_ok: bool,
}

impl Watch {
    /// Opens the entry's file and starts its monitor.
    async fn start(&mut self, entry: &WatchEntry) -> anyhow::Result<()> {
        let mut monitor = Monitor::open(
            &entry.path,
            entry.group_id,
            entry.mode,
            self.interval,
            &mut Devices::default(),
        )?;
        monitor.use_histogram_of(entry.settings.clone());
        self.start_monitor(entry.clone(), monitor).await
    }

    /// Takes over a file a dmstats-launched daemon handed over (see [`handoffs`]). A file
    /// watched already is not watched twice.
    async fn take(&mut self, offer: Offer) {
        let Offer { handed, reply } = offer;
        let what = handed.what;
        let mut entry = WatchEntry::of_group(what.group_id, what.mode, what.path);
        // Watched already (a directory of the config holds it, or dmstats started a daemon
        // for it again): the same group on the same file, whatever the name's spelling.
        if let Ok(path) = std::fs::canonicalize(&entry.path) {
            entry.path = path;
        }
        let watched = self.watching.keys().any(|e| {
            e.group_id == entry.group_id
                && std::fs::canonicalize(&e.path).is_ok_and(|p| p == entry.path)
        });
        let taken = if watched {
            Ok(())
        } else {
            let group_id = entry.group_id.expect("a hand-over names a group");
            let mut alias = String::new();
            let started = match Monitor::from_file(
                handed.file,
                &entry.path,
                group_id,
                entry.mode,
                self.interval,
            ) {
                Ok(monitor) => {
                    alias = monitor.alias().unwrap_or_default();
                    self.start_monitor(entry.clone(), monitor).await
                }
                Err(e) => Err(e),
            };
            started
                .inspect(|()| {
                    info!(
                        "{}: handed over by a dmstats-launched daemon (group {group_id})",
                        entry.path.display(),
                    );
                    let recorded = Recorded {
                        group_id,
                        mode: entry.mode,
                        alias,
                        path: entry.path.clone(),
                    };
                    self.handed.insert(entry.clone(), recorded);
                    self.save_handed();
                })
                .map_err(|e| format!("{e:#}"))
        };
        if let Err(why) = &taken {
            warn!("{}: hand-over refused: {why}", entry.path.display());
        }
        reply.send(taken);
    }

    /// Sets the monitor up as the watch runs (mapping, trigger, metrics) and starts its task.
    async fn start_monitor(
        &mut self,
        entry: WatchEntry,
        mut monitor: Monitor,
    ) -> anyhow::Result<()> {
        let mapping = entry.mapping.unwrap_or_else(|| {
            self.regions
                .with_group()
                .mapping()
                .unwrap_or(Mapping::Tiled)
        });
        if mapping == Mapping::Exact {
            monitor.use_exact_mapping();
        }
        if entry.regroup_when_refilled {
            monitor.regroup_when_refilled();
        }
        if let Some((hub, notifier)) = &self.trigger {
            monitor.use_ebpf(hub, notifier.as_ref()).await?;
        } else if self.ebpf_unavailable {
            monitor.polling_because("eBPF unavailable");
        }
        if let Some(board) = &self.board {
            monitor.report_to(board.reporter());
        }
        let task = entry.clone();
        let delete_when_gone = entry.delete_with_file;
        let mut stop = self.stop.subscribe();
        let handle = self.tasks.spawn(async move {
            let stopped = async move {
                // The sender lives as long as the watch, which ends its tasks before it goes.
                if stop.wait_for(|stop| *stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            // Pinned here and lent: moved into the monitor's future instead, it would be
            // kept twice in every file's task.
            let result = monitor.run_until_stopped(std::pin::pin!(stopped)).await;
            info!("{}: {}", monitor.path().display(), monitor.tally());
            if let Some(totals) = monitor.kernel_counters() {
                crate::daemon::trace::totals(monitor.path(), &totals);
                info!(
                    "{}: its IO, counted in the kernel: {}",
                    monitor.path().display(),
                    crate::wake::ebpf::counting::describe(&totals)
                );
            }
            if delete_when_gone
                && monitor.has_group()
                && matches!(result, Ok(Exit::UnlinkedAndClosed))
            {
                match monitor.delete_group() {
                    Ok(n) => info!(
                        "{}: the file is gone, and so is its group ({n} region(s))",
                        monitor.path().display()
                    ),
                    Err(e) => error!(
                        "{}: the file is gone, its group could not be deleted: {e:#}",
                        monitor.path().display()
                    ),
                }
            }
            (task, result)
        });
        self.watching.insert(entry, handle);
        Ok(())
    }

    /// Takes up again the files handed over to the service before it was stopped. One whose
    /// file or group is gone is said, by name, and dropped from the record.
    async fn take_up_handed_before(&mut self) {
        for recorded in handed_record::load() {
            let taken = match handed_record::current_group(&recorded) {
                Ok(group_id) => {
                    let entry =
                        WatchEntry::of_group(group_id, recorded.mode, recorded.path.clone());
                    if self.watching.contains_key(&entry) {
                        Ok(())
                    } else {
                        self.start(&entry).await.map(|()| {
                            let recorded = Recorded {
                                group_id,
                                ..recorded.clone()
                            };
                            self.handed.insert(entry, recorded);
                        })
                    }
                }
                Err(e) => Err(e),
            };
            match taken {
                Ok(()) => info!(
                    "{}: handed over before the restart, followed again (group {})",
                    recorded.path.display(),
                    recorded.alias
                ),
                Err(e) => warn!(
                    "{}: handed over before the restart, followed by nobody now: {e:#}",
                    recorded.path.display()
                ),
            }
        }
        self.save_handed();
    }

    /// Records the handed-over files for a restarted service (said when it cannot).
    fn save_handed(&self) {
        if let Err(e) = handed_record::save(self.handed.values()) {
            warn!("handed-over files will not be taken up after a restart: {e:#}");
        }
    }

    /// Says how a monitor ended; returns its exit when it ended without an error.
    fn ended(
        &mut self,
        joined: Result<(WatchEntry, anyhow::Result<Exit>), JoinError>,
    ) -> Option<Exit> {
        match joined {
            Ok((entry, result)) => {
                self.watching.remove(&entry);
                // Stopped by SIGTERM, a handed-over file stays recorded for the next service.
                if !matches!(result, Ok(Exit::Terminated)) && self.handed.remove(&entry).is_some() {
                    self.save_handed();
                }
                match result {
                    Ok(exit) => {
                        info!("{}: {}", entry.path.display(), exit.message());
                        return Some(exit);
                    }
                    Err(e) => {
                        error!("{}: {e:#}", entry.path.display());
                        self.all_ok = false;
                    }
                }
            }
            Err(e) if e.is_cancelled() => {} // a reload let it go
            Err(e) => {
                error!("a monitor task failed: {e}");
                self.all_ok = false;
            }
        }
        None
    }

    /// The kernel counts the files made in `now`'s directories from birth (those of `before`
    /// that `now` lacks, no longer): their first writes come before any notice of them.
    async fn count_new_files_in(&self, before: &[PathSpec], now: &[PathSpec]) {
        let Some((hub, _)) = &self.trigger else {
            return;
        };
        for gone in before
            .iter()
            .filter(|d| !now.iter().any(|n| n.path == d.path))
        {
            hub.unwatch_directory(&gone.path);
        }
        for dir in now
            .iter()
            .filter(|d| !before.iter().any(|b| b.path == d.path))
        {
            if let Err(e) = hub.watch_directory(&dir.path).await {
                warn!("{e:#}");
                continue;
            }
            // Where the kernel counts through dm-stats' accounting, it counts a device's IO
            // only while the device has a region: a new image's first writes may come before
            // its group, or its device may have no group at all.
            if hub.counting().is_some_and(|c| c.needs_region())
                && let Err(e) = keep_accounting_on(&dir.path)
            {
                warn!("{}: {e:#}", dir.path.display());
            }
        }
    }

    /// Starts watching the files in the directories that are not watched yet and can be
    /// mapped now, each with its directory's options; returns how many. The others (without
    /// extents yet, most likely) are looked at again at their next write.
    async fn take_up_new_files(&mut self, directories: &[PathSpec]) -> usize {
        let watched: HashSet<PathBuf> = self.watching.keys().map(|e| e.path.clone()).collect();
        let mut listed = HashSet::new();
        let mut started = 0;
        for directory in directories {
            let Ok(files) = files_under(std::slice::from_ref(&directory.path)) else {
                continue;
            };
            for file in files {
                listed.insert(file.clone());
                if watched.contains(&file) {
                    continue;
                }
                let entry = match entry_for(&file, directory, self.regions) {
                    Ok(entry) => entry,
                    Err(e) => {
                        self.new_files.waits(&file, format!("{e:#}"));
                        continue;
                    }
                };
                match self.start(&entry).await {
                    Ok(()) => {
                        info!("{}: watched from now on", file.display());
                        self.new_files.taken_up(&file);
                        started += 1;
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        if self.new_files.waits(&file, why.clone()) {
                            error!("{}: not watched: {why}", file.display());
                        }
                    }
                }
            }
        }
        self.new_files.swept(&listed);
        started
    }

    /// Stops watching what the config no longer names, starts what it newly names.
    async fn reload(&mut self, entries: &[WatchEntry]) {
        // Handed-over files are no config's business: they stay.
        let gone: Vec<WatchEntry> = self
            .watching
            .keys()
            .filter(|e| !entries.contains(e) && !self.handed.contains_key(e))
            .cloned()
            .collect();
        for entry in &gone {
            if let Some(handle) = self.watching.remove(entry) {
                handle.abort();
                info!(
                    "{}: no longer watched (its group stays)",
                    entry.path.display()
                );
            }
        }
        let new: Vec<WatchEntry> = entries
            .iter()
            .filter(|e| !self.watching.contains_key(e))
            .cloned()
            .collect();
        // One at a time: a file that cannot be watched must not keep the others out.
        for entry in &new {
            if let Err(e) = self.start(entry).await {
                let why = format!("{e:#}");
                error!("{}: not watched: {why}", entry.path.display());
                self.new_files.waits(&entry.path, why);
            }
        }
        info!(
            "SIGHUP: {} file(s) watched ({} new, {} let go)",
            self.watching.len(),
            new.len(),
            gone.len()
        );
    }
}

/// Makes sure the device under `dir` has a region, so that dm-stats' accounting, where the
/// kernel counts, runs (see [`crate::stats::hook`]).
fn keep_accounting_on(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let device = crate::stats::StatsDevice::for_st_dev(std::fs::metadata(dir)?.dev())?;
    if crate::stats::hook::ensure(&device)? {
        info!(
            "{}: made the region that keeps dm-stats' accounting on",
            device.name()
        );
    }
    Ok(())
}

/// Each watched file holds a descriptor: let the process use as many as the kernel allows
/// one process (fs.nr_open) where it may raise its hard limit (root), else as many as its
/// hard limit allows. Shells and a plain `sudo` give a hard limit of 4,096, below a host's
/// 10,000 images.
fn raise_open_file_limit() {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let all = libc::rlimit {
            rlim_cur: nr_open,
            rlim_max: nr_open,
        };
        if nr_open > limit.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &all) == 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
