//! The daemon: one file, one group, one loop. Each pass: is the group still there, does the
//! file (or, in path mode, the file at the path) still match its regions, wait, is the file
//! gone. All dm and FIEMAP details live in other modules.
use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{debug, info};

use crate::{
    args::{DaemonArgs, FollowMode},
    dmstats::StatsDevice,
    fiemap,
    file_device::{FileId, check_mappable},
    follow,
    group::Group,
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

/// What the last look at the file saw; a change means the regions may be stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileState {
    blocks: u64,
    size: u64,
    /// Extents without a place yet (delayed allocation): look again until they have one.
    unplaced: bool,
}

pub struct Monitor {
    path: PathBuf,
    mode: FollowMode,
    file: File,
    file_id: FileId,
    device: StatsDevice,
    group_id: u64,
    interval: Duration,
    last: Option<FileState>,
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
        let metadata = check_mappable(&file, &args.path)?;
        let device = StatsDevice::for_st_dev(metadata.dev())
            .with_context(|| format!("{} is not on a device-mapper device", args.path.display()))?;
        if Group::load(&device, args.group_id)?.is_none() {
            bail!("group {} does not exist on {}", args.group_id, device.name());
        }
        Ok(Self {
            path: args.path.clone(),
            mode: args.mode,
            file_id: FileId::of(&metadata),
            file,
            device,
            group_id: args.group_id,
            interval,
            last: None,
        })
    }

    /// Descriptors the daemon still needs after detaching.
    pub fn open_fds(&self) -> Vec<i32> {
        vec![self.file.as_raw_fd(), self.device.control_fd()]
    }

    pub async fn run(&mut self) -> anyhow::Result<Exit> {
        loop {
            let Some(group) = Group::load(&self.device, self.group_id)? else {
                return Ok(Exit::GroupRemoved);
            };
            self.group_id = group.id;
            if self.mode == FollowMode::Path {
                self.follow_path()?;
            }
            if self.changed()? && self.update(&group)? {
                return Ok(Exit::NoExtents);
            }
            debug!("Waiting for check interval");
            tokio::time::sleep(self.interval).await;
            if self.mode == FollowMode::Inode
                && follow::unlinked(&self.file)?
                && !follow::held_elsewhere(self.file_id)
            {
                return Ok(Exit::UnlinkedAndClosed);
            }
        }
    }

    /// Whether the file may have new or fewer extents since the last update.
    fn changed(&self) -> anyhow::Result<bool> {
        let Some(last) = self.last else { return Ok(true) };
        let m = self.file.metadata().context("fstat of the monitored file")?;
        Ok(last.unplaced || (m.blocks(), m.size()) != (last.blocks, last.size))
    }

    /// Maps the file and brings the group in line. Returns true when the file has no extents.
    fn update(&mut self, group: &Group) -> anyhow::Result<bool> {
        let metadata = self.file.metadata().context("fstat of the monitored file")?;
        let extents = fiemap::read_extents(&self.file, 0, u64::MAX, false)
            .with_context(|| format!("FIEMAP of {}", self.path.display()))?;
        let unplaced = extents.iter().any(|e| !e.is_placed());
        self.last = Some(FileState { blocks: metadata.blocks(), size: metadata.size(), unplaced });
        if extents.is_empty() {
            return Ok(true);
        }
        let ranges = fiemap::device_ranges(&extents);
        if ranges.is_empty() {
            debug!("all extents of {} await allocation", self.path.display());
            return Ok(false);
        }
        let outcome = group.update(&self.device, &ranges)?;
        if outcome.created + outcome.deleted > 0 {
            info!(
                "Updated group {}: {} region(s), {} created, {} deleted",
                outcome.group_id,
                ranges.len(),
                outcome.created,
                outcome.deleted
            );
        }
        self.group_id = outcome.group_id;
        Ok(false)
    }

    /// Path mode: if the path now names another file, switch to it (same device only).
    fn follow_path(&mut self) -> anyhow::Result<()> {
        if follow::id_at(&self.path) == Some(self.file_id) {
            return Ok(());
        }
        let file = follow::reopen(&self.path)?;
        let metadata = check_mappable(&file, &self.path)?;
        let id = FileId::of(&metadata);
        if id.st_dev != self.file_id.st_dev {
            bail!("{} moved to another device", self.path.display());
        }
        info!("{} was replaced (inode {} -> {})", self.path.display(), self.file_id.ino, id.ino);
        self.file = file;
        self.file_id = id;
        self.last = None;
        Ok(())
    }
}
