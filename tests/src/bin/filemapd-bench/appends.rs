//! Append growth: 200 fsync'd 64 KiB appends to a mapped file. How many regions does each
//! extent end with, and is the IO counted before the growth still counted after it?
use std::{fs, os::unix::fs::MetadataExt as _, time::Duration};

use filemapd::stats::StatsDevice;
use filemapd_tests::{DmFs, FsKind, daemon::file_ranges, map_without_daemon, write_and_sync};

use crate::{
    median_and_spread,
    monitors::{Monitor, group_counters, the_group, wait_covered},
    report,
};

const HEAD: u64 = 1 << 20;
const APPEND: u64 = 64 << 10;
const APPENDS: u64 = 200;

struct Outcome {
    extents: usize,
    /// `None`: the group was lost.
    regions: Option<usize>,
    /// Sectors read before the growth that the group still counts after it, in %.
    kept: Option<f64>,
    covered: bool,
}

pub fn run(rounds: usize) {
    report!("## Append growth: regions per extent, counters kept\n");
    report!(
        "A 1 MiB file is mapped and read once with O_DIRECT (2048 sectors counted), then grows"
    );
    report!(
        "by {APPENDS} fsync'd 64 KiB appends. At the end: the file's extents (merged device ranges),"
    );
    report!(
        "the group's regions, and the share of the sectors read before the growth that the group"
    );
    report!(
        "still counts. Cells: median (lowest–highest) of {rounds} rounds, each on a fresh file system.\n"
    );
    report!("| fs | monitor | extents | regions | regions per extent | counted before, kept % |");
    report!("| --- | --- | --- | --- | --- | --- |");
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        for monitor in Monitor::ALL {
            let outcomes: Vec<Outcome> = (0..rounds).map(|_| measure(fs_kind, monitor)).collect();
            let cell = |values: Vec<f64>, decimals| {
                if values.is_empty() {
                    "group lost".to_string()
                } else {
                    median_and_spread(values, decimals)
                }
            };
            let lost = outcomes.iter().filter(|o| o.regions.is_none()).count();
            let behind = outcomes.iter().filter(|o| !o.covered).count();
            let mut kept = cell(outcomes.iter().filter_map(|o| o.kept).collect(), 1);
            if lost > 0 {
                kept += &format!("; group lost in {lost} of {rounds}");
            }
            if behind > 0 {
                kept += &format!("; {behind} of {rounds} never caught up");
            }
            report!(
                "| {} | {} | {} | {} | {} | {kept} |",
                fs_kind.name(),
                monitor.name(),
                cell(outcomes.iter().map(|o| o.extents as f64).collect(), 0),
                cell(
                    outcomes
                        .iter()
                        .filter_map(|o| o.regions.map(|r| r as f64))
                        .collect(),
                    0
                ),
                cell(
                    outcomes
                        .iter()
                        .filter_map(|o| o.regions.map(|r| r as f64 / o.extents as f64))
                        .collect(),
                    2
                ),
            );
        }
    }
    report!(
        "\nTargets (issue 9) for filemapd: ≤ 4 regions per extent; 100 % of the IO counted before growth kept.\n"
    );
}

fn measure(fs_kind: FsKind, monitor: Monitor) -> Outcome {
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("append.img");
    write_and_sync(&path, 0, HEAD as usize).unwrap();
    let group = map_without_daemon(&path).unwrap();
    let device = StatsDevice::for_st_dev(fs::metadata(&path).unwrap().dev()).unwrap();
    let running = monitor.spawn(&path, group).unwrap();
    assert!(wait_covered(
        &device,
        &path,
        0,
        HEAD,
        Duration::from_secs(60)
    ));
    let p = path.to_string_lossy();
    filemapd_tests::run(
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
    let before = group_counters(&device).map_or(0, |c| c.sectors_read);
    for i in 0..APPENDS {
        write_and_sync(&path, HEAD + i * APPEND, APPEND as usize).unwrap();
    }
    let size = HEAD + APPENDS * APPEND;
    let covered = wait_covered(&device, &path, 0, size, Duration::from_secs(30));
    drop(running.stop());
    let group = the_group(&device);
    let after = group_counters(&device).map(|c| c.sectors_read);
    Outcome {
        extents: file_ranges(&path).len(),
        regions: group.map(|g| g.member_count()),
        kept: after.map(|a| a.min(before) as f64 / before.max(1) as f64 * 100.0),
        covered,
    }
}
