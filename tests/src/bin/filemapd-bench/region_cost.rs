//! What regions cost by merely existing: dm-stats walks a device's whole region list for every
//! bio, at its start and at its end. A file grown by random O_DIRECT writes (fragmented as a
//! sparse VM image gets) is rewritten in place, with its group mapped, without, and counted by
//! the kernel alone (`filemapd watch --regions none`: one region of filemapd's own on the
//! device, and a probe on dm-stats' per-bio accounting), and so counted through the bio hook
//! (the block layer's tracepoints, no region); no region is created meanwhile.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use filemapd::stats::StatsDevice;
use filemapd_tests::{
    DmFs, FsKind, map_without_daemon, write_and_sync,
    writers::{WRITE_CHUNK, random_direct_writes},
};

use crate::{median, median_and_spread, monitors::Running, program_time::ProgramClock, report};

const HEAD: u64 = 1 << 20;
const SPAN: u64 = 256 << 20;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

pub fn run(rounds: usize) {
    report!("## What regions cost every IO to their device\n");
    report!(
        "A 1 MiB file grows by 256 MiB of random 64 KiB O_DIRECT writes (no monitor), is mapped\n\
         once by `dmstats create --filemap`, and is then rewritten in place by the same writes\n\
         (same offsets: nothing is allocated, no region is created) with its group; after\n\
         `dmstats delete --allregions`, without; counted by the kernel alone, `filemapd watch\n\
         --regions none FILE` running (the device then holds filemapd's one region, whose\n\
         every bio dm-stats accounts, and a probe on that accounting); and so counted through\n\
         the bio hook (`--io-hook bio`: the block layer's tracepoints, no region, every\n\
         bio of the VM looked at). The group is mapped again for each round, and the order\n\
         rotates. Cells:\n\
         the writer's MB/s, median (lowest–highest) of {rounds} rounds; slowdowns against no\n\
         monitor. The group's cost comes with its regions, whoever created them. Under each\n\
         table, the kernel's own witness of what counting costs the rewrite: the time its eBPF\n\
         programs ran (BPF_ENABLE_STATS) as a share of the rewrite's time, median of the\n\
         rounds, free of the VM's round-to-round noise in MB/s.\n"
    );
    report!(
        "| fs | regions | no monitor | with the group | slowdown | `--regions none` | slowdown | through the bio hook | slowdown |"
    );
    report!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut verdicts = Vec::new();
    let mut prices = Vec::new();
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        let dmfs = DmFs::new(fs_kind).unwrap();
        let path = dmfs.mount.dir.join("image.img");
        write_and_sync(&path, 0, HEAD as usize).unwrap();
        random_direct_writes(&path, HEAD, SPAN, SEED);
        let device = StatsDevice::for_st_dev(fs::metadata(&path).unwrap().dev()).unwrap();
        let (mut without, mut with, mut regions) = (Vec::new(), Vec::new(), Vec::new());
        let (mut kernel, mut bio_hook) = (Vec::new(), Vec::new());
        let (mut kernel_share, mut bio_hook_share) = (Vec::new(), Vec::new());
        let clock = ProgramClock::start();
        // MB/s, and the eBPF programs' time as a share (%) of the rewrite's.
        let rewrite_timed = || {
            let (started, programs) = (Instant::now(), clock.read());
            let written = random_direct_writes(&path, HEAD, SPAN, SEED);
            let (took, ran) = (started.elapsed(), clock.read() - programs);
            (
                written as f64 / took.as_secs_f64() / 1e6,
                ran.all.as_secs_f64() / took.as_secs_f64() * 100.0,
            )
        };
        let rewrite = || rewrite_timed().0;
        for round in 0..rounds {
            for way in 0..4 {
                match (round + way) % 4 {
                    0 => {
                        map_without_daemon(&path).unwrap();
                        regions.push(device.list(None).unwrap().len() as f64);
                        with.push(rewrite());
                        delete_all_regions(&dmfs.name);
                    }
                    1 => {
                        let p = path.to_string_lossy().into_owned();
                        let watch = Running::filemapd(&["watch", "--regions", "none", "-v", &p]);
                        assert!(
                            watch
                                .wait_until_settled("watching 1 file(s)", Duration::from_secs(120)),
                            "filemapd watch --regions none never started, or never became quiet"
                        );
                        let (mb_s, share) = rewrite_timed();
                        kernel.push(mb_s);
                        kernel_share.push(share);
                        drop(watch);
                        delete_all_regions(&dmfs.name);
                    }
                    2 => {
                        let p = path.to_string_lossy().into_owned();
                        let watch = Running::filemapd(&[
                            "watch",
                            "--regions",
                            "none",
                            "--io-hook",
                            "bio",
                            "-v",
                            &p,
                        ]);
                        assert!(
                            watch
                                .wait_until_settled("watching 1 file(s)", Duration::from_secs(120)),
                            "filemapd watch --regions none (the bio hook) never started, or never became quiet"
                        );
                        let (mb_s, share) = rewrite_timed();
                        bio_hook.push(mb_s);
                        bio_hook_share.push(share);
                        drop(watch);
                        delete_all_regions(&dmfs.name);
                    }
                    _ => without.push(rewrite()),
                }
            }
        }
        let baseline = median(without.clone());
        let slowdown = |ways: &[f64]| (baseline - median(ways.to_vec())) / baseline * 100.0;
        report!(
            "| {} | {} | {} | {} | {:+.1} % | {} | {:+.1} % | {} | {:+.1} % |",
            fs_kind.name(),
            median_and_spread(regions.clone(), 0),
            median_and_spread(without.clone(), 1),
            median_and_spread(with.clone(), 1),
            slowdown(&with),
            median_and_spread(kernel.clone(), 1),
            slowdown(&kernel),
            median_and_spread(bio_hook.clone(), 1),
            slowdown(&bio_hook),
        );
        verdicts.push(crate::slowdown_verdict(
            &format!("{}, `--regions none`", fs_kind.name()),
            &without,
            &kernel,
            5.0,
        ));
        verdicts.push(format!(
            "- {}: the kernel's witness: its eBPF programs ran {} % of the rewrite's time with `--regions none` (the probe on dm-stats' accounting), {} % through the bio hook",
            fs_kind.name(),
            median_and_spread(kernel_share, 2),
            median_and_spread(bio_hook_share, 2),
        ));
        let regions_here = median(regions.clone());
        prices.push((
            fs_kind.name(),
            walk_price(median(without.clone()), median(with.clone()), regions_here),
            regions_here,
        ));
    }
    report!("");
    for verdict in verdicts {
        report!("{verdict}");
    }
    growth_against_the_walk(&prices);
    report!("");
}

