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
    writers::{direct_rewrites, random_direct_writes},
};
use nix::sys::signal::{SIGHUP, SIGTERM};

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
    watch.signal(SIGHUP);
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

    watch.signal(SIGTERM);
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

/// Writes to an image the directory's watch follows already are no news to the watch: 1,600
/// O_DIRECT rewrites of its blocks through one descriptor (nothing allocated, as a running
/// VM writes) wake it a handful of times at most. (inotify used to tell it of every write in
/// the directory, and each made it list the directory again: a CPU-second for 100 images.) A
/// file made empty in the directory is still taken up at its first write, its own writes
/// being heard until then.
#[test]
fn rewrites_of_watched_images_do_not_wake_the_watch() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let images = dmfs.mount.dir.join("images");
    fs::create_dir(&images).unwrap();
    let image = images.join("vm.img");
    write_and_sync(&image, 0, 1 << 20).unwrap();
    let dir = images.to_string_lossy().into_owned();
    let mut watch = LoggedDaemon::start(&["watch", "--ebpf", "-v", &dir], &image, &[]);
    watch.wait_for_line("watching 1 file(s)");
    wait_converged(&dmfs, &image, "vm.img", "start-up");

    let pid = watch.child.id();
    let before = context_switches(pid);
    let writes = direct_rewrites(&image, 1 << 20, 100);
    let woken = context_switches(pid) - before;
    assert!(
        woken <= 10,
        "the watch woke {woken} times for {writes} rewrites of a watched image"
    );

    let later = images.join("later.img");
    let made = fs::File::create(&later).unwrap();
    random_direct_writes(&later, 0, 1 << 20, 7);
    watch.wait_for_line("later.img: watched from now on");
    drop(made);
    wait_converged(&dmfs, &later, "later.img", "its first blocks");
    watch.stop();
}

/// A VM host's images are made anew in place: truncated to empty and written again, or
/// replaced by a file renamed over them. In a watched directory each ends with exactly one
/// group of its name, which tiles its new blocks, and no region is left on the blocks it
/// gave back (they would count other files' IO); the watch, though it followed that one
/// file, keeps running.
fn a_re_created_image_keeps_one_group(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let images = dmfs.mount.dir.join("images");
    fs::create_dir(&images).unwrap();
    let image = images.join("vm.img");
    write_and_sync(&image, 0, 4 << 20).unwrap();
    let dir = images.to_string_lossy().into_owned();
    let mut watch = LoggedDaemon::start(&["watch", "--ebpf", "-v", &dir], &image, &[]);
    watch.wait_for_line("watching 1 file(s)");
    wait_converged(&dmfs, &image, "vm.img", "the watch's start");

    fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(0)
        .unwrap();
    watch.wait_for_line("vm.img: no extents left");
    assert_eq!(strays(&dmfs, "vm.img"), Vec::<String>::new());
    assert!(group_by_alias(&device_of(&image), "vm.img").is_none());
    write_and_sync(&image, 0, 2 << 20).unwrap();
    wait_converged(
        &dmfs,
        &image,
        "vm.img",
        "truncating to empty and writing anew",
    );
    assert_eq!(strays(&dmfs, "vm.img"), Vec::<String>::new());

    // Made beside the directory (a file made in it would be watched as itself), then renamed
    // over the image.
    let staging = dmfs.mount.dir.join("staging.img");
    write_and_sync(&staging, 0, 3 << 20).unwrap();
    fs::rename(&staging, &image).unwrap();
    wait_converged(&dmfs, &image, "vm.img", "a new file renamed over it");
    assert_eq!(strays(&dmfs, "vm.img"), Vec::<String>::new());
    assert!(
        watch.child.try_wait().unwrap().is_none(),
        "the watch exited:\n{}",
        watch.stop().join("\n")
    );
    watch.stop();
}

/// The regions on the device outside the one group called `alias` (the region that keeps
/// dm-stats' accounting on aside), and a second group of that name, if any, as dmstats'
/// lines would name them.
fn strays(dmfs: &DmFs, alias: &str) -> Vec<String> {
    let device = device_of(&dmfs.mount.dir);
    let members = group_by_alias(&device, alias).map(|(_, regions)| regions);
    let leaders = device
        .list(None)
        .unwrap()
        .into_iter()
        .filter(|r| {
            r.group()
                .ok()
                .flatten()
                .is_some_and(|g| g.alias == alias && g.leader() == Some(r.id))
        })
        .count();
    let mut strays: Vec<String> = device
        .list(None)
        .unwrap()
        .into_iter()
        .filter(|r| !r.aux_data.starts_with(filemapd::stats::hook::AUX_DATA))
        .filter(|r| !members.iter().flatten().any(|m| m.id == r.id))
        .map(|r| format!("region {} at {} ({})", r.id, r.range, r.aux_data))
        .collect();
    if leaders > 1 {
        strays.push(format!("{leaders} groups called {alias}"));
    }
    strays
}

