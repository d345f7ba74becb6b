//! The bio hook per bio, natively, on real IO: the hook needs no device-mapper (the block
//! layer traces zram's bios as it traces dm's), so this machine's own kernel runs it, without
//! the emulated VM's distortion. Its two programs' run time per bio prices what the watched
//! file's bios pay, what another file's on the same device pay, and what every bio of a
//! device with no counted file pays (the look at its device that the whole host pays for the
//! hook), with one file watched and with 100,000 more extents in the sector map.
use std::{fs, path::Path, sync::Arc, time::Instant};

use filemapd::{
    file::{identity::FileId, identity::kernel_dev, placement},
    sectors::SectorRange,
    wake::ebpf::{Counting, IoHook, MANY_FILES_TABLES, Tracer, counting::Reading},
};
use filemapd_tests::{
    FsKind, LoopFs, ScratchDir, ZramFs, filefrag_sectors,
    writers::{Rng, random_direct_writes},
};

use crate::{median, median_and_spread, program_time::ProgramClock, report};

/// Each measured file, its blocks written first: the measured writes allocate nothing.
const SIZE: u64 = 128 << 20;
/// The kernel's names for the hook's programs (cut to 15 bytes).
const QUEUE: &str = "block_bio_queue";
const COMPLETE: &str = "block_bio_compl";
/// Extents put in the sector map beside the watched file's, for the crowded rows.
const CROWD: usize = 100_000;

/// Whose bios a measurement writes.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Watched,
    SameDevice,
    OtherDevice,
}

impl Target {
    const ALL: [Target; 3] = [Target::Watched, Target::SameDevice, Target::OtherDevice];
    fn name(self) -> &'static str {
        match self {
            Target::Watched => "the watched file",
            Target::SameDevice => "another file, same device",
            Target::OtherDevice => "a file on an uncounted device",
        }
    }
}

/// What is loaded while the writes run.
#[derive(Clone, Copy, PartialEq)]
enum Hook {
    None,
    /// The watched file alone in the sector map.
    OneFile,
    /// And [`CROWD`] extents of other files on its device.
    Crowded,
}

#[derive(Default)]
struct Cell {
    ns_per_bio: Vec<f64>,
    /// The hook's run time as a share of the writer's, %.
    share: Vec<f64>,
    mb_per_s: Vec<f64>,
    bios: Vec<f64>,
}

