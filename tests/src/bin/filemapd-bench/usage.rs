//! What a monitor process costs while it runs: CPU time, wake-ups and memory, read from
//! /proc; and the idle benchmark built on it.
use std::{fs, os::unix::fs::MetadataExt as _, time::Duration};

use filemapd::stats::StatsDevice;
use filemapd_tests::{
    DmFs, FsKind, context_switches, map_without_daemon, status_field, write_and_sync,
};

use crate::{
    monitors::{Monitor, wait_covered},
    report,
};

/// A process's use of the machine so far, summed over its threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Time on a CPU (schedstat: nanoseconds, not clock ticks).
    pub cpu: Duration,
    /// Context switches, voluntary or not: each is a wake-up of one of its threads.
    pub wakeups: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Usage {
        let mut cpu = Duration::ZERO;
        // A process that has ended used nothing more.
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return Usage::default();
        };
        for task in tasks {
            // A thread that ended meanwhile has no schedstat left.
            let Ok(schedstat) = fs::read_to_string(task.unwrap().path().join("schedstat")) else {
                continue;
            };
            let ns: u64 = schedstat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            cpu += Duration::from_nanos(ns);
        }
        Usage {
            cpu,
            wakeups: context_switches(pid),
        }
    }

    pub fn since(self, earlier: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            wakeups: self.wakeups.saturating_sub(earlier.wakeups),
        }
    }

    /// Scaled to one minute of `over`.
    pub fn per_minute(self, over: Duration) -> (f64, f64) {
        let scale = 60.0 / over.as_secs_f64();
        (
            self.wakeups as f64 * scale,
            self.cpu.as_secs_f64() * 1000.0 * scale,
        )
    }
}

/// Waits until the process is past its start-up work: until it used under 2 % of a CPU over
/// two seconds, or `limit` passed (a polling monitor may never be that quiet). Returns how
/// long it took, or `None` at the limit.
pub fn quiet(pid: u32, limit: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let window = Duration::from_secs(2);
    while started.elapsed() < limit {
        let before = Usage::of(pid);
        std::thread::sleep(window);
        if Usage::of(pid).since(before).cpu < window / 50 {
            return Some(started.elapsed());
        }
    }
    None
}

/// Resident memory in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(
        &fs::read_to_string(format!("/proc/{pid}/status")).unwrap(),
        "VmRSS:",
    )
}

/// The part of a process's resident memory that is the eBPF maps it has mapped (the sector
/// map's tables, `BPF_F_MMAPABLE`), in KiB: the kernel's memory, allocated whole when the
/// programs load, which RSS counts as the process's own pages because they are mapped.
pub fn mapped_ebpf_kib(pid: u32) -> u64 {
    mapped_ebpf_kib_in(&fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap())
}

fn mapped_ebpf_kib_in(smaps: &str) -> u64 {
    let mut in_map = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if in_map {
                kib += rss
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        } else if is_mapping_header(line) {
            in_map = line.ends_with("anon_inode:bpf-map");
        }
    }
    kib
}

/// Whether a line of smaps opens a mapping (`start-end perms offset dev inode [path]`) rather
/// than giving one of its fields (`Name:   value`).
fn is_mapping_header(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .and_then(|range| range.split_once('-'))
        .is_some_and(|(start, end)| {
            u64::from_str_radix(start, 16).is_ok() && u64::from_str_radix(end, 16).is_ok()
        })
}

/// One monitored file nobody touches: what each monitor costs per minute.
pub fn run_idle(over: Duration) {
    report!("## Idle cost: one monitored file, nobody writes\n");
    report!(
        "ext4, a 1 MiB file in its group; each monitor runs with its defaults for {} s after its",
        over.as_secs()
    );
    report!("first map. Wake-ups: context switches of all its threads (/proc/PID/task/*/status);");
    report!("CPU: time on a CPU (/proc/PID/task/*/schedstat). Both scaled to one minute.\n");
    report!("| monitor | wake-ups / min | CPU ms / min | RSS KiB |");
    report!("| --- | --- | --- | --- |");
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("idle.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let device = StatsDevice::for_st_dev(fs::metadata(&path).unwrap().dev()).unwrap();
    for monitor in Monitor::ALL {
        let group = map_without_daemon(&path).unwrap();
        let running = monitor.spawn(&path, group).unwrap();
        assert!(wait_covered(
            &device,
            &path,
            0,
            1 << 20,
            Duration::from_secs(60)
        ));
        // Past start-up (eBPF loading, the first map) before counting.
        quiet(running.pid(), Duration::from_secs(10));
        let before = Usage::of(running.pid());
        std::thread::sleep(over);
        let (wakeups, cpu_ms) = Usage::of(running.pid()).since(before).per_minute(over);
        report!(
            "| {} | {wakeups:.0} | {cpu_ms:.1} | {} |",
            monitor.name(),
            rss_kib(running.pid())
        );
        drop(running);
        filemapd_tests::run("dmstats", &["delete", "--allregions", &dmfs.name]).unwrap();
    }
    report!("\nTarget: 0 wake-ups for filemapd --ebpf.\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bpf_maps_rss_is_summed() {
        let smaps = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 fd:01 1234   /usr/bin/filemapd
Size:               1024 kB
Rss:                 800 kB
7f0000000000-7f0001200000 rw-s 00000000 00:0f 42     anon_inode:bpf-map
Size:              18432 kB
Rss:               18432 kB
Pss:               18432 kB
7f0002000000-7f0002100000 rw-p 00000000 00:00 0
Rss:                 512 kB
7f0003000000-7f0003640000 rw-s 00000000 00:0f 43     anon_inode:bpf-map
Rss:                6400 kB
VmFlags: rd wr sh mr mw me ms
";
        assert_eq!(mapped_ebpf_kib_in(smaps), 18432 + 6400);
        assert_eq!(mapped_ebpf_kib_in(""), 0);
    }
}
