//! Real parts for the integration tests: image files, loop devices, file systems, dm-linear
//! devices. Each is a guard that undoes itself on drop (also when a test panics), so a run
//! leaves no loop device, mount or dm device behind.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

pub mod daemon;
pub mod metrics;
pub mod torture;
pub mod trace;
pub mod writers;

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    run_env(program, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .env("DM_DISABLE_UDEV", "1")
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Fails with the reason when the test cannot run here.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test needs root (loop devices, mounts, eBPF): run it through `cargo xtask test`"
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
        }
    }

    pub fn mkfs(self, device: &Path) -> anyhow::Result<()> {
        let dev = device.to_str().context("device path")?;
        match self {
            FsKind::Ext4 => run("mkfs.ext4", &["-q", "-F", dev]),
            FsKind::Xfs => run("mkfs.xfs", &["-q", "-f", dev]),
            FsKind::Btrfs => run("mkfs.btrfs", &["-q", "-f", dev]),
        }
        .map(drop)
    }
}

/// A directory removed (with everything in it) on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(under: &Path, label: &str) -> anyhow::Result<Self> {
        let dir = under.join(format!("filemapd-{label}-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A sparse image file attached to a loop device.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub fn attach_new_image(image: &Path, size_mib: u64) -> anyhow::Result<Self> {
        let file =
            fs::File::create(image).with_context(|| format!("creating {}", image.display()))?;
        file.set_len(size_mib << 20)?;
        let out = run(
            "losetup",
            &["--find", "--show", image.to_str().context("image path")?],
        )?;
        Ok(Self {
            path: PathBuf::from(out.trim()),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.path.to_string_lossy()]);
    }
}

/// A dm-linear device over a whole block device.
pub struct DmLinear {
    pub name: String,
    pub path: PathBuf,
}

impl DmLinear {
    pub fn create(name: &str, backing: &Path) -> anyhow::Result<Self> {
        let backing = backing.to_str().context("backing path")?;
        let sectors = run("blockdev", &["--getsz", backing])?;
        let table = format!("0 {} linear {backing} 0", sectors.trim());
        run("dmsetup", &["create", name, "--table", &table])?;
        Ok(Self {
            name: name.to_string(),
            path: PathBuf::from(format!("/dev/mapper/{name}")),
        })
    }
}

impl Drop for DmLinear {
    fn drop(&mut self) {
        let _ = run("dmsetup", &["remove", "--retry", &self.name]);
    }
}

/// A mounted file system, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn new(device: &Path, fs: FsKind, dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        fs.mkfs(device)?;
        run(
            "mount",
            &[
                "-t",
                fs.name(),
                &device.to_string_lossy(),
                &dir.to_string_lossy(),
            ],
        )?;
        settle_udev()?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

/// Waits for udev's queue to drain where udevd runs (the test VM starts it). mkfs closing the
/// device it wrote makes udev probe it with blkid; on a slow VM that probe can come seconds
/// later and its reads land in a test's fresh regions (once, 520 sectors in a read count).
fn settle_udev() -> anyhow::Result<()> {
    if Path::new("/run/udev/control").exists() {
        run("udevadm", &["settle", "--timeout=60"])?;
    }
    Ok(())
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = run("umount", &[&self.dir.to_string_lossy()]);
    }
}

/// A file system on a loop device over an image in `scratch`; fields drop in reverse order
/// of setup (mount, then device).
pub struct LoopFs {
    pub mount: Mount,
    pub device: LoopDevice,
}

impl LoopFs {
    pub fn new(scratch: &Path, fs: FsKind) -> anyhow::Result<Self> {
        let device =
            LoopDevice::attach_new_image(&scratch.join(format!("{}.img", fs.name())), 512)?;
        let mount = Mount::new(
            &device.path,
            fs,
            &scratch.join(format!("{}-mnt", fs.name())),
        )?;
        Ok(Self { mount, device })
    }
}

/// A compressed RAM disk (zram), added for the test and removed on drop: a bio-based device
/// (its bios end through `bio_endio`, as dm's do, where a loop device's end with their
/// request), on kernels without device-mapper.
pub struct ZramDevice {
    pub path: PathBuf,
    id: String,
}

impl ZramDevice {
    pub fn add(size_mib: u64) -> anyhow::Result<Self> {
        const CONTROL: &str = "/sys/class/zram-control/hot_add";
        let id = fs::read_to_string(CONTROL)
            .with_context(|| format!("reading {CONTROL}: this test needs zram (CONFIG_ZRAM)"))?
            .trim()
            .to_string();
        let device = Self {
            path: PathBuf::from(format!("/dev/zram{id}")),
            id,
        };
        let disksize = format!("/sys/block/zram{}/disksize", device.id);
        fs::write(&disksize, format!("{}", size_mib << 20))
            .with_context(|| format!("writing {disksize}"))?;
        Ok(device)
    }
}

