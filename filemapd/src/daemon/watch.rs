//! `filemapd watch [--config FILE] [PATH...]`: one process and one set of eBPF programs for
//! many (file, group) pairs, as a VM host with many images wants.
//!
//! The config has one file per line, `<group_id> <inode|path> <absolute path>` (the path last,
//! so it may contain spaces); blank lines and lines starting with `#` are skipped. A PATH is a
//! file or a directory (every regular file in it); each file gets the group it has, or one made
//! as `dmstats create --filemap` makes it, and is followed by inode.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{error, info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::{AbortHandle, JoinError, JoinSet},
};

use crate::{
    daemon::args::FollowMode,
    daemon::monitor::{Exit, Monitor},
    oneshot,
    reconcile::Mapping,
    stats::Devices,
    stats::RegionSettings,
    wake::ebpf::{Hub, Tracer},
    wake::notify::{Notices, Notifier},
};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEntry {
    pub group_id: u64,
    pub mode: FollowMode,
    pub path: PathBuf,
    /// Named by a PATH (not a config line): its group goes when the file does.
    pub from_path: bool,
}

/// Reads and parses the config, refusing one that another user could have written: it names
/// the files a root daemon maps.
pub fn read_config(path: &Path) -> anyhow::Result<Vec<WatchEntry>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let metadata = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if let Err(reason) = writable_only_by_trusted(metadata.mode(), metadata.uid(), me) {
        bail!("refusing the config {}: {reason}", path.display());
    }
    let text =
        std::io::read_to_string(file).with_context(|| format!("reading {}", path.display()))?;
    parse_config(&text)
}

/// Whether a file with this mode and owner can be written only by root or by `me`.
fn writable_only_by_trusted(mode: u32, owner: u32, me: u32) -> Result<(), String> {
    if mode & 0o002 != 0 {
        return Err(format!(
            "any user can write it (mode {:o}; chmod o-w)",
            mode & 0o7777
        ));
    }
    if owner != 0 && owner != me {
        return Err(format!(
            "it belongs to uid {owner}, neither root nor this user"
        ));
    }
    Ok(())
}

pub fn parse_config(text: &str) -> anyhow::Result<Vec<WatchEntry>> {
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parse = || -> anyhow::Result<WatchEntry> {
            let mut fields = line.splitn(3, char::is_whitespace);
            let group = fields.next().unwrap_or_default();
            let group_id = group
                .parse()
                .with_context(|| format!("bad group id {group:?}"))?;
            let mode = match fields.next().unwrap_or_default() {
                "inode" => FollowMode::Inode,
                "path" => FollowMode::Path,
                other => bail!("bad mode {other:?} (inode or path)"),
            };
            let path = PathBuf::from(fields.next().unwrap_or_default().trim());
            if !path.is_absolute() {
                bail!("the path must be absolute");
            }
            Ok(WatchEntry {
                group_id,
                mode,
                path,
                from_path: false,
            })
        };
        entries.push(parse().with_context(|| format!("config line {number}: {line:?}"))?);
    }
    Ok(entries)
}

/// What to watch: the config's lines (if there is a config), then the files PATHs name. A file
/// a PATH names that cannot be mapped (no extents yet, not on a device-mapper device) is said
/// and left out; a file named twice is watched once.
pub fn resolve(config: Option<&Path>, paths: &[PathBuf]) -> anyhow::Result<Vec<WatchEntry>> {
    let mut entries = match config {
        Some(config) => read_config(config)?,
        None => Vec::new(),
    };
    for file in files_under(paths)? {
        if entries.iter().any(|e| e.path == file) {
            continue;
        }
        match entry_for(&file) {
            Ok(entry) => entries.push(entry),
            Err(e) => warn!("{}: not watched: {e:#}", file.display()),
        }
    }
    Ok(entries)
}

/// A file a PATH names, with its group (adopted, or made as dmstats makes it).
fn entry_for(file: &Path) -> anyhow::Result<WatchEntry> {
    let mapped = oneshot::group_for(file, None, "dmstats", RegionSettings::default())?;
    if let Some(regions) = mapped.created {
        info!(
            "{}: created group {} with {regions} region(s)",
            file.display(),
            mapped.group
        );
    }
    Ok(WatchEntry {
        group_id: mapped.group,
        mode: FollowMode::Inode,
        path: file.to_path_buf(),
        from_path: true,
    })
}