pub fn run(rounds: usize) {
    report!("## The bio hook per bio, natively, on real IO\n");
    report!(
        "*On the machine's own kernel, not in the VM.* The bio hook (`--io-hook bio`) needs\nno device-mapper: the block layer traces a zram device's bios as it traces dm's. A tracer\ncounts a {} MiB file of ext4 on zram (its blocks written first); a writer rewrites, in\nrandom 64 KiB O_DIRECT writes, that file, another file of the same size on the same device,\nor one on a loop device (an uncounted device: every bio of the host pays the hook's look at\nits device). \"crowded\": {CROWD} more extents of other files in the sector map, scattered\nover 1 TiB of the zram device's sector space (the worst case, as in the table above). Cells:\nthe hook's two programs' run time per bio queued (BPF_ENABLE_STATS; the tracepoints' own\nentry not included); the bios the block layer queued meanwhile (the loop device's writes to\nits backing file too); the writer's MB/s, median (lowest–highest) of {rounds} rounds, and its\nmedian's change against no hook. Each round runs without the hook, with it, and crowded, in\nturn, the order rotating. Run-time statistics are on in every row, the hook's absent too. zram stores a page of\none repeated byte without compressing it: its bios are short (~5 µs, shorter than a fast\nNVMe's), so the hook's share of them here is more than of a real disk's.\n",
        SIZE >> 20
    );
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "bench-bio-hook").unwrap();
    let zramfs = ZramFs::new(&scratch.0, FsKind::Ext4).unwrap();
    let loopfs = LoopFs::new(&scratch.0, FsKind::Ext4).unwrap();
    let path_of = |target: Target| match target {
        Target::Watched => zramfs.mount.dir.join("watched"),
        Target::SameDevice => zramfs.mount.dir.join("beside"),
        Target::OtherDevice => loopfs.mount.dir.join("elsewhere"),
    };
    for target in Target::ALL {
        let path = path_of(target);
        fs::write(&path, vec![0x5a; SIZE as usize]).unwrap();
        fs::File::open(&path).unwrap().sync_all().unwrap();
    }
    let watched = fs::File::open(path_of(Target::Watched)).unwrap();
    let dev = kernel_dev(std::os::unix::fs::MetadataExt::dev(
        &watched.metadata().unwrap(),
    ));
    let extents: Vec<SectorRange> = filefrag_sectors(&path_of(Target::Watched))
        .unwrap()
        .into_iter()
        .map(|(start, len)| SectorRange::new(start, len))
        .collect();
    let extents = filemapd::sectors::join_adjacent(extents);

    let clock = ProgramClock::start();
    let runtime = crate::runtime_for_tracers();
    let _inside = runtime.enter();
    let hooks = [Hook::None, Hook::OneFile, Hook::Crowded];
    let mut cells: Vec<Vec<Cell>> = hooks
        .iter()
        .map(|_| Target::ALL.iter().map(|_| Cell::default()).collect())
        .collect();
    let mut no_room = 0;
    for round in 0..rounds {
        // The order rotates, so that no row always follows the same one.
        for h in (0..hooks.len()).map(|k| (round + k) % hooks.len()) {
            let hook = hooks[h];
            let tracer = (hook != Hook::None).then(|| {
                let mut tracer = Tracer::load_counting_any_device(128, MANY_FILES_TABLES)
                    .expect("the eBPF programs load on this kernel");
                let counting = Arc::clone(tracer.counting().expect("the bio hook counts here"));
                assert_eq!(counting.hook(), IoHook::Bio);
                let slot = counting
                    .open(dev, Default::default(), Default::default())
                    .unwrap()
                    .expect("a slot");
                let id = FileId::of(&watched.metadata().unwrap());
                let mut placement = placement::of(&watched, id).unwrap();
                placement.dm_dev = dev;
                placement.slot = slot.slot;
                tracer.watch(id.inode_key(), placement).unwrap();
                let changes = slot.sync(&extents, &extents, Reading::now());
                assert_eq!(changes.no_room, 0, "the watched file has room");
                if hook == Hook::Crowded {
                    no_room = crowd(&counting, dev, round);
                }
                (tracer, counting, slot)
            });
            for (t, &target) in Target::ALL.iter().enumerate() {
                let before = clock.read();
                let started = Instant::now();
                let written = random_direct_writes(&path_of(target), 0, SIZE, 0xb10 + round as u64);
                let elapsed = started.elapsed();
                let programs = clock.read() - before;
                let cell = &mut cells[h][t];
                cell.mb_per_s
                    .push(written as f64 / elapsed.as_secs_f64() / 1e6);
                if hook != Hook::None {
                    let of = |name| programs.by_name.get(name).copied().unwrap_or_default();
                    let (queue, complete) = (of(QUEUE), of(COMPLETE));
                    let bios = queue.1.max(1) as f64;
                    let hook_time = (queue.0 + complete.0).as_secs_f64();
                    cell.ns_per_bio.push(hook_time * 1e9 / bios);
                    cell.share.push(hook_time / elapsed.as_secs_f64() * 100.0);
                    cell.bios.push(bios);
                }
            }
            // Dropping the tracer unloads the hook and its maps before the next row.
            drop(tracer);
        }
    }
    report!(
        "| sector map | IO to | ns per bio | bios queued | hook's time, % of the writer's | MB/s | MB/s against no hook |"
    );
    report!("| --- | --- | --- | --- | --- | --- | --- |");
    for (h, &hook) in hooks.iter().enumerate() {
        for (t, &target) in Target::ALL.iter().enumerate() {
            let cell = &cells[h][t];
            let baseline = median(cells[0][t].mb_per_s.clone());
            let mb = median(cell.mb_per_s.clone());
            let map = match hook {
                Hook::None => "no hook",
                Hook::OneFile => "the watched file",
                Hook::Crowded => "crowded",
            };
            let [ns, bios, share, versus] = match hook {
                Hook::None => ["–".to_string(), "–".into(), "–".into(), "–".into()],
                _ => [
                    median_and_spread(cell.ns_per_bio.clone(), 0),
                    format!("{:.0}", median(cell.bios.clone())),
                    median_and_spread(cell.share.clone(), 2),
                    format!("{:+.1} %", (mb - baseline) / baseline * 100.0),
                ],
            };
            report!(
                "| {map} | {} | {ns} | {bios} | {share} | {} | {versus} |",
                target.name(),
                median_and_spread(cell.mb_per_s.clone(), 0)
            );
        }
    }
    report!(
        "\nWhere the writer lost more than the hook's share of its time (the loop device's rows), the\nloss is not the programs' run time: it is not explained yet.\n"
    );
    report!(
        "Crowded: {CROWD} extents asked for, {no_room} runs without room in the last round (their IO would go uncounted, and is said).\n"
    );
}

/// Fills the sector map with [`CROWD`] scattered extents of 100 pretend files on `dev`, past
/// the device's real end (no real bio is theirs). The runs the map had no room for.
fn crowd(counting: &Arc<Counting>, dev: u32, round: usize) -> usize {
    const FILES: usize = 100;
    const DEVICE_SECTORS: u64 = 1 << 31; // 1 TiB
    const PAST_THE_DEVICE: u64 = 1 << 22; // 2 GiB: the zram device is 512 MiB
    let mut rng = Rng(0xc0ffee ^ round as u64);
    let mut no_room = 0;
    for _ in 0..FILES {
        let file = counting
            .open(dev, Default::default(), Default::default())
            .unwrap()
            .expect("a slot");
        let mut ranges: Vec<SectorRange> = (0..CROWD / FILES)
            .map(|_| {
                let (start, len) = rng.scattered_extent(PAST_THE_DEVICE, DEVICE_SECTORS);
                SectorRange::new(start, len)
            })
            .collect();
        ranges = filemapd::sectors::union(ranges);
        no_room += file.sync(&ranges, &ranges, Reading::now()).no_room;
    }
    no_room
}
