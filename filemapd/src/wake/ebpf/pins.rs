//! The counting maps of a running daemon, pinned in bpffs under its pid, so that another
//! process (`filemapd show`, `filemapd report`) can read a file's in-kernel counters: WATCHED
//! gives the file's slot, COUNTERS the slot's counts. A daemon killed outright, or stopped by
//! SIGTERM (to be started again, or upgraded), leaves its directory: the next daemon to watch
//! one of its files carries the file's counters over ([`Leftovers`]), so that they never go
//! back while the file lives. A daemon that ends otherwise removes its directory.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use filemapd_common::{FileCounters, InodeKey, Placement, names};

use crate::file::{follow, identity::FileId};

pub(super) const ROOT: &str = "/sys/fs/bpf/filemapd";

/// Set once the daemon stops on SIGTERM: its files' counters stay pinned for the next.
static KEEP_FOR_SUCCESSOR: AtomicBool = AtomicBool::new(false);

/// The daemon stops to be followed by another (SIGTERM): its files stay in its pinned maps,
/// and their counters carry over to the next daemon that watches them.
pub fn keep_for_successor() {
    KEEP_FOR_SUCCESSOR.store(true, Ordering::SeqCst);
}

pub fn keeping_for_successor() -> bool {
    KEEP_FOR_SUCCESSOR.load(Ordering::SeqCst)
}

/// A daemon's pin directory, removed on drop unless it keeps its counters for a successor.
pub struct PinDir(PathBuf);

impl PinDir {
    /// Pins `watched` and `counters` for this process; `None` (said why) when bpffs is not
    /// mounted or not writable.
    pub fn pin(watched: &Map, counters: &Map) -> Option<PinDir> {
        let dir = own_dir();
        let result = (|| -> anyhow::Result<()> {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            watched.pin(dir.join(names::WATCHED))?;
            counters.pin(dir.join(names::COUNTERS))?;
            Ok(())
        })();
        match result {
            Ok(()) => Some(PinDir(dir)),
            Err(e) => {
                log::info!(
                    "in-kernel counters not readable by other processes (bpffs at /sys/fs/bpf?): {e:#}"
                );
                let _ = std::fs::remove_dir_all(&dir);
                None
            }
        }
    }
}

