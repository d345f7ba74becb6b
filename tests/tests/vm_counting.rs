//! The in-kernel counting against real device-mapper (run inside the VM by `cargo xtask
//! test`): the kernel counts all of a watched file's IO, whatever its regions. A growing file's
//! writes are counted exactly (the regions miss those that came before them), and once the
//! group has caught up, an O_DIRECT read of the whole file is counted exactly by both, sector
//! for sector: the kernel's map of the file and the group's regions agree. Without the
//! counting the regions alone miss some writes, which is what makes the sums a test.
use std::path::Path;

use nix::sys::signal::SIGTERM;

use filemapd::{
    stats::{Counters, StatsDevice},
    wake::ebpf::IoHook,
};
use filemapd_tests::{
    DmFs, FsKind,
    daemon::{
        LoggedDaemon, device_of, file_ranges, filemapd_binary, group_by_alias, wait_converged,
    },
    ensure_bpffs, map_without_daemon, require_device_mapper, run, write_and_sync,
    writers::{direct_read_whole, random_direct_writes},
};

#[derive(Clone, Copy, Debug)]
enum Growth {
    /// A VM image with cache=none: 64 KiB O_DIRECT writes at random places of a sparse span.
    RandomDirect,
    /// `dd` appending through the page cache, then fsync (writeback allocates).
    Dd,
}

