//! The drop-in daemon against real device-mapper (run inside the VM by `cargo xtask test`):
//! Debian's `dmstats create --filemap` launches filemapd installed as `dmfilemapd`, and the
//! group follows the file as it grows, shrinks, is replaced or goes away — on ext4 and xfs.
use std::{
    fs,
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use filemapd::{
    dmstats::{Region, StatsDevice},
    fiemap,
    sectors::{SectorRange, join_adjacent},
};
use filemapd_tests::{
    DmFs, FsKind, context_switches, created_group_id, dmstats_list_regions, map_without_daemon,
    pids_of, punch_hole, require_device_mapper, run, run_env, wait_for_exit, wait_until,
    write_and_sync,
};

/// Generous bounds for an emulated VM; only reached when something is wrong.
const CONVERGE: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(30);

/// A directory holding `dmfilemapd` → filemapd, to put first on dmstats' PATH.
fn drop_in_dir() -> PathBuf {
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
fn map_and_monitor(path: &Path, extra: &[&str]) -> (u64, i32) {
    let search_path = format!(
        "{}:{}",
        drop_in_dir().display(),
        std::env::var("PATH").unwrap()
    );
    let mut args = vec!["create", "--filemap"];
    args.extend(extra);
    let path_arg = path.to_string_lossy();
    args.push(&path_arg);
    let group_id =
        created_group_id(&run_env("dmstats", &args, &[("PATH", &search_path)]).unwrap()).unwrap();
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

fn device_of(path: &Path) -> StatsDevice {
    StatsDevice::for_st_dev(fs::metadata(path).unwrap().dev()).unwrap()
}

/// The file's extents as regions should be, sorted.
fn file_ranges(path: &Path) -> Vec<SectorRange> {
    let file = fs::File::open(path).unwrap();
    let mut ranges =
        fiemap::device_ranges(&fiemap::read_extents(&file, 0, u64::MAX, false).unwrap());
    ranges.sort_unstable();
    ranges
}

/// The group with this alias: its leader id and member regions.
fn group_by_alias(device: &StatsDevice, alias: &str) -> Option<(u64, Vec<Region>)> {
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
        .filter(|r| members.contains(&r.id))
        .collect();
    Some((leader_id, regions))
}

/// Whether the group's regions equal the file's extents, in filemapd's and in dmstats' view.
fn converged(dmfs: &DmFs, path: &Path, alias: &str) -> anyhow::Result<bool> {
    let Some((_, members)) = group_by_alias(&device_of(path), alias) else {
        return Ok(false);
    };
    let mut ours: Vec<SectorRange> = members.iter().map(|r| r.range).collect();
    ours.sort_unstable();
    let wanted = file_ranges(path);
    let mut listed: Vec<SectorRange> = dmstats_list_regions(&dmfs.name)?
        .into_iter()
        .map(|(s, l)| SectorRange::new(s, l))
        .filter(|r| wanted.contains(r) || ours.contains(r))
        .collect();
    listed.sort_unstable();
    Ok(ours == wanted && listed == wanted)
}

fn wait_converged(dmfs: &DmFs, path: &Path, alias: &str, after: &str) {
    wait_until(
        &format!("regions to match the file after {after}"),
        CONVERGE,
        || converged(dmfs, path, alias),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nfile: {:?}\ndmstats list:\n{}",
            file_ranges(path),
            run("dmstats", &["list", "--units", "s", &dmfs.name]).unwrap()
        )
    });
}

/// Whether the group's regions tile the file's extents exactly (eBPF mode keeps counters by
/// tiling a grown extent instead of replacing its region), without overlaps.
fn tiled(path: &Path, alias: &str) -> anyhow::Result<bool> {
    let Some((_, members)) = group_by_alias(&device_of(path), alias) else {
        return Ok(false);
    };
    let mut ranges: Vec<SectorRange> = members.iter().map(|r| r.range).collect();
    ranges.sort_unstable();
    let disjoint = ranges.windows(2).all(|w| w[0].end() <= w[1].start);
    Ok(disjoint && join_adjacent(ranges) == join_adjacent(file_ranges(path)))
}

fn wait_tiled(dmfs: &DmFs, path: &Path, alias: &str, after: &str) {
    wait_until(
        &format!("regions to tile the file after {after}"),
        CONVERGE,
        || tiled(path, alias),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nfile: {:?}\ndmstats list:\n{}",
            file_ranges(path),
            run("dmstats", &["list", "--units", "s", &dmfs.name]).unwrap()
        )
    });
}

fn append(path: &Path, mib: u64) {
    let len = fs::metadata(path).unwrap().len();
    write_and_sync(path, len, (mib << 20) as usize).unwrap();
}

