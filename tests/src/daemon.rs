//! Driving filemapd in the device-mapper VM: launching it as dmstats does or by hand, reading
//! its log, and checking its group against the file (FIEMAP) and against `dmstats list`.
use std::{
    fs,
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use filemapd::{
    file::view,
    sectors::{SectorRange, join_adjacent},
    stats::{Region, StatsDevice},
};

use crate::{
    DmFs, created_group_id, dmstats_group_rows, pids_of, run, run_env, wait_until, write_and_sync,
};

/// Generous bounds for an emulated VM; only reached when something is wrong.
pub const CONVERGE: Duration = Duration::from_secs(30);
pub const EXIT: Duration = Duration::from_secs(30);

/// A directory holding `dmfilemapd` → filemapd, to put first on dmstats' PATH.
pub fn drop_in_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let filemapd = exe.parent().unwrap().parent().unwrap().join("filemapd");
    assert!(
        filemapd.is_file(),
        "{} is missing: build it with `cargo build -p filemapd`",
        filemapd.display()
    );
    let dir = PathBuf::from("/tmp/filemapd-drop-in");
    fs::create_dir_all(&dir).unwrap();
    let link = dir.join("dmfilemapd");
    let _ = fs::remove_file(&link);
    symlink(&filemapd, &link).unwrap();
    dir
}

/// `dmstats create --filemap EXTRA... PATH` with filemapd as dmfilemapd; returns the group id
/// and the pid of the daemon dmstats started.
pub fn map_and_monitor(path: &Path, extra: &[&str]) -> (u64, i32) {
    map_and_monitor_with(path, extra, &[])
}

