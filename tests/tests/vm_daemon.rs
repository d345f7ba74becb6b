//! The drop-in daemon against real device-mapper (run inside the VM by `cargo xtask test`):
//! Debian's `dmstats create --filemap` launches filemapd installed as `dmfilemapd`, and the
//! group follows the file as it grows, shrinks, is replaced or goes away — on ext4 and xfs.
use std::{fs, path::Path, process::Command, time::Duration};

use filemapd::sectors::SectorRange;
use filemapd_tests::{
    DmFs, FsKind, context_switches,
    daemon::{
        CONVERGE, EXIT, LoggedDaemon, append, device_of, drop_in_dir, file_ranges, filemapd_binary,
        group_by_alias, hold_open, map_and_monitor, region_line, region_table, run_drop_in,
        user_region, wait_converged,
    },
    map_without_daemon, pids_of, punch_hole, require_device_mapper, run, run_env, wait_for_exit,
    wait_until, write_and_sync,
};

fn grow_shrink_and_group_delete(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let mine = user_region(&dmfs);
    let path = dmfs.mount.dir.join("disk.img");
    write_and_sync(&path, 0, 4 << 20).unwrap();
    let (group_id, pid) = map_and_monitor(&path, &[]);
    wait_converged(&dmfs, &path, "disk.img", "mapping");

    append(&path, 4);
    wait_converged(&dmfs, &path, "disk.img", "appending 4 MiB");
    punch_hole(&path, 2 << 20, 1 << 20).unwrap();
    wait_converged(&dmfs, &path, "disk.img", "punching a hole");
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    wait_converged(&dmfs, &path, "disk.img", "truncating to 3 MiB");
    append(&path, 2);
    wait_converged(&dmfs, &path, "disk.img", "appending 2 MiB more");

    assert_eq!(
        region_line(&dmfs, |r| r.range == SectorRange::new(8, 16)),
        mine,
        "the user's region changed"
    );
    let (current, _) = group_by_alias(&device_of(&path), "disk.img").unwrap();
    run(
        "dmstats",
        &["delete", "--groupid", &current.to_string(), &dmfs.name],
    )
    .unwrap();
    assert!(
        wait_for_exit(pid, EXIT).unwrap(),
        "daemon {pid} still runs after its group {current} (was {group_id}) was deleted"
    );
    assert_eq!(
        region_line(&dmfs, |r| r.range == SectorRange::new(8, 16)),
        mine,
        "the user's region changed"
    );
}