/// A region of the user's own, outside any group, listed whole (id, place, aux data).
fn user_region(dmfs: &DmFs) -> String {
    run(
        "dmstats",
        &["create", "--start", "8", "--length", "16", &dmfs.name],
    )
    .unwrap();
    region_line(dmfs, |r| r.range == SectorRange::new(8, 16))
}

fn region_line(dmfs: &DmFs, which: impl Fn(&Region) -> bool) -> String {
    let path = dmfs.mount.dir.clone();
    let regions = device_of(&path).list(None).unwrap();
    let r = regions.iter().find(|r| which(r)).expect("region present");
    format!(
        "{} {} {} {} {:?}",
        r.id, r.range, r.program_id, r.aux_data, r.settings
    )
}

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

/// Another process that keeps `path` open until killed.
fn hold_open(path: &Path) -> std::process::Child {
    Command::new("sleep")
        .arg("600")
        .stdin(fs::File::open(path).unwrap())
        .spawn()
        .unwrap()
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

/// Runs the drop-in in the foreground on the file (as fd 0) and returns (exit code, stderr).
fn run_drop_in(args: &[&str], stdin: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(drop_in_dir().join("dmfilemapd"))
        .args(args)
        .stdin(fs::File::open(stdin).unwrap())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn filemapd_binary() -> PathBuf {
    fs::canonicalize(drop_in_dir().join("dmfilemapd")).unwrap()
}

/// Every region on the device, one line each, for before/after comparisons.
fn region_table(path: &Path) -> Vec<String> {
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

/// A foreground daemon whose log lines are read as they come.
struct LoggedDaemon {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LoggedDaemon {
    fn start(args: &[&str], file: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(filemapd_binary())
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
    fn ebpf_inode(file: &Path, group: &str, verbose: u8) -> Self {
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
        Self::start(&args, file, &[])
    }

    /// Blocks until a log line containing `text` arrives (the daemon's own event).
    fn wait_for_line(&mut self, text: &str) {
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

    /// Stops the daemon and returns its whole log.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        self.child.wait().unwrap();
        self.seen.extend(self.lines.try_iter());
        std::mem::take(&mut self.seen)
    }
}

impl Drop for LoggedDaemon {
    /// A failing test must not leave its daemon holding the file system.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    wait_tiled(&dmfs, &path, "vm.img", "start-up"); // the first pass maps the file

    append(&path, 4);
    wait_tiled(&dmfs, &path, "vm.img", "appending 4 MiB (eBPF)");
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
    wait_tiled(&dmfs, &path, "vm.img", "fallocate (eBPF)");
    punch_hole(&path, 1 << 20, 1 << 20).unwrap();
    wait_tiled(&dmfs, &path, "vm.img", "punching a hole (eBPF)");
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    wait_tiled(&dmfs, &path, "vm.img", "truncating (eBPF)");

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
    wait_tiled(&dmfs, &path, "vm.img", "appending 4 MiB");
    let (current, _) = group_by_alias(&device_of(&path), "vm.img").unwrap();
    run(
        "dmstats",
        &["delete", "--groupid", &current.to_string(), &dmfs.name],
    )
    .unwrap();
    assert!(wait_for_exit(pids[0], EXIT).unwrap());
}

/// The point of tiling: when the last extent grows, its region (and its counters) stays, a new
/// region covers the new part, and dmstats still reports the group as the whole file.
fn growth_keeps_the_counters(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let p = path.to_string_lossy().into_owned();
    let mut daemon = LoggedDaemon::ebpf_inode(&path, &group, 1);
    daemon.wait_for_line("eBPF trigger on");
    wait_tiled(&dmfs, &path, "vm.img", "start-up");

    // Count some IO in the group: read the file past the page cache.
    run(
        "dd",
        &[
            &format!("if={p}"),
            "of=/dev/null",
            "bs=64k",
            "iflag=direct",
            "status=none",
        ],
    )
    .unwrap();
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
    wait_tiled(&dmfs, &path, "vm.img", "growing the file");
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
    daemon.stop();
}

#[test]
fn ext4_growth_keeps_the_counters() {
    growth_keeps_the_counters(FsKind::Ext4);
}
#[test]
fn xfs_growth_keeps_the_counters() {
    growth_keeps_the_counters(FsKind::Xfs);
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
        wait_tiled(dmfs, path, &alias, "appending to every watched file");
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
    wait_tiled(
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
            "1",
        ],
        &path,
        &[],
    );
    daemon.wait_for_line("eBPF trigger on");
    let replacement = dmfs.mount.dir.join("vm.img.new");
    write_and_sync(&replacement, 0, 3 << 20).unwrap();
    fs::rename(&replacement, &path).unwrap();
    daemon.wait_for_line("was replaced");
    wait_tiled(&dmfs, &path, "vm.img", "replacing the file");
    append(&path, 4);
    wait_tiled(&dmfs, &path, "vm.img", "growing the replacement");
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
        wait_tiled(
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
