//! The torture's files and what keeps each one's group: a daemon Debian's dmstats launched
//! (polling in inode mode, eBPF in path mode) or the shared `filemapd watch`.
use std::{
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    daemon::{
        CONVERGE, EXIT, device_of, drop_in_dir, drop_in_search_path, filemapd_binary,
        group_by_alias,
    },
    map_without_daemon, pids_of, run, run_env, wait_for_exit, wait_until,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keeper {
    /// `dmstats create --filemap --follow inode`, filemapd polling as lvm2 does.
    PollingInode,
    /// `dmstats create --filemap --follow path` with FILEMAPD_EBPF=1.
    EbpfPath,
    /// A group made with `--nomonitor`, kept by the one `filemapd watch --ebpf`.
    Watch,
}

impl Keeper {
    pub const ALL: [Keeper; 3] = [Keeper::PollingInode, Keeper::EbpfPath, Keeper::Watch];

    pub fn mode(self) -> &'static str {
        match self {
            Keeper::EbpfPath => "path",
            Keeper::PollingInode | Keeper::Watch => "inode",
        }
    }

    fn env(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Keeper::EbpfPath => vec![("FILEMAPD_EBPF", "1")],
            _ => Vec::new(),
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Keeper::PollingInode => "polling-inode.img",
            Keeper::EbpfPath => "ebpf-path.img",
            Keeper::Watch => "watched.img",
        }
    }
}

/// One watched file on one file system.
pub struct Slot {
    pub keeper: Keeper,
    pub path: PathBuf,
    /// The dm device's name.
    pub device: String,
    pub xfs: bool,
    /// The last group id seen: a daemon relaunched after a kill mid-move needs the old one.
    pub group_id: u64,
    /// The dmstats-launched daemon (not for [`Keeper::Watch`]).
    pub pid: Option<i32>,
    /// The unlinked file, held open by the torture.
    pub held: Option<fs::File>,
    /// Files made so far (a new file replaces one unlinked and closed).
    pub generation: u32,
}

impl Slot {
    /// Makes the file and its group; a dmstats-launched keeper starts at once.
    pub fn new(keeper: Keeper, dir: &Path, device: &str, xfs: bool) -> anyhow::Result<Self> {
        let mut slot = Slot {
            keeper,
            path: dir.join(keeper.file_name()),
            device: device.to_string(),
            xfs,
            group_id: 0,
            pid: None,
            held: None,
            generation: 0,
        };
        slot.start_new_file()?;
        Ok(slot)
    }

    pub fn alias(&self) -> String {
        self.keeper.file_name().to_string()
    }

    pub fn name(&self) -> String {
        format!("{}/{}", if self.xfs { "xfs" } else { "ext4" }, self.alias())
    }

    /// Where to reach the file: its path, or the held descriptor once it is unlinked.
    pub fn io_path(&self) -> PathBuf {
        match &self.held {
            Some(file) => PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
            None => self.path.clone(),
        }
    }

