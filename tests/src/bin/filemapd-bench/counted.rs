//! Counted IO and interference: a writer grows the monitored file by 256 MiB; how much of
//! what it wrote did the group's regions count (`@stats_print`), and how fast was the writer
//! with each monitor beside it?
use std::{
    fs,
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::Path,
    time::{Duration, Instant},
};

use filemapd::dmstats::StatsDevice;
use filemapd_tests::{
    DmFs, FsKind, map_without_daemon, write_and_sync, writers::random_direct_writes,
};

use crate::{
    monitors::{Monitor, group_sectors_written, wait_covered},
    report,
};

const GROWTH: u64 = 256 << 20;
const HEAD: u64 = 1 << 20;

#[derive(Clone, Copy)]
enum Pattern {
    /// dd bs=1M conv=fsync: buffered 1 MiB appends, one fsync at the end.
    Sequential,
    /// A VM image with cache=none: 64 KiB O_DIRECT writes at random 64 KiB-aligned offsets of
    /// a sparse 256 MiB span, as many bytes as the span (so some land twice).
    VmImage,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "dd bs=1M conv=fsync",
            Pattern::VmImage => "random 64 KiB O_DIRECT",
        }
    }
}

struct Outcome {
    written: u64,
    elapsed: Duration,
    /// Sectors the group counted as written; `None` without a monitor (nothing keeps a group).
    counted: Option<u64>,
    /// Whether the regions covered the whole file once the monitor had time to catch up.
    covered: bool,
}

pub fn run(rounds: usize) {
    report!("## Counted IO and writer interference\n");
    report!(
        "A 1 MiB file is mapped (`dmstats create --filemap --nomonitor`), a monitor started, and a"
    );
    report!(
        "writer adds 256 MiB. Counted: sectors written per the group's regions (`@stats_print`)"
    );
    report!(
        "once the monitor has caught up, as a share of the bytes the writer wrote. Throughput:"
    );
    report!(
        "the writer's bytes over its time including the final fsync. Each cell is the median of"
    );
    report!(
        "{rounds} rounds; each round runs every monitor once, in a rotating order, on a fresh file"
    );
    report!("system. Slowdown: against no monitor, from the medians.\n");
    report!("| fs | writer | monitor | MiB written | MB/s | slowdown | counted | uncounted |");
    report!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    const MONITORS: [Monitor; 4] = [
        Monitor::Nothing,
        Monitor::Ebpf,
        Monitor::Polling,
        Monitor::Reference,
    ];
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        for pattern in [Pattern::Sequential, Pattern::VmImage] {
            let mut outcomes: Vec<Vec<Outcome>> = MONITORS.iter().map(|_| Vec::new()).collect();
            for round in 0..rounds {
                for k in 0..MONITORS.len() {
                    let m = (round + k) % MONITORS.len();
                    outcomes[m].push(measure(fs_kind, pattern, MONITORS[m]));
                }
            }
            let rate = |o: &Outcome| o.written as f64 / o.elapsed.as_secs_f64() / 1e6;
            let share = |o: &Outcome| {
                o.counted
                    .map(|sectors| (sectors * 512) as f64 / o.written as f64 * 100.0)
            };
            let median_rate = |runs: &[Outcome]| median(runs.iter().map(rate).collect());
            let baseline = median_rate(&outcomes[0]);
            for (monitor, runs) in MONITORS.iter().zip(&outcomes) {
                let rate = median_rate(runs);
                let (counted, uncounted) = match runs.iter().map(share).collect::<Option<Vec<_>>>()
                {
                    Some(shares) => {
                        let counted = median(shares);
                        let behind = runs.iter().filter(|o| !o.covered).count();
                        let note = if behind > 0 {
                            format!(" ({behind} of {} runs never caught up)", runs.len())
                        } else {
                            String::new()
                        };
                        (
                            format!("{counted:.1} %{note}"),
                            format!("{:.1} %", 100.0 - counted),
                        )
                    }
                    None => ("—".into(), "—".into()),
                };
                report!(
                    "| {} | {} | {} | {} | {rate:.1} | {:+.1} % | {counted} | {uncounted} |",
                    fs_kind.name(),
                    pattern.name(),
                    monitor.name(),
                    runs[0].written >> 20,
                    (baseline - rate) / baseline * 100.0,
                );
            }
        }
    }
    report!("\nTargets: counted ≥ 99 %, slowdown ≤ 1 % for filemapd --ebpf.\n");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    crate::quantile(&values, 0.5)
}

fn measure(fs_kind: FsKind, pattern: Pattern, monitor: Monitor) -> Outcome {
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("grow.img");
    write_and_sync(&path, 0, HEAD as usize).unwrap();
    let group = map_without_daemon(&path).unwrap();
    let device = StatsDevice::for_st_dev(fs::metadata(&path).unwrap().dev()).unwrap();
    let running = monitor.spawn(&path, group);
    assert!(wait_covered(
        &device,
        &path,
        0,
        HEAD,
        Duration::from_secs(60)
    ));
    let started = Instant::now();
    let written = match pattern {
        Pattern::Sequential => write_sequential(&path),
        Pattern::VmImage => write_random_direct(&path),
    };
    let elapsed = started.elapsed();
    let size = fs::metadata(&path).unwrap().size();
    let covered =
        running.is_some() && wait_covered(&device, &path, 0, size, Duration::from_secs(30));
    let counted = running.map(|monitor| {
        drop(monitor);
        group_sectors_written(&device)
    });
    Outcome {
        written,
        elapsed,
        counted,
        covered,
    }
}

fn write_sequential(path: &Path) -> u64 {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    let chunk = vec![0x5a_u8; 1 << 20];
    for i in 0..GROWTH >> 20 {
        file.write_all_at(&chunk, HEAD + (i << 20)).unwrap();
    }
    file.sync_all().unwrap();
    GROWTH
}

fn write_random_direct(path: &Path) -> u64 {
    random_direct_writes(path, HEAD, GROWTH, 0x2545_f491_4f6c_dd1d)
}