fn inode_mode_exits_when_unlinked_and_closed(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("scratch.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let (_, pid) = map_and_monitor(&path, &["--follow", "inode"]);
    // Another process holds the file: unlinking alone must not stop the daemon.
    let mut holder = hold_open(&path);
    fs::remove_file(&path).unwrap();
    let exited_while_held = wait_for_exit(pid, Duration::from_secs(3)).unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(
        !exited_while_held,
        "daemon exited although another process held the unlinked file"
    );
    assert!(
        wait_for_exit(pid, EXIT).unwrap(),
        "daemon {pid} still runs after the file was unlinked and closed"
    );
}

fn path_mode_follows_a_replaced_file(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let (_, pid) = map_and_monitor(&path, &["--follow", "path"]);
    wait_converged(&dmfs, &path, "vm.img", "mapping");
    let old = file_ranges(&path);
    let replacement = dmfs.mount.dir.join("vm.img.new");
    write_and_sync(&replacement, 0, 6 << 20).unwrap();
    fs::rename(&replacement, &path).unwrap();
    wait_converged(&dmfs, &path, "vm.img", "replacing the file");
    assert_ne!(
        file_ranges(&path),
        old,
        "the replacement should sit elsewhere"
    );
    let (current, _) = group_by_alias(&device_of(&path), "vm.img").unwrap();
    run(
        "dmstats",
        &["delete", "--groupid", &current.to_string(), &dmfs.name],
    )
    .unwrap();
    assert!(wait_for_exit(pid, EXIT).unwrap());
}

fn new_regions_keep_precise_bounds_and_alias(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("db.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let (group_id, pid) = map_and_monitor(
        &path,
        &[
            "--precise",
            "--bounds",
            "10ms,20ms,30ms",
            "--alias",
            "dbvol",
        ],
    );
    let device = device_of(&path);
    let leader = device
        .list(None)
        .unwrap()
        .into_iter()
        .find(|r| r.id == group_id)
        .unwrap();
    let leader_settings = leader.settings.clone();
    // Debian's dmstats 1.02.185 keeps the bounds (in ms) but drops --precise for filemaps.
    assert_eq!(
        leader_settings.histogram,
        vec![10, 20, 30],
        "{leader_settings:?}"
    );

    append(&path, 3);
    punch_hole(&path, 0, 1 << 20).unwrap(); // the leader's extent changes: the group moves
    wait_converged(&dmfs, &path, "dbvol", "growing and punching the first MiB");
    let (new_id, members) = group_by_alias(&device, "dbvol").expect("alias survives the regroup");
    // The leader's region had to go (its extent changed); the kernel may hand its id out again.
    assert!(
        members.iter().all(|r| r.range != leader.range),
        "the old leader region survived: {members:?}"
    );
    for region in &members {
        assert_eq!(
            region.settings, leader_settings,
            "region {} differs from the leader",
            region.id
        );
        assert_eq!(region.step, region.range.len);
    }
    run(
        "dmstats",
        &["delete", "--groupid", &new_id.to_string(), &dmfs.name],
    )
    .unwrap();
    assert!(wait_for_exit(pid, EXIT).unwrap());
}

#[test]
fn ext4_grow_shrink_and_group_delete() {
    grow_shrink_and_group_delete(FsKind::Ext4);
}
#[test]
fn xfs_grow_shrink_and_group_delete() {
    grow_shrink_and_group_delete(FsKind::Xfs);
}
#[test]
fn ext4_inode_mode_exits_when_unlinked_and_closed() {
    inode_mode_exits_when_unlinked_and_closed(FsKind::Ext4);
}
#[test]
fn xfs_inode_mode_exits_when_unlinked_and_closed() {
    inode_mode_exits_when_unlinked_and_closed(FsKind::Xfs);
}
#[test]
fn ext4_path_mode_follows_a_replaced_file() {
    path_mode_follows_a_replaced_file(FsKind::Ext4);
}
#[test]
fn xfs_path_mode_follows_a_replaced_file() {
    path_mode_follows_a_replaced_file(FsKind::Xfs);
}
#[test]
fn ext4_new_regions_keep_precise_bounds_and_alias() {
    new_regions_keep_precise_bounds_and_alias(FsKind::Ext4);
}
#[test]
fn xfs_new_regions_keep_precise_bounds_and_alias() {
    new_regions_keep_precise_bounds_and_alias(FsKind::Xfs);
}

#[test]
fn bad_invocations_fail_with_one_line_and_change_nothing() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    user_region(&dmfs);
    let path = dmfs.mount.dir.join("disk.img");
    write_and_sync(&path, 0, 4 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let user_id = device_of(&path)
        .list(None)
        .unwrap()
        .iter()
        .find(|r| r.range == SectorRange::new(8, 16))
        .unwrap()
        .id;
    append(&path, 2); // the group is stale: any invocation that got through would change it
    let before = region_table(&path);

    let p = path.to_str().unwrap();
    let g = group.as_str();
    let user = user_id.to_string();
    let dir = dmfs.mount.dir.clone();
    let hostname = Path::new("/etc/hostname");
    let user_not_a_group = format!("group {user} does not exist");
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (vec![], &path, "Wrong number of arguments."),
        (vec!["0"], &path, "Wrong number of arguments."),
        (vec!["0", g, p], &path, "Wrong number of arguments."),
        (
            vec!["0", g, p, "inode", "1", "1", "x"],
            &path,
            "Wrong number of arguments.",
        ),
        (
            vec!["x", g, p, "inode", "1"],
            &path,
            "Could not parse file descriptor: x",
        ),
        (
            vec!["-1", g, p, "inode", "1"],
            &path,
            "Could not parse file descriptor: -1",
        ),
        (
            vec!["0", "y", p, "inode", "1"],
            &path,
            "Could not parse group identifier: y",
        ),
        (
            vec!["0", "-3", p, "inode", "1"],
            &path,
            "Could not parse group identifier: -3",
        ),
        (
            vec!["0", g, "", "inode", "1"],
            &path,
            "Path argument is required.",
        ),
        (
            vec!["0", g, "disk.img", "inode", "1"],
            &path,
            "Path argument must specify an absolute path.",
        ),
        (
            vec!["0", g, p, "", "1"],
            &path,
            "Mode argument is required.",
        ),
        (
            vec!["0", g, p, "both", "1"],
            &path,
            "Could not parse dmfilemapd mode: both",
        ),
        (
            vec!["0", g, p, "inode", "yes"],
            &path,
            "Could not parse debug argument: yes.",
        ),
        (
            vec!["0", g, p, "inode", "1", "7"],
            &path,
            "Verbose argument out of range: 7.",
        ),
        (
            vec!["0", g, p, "inode", "1", "v"],
            &path,
            "Could not parse verbose argument: v",
        ),
        (
            vec!["9", g, p, "inode", "1"],
            &path,
            "file descriptor 9 is not open",
        ),
        (
            vec!["0", "4096", p, "inode", "1"],
            &path,
            "group 4096 does not exist",
        ),
        (vec!["0", &user, p, "inode", "1"], &path, &user_not_a_group),
        (vec!["0", g, p, "inode", "1"], &dir, "is not a regular file"),
        (
            vec!["0", g, p, "inode", "1"],
            Path::new("/dev/null"),
            "is not a regular file",
        ),
        (
            vec!["0", g, "/etc/hostname", "inode", "1"],
            hostname,
            "is not on a device-mapper device",
        ),
    ];
    for (args, stdin, message) in &cases {
        let (code, stderr) = run_drop_in(args, stdin, &[]);
        assert_eq!(
            code,
            Some(1),
            "dmfilemapd {args:?}: exit {code:?}, stderr {stderr:?}"
        );
        assert!(
            stderr.lines().next().is_some_and(|l| l.contains(message)),
            "dmfilemapd {args:?}: {stderr:?}"
        );
        let lines = stderr.lines().count();
        let allowed = if message.starts_with("Wrong number") {
            2
        } else {
            1
        };
        assert_eq!(
            lines, allowed,
            "dmfilemapd {args:?} printed {lines} lines: {stderr:?}"
        );
        assert_eq!(
            region_table(&path),
            before,
            "dmfilemapd {args:?} changed regions"
        );
    }
    // The filemapd name takes flags; bad ones are refused the same way.
    for args in [
        vec!["--interval", "0", "0", g, p, "inode", "1"],
        vec!["--interval", "soon", "0", g, p, "inode", "1"],
        vec!["--no-such-flag", "0", g, p, "inode", "1"],
        vec!["0", g, p, "inode", "1", "9"],
    ] {
        let out = Command::new(filemapd_binary())
            .args(&args)
            .stdin(fs::File::open(&path).unwrap())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "filemapd {args:?}: {stderr:?}");
        assert_eq!(stderr.lines().count(), 1, "filemapd {args:?}: {stderr:?}");
        assert_eq!(
            region_table(&path),
            before,
            "filemapd {args:?} changed regions"
        );
    }
    assert!(cases.len() >= 20);
}