    /// The file as another process can open it: the path, or the torture's held descriptor
    /// through /proc once the file is unlinked (inode mode follows the inode, not the name).
    pub fn path_for_others(&self) -> PathBuf {
        match &self.held {
            Some(file) => PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                file.as_raw_fd()
            )),
            None => self.path.clone(),
        }
    }

    /// A fresh file at the path and a group for it, mapped the way the keeper's users map.
    pub fn start_new_file(&mut self) -> anyhow::Result<()> {
        super::ops::make_file(&self.path, 1 << 20)?;
        self.generation += 1;
        let path = self.path.to_string_lossy().into_owned();
        self.group_id = match self.keeper {
            Keeper::Watch => map_without_daemon(&self.path)?,
            keeper => {
                let search_path = drop_in_search_path();
                let mut env = keeper.env();
                env.push(("PATH", &search_path));
                let out = run_env(
                    "dmstats",
                    &["create", "--filemap", "--follow", keeper.mode(), &path],
                    &env,
                )?;
                let id = crate::created_group_id(&out)?;
                self.pid = Some(find_daemon(&path)?);
                id
            }
        };
        Ok(())
    }

    /// The group's current id, by its alias; the last one known while a move is unfinished.
    /// The group's id now: its leader's, or, while a killed daemon left the group moving,
    /// the old leader's (its MOVED marker names the group), as its user would still know it.
    pub fn current_group_id(&self) -> u64 {
        let device = device_of(&self.mount_dir());
        if let Some((id, _)) = group_by_alias(&device, &self.alias()) {
            return id;
        }
        let moving = format!("DMS_FILEMAPD_MOVED={}:", self.alias());
        device
            .list(None)
            .ok()
            .and_then(|regions| {
                regions
                    .iter()
                    .find(|r| r.aux_data.starts_with(&moving))
                    .map(|r| r.id)
            })
            .unwrap_or(self.group_id)
    }

    fn mount_dir(&self) -> PathBuf {
        self.path.parent().unwrap().to_path_buf()
    }

    /// SIGKILLs the slot's daemon and starts it again. `by_dmstats`: as an administrator would
    /// after a quiet kill, with a hand-run `dmstats update_filemap` (lvm2's tool does not know
    /// filemapd's in-flight markers, so only for a group left consistent); otherwise as dmstats
    /// launches it (`dmfilemapd FD GROUP PATH MODE 0 0`), which finishes an interrupted update.
    pub fn kill_and_relaunch(&mut self, by_dmstats: bool) -> anyhow::Result<()> {
        let pid = self.pid.context("no daemon of ours to kill")?;
        crate::send_signal(pid, nix::sys::signal::SIGKILL);
        ensure!(
            wait_for_exit(pid, EXIT)?,
            "daemon {pid} survived SIGKILL for {EXIT:?}: {}",
            where_it_is(pid)
        );
        self.group_id = self.current_group_id();
        let path = self.path.to_string_lossy().into_owned();
        let mut env = self.keeper.env();
        if by_dmstats {
            let search_path = drop_in_search_path();
            env.push(("PATH", &search_path));
            let out = run_env(
                "dmstats",
                &[
                    "update_filemap",
                    "--follow",
                    self.keeper.mode(),
                    "--groupid",
                    &self.group_id.to_string(),
                    &path,
                ],
                &env,
            )?;
            // "... group ID changed from A to B" when lvm2 had to move the leader.
            if let Some(new) = out
                .rsplit("to ")
                .next()
                .and_then(|t| t.trim().trim_end_matches('.').parse().ok())
            {
                self.group_id = new;
            }
        } else {
            let file = fs::File::open(self.io_path())?;
            // Verbose, with its log kept for a failure report.
            let status = Command::new(drop_in_dir().join("dmfilemapd"))
                .args([
                    "0",
                    &self.group_id.to_string(),
                    &path,
                    self.keeper.mode(),
                    "0",
                    "2",
                ])
                .stdin(file)
                .stdout(Stdio::null())
                .stderr(
                    fs::File::options()
                        .create(true)
                        .append(true)
                        .open(self.log_path())?,
                )
                .envs(env.iter().copied())
                .status()?;
            ensure!(status.success(), "relaunched dmfilemapd failed: {status}");
        }
        self.pid = Some(find_daemon(&path)?);
        Ok(())
    }

    /// Closes the held, unlinked file: its (inode-mode) daemon must exit; the group it leaves
    /// is deleted as its user would, and the slot starts over with a new file.
    /// Deletes the group of a file whose held descriptor `release_held` closed, once its
    /// daemon has exited, and starts a new file in its place.
    pub fn close_held(&mut self) -> anyhow::Result<()> {
        self.release_held();
        if let Some(pid) = self.pid.take() {
            ensure!(
                wait_for_exit(pid, EXIT)?,
                "daemon {pid} still runs {EXIT:?} after its unlinked file was closed"
            );
        }
        let id = self.current_group_id();
        run(
            "dmstats",
            &["delete", "--groupid", &id.to_string(), &self.device],
        )?;
        self.start_new_file()
    }

    /// Closes the descriptor that kept an unlinked file alive.
    pub fn release_held(&mut self) {
        self.held = None;
    }

    /// Where a relaunched daemon logs (dmstats-launched ones log nowhere at verbose 0).
    pub fn log_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/tmp/torture-{}-{}.log",
            if self.xfs { "xfs" } else { "ext4" },
            self.alias()
        ))
    }

    /// The last lines of the relaunched daemons' log.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Whether the slot's daemon (if it has its own) still runs.
    pub fn daemon_alive(&self) -> bool {
        self.pid.is_none_or(alive)
    }

    pub fn rss_kib(&self) -> Option<u64> {
        self.pid.map(rss_kib)
    }
}

