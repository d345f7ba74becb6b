//! Faults on the kernel side, in the device-mapper VM: each test ends with the group converged,
//! or with the daemon gone with one clear line and exit 1 and nothing of it left in transit;
//! never with a daemon stuck.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use filemapd_tests::{
    DmFs, FsKind,
    daemon::{
        CONVERGE, LoggedDaemon, append, converged, converged_held, drop_in_dir, region_table,
        run_drop_in, tally_figure, wait_converged,
    },
    map_without_daemon, require_device_mapper, run, wait_until, write_and_sync,
};
use nix::sys::signal::{SIGCONT, SIGSTOP, SIGTERM};

/// `dmfilemapd 0 GROUP PATH inode 1 1` in the foreground on `path`, as a child.
fn foreground_daemon(path: &Path, group: u64) -> std::process::Child {
    Command::new(drop_in_dir().join("dmfilemapd"))
        .args([
            "0",
            &group.to_string(),
            &path.to_string_lossy(),
            "inode",
            "1",
            "1",
        ])
        .stdin(std::fs::File::open(path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The id in dmstats' "...: Created new region with N area(s) as region ID M" line.
fn region_id(dmstats_output: &str) -> u64 {
    dmstats_output
        .rsplit("region ID ")
        .next()
        .and_then(|t| t.trim().trim_end_matches('.').parse().ok())
        .unwrap_or_else(|| panic!("no region id in {dmstats_output:?}"))
}

/// Creates regions with many areas, then fewer, until dm-stats refuses every new region
/// (its memory is capped at a quarter of RAM). Returns their ids.
fn exhaust_dm_stats_memory(device: &str) -> Vec<u64> {
    let mut hogs = Vec::new();
    for areas in [1 << 18, 1 << 14, 1 << 10, 1] {
        while let Ok(out) = run(
            "dmstats",
            &["create", "--areas", &areas.to_string(), device],
        ) {
            hogs.push(region_id(&out));
        }
    }
    assert!(!hogs.is_empty(), "dm-stats refused even the first region");
    hogs
}

/// dm-stats answers ENOMEM to `@stats_create` once its memory is spent. The update that needed
/// the region is abandoned: the daemon exits 1 with the cause, and the regions it had already
/// created in that pass are gone again. Once memory is freed, the next run converges.
#[test]
fn dm_stats_out_of_memory_mid_update() {
    require_device_mapper();
    // A large (sparse) device, so that single regions can hold many areas.
    let dmfs = DmFs::with_size(FsKind::Ext4, 4096).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap();
    // Two new extents apart from the first: the update must create regions.
    append(&path, 2);
    write_and_sync(&path, 64 << 20, 1 << 20).unwrap();
    let hogs = exhaust_dm_stats_memory(&dmfs.name);
    let before = region_table(&path);

    let p = path.to_string_lossy().into_owned();
    let (code, stderr) = run_drop_in(
        &["0", &group.to_string(), &p, "inode", "1", "0"],
        &path,
        &[],
    );
    assert_eq!(code, Some(1), "expected exit 1: {stderr}");
    assert!(
        stderr.contains("Cannot allocate memory") && stderr.contains("creating a region"),
        "the cause is not named: {stderr}"
    );
    assert_eq!(
        region_table(&path),
        before,
        "the abandoned update left regions behind"
    );

    for id in hogs {
        run(
            "dmstats",
            &["delete", "--regionid", &id.to_string(), &dmfs.name],
        )
        .unwrap();
    }
    let mut daemon = foreground_daemon(&path, group);
    wait_converged(&dmfs, &path, "vm.img", "memory was freed");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

/// Resumes the device when dropped, so that a failing test never leaves it suspended (its
/// file system could then not be unmounted).
struct Suspended<'a>(&'a str);

impl Drop for Suspended<'_> {
    fn drop(&mut self) {
        let _ = run("dmsetup", &["resume", self.0]);
    }
}

/// An administrator suspends the device (`dmsetup suspend`) while an update is due. dm-stats
/// still takes messages then (its own suspend is skipped on a suspended device), and the
/// blocks are already allocated: the daemon converges without waiting for the resume.
#[test]
fn an_update_goes_through_while_an_administrator_holds_the_device_suspended() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Xfs).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap();
    append(&path, 2);
    write_and_sync(&path, 16 << 20, 1 << 20).unwrap();
    run("dmsetup", &["suspend", &dmfs.name]).unwrap();
    let resume = Suspended(&dmfs.name);
    let mut daemon = foreground_daemon(&path, group);
    let mut exited = None;
    wait_until(
        "the daemon to converge or exit while suspended",
        CONVERGE,
        || {
            exited = daemon.try_wait()?;
            Ok(exited.is_some() || converged(&dmfs, &path, "vm.img")?)
        },
    )
    .unwrap();
    assert_eq!(
        exited, None,
        "the daemon exited while the device was suspended"
    );
    drop(resume);
    append(&path, 1);
    wait_converged(&dmfs, &path, "vm.img", "the resume and another append");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

/// fsfreeze flushes dirty data (allocating its blocks) and then blocks writers; a remount
/// read-only does the same. The daemon only reads (FIEMAP) and messages the device: it maps
/// what the freeze allocated while the file system is frozen, and goes on after both.
#[test]
fn a_frozen_and_a_read_only_file_system_are_followed() {
    require_device_mapper();
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        let dmfs = DmFs::new(fs_kind).unwrap();
        let dir = dmfs.mount.dir.to_string_lossy().into_owned();
        let path = dmfs.mount.dir.join("vm.img");
        write_and_sync(&path, 0, 1 << 20).unwrap();
        let group = map_without_daemon(&path).unwrap();
        // Its log is shown if the test fails.
        let g = group.to_string();
        let p = path.to_string_lossy().into_owned();
        let daemon = LoggedDaemon::start(&["0", &g, &p, "inode", "1", "1"], &path, &[]);
        wait_converged(&dmfs, &path, "vm.img", "mapping");

        // Dirty, not yet allocated: the freeze writes it back.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &vec![7u8; 3 << 20]))
            .unwrap();
        // Read through a descriptor opened before the freeze: closing one on a frozen xfs
        // can block until the thaw (it trims post-EOF blocks), and this test, the only one to
        // thaw, would wedge itself (seen once in ~25 runs on 6.1, the daemon's FIEMAP then
        // waiting on the inode lock the test's close held).
        let held = std::fs::File::open(&path).unwrap();
        bounded(&["fsfreeze", "--freeze", &dir]).unwrap();
        let thawed = Frozen(&dir);
        wait_until("regions to tile the file after a freeze", CONVERGE, || {
            converged_held(&dmfs, &path, &held, "vm.img")
        })
        .unwrap_or_else(|e| panic!("{}: {e}", fs_kind.name()));
        drop(thawed);
        drop(held);

        append(&path, 1);
        bounded(&["mount", "-o", "remount,ro", &dir]).unwrap();
        wait_converged(&dmfs, &path, "vm.img", "a remount read-only");
        bounded(&["mount", "-o", "remount,rw", &dir]).unwrap();
        append(&path, 1);
        wait_converged(&dmfs, &path, "vm.img", "a remount read-write");
        let mut daemon = daemon;
        assert_eq!(
            daemon.child.try_wait().unwrap(),
            None,
            "{}: the daemon died",
            fs_kind.name()
        );
        daemon.stop();
    }
}

