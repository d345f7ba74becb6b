//! Growth against real device-mapper (run inside the VM by `cargo xtask test`): regions tile a
//! growing file and keep their counters whatever wakes the daemon, few regions per extent
//! after many appends, a storm of allocations in few passes, and lvm2's exact mapping on
//! request.
use std::path::{Path, PathBuf};

use filemapd::stats::{Counters, StatsDevice};
use filemapd_tests::{
    DmFs, FsKind,
    daemon::{
        LoggedDaemon, append, delete_group, delete_group_and_wait, device_of, file_ranges,
        group_by_alias, map_and_monitor_with, tally_figure, wait_converged, wait_converged_exactly,
    },
    map_without_daemon, require_device_mapper, run, write_and_sync,
    writers::random_direct_writes,
};
use nix::sys::signal::SIGTERM;

/// Reads the whole file with O_DIRECT, so that its group's regions count it.
fn read_past_the_cache(path: &Path) {
    run(
        "dd",
        &[
            &format!("if={}", path.display()),
            "of=/dev/null",
            "bs=64k",
            "iflag=direct",
            "status=none",
        ],
    )
    .unwrap();
}

/// Sectors read as the group's regions count them.
fn group_sectors_read(device: &StatsDevice, alias: &str) -> u64 {
    let (_, members) = group_by_alias(device, alias).unwrap();
    let counters: Counters = members.iter().map(|r| device.counters(r.id).unwrap()).sum();
    counters.sectors_read
}

#[derive(Clone, Copy, Debug)]
enum Launch {
    /// `filemapd --ebpf` started by hand.
    Ebpf,
    /// Debian's dmstats starts the drop-in without FILEMAPD_EBPF: it polls.
    DropInPolling,
}

/// The point of tiling: when the last extent grows, its region (and its counters) stays, a new
/// region covers the new part, and dmstats still reports the group as the whole file.
fn growth_keeps_the_counters(fs_kind: FsKind, launch: Launch) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let (daemon, pid) = match launch {
        Launch::Ebpf => {
            let group = map_without_daemon(&path).unwrap().to_string();
            let mut daemon = LoggedDaemon::ebpf_inode(&path, &group, 1);
            daemon.wait_for_line("eBPF trigger on");
            let pid = daemon.child.id() as i32;
            (Some(daemon), pid)
        }
        Launch::DropInPolling => (None, map_and_monitor_with(&path, &[], &[]).1),
    };
    wait_converged(&dmfs, &path, "vm.img", "start-up");

    read_past_the_cache(&path);
    let device = device_of(&path);
    let (_, before) = group_by_alias(&device, "vm.img").unwrap();
    let counted: Vec<_> = before
        .iter()
        .map(|r| (r.id, r.range, device.counters(r.id).unwrap()))
        .collect();
    let sectors_read: u64 = counted.iter().map(|(_, _, c)| c.sectors_read).sum();
    assert_eq!(
        sectors_read, 4096,
        "2 MiB read with O_DIRECT should count 4096 sectors: {counted:?}"
    );

    append(&path, 4);
    wait_converged(
        &dmfs,
        &path,
        "vm.img",
        &format!("growing the file ({launch:?})"),
    );
    let (_, after) = group_by_alias(&device, "vm.img").unwrap();
    for (id, range, counters) in &counted {
        let region = after.iter().find(|r| r.id == *id);
        assert!(
            region.is_some_and(|r| r.range == *range),
            "region {id} ({range}) did not survive growth: {after:?}"
        );
        let now = device.counters(*id).unwrap();
        assert!(
            now.sectors_read >= counters.sectors_read,
            "region {id} lost counters: {counters:?} -> {now:?}"
        );
        eprintln!(
            "@stats_print {id} before growth: {counters:?}\n@stats_print {id} after growth: {now:?}"
        );
    }
    assert!(
        after.len() > before.len(),
        "no region was added for the new part"
    );

    // dmstats sees one group covering the whole file.
    let listing = run("dmstats", &["list", "--units", "s", &dmfs.name]).unwrap();
    let group_rows: Vec<Vec<&str>> = listing
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() >= 6 && cols[3] == "group")
        .collect();
    assert_eq!(group_rows.len(), 1, "{listing}");
    let file_sectors: u64 = file_ranges(&path).iter().map(|r| r.len).sum();
    assert_eq!(
        group_rows[0][5].parse::<u64>().unwrap(),
        file_sectors,
        "{listing}"
    );
    eprintln!("dmstats list after growth:\n{listing}");
    delete_group_and_wait(&dmfs, &path, "vm.img", pid);
    drop(daemon);
}

