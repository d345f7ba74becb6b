//! Word from inotify that a monitored file may have been unlinked, closed by its last other
//! holder, or replaced at its path: with it (and eBPF for extents and groups) an idle
//! monitor needs no timer at all. One inotify instance serves every monitor of the process
//! (the kernel allows only 128 instances per user by default; watch mode has thousands of
//! files), and a task routes its events to the monitors by watch descriptor.
use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::{io::unix::AsyncFd, sync::mpsc};

/// On the file: its link count changed (unlink), someone closed it, it went away or moved.
const FILE_EVENTS: AddWatchFlags = AddWatchFlags::IN_ATTRIB
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_CLOSE_NOWRITE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);
/// On its directory (path mode): a name appeared or went.
const DIR_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM);

/// Who listens on each watch descriptor. One inode has one descriptor however often it is
/// watched (two monitors in one directory share it), hence the lists.
type Routes = HashMap<WatchDescriptor, Vec<(u64, mpsc::UnboundedSender<()>)>>;

/// A handle on the process's inotify instance; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inotify: Arc<AsyncFd<Instance>>,
    routes: Arc<Mutex<(Routes, u64)>>,
}

/// One monitor's notices: each `next` returns once something happened to its file.
pub struct Notices {
    notifier: Notifier,
    watches: Vec<(WatchDescriptor, u64)>,
    /// Files whose writes are noticed too, until they leave [`Notices::notice_writes_to`]'s set.
    written: HashMap<PathBuf, (WatchDescriptor, u64)>,
    sender: mpsc::UnboundedSender<()>,
    receiver: mpsc::UnboundedReceiver<()>,
}

/// Writes to a file: what tells that a file not mapped yet (made empty) has its first blocks.
const WRITE_EVENTS: AddWatchFlags = AddWatchFlags::IN_MODIFY.union(AddWatchFlags::IN_CLOSE_WRITE);

impl Notifier {
    /// Opens the inotify instance and starts the routing task on the current runtime.
    pub fn spawn() -> anyhow::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .context("creating an inotify instance")?;
        // SAFETY: Instance owns the inotify descriptor and lives inside the AsyncFd, so the
        // descriptor stays open for as long as it is registered.
        let inotify = unsafe { AsyncFd::register(Instance(inotify)) }
            .context("registering inotify with tokio")?;
        let notifier = Notifier {
            inotify: Arc::new(inotify),
            routes: Arc::default(),
        };
        tokio::spawn(route(notifier.clone()));
        Ok(notifier)
    }

    /// [`Notifier::spawn`], or `None` after a warning: monitors then check every interval.
    pub fn spawn_or_warn() -> Option<Self> {
        Self::spawn()
            .inspect_err(|e| log::warn!("{e:#}: checking files every interval"))
            .ok()
    }

    /// Notices for the file at `path` (and, when `with_directory`, for names coming and going
    /// in its directory).
    pub fn watch(&self, path: &Path, with_directory: bool) -> anyhow::Result<Notices> {
        let mut targets = vec![(path, FILE_EVENTS)];
        if with_directory {
            targets.push((path.parent().unwrap_or(Path::new("/")), DIR_EVENTS));
        }
        self.watch_all(&targets)
    }

    /// Notices of files appearing in these directories or leaving them: where new images
    /// turn up. Not of writes to their files (a write to a watched image is no news, and
    /// would wake the watch at every write): see [`Notices::notice_writes_to`].
    pub fn watch_directories(&self, dirs: &[&Path]) -> anyhow::Result<Notices> {
        let targets: Vec<(&Path, AddWatchFlags)> = dirs.iter().map(|d| (*d, DIR_EVENTS)).collect();
        self.watch_all(&targets)
    }

    /// One stream of notices for all of `targets`.
    fn watch_all(&self, targets: &[(&Path, AddWatchFlags)]) -> anyhow::Result<Notices> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut notices = Notices {
            notifier: self.clone(),
            watches: Vec::new(),
            written: HashMap::new(),
            sender,
            receiver,
        };
        for &(target, events) in targets {
            let watch = notices.add(target, events)?;
            notices.watches.push(watch);
        }
        Ok(notices)
    }
}