impl PinDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// This process's pin directory.
pub fn own_dir() -> PathBuf {
    Path::new(ROOT).join(std::process::id().to_string())
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if !keeping_for_successor() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The counting maps of daemons that no longer run, each file's counters waiting there for
/// the next daemon that watches it.
#[derive(Default)]
pub struct Leftovers {
    dirs: Vec<LeftBehind>,
    /// The stopped service whose programs still count its files (see `restart`).
    bridged: Option<u32>,
}

/// What an earlier daemon counted for a file.
pub struct Claim {
    pub pid: u32,
    pub counters: FileCounters,
    /// The slot in which the earlier daemon's programs still count the file (a stopped
    /// service bridging the gap to this daemon): `counters` is what they counted so far.
    pub still_counted_in: Option<u32>,
}

struct LeftBehind {
    pid: u32,
    path: PathBuf,
    watched: HashMap<MapData, InodeKey, Placement>,
    counters: PerCpuArray<MapData, FileCounters>,
}

impl Leftovers {
    /// The pin directories of processes that no longer run, less the files their names file
    /// says are gone (another inode at the path, or none); a directory left with no file is
    /// removed.
    /// `bridged`: the pid of the stopped service whose programs still count, whose files
    /// are claimed without being taken out of its maps until [`Leftovers::settle`].
    pub fn gather(bridged: Option<u32>) -> Self {
        let mut leftovers = Self {
            bridged,
            ..Self::default()
        };
        for (pid, path, running) in by_pid(ROOT) {
            if running {
                continue;
            }
            match LeftBehind::open(pid, path.clone()) {
                Ok(mut dir) => {
                    dir.forget_gone_files();
                    if dir.is_empty() {
                        dir.remove();
                    } else {
                        leftovers.dirs.push(dir);
                    }
                }
                Err(e) => {
                    log::debug!("{}: {e:#}; removed", path.display());
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        leftovers
    }

    /// What an earlier daemon counted for the file (`key`, of inode generation `generation`),
    /// taken: no other daemon gets it again. Its directory goes with its last file.
    pub fn claim(&mut self, key: InodeKey, generation: u32) -> Option<Claim> {
        let mut claimed = None;
        for dir in &mut self.dirs {
            let Ok(placement) = dir.watched.get(&key, 0) else {
                continue;
            };
            let counters = dir.counters.get(&placement.slot, 0).ok();
            let same_file = placement.dm_dev != 0 && placement.generation == generation;
            if Some(dir.pid) == self.bridged
                && same_file
                && let Some(values) = &counters
            {
                // Left in its maps: its programs count the file until this daemon takes over.
                return Some(Claim {
                    pid: dir.pid,
                    counters: FileCounters::sum(values.iter()),
                    still_counted_in: Some(placement.slot),
                });
            }
            // Whoever removes the entry has it (another daemon may be starting too).
            if dir.watched.remove(&key).is_err() {
                continue;
            }
            if same_file {
                if let Some(values) = counters {
                    claimed = Some(Claim {
                        pid: dir.pid,
                        counters: FileCounters::sum(values.iter()),
                        still_counted_in: None,
                    });
                }
                break;
            }
        }
        self.remove_empty();
        claimed
    }

    /// Once the bridged service's programs count no more: what they counted in `slot` for the
    /// file `key`, which its maps then let go.
    pub fn settle(&mut self, key: InodeKey, slot: u32) -> Option<FileCounters> {
        let dir = self.dirs.iter_mut().find(|d| Some(d.pid) == self.bridged)?;
        let counters = dir.counters.get(&slot, 0).ok();
        let _ = dir.watched.remove(&key);
        counters.map(|values| FileCounters::sum(values.iter()))
    }

    /// The bridge is over: the stopped service's files not taken up wait for a later daemon
    /// like any other's.
    pub fn end_bridge(&mut self) {
        self.bridged = None;
        self.remove_empty();
    }

    fn remove_empty(&mut self) {
        self.dirs.retain(|dir| {
            let empty = dir.is_empty();
            if empty {
                dir.remove();
            }
            !empty
        });
    }
}

impl LeftBehind {
    fn open(pid: u32, path: PathBuf) -> anyhow::Result<Self> {
        let open = |name: &str| -> anyhow::Result<Map> {
            let pinned = path.join(name);
            let data = MapData::from_pin(&pinned)
                .with_context(|| format!("opening {}", pinned.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Self {
            pid,
            watched: HashMap::try_from(open(names::WATCHED)?)?,
            counters: PerCpuArray::try_from(open(names::COUNTERS)?)?,
            path,
        })
    }

    fn is_empty(&self) -> bool {
        self.watched.keys().next().is_none()
    }

    /// Drops the entries of files the dead daemon named that are no longer at their path
    /// (as it saw them). Files it did not name stay.
    fn forget_gone_files(&mut self) {
        let names = Path::new(NAMES).join(self.pid.to_string());
        let Ok(text) = std::fs::read_to_string(&names) else {
            return;
        };
        let (_, elsewhere): (Vec<_>, Vec<_>) =
            parse_names(self.pid, &text).into_iter().partition(|named| {
                std::fs::metadata(&named.path)
                    .is_ok_and(|m| FileId::of(&m).inode_key() == named.key)
            });
        // Not at its path: gone, unless a process holds it open (an image unlinked while its
        // VM runs lives on, and so do its counters).
        let held: Vec<InodeKey> =
            follow::held_by_others(|id| elsewhere.iter().any(|named| named.key == id.inode_key()))
                .iter()
                .map(|id| id.inode_key())
                .collect();
        for named in elsewhere {
            if !held.contains(&named.key) {
                let _ = self.watched.remove(&named.key);
            }
        }
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
        let _ = std::fs::remove_file(Path::new(NAMES).join(self.pid.to_string()));
    }
}

/// The in-kernel counters of the inode `key`, from whichever running daemon counts it: (its
/// pid, the counters); `None` when none does.
pub fn find_counters(key: InodeKey) -> anyhow::Result<Option<(u32, FileCounters)>> {
    for (pid, dir, running) in by_pid(ROOT) {
        if !running {
            continue;
        }
        match counters_in(&dir, key) {
            Ok(Some(counters)) => return Ok(Some((pid, counters))),
            Ok(None) => {}
            // A daemon starting (pinning its maps) or ending (unpinning them).
            Err(e) => log::debug!("daemon {pid}: {e:#}"),
        }
    }
    Ok(None)
}

/// The counters of inode `key` in one daemon's pin directory, if that daemon counts it.
fn counters_in(dir: &Path, key: InodeKey) -> anyhow::Result<Option<FileCounters>> {
    let open = |name: &str| -> anyhow::Result<Map> {
        let path = dir.join(name);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Map::from_map_data(data)?)
    };
    let watched: HashMap<MapData, InodeKey, Placement> = HashMap::try_from(open(names::WATCHED)?)?;
    let Ok(placement) = watched.get(&key, 0) else {
        return Ok(None);
    };
    if placement.dm_dev == 0 {
        return Ok(None);
    }
    let counters: PerCpuArray<MapData, FileCounters> =
        PerCpuArray::try_from(open(names::COUNTERS)?)?;
    let values = counters.get(&placement.slot, 0)?;
    Ok(Some(FileCounters::sum(values.iter())))
}

/// Where each daemon names the files its kernel counters are for (`<dev> <ino> <generation>
/// <path>` per line; bpffs holds no plain files): `filemapd report` without FILEs reads them.
const NAMES: &str = "/run/filemapd/names";

/// How often at most a names file is written: at once after a change when it was last
/// written longer ago, else that long after the last write (10,000 files starting at once
/// write it every second, not 10,000 times).
const NAMES_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// This daemon's names file, removed on drop.
pub struct NamesFile {
    files: std::collections::BTreeMap<(u32, u64), (u32, PathBuf)>,
    path: PathBuf,
    /// Changed since the last write.
    dirty: bool,
    written: Option<std::time::Instant>,
}

impl Default for NamesFile {
    fn default() -> Self {
        Self::new()
    }
}

impl NamesFile {
    pub fn new() -> Self {
        Self {
            files: Default::default(),
            path: Path::new(NAMES).join(std::process::id().to_string()),
            dirty: false,
            written: None,
        }
    }

    pub fn insert(&mut self, key: InodeKey, generation: u32, path: PathBuf) {
        self.files.insert((key.dev, key.ino), (generation, path));
        self.dirty = true;
    }

    pub fn remove(&mut self, key: &InodeKey) {
        self.dirty |= self.files.remove(&(key.dev, key.ino)).is_some();
    }

    /// When the changes since the last write are due to be written (`None`: there are none).
    pub fn due(&self) -> Option<std::time::Instant> {
        let now = std::time::Instant::now();
        self.dirty
            .then(|| self.written.map_or(now, |at| (at + NAMES_EVERY).max(now)))
    }

    /// Writes the changes when they are due.
    pub fn write_if_due(&mut self) {
        if self.due().is_some_and(|at| at <= std::time::Instant::now()) {
            self.write();
            self.dirty = false;
            self.written = Some(std::time::Instant::now());
        }
    }

    /// Writes the file whole under another name, then renames it: a reader never sees half
    /// of it. Failures are said at debug level (only `report` without FILEs needs it).
    fn write(&self) {
        let result = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(NAMES)?;
            let partial = self.path.with_extension("partial");
            let mut text = String::new();
            for ((dev, ino), (generation, path)) in &self.files {
                text += &format!("{dev} {ino} {generation} {}\n", path.display());
            }
            std::fs::write(&partial, text)?;
            std::fs::rename(&partial, &self.path)
        })();
        if let Err(e) = result {
            log::debug!("writing {}: {e}", self.path.display());
        }
    }
}

impl Drop for NamesFile {
    fn drop(&mut self) {
        // Kept for the successor with the pinned maps: it tells which files are gone.
        if keeping_for_successor() {
            self.write();
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The entries of `dir` named by a daemon's pid: (pid, path, whether that process runs).
pub(super) fn by_pid(dir: &str) -> Vec<(u32, PathBuf, bool)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let running = Path::new("/proc").join(pid.to_string()).exists();
            Some((pid, entry.path(), running))
        })
        .collect()
}

/// One file a running daemon counts.
pub struct CountedByDaemon {
    pub pid: u32,
    pub key: InodeKey,
    pub path: PathBuf,
}

/// Every file the running daemons count, as their names files say, in path order.
pub fn counted_files() -> Vec<CountedByDaemon> {
    let mut files = Vec::new();
    for (pid, path, running) in by_pid(NAMES) {
        // A dead daemon's names wait for its successor (see `Leftovers`).
        if !running {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        files.extend(parse_names(pid, &text));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

/// The lines of daemon `pid`'s names file.
fn parse_names(pid: u32, text: &str) -> Vec<CountedByDaemon> {
    let mut files = Vec::new();
    for line in text.lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(dev), Some(ino), Some(_generation), Some(path)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(dev), Ok(ino)) = (dev.parse(), ino.parse()) else {
            continue;
        };
        files.push(CountedByDaemon {
            pid,
            key: InodeKey { dev, _pad: 0, ino },
            path: PathBuf::from(path),
        });
    }
    files
}