#[test]
fn ext4_growth_keeps_the_counters() {
    growth_keeps_the_counters(FsKind::Ext4, Launch::Ebpf);
}
#[test]
fn xfs_growth_keeps_the_counters() {
    growth_keeps_the_counters(FsKind::Xfs, Launch::Ebpf);
}
#[test]
fn ext4_growth_keeps_the_counters_in_the_polling_drop_in() {
    growth_keeps_the_counters(FsKind::Ext4, Launch::DropInPolling);
}
#[test]
fn xfs_growth_keeps_the_counters_in_the_polling_drop_in() {
    growth_keeps_the_counters(FsKind::Xfs, Launch::DropInPolling);
}

/// 200 fsync'd 64 KiB appends under a dmstats-launched eBPF daemon: regions that counted
/// nothing are fused with the growth beside them, so each extent ends with few regions, and
/// the IO counted before the growth is still counted after it.
fn appends_keep_few_regions_per_extent(fs_kind: FsKind) {
    const APPENDS: u64 = 200;
    const MOST_REGIONS_PER_EXTENT: usize = 4;
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let (_, pid) = map_and_monitor_with(&path, &[], &[("FILEMAPD_EBPF", "1")]);
    wait_converged(&dmfs, &path, "vm.img", "start-up");
    read_past_the_cache(&path);
    let device = device_of(&path);
    let counted_before = group_sectors_read(&device, "vm.img");
    assert_eq!(counted_before, 2048, "1 MiB read with O_DIRECT");

    for i in 0..APPENDS {
        write_and_sync(&path, (1 << 20) + i * (64 << 10), 64 << 10).unwrap();
    }
    wait_converged(&dmfs, &path, "vm.img", "200 appends");
    let extents = file_ranges(&path).len();
    let (_, members) = group_by_alias(&device, "vm.img").unwrap();
    eprintln!(
        "{fs_kind:?}: {APPENDS} appends → {extents} extent(s), {} region(s)",
        members.len()
    );
    assert!(
        members.len() <= MOST_REGIONS_PER_EXTENT * extents,
        "{} regions for {extents} extents:\n{}",
        members.len(),
        run("dmstats", &["list", "--units", "s", &dmfs.name]).unwrap()
    );
    assert_eq!(
        group_sectors_read(&device, "vm.img"),
        counted_before,
        "IO counted before the growth was lost"
    );
    delete_group_and_wait(&dmfs, &path, "vm.img", pid);
}

#[test]
fn ext4_appends_keep_few_regions_per_extent() {
    appends_keep_few_regions_per_extent(FsKind::Ext4);
}
#[test]
fn xfs_appends_keep_few_regions_per_extent() {
    appends_keep_few_regions_per_extent(FsKind::Xfs);
}

/// A 1 MiB vm.img on a new `fs_kind` device, its group made as dmstats makes it, under
/// `filemapd --ebpf` (logging at `verbose`) past its first pass.
fn watched_image(fs_kind: FsKind, verbose: u8) -> (DmFs, PathBuf, LoggedDaemon) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let mut daemon = LoggedDaemon::ebpf_inode(&path, &group, verbose);
    daemon.wait_for_line("Waking on events only");
    wait_converged(&dmfs, &path, "vm.img", "start-up");
    (dmfs, path, daemon)
}

/// A storm of allocations (random 64 KiB O_DIRECT writes into a sparse span, each allocating)
/// ends covered, in far fewer passes than events: as the daemon counts them in its tally.
fn a_storm_takes_few_passes(fs_kind: FsKind) {
    let (dmfs, path, mut daemon) = watched_image(fs_kind, 1);

    random_direct_writes(&path, 1 << 20, 64 << 20, 0x9e37_79b9_7f4a_7c15);
    wait_converged(&dmfs, &path, "vm.img", "the storm");

    delete_group(&dmfs, &path, "vm.img");
    daemon.wait_for_line("passes (");
    let log = daemon.stop();
    let tally = log.iter().find(|l| l.contains("passes (")).unwrap();
    let figure =
        |name| tally_figure(tally, name).unwrap_or_else(|| panic!("no {name} in {tally:?}"));
    let (events, passes) = (figure("events"), figure("passes"));
    eprintln!("{fs_kind:?}: {tally}");
    assert!(
        events >= 256,
        "the storm's allocations should be events: {tally}"
    );
    assert!(
        passes * 4 <= events,
        "a storm of {events} events took {passes} passes: {tally}"
    );
}

