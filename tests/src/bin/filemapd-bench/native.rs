//! The allocation programs at native speed: run on the machine's own kernel (no device-mapper,
//! so no IO probe and no regions), where the emulated VM's distortion of kernel against IO time
//! is absent. A tracer watches a growing file, with the in-kernel accounting's recording on
//! (a placement on a device) and off, side by side; the programs' run time prices it.
use std::{fs, path::Path, time::Instant};

use filemapd::sectors::SectorRange;
use filemapd::{
    file::{identity::FileId, placement},
    wake::ebpf::{ONE_FILE_TABLES, Tracer},
};
use filemapd_tests::{FsKind, LoopFs, ScratchDir, filefrag_sectors, writers::random_direct_writes};

use crate::{
    median, median_and_spread,
    program_time::{ProgramClock, ProgramTime},
    quantile, report,
};

const GROWTH: u64 = 256 << 20;
const HEAD: u64 = 1 << 20;
/// Any dm device number: on this kernel only the recording (the allocation side) runs.
pub(crate) const SOME_DM_DEVICE: u32 = 253 << 20;
/// The kernel's name for the charge service (program names are cut to 15 bytes).
const CHARGE_SERVICE: &str = "charge_service";

struct Run {
    /// The programs' run time as a share of the writer's time, %.
    share: f64,
    programs: ProgramTime,
    /// With the recording: ns per walk of the IO probe's, over pretend 64 KiB writes.
    walk_ns: Option<f64>,
}

pub fn run(rounds: usize) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    report!("## The allocation programs at native speed\n");
    report!(
        "*On the machine's own kernel ({release}), not in the VM: a loop device, no device-mapper.*"
    );
    report!(
        "A tracer watches a 1 MiB file that grows by 256 MiB of random 64 KiB O_DIRECT writes\n(as in the counted-IO section), with the in-kernel accounting's recording of fresh\nallocations and without; no IO probe and no regions (no device-mapper here), so no\npiece leaves the uncovered set during a run (in the daemon, regions take them). Cells:\nthe programs' run time as a share of the writer's time, median (lowest–highest) of {rounds}\nrounds, each with and without in turn on one fresh file system per file system kind.\n"
    );
    report!("| fs | recording | eBPF time % | per program, median round |");
    report!("| --- | --- | --- | --- |");
    let clock = ProgramClock::start();
    let runtime = crate::runtime_for_tracers();
    let _inside = runtime.enter();
    let mut costs = Vec::new();
    let mut walks = Vec::new();
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        let scratch = ScratchDir::new(Path::new("/var/tmp"), "bench-native").unwrap();
        let loopfs = LoopFs::new(&scratch.0, fs_kind).unwrap();
        let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            for recording in [round % 2 == 1, round % 2 == 0] {
                let path = loopfs.mount.dir.join(format!("grown-{round}-{recording}"));
                // A fresh tracer each time: nothing removes pieces here (no regions take
                // them), so the uncovered set grows through a run and only through that run.
                let mut tracer = Tracer::load(16, ONE_FILE_TABLES)
                    .expect("the eBPF programs load on this kernel");
                let run = runtime.block_on(grow(&mut tracer, &clock, &path, recording, round));
                runs[usize::from(recording)].push(run);
                fs::remove_file(&path).unwrap();
            }
        }
        let share = |runs: &[Run]| median(runs.iter().map(|r| r.share).collect());
        walks.push(format!(
            "{} {:.0} ns",
            fs_kind.name(),
            median(runs[1].iter().filter_map(|r| r.walk_ns).collect())
        ));
        costs.push(format!(
            "{} {:.2} points",
            fs_kind.name(),
            share(&runs[1]) - share(&runs[0])
        ));
        for (recording, runs) in [(false, &runs[0]), (true, &runs[1])] {
            let mut sorted: Vec<&Run> = runs.iter().collect();
            sorted.sort_by(|a, b| a.share.total_cmp(&b.share));
            let middle = quantile(&sorted, 0.5);
            report!(
                "| {} | {} | {} | {} |",
                fs_kind.name(),
                if recording { "on" } else { "off" },
                median_and_spread(runs.iter().map(|r| r.share).collect(), 2),
                middle.programs.breakdown()
            );
        }
    }
    report!(
        "\nThe recording's cost (on less off, medians, in points of the writer's time): {}.\n",
        costs.join("; ")
    );
    report!(
        "The IO probe's walk through the uncovered set, per IO, run natively after each run with\nthe recording (the charge service charging pretend 64 KiB writes over the grown file's\nsectors: what the probe does per bio, less the kprobe's entry and its read of the dm\ndevice's number), median: {}.\n",
        walks.join("; ")
    );
}