/// Killed at each point of an update, the next run converges and leaves no region of ours
/// outside the group, while the user's region stays as it was.
fn converges_after_a_kill_at_any_point(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let mine = user_region(&dmfs);
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    map_without_daemon(&path).unwrap();
    let p = path.to_string_lossy().into_owned();
    for point in ["created", "switched", "deleted"] {
        append(&path, 2);
        punch_hole(&path, 0, 512 << 10).unwrap(); // also replace the leader's region
        let (group, _) = group_by_alias(&device_of(&path), "vm.img").unwrap();
        let group = group.to_string();
        let (code, stderr) = run_drop_in(
            &["0", &group, &p, "inode", "1", "1"],
            &path,
            &[("FILEMAPD_TEST_CRASH_AT", point)],
        );
        assert_eq!(code, None, "expected an abort at {point}: {stderr}");
        assert_eq!(
            region_line(&dmfs, |r| r.range == SectorRange::new(8, 16)),
            mine
        );

        // The next run, from the same group id, converges.
        let mut daemon = Command::new(drop_in_dir().join("dmfilemapd"))
            .args(["0", &group, &p, "inode", "1"])
            .stdin(fs::File::open(&path).unwrap())
            .spawn()
            .unwrap();
        wait_converged(&dmfs, &path, "vm.img", &format!("a kill at {point}"));
        // The move is finished first, the leftovers removed right after: wait for both.
        let clean = || -> anyhow::Result<bool> {
            let table = region_table(&path);
            let Some((_, members)) = group_by_alias(&device_of(&path), "vm.img") else {
                return Ok(false);
            };
            Ok(!table.iter().any(|l| l.contains("DMS_FILEMAPD_"))
                && table.len() == members.len() + 1)
        };
        wait_until(
            &format!("no markers and no region outside the group after a kill at {point}"),
            CONVERGE,
            clean,
        )
        .unwrap_or_else(|e| panic!("{e}: {:#?}", region_table(&path)));
        assert_eq!(
            region_line(&dmfs, |r| r.range == SectorRange::new(8, 16)),
            mine
        );
        daemon.kill().unwrap();
        daemon.wait().unwrap();
    }
}