/// A PATH for dmstats that finds filemapd as `dmfilemapd` first.
pub fn drop_in_search_path() -> String {
    format!(
        "{}:{}",
        drop_in_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// [`map_and_monitor`] with more variables in dmstats' environment (which its daemon gets).
pub fn map_and_monitor_with(path: &Path, extra: &[&str], env: &[(&str, &str)]) -> (u64, i32) {
    let search_path = drop_in_search_path();
    let mut args = vec!["create", "--filemap"];
    args.extend(extra);
    let path_arg = path.to_string_lossy();
    args.push(&path_arg);
    let mut env = env.to_vec();
    env.push(("PATH", &search_path));
    let group_id = created_group_id(&run_env("dmstats", &args, &env).unwrap()).unwrap();
    // dmstats double-forks before exec: the daemon appears shortly after dmstats returns.
    let mut pids = Vec::new();
    wait_until("dmstats to start dmfilemapd", CONVERGE, || {
        pids = pids_of("dmfilemapd", &path_arg);
        Ok(!pids.is_empty())
    })
    .unwrap();
    assert_eq!(
        pids.len(),
        1,
        "more than one daemon for {path_arg}: {pids:?}"
    );
    (group_id, pids[0])
}

pub fn device_of(path: &Path) -> StatsDevice {
    StatsDevice::for_st_dev(fs::metadata(path).unwrap().dev()).unwrap()
}

/// The file's extents as regions should be, sorted.
pub fn file_ranges(path: &Path) -> Vec<SectorRange> {
    file_ranges_of(&fs::File::open(path).unwrap())
}

/// [`file_ranges`] through a descriptor already open: on a frozen xfs, closing one can block
/// until the thaw (the close trims post-EOF blocks, which takes a transaction).
pub fn file_ranges_of(file: &fs::File) -> Vec<SectorRange> {
    // Cut at the end of the file, as the daemon's regions are.
    let mut ranges = view::data_ranges(file, false).unwrap();
    ranges.sort_unstable();
    ranges
}

/// The group with this alias: its leader id and member regions.
pub fn group_by_alias(device: &StatsDevice, alias: &str) -> Option<(u64, Vec<Region>)> {
    let regions = device.list(None).unwrap();
    let leader = regions.iter().find(|r| {
        r.group()
            .ok()
            .flatten()
            .is_some_and(|g| g.alias == alias && g.leader() == Some(r.id))
    })?;
    let (leader_id, members) = (leader.id, leader.group().unwrap().unwrap().members);
    let regions = regions
        .into_iter()
        .filter(|r| members.contains(r.id))
        .collect();
    Some((leader_id, regions))
}

/// Whether the group's regions tile the file's extents (each sector in exactly one region;
/// a grown extent may be covered by several), and dmstats lists exactly those regions there.
pub fn converged(dmfs: &DmFs, path: &Path, alias: &str) -> anyhow::Result<bool> {
    converged_on(&dmfs.name, path, alias)
}

/// [`converged`] on the dm device called `device`.
pub fn converged_on(device: &str, path: &Path, alias: &str) -> anyhow::Result<bool> {
    let Some((id, ours, wanted)) = group_and_file(path, alias) else {
        return Ok(false);
    };
    let disjoint = ours.windows(2).all(|w| w[0].end() <= w[1].start);
    Ok(disjoint
        && join_adjacent(ours.clone()) == join_adjacent(wanted.clone())
        && dmstats_rows_of(device, id)? == ours)
}

/// [`converged`], the file's extents read through `held` (see [`file_ranges_of`]).
pub fn converged_held(
    dmfs: &DmFs,
    path: &Path,
    held: &fs::File,
    alias: &str,
) -> anyhow::Result<bool> {
    let Some((id, members)) = group_by_alias(&device_of(path), alias) else {
        return Ok(false);
    };
    let mut ours: Vec<SectorRange> = members.iter().map(|r| r.range).collect();
    ours.sort_unstable();
    let disjoint = ours.windows(2).all(|w| w[0].end() <= w[1].start);
    Ok(disjoint
        && join_adjacent(ours.clone()) == join_adjacent(file_ranges_of(held))
        && dmstats_rows_of(&dmfs.name, id)? == ours)
}

/// Whether the group holds exactly one region per extent (lvm2's mapping, `--exact`).
pub fn converged_exactly(dmfs: &DmFs, path: &Path, alias: &str) -> anyhow::Result<bool> {
    let Some((id, ours, wanted)) = group_and_file(path, alias) else {
        return Ok(false);
    };
    Ok(ours == wanted && dmstats_rows_of(&dmfs.name, id)? == wanted)
}

/// The group's id, its regions (sorted) and the file's extents as regions should be, or
/// `None` while no group has that alias.
fn group_and_file(path: &Path, alias: &str) -> Option<(u64, Vec<SectorRange>, Vec<SectorRange>)> {
    let (id, members) = group_by_alias(&device_of(path), alias)?;
    let mut ours: Vec<SectorRange> = members.iter().map(|r| r.range).collect();
    ours.sort_unstable();
    Some((id, ours, file_ranges(path)))
}

/// The regions `dmstats list` shows in the group, sorted: Debian's tool must read the group
/// as filemapd left it.
fn dmstats_rows_of(device: &str, group_id: u64) -> anyhow::Result<Vec<SectorRange>> {
    let mut listed: Vec<SectorRange> = dmstats_group_rows(device, group_id)?
        .into_iter()
        .map(|(s, l)| SectorRange::new(s, l))
        .collect();
    listed.sort_unstable();
    Ok(listed)
}

/// Waits until `converged` (tiles) holds; on a time-out, panics with both views.
pub fn wait_converged(dmfs: &DmFs, path: &Path, alias: &str, after: &str) {
    wait_for(
        dmfs,
        path,
        &format!("regions to tile the file after {after}"),
        || converged(dmfs, path, alias),
    );
}

/// Waits until `converged_exactly` holds.
pub fn wait_converged_exactly(dmfs: &DmFs, path: &Path, alias: &str, after: &str) {
    wait_for(
        dmfs,
        path,
        &format!("one region per extent after {after}"),
        || converged_exactly(dmfs, path, alias),
    );
}

fn wait_for(dmfs: &DmFs, path: &Path, what: &str, check: impl FnMut() -> anyhow::Result<bool>) {
    wait_until(what, CONVERGE, check).unwrap_or_else(|e| {
        panic!(
            "{e}\nfile: {:?}\ndmstats list:\n{}",
            file_ranges(path),
            run("dmstats", &["list", "--units", "s", &dmfs.name]).unwrap()
        )
    });
}

/// `dmstats delete --groupid` of the group now called `alias` (its id may have changed since
/// it was made); returns that id.
pub fn delete_group(dmfs: &DmFs, path: &Path, alias: &str) -> u64 {
    let (current, _) = group_by_alias(&device_of(path), alias)
        .unwrap_or_else(|| panic!("no group {alias:?} on {}", dmfs.name));
    run(
        "dmstats",
        &["delete", "--groupid", &current.to_string(), &dmfs.name],
    )
    .unwrap();
    current
}

/// [`delete_group`], then waits for the group's daemon `pid` to stop.
pub fn delete_group_and_wait(dmfs: &DmFs, path: &Path, alias: &str, pid: i32) {
    let group = delete_group(dmfs, path, alias);
    assert!(
        crate::wait_for_exit(pid, EXIT).unwrap(),
        "daemon {pid} still runs after its group {group} was deleted"
    );
}

/// The figure before `name` in filemapd's closing tally line ("12 events, 3 passes (...),
/// ... 4 regions created, ...").
pub fn tally_figure(tally: &str, name: &str) -> Option<u64> {
    let words: Vec<&str> = tally.split_whitespace().collect();
    let at = words.iter().position(|w| w.trim_end_matches(',') == name)?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

pub fn append(path: &Path, mib: u64) {
    let len = fs::metadata(path).unwrap().len();
    write_and_sync(path, len, (mib << 20) as usize).unwrap();
}

/// A region of the user's own, outside any group, listed whole (id, place, aux data).
pub fn user_region(dmfs: &DmFs) -> String {
    run(
        "dmstats",
        &["create", "--start", "8", "--length", "16", &dmfs.name],
    )
    .unwrap();
    region_line(dmfs, |r| r.range == SectorRange::new(8, 16))
}

pub fn region_line(dmfs: &DmFs, which: impl Fn(&Region) -> bool) -> String {
    let path = dmfs.mount.dir.clone();
    let regions = device_of(&path).list(None).unwrap();
    let r = regions.iter().find(|r| which(r)).expect("region present");
    format!(
        "{} {} {} {} {:?}",
        r.id, r.range, r.program_id, r.aux_data, r.settings
    )
}

/// Another process that keeps `path` open until killed.
pub fn hold_open(path: &Path) -> std::process::Child {
    Command::new("sleep")
        .arg("600")
        .stdin(fs::File::open(path).unwrap())
        .spawn()
        .unwrap()
}

/// Runs the drop-in in the foreground on the file (as fd 0) and returns (exit code, stderr).
pub fn run_drop_in(args: &[&str], stdin: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(drop_in_dir().join("dmfilemapd"))
        .args(args)
        .stdin(fs::File::open(stdin).unwrap())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A daemon expected to end that keeps running is a failure, not a wait for whatever
    // change might stop it later.
    if !crate::wait_for_exit(child.id() as i32, EXIT).unwrap() {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("dmfilemapd {args:?} with {env:?} did not exit within {EXIT:?}");
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn filemapd_binary() -> PathBuf {
    fs::canonicalize(drop_in_dir().join("dmfilemapd")).unwrap()
}

/// Every region on the device, one line each, for before/after comparisons.
pub fn region_table(path: &Path) -> Vec<String> {
    device_of(path)
        .list(None)
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}: {} {} {} {:?}",
                r.id, r.range, r.program_id, r.aux_data, r.settings
            )
        })
        .collect()
}

/// A foreground daemon whose log lines are read as they come.
pub struct LoggedDaemon {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LoggedDaemon {
    pub fn start(args: &[&str], file: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_program(&filemapd_binary(), args, file, env)
    }

    /// The drop-in `dmfilemapd <fd> <group> <path> inode 1 1`: foreground, its file as stdin.
    pub fn drop_in(file: &Path, group: &str) -> Self {
        let p = file.to_string_lossy().into_owned();
        let args = ["0", group, &p, "inode", "1", "1"];
        Self::start_program(&drop_in_dir().join("dmfilemapd"), &args, file, &[])
    }

    fn start_program(program: &Path, args: &[&str], file: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .stdin(fs::File::open(file).unwrap())
            .stderr(std::process::Stdio::piped())
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// `filemapd --ebpf --interval 3600` in inode mode, foreground: an hour-long interval, so
    /// that only events can make it act in time.
    pub fn ebpf_inode(file: &Path, group: &str, verbose: u8) -> Self {
        Self::ebpf_inode_with(file, group, verbose, &[])
    }

    /// [`LoggedDaemon::ebpf_inode`] with more variables in its environment.
    pub fn ebpf_inode_with(file: &Path, group: &str, verbose: u8, env: &[(&str, &str)]) -> Self {
        let p = file.to_string_lossy().into_owned();
        let verbose = verbose.to_string();
        let args = [
            "--ebpf",
            "--interval",
            "3600",
            "0",
            group,
            &p,
            "inode",
            "1",
            &verbose,
        ];
        Self::start(&args, file, env)
    }

    /// Blocks until a log line containing `text` arrives (the daemon's own event).
    pub fn wait_for_line(&mut self, text: &str) {
        loop {
            match self.lines.recv_timeout(CONVERGE) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(e) => panic!(
                    "no log line with {text:?} ({e}); log so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends it `signal` (SIGTERM ends it between passes, with its tally).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        crate::send_signal(self.child.id() as i32, signal);
    }

    /// Waits up to `EXIT` for the daemon to end by itself; `None` if it still runs.
    pub fn wait_for_exit(&mut self) -> Option<std::process::ExitStatus> {
        if !crate::wait_for_exit(self.child.id() as i32, EXIT).unwrap() {
            return None;
        }
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.try_iter());
        Some(status)
    }

    /// Stops the daemon and returns its whole log.
    pub fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        self.child.wait().unwrap();
        self.seen.extend(self.lines.try_iter());
        std::mem::take(&mut self.seen)
    }
}

impl Drop for LoggedDaemon {
    /// A failing test must not leave its daemon holding the file system, and shows its log.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The reader ends at the killed daemon's end of output.
            while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                self.seen.push(line);
            }
            eprintln!("daemon log:\n{}", self.seen.join("\n"));
        }
    }
}