/// Runs a command that may block on a frozen or busy file system for at most a minute, so that
/// a hang fails this test instead of the whole VM run.
fn bounded(command: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["60"];
    args.extend_from_slice(command);
    run("timeout", &args)
}

/// Thaws the file system when dropped (a frozen one could not be unmounted).
struct Frozen<'a>(&'a str);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = run("fsfreeze", &["--unfreeze", self.0]);
    }
}

/// The administrator unmounts lazily and removes the device (`dmsetup remove --deferred`):
/// the device lives on while the daemon holds the file. Deleting the group then ends the
/// daemon (exit 0), and with it the device.
#[test]
fn a_device_removed_under_the_daemon_goes_once_its_group_does() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap();
    let mut daemon = LoggedDaemon::drop_in(&path, &group.to_string());
    // (Deleting the group before the daemon found it would make its start fail instead.)
    daemon.wait_for_line("Monitoring group");
    wait_converged(&dmfs, &path, "vm.img", "mapping");

    run("umount", &["--lazy", &dmfs.mount.dir.to_string_lossy()]).unwrap();
    run("dmsetup", &["remove", "--deferred", &dmfs.name]).unwrap();
    // (libdm may take the /dev/mapper node away at once; the kernel's device stays.)
    let exists = || run("dmsetup", &["info", &dmfs.name]).is_ok();
    assert!(exists(), "the device went while the daemon holds its file");
    assert_eq!(daemon.child.try_wait().unwrap(), None, "the daemon died");

    run(
        "dmstats",
        &["delete", "--groupid", &group.to_string(), &dmfs.name],
    )
    .unwrap();
    let status = daemon
        .wait_for_exit()
        .expect("the daemon still runs after its group was deleted");
    assert!(status.success(), "the daemon exited with {status}");
    wait_until("the deferred removal", CONVERGE, || Ok(!exists())).unwrap();
}

