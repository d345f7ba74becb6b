//! One set of eBPF programs for many watched files: a task owns the tracer, keeps the kernel's
//! watch list and each file's slot in the counting, and routes each event to the feed of the
//! file it concerns. Files made in a watched directory the kernel watches from birth, in a
//! spare slot kept ready here; the file's monitor takes that slot over when it starts.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use filemapd_common::{Bounds, ExtentEvent, FileCounters, InodeKey, Placement, tracepoint};
use tokio::sync::{mpsc, oneshot};

use super::{
    CountedFile, Counting, Tracer,
    pins::{Leftovers, NamesFile, keeping_for_successor},
};

/// What a feed receives: events for its inode, word that events were lost (map everything),
/// or word that another process deleted or relabelled dm-stats regions (check the group).
/// Events are boxed: a channel allocates room for 32 messages at once, per watched file.
#[derive(Clone, Debug)]
pub enum Feed {
    Event(Box<ExtentEvent>),
    Lost,
    RegionsChanged,
}

/// What a file's watch asks of the counting: where its blocks lie, its histogram's bounds,
/// and what an earlier daemon counted.
struct Counted {
    placement: Placement,
    bounds: Bounds,
    base: FileCounters,
}

enum Request {
    Watch {
        key: InodeKey,
        path: PathBuf,
        counted: Option<Box<Counted>>,
        feed: mpsc::UnboundedSender<Feed>,
        done: oneshot::Sender<anyhow::Result<Option<CountedFile>>>,
    },
    /// With the counting slot to free once the kernel no longer watches the inode.
    Unwatch(InodeKey, Option<u32>),
    /// The file counted in the kernel is its path's (the kernel's map holds it now), for
    /// `filemapd report`.
    Named(InodeKey, u32, PathBuf, oneshot::Sender<()>),
    /// The kernel watches the directory's new files from birth, with this placement (`None`:
    /// no longer); answered once it does.
    WatchDirectory(InodeKey, PathBuf, Option<Placement>, oneshot::Sender<()>),
    /// The files are taken up: this daemon counts from now on (see `restart`).
    TakeOver(oneshot::Sender<()>),
}

/// A handle for starting and stopping watches; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    requests: mpsc::UnboundedSender<Request>,
    /// Tracepoint categories ("ext4", "xfs") with at least one attached program.
    categories: Vec<&'static str>,
    sees_region_changes: bool,
    counting: Option<Arc<Counting>>,
    counting_unavailable: Option<String>,
    watches_new_files: bool,
}

/// One file's share of the events.
pub struct EventFeed {
    key: InodeKey,
    events: mpsc::UnboundedReceiver<Feed>,
    hub: Hub,
    counted: Option<CountedFile>,
}

impl Hub {
    /// Starts the routing task on the current tokio runtime.
    pub fn spawn(tracer: Tracer) -> Hub {
        let mut categories: Vec<&'static str> =
            tracer.attached().iter().map(|t| t.category).collect();
        categories.dedup();
        let sees_region_changes = tracer.sees_region_changes();
        let counting = tracer.counting().cloned();
        let counting_unavailable = tracer.counting_unavailable().map(str::to_string);
        let watches_new_files = tracer.watches_new_files();
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(Router::new(tracer).run(receiver));
        Hub {
            requests,
            categories,
            sees_region_changes,
            counting,
            counting_unavailable,
            watches_new_files,
        }
    }

    /// The in-kernel counting of the watched files' IO, when this kernel allows it.
    pub fn counting(&self) -> Option<&Arc<Counting>> {
        self.counting.as_ref()
    }

    /// Why the kernel does not count the files' IO, when it does not.
    pub fn counting_unavailable(&self) -> Option<&str> {
        self.counting_unavailable.as_deref()
    }

    /// Whether feeds hear of other processes' region changes (so groups need no polling).
    pub fn sees_region_changes(&self) -> bool {
        self.sees_region_changes
    }

    /// Whether any program watches file systems of this tracepoint category.
    pub fn covers(&self, category: &str) -> bool {
        self.categories.contains(&category)
    }