/// Grows a fresh file while the tracer watches it, reading its events as they come.
async fn grow(
    tracer: &mut Tracer,
    clock: &ProgramClock,
    path: &Path,
    recording: bool,
    round: usize,
) -> Run {
    fs::write(path, vec![0x5a; HEAD as usize]).unwrap();
    let file = fs::File::open(path).unwrap();
    let id = FileId::of(&file.metadata().unwrap());
    let mut placement = placement::of(&file, id).unwrap();
    placement.dm_dev = if recording { SOME_DM_DEVICE } else { 0 };
    let counting = recording.then(|| tracer.counting_unattached(ONE_FILE_TABLES).unwrap());
    let counted = counting.as_ref().map(|c| {
        c.open(SOME_DM_DEVICE, Default::default(), Default::default())
            .unwrap()
            .expect("a free slot")
    });
    if let Some(counted) = &counted {
        placement.slot = counted.slot;
    }
    tracer.watch(id.inode_key(), placement).unwrap();
    let before = clock.read();
    let started = Instant::now();
    let seed = 0x9e37 + round as u64;
    let mut writer = tokio::task::spawn_blocking({
        let path = path.to_path_buf();
        move || random_direct_writes(&path, HEAD, GROWTH, seed)
    });
    loop {
        tokio::select! {
            written = &mut writer => {
                written.unwrap();
                break;
            }
            events = tracer.next_events() => {
                events.unwrap();
            }
        }
    }
    let elapsed = started.elapsed();
    let programs = clock.read() - before;
    tracer.unwatch(id.inode_key()).unwrap();
    let walk_ns = counting.map(|counting| {
        let ios: Vec<SectorRange> = filefrag_sectors(path)
            .unwrap()
            .into_iter()
            .flat_map(|(start, len)| (start..start + len).step_by(128))
            .map(|start| SectorRange::new(start, 128))
            .collect();
        let before = clock.read();
        for &io in &ios {
            counting
                .charge_pretend_io(SOME_DM_DEVICE, io, true, std::time::Duration::ZERO)
                .unwrap();
        }
        let walked = clock.read() - before;
        let (time, runs) = walked
            .by_name
            .get(CHARGE_SERVICE)
            .copied()
            .unwrap_or_default();
        time.as_secs_f64() * 1e9 / runs.max(1) as f64
    });
    Run {
        share: programs.all.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        programs,
        walk_ns,
    }
}

