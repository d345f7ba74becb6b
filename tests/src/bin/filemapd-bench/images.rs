//! Many images on one device: each region of every image costs every bio of the device a
//! look, so a host's images slow each other down by merely having groups. `IMAGES` files of
//! `FRAGMENTS` separate 4 KiB extents each (one O_DIRECT write every other block); then one
//! writer rewrites the first image in place while every image has its group (as many as
//! dm-stats' memory holds), while `filemapd watch --regions none` counts them all in the
//! kernel (through each IO hook), and with no monitor.
use std::{
    fs,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use filemapd_tests::{DmFs, FsKind, map_without_daemon};

use crate::{median, median_and_spread, monitors::Running, report};

const IMAGES: usize = 100;
const FRAGMENTS: u64 = 1000;
const BLOCK: u64 = 4096;
/// The kernel's ways to count, as `--io-hook` names them.
const HOOKS: [&str; 2] = ["dm-stats", "bio"];
/// How often the writer rewrites its image's blocks in one measurement.
const PASSES: usize = 8;
/// Rounds that map every image's group: mapping ~30,000 regions takes most of the
/// section's time, and the row's slowdown (~100 %) is far from any target.
const GROUPED_ROUNDS: usize = 2;

pub fn run(rounds: usize) {
    report!("## {IMAGES} images on one device\n");
    report!(
        "ext4 over dm (4 GiB), {IMAGES} files of {FRAGMENTS} separate 4 KiB extents each (an O_DIRECT\nwrite every other block). One writer rewrites the first image's blocks in place, {PASSES} times\n(4 KiB O_DIRECT writes, nothing allocated), while every image has its dmstats group (as\nmany as dm-stats' memory holds: it caps itself at a quarter of the VM's RAM, 64 KiB a\nregion), while `filemapd watch --regions none` counts every image in the kernel through\nthe probe on dm-stats' accounting and through the bio hook (`--io-hook`; from once it is\nquiet: past its start-up work), with one region over the whole device and no monitor, and\nwith no monitor; the order rotates. Cells: the writer's MB/s, median (lowest–highest) of {rounds}\nrounds ({} for every image's group); slowdowns against no monitor.\n",
        rounds.min(GROUPED_ROUNDS)
    );
    let dmfs = DmFs::with_size(FsKind::Ext4, 4096).unwrap();
    let dir = dmfs.mount.dir.join("images");
    fs::create_dir(&dir).unwrap();
    let paths: Vec<PathBuf> = (0..IMAGES)
        .map(|i| {
            let path = dir.join(format!("vm{i:03}.img"));
            fragment(&path);
            path
        })
        .collect();
    let extents = filemapd_tests::filefrag_sectors(&paths[0]).unwrap().len();
    let (mut bare, mut grouped) = (Vec::new(), Vec::new());
    // By hook: dm-stats' probe, then the bio hook.
    let mut counted = [Vec::new(), Vec::new()];
    let mut counted_regions = [Vec::new(), Vec::new()];
    // One region over the whole device and no monitor: what dm-stats' accounting alone does
    // to these writes, apart from the kernel's counting (the `--regions none` row's device
    // holds one region too).
    let mut one_region = Vec::new();
    let mut regions = Vec::new();
    let mut mapped_images = Vec::new();
    for round in 0..rounds {
        for way in 0..5 {
            match (round + way) % 5 {
                0 if round >= GROUPED_ROUNDS => {}
                0 => {
                    let (images, held) = map_as_many_as_fit(&paths);
                    mapped_images.push(images as f64);
                    regions.push(held as f64);
                    grouped.push(rewrite(&paths[0]));
                    delete_all_regions(&dmfs.name);
                }
                hook @ (1 | 2) => {
                    let d = dir.to_string_lossy().into_owned();
                    let io_hook = HOOKS[hook - 1];
                    let watch = Running::filemapd(&[
                        "watch",
                        "--regions",
                        "none",
                        "--io-hook",
                        io_hook,
                        "-v",
                        &d,
                    ]);
                    assert!(
                        watch.wait_until_settled(
                            &format!("watching {IMAGES} file(s)"),
                            Duration::from_secs(600)
                        ),
                        "filemapd watch --regions none never started, or never became quiet"
                    );
                    counted[hook - 1].push(rewrite(&paths[0]));
                    counted_regions[hook - 1].push(regions_on(&paths[0]) as f64);
                    drop(watch);
                    delete_all_regions(&dmfs.name);
                }
                3 => {
                    filemapd_tests::run("dmstats", &["create", &dmfs.name]).unwrap();
                    one_region.push(rewrite(&paths[0]));
                    delete_all_regions(&dmfs.name);
                }
                _ => bare.push(rewrite(&paths[0])),
            }
        }
    }
    let baseline = median(bare.clone());
    let slowdown = |ways: &[f64]| (baseline - median(ways.to_vec())) / baseline * 100.0;
    report!("The first image has {extents} extents (filefrag).\n");
    report!("| monitor | regions on the device | MB/s | slowdown |");
    report!("| --- | --- | --- | --- |");
    report!(
        "| no monitor | 0 | {} | – |",
        median_and_spread(bare.clone(), 2)
    );
    report!(
        "| every image's group ({} of {IMAGES} images mapped) | {} | {} | {:+.1} % |",
        median_and_spread(mapped_images, 0),
        median_and_spread(regions, 0),
        median_and_spread(grouped.clone(), 2),
        slowdown(&grouped)
    );
    report!(
        "| no monitor, one region over the whole device (`dmstats create`) | 1 | {} | {:+.1} % |",
        median_and_spread(one_region.clone(), 2),
        slowdown(&one_region)
    );
    for ((hook, counted), held) in HOOKS.iter().zip(&counted).zip(counted_regions) {
        report!(
            "| `filemapd watch --regions none --io-hook {hook}` (the kernel counts all {IMAGES}) | {} | {} | {:+.1} % |",
            median_and_spread(held, 0),
            median_and_spread(counted.clone(), 2),
            slowdown(counted)
        );
    }
    report!("");
    for (hook, counted) in HOOKS.iter().zip(&counted) {
        report!(
            "{}",
            crate::slowdown_verdict(
                &format!("kernel counters (--io-hook {hook})"),
                &bare,
                counted,
                5.0
            )
        );
    }
    report!("");
}

/// A file of `FRAGMENTS` separate 4 KiB extents: an O_DIRECT write every other block.
fn fragment(path: &Path) {
    let file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let block = aligned_block();
    for k in 0..FRAGMENTS {
        file.write_all_at(block.as_slice(), 2 * k * BLOCK).unwrap();
    }
    file.sync_all().unwrap();
}

/// One rewrite measurement of the image's blocks, in MB/s.
fn rewrite(path: &Path) -> f64 {
    let file = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let block = aligned_block();
    let started = Instant::now();
    for _ in 0..PASSES {
        for k in 0..FRAGMENTS {
            file.write_all_at(block.as_slice(), 2 * k * BLOCK).unwrap();
        }
    }
    (PASSES as u64 * FRAGMENTS * BLOCK) as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Maps images in turn until dm-stats refuses a region (its memory cap); the images mapped
/// whole and the regions the device holds.
fn map_as_many_as_fit(paths: &[PathBuf]) -> (usize, usize) {
    let mut mapped = 0;
    for path in paths {
        if map_without_daemon(path).is_err() {
            break;
        }
        mapped += 1;
    }
    (mapped, regions_on(&paths[0]))
}

/// The regions on the device under `path`.
fn regions_on(path: &Path) -> usize {
    let device = filemapd::stats::StatsDevice::for_st_dev(std::os::unix::fs::MetadataExt::dev(
        &fs::metadata(path).unwrap(),
    ))
    .unwrap();
    device.list(None).unwrap().len()
}

fn delete_all_regions(device: &str) {
    filemapd_tests::run(
        "dmstats",
        &["delete", "--allregions", "--allprograms", device],
    )
    .unwrap();
}

/// One 4 KiB block, aligned for O_DIRECT.
fn aligned_block() -> AlignedBlock {
    AlignedBlock::new()
}

struct AlignedBlock(Box<Aligned>);

#[repr(C, align(4096))]
struct Aligned([u8; BLOCK as usize]);

impl AlignedBlock {
    fn new() -> Self {
        Self(Box::new(Aligned([0x5a; BLOCK as usize])))
    }

    fn as_slice(&self) -> &[u8] {
        &self.0.0
    }
}
