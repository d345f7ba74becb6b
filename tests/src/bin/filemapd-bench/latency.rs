//! Latency: how long after a writer's fsync returns does the group have a region covering
//! the new data? Writes come after a random pause of up to 500 ms, so they fall at random
//! points of a polling loop's cycle.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use filemapd::stats::StatsDevice;
use filemapd_tests::{DmFs, FsKind, map_without_daemon, write_and_sync, writers::Rng};

use crate::{
    monitors::{Monitor, wait_covered},
    ms, quantile, report,
};

const STEP: usize = 64 << 10;
/// A step whose new data has no region after this long counts as missed (lvm2's policy misses
/// growth that does not change st_blocks, e.g. into xfs's speculative preallocation).
const MISS_AFTER: Duration = Duration::from_secs(2);

pub fn run(steps: usize) {
    report!("## Latency: writer's fsync returned → a region covers the new data\n");
    report!(
        "Each step appends 64 KiB with fsync after a random pause of 0–500 ms, then the benchmark"
    );
    report!(
        "spins on `@stats_list` until group regions cover every sector FIEMAP shows for the new"
    );
    report!(
        "bytes. \"missed\": steps whose new data had no region {} s after fsync (counted as",
        MISS_AFTER.as_secs()
    );
    report!("slower than any measured step in the percentiles).\n");
    report!("| fs | monitor | steps | missed | median ms | p99 ms | max ms |");
    report!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut medians = Vec::new();
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        for monitor in Monitor::ALL {
            let mut latencies = measure(fs_kind, monitor, steps);
            // Misses (None) sort last: they are slower than any measured step.
            latencies.sort_unstable_by_key(|l| l.unwrap_or(Duration::MAX));
            let missed = latencies.iter().filter(|l| l.is_none()).count();
            let median = quantile(&latencies, 0.5);
            medians.push((fs_kind, monitor, median));
            report!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                fs_kind.name(),
                monitor.name(),
                latencies.len(),
                missed,
                show(median),
                show(quantile(&latencies, 0.99)),
                show(*latencies.last().unwrap()),
            );
        }
    }
    report!("");
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        let median = |m: Monitor| {
            medians
                .iter()
                .find(|(f, mon, _)| *f == fs_kind && *mon == m)
                .and_then(|(_, _, d)| *d)
        };
        match (median(Monitor::Lvm2), median(Monitor::Ebpf)) {
            (Some(reference), Some(ebpf)) => report!(
                "- {}: median latency, lvm2 dmfilemapd / filemapd --ebpf = {:.0}× (target ≥ 100×)",
                fs_kind.name(),
                ms(reference) / ms(ebpf).max(0.001)
            ),
            _ => report!(
                "- {}: no ratio: a median step was missed (see the table)",
                fs_kind.name()
            ),
        }
    }
    report!("- Targets (issue 9) for filemapd --ebpf: p99 ≤ 5 ms and max ≤ 20 ms on ext4 and xfs.");
    report!("");
}

/// Milliseconds, or "> limit" for a step whose data was not covered in time.
fn show(latency: Option<Duration>) -> String {
    match latency {
        Some(d) => format!("{:.1}", ms(d)),
        None => format!("> {:.0}", ms(MISS_AFTER)),
    }
}

/// Appends STEP bytes `steps` times; for each, the time from fsync's return until a region of
/// the group covers every sector of the new data.
fn measure(fs_kind: FsKind, monitor: Monitor, steps: usize) -> Vec<Option<Duration>> {
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("bench.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap();
    let device = StatsDevice::for_st_dev(fs::metadata(&path).unwrap().dev()).unwrap();
    let running = monitor.spawn(&path, group);
    monitor.wait_ready(running.as_ref());
    // Settled: the first map is done when the group covers the file.
    assert!(
        wait_covered(&device, &path, 0, 1 << 20, Duration::from_secs(60)),
        "the first map never came"
    );
    let mut latencies = Vec::with_capacity(steps);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..steps {
        // A random pause first, so that writes do not fall into step with a polling loop
        // (each step ends right after a poll found the data; without it, the next write would
        // always land just after a poll and wait a whole interval).
        std::thread::sleep(rng.duration_below(Duration::from_millis(500)));
        let offset = fs::metadata(&path).unwrap().len();
        write_and_sync(&path, offset, STEP).unwrap();
        let synced = Instant::now();
        let covered = wait_covered(&device, &path, offset, STEP as u64, MISS_AFTER);
        latencies.push(covered.then(|| synced.elapsed()));
    }
    latencies
}