/// A process run as systemd runs a `Type=notify` service: with a NOTIFY_SOCKET of its own,
/// its output discarded.
pub struct NotifyingService {
    child: std::process::Child,
    notify: std::os::unix::net::UnixDatagram,
}

impl NotifyingService {
    /// Starts `binary ARGS`, its notifications to a socket made at `socket`.
    pub fn start(binary: &Path, args: &[&std::ffi::OsStr], socket: &Path) -> Self {
        let notify = std::os::unix::net::UnixDatagram::bind(socket).unwrap();
        let child = Command::new(binary)
            .args(args)
            .env("NOTIFY_SOCKET", socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, notify }
    }

    /// Waits for READY=1; kills the process and panics when it is not sent within `limit`.
    pub fn wait_ready(&mut self, limit: Duration) {
        self.notify.set_read_timeout(Some(limit)).unwrap();
        let mut said = [0u8; 64];
        match self.notify.recv(&mut said) {
            Ok(len) => assert_eq!(String::from_utf8_lossy(&said[..len]).trim(), "READY=1"),
            Err(e) => {
                let _ = self.child.kill();
                panic!("no READY=1 within {limit:?}: {e}");
            }
        }
    }

    /// Stops it as `systemctl stop` does (SIGTERM) and returns how it ended.
    pub fn stop(mut self) -> std::process::ExitStatus {
        crate::send_signal(self.child.id() as i32, nix::sys::signal::SIGTERM);
        self.child.wait().unwrap()
    }
}