impl Drop for ZramDevice {
    fn drop(&mut self) {
        let _ = fs::write(format!("/sys/block/zram{}/reset", self.id), "1");
        let _ = fs::write("/sys/class/zram-control/hot_remove", &self.id);
    }
}

/// A file system on a zram device; fields drop in reverse order of setup.
pub struct ZramFs {
    pub mount: Mount,
    pub device: ZramDevice,
}

impl ZramFs {
    pub fn new(scratch: &Path, fs: FsKind) -> anyhow::Result<Self> {
        let device = ZramDevice::add(512)?;
        let mount = Mount::new(
            &device.path,
            fs,
            &scratch.join(format!("{}-zram", fs.name())),
        )?;
        Ok(Self { mount, device })
    }
}

/// Real hosts mount bpffs (systemd does), where the counting daemons pin their counters for
/// `filemapd report`; the test VM may not.
pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).expect("mounting bpffs");
    }
}

pub fn require_device_mapper() {
    require_root();
    if !Path::new("/dev/mapper/control").exists() {
        panic!(
            "no /dev/mapper/control: this test needs a device-mapper kernel (`cargo xtask test` boots one)"
        );
    }
}

/// A file system on dm-linear over a loop device over an image in /tmp; drops in reverse
/// order of setup.
pub struct DmFs {
    pub mount: Mount,
    /// The dm device's name (what dmstats commands take).
    pub name: String,
    _dm: DmLinear,
    _loop: LoopDevice,
    _scratch: ScratchDir,
}

impl DmFs {
    pub fn new(fs: FsKind) -> anyhow::Result<Self> {
        Self::with_size(fs, 512)
    }

    /// A file system of `mib` MiB (the backing image is sparse, on /tmp).
    pub fn with_size(fs: FsKind, mib: u64) -> anyhow::Result<Self> {
        let name = format!("filemapd-test-{}", fs.name());
        let scratch = ScratchDir::new(Path::new("/tmp"), &name)?;
        let lo = LoopDevice::attach_new_image(&scratch.0.join("backing.img"), mib)?;
        let dm = DmLinear::create(&name, &lo.path)?;
        let mount = Mount::new(&dm.path, fs, &scratch.0.join("mnt"))?;
        Ok(Self {
            mount,
            name,
            _dm: dm,
            _loop: lo,
            _scratch: scratch,
        })
    }
}

impl Drop for DmFs {
    /// A failed test may leave a daemon (or any process naming a file here) holding the file
    /// system, which would keep the next test's device from being created: stop those first.
    fn drop(&mut self) {
        let dir = self.mount.dir.to_string_lossy().into_owned();
        for pid in pids_with_arg_under("", &dir) {
            send_signal(pid, nix::sys::signal::SIGKILL);
            let _ = wait_for_exit(pid, std::time::Duration::from_secs(10));
        }
    }
}

/// Writes `len` bytes at `offset` (dd-style, through the page cache) and fsyncs.
pub fn write_and_sync(path: &Path, offset: u64, len: usize) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    file.write_all_at(&vec![0x5a; len], offset)?;
    file.sync_all()?;
    Ok(())
}

/// Punches a hole (keeping the size) with fallocate(1).
pub fn punch_hole(path: &Path, offset: u64, len: u64) -> anyhow::Result<()> {
    run(
        "fallocate",
        &[
            "--punch-hole",
            "--offset",
            &offset.to_string(),
            "--length",
            &len.to_string(),
            &path.to_string_lossy(),
        ],
    )
    .map(drop)
}

/// A file's extents per `filefrag -v -b512`: (physical start, length) in 512-byte sectors,
/// physically contiguous neighbours merged the way dm-stats regions are.
pub fn filefrag_sectors(path: &Path) -> anyhow::Result<Vec<(u64, u64)>> {
    let out = run("filefrag", &["-v", "-b512", &path.to_string_lossy()])?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        // "   0:        0..    2047:     264192..    266239:   2048:             last,eof"
        let cols: Vec<&str> = line.split(':').map(str::trim).collect();
        if cols.len() < 4 || cols[0].parse::<u64>().is_err() {
            continue;
        }
        let flags = cols.get(4).copied().unwrap_or("");
        if flags.contains("unknown_loc") || flags.contains("delalloc") {
            continue;
        }
        let physical = cols[2]
            .split("..")
            .next()
            .context("physical range")?
            .trim()
            .parse::<u64>()?;
        let length = cols[3].parse::<u64>()?;
        match ranges.last_mut() {
            Some((start, len)) if *start + *len == physical => *len += length,
            _ => ranges.push((physical, length)),
        }
    }
    if ranges.is_empty() && !out.contains("0 extents found") {
        bail!("no extents parsed from filefrag output:\n{out}");
    }
    Ok(ranges)
}