/// The kernel's ring buffer overflows: a 4 KiB ring (room for ~70 events), and the daemon
/// stopped while its file gains 400 extents. The loss is counted, the daemon reads the whole
/// file again and converges.
#[test]
fn lost_events_are_counted_and_a_rescan_converges() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap().to_string();
    let mut daemon =
        LoggedDaemon::ebpf_inode_with(&path, &group, 1, &[("FILEMAPD_TEST_RING_BYTES", "4096")]);
    daemon.wait_for_line("Waking on events only");
    daemon.signal(SIGSTOP);
    // Sized first, so that no write extends the file: each one is an allocation of its own.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    for chunk in (0..400u64).rev() {
        write_and_sync(&path, (2 << 20) + chunk * (128 << 10), 4096).unwrap();
    }
    daemon.signal(SIGCONT);
    daemon.wait_for_line("eBPF event(s) lost: mapping every file again");
    wait_converged(&dmfs, &path, "vm.img", "lost events");
    daemon.signal(SIGTERM); // it ends between passes, with its tally
    daemon.wait_for_line("Terminated: exiting.");
    let log = daemon.stop();
    let tally = log
        .iter()
        .find(|l| l.contains("rescans after lost events"))
        .expect("a tally line");
    assert!(
        tally_figure(tally, "rescans").is_some_and(|n| n >= 1),
        "no rescan counted: {tally}"
    );
}

/// More files than the kernel filter has room for (here: room for one): the one left out is
/// polled, which is said once, and both groups follow their files.
#[test]
fn a_file_the_kernel_filter_has_no_room_for_is_polled() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let mut config = String::new();
    let files: Vec<_> = ["a.img", "b.img"]
        .iter()
        .map(|name| dmfs.mount.dir.join(name))
        .collect();
    for path in &files {
        write_and_sync(path, 0, 1 << 20).unwrap();
        let group = map_without_daemon(path).unwrap();
        config.push_str(&format!("{group} inode {}\n", path.display()));
    }
    let conf = dmfs.mount.dir.join("watch.conf");
    std::fs::write(&conf, config).unwrap();
    let c = conf.to_string_lossy().into_owned();
    let mut watch = LoggedDaemon::start(
        &["watch", "--ebpf", "-v", "--config", &c],
        &files[0],
        &[("FILEMAPD_TEST_WATCH_ROOM", "1")],
    );
    watch.wait_for_line("the kernel filter has no room for it");
    for path in &files {
        append(path, 2);
    }
    for path in &files {
        let alias = path.file_name().unwrap().to_string_lossy();
        wait_converged(&dmfs, path, &alias, "appending 2 MiB");
    }
    let log = watch.stop();
    let said = log.iter().filter(|l| l.contains("has no room")).count();
    assert_eq!(said, 1, "said {said} times:\n{}", log.join("\n"));
}