/// The regular files PATHs name: a file itself, a directory's regular files (not its
/// subdirectories, nor symlinks), in name order.
fn files_under(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let path =
            std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        if !path.is_dir() {
            files.push(path);
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(&path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// Room in the kernel filter beyond twice the files at start (a path-mode monitor watches its
/// new file before letting the old go), for files a reload adds. Past it, files poll.
const FILTER_ROOM: u32 = 4096;

/// Monitors the config's files until each one's group is gone (or its file is). SIGHUP reads
/// the config again: files no longer named stop being watched (between passes; their groups
/// stay), new ones start; the others go on untouched. SIGTERM ends every monitor between
/// passes, with exit 0. Returns false if any monitor stopped on an error.
pub async fn run(
    config: Option<&Path>,
    paths: &[PathBuf],
    keep_groups: bool,
    interval: Duration,
    ebpf: bool,
    mapping: Mapping,
) -> anyhow::Result<bool> {
    let entries = resolve(config, paths)?;
    let source = match config {
        Some(config) => config.display().to_string(),
        None => "the paths given".to_string(),
    };
    raise_open_file_limit();
    let trigger = if ebpf {
        match Tracer::load(2 * entries.len() as u32 + FILTER_ROOM) {
            Ok(tracer) => Some((Hub::spawn(tracer), Notifier::spawn_or_warn())),
            Err(e) => {
                warn!("eBPF trigger unavailable ({e:#}): polling every {interval:?}");
                None
            }
        }
    } else {
        None
    };
    let mut watch = Watch {
        interval,
        keep_groups,
        mapping,
        trigger,
        tasks: JoinSet::new(),
        watching: HashMap::new(),
        all_ok: true,
    };
    // A file that cannot be watched (gone, not on dm, no group) is said and skipped: one bad
    // line must not leave a host's other images unwatched.
    for entry in &entries {
        if let Err(e) = watch.start(std::slice::from_ref(entry)).await {
            error!("{}: not watched: {e:#}", entry.path.display());
            watch.all_ok = false;
        }
    }
    if watch.watching.is_empty() && !entries.is_empty() {
        bail!("none of the files in {source} can be watched");
    }
    if entries.is_empty() {
        info!("{source} names no files yet: waiting for SIGHUP");
    }
    if watch.trigger.is_some() {
        info!("eBPF trigger for {} file(s)", watch.watching.len());
    }
    info!("watching {} file(s)", watch.watching.len());
    // systemd's Type=notify: the service is up once every file is watched.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!("could not tell systemd the service is ready: {e}");
    }
    // New files in the directories: looked at when one appears or is written to (an image
    // made empty is mapped once it has blocks).
    let dirs: Vec<PathBuf> = paths
        .iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let mut dir_notices = match dirs.is_empty() {
        true => None,
        false => {
            let notifier = match &watch.trigger {
                Some((_, Some(notifier))) => Some(notifier.clone()),
                _ => Notifier::spawn_or_warn(),
            };
            let dir_refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
            notifier.and_then(|n| {
                n.watch_directories(&dir_refs)
                    .inspect_err(|e| warn!("new files will wait for SIGHUP: {e:#}"))
                    .ok()
            })
        }
    };
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Monitors end themselves on SIGTERM; this one ends a watch that has none.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Files the config names now: once all of them have ended, so does the watch. With none
    // named it waits for a reload.
    let mut named = entries.len();
    loop {
        tokio::select! {
            Some(joined) = watch.tasks.join_next(), if !watch.tasks.is_empty() => {
                watch.ended(joined);
                if watch.tasks.is_empty() && named > 0 {
                    break;
                }
            }
            _ = hangup.recv() => match resolve(config, paths) {
                Ok(entries) => {
                    named = entries.len();
                    watch.reload(&entries).await;
                }
                Err(e) => error!("SIGHUP: keeping the files watched now: {e:#}"),
            },
            _ = terminate.recv(), if watch.tasks.is_empty() => break,
            noticed = next_notice(&mut dir_notices) => {
                noticed?;
                named += watch.take_up_new_files(&dirs).await;
            }
        }
    }
    Ok(watch.all_ok)
}

/// The next notice from the directories, or never when there are none.
async fn next_notice(notices: &mut Option<Notices>) -> anyhow::Result<()> {
    match notices {
        Some(notices) => notices.next().await,
        None => std::future::pending().await,
    }
}

/// The files being watched, each by its own task.
struct Watch {
    interval: Duration,
    /// Keep the groups of PATH-named files that are deleted (`--keep-groups`).
    keep_groups: bool,
    mapping: Mapping,
    trigger: Option<(Hub, Option<Notifier>)>,
    tasks: JoinSet<(WatchEntry, anyhow::Result<Exit>)>,
    watching: HashMap<WatchEntry, AbortHandle>,
    all_ok: bool,
}

impl Watch {
    /// Opens a monitor per entry (failing on the first that cannot be watched) and starts them.
    /// Callers pass one entry at a time, so that one file's failure leaves the others watched.
    async fn start(&mut self, entries: &[WatchEntry]) -> anyhow::Result<()> {
        let mut devices = Devices::default();
        let mut monitors = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut monitor = Monitor::open(
                &entry.path,
                entry.group_id,
                entry.mode,
                self.interval,
                &mut devices,
            )?;
            if self.mapping == Mapping::Exact {
                monitor.use_exact_mapping();
            }
            if let Some((hub, notifier)) = &self.trigger {
                monitor.use_ebpf(hub, notifier.as_ref()).await?;
            }
            monitors.push((entry.clone(), monitor));
        }
        for (entry, mut monitor) in monitors {
            let task = entry.clone();
            let delete_when_gone = entry.from_path && !self.keep_groups;
            let handle = self.tasks.spawn(async move {
                let result = monitor.run_until_terminated().await;
                info!("{}: {}", monitor.path().display(), monitor.tally());
                if delete_when_gone && matches!(result, Ok(Exit::UnlinkedAndClosed)) {
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
        }
        Ok(())
    }

    fn ended(&mut self, joined: Result<(WatchEntry, anyhow::Result<Exit>), JoinError>) {
        match joined {
            Ok((entry, result)) => {
                self.watching.remove(&entry);
                match result {
                    Ok(exit) => info!("{}: {}", entry.path.display(), exit.message()),
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
    }

    /// Starts watching the files in `dirs` that are not watched yet and can be mapped now;
    /// returns how many. Those still without extents are looked at again on the next notice.
    async fn take_up_new_files(&mut self, dirs: &[PathBuf]) -> usize {
        let Ok(files) = files_under(dirs) else {
            return 0;
        };
        let mut started = 0;
        for file in files {
            if self.watching.keys().any(|e| e.path == file) {
                continue;
            }
            let Ok(entry) = entry_for(&file) else {
                continue; // no extents yet, most likely: the next write tells
            };
            match self.start(std::slice::from_ref(&entry)).await {
                Ok(()) => {
                    info!("{}: watched from now on", file.display());
                    started += 1;
                }
                Err(e) => error!("{}: not watched: {e:#}", file.display()),
            }
        }
        started
    }

    /// Stops watching what the config no longer names, starts what it newly names.
    async fn reload(&mut self, entries: &[WatchEntry]) {
        let gone: Vec<WatchEntry> = self
            .watching
            .keys()
            .filter(|e| !entries.contains(e))
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
            if let Err(e) = self.start(std::slice::from_ref(entry)).await {
                error!("{}: not watched: {e:#}", entry.path.display());
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

/// Each watched file holds a descriptor: let the process use as many as its hard limit allows.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_others_can_write_is_refused() {
        assert!(writable_only_by_trusted(0o644, 0, 0).is_ok());
        assert!(writable_only_by_trusted(0o664, 1000, 1000).is_ok());
        assert!(writable_only_by_trusted(0o600, 0, 1000).is_ok());
        let world = writable_only_by_trusted(0o666, 0, 0).unwrap_err();
        assert!(world.contains("any user can write it (mode 666"), "{world}");
        assert!(writable_only_by_trusted(0o1777, 0, 0).is_err());
        let other = writable_only_by_trusted(0o644, 1000, 0).unwrap_err();
        assert!(other.contains("uid 1000"), "{other}");
    }

    #[test]
    fn reads_entries_and_skips_comments() {
        let entries = parse_config(
            "# images\n0 inode /var/lib/vm/a.img\n\n  3 path /var/lib/vm/my disk.img\n",
        )
        .unwrap();
        assert_eq!(
            entries,
            vec![
                WatchEntry {
                    group_id: 0,
                    mode: FollowMode::Inode,
                    path: "/var/lib/vm/a.img".into(),
                    from_path: false,
                },
                WatchEntry {
                    group_id: 3,
                    mode: FollowMode::Path,
                    path: "/var/lib/vm/my disk.img".into(),
                    from_path: false,
                },
            ]
        );
    }

    #[test]
    fn a_directory_yields_its_regular_files_in_name_order() {
        let dir = std::env::temp_dir().join(format!("filemapd-files-under-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for name in ["b.img", "a.img", "sub/c.img"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        std::os::unix::fs::symlink(dir.join("a.img"), dir.join("link.img")).unwrap();
        let single = dir.join("sub/c.img");
        let files = files_under(&[dir.clone(), single.clone()]).unwrap();
        let dir = std::fs::canonicalize(&dir).unwrap();
        assert_eq!(
            files,
            vec![dir.join("a.img"), dir.join("b.img"), dir.join("sub/c.img")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_config_without_files_is_empty_not_wrong() {
        assert_eq!(parse_config("# nothing yet\n\n").unwrap(), vec![]);
    }

    #[test]
    fn bad_lines_name_their_number() {
        for (text, expected) in [
            ("x inode /a", "config line 1"),
            ("0 both /a", "bad mode"),
            ("0 inode a.img", "absolute"),
            ("0 inode", "absolute"),
            ("0 inode /a\n1 path rel", "config line 2"),
        ] {
            let err = format!("{:#}", parse_config(text).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