/// How much the file grows; FILEMAPD_TEST_GROWTH_MIB sets more for a closer look (the bench
/// grows by 256 MiB, where writeback builds bios of many MiB).
fn growth_mib() -> u64 {
    std::env::var("FILEMAPD_TEST_GROWTH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

/// Grows the 1 MiB file by `growth_mib()`; returns the bytes written.
fn grow(path: &Path, growth: Growth) -> u64 {
    let mib = growth_mib();
    match growth {
        Growth::RandomDirect => random_direct_writes(path, 1 << 20, mib << 20, 0x5eed),
        Growth::Dd => {
            run(
                "dd",
                &[
                    "if=/dev/zero",
                    &format!("of={}", path.display()),
                    "bs=1M",
                    "seek=1",
                    &format!("count={mib}"),
                    "conv=notrunc,fsync",
                    "status=none",
                ],
            )
            .unwrap();
            mib << 20
        }
    }
}

/// Sectors (read, written) as the group's regions count them.
fn group_sectors(device: &StatsDevice, alias: &str) -> (u64, u64) {
    let (_, members) = group_by_alias(device, alias).unwrap();
    let counters: Counters = members.iter().map(|r| device.counters(r.id).unwrap()).sum();
    (counters.sectors_read, counters.sectors_written)
}

/// Sectors (read, written) as `filemapd show` reports the kernel counted them; `None` when it
/// says no daemon counts the file.
fn kernel_sectors(path: &Path, group: &str) -> Option<(u64, u64)> {
    let out = run(
        &filemapd_binary().to_string_lossy(),
        &["show", &path.to_string_lossy(), group],
    )
    .unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with("counted in the kernel"))
        .unwrap_or_else(|| panic!("no in-kernel line in `filemapd show`:\n{out}"));
    if line.contains("no daemon") {
        return None;
    }
    // "...: N reads (S sectors, x ms), M writes (T sectors, y ms), K in flight"
    let sectors = |part: &str| -> u64 {
        part.split('(')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let counts = line.split_once("): ").expect("(daemon N): counts").1;
    let mut parts = counts.split("), ");
    let reads = sectors(parts.next().unwrap());
    let writes = sectors(parts.next().unwrap());
    Some((reads, writes))
}

/// What one run counted, in sectors.
struct Counted {
    written: u64,
    /// (read, written) by the group's regions, and by the kernel (`None`: not counted there).
    regions_growth: u64,
    kernel_growth: Option<u64>,
    /// The O_DIRECT read of the whole file after the group caught up: the sectors it read
    /// from the device (holes read none).
    read: u64,
    regions_read: u64,
    kernel_read: Option<u64>,
    log: Vec<String>,
}

/// Grows a watched file, waits for its group to catch up, reads it whole; what each counted.
fn grow_and_read(fs_kind: FsKind, growth: Growth, env: &[(&str, &str)]) -> Counted {
    require_device_mapper();
    ensure_bpffs();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let mut daemon = LoggedDaemon::ebpf_inode_with(&path, &group, 2, env);
    // Logged once the kernel filters on the file (IO before that is nobody's to count).
    daemon.wait_for_line("Waking on events only");
    wait_converged(&dmfs, &path, "vm.img", "start-up");
    let device = device_of(&path);
    let regions_before = group_sectors(&device, "vm.img");
    let kernel_before = kernel_sectors(&path, &group);

    let written = grow(&path, growth) / 512;
    wait_converged(&dmfs, &path, "vm.img", "growth");
    let regions_grown = group_sectors(&device, "vm.img");
    let kernel_grown = kernel_sectors(&path, &group);
    direct_read_whole(&path);
    // A hole reads as zeros without a read of the device: what was read is what the file
    // holds up to its end.
    let read: u64 = file_ranges(&path).iter().map(|r| r.len).sum();
    let regions_after = group_sectors(&device, "vm.img");
    let kernel_after = kernel_sectors(&path, &group);

    let delta =
        |after: Option<(u64, u64)>, before: Option<(u64, u64)>, pick: fn((u64, u64)) -> u64| {
            after.map(|a| pick(a) - before.map_or(0, pick))
        };
    let counted = Counted {
        written,
        regions_growth: regions_grown.1 - regions_before.1,
        kernel_growth: delta(kernel_grown, kernel_before, |c| c.1),
        read,
        regions_read: regions_after.0 - regions_grown.0,
        kernel_read: delta(kernel_after, kernel_grown, |c| c.0),
        log: Vec::new(),
    };
    eprintln!(
        "{fs_kind:?} {growth:?}: {written} sectors written, {} counted by regions, {:?} in the kernel; {read} read, {} by regions, {:?} in the kernel; eBPF runs skipped: {:?}",
        counted.regions_growth,
        counted.kernel_growth,
        counted.regions_read,
        counted.kernel_read,
        filemapd_tests::skipped_program_runs()
    );
    // SIGTERM: the daemon ends between passes and logs what the kernel counted.
    daemon.signal(SIGTERM);
    daemon.wait_for_line("Terminated: exiting");
    let log = daemon.stop();
    if counted.kernel_growth.is_some() {
        assert!(
            log.iter().any(|l| l.contains("counted in the kernel")),
            "the daemon logs its in-kernel counters at exit:\n{}",
            log.join("\n")
        );
    }
    Counted { log, ..counted }
}

fn all_of_it_is_counted(fs_kind: FsKind, growth: Growth) {
    let c = grow_and_read(fs_kind, growth, &[]);
    let log = || c.log.join("\n");
    let kernel = c
        .kernel_growth
        .expect("a daemon with --ebpf on a dm device counts in the kernel");
    assert_eq!(
        kernel,
        c.written,
        "the kernel counts every sector written, once; the daemon's whole log:\n{}",
        log()
    );
    assert!(
        c.regions_growth <= kernel,
        "regions counted {} of the {kernel} sectors written",
        c.regions_growth
    );
    assert_eq!(
        c.kernel_read,
        Some(c.read),
        "the kernel counts the whole file read, sector for sector of what the file holds"
    );
    assert_eq!(
        c.regions_read, c.read,
        "the group's regions, caught up, count the same read (the kernel's map and the regions agree)"
    );
    // (xfs reports delayed allocations with a placeholder start: no place to record.)
    assert!(
        !c.log.iter().any(|l| l.contains("has no room")),
        "the kernel's sector map had room for every run of one file:\n{}",
        log()
    );
}

#[test]
fn ext4_random_direct_growth_is_all_counted() {
    all_of_it_is_counted(FsKind::Ext4, Growth::RandomDirect);
}
#[test]
fn xfs_random_direct_growth_is_all_counted() {
    all_of_it_is_counted(FsKind::Xfs, Growth::RandomDirect);
}
#[test]
fn ext4_dd_growth_is_all_counted() {
    all_of_it_is_counted(FsKind::Ext4, Growth::Dd);
}
#[test]
fn xfs_dd_growth_is_all_counted() {
    all_of_it_is_counted(FsKind::Xfs, Growth::Dd);
}

/// The control: with the counting off, the regions alone miss the writes that came before
/// them (so the sums above are not true by construction), and `filemapd show` says nobody
/// counts the file in the kernel.
#[test]
fn without_the_counting_regions_alone_miss_some() {
    let c = grow_and_read(
        FsKind::Ext4,
        Growth::RandomDirect,
        &[("FILEMAPD_NO_COUNTING", "1")],
    );
    assert_eq!(c.kernel_growth, None);
    assert!(
        c.regions_growth < c.written,
        "regions counted {} of {} sectors: all, without any help?",
        c.regions_growth,
        c.written
    );
}

/// `filemapd report FILE`: (reads, read sectors, writes, written sectors) from its table.
fn reported(path: &Path) -> (u64, u64, u64, u64) {
    let out = run(
        &filemapd_binary().to_string_lossy(),
        &["report", &path.to_string_lossy()],
    )
    .unwrap();
    let row = out
        .lines()
        .find(|l| l.starts_with(&*path.to_string_lossy()))
        .unwrap_or_else(|| panic!("no row for {} in:\n{out}", path.display()));
    let cells: Vec<u64> = row
        .split_whitespace()
        .skip(1)
        .map(|c| c.parse().unwrap())
        .collect();
    (cells[0], cells[1], cells[3], cells[4])
}

/// Known IO with `--regions none`: a new file watched before its first write, grown by
/// O_DIRECT writes in random order, then read whole with O_DIRECT. The kernel counts exactly
/// the sectors written and those read (`filemapd report`). Through dm-stats' accounting (the
/// default) the device holds one region whatever the file does: filemapd's own, which keeps
/// that accounting on; through the bio hook, none. Each hook is asked for by name
/// (`--io-hook`).
fn known_io_without_regions(fs_kind: FsKind, hook: IoHook) {
    require_device_mapper();
    ensure_bpffs();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("new.img");
    std::fs::write(&path, b"").unwrap();
    let p = path.to_string_lossy().into_owned();
    let hook_name = hook.to_string();
    let mut watch = LoggedDaemon::start(
        &[
            "watch",
            "--regions",
            "none",
            "--io-hook",
            &hook_name,
            "-v",
            &p,
        ],
        &path,
        &[],
    );
    watch.wait_for_line("watching 1 file(s)");

    let written = random_direct_writes(&path, 0, 16 << 20, 0xfeed) / 512;
    let after_writes = reported(&path);
    direct_read_whole(&path);
    let held: u64 = file_ranges(&path).iter().map(|r| r.len).sum();
    let after_read = reported(&path);
    let device = device_of(&path);
    let regions = device.list(None).unwrap();
    let shown = run(&filemapd_binary().to_string_lossy(), &["show", &p]).unwrap();
    eprintln!(
        "{fs_kind:?}: {written} sectors written, reported {after_writes:?}; {held} held, reported {after_read:?}; regions {regions:?}"
    );
    assert_eq!(
        after_writes.3, written,
        "written sectors, counted from the first write; filemapd show:\n{shown}"
    );
    assert!(after_writes.2 > 0);
    assert_eq!(after_read.1 - after_writes.1, held, "read sectors");
    assert_eq!(after_read.3, written, "a read adds no write");
    let expected = match hook {
        IoHook::Bio => vec![],
        IoHook::DmStats => vec![("filemapd", "DMS_FILEMAPD_HOOK")],
    };
    assert_eq!(
        regions
            .iter()
            .map(|r| (r.program_id.as_str(), r.aux_data.as_str()))
            .collect::<Vec<_>>(),
        expected,
        "the regions on the device, counting through {hook:?}"
    );
    // Without FILEs, every counted file.
    let all = run(&filemapd_binary().to_string_lossy(), &["report"]).unwrap();
    assert!(all.contains(&p), "{all}");
    watch.stop();
}

#[test]
fn ext4_known_io_is_counted_exactly_without_regions() {
    known_io_without_regions(FsKind::Ext4, IoHook::DmStats);
}

#[test]
fn xfs_known_io_is_counted_exactly_without_regions() {
    known_io_without_regions(FsKind::Xfs, IoHook::DmStats);
}

/// The same through the bio hook: no region on the device at all.
#[test]
fn ext4_known_io_is_counted_exactly_by_the_bio_hook() {
    known_io_without_regions(FsKind::Ext4, IoHook::Bio);
}

#[test]
fn xfs_known_io_is_counted_exactly_by_the_bio_hook() {
    known_io_without_regions(FsKind::Xfs, IoHook::Bio);
}

/// Bad input: an unknown --regions or --io-hook, or none (or a hook asked for) where the
/// kernel cannot count, is one line on stderr and exit 1; --exact and another --regions
/// disagree; a sector map for no extent, past the most, or not a number is refused.
#[test]
fn regions_none_where_the_kernel_cannot_count_is_refused() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("f.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let p = path.to_string_lossy().into_owned();
    let refused = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(filemapd_binary())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        stderr
    };
    let bogus = refused(&["watch", "--regions", "bogus", &p], &[]);
    assert!(bogus.contains("bogus"), "{bogus}");
    let disagree = refused(&["watch", "--exact", "--regions", "none", &p], &[]);
    assert!(disagree.contains("disagree"), "{disagree}");
    let uncounted = refused(
        &["watch", "--regions", "none", &p],
        &[("FILEMAPD_NO_COUNTING", "1")],
    );
    assert!(
        uncounted.contains("--regions none") && uncounted.contains("FILEMAPD_NO_COUNTING"),
        "{uncounted}"
    );
    for size in ["0", "3000001", "many"] {
        let bad_size = refused(&["watch", "--kernel-map-extents", size, &p], &[]);
        assert!(
            bad_size.contains("--kernel-map-extents") && bad_size.contains(size),
            "{bad_size}"
        );
    }
    let unknown_hook = refused(&["watch", "--io-hook", "kprobe", &p], &[]);
    assert!(unknown_hook.contains("kprobe"), "{unknown_hook}");
    let hook_unavailable = refused(
        &["watch", "--io-hook", "bio", &p],
        &[("FILEMAPD_NO_COUNTING", "1")],
    );
    assert!(
        hook_unavailable.contains("--io-hook bio")
            && hook_unavailable.contains("FILEMAPD_NO_COUNTING"),
        "{hook_unavailable}"
    );
}
/// A new image in a watched directory (`--regions none`) is counted from its first write: it
/// is created and written at once, 8 MiB and 8 MiB with O_DIRECT, as a hypervisor creates a
/// disk and its guest installs onto it.
fn a_new_image_is_counted_from_its_first_write(fs_kind: FsKind) {
    use std::os::unix::fs::OpenOptionsExt as _;
    require_device_mapper();
    ensure_bpffs();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let dir = dmfs.mount.dir.join("images");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.to_string_lossy().into_owned();
    let mut watch = LoggedDaemon::start(&["watch", "--regions", "none", "-v", &d], &dir, &[]);
    watch.wait_for_line("names no files yet");
    let path = dir.join("new.img");
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    drop(file);
    let written = random_direct_writes(&path, 0, 8 << 20, 1)
        + random_direct_writes(&path, 8 << 20, 8 << 20, 2);
    let (_, _, _, counted) = reported(&path);
    eprintln!(
        "{fs_kind:?}: {} sectors written, {counted} counted",
        written / 512
    );
    assert_eq!(counted, written / 512, "counted from the first write");
    watch.stop();
}

#[test]
fn ext4_a_new_image_is_counted_from_its_first_write() {
    a_new_image_is_counted_from_its_first_write(FsKind::Ext4);
}

#[test]
fn xfs_a_new_image_is_counted_from_its_first_write() {
    a_new_image_is_counted_from_its_first_write(FsKind::Xfs);
}

/// What the kernel counted for a file survives its daemon: stopped by SIGTERM (a restart, an
/// upgrade) or killed, the next daemon of the file carries its counters over, and they never
/// go back while the file lives.
#[test]
fn the_kernels_counts_survive_a_restart_and_a_kill() {
    require_device_mapper();
    ensure_bpffs();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    // The daemon says what it carries over before it says it is ready.
    let start = |carries_over: bool| {
        let mut daemon = LoggedDaemon::ebpf_inode(&path, &group, 1);
        if carries_over {
            daemon.wait_for_line("carries over what daemon");
        }
        daemon.wait_for_line("Waking on events only");
        daemon
    };
    let written = |mib: u64, seed: u64| random_direct_writes(&path, 1 << 20, mib << 20, seed) / 512;

    let mut first = start(false);
    let w1 = written(4, 1);
    assert_kernel_wrote(&path, &group, w1, &mut first, "by the first daemon");
    first.signal(SIGTERM);
    first.wait_for_line("Terminated: exiting");
    first.stop();

    let mut second = start(true);
    assert_kernel_wrote(&path, &group, w1, &mut second, "after a restart");
    let w2 = written(4, 2);
    assert_kernel_wrote(
        &path,
        &group,
        w1 + w2,
        &mut second,
        "by the restarted daemon",
    );
    second.stop(); // SIGKILL

    let mut third = start(true);
    let w3 = written(4, 3);
    assert_kernel_wrote(&path, &group, w1 + w2 + w3, &mut third, "after a kill");
    third.stop();
}

/// Asserts that `filemapd report` gives `expected` sectors written to `path`. When it does
/// not, the failure says what could explain the gap first: `filemapd show`'s line (its
/// allocations not recorded whole, its bios too long to walk), and the daemon, stopped with
/// SIGTERM, says on its way out how many bios the kernel kept from the IO probe.
fn assert_kernel_wrote(
    path: &Path,
    group: &str,
    expected: u64,
    daemon: &mut LoggedDaemon,
    when: &str,
) {
    let counted = reported(path).3;
    if counted == expected {
        return;
    }
    let shown = run(
        &filemapd_binary().to_string_lossy(),
        &["show", &path.to_string_lossy(), group],
    )
    .unwrap_or_else(|e| format!("(filemapd show failed: {e})"));
    daemon.signal(SIGTERM);
    let ended = daemon.wait_for_exit();
    panic!(
        "written sectors {when}: counted {counted}, written {expected}; the daemon ended on SIGTERM: {ended:?}; filemapd show:\n{shown}"
    );
}

/// A restarted service counts the IO of the gap (SIGTERM, then the same command: what
/// `systemctl restart` does): the stopping service leaves its programs pinned, counting while
/// no daemon runs, and the next one takes the counting over once it has taken the files up.
/// An image written during the gap, and one made and written then, are counted exactly; the
/// stopped service's pinned programs are gone after the take-over, and each later IO counts
/// once.
#[test]
fn a_restarts_gap_is_counted() {
    require_device_mapper();
    ensure_bpffs();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let dir = dmfs.mount.dir.join("images");
    std::fs::create_dir(&dir).unwrap();
    let old = dir.join("old.img");
    write_and_sync(&old, 0, 1 << 20).unwrap();
    let d = dir.to_string_lossy().into_owned();
    let start = || LoggedDaemon::start(&["watch", "--regions", "none", "-v", &d], &dir, &[]);
    let written = |path: &Path, at_mib: u64, seed: u64| {
        random_direct_writes(path, at_mib << 20, 4 << 20, seed) / 512
    };

    let mut first = start();
    first.wait_for_line("watching 1 file(s)");
    let before = reported(&old).3;
    let w1 = written(&old, 1, 1);
    assert_eq!(reported(&old).3, before + w1);
    first.signal(SIGTERM);
    first.wait_for_line("counted until the next start");
    assert!(
        first.wait_for_exit().is_some(),
        "the service ends on SIGTERM"
    );
    let links =
        std::path::PathBuf::from(format!("/sys/fs/bpf/filemapd/{}/links", first.child.id()));
    assert!(
        links.is_dir(),
        "{} holds the stopped service's links",
        links.display()
    );

    // The gap: the image grows, and a new one is made and written.
    let w_gap = written(&old, 5, 2);
    let new = dir.join("new.img");
    std::fs::write(&new, b"").unwrap();
    let w_new = written(&new, 0, 3);

    let mut second = start();
    second.wait_for_line("watching 2 file(s)");
    second.wait_for_line("took the counting over from daemon");
    assert_eq!(
        reported(&old).3,
        before + w1 + w_gap,
        "the image written in the gap"
    );
    assert_eq!(reported(&new).3, w_new, "the image made in the gap");
    assert!(
        !links.exists(),
        "the stopped service's programs are unpinned once the next has taken over"
    );
    let w3 = written(&old, 9, 4);
    assert_eq!(
        reported(&old).3,
        before + w1 + w_gap + w3,
        "after the take-over, each IO counted once"
    );
    for line in second.stop() {
        if line.contains("carries over") || line.contains("took the counting over") {
            eprintln!("{line}");
        }
    }
}
