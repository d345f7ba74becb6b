//! What regions cost by merely existing: dm-stats walks a device's whole region list for every
//! bio, at its start and at its end. A file grown by random O_DIRECT writes (fragmented as a
//! sparse VM image gets) is rewritten in place, with its group mapped and without; no region
//! is created meanwhile, so the difference is the walk alone, whichever daemon made them.
use std::{fs, os::unix::fs::MetadataExt as _, time::Instant};

use filemapd::stats::StatsDevice;
use filemapd_tests::{
    DmFs, FsKind, map_without_daemon, write_and_sync, writers::random_direct_writes,
};

use crate::{median, median_and_spread, report};

const HEAD: u64 = 1 << 20;
const SPAN: u64 = 256 << 20;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

pub fn run(rounds: usize) {
    report!("## What regions cost every IO to their device\n");
    report!(
        "A 1 MiB file grows by 256 MiB of random 64 KiB O_DIRECT writes (no monitor), is mapped"
    );
    report!(
        "once by `dmstats create --filemap`, and is then rewritten in place by the same writes"
    );
    report!("(same offsets: nothing is allocated, no region is created) with its group and, after");
    report!(
        "`dmstats delete --allregions`, without; the group is mapped again for each round, and"
    );
    report!("the order alternates. Cells: the writer's MB/s, median (lowest–highest) of {rounds}");
    report!("rounds. This cost comes with the regions, whoever created them.\n");
    report!("| fs | regions | without regions | with the group | slowdown |");
    report!("| --- | --- | --- | --- | --- |");
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        let dmfs = DmFs::new(fs_kind).unwrap();
        let path = dmfs.mount.dir.join("image.img");
        write_and_sync(&path, 0, HEAD as usize).unwrap();
        random_direct_writes(&path, HEAD, SPAN, SEED);
        let device = StatsDevice::for_st_dev(fs::metadata(&path).unwrap().dev()).unwrap();
        let (mut without, mut with, mut regions) = (Vec::new(), Vec::new(), Vec::new());
        let rewrite = || {
            let started = Instant::now();
            let written = random_direct_writes(&path, HEAD, SPAN, SEED);
            written as f64 / started.elapsed().as_secs_f64() / 1e6
        };
        for round in 0..rounds {
            for mapped in [round % 2 == 0, round % 2 == 1] {
                if mapped {
                    map_without_daemon(&path).unwrap();
                    regions.push(device.list(None).unwrap().len() as f64);
                    with.push(rewrite());
                    filemapd_tests::run("dmstats", &["delete", "--allregions", &dmfs.name])
                        .unwrap();
                } else {
                    without.push(rewrite());
                }
            }
        }
        let baseline = median(without.clone());
        let slowdown = (baseline - median(with.clone())) / baseline * 100.0;
        report!(
            "| {} | {} | {} | {} | {slowdown:+.1} % |",
            fs_kind.name(),
            median_and_spread(regions, 0),
            median_and_spread(without, 1),
            median_and_spread(with, 1),
        );
    }
    report!("");
}