/// The IO probe's cost per bio, natively, as the number of watched extents grows: the sector
/// map of a pretend device filled with files of scattered extents (4 to 64 KiB, at random
/// places of 1 TiB: the worst case for the map, one chunk entry an extent), then pretend bios
/// counted as the probe counts real ones (the charge service: the probe's lookups and
/// counting, less the kprobe's entry and its read of the dm device's number), each bio's
/// start and end. The maps are filled first; each round then runs every size in turn.
pub fn probe_cost() {
    use filemapd::wake::ebpf::{
        Counting, DEFAULT_MAP_EXTENTS, MANY_FILES_TABLES, counting::Reading, standalone_counting,
        tables_for_extents,
    };
    use filemapd_tests::writers::Rng;
    use std::sync::Arc;
    const DEV: u32 = (253 << 20) | 1;
    const DEVICE_SECTORS: u64 = 1 << 31; // 1 TiB
    const BIOS: usize = 20_000;
    const ROUNDS: usize = 9;
    report!("## The IO probe per bio, natively, as watched extents grow\n");
    report!(
        "*On the machine's own kernel, not in the VM.* The kernel's sector map of a pretend 1 TiB\ndevice holds files of scattered extents (4 to 64 KiB each, at random places: the worst\ncase, one chunk entry an extent); then {BIOS} pretend 64 KiB bios, half over the files'\nextents, half anywhere, are counted as the IO probe counts real ones: the charge service\nruns the probe's walk and counting for a bio's start and its end, without the kprobe's own\nentry and its read of the dm device's number. The first row's bios have no sectors: its\nwalk looks nothing up, and it prices what every row pays besides (the run-time statistics'\nclock reads around each run, the test run, the program's entry). Each of {ROUNDS} rounds\nruns every size in turn.\nCells: ns per bio (start and end), median (lowest–highest); the extents the tables are\nsized for (`--kernel-map-extents`; the tables of `watch` are allocated whole at start: {:.1} MB\nfor its default, {DEFAULT_MAP_EXTENTS}); the tables' entries in use; the map's memory per extent in use;\nruns the map had no room for (their IO goes uncounted, and is said).\n",
        MANY_FILES_TABLES.bytes() as f64 / 1e6
    );
    report!(
        "| watched extents | files | ns per bio | tables sized for | chunk entries | block entries | bytes per extent in use | runs without room |"
    );
    report!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    struct Setup {
        /// Bios of no sectors: the walk looks nothing up. What the instrument (the run-time
        /// statistics' two clock reads), the test run and the program's entry cost: the floor
        /// under every other row.
        empty: bool,
        files: usize,
        extents: usize,
        sized_for: u32,
        counting: Arc<Counting>,
        ios: Vec<SectorRange>,
        left_out: usize,
        ns: Vec<f64>,
    }
    // The last: as many extents in tables sized for them.
    let mut setups: Vec<Setup> = [
        (true, 1, 0, DEFAULT_MAP_EXTENTS),
        (false, 1, 0, DEFAULT_MAP_EXTENTS),
        (false, 10, 100, DEFAULT_MAP_EXTENTS),
        (false, 100, 100, DEFAULT_MAP_EXTENTS),
        (false, 100, 1_000, DEFAULT_MAP_EXTENTS),
        (false, 100, 1_000, 100_000),
    ]
    .into_iter()
    .map(|(empty, files, per_file, sized_for)| {
        let counting =
            Arc::new(standalone_counting(files as u32 + 1, tables_for_extents(sized_for)).unwrap());
        let mut rng = Rng(0x5eed ^ files as u64 ^ (per_file as u64) << 20);
        let mut all: Vec<SectorRange> = Vec::new();
        let mut left_out = 0;
        for _ in 0..files {
            let file = counting
                .open(DEV, Default::default(), Default::default())
                .unwrap()
                .expect("a slot");
            let mut ranges: Vec<SectorRange> = (0..per_file)
                .map(|_| {
                    let (start, len) = rng.scattered_extent(0, DEVICE_SECTORS);
                    SectorRange::new(start, len)
                })
                .collect();
            ranges.sort_unstable();
            let ranges = filemapd::sectors::join_adjacent(disjoint(ranges));
            left_out += file.sync(&ranges, &ranges, Reading::now()).no_room;
            all.extend(ranges);
        }
        let ios = (0..BIOS)
            .map(|k| match (k % 2 == 0, all.is_empty()) {
                (true, false) => {
                    let e = all[rng.below(all.len() as u64) as usize];
                    SectorRange::new(e.start, 128)
                }
                _ => SectorRange::new(rng.below(DEVICE_SECTORS / 8) * 8, 128),
            })
            .map(|io: SectorRange| {
                if empty {
                    SectorRange::new(io.start, 0)
                } else {
                    io
                }
            })
            .collect();
        Setup {
            empty,
            files,
            extents: files * per_file,
            sized_for,
            counting,
            ios,
            left_out,
            ns: Vec::new(),
        }
    })
    .collect();
    let clock = ProgramClock::start();
    for _ in 0..ROUNDS {
        for setup in &mut setups {
            let before = clock.read();
            for &io in &setup.ios {
                setup
                    .counting
                    .charge_pretend_io(DEV, io, false, std::time::Duration::ZERO)
                    .unwrap();
            }
            let (time, runs) = (clock.read() - before)
                .by_name
                .get(CHARGE_SERVICE)
                .copied()
                .unwrap_or_default();
            // Two runs a bio: its start and its end.
            setup
                .ns
                .push(time.as_secs_f64() * 1e9 / (runs.max(1) as f64 / 2.0));
        }
    }
    for setup in setups {
        let (chunks, blocks) = setup.counting.map().entries_in_use();
        let bytes = chunks * size_of::<filemapd_common::sector_map::Chunk>()
            + blocks * size_of::<filemapd_common::sector_map::Block>();
        report!(
            "| {} | {} | {} | {} | {chunks} | {blocks} | {} | {} |",
            if setup.empty {
                "an empty bio (the floor)".to_string()
            } else {
                setup.extents.to_string()
            },
            setup.files,
            median_and_spread(setup.ns, 0),
            setup.sized_for,
            if setup.extents == 0 {
                "–".to_string()
            } else {
                format!("{:.0}", bytes as f64 / setup.extents as f64)
            },
            setup.left_out
        );
    }
    report!("");
}

/// The ranges with those overlapping an earlier one left out.
fn disjoint(sorted: Vec<SectorRange>) -> Vec<SectorRange> {
    let mut kept: Vec<SectorRange> = Vec::new();
    for r in sorted {
        if kept.last().is_none_or(|last| last.end() <= r.start) {
            kept.push(r);
        }
    }
    kept
}
