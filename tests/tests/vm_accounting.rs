//! The in-kernel accounting against real device-mapper (run inside the VM by `cargo xtask
//! test`): a growing file's write IO is all counted, by the group's regions (`@stats_print`)
//! or, for IO that came before its region existed, by the kernel (`filemapd show`), and never
//! by both: the two sum to exactly the bytes the writer wrote. Without the accounting the
//! regions alone miss some, which is what makes the sum a test.
use std::path::Path;

use filemapd::stats::{Counters, StatsDevice};
use filemapd_tests::{
    DmFs, FsKind,
    daemon::{LoggedDaemon, device_of, filemapd_binary, group_by_alias, wait_converged},
    map_without_daemon, require_device_mapper, run, write_and_sync,
    writers::random_direct_writes,
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

/// Sectors written as the group's regions count them.
fn group_sectors_written(device: &StatsDevice, alias: &str) -> u64 {
    let (_, members) = group_by_alias(device, alias).unwrap();
    let counters: Counters = members.iter().map(|r| device.counters(r.id).unwrap()).sum();
    counters.sectors_written
}

/// The written sectors `filemapd show` reports as counted in the kernel; `None` when it says
/// no daemon accounts for the file.
fn kernel_sectors_written(path: &Path, group: &str) -> Option<u64> {
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
    // "... N reads (S sectors, x ms), M writes (T sectors, y ms)..."
    let writes = line.split("), ").nth(1).unwrap();
    let sectors = writes
        .split('(')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    Some(sectors.parse().unwrap())
}

/// Real hosts mount bpffs (systemd does); the test VM may not.
fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).unwrap();
    }
}

/// Grows a watched file and returns (sectors written, counted by regions, counted in the
/// kernel, the daemon's whole log), after the group has caught up.
fn grow_watched(
    fs_kind: FsKind,
    growth: Growth,
    env: &[(&str, &str)],
) -> (u64, u64, Option<u64>, Vec<String>) {
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
    let regions_before = group_sectors_written(&device, "vm.img");
    let kernel_before = kernel_sectors_written(&path, &group);

    let written = grow(&path, growth) / 512;
    wait_converged(&dmfs, &path, "vm.img", "growth");
    let regions = group_sectors_written(&device, "vm.img") - regions_before;
    let kernel = kernel_sectors_written(&path, &group).map(|k| k - kernel_before.unwrap_or(0));
    eprintln!(
        "{fs_kind:?} {growth:?}: {written} sectors written, {regions} counted by regions, {kernel:?} in the kernel; eBPF runs skipped: {:?}",
        filemapd_tests::skipped_program_runs()
    );
    // SIGTERM: the daemon ends between passes and logs what it counted.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    daemon.wait_for_line("Terminated: exiting");
    let log = daemon.stop();
    if kernel.is_some() {
        assert!(
            log.iter().any(|l| l.contains("counted in the kernel")),
            "the daemon logs its in-kernel totals at exit:\n{}",
            log.join("\n")
        );
    }
    // What a failure needs explained: events by tracepoint, the tally, the totals, and every
    // region change.
    let mut by_tracepoint = std::collections::BTreeMap::<String, usize>::new();
    for line in log.iter().filter(|l| l.contains("] event ")) {
        if let Some(name) = line
            .split("] event ")
            .nth(1)
            .and_then(|r| r.split(':').next())
        {
            *by_tracepoint.entry(name.to_string()).or_default() += 1;
        }
    }
    eprintln!("events by tracepoint: {by_tracepoint:?}");
    let story: Vec<&String> = log
        .iter()
        .filter(|l| {
            l.contains("counted in the kernel")
                || l.contains("events,")
                || l.contains("Updated group")
                || l.contains("stats_delete")
                || l.contains("given back")
                || l.contains("leaves group")
                || l.contains("applied a plan")
                || l.contains("fused into a longer one")
                || l.contains("skipped the in-kernel")
        })
        .collect();
    eprintln!(
        "{}",
        story
            .iter()
            .filter(|l| !l.contains("Updated"))
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    (written, regions, kernel, log)
}

fn nothing_is_lost(fs_kind: FsKind, growth: Growth) {
    let (written, regions, kernel, log) = grow_watched(fs_kind, growth, &[]);
    let kernel = kernel.expect("a daemon with --ebpf on a dm device accounts in the kernel");
    assert!(
        kernel > 0,
        "the first write to fresh blocks lands before its region exists, so the kernel counts some"
    );
    assert_eq!(
        regions + kernel,
        written,
        "regions ({regions}) and the kernel ({kernel}) together count every sector written, once; the daemon's whole log:\n{}",
        log.join("\n")
    );
}

#[test]
fn ext4_random_direct_growth_loses_nothing() {
    nothing_is_lost(FsKind::Ext4, Growth::RandomDirect);
}
#[test]
fn xfs_random_direct_growth_loses_nothing() {
    nothing_is_lost(FsKind::Xfs, Growth::RandomDirect);
}
#[test]
fn ext4_dd_growth_loses_nothing() {
    nothing_is_lost(FsKind::Ext4, Growth::Dd);
}
#[test]
fn xfs_dd_growth_loses_nothing() {
    nothing_is_lost(FsKind::Xfs, Growth::Dd);
}

/// The control: with the accounting off, the regions alone miss the IO that came before them
/// (so the sum above is not true by construction), and `filemapd show` says nobody counts it.
#[test]
fn without_the_accounting_regions_alone_miss_some() {
    let (written, regions, kernel, _) = grow_watched(
        FsKind::Ext4,
        Growth::RandomDirect,
        &[("FILEMAPD_NO_ACCOUNTING", "1")],
    );
    assert_eq!(kernel, None);
    assert!(
        regions < written,
        "regions counted {regions} of {written} sectors: all, without any help?"
    );
}