    /// Watches an inode (the file at `path`); returns once the kernel filters on it. With
    /// `placement` (where its blocks lie on its dm device) and the counting on, the kernel also
    /// counts its IO, with a latency histogram of `bounds`; `base` is what an earlier daemon
    /// counted. A file the kernel watched from birth keeps what it counted since.
    pub async fn watch(
        &self,
        key: InodeKey,
        path: &Path,
        placement: Option<Placement>,
        bounds: Bounds,
        base: FileCounters,
    ) -> anyhow::Result<EventFeed> {
        let counted = placement
            .filter(|_| self.counting.is_some())
            .map(|placement| {
                Box::new(Counted {
                    placement,
                    bounds,
                    base,
                })
            });
        let (feed, events) = mpsc::unbounded_channel();
        let (done, ack) = oneshot::channel();
        let stopped = || anyhow::anyhow!("the eBPF event task has stopped");
        let request = Request::Watch {
            key,
            path: path.to_path_buf(),
            counted,
            feed,
            done,
        };
        let counted = match self.requests.send(request) {
            Ok(()) => ack.await.map_err(|_| stopped()).and_then(|r| r)?,
            Err(_) => return Err(stopped()),
        };
        Ok(EventFeed {
            key,
            events,
            hub: self.clone(),
            counted,
        })
    }

    /// Says that the counted inode `key` (of generation `generation`) is `path`'s and that
    /// the kernel's map holds its sectors: `filemapd report` lists it from now on.
    pub async fn name(&self, key: InodeKey, generation: u32, path: &Path) {
        let (done, ack) = oneshot::channel();
        let request = Request::Named(key, generation, path.to_path_buf(), done);
        if self.requests.send(request).is_ok() {
            let _ = ack.await;
        }
    }

    /// Has the kernel watch (and count) every regular file made in `dir` from birth, until
    /// [`Hub::unwatch_directory`]; returns once it does. Nothing where the kernel cannot
    /// (said once at start).
    pub async fn watch_directory(&self, dir: &Path) -> anyhow::Result<()> {
        if !self.watches_new_files {
            return Ok(());
        }
        use anyhow::Context as _;
        let file =
            std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        let id = crate::file::identity::FileId::of(&file.metadata()?);
        let placement = crate::file::placement::of(&file, id)
            .with_context(|| format!("{}: its new files cannot be counted", dir.display()))?;
        let (done, ack) = oneshot::channel();
        let _ = self.requests.send(Request::WatchDirectory(
            id.inode_key(),
            dir.to_path_buf(),
            Some(placement),
            done,
        ));
        let _ = ack.await;
        Ok(())
    }

    /// Once the files are taken up: this daemon's IO probe counts from now on, a stopped
    /// service's (whose programs counted through the gap) no more, and what that one counted
    /// since each file was taken up is added to the file's counters. Returns once done.
    pub async fn take_over(&self) {
        let (done, ack) = oneshot::channel();
        if self.requests.send(Request::TakeOver(done)).is_ok() {
            let _ = ack.await;
        }
    }

    pub fn unwatch_directory(&self, dir: &Path) {
        if let Ok(metadata) = std::fs::metadata(dir) {
            let key = crate::file::identity::FileId::of(&metadata).inode_key();
            let (done, _) = oneshot::channel();
            let _ = self
                .requests
                .send(Request::WatchDirectory(key, dir.to_path_buf(), None, done));
        }
    }
}

impl EventFeed {
    /// The file's slot in the in-kernel counting, when it has one.
    pub fn counted(&self) -> Option<&CountedFile> {
        self.counted.as_ref()
    }

    /// Waits for the next events of this inode and returns all that are queued.
    pub async fn next(&mut self) -> anyhow::Result<Vec<Feed>> {
        let first = self
            .events
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("the eBPF event task has stopped"))?;
        let mut batch = vec![first];
        while let Ok(more) = self.events.try_recv() {
            batch.push(more);
        }
        Ok(batch)
    }
}