/// The one dmfilemapd running on `path` (dmstats double-forks it: it shows up shortly after).
fn find_daemon(path: &str) -> anyhow::Result<i32> {
    let mut pids = Vec::new();
    wait_until("dmfilemapd to start", CONVERGE, || {
        pids = pids_of("dmfilemapd", path);
        Ok(!pids.is_empty())
    })?;
    if pids.len() != 1 {
        bail!("{} daemons for {path}: {pids:?}", pids.len());
    }
    Ok(pids[0])
}

/// Where a process that should be gone is: its state, the kernel function it waits in, and
/// its kernel stack.
fn where_it_is(pid: i32) -> String {
    let read = |what: &str| fs::read_to_string(format!("/proc/{pid}/{what}")).unwrap_or_default();
    let state = read("status")
        .lines()
        .filter(|l| l.starts_with("State:") || l.starts_with("PPid:") || l.starts_with("Name:"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{state}; wchan {}; stack:\n{}",
        read("wchan"),
        read("stack")
    )
}

/// Running and not a zombie.
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    })
}

/// Anonymous resident memory (`RssAnon`), what a leak grows. Not `VmRSS`: that also counts
/// the pages of the (debug) binary, which fault in as code runs for the first time. With
/// seed 1795800087364487081 on 6.1, an EbpfPath daemon's VmRSS grew 3088 KiB after warm-up
/// and its RssAnon 1524 KiB, in one step.
pub fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| crate::status_field(&s, "RssAnon:"))
        .unwrap_or(0)
}

/// The one `filemapd watch --ebpf` keeping every [`Keeper::Watch`] slot's group.
pub struct Watcher {
    child: Child,
    log: PathBuf,
}

impl Watcher {
    pub fn start(slots: &[&Slot], scratch: &Path) -> anyhow::Result<Self> {
        let config = scratch.join("watch.conf");
        let log = scratch.join("watch.log");
        let lines: String = slots
            .iter()
            .map(|s| {
                format!(
                    "{} inode {}\n",
                    s.current_group_id(),
                    s.path_for_others().display()
                )
            })
            .collect();
        fs::write(&config, lines)?;
        let child = Command::new(filemapd_binary())
            .args(["watch", "--ebpf", "-vv", "--config"])
            .arg(&config)
            .stderr(fs::File::create(&log)?)
            .stdout(Stdio::null())
            .stdin(Stdio::null())
            .spawn()?;
        // Ready once it has opened every file (a file unlinked before that could not be).
        // Verifying the eBPF programs alone takes 10-15 s in the emulated VM when it is idle,
        // and the storm's other work can double that.
        wait_until("filemapd watch to start", 3 * CONVERGE, || {
            Ok(fs::read_to_string(&log)?.contains(&format!("watching {} file(s)", slots.len())))
        })?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, then a new watch over the same files with their groups' current ids (a group
    /// whose leader moved has a new id; the operator's config would need it too).
    pub fn kill_and_restart(&mut self, slots: &[&Slot], scratch: &Path) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        *self = Watcher::start(slots, scratch)?;
        Ok(())
    }

    /// The watch's log, for a failure report.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// How many files the watch has let go since it started (their last holder closed them).
    pub fn files_let_go(&self) -> usize {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        log.matches(LET_GO).count()
    }

    /// Waits until the watch has let more than `before` files go: it may still be updating
    /// the file's group after the close (a move changes the group's id), so its group is
    /// only the torture's to delete once the watch is done with it.
    pub fn wait_until_let_go(&self, before: usize) -> anyhow::Result<()> {
        wait_until("the watch to let a closed file go", CONVERGE, || {
            Ok(self.files_let_go() > before)
        })
    }
}

/// What the watch logs when it stops following an unlinked file nobody holds any more.
const LET_GO: &str = "File unlinked and closed";

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
