//! Latency: how long after a writer's fsync returns does the group have a region covering
//! the new data? Writes come after a random pause of up to 500 ms, so they fall at random
//! points of a polling loop's cycle. The kernel says when each region was made (see
//! `witness`): while steps run, the bench itself sends dm nothing.
use std::{fs, os::unix::fs::MetadataExt as _, time::Duration};

use filemapd::{stats::StatsDevice, wake::ebpf::counting::monotonic_ns};
use filemapd_tests::{DmFs, FsKind, map_without_daemon, write_and_sync, writers::Rng};

use crate::{
    monitors::{Monitor, sectors_of, wait_covered},
    ms, quantile, report,
    witness::Witness,
};

const STEP: usize = 64 << 10;
/// A step whose new data has no region after this long counts as missed (lvm2's policy misses
/// growth that does not change st_blocks, e.g. into xfs's speculative preallocation).
const MISS_AFTER: Duration = Duration::from_secs(2);

pub fn run(steps: usize) {
    report!("## Latency: writer's fsync returned → a region covers the new data\n");
    report!(
        "Each step appends 64 KiB with fsync after a random pause of 0–500 ms. The kernel is the"
    );
    report!(
        "witness: a bpftrace probe on dm-stats' message handler (`dm_stats_message`) timestamps"
    );
    report!("each `@stats_create` as it returns, on the clock of the writer's fsync return");
    report!(
        "(CLOCK_MONOTONIC); a step's latency is from fsync's return until the regions made so far"
    );
    report!(
        "cover every sector FIEMAP shows for the new bytes, 0 when they did before it returned"
    );
    report!("(\"before fsync\" counts those). The bench sends dm no message while steps run.");
    report!(
        "\"missed\": steps whose new data had no region {} s after fsync (counted as slower than",
        MISS_AFTER.as_secs()
    );
    report!("any measured step in the percentiles).\n");
    report!("| fs | monitor | steps | missed | before fsync | median ms | p99 ms | max ms |");
    report!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut rows = Vec::new();
    let mut witness = Witness::start();
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        for monitor in Monitor::ALL {
            let mut latencies = measure(fs_kind, monitor, steps, &mut witness);
            let early = latencies
                .iter()
                .filter(|l| **l == Some(Duration::ZERO))
                .count();
            // Misses (None) sort last: they are slower than any measured step.
            latencies.sort_unstable_by_key(|l| l.unwrap_or(Duration::MAX));
            let missed = latencies.iter().filter(|l| l.is_none()).count();
            let row = Row {
                fs_kind,
                monitor,
                median: quantile(&latencies, 0.5),
                p99: quantile(&latencies, 0.99),
                max: *latencies.last().unwrap(),
            };
            report!(
                "| {} | {} | {} | {} | {early} | {} | {} | {} |",
                fs_kind.name(),
                monitor.name(),
                latencies.len(),
                missed,
                show(row.median),
                show(row.p99),
                show(row.max),
            );
            rows.push(row);
        }
    }
    report!("");
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        let row = |m: Monitor| {
            rows.iter()
                .find(|r| r.fs_kind == fs_kind && r.monitor == m)
                .expect("every monitor was measured")
        };
        let (lvm2, ebpf) = (row(Monitor::Lvm2), row(Monitor::Ebpf));
        report!(
            "- {}: {}",
            fs_kind.name(),
            median_verdict(lvm2.median, ebpf.median)
        );
        report!(
            "- {}: filemapd --ebpf's p99 {} ms (target ≤ 5: {}), max {} ms (target ≤ 20: {})",
            fs_kind.name(),
            show(ebpf.p99),
            met(ebpf.p99, 5.0),
            show(ebpf.max),
            met(ebpf.max, 20.0),
        );
    }
    report!("");
}

/// One monitor's latencies on one file system.
struct Row {
    fs_kind: FsKind,
    monitor: Monitor,
    median: Option<Duration>,
    p99: Option<Duration>,
    max: Option<Duration>,
}

/// The median target (lvm2's median ≥ 100× filemapd --ebpf's), said in one line.
fn median_verdict(lvm2: Option<Duration>, ebpf: Option<Duration>) -> String {
    match (lvm2, ebpf) {
        (Some(reference), Some(Duration::ZERO)) => format!(
            "median lvm2 dmfilemapd {:.1} ms, filemapd --ebpf 0 (its median step was covered before fsync returned): target ≥ 100× met",
            ms(reference)
        ),
        (Some(reference), Some(ebpf)) => {
            let ratio = ms(reference) / ms(ebpf);
            format!(
                "median latency, lvm2 dmfilemapd / filemapd --ebpf = {ratio:.0}× (target ≥ 100×: {})",
                if ratio >= 100.0 { "met" } else { "missed" }
            )
        }
        _ => "no median ratio: a median step was missed (see the table)".into(),
    }
}

fn met(latency: Option<Duration>, target_ms: f64) -> &'static str {
    match latency {
        Some(d) if ms(d) <= target_ms => "met",
        _ => "missed",
    }
}

/// Milliseconds, or "> limit" for a step whose data was not covered in time.
fn show(latency: Option<Duration>) -> String {
    match latency {
        Some(d) => format!("{:.1}", ms(d)),
        None => format!("> {:.0}", ms(MISS_AFTER)),
    }
}

/// Appends STEP bytes `steps` times; for each, the time from fsync's return until regions
/// covered every sector of the new data.
fn measure(
    fs_kind: FsKind,
    monitor: Monitor,
    steps: usize,
    witness: &mut Witness,
) -> Vec<Option<Duration>> {
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
    // What exists now, listed once; from here on the witness says what is made.
    witness.forget();
    let before: Vec<_> = device.list(None).unwrap().iter().map(|r| r.range).collect();
    let mut latencies = Vec::with_capacity(steps);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..steps {
        // A random pause first, so that writes do not fall into step with a polling loop
        // (each step ends right after a poll found the data; without it, the next write would
        // always land just after a poll and wait a whole interval).
        std::thread::sleep(rng.duration_below(Duration::from_millis(500)));
        let offset = fs::metadata(&path).unwrap().len();
        write_and_sync(&path, offset, STEP).unwrap();
        let synced_ns = monotonic_ns();
        let wanted = sectors_of(&path, offset, STEP as u64);
        assert!(!wanted.is_empty(), "FIEMAP shows no place for fsynced data");
        let latency = witness
            .covered_at(&wanted, &before, MISS_AFTER)
            .map(|at_ns| Duration::from_nanos(at_ns.saturating_sub(synced_ns)))
            .filter(|latency| *latency <= MISS_AFTER);
        latencies.push(latency);
    }
    latencies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_target_is_met_only_at_a_hundredfold() {
        let ms = Duration::from_millis;
        assert!(median_verdict(Some(ms(200)), Some(ms(2))).ends_with("(target ≥ 100×: met)"));
        assert!(median_verdict(Some(ms(200)), Some(ms(3))).ends_with("(target ≥ 100×: missed)"));
        assert!(median_verdict(Some(ms(200)), Some(Duration::ZERO)).ends_with("met"));
        assert!(median_verdict(Some(ms(200)), None).starts_with("no median ratio"));
    }

    #[test]
    fn a_missed_step_never_meets_a_latency_target() {
        assert_eq!(met(Some(Duration::from_millis(5)), 5.0), "met");
        assert_eq!(met(Some(Duration::from_micros(5001)), 5.0), "missed");
        assert_eq!(met(None, 20.0), "missed");
    }
}