#[test]
fn ext4_a_re_created_image_keeps_one_group() {
    a_re_created_image_keeps_one_group(FsKind::Ext4);
}

#[test]
fn xfs_a_re_created_image_keeps_one_group() {
    a_re_created_image_keeps_one_group(FsKind::Xfs);
}

/// `watch --check-config` says, per file, what a watch would do with it (adopt which group,
/// make one and how, or count it in the kernel alone), what the kernel's sector map is sized
/// for against the extents the files hold, whether the programs load (and count through
/// which hook) when the watch would load them, and changes nothing on the device; a config
/// with a mistake fails in one line that names the line at fault.
#[test]
fn check_config_says_what_would_be_watched_and_changes_nothing() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let images = dmfs.mount.dir.join("images");
    fs::create_dir(&images).unwrap();
    let (fresh, mapped) = (images.join("fresh.img"), images.join("mapped.img"));
    write_and_sync(&fresh, 0, 1 << 20).unwrap();
    write_and_sync(&mapped, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&mapped).unwrap();
    let quiet = dmfs.mount.dir.join("quiet.img");
    write_and_sync(&quiet, 0, 1 << 20).unwrap();
    let config = dmfs.mount.dir.join("watch.toml");
    fs::write(
        &config,
        format!(
            "kernel_map_extents = 2\n\n[[path]]\npath = \"{}\"\n\n[[path]]\npath = \"{}\"\nregions = \"none\"\n",
            images.display(),
            quiet.display()
        ),
    )
    .unwrap();
    let before = filemapd_tests::daemon::region_table(&mapped);
    let check = |config: &std::path::Path| {
        let out = std::process::Command::new(filemapd_tests::daemon::filemapd_binary())
            .args(["watch", "--check-config", "--config"])
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, said, _) = check(&config);
    assert_eq!(code, Some(0), "{said}");
    for (file, how) in [
        (
            &fresh,
            "no group yet: one made as dmstats makes it (alias fresh.img".to_string(),
        ),
        (&mapped, format!("adopts group {group}, regions tiled")),
        (
            &quiet,
            "regions none: the kernel's counters alone".to_string(),
        ),
    ] {
        let line = format!("{}: {how}", file.display());
        assert!(said.contains(&line), "no {line:?} in:\n{said}");
    }
    // The map's size as the config sets it, against the extents filefrag lists.
    let held: usize = [&fresh, &mapped, &quiet]
        .iter()
        .map(|file| listed_extents(file))
        .sum();
    for line in [
        "kernel map: with eBPF, sized for 2 extents (kernel_map_extents in the config): 1.7 kB of the kernel's memory".to_string(),
        format!("kernel map: the files hold {held} extents now, more than it is sized for"),
    ] {
        assert!(held > 2 && said.contains(&line), "no {line:?} in:\n{said}");
    }
    // A file counted by the kernel alone needs the programs: they are loaded to see.
    let line = "eBPF: the programs load here: allocation events wake the watch, and the kernel counts the files' IO through the dm-stats hook";
    assert!(said.contains(line), "no {line:?} in:\n{said}");
    assert_eq!(
        filemapd_tests::daemon::region_table(&mapped),
        before,
        "it changed regions"
    );

    // A PATH takes a `[[path]]`'s options on the command line.
    let out = std::process::Command::new(filemapd_tests::daemon::filemapd_binary())
        .args([
            "watch",
            "--check-config",
            "--follow",
            "path",
            "--alias",
            "renamed",
        ])
        .args(["--program-id", "mine"])
        .arg(&fresh)
        .env_remove("FILEMAPD_EBPF")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    for line in [
        format!(
            "{}: no group yet: one made as dmstats makes it (alias renamed, program id mine), regions tiled, followed by path",
            fresh.display()
        ),
        "kernel map: with eBPF, sized for 50000 extents (the default): 27.3 MB".to_string(),
        "eBPF: not asked for: files poll every 0.5 s".to_string(),
        format!(
            "kernel map: the files hold {} now\n",
            match listed_extents(&fresh) {
                1 => "1 extent".to_string(),
                n => format!("{n} extents"),
            }
        ),
    ] {
        assert!(
            out.status.success() && said.contains(&line),
            "no {line:?} in:\n{said}"
        );
    }

    let broken = dmfs.mount.dir.join("broken.toml");
    fs::write(&broken, "[[path]]\npath = \"/x\"\nregion = \"none\"\n").unwrap();
    let (code, said, errors) = check(&broken);
    assert_eq!(code, Some(1), "{said}{errors}");
    assert_eq!(errors.trim().lines().count(), 1, "{errors}");
    assert!(errors.contains("line 3"), "{errors}");
}

/// The placed extents `filefrag -v` lists for a file, one per line (not merged).
fn listed_extents(file: &std::path::Path) -> usize {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| {
            let mut cols = line.split(':');
            cols.next().is_some_and(|i| i.trim().parse::<u64>().is_ok())
                && !line.contains("unknown_loc")
                && !line.contains("delalloc")
        })
        .count()
}
