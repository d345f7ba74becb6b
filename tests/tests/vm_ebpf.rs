//! The eBPF trigger against real device-mapper (run inside the VM by `cargo xtask test`):
//! events instead of the interval, the fallback to polling, dmstats-launched daemons with
//! FILEMAPD_EBPF=1, many files in one `filemapd watch`, path mode, and an idle daemon that
//! sleeps until something happens.
use std::{fs, time::Duration};

use filemapd_tests::{
    DmFs, FsKind, context_switches,
    daemon::{
        CONVERGE, EXIT, LoggedDaemon, append, delete_group_and_wait, device_of, drop_in_dir,
        group_by_alias, hold_open, wait_converged,
    },
    map_without_daemon, pids_of, punch_hole, require_device_mapper, run, run_env, wait_for_exit,
    wait_until, write_and_sync,
};

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
    delete_group_and_wait(&dmfs, &path, "vm.img", pids[0]);
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

/// As a systemd service: READY=1 once its files are watched; SIGHUP reads the config again
/// (a file it now names is watched, one it no longer names is let go, its group as it is);
/// SIGTERM ends the watch between passes, exit 0.
#[test]
fn watch_reloads_on_sighup_and_ends_cleanly_on_sigterm() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let (a, b) = (dmfs.mount.dir.join("a.img"), dmfs.mount.dir.join("b.img"));
    let mut lines = Vec::new();
    for path in [&a, &b] {
        write_and_sync(path, 0, 1 << 20).unwrap();
        let group = map_without_daemon(path).unwrap();
        lines.push(format!("{group} inode {}\n", path.display()));
    }
    let conf = dmfs.mount.dir.join("watch.conf");
    fs::write(&conf, &lines[0]).unwrap();
    let c = conf.to_string_lossy().into_owned();
    // Where systemd would listen for Type=notify's READY=1.
    let notify_path = dmfs.mount.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(CONVERGE)).unwrap();
    let n = notify_path.to_string_lossy().into_owned();
    let mut watch = LoggedDaemon::start(
        &["watch", "--ebpf", "-v", "--config", &c],
        &a,
        &[("NOTIFY_SOCKET", &n)],
    );
    watch.wait_for_line("watching 1 file(s)");
    let mut said = [0u8; 64];
    let len = notify.recv(&mut said).expect("no word to NOTIFY_SOCKET");
    assert_eq!(String::from_utf8_lossy(&said[..len]).trim(), "READY=1");
    wait_converged(&dmfs, &a, "a.img", "start-up");

    fs::write(&conf, &lines[1]).unwrap();
    let pid = watch.child.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    watch.wait_for_line("SIGHUP: 1 file(s) watched (1 new, 1 let go)");
    let (_, a_before) = group_by_alias(&device_of(&a), "a.img").unwrap();
    append(&a, 2);
    append(&b, 2);
    wait_converged(&dmfs, &b, "b.img", "a reload that added it");
    let (_, a_after) = group_by_alias(&device_of(&a), "a.img").unwrap();
    assert_eq!(
        a_after, a_before,
        "a file the config no longer names was updated"
    );

    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    watch.wait_for_line("Terminated: exiting.");
    let status = watch.child.wait().unwrap();
    assert!(status.success(), "SIGTERM: {status}");
    wait_converged(&dmfs, &b, "b.img", "SIGTERM");
    watch.stop();
}

/// `filemapd watch DIR FILE`: every regular file in the directory and the file named are
/// watched. A file that has a group keeps it; the others get one as dmstats makes it, which
/// Debian's dmstats lists by its alias. An empty file (no extents to map) is said and left out
/// until it is written to; a file made in the directory later is taken up the same way. A
/// deleted file's group is deleted with it.
#[test]
fn watch_by_path_adopts_or_makes_each_files_group() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Xfs).unwrap();
    let images = dmfs.mount.dir.join("images");
    fs::create_dir(&images).unwrap();
    let adopted = images.join("old.img");
    write_and_sync(&adopted, 0, 1 << 20).unwrap();
    let old_group = map_without_daemon(&adopted).unwrap();
    let fresh = images.join("new.img");
    write_and_sync(&fresh, 0, 2 << 20).unwrap();
    fs::File::create(images.join("empty.img")).unwrap();
    let single = dmfs.mount.dir.join("single.img");
    write_and_sync(&single, 0, 1 << 20).unwrap();

    let (i, s) = (
        images.to_string_lossy().into_owned(),
        single.to_string_lossy().into_owned(),
    );
    let mut watch = LoggedDaemon::start(&["watch", "--ebpf", "-v", &i, &s], &single, &[]);
    watch.wait_for_line("watching 3 file(s)");
    let device = device_of(&adopted);
    assert_eq!(
        group_by_alias(&device, "old.img").unwrap().0,
        old_group,
        "not adopted"
    );
    let listed = run("dmstats", &["list", "--group", &dmfs.name]).unwrap();
    for alias in ["new.img", "single.img"] {
        assert!(listed.contains(alias), "no group {alias}:\n{listed}");
    }
    for path in [&adopted, &fresh, &single] {
        append(path, 2);
    }
    for path in [&adopted, &fresh, &single] {
        let alias = path.file_name().unwrap().to_string_lossy().into_owned();
        wait_converged(&dmfs, path, &alias, "appending 2 MiB");
    }
    // An image made after the start, empty at first (as `qemu-img create` makes one): mapped
    // once it is written to, then followed.
    let later = images.join("later.img");
    fs::File::create(&later).unwrap();
    write_and_sync(&later, 0, 1 << 20).unwrap();
    watch.wait_for_line("later.img: watched from now on");
    append(&later, 1);
    wait_converged(&dmfs, &later, "later.img", "its first blocks and an append");
    // A deleted file's group goes with it (no --keep-groups).
    fs::remove_file(&fresh).unwrap();
    watch.wait_for_line("new.img: the file is gone, and so is its group");
    assert!(group_by_alias(&device, "new.img").is_none());
    let log = watch.stop();
    assert!(
        log.iter()
            .any(|l| l.contains("empty.img: not watched") && l.contains("no extents")),
        "{}",
        log.join("\n")
    );
}