/// What one region adds to each 64 KiB write's time, in seconds: the rewrite's time per write
/// with the group less without it, over the group's regions (dm-stats walks them all).
fn walk_price(without_mb_s: f64, with_mb_s: f64, regions: f64) -> f64 {
    let write_mb = WRITE_CHUNK as f64 / 1e6;
    (write_mb / with_mb_s - write_mb / without_mb_s) / regions
}

/// Issue 25's target for random-write growth with tiled regions: a slowdown no greater than
/// the walk of the regions that exist explains. The counted-IO section's growth (same writes,
/// allocating) set beside this section's price of a region, for the regions at its end (had
/// they all been there from the start: the most the walk can explain) and for half of them
/// (they come as the file grows).
fn growth_against_the_walk(prices: &[(&str, f64, f64)]) {
    let rows = crate::counted::TILED_GROWTH.lock().unwrap();
    if rows.is_empty() {
        report!(
            "\n(The counted-IO section did not run: no growth to set beside the walk's price.)"
        );
        return;
    }
    report!(
        "\nIssue 25: random 64 KiB O_DIRECT growth with tiled regions (the counted-IO section)\nagainst what the walk of its regions explains, priced here (a rewrite's time per write\nwith the group less without, over its regions):"
    );
    for row in rows.iter() {
        let Some(&(_, price, priced_regions)) = prices.iter().find(|(fs, ..)| *fs == row.fs) else {
            continue;
        };
        let crate::Slowdowns {
            at_median: measured,
            low,
            high,
            ..
        } = crate::slowdowns(&row.baseline, &row.tiled);
        let per_write = WRITE_CHUNK as f64 / 1e6 / median(row.baseline.clone());
        let explained = |regions: f64| {
            let walk = price * regions;
            walk / (per_write + walk) * 100.0
        };
        let (all, half) = (explained(row.regions), explained(row.regions / 2.0));
        let verdict = if measured <= all {
            "met: no more than the walk explains"
        } else {
            "missed: more than the walk explains"
        };
        report!(
            "- {}: {measured:+.1} % (median; rounds {low:+.1} to {high:+.1} %); the walk of its {:.0} regions at the end explains up to {all:+.1} % (every one there from the start), {half:+.1} % for half of them; a region costs a write {:.2} µs here ({:.0} regions priced): {verdict}",
            row.fs,
            row.regions,
            price * 1e6,
            priced_regions,
        );
    }
}

/// Every region of the device (`dmstats delete --allregions --allprograms`: filemapd's own
/// region too).
fn delete_all_regions(device: &str) {
    filemapd_tests::run(
        "dmstats",
        &["delete", "--allregions", "--allprograms", device],
    )
    .unwrap();
}