#[test]
fn ext4_a_storm_takes_few_passes() {
    a_storm_takes_few_passes(FsKind::Ext4);
}
#[test]
fn xfs_a_storm_takes_few_passes() {
    a_storm_takes_few_passes(FsKind::Xfs);
}

/// A fuse makes its longer region first and asks the regions it replaces only then. Tiles
/// read since they were last asked are found busy that way: the longer region goes again,
/// the tiles stay with what they counted, the growth beside them gets a region of its own,
/// and no region is left behind outside the group. (ext4 alone: its appends here grow one
/// extent past its tile budget, which is what makes a fuse; the rest does not depend on the
/// file system.)
#[test]
fn a_tile_found_busy_late_keeps_its_counters() {
    const STEP: u64 = 64 << 10;
    let (dmfs, path, mut daemon) = watched_image(FsKind::Ext4, 2);
    for i in 0..8 {
        write_and_sync(&path, (1 << 20) + i * STEP, STEP as usize).unwrap();
        wait_converged(&dmfs, &path, "vm.img", "an append");
    }
    // Every region counts a read; none has been asked since.
    read_past_the_cache(&path);
    let device = device_of(&path);
    let counted = group_sectors_read(&device, "vm.img");
    assert_eq!(
        counted,
        (1 << 20) / 512 + 8 * STEP / 512,
        "the whole file read"
    );
    for i in 8..12 {
        write_and_sync(&path, (1 << 20) + i * STEP, STEP as usize).unwrap();
        wait_converged(&dmfs, &path, "vm.img", "an append beside busy tiles");
    }
    daemon.wait_for_line("held a busy region: split again");
    assert_eq!(
        group_sectors_read(&device, "vm.img"),
        counted,
        "what the busy tiles counted"
    );
    let (_, members) = group_by_alias(&device, "vm.img").unwrap();
    let listing = run("dmstats", &["list", "--units", "s", &dmfs.name]).unwrap();
    let on_device = device.list(None).unwrap().len();
    assert_eq!(
        on_device,
        members.len(),
        "regions on the device outside the group:\n{listing}"
    );
    drop(daemon);
}

/// xfs writes an append into the front of its speculative preallocation: the allocation's
/// event names the whole preallocation. While the file stays open, FIEMAP shows it as two
/// extents (written up to the end of the file, unwritten past it); once the writer closes it,
/// as here, xfs gives the rest back (a removal event). Either way the event's range has
/// settled: each append costs its pass and the one look after it, not a look every 10 ms for
/// a second.
#[test]
fn xfs_appends_settle_at_once() {
    const APPENDS: u64 = 20;
    let (dmfs, path, mut daemon) = watched_image(FsKind::Xfs, 1);
    for i in 0..APPENDS {
        write_and_sync(&path, (1 << 20) + i * (64 << 10), 64 << 10).unwrap();
    }
    wait_converged(&dmfs, &path, "vm.img", "the appends");
    // Not a synchronisation but the time looked at: unsettled ranges would be read again
    // every SETTLE (10 ms) for SETTLE_TRIES (100) looks.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    daemon.signal(SIGTERM);
    daemon.wait_for_line("Terminated: exiting");
    let log = daemon.stop();
    let tally = log.iter().find(|l| l.contains("passes (")).unwrap();
    let figure =
        |name| tally_figure(tally, name).unwrap_or_else(|| panic!("no {name} in {tally:?}"));
    eprintln!("{tally}");
    assert!(
        figure("events") >= APPENDS,
        "each append allocates: {tally}"
    );
    assert!(
        figure("passes") <= 3 * APPENDS + 2,
        "{APPENDS} appends took {} passes: {tally}",
        figure("passes")
    );
}

/// FILEMAPD_EXACT=1 in dmstats' environment keeps lvm2's mapping: one region per extent, a
/// grown extent's region replaced.
#[test]
fn exact_mapping_on_request() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let (_, pid) = map_and_monitor_with(&path, &[], &[("FILEMAPD_EXACT", "1")]);
    wait_converged_exactly(&dmfs, &path, "vm.img", "start-up");
    append(&path, 4);
    wait_converged_exactly(&dmfs, &path, "vm.img", "growing the file");
    delete_group_and_wait(&dmfs, &path, "vm.img", pid);
}