/// The region rows of `dmstats list --units s DEVICE` (columns: Name GrpID RgID ObjType
/// RgStart RgSize ...) as (start, length) in sectors, in the order dmstats lists them.
pub fn dmstats_list_regions(device: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let listing = run("dmstats", &["list", "--units", "s", device])?;
    listing
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() >= 6 && cols[3] == "region")
        .map(|cols| Ok((cols[4].parse()?, cols[5].parse()?)))
        .collect()
}

/// The region rows `dmstats list --units s DEVICE` shows in group `group_id` (its GrpID
/// column), as (start, length) in sectors.
pub fn dmstats_group_rows(device: &str, group_id: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let listing = run("dmstats", &["list", "--units", "s", device])?;
    let group = group_id.to_string();
    listing
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() >= 6 && cols[3] == "region" && cols[1] == group)
        .map(|cols| Ok((cols[4].parse()?, cols[5].parse()?)))
        .collect()
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes (then fails with `what`).
/// For state that changes without an event anyone can wait on (the kernel's region table).
pub fn wait_until(
    what: &str,
    timeout: std::time::Duration,
    mut condition: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition()? {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends `signal` to process `pid`. One already gone (reaped elsewhere) is no error: every
/// caller wants it stopped or waits for its end next.
pub fn send_signal(pid: i32, signal: nix::sys::signal::Signal) {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => panic!("{signal} to process {pid}: {e}"),
    }
}

/// Waits for a process that is not our child to exit, on a pidfd (an event, not a poll loop).
/// Returns false if it is still running after `timeout`.
pub fn wait_for_exit(pid: i32, timeout: std::time::Duration) -> anyhow::Result<bool> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        // Already gone (ESRCH) counts as exited; any other failure is not an answer.
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            return Ok(true);
        }
        return Err(error).with_context(|| format!("pidfd_open of {pid}"));
    }
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the descriptor is closed right after.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as i32) };
    unsafe { libc::close(fd) };
    Ok(ready == 1)
}

/// Pids of running processes whose argv[0] ends in `name` and whose arguments include `arg`.
pub fn pids_of(name: &str, arg: &str) -> Vec<i32> {
    pids_matching(name, |a| a == arg.as_bytes())
}

/// Pids of running processes whose argv[0] ends in `name` with an argument under `dir`.
pub fn pids_with_arg_under(name: &str, dir: &str) -> Vec<i32> {
    pids_matching(name, |a| a.starts_with(dir.as_bytes()))
}

fn pids_matching(name: &str, arg_matches: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|p| Some((p.file_name().to_str()?.parse::<i32>().ok()?, p.path())))
        .filter(|(_, dir)| {
            let Ok(cmdline) = fs::read(dir.join("cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a0| a0.ends_with(name.as_bytes()))
                && args.iter().any(|a| arg_matches(a))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// The group id in dmstats' "…: Created new group with N region(s) as group ID G." line.
pub fn created_group_id(dmstats_output: &str) -> anyhow::Result<u64> {
    let tail = dmstats_output
        .split("group ID ")
        .nth(1)
        .with_context(|| format!("no group ID in dmstats output: {dmstats_output:?}"))?;
    Ok(tail
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()?)
}

/// `dmstats create --filemap --nomonitor PATH`: maps the file without starting a daemon.
pub fn map_without_daemon(path: &Path) -> anyhow::Result<u64> {
    created_group_id(&run(
        "dmstats",
        &[
            "create",
            "--filemap",
            "--nomonitor",
            &path.to_string_lossy(),
        ],
    )?)
}

/// How often the process's threads have been switched out (voluntarily or not), summed over
/// all its threads (/proc/PID/status alone counts only the main thread): each is a wake-up.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        // A thread that ended meanwhile has no status left: it counts no more.
        .filter_map(|task| fs::read_to_string(task.path().join("status")).ok())
        .map(|status| {
            status_field(&status, "voluntary_ctxt_switches:")
                + status_field(&status, "nonvoluntary_ctxt_switches:")
        })
        .sum()
}

/// The number after `key` in a /proc status text (0 when missing).
pub fn status_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Runs of each loaded eBPF program the kernel skipped because another program was running on
/// that CPU (fdinfo's `recursion_misses`; kprobes count them from Linux 6.7), by program name,
/// those above zero only.
pub fn skipped_program_runs() -> Vec<(String, u64)> {
    use std::os::fd::AsFd as _;
    let mut skipped = Vec::new();
    for info in aya::programs::loaded_programs().flatten() {
        let Ok(fd) = info.fd() else { continue };
        let misses = filemapd::wake::ebpf::counting::recursion_misses(fd.as_fd()).unwrap_or(0);
        if misses > 0 {
            skipped.push((info.name_as_str().unwrap_or("?").to_string(), misses));
        }
    }
    skipped
}