impl Notices {
    /// The instance these come from (to watch a replacement file).
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Notices of writes to exactly these files from now on, besides the targets these
    /// notices began with. inotify keeps one set of events per inode and instance, so such a
    /// file must not be one that another listener of the same instance watches. When a file
    /// is added, one notice follows at once: a write made after the caller last looked at it
    /// but before its watch began is not missed.
    pub fn notice_writes_to(&mut self, files: &HashSet<PathBuf>) {
        let stale: Vec<PathBuf> = self
            .written
            .keys()
            .filter(|f| !files.contains(*f))
            .cloned()
            .collect();
        for file in stale {
            if let Some(watch) = self.written.remove(&file) {
                self.stop(watch);
            }
        }
        for file in files {
            if self.written.contains_key(file) {
                continue;
            }
            match self.add(file, WRITE_EVENTS) {
                Ok(watch) => {
                    self.written.insert(file.clone(), watch);
                    let _ = self.sender.send(());
                }
                // Gone meanwhile, most likely: its directory's notice tells.
                Err(e) => log::debug!("{e:#}"),
            }
        }
    }

    /// Adds `target` to what these notices report.
    fn add(&self, target: &Path, events: AddWatchFlags) -> anyhow::Result<(WatchDescriptor, u64)> {
        let wd = self
            .notifier
            .inotify
            .get_ref()
            .0
            .add_watch(target, events)
            .with_context(|| format!("inotify watch on {}", target.display()))?;
        let mut routes = self.notifier.routes.lock().unwrap();
        let (table, next_id) = &mut *routes;
        *next_id += 1;
        table
            .entry(wd)
            .or_default()
            .push((*next_id, self.sender.clone()));
        Ok((wd, *next_id))
    }

    /// Stops one watch of these notices; the kernel's goes once no listener is left.
    fn stop(&self, (wd, id): (WatchDescriptor, u64)) {
        let mut routes = self.notifier.routes.lock().unwrap();
        let Some(listeners) = routes.0.get_mut(&wd) else {
            return;
        };
        listeners.retain(|(other, _)| *other != id);
        if listeners.is_empty() {
            routes.0.remove(&wd);
            // Fails harmlessly when the kernel already dropped it (file deleted).
            let _ = self.notifier.inotify.get_ref().0.rm_watch(wd);
        }
    }

    /// Waits for the next notice and swallows any that queued behind it.
    pub async fn next(&mut self) -> anyhow::Result<()> {
        self.receiver
            .recv()
            .await
            .context("the inotify task has stopped")?;
        while self.receiver.try_recv().is_ok() {}
        Ok(())
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        let watches: Vec<_> = self
            .watches
            .drain(..)
            .chain(self.written.drain().map(|(_, watch)| watch))
            .collect();
        for watch in watches {
            self.stop(watch);
        }
    }
}

async fn route(notifier: Notifier) {
    loop {
        let mut guard = match notifier.inotify.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                log::error!("waiting for inotify: {e}");
                return;
            }
        };
        match notifier.inotify.get_ref().0.read_events() {
            Ok(events) => {
                let routes = notifier.routes.lock().unwrap();
                for event in events {
                    // The queue overflowed and events were lost: anyone may have missed one.
                    if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        log::warn!("inotify's queue overflowed: every watcher looks again");
                        for (_, listener) in routes.0.values().flatten() {
                            let _ = listener.send(());
                        }
                        continue;
                    }
                    for (_, listener) in routes.0.get(&event.wd).into_iter().flatten() {
                        let _ = listener.send(());
                    }
                }
            }
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(e) => {
                log::error!("reading inotify events: {e}");
                return;
            }
        }
    }
}

/// nix's Inotify offers AsFd only; tokio's AsyncFd wants AsRawFd.
struct Instance(Inotify);

impl std::os::fd::AsRawFd for Instance {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose writes are asked for is heard at once (a write before its watch began
    /// is not missed), then at its writes; one let go of is no longer heard of, so that its
    /// watch is gone from the kernel too.
    #[tokio::test]
    async fn writes_are_heard_from_the_files_asked_for() {
        let dir = std::env::temp_dir().join(format!("filemapd-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("new.img");
        std::fs::write(&file, b"").unwrap();
        let notifier = Notifier::spawn().unwrap();
        let mut notices = notifier.watch_directories(&[dir.as_path()]).unwrap();

        notices.notice_writes_to(&HashSet::from([file.clone()]));
        heard(&mut notices).await;
        std::fs::write(&file, b"first blocks").unwrap();
        heard(&mut notices).await;

        notices.notice_writes_to(&HashSet::new());
        assert!(notices.written.is_empty());
        let routes = notifier.routes.lock().unwrap();
        assert_eq!(routes.0.len(), 1, "only the directory's watch is left");
        drop(routes);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The next notice. The timeout guards against a hang, it does not synchronise: each
    /// notice comes at once.
    async fn heard(notices: &mut Notices) {
        tokio::time::timeout(std::time::Duration::from_secs(10), notices.next())
            .await
            .expect("no notice within 10 s")
            .unwrap();
    }
}
