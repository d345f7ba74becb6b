//! The drop-in daemon against real device-mapper (run inside the VM by `cargo xtask test`):
//! Debian's `dmstats create --filemap` launches filemapd installed as `dmfilemapd`, and the
//! group follows the file as it grows, shrinks, is replaced or goes away — on ext4 and xfs.
use std::{fs, os::unix::fs::MetadataExt as _, path::Path, process::Command, time::Duration};

use filemapd::sectors::SectorRange;
use filemapd_tests::{
    DmFs, FsKind,
    daemon::{
        CONVERGE, EXIT, LoggedDaemon, append, delete_group, delete_group_and_wait, device_of,
        drop_in_dir, file_ranges, filemapd_binary, group_by_alias, hold_open, map_and_monitor,
        map_and_monitor_with, region_line, region_table, run_drop_in, user_region, wait_converged,
    },
    map_without_daemon, punch_hole, require_device_mapper, run, wait_for_exit, wait_until,
    write_and_sync,
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
    let current = delete_group(&dmfs, &path, "disk.img");
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
    delete_group_and_wait(&dmfs, &path, "vm.img", pid);
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
        // Metrics name the host's images: other hosts only when asked for.
        vec!["watch", "--metrics", "0.0.0.0:9101", p],
        vec!["watch", "--metrics", "localhost", p],
        vec!["watch", "--metrics-remote", p],
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
    // (point, restart with the id of the leader the interrupted move was going to)
    let rounds = [
        ("created", false),
        ("switched", false),
        ("switched", true),
        ("deleted", false),
    ];
    for (round, (point, by_successor)) in rounds.into_iter().enumerate() {
        append(&path, 2);
        // Punch the first 512 KiB of data left: the leader's region now sticks out of its
        // extent, so every round deletes it and moves the group (whatever the file system
        // does with the appended blocks).
        punch_hole(&path, round as u64 * (512 << 10), 512 << 10).unwrap();
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

        // The next run converges, from the same group id or from the successor's, which the
        // old leader's MOVED marker names (lvm2's group id rule: the lowest member).
        let group = match by_successor {
            false => group,
            true => successor_named_by_a_moved_marker(&path),
        };
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

/// The leader a group was moving to when its daemon was killed, as the old leader's
/// `DMS_FILEMAPD_MOVED=` marker names it.
fn successor_named_by_a_moved_marker(path: &Path) -> String {
    let regions = device_of(path).list(None).unwrap();
    let marker = regions
        .iter()
        .find_map(|r| r.aux_data.strip_prefix("DMS_FILEMAPD_MOVED="))
        .unwrap_or_else(|| panic!("no MOVED marker after a kill at the switch: {regions:?}"));
    let descriptor = filemapd::stats::GroupDescriptor::parse(&format!("DMS_GROUP={marker}"))
        .unwrap()
        .unwrap();
    descriptor.leader().unwrap().to_string()
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

/// A defragmenter moves a file's blocks and leaves its size and block count as they were:
/// lvm2's test (st_blocks, size) never sees it. Both a polling and an eBPF daemon must follow.
fn follows_blocks_a_defragmenter_moved(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let dir = &dmfs.mount.dir;
    let (polled, traced) = (dir.join("polled.img"), dir.join("traced.img"));
    // Interleave the two files with fillers, then drop the fillers: both files fragment and
    // free space opens next to them. Four fragments fit in an ext4 inode, so that the block
    // count (no extent tree block) stays the same when they merge.
    for chunk in 0..4u64 {
        for path in [&polled, &traced] {
            write_and_sync(path, chunk << 16, 64 << 10).unwrap();
        }
        write_and_sync(&dir.join(format!("filler{chunk}")), 0, 64 << 10).unwrap();
    }
    for chunk in 0..4 {
        fs::remove_file(dir.join(format!("filler{chunk}"))).unwrap();
    }
    let (_, polling) = map_and_monitor(&polled, &[]);
    let (_, ebpf) = map_and_monitor_with(&traced, &[], &[("FILEMAPD_EBPF", "1")]);
    for (path, alias) in [(&polled, "polled.img"), (&traced, "traced.img")] {
        wait_converged(&dmfs, path, alias, "mapping");
        let before = file_ranges(path);
        let blocks = fs::metadata(path).unwrap().blocks();
        let p = path.to_string_lossy();
        match fs_kind {
            FsKind::Xfs => run("xfs_fsr", &["-v", &p]),
            _ => run("e4defrag", &[&p]),
        }
        .unwrap();
        let after = file_ranges(path);
        assert_ne!(after, before, "{alias}: the defragmenter moved nothing");
        assert_eq!(fs::metadata(path).unwrap().blocks(), blocks);
        wait_converged(&dmfs, path, alias, "defragmenting");
    }
    for (path, alias, pid) in [
        (&polled, "polled.img", polling),
        (&traced, "traced.img", ebpf),
    ] {
        delete_group_and_wait(&dmfs, path, alias, pid);
    }
}

#[test]
fn ext4_follows_blocks_a_defragmenter_moved() {
    follows_blocks_a_defragmenter_moved(FsKind::Ext4);
}
#[test]
fn xfs_follows_blocks_a_defragmenter_moved() {
    follows_blocks_a_defragmenter_moved(FsKind::Xfs);
}

/// Path mode runs as root on a path that others may be able to write to. A symlink, another
/// owner's file or a file of another device put at the path is not mapped: the group stays on
/// the file it had (said once each) until a file of the same owner takes the path.
#[test]
fn path_mode_refuses_a_symlink_another_owners_file_and_another_device() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let dir = dmfs.mount.dir.clone();
    let path = dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let p = path.to_string_lossy().into_owned();
    let mut daemon = LoggedDaemon::start(&["0", &group, &p, "path", "1", "1"], &path, &[]);
    wait_converged(&dmfs, &path, "vm.img", "mapping");
    let before = region_table(&dir);

    let secret = dir.join("secret.img");
    write_and_sync(&secret, 0, 1 << 20).unwrap();
    let link = dir.join("vm.img.link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    fs::rename(&link, &path).unwrap();
    daemon.wait_for_line("(it is a symbolic link); the group stays on the file it had");
    assert_eq!(region_table(&dir), before, "a symlink was followed");

    let theirs = dir.join("theirs.img");
    write_and_sync(&theirs, 0, 1 << 20).unwrap();
    std::os::unix::fs::chown(&theirs, Some(1234), Some(1234)).unwrap();
    fs::rename(&theirs, &path).unwrap();
    daemon.wait_for_line("(it belongs to uid 1234, the file it replaced to uid 0)");
    assert_eq!(
        region_table(&dir),
        before,
        "another owner's file was mapped"
    );

    let elsewhere = filemapd_tests::ScratchDir::new(Path::new("/tmp"), "elsewhere").unwrap();
    let other_device = elsewhere.0.join("vm.img");
    write_and_sync(&other_device, 0, 1 << 20).unwrap();
    run("mount", &["--bind", &other_device.to_string_lossy(), &p]).unwrap();
    daemon.wait_for_line("(it is on another device)");
    run("umount", &[&p]).unwrap();
    assert_eq!(
        region_table(&dir),
        before,
        "a file of another device was mapped"
    );

    let ours = dir.join("vm.img.new");
    write_and_sync(&ours, 0, 3 << 20).unwrap();
    fs::rename(&ours, &path).unwrap();
    wait_converged(&dmfs, &path, "vm.img", "a replacement by the owner");
    daemon.stop();
}

/// Listens on /dev/log as syslog does (the VM runs none); removed on drop.
struct SyslogListener(std::os::unix::net::UnixDatagram);

impl SyslogListener {
    fn bind() -> Self {
        let path = Path::new("/dev/log");
        assert!(
            !path.exists(),
            "/dev/log already exists: this test must own it (run it in the test VM)"
        );
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket.set_read_timeout(Some(CONVERGE)).unwrap();
        Self(socket)
    }

    /// The first message containing `text`; panics with what came instead after a time-out.
    fn wait_for(&self, text: &str) -> String {
        let mut seen = Vec::new();
        let mut buffer = vec![0u8; 8192];
        loop {
            match self.0.recv(&mut buffer) {
                Ok(n) => {
                    let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    if message.contains(text) {
                        return message;
                    }
                    seen.push(message);
                }
                Err(e) => panic!("no syslog message with {text:?} ({e}); got {seen:#?}"),
            }
        }
    }
}

impl Drop for SyslogListener {
    fn drop(&mut self) {
        let _ = fs::remove_file("/dev/log");
    }
}

/// A detached daemon logs to syslog (journald reads /dev/log), as `dmfilemapd[pid]` with the
/// daemon facility. lvm2's logs nothing at verbose 0; filemapd keeps its warnings.
#[test]
fn a_detached_daemon_logs_its_warnings_to_syslog() {
    require_device_mapper();
    let syslog = SyslogListener::bind();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let dir = dmfs.mount.dir.clone();
    let path = dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let (_, pid) = map_and_monitor(&path, &["--follow", "path"]);
    wait_converged(&dmfs, &path, "vm.img", "mapping");
    let secret = dir.join("secret.img");
    write_and_sync(&secret, 0, 1 << 20).unwrap();
    let link = dir.join("vm.img.link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    fs::rename(&link, &path).unwrap();
    let message = syslog.wait_for("not following the file now at this path");
    // <28>: facility daemon (3 << 3), severity warning (4).
    assert!(
        message.starts_with("<28>") && message.contains(&format!("dmfilemapd[{pid}]")),
        "{message}"
    );
    delete_group_and_wait(&dmfs, &path, "vm.img", pid);
}

/// Run by hand as `dmfilemapd 0 GROUP PATH inode 0 0 < PATH` (the file as stdin, detached,
/// quiet): detaching must not put /dev/null where the file was. (It did: the daemon exited
/// at once; dmstats passes a descriptor above 2, which hid it.)
#[test]
fn a_detached_daemon_keeps_a_file_given_as_stdin() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let p = path.to_string_lossy().into_owned();
    let status = Command::new(filemapd_binary())
        .args(["0", &group, &p, "inode", "0", "0"])
        .stdin(fs::File::open(&path).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    append(&path, 2);
    wait_converged(&dmfs, &path, "vm.img", "growth under a detached daemon");
    let pids = filemapd_tests::pids_of("filemapd", &p);
    assert_eq!(pids.len(), 1, "one detached daemon expected: {pids:?}");
    delete_group(&dmfs, &path, "vm.img");
    assert!(
        wait_for_exit(pids[0], EXIT).unwrap(),
        "the daemon outlived its group"
    );
}
