//! One set of programs per host: `files` daemons started as Debian's dmstats starts them
//! (detached, eBPF asked for), alone and then with a `filemapd watch --handoff` service
//! running, which they hand their files to. What it costs the host in processes and memory.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use filemapd_tests::{pids_of, wait_for_exit, wait_until};

use crate::{
    monitors::{Running, filemapd_binary},
    report,
    scale::small_files_in_groups,
    usage::{mapped_ebpf_kib, quiet, rss_kib},
};

pub fn run(files: usize) {
    report!("## One set of programs per host: {files} dmstats-launched daemons\n");
    let (dmfs, paths, groups) = small_files_in_groups(files);
    let dir = &dmfs.mount.dir;
    report!(
        "ext4, {files} files of 64 KiB, one group each; each daemon started as dmstats starts it"
    );
    report!(
        "(`dmfilemapd <fd> <group> <path> inode 0 0`, FILEMAPD_EBPF=1), then left until quiet. RSS"
    );
    report!(
        "summed over every filemapd process left, and the part of it that is the eBPF maps' tables"
    );
    report!(
        "mapped into the processes (the kernel's memory, allocated whole at load, counted in RSS"
    );
    report!("because it is mapped).\n");
    report!("| launch | processes | RSS MiB in all | of it eBPF maps' tables MiB |");
    report!("| --- | --- | --- | --- |");

    let pids = launch(&paths, &groups, false);
    let rss: u64 = pids.iter().map(|&p| rss_kib(p as u32)).sum();
    let maps: u64 = pids.iter().map(|&p| mapped_ebpf_kib(p as u32)).sum();
    report!(
        "| {files} daemons, no service | {} | {:.1} | {:.1} |",
        pids.len(),
        rss as f64 / 1024.0,
        maps as f64 / 1024.0
    );
    for &pid in &pids {
        filemapd_tests::send_signal(pid, nix::sys::signal::SIGTERM);
    }
    for pid in pids {
        assert!(
            wait_for_exit(pid, Duration::from_secs(60)).unwrap(),
            "daemon {pid} lives on"
        );
    }

    let config = dir.join("empty.toml");
    fs::write(&config, "").unwrap();
    let service = Running::of(
        Command::new(filemapd_binary())
            .args(["watch", "--ebpf", "--handoff", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    quiet(service.pid(), Duration::from_secs(120));
    let left = launch(&paths, &groups, true);
    let rss: u64 = rss_kib(service.pid()) + left.iter().map(|&p| rss_kib(p as u32)).sum::<u64>();
    let maps: u64 = mapped_ebpf_kib(service.pid())
        + left.iter().map(|&p| mapped_ebpf_kib(p as u32)).sum::<u64>();
    report!(
        "| {files} daemons handing over to `filemapd watch --ebpf --handoff` | {} | {:.1} | {:.1} |",
        1 + left.len(),
        rss as f64 / 1024.0,
        maps as f64 / 1024.0
    );
    report!("\nTarget: {files} dmstats-launched files with the service: one process, < 30 MiB.\n");
}

/// Starts a detached daemon per file as dmstats does and waits until each launch returned.
/// With a service, until every daemon handed over and exited; without, until the daemons are
/// quiet. Returns the daemons left.
fn launch(paths: &[PathBuf], groups: &[u64], service: bool) -> Vec<i32> {
    for (path, group) in paths.iter().zip(groups) {
        let status = Command::new(filemapd_binary())
            .args([
                "0",
                &group.to_string(),
                &path.to_string_lossy(),
                "inode",
                "0",
                "0",
            ])
            .env("FILEMAPD_EBPF", "1")
            .stdin(fs::File::open(path).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{}: {status}", path.display());
    }
    if service {
        wait_until(
            "every daemon to hand over",
            Duration::from_secs(120),
            || Ok(paths.iter().all(|p| daemons_of(p).is_empty())),
        )
        .unwrap();
        return Vec::new();
    }
    // (Right after a launch, the first child of the daemon's double fork may still be there:
    // the daemons are listed again once quiet.)
    let pids: Vec<i32> = paths.iter().flat_map(|p| daemons_of(p)).collect();
    for pid in &pids {
        quiet(*pid as u32, Duration::from_secs(120));
    }
    let pids: Vec<i32> = paths.iter().flat_map(|p| daemons_of(p)).collect();
    assert_eq!(pids.len(), paths.len(), "not one daemon per file: {pids:?}");
    pids
}

fn daemons_of(path: &Path) -> Vec<i32> {
    pids_of("filemapd", &path.to_string_lossy())
}