impl Drop for EventFeed {
    fn drop(&mut self) {
        // A daemon stopping for a successor leaves its files in the kernel's watch list (and
        // so in its pinned maps), where their counters wait for the next daemon.
        if keeping_for_successor() {
            return;
        }
        let slot = self.counted.as_ref().map(|c| c.slot);
        let _ = self.hub.requests.send(Request::Unwatch(self.key, slot));
    }
}

/// How long a file the kernel watched from birth may wait for its monitor before it is let go
/// (if its directory no longer holds it; a file that waits for its first extent stays).
const BIRTH_UNCLAIMED: Duration = Duration::from_secs(30);

/// A file the kernel watches from birth, not yet taken up.
struct Birth {
    slot: u32,
    dir: InodeKey,
    at: Instant,
}

/// A file a stopped service's programs count until this daemon takes over.
struct Bridged {
    /// Its slot in the stopped service's counters, and what they held when it was taken up.
    their_slot: u32,
    taken_up_at: FileCounters,
    /// Its slot here.
    slot: u32,
}

/// The routing task's state.
struct Router {
    tracer: Tracer,
    feeds: HashMap<InodeKey, mpsc::UnboundedSender<Feed>>,
    lost_seen: u64,
    /// The files the kernel counts, by name, for `filemapd report`.
    names: NamesFile,
    births: HashMap<InodeKey, Birth>,
    /// The slots put in the kernel's spare table and not yet heard of as taken.
    spares: std::collections::HashSet<u32>,
    directories: HashMap<InodeKey, PathBuf>,
    /// What daemons that no longer run counted, for the files they watched.
    leftovers: Leftovers,
    bridged: HashMap<InodeKey, Bridged>,
}

impl Router {
    fn new(tracer: Tracer) -> Self {
        let mut router = Self {
            tracer,
            feeds: HashMap::new(),
            lost_seen: 0,
            names: NamesFile::new(),
            births: HashMap::new(),
            spares: Default::default(),
            directories: HashMap::new(),
            leftovers: Leftovers::default(),
            bridged: HashMap::new(),
        };
        if router.tracer.counting().is_some() {
            router.leftovers = Leftovers::gather(router.tracer.predecessor());
        }
        router
    }

    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        loop {
            let names_due = self.names.due();
            let write_names = async {
                match names_due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let sweep_due = self.births.values().map(|b| b.at + BIRTH_UNCLAIMED).min();
            let sweep = async {
                match sweep_due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = write_names => self.names.write_if_due(),
                _ = sweep => self.let_go_of_unclaimed_births(),
                request = requests.recv() => match request {
                    None => return, // every Hub handle is gone
                    Some(request) => self.serve(request),
                },
                events = self.tracer.next_events() => match events {
                    Ok(events) => self.route(events),
                    Err(e) => {
                        log::error!("reading eBPF events: {e:#}");
                        return;
                    }
                },
            }
        }
    }

    fn serve(&mut self, request: Request) {
        match request {
            Request::Watch {
                key,
                path,
                counted,
                feed,
                done,
            } => {
                let result = self.watch(key, &path, counted);
                if result.is_ok() {
                    self.feeds.insert(key, feed);
                }
                let _ = done.send(result);
            }
            Request::Named(key, generation, path, done) => {
                // Written now when due now: before the watch is said to start.
                self.names.insert(key, generation, path);
                self.names.write_if_due();
                let _ = done.send(());
            }
            Request::Unwatch(key, slot) => {
                self.bridged.remove(&key);
                self.names.remove(&key);
                self.feeds.remove(&key);
                if let Err(e) = self.tracer.unwatch(key) {
                    log::warn!("{e:#}");
                }
                if let (Some(slot), Some(counting)) = (slot, self.tracer.counting()) {
                    counting.close(slot);
                }
            }
            Request::WatchDirectory(key, path, Some(placement), done) => {
                match self.tracer.watch_directory(key, placement) {
                    Ok(()) => {
                        self.directories.insert(key, path);
                        // Slots ready for the directory's new files (only once directories
                        // are watched: a daemon of one file has room for one).
                        self.fill_spares();
                    }
                    Err(e) => log::warn!(
                        "{}: the kernel does not watch its new files from birth: {e:#}",
                        path.display()
                    ),
                }
                let _ = done.send(());
            }
            Request::WatchDirectory(key, _, None, _) => {
                self.tracer.unwatch_directory(key);
                self.directories.remove(&key);
            }
            Request::TakeOver(done) => {
                self.take_over();
                let _ = done.send(());
            }
        }
    }