#[test]
fn ext4_converges_after_a_kill_at_any_point() {
    converges_after_a_kill_at_any_point(FsKind::Ext4);
}
#[test]
fn xfs_converges_after_a_kill_at_any_point() {
    converges_after_a_kill_at_any_point(FsKind::Xfs);
}

/// dmstats's filemap drops --precise, so build a precise group by hand with dmstats itself
/// (one precise region per extent, then `dmstats group`) and let filemapd maintain it.
fn precise_groups_stay_precise(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("precise.img");
    write_and_sync(&path, 0, 4 << 20).unwrap();
    punch_hole(&path, 1 << 20, 1 << 20).unwrap();
    let ranges = file_ranges(&path);
    for range in &ranges {
        let (start, len) = (range.start.to_string(), range.len.to_string());
        run(
            "dmstats",
            &[
                "create",
                "--precise",
                "--bounds",
                "10ms,20ms",
                "--start",
                &start,
                "--length",
                &len,
                &dmfs.name,
            ],
        )
        .unwrap();
    }
    let last = (ranges.len() - 1).to_string();
    run(
        "dmstats",
        &[
            "group",
            "--regions",
            &format!("0-{last}"),
            "--alias",
            "fast",
            &dmfs.name,
        ],
    )
    .unwrap();
    let (group, members) = group_by_alias(&device_of(&path), "fast").unwrap();
    let settings = members[0].settings.clone();
    assert!(settings.precise_timestamps, "{settings:?}");
    assert_eq!(settings.histogram, vec![10_000_000, 20_000_000]);

    let p = path.to_string_lossy().into_owned();
    let mut daemon = Command::new(drop_in_dir().join("dmfilemapd"))
        .args(["0", &group.to_string(), &p, "inode", "1"])
        .stdin(fs::File::open(&path).unwrap())
        .spawn()
        .unwrap();
    append(&path, 2);
    punch_hole(&path, 0, 512 << 10).unwrap();
    wait_converged(&dmfs, &path, "fast", "growing a precise group");
    let (_, members) = group_by_alias(&device_of(&path), "fast").unwrap();
    for region in &members {
        assert_eq!(
            region.settings, settings,
            "region {} lost the group's settings",
            region.id
        );
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[test]
fn ext4_precise_groups_stay_precise() {
    precise_groups_stay_precise(FsKind::Ext4);
}
#[test]
fn xfs_precise_groups_stay_precise() {
    precise_groups_stay_precise(FsKind::Xfs);
}

/// With --ebpf and an hour-long interval, only the kernel's events can bring the regions in
/// line with the file in time.
fn ebpf_updates_without_waiting_for_the_interval(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let p = path.to_string_lossy().into_owned();
    let mut daemon = LoggedDaemon::ebpf_inode(&path, &group, 2);
    daemon.wait_for_line("eBPF trigger on");
    wait_converged(&dmfs, &path, "vm.img", "start-up"); // the first pass maps the file

    append(&path, 4);
    wait_converged(&dmfs, &path, "vm.img", "appending 4 MiB (eBPF)");
    run(
        "fallocate",
        &[
            "--offset",
            &(8u64 << 20).to_string(),
            "--length",
            "1048576",
            &p,
        ],
    )
    .unwrap();
    wait_converged(&dmfs, &path, "vm.img", "fallocate (eBPF)");
    punch_hole(&path, 1 << 20, 1 << 20).unwrap();
    wait_converged(&dmfs, &path, "vm.img", "punching a hole (eBPF)");
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    wait_converged(&dmfs, &path, "vm.img", "truncating (eBPF)");

    let log = daemon.stop();
    let first_event = log
        .iter()
        .position(|l| l.contains("event "))
        .expect("no event lines in the log");
    assert!(
        log[first_event..]
            .iter()
            .any(|l| l.contains("Updated group")),
        "no update after the first event:\n{}",
        log.join("\n")
    );
    assert!(
        !log.iter().any(|l| l.contains("polling")),
        "fell back to polling:\n{}",
        log.join("\n")
    );
}

#[test]
fn ext4_ebpf_updates_without_waiting_for_the_interval() {
    ebpf_updates_without_waiting_for_the_interval(FsKind::Ext4);
}
#[test]
fn xfs_ebpf_updates_without_waiting_for_the_interval() {
    ebpf_updates_without_waiting_for_the_interval(FsKind::Xfs);
}

/// Where the programs cannot be loaded (here: tracefs is not where it is said to be), the
/// daemon says why once and keeps the group right by polling.
#[test]
fn ebpf_failure_falls_back_to_polling() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let p = path.to_string_lossy().into_owned();
    let mut daemon = LoggedDaemon::start(
        &[
            "--ebpf",
            "--interval",
            "0.2",
            "0",
            &group,
            &p,
            "inode",
            "1",
            "1",
        ],
        &path,
        &[("FILEMAPD_TRACEFS", "/nonexistent")],
    );
    daemon.wait_for_line("eBPF trigger unavailable");
    append(&path, 4);
    wait_converged(&dmfs, &path, "vm.img", "appending 4 MiB (polling fallback)");
    let log = daemon.stop();
    let warnings: Vec<_> = log
        .iter()
        .filter(|l| l.contains("eBPF trigger unavailable"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log:#?}");
    assert!(
        warnings[0].contains("tracefs"),
        "the warning should say why: {}",
        warnings[0]
    );
}

/// dmstats passes its environment on: FILEMAPD_EBPF=1 gives its daemons the eBPF trigger
/// (they then hold BPF maps).
#[test]
fn dmstats_launched_daemons_use_ebpf_when_asked() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Xfs).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let search_path = format!(
        "{}:{}",
        drop_in_dir().display(),
        std::env::var("PATH").unwrap()
    );
    let p = path.to_string_lossy().into_owned();
    run_env(
        "dmstats",
        &["create", "--filemap", &p],
        &[("PATH", &search_path), ("FILEMAPD_EBPF", "1")],
    )
    .unwrap();
    let mut pids = Vec::new();
    wait_until("dmstats to start dmfilemapd", CONVERGE, || {
        pids = pids_of("dmfilemapd", &p);
        Ok(!pids.is_empty())
    })
    .unwrap();
    let bpf_fds = || -> usize {
        fs::read_dir(format!("/proc/{}/fd", pids[0]))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("bpf"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    wait_until("the daemon to load its BPF programs", CONVERGE, || {
        Ok(bpf_fds() > 0)
    })
    .unwrap();
    append(&path, 4);
    wait_converged(&dmfs, &path, "vm.img", "appending 4 MiB");
    let (current, _) = group_by_alias(&device_of(&path), "vm.img").unwrap();
    run(
        "dmstats",
        &["delete", "--groupid", &current.to_string(), &dmfs.name],
    )
    .unwrap();
    assert!(wait_for_exit(pids[0], EXIT).unwrap());
}

/// `filemapd watch`: one process, one set of eBPF programs, files on ext4 and xfs.
#[test]
fn one_process_watches_many_files() {
    require_device_mapper();
    let filesystems = [
        DmFs::new(FsKind::Ext4).unwrap(),
        DmFs::new(FsKind::Xfs).unwrap(),
    ];
    let mut config = String::from("# group mode path\n");
    let mut files = Vec::new();
    for dmfs in &filesystems {
        for i in 0..6 {
            let path = dmfs.mount.dir.join(format!("{}-{i}.img", dmfs.name));
            write_and_sync(&path, 0, 1 << 20).unwrap();
            let group = map_without_daemon(&path).unwrap();
            config.push_str(&format!("{group} inode {}\n", path.display()));
            files.push((dmfs, path));
        }
    }
    let config_path = filesystems[0].mount.dir.join("watch.conf");
    fs::write(&config_path, &config).unwrap();
    let cfg = config_path.to_string_lossy().into_owned();
    let mut daemon = LoggedDaemon::start(
        &[
            "watch",
            "--config",
            &cfg,
            "--ebpf",
            "--interval",
            "3600",
            "-vv",
        ],
        &config_path,
        &[],
    );
    daemon.wait_for_line("watching 12 file(s)");
    for (_, path) in &files {
        append(path, 2);
    }
    for (dmfs, path) in &files {
        let alias = path.file_name().unwrap().to_string_lossy().into_owned();
        wait_converged(dmfs, path, &alias, "appending to every watched file");
    }
    // A deleted group ends its file's monitor at the file's next event; the others go on.
    let (dmfs, gone) = &files[0];
    let alias = gone.file_name().unwrap().to_string_lossy().into_owned();
    let (group, _) = group_by_alias(&device_of(gone), &alias).unwrap();
    run(
        "dmstats",
        &["delete", "--groupid", &group.to_string(), &dmfs.name],
    )
    .unwrap();
    append(gone, 1);
    daemon.wait_for_line(&format!(
        "{}: Filemap group removed: exiting.",
        gone.display()
    ));
    let (dmfs, still) = &files[7];
    append(still, 1);
    let alias = still.file_name().unwrap().to_string_lossy().into_owned();
    wait_converged(
        dmfs,
        still,
        &alias,
        "appending after another file's group went",
    );
    let log = daemon.stop();
    assert!(
        log.iter()
            .any(|l| l.contains("eBPF trigger for 12 file(s)")),
        "{}",
        log.join("\n")
    );
}

/// Path mode with eBPF: the replacement's inode is watched (and the old one let go), so the
/// new file's growth is followed by events.
#[test]
fn ebpf_path_mode_watches_the_replacement() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let p = path.to_string_lossy().into_owned();
    let mut daemon = LoggedDaemon::start(
        &[
            "--ebpf",
            "--interval",
            "0.2",
            "0",
            &group,
            &p,
            "path",
            "1",
            "2",
        ],
        &path,
        &[],
    );
    daemon.wait_for_line("eBPF trigger on");
    let replacement = dmfs.mount.dir.join("vm.img.new");
    write_and_sync(&replacement, 0, 3 << 20).unwrap();
    fs::rename(&replacement, &path).unwrap();
    daemon.wait_for_line("was replaced");
    wait_converged(&dmfs, &path, "vm.img", "replacing the file");
    append(&path, 4);
    wait_converged(&dmfs, &path, "vm.img", "growing the replacement");
    let log = daemon.stop();
    assert!(
        !log.iter().any(|l| l.contains("Exiting")),
        "{}",
        log.join("\n")
    );
}

/// With eBPF, an idle daemon sleeps until something happens: the kernel reports another
/// process's region changes (kprobe on dm_stats_message) and inotify the file's unlinking and
/// closing, so even with an hour-long interval a deleted group and an unlinked, closed file
/// each stop their daemon at once.
#[test]
fn ebpf_daemons_wake_on_events_only() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let (first, second) = (dmfs.mount.dir.join("a.img"), dmfs.mount.dir.join("b.img"));
    let mut daemons = Vec::new();
    for path in [&first, &second] {
        write_and_sync(path, 0, 1 << 20).unwrap();
        let group = map_without_daemon(path).unwrap().to_string();
        let mut daemon = LoggedDaemon::ebpf_inode(path, &group, 2);
        daemon.wait_for_line("Waking on events only");
        wait_converged(
            &dmfs,
            path,
            &path.file_name().unwrap().to_string_lossy(),
            "start-up",
        );
        daemons.push((daemon, group));
    }

    // Idle: not one context switch of any of its threads while nothing happens.
    let pid = daemons[0].0.child.id();
    let before = context_switches(pid);
    std::thread::sleep(Duration::from_secs(2)); // the interval measured, not a synchronisation
    assert_eq!(
        context_switches(pid),
        before,
        "the idle eBPF daemon woke up"
    );

    // A user deletes the first group: its daemon stops, the other one keeps running.
    run(
        "dmstats",
        &["delete", "--groupid", &daemons[0].1, &dmfs.name],
    )
    .unwrap();
    assert!(
        wait_for_exit(pid as i32, EXIT).unwrap(),
        "the daemon outlived its group"
    );
    let (mut second_daemon, _) = daemons.pop().unwrap();
    assert!(
        second_daemon.child.try_wait().unwrap().is_none(),
        "the other daemon stopped"
    );

    // The second file is unlinked while another process holds it, then closed.
    let mut holder = hold_open(&second);
    fs::remove_file(&second).unwrap();
    second_daemon.wait_for_line("is unlinked but held");
    assert!(
        second_daemon.child.try_wait().unwrap().is_none(),
        "exited while held"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    second_daemon.wait_for_line("File unlinked and closed: exiting.");
}