    /// The slot the kernel gave the inode from birth, if it did: heard of already, or found
    /// in the kernel's watch list (its event may still wait in the ring).
    fn birth_slot(&mut self, key: InodeKey) -> Option<u32> {
        if let Some(birth) = self.births.remove(&key) {
            return Some(birth.slot);
        }
        let placement = self.tracer.watched(key)?;
        (placement.dm_dev != 0 && self.spares.remove(&placement.slot)).then_some(placement.slot)
    }

    /// Watches an inode, in the slot the kernel gave it from birth or a new one.
    fn watch(
        &mut self,
        key: InodeKey,
        path: &Path,
        counted: Option<Box<Counted>>,
    ) -> anyhow::Result<Option<CountedFile>> {
        let born = self.birth_slot(key);
        let file = match (counted, self.tracer.counting()) {
            (Some(c), Some(counting)) => {
                let mut base = c.base;
                let claim = self.leftovers.claim(key, c.placement.generation);
                if let Some(claim) = &claim {
                    log::info!(
                        "{}: carries over what daemon {} counted ({})",
                        path.display(),
                        claim.pid,
                        super::counting::describe(&claim.counters)
                    );
                    if claim.still_counted_in.is_none() {
                        base.add(&claim.counters);
                    }
                }
                let file = match born {
                    Some(slot) => Some(counting.adopt(slot, c.placement.dm_dev, c.bounds)),
                    None => counting
                        .open(c.placement.dm_dev, c.bounds, base)
                        .unwrap_or_else(|e| {
                            log::warn!("no in-kernel counting for inode {}: {e:#}", key.ino);
                            None
                        }),
                };
                // Still counted by a stopped service: what it counted so far is added now
                // (nothing counts in the new slot before the take-over), the rest then.
                if let (Some(file), Some(claim)) = (&file, &claim)
                    && let Some(their_slot) = claim.still_counted_in
                {
                    match counting.carry(file.slot, &claim.counters) {
                        Ok(()) => {
                            self.bridged.insert(
                                key,
                                Bridged {
                                    their_slot,
                                    taken_up_at: claim.counters,
                                    slot: file.slot,
                                },
                            );
                        }
                        Err(e) => log::warn!(
                            "{}: what daemon {} counted is not carried over: {e:#}",
                            path.display(),
                            claim.pid
                        ),
                    }
                }
                file.map(|file| (file, c.placement))
            }
            _ => {
                // Born watched but not to be counted after all.
                if let (Some(slot), Some(counting)) = (born, self.tracer.counting()) {
                    counting.close(slot);
                }
                None
            }
        };
        let placement = match &file {
            Some((file, placement)) => Placement {
                slot: file.slot,
                ..*placement
            },
            // Not counted: the kernel only filters.
            None => Placement::default(),
        };
        if let Err(e) = self.tracer.watch(key, placement) {
            if let (Some((file, _)), Some(counting)) = (&file, self.tracer.counting()) {
                counting.close(file.slot);
            }
            return Err(e);
        }
        Ok(file.map(|(file, _)| file))
    }

    /// See [`Hub::take_over`].
    fn take_over(&mut self) {
        let Some(pid) = self.tracer.predecessor() else {
            return;
        };
        if let Err(e) = self.tracer.take_over() {
            log::warn!("daemon {pid}'s programs go on counting: {e:#}");
            return;
        }
        let Some(counting) = self.tracer.counting().cloned() else {
            return;
        };
        let mut sectors = 0;
        for (key, bridged) in std::mem::take(&mut self.bridged) {
            let Some(last) = self.leftovers.settle(key, bridged.their_slot) else {
                continue;
            };
            let since = last.since(&bridged.taken_up_at);
            sectors += since.read_sectors + since.write_sectors;
            if let Err(e) = counting.carry(bridged.slot, &since) {
                log::warn!(
                    "inode {}: the IO counted while taking it up is lost: {e:#}",
                    key.ino
                );
            }
        }
        self.tracer.detach_predecessor();
        self.leftovers.end_bridge();
        log::info!(
            "took the counting over from daemon {pid} ({sectors} sector(s) of IO it counted while this one took the files up)"
        );
    }

    fn route(&mut self, events: Vec<ExtentEvent>) {
        for event in events {
            match event.source {
                tracepoint::DM_STATS_CHANGED => {
                    for feed in self.feeds.values() {
                        let _ = feed.send(Feed::RegionsChanged);
                    }
                }
                tracepoint::NEW_FILE => self.born(&event),
                _ => {
                    if let Some(feed) = self.feeds.get(&event.key) {
                        let _ = feed.send(Feed::Event(Box::new(event)));
                    }
                }
            }
        }
        let lost = self.tracer.lost_events().unwrap_or(self.lost_seen);
        if lost != self.lost_seen {
            log::warn!(
                "{} eBPF event(s) lost: mapping every file again",
                lost - self.lost_seen
            );
            self.lost_seen = lost;
            for feed in self.feeds.values() {
                let _ = feed.send(Feed::Lost);
            }
        }
    }

    /// The kernel watches a file made in a watched directory: its slot waits for the file's
    /// monitor, and the spare it was is replaced.
    fn born(&mut self, event: &ExtentEvent) {
        let slot = event.start as u32;
        log::debug!(
            "inode {} made in directory {}: counted from birth in slot {slot}",
            event.key.ino,
            event.length,
        );
        // Its monitor took the slot over already (see `birth_slot`).
        if !self.spares.remove(&slot) {
            self.fill_spares();
            return;
        }
        self.births.insert(
            event.key,
            Birth {
                slot: event.start as u32,
                dir: InodeKey {
                    dev: event.key.dev,
                    _pad: 0,
                    ino: event.length,
                },
                at: Instant::now(),
            },
        );
        self.fill_spares();
    }

    /// Puts a reserved slot in every empty place of the kernel's spare table.
    fn fill_spares(&mut self) {
        let Some(counting) = self.tracer.counting().cloned() else {
            return;
        };
        for place in self.tracer.empty_spare_places() {
            let slot = match counting.reserve(Bounds::default(), FileCounters::default()) {
                Ok(Some(slot)) => slot,
                Ok(None) => {
                    log::warn!("no slot left for the files made in watched directories");
                    return;
                }
                Err(e) => {
                    log::warn!("reserving a slot for a new file: {e:#}");
                    return;
                }
            };
            if let Err(e) = self.tracer.put_spare(place, slot) {
                log::warn!("{e:#}");
                counting.close(slot);
                return;
            }
            self.spares.insert(slot);
        }
    }

    /// Files watched from birth that no monitor took up within `BIRTH_UNCLAIMED` and that
    /// their directory no longer holds (made and removed, renamed away) are let go.
    fn let_go_of_unclaimed_births(&mut self) {
        let now = Instant::now();
        let due: Vec<InodeKey> = self
            .births
            .iter()
            .filter(|(_, b)| now >= b.at + BIRTH_UNCLAIMED)
            .map(|(key, _)| *key)
            .collect();
        for key in due {
            let Some(birth) = self.births.get_mut(&key) else {
                continue;
            };
            let still_there = self
                .directories
                .get(&birth.dir)
                .is_some_and(|dir| holds_inode(dir, key.ino));
            if still_there {
                // Waiting for its first extent (a group is made only then): look again later.
                birth.at = now;
                continue;
            }
            let slot = birth.slot;
            self.births.remove(&key);
            log::debug!("inode {} left its directory untaken: let go", key.ino);
            let _ = self.tracer.unwatch(key);
            if let Some(counting) = self.tracer.counting() {
                counting.close(slot);
            }
        }
    }
}

/// Whether the directory has an entry for inode `ino`.
fn holds_inode(dir: &Path, ino: u64) -> bool {
    use std::os::unix::fs::DirEntryExt as _;
    std::fs::read_dir(dir).is_ok_and(|entries| entries.flatten().any(|e| e.ino() == ino))
}
