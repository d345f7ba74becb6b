//! eBPF on this machine's own kernel (no device-mapper needed): the allocation programs report
//! a watched inode's new blocks and nothing of an unwatched inode's, on ext4 and on xfs; every
//! event reaches user space even when the kernel does not wake it for each; and the in-kernel
//! counting's sector map, over its real maps, holds a file's sectors exactly (fresh
//! allocations the moment they are made, however scattered; what a pass says the file holds;
//! whole blocks; reflinked sharers), and its IO probe's walk (run on pretend IO by the charge
//! service) counts each sector of the file once; the bio hook counts real IO exactly.
use std::{fs, os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use filemapd::{
    file::fiemap,
    file::identity::FileId,
    wake::ebpf::{Change, Tracepoint, Tracer},
};
use filemapd_common::ExtentEvent;
use filemapd_tests::{FsKind, LoopFs, ScratchDir, punch_hole, require_root, run, write_and_sync};

/// Generous: only reached when an expected event never comes, which fails the test.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn file_id(path: &Path) -> FileId {
    FileId::of(&fs::metadata(path).unwrap())
}

/// Reads events until one for `want` arrives; returns every event read on the way.
async fn events_until(tracer: &mut Tracer, want: FileId) -> Vec<ExtentEvent> {
    let mut seen = Vec::new();
    let key = want.inode_key();
    while !seen.iter().any(|e: &ExtentEvent| e.key == key) {
        match tokio::time::timeout(EVENT_TIMEOUT, tracer.next_events()).await {
            Ok(batch) => seen.extend(batch.unwrap()),
            Err(_) => panic!("no event for {want:?} within {EVENT_TIMEOUT:?}; got {seen:?}"),
        }
    }
    seen
}

async fn watched_inode_only(fs_kind: FsKind) {
    require_root();
    let scratch =
        ScratchDir::new(Path::new("/var/tmp"), &format!("ebpf-{}", fs_kind.name())).unwrap();
    let loopfs = LoopFs::new(&scratch.0, fs_kind).unwrap();
    let watched = loopfs.mount.dir.join("watched");
    let unwatched = loopfs.mount.dir.join("unwatched");
    fs::write(&watched, b"").unwrap();
    fs::write(&unwatched, b"").unwrap();

    let mut tracer = Tracer::load(16, filemapd::wake::ebpf::ONE_FILE_TABLES)
        .expect("eBPF programs load on the host kernel");
    let attached: Vec<&str> = tracer.attached().iter().map(|t| t.name).collect();
    assert!(
        attached.iter().any(|n| n.starts_with(fs_kind.name())),
        "attached only {attached:?}"
    );
    tracer
        .watch(file_id(&watched).inode_key(), Default::default())
        .unwrap();

    // The unwatched file allocates first; the ring buffer is FIFO, so by the time the watched
    // file's event arrives, any event of the unwatched file would have been read before it.
    write_and_sync(&unwatched, 0, 4 << 20).unwrap();
    for i in 0..50 {
        write_and_sync(&loopfs.mount.dir.join(format!("flood-{i}")), 0, 64 << 10).unwrap();
    }
    write_and_sync(&watched, 0, 1 << 20).unwrap();
    let events = events_until(&mut tracer, file_id(&watched)).await;
    let stray: Vec<_> = events
        .iter()
        .filter(|e| e.key != file_id(&watched).inode_key())
        .collect();
    assert!(
        stray.is_empty(),
        "events for inodes that are not watched: {stray:?}"
    );

    // The events name the logical range that FIEMAP now shows as allocated.
    let block_size = fs::metadata(&watched).unwrap().blksize();
    let covered: Vec<(u64, u64)> = events
        .iter()
        .map(|e| {
            let tp = Tracepoint::by_index(e.source).expect("known tracepoint");
            // An event without a range names the whole file.
            let (start, len) = tp
                .byte_range(e.start, e.length, block_size)
                .unwrap_or((0, u64::MAX));
            (start, start.saturating_add(len))
        })
        .collect();
    let file = fs::File::open(&watched).unwrap();
    let extents = fiemap::read_extents(&file, 0, u64::MAX, false).unwrap();
    assert!(
        !extents.is_empty(),
        "the watched file has no extents after fsync"
    );
    for extent in extents.iter().filter(|e| e.is_placed()) {
        let (start, end) = (extent.logical, extent.logical + extent.length);
        assert!(
            covered.iter().any(|&(s, e)| s <= start && end <= e),
            "extent {start}..{end} was allocated without an event covering it; events: {covered:?}"
        );
    }
    assert_eq!(tracer.lost_events().unwrap(), 0);
}

/// Allocation after allocation, each awaited before the next, made while the reader waits:
/// at random delays around its gathering time, so that the reader switches between reading
/// unwoken and waiting to be woken again and again. An event left unread at a switch would
/// never come (the wait fails).
async fn no_event_is_left_unread(fs_kind: FsKind) {
    const ROUNDS: u64 = 300;
    const BLOCK: u64 = 4096;
    require_root();
    let scratch =
        ScratchDir::new(Path::new("/var/tmp"), &format!("unread-{}", fs_kind.name())).unwrap();
    let loopfs = LoopFs::new(&scratch.0, fs_kind).unwrap();
    let path = loopfs.mount.dir.join("growing");
    fs::write(&path, b"").unwrap();
    let mut tracer = Tracer::load(16, filemapd::wake::ebpf::ONE_FILE_TABLES)
        .expect("eBPF programs load on the host kernel");
    let key = file_id(&path).inode_key();
    tracer.watch(key, Default::default()).unwrap();
    // Every other block, so that each write allocates on its own.
    let offset_of = |round: u64| 2 * round * BLOCK;
    let (go, went) = std::sync::mpsc::channel::<u64>();
    let writer = std::thread::spawn(move || {
        let mut rng = filemapd_tests::writers::Rng(0x5eed);
        for round in went {
            std::thread::sleep(rng.duration_below(Duration::from_millis(3)));
            write_and_sync(&path, offset_of(round), BLOCK as usize).unwrap();
        }
    });
    let mut events = 0;
    for round in 0..ROUNDS {
        go.send(round).unwrap();
        let offset = offset_of(round);
        let heard = |e: &ExtentEvent| {
            let tp = Tracepoint::by_index(e.source).expect("known tracepoint");
            let (start, len) = tp
                .byte_range(e.start, e.length, BLOCK)
                .unwrap_or((0, u64::MAX));
            e.key == key && start <= offset && offset < start.saturating_add(len)
        };
        loop {
            let batch = match tokio::time::timeout(EVENT_TIMEOUT, tracer.next_events()).await {
                Ok(batch) => batch.unwrap(),
                Err(_) => panic!(
                    "round {round}: the allocation at {offset} was never heard of ({events} events before)"
                ),
            };
            events += batch.len();
            if batch.iter().any(heard) {
                break;
            }
        }
    }
    drop(go);
    writer.join().unwrap();
    assert_eq!(tracer.lost_events().unwrap(), 0);
}

#[tokio::test]
async fn ext4_leaves_no_event_unread() {
    no_event_is_left_unread(FsKind::Ext4).await;
}

#[tokio::test]
async fn xfs_leaves_no_event_unread() {
    no_event_is_left_unread(FsKind::Xfs).await;
}

#[tokio::test]
async fn ext4_reports_the_watched_inode_only() {
    watched_inode_only(FsKind::Ext4).await;
}

#[tokio::test]
async fn xfs_reports_the_watched_inode_only() {
    watched_inode_only(FsKind::Xfs).await;
}

/// Reads events until one of `change` arrives for `want`; fails on any other inode's event.
async fn expect_change(tracer: &mut Tracer, want: FileId, change: Change, action: &str) {
    let key = want.inode_key();
    loop {
        let batch = match tokio::time::timeout(EVENT_TIMEOUT, tracer.next_events()).await {
            Ok(batch) => batch.unwrap(),
            Err(_) => panic!("no {change:?} event within {EVENT_TIMEOUT:?} after {action}"),
        };
        assert!(
            batch.iter().all(|e| e.key == key),
            "events for other inodes after {action}: {batch:?}"
        );
        if batch
            .iter()
            .any(|e| Tracepoint::by_index(e.source).is_some_and(|t| t.change == change))
        {
            return;
        }
    }
}

async fn every_kind_of_change(fs_kind: FsKind) {
    require_root();
    let scratch = ScratchDir::new(
        Path::new("/var/tmp"),
        &format!("changes-{}", fs_kind.name()),
    )
    .unwrap();
    let loopfs = LoopFs::new(&scratch.0, fs_kind).unwrap();
    let path = loopfs.mount.dir.join("disk.img");
    fs::write(&path, b"").unwrap();
    let id = file_id(&path);
    let mut tracer = Tracer::load(16, filemapd::wake::ebpf::ONE_FILE_TABLES).unwrap();
    tracer.watch(id.inode_key(), Default::default()).unwrap();

    write_and_sync(&path, 0, 4 << 20).unwrap();
    expect_change(&mut tracer, id, Change::Allocated, "a write").await;
    let p = path.to_string_lossy();
    run(
        "fallocate",
        &["--offset", "8388608", "--length", "1048576", &p],
    )
    .unwrap();
    expect_change(&mut tracer, id, Change::Allocated, "fallocate").await;
    punch_hole(&path, 1 << 20, 1 << 20).unwrap();
    expect_change(&mut tracer, id, Change::Removed, "punching a hole").await;
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(512 << 10)
        .unwrap();
    expect_change(&mut tracer, id, Change::Removed, "a truncate").await;
    assert_eq!(tracer.lost_events().unwrap(), 0);
}

#[tokio::test]
async fn ext4_reports_growth_fallocate_punch_and_truncate() {
    every_kind_of_change(FsKind::Ext4).await;
}

#[tokio::test]
async fn xfs_reports_growth_fallocate_punch_and_truncate() {
    every_kind_of_change(FsKind::Xfs).await;
}

/// The sector map over real allocations, without device-mapper: the allocation programs record
/// a growing file's fresh sectors the moment they are allocated, exactly; a pretend IO over
/// them counts each sector once and the IO once; a pass's sync adds what the file held before
/// (its head) and takes out what it gave back, but keeps what was recorded after its reading.
async fn the_map_holds_a_growing_file(fs_kind: FsKind) {
    use filemapd::{sectors::SectorRange, wake::ebpf::counting::Reading};
    use filemapd_tests::writers::random_direct_writes;
    const HEAD: u64 = 1 << 20;
    const DEV: u32 = (253 << 20) | 7;
    let f = CountedFileOnHost::new(fs_kind, "growing", HEAD, DEV);
    let reading_before_the_writes = Reading::now();
    random_direct_writes(&f.path, HEAD, 4 << 20, 0x5eed);

    let all = join_adjacent(sectors_of(&f.path));
    let fresh = difference(&all, &f.head);
    assert!(!fresh.is_empty(), "the writes allocated nothing");
    assert_eq!(f.held(), fresh, "recorded vs allocated");
    let span = SectorRange::new(all[0].start, all.last().unwrap().end() - all[0].start);
    assert_eq!(
        f.count_write(span),
        (1, sum(&fresh)),
        "counted vs allocated"
    );

    // A pass that read the file after the writes: the map holds it all.
    let changes = f.counted.sync(&all, &all, Reading::now());
    assert_eq!(changes.no_room, 0);
    assert_eq!(f.held(), all, "after a pass");
    assert_eq!(f.count_write(span), (1, sum(&all)), "counted after a pass");

    // A pass whose reading predates the writes (their events still on their way): what the
    // kernel recorded since stays, though the reading lacks it.
    f.counted.sync(&all, &f.head, reading_before_the_writes);
    assert_eq!(f.held(), all, "after a pass that read before the writes");

    // The file gave its first fresh extent back: a pass that reads it a second later (when
    // the kernel's recordings are old enough to be judged) takes it out.
    let given_back = fresh[0];
    let kept = difference(&all, &[given_back]);
    let later = Reading {
        at_ns: filemapd::wake::ebpf::counting::monotonic_ns() + 1_000_000_000,
    };
    f.counted.sync(&[given_back], &kept, later);
    assert_eq!(f.held(), kept, "after giving back {given_back}");
    assert_eq!(f.count_write(span), (1, sum(&kept)));

    // Unwatched: nothing of it is left.
    f.counting.close(f.counted.slot);
    assert_eq!(f.held(), vec![], "after close");
}

#[tokio::test]
async fn ext4_the_map_holds_a_growing_file() {
    the_map_holds_a_growing_file(FsKind::Ext4).await;
}

#[tokio::test]
async fn xfs_the_map_holds_a_growing_file() {
    the_map_holds_a_growing_file(FsKind::Xfs).await;
}

/// Scattered 4 KiB allocations (a sparse image written at random by a guest): more separate
/// runs in one 256 KiB chunk than any fixed number of spans would hold. The map holds every
/// one, and a pretend IO counts each.
async fn the_map_holds_scattered_blocks(fs_kind: FsKind) {
    use filemapd_common::sector_map::CHUNK_LOG;
    use filemapd_tests::writers::spaced_block_writes;
    const HEAD: u64 = 1 << 20;
    const DEV: u32 = (253 << 20) | 9;
    let f = CountedFileOnHost::new(fs_kind, "scattered", HEAD, DEV);
    // Blocks 8 KiB apart in the file: each its own allocation, a hole between neighbours.
    spaced_block_writes(&f.path, HEAD, 40, 8192);

    let all = join_adjacent(sectors_of(&f.path));
    let fresh = difference(&all, &f.head);
    let busiest = fresh
        .iter()
        .map(|r| {
            let chunk = r.start >> CHUNK_LOG;
            fresh
                .iter()
                .filter(|o| o.start >> CHUNK_LOG == chunk)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        busiest > 8,
        "the writes should put more than 8 runs in one chunk, the busiest has {busiest}: {fresh:?}"
    );
    assert_eq!(f.held(), fresh, "recorded vs allocated");
    let span = filemapd::sectors::SectorRange::new(
        fresh[0].start,
        fresh.last().unwrap().end() - fresh[0].start,
    );
    assert_eq!(
        f.count_write(span),
        (1, sum(&fresh)),
        "counted vs allocated"
    );
    assert_eq!(f.counters().unrecorded, 0);
}

#[tokio::test]
async fn ext4_the_map_holds_scattered_blocks() {
    the_map_holds_scattered_blocks(FsKind::Ext4).await;
}

#[tokio::test]
async fn xfs_the_map_holds_scattered_blocks() {
    the_map_holds_scattered_blocks(FsKind::Xfs).await;
}

/// Whole 16 MiB blocks, shared sectors and the counters, over the maps alone: a file of 45 MiB
/// in one run is held as two whole blocks and records before them; a reflinked copy of part of
/// it counts the shared sectors too; a fifth sharer of a block whose four owner words are
/// taken is held in records; and a bio's start and end keep the in-flight count, its duration
/// falls in the file's histogram bucket.
#[test]
fn whole_blocks_sharers_and_counters() {
    use std::sync::Arc;

    use filemapd::{
        sectors::SectorRange,
        wake::ebpf::{ONE_FILE_TABLES, counting::Reading, standalone_counting},
    };
    use filemapd_common::{Bounds, sector_map::BLOCK_SECTORS};
    require_root();
    const DEV: u32 = (253 << 20) | 11;
    let counting = Arc::new(standalone_counting(16, ONE_FILE_TABLES).unwrap());
    let bounds = Bounds::from_ns(&[1_000_000, 10_000_000]).unwrap();
    let open = || {
        counting
            .open(DEV, bounds, Default::default())
            .unwrap()
            .unwrap()
    };
    let held = |slot: u32| -> Vec<(SectorRange, bool)> {
        counting
            .map()
            .held(slot)
            .iter()
            .map(|h| (h.range, h.whole_block))
            .collect()
    };
    // 45 MiB from 3 MiB into the first block: its end, then two whole blocks.
    let file = SectorRange::new(3 * 2048, 45 * 2048);
    let a = open();
    assert_eq!(a.sync(&[file], &[file], Reading::now()).no_room, 0);
    let whole: Vec<SectorRange> = held(a.slot)
        .into_iter()
        .filter(|&(_, whole)| whole)
        .map(|(r, _)| r)
        .collect();
    assert_eq!(
        whole,
        vec![
            SectorRange::new(BLOCK_SECTORS, BLOCK_SECTORS),
            SectorRange::new(2 * BLOCK_SECTORS, BLOCK_SECTORS)
        ]
    );
    assert_eq!(
        join_adjacent(held(a.slot).into_iter().map(|(r, _)| r).collect()),
        vec![file]
    );
    let count = |slot: u32, io: SectorRange, ms: u64| {
        let before = counting.counters(slot).unwrap();
        counting
            .charge_pretend_io(DEV, io, false, Duration::from_millis(ms))
            .unwrap();
        let after = counting.counters(slot).unwrap();
        (
            after.reads - before.reads,
            after.read_sectors - before.read_sectors,
        )
    };
    // A bio over the whole device's first 64 MiB: the file's sectors, once.
    let everything = SectorRange::new(0, 4 * BLOCK_SECTORS);
    assert_eq!(count(a.slot, everything, 5), (1, file.len));
    let counters = counting.counters(a.slot).unwrap();
    assert_eq!(counters.in_flight(), 0, "started and ended");
    assert_eq!(
        counters.histogram[..3],
        [0, 1, 0],
        "5 ms: between the bounds"
    );

    // Reflinked copies of its first whole block, five of them: the block's four owner words
    // go to `a` and three of them, the other two hold records in each of its chunks.
    let shared = SectorRange::new(BLOCK_SECTORS, BLOCK_SECTORS);
    let sharers: Vec<_> = (0..5).map(|_| open()).collect();
    for s in &sharers {
        assert_eq!(s.sync(&[shared], &[shared], Reading::now()).no_room, 0);
    }
    for s in &sharers {
        assert_eq!(
            join_adjacent(held(s.slot).into_iter().map(|(r, _)| r).collect()),
            vec![shared],
            "a sharer holds its sectors whatever the owner words left"
        );
        assert_eq!(count(s.slot, everything, 0), (1, shared.len));
    }
    assert_eq!(
        count(a.slot, everything, 0),
        (1, file.len),
        "a's count unchanged"
    );
    for s in sharers {
        counting.close(s.slot);
        assert_eq!(held(s.slot), vec![]);
    }
    assert_eq!(count(a.slot, everything, 0), (1, file.len));

    // A chunk has records for four files: a fifth sharer of one is told there is no room.
    let part = SectorRange::new(file.start, 64);
    let sharers: Vec<_> = (0..4).map(|_| open()).collect();
    for (n, s) in sharers.iter().enumerate() {
        let no_room = s.sync(&[part], &[part], Reading::now()).no_room;
        assert_eq!(
            no_room,
            usize::from(n == 3),
            "sharer {n} (a holds a record too)"
        );
    }
}

/// A pass judges only the sectors it has news about: one that read a stretch of the file
/// (FIEMAP of what its events named) adds what it saw and takes out what it saw given back,
/// and leaves alone an older allocation elsewhere in the same 16 MiB block whose event it has
/// not taken yet (taken out, its bios would go uncounted until the next pass). A later pass
/// that judges those sectors takes them out when the file no longer has them; sectors held by
/// a recording newer than the reading are left and handed back for a later pass to judge.
#[test]
fn a_pass_takes_out_only_what_it_judged() {
    use filemapd::{
        sectors::SectorRange,
        wake::ebpf::{
            ONE_FILE_TABLES,
            counting::{Reading, monotonic_ns},
            standalone_counting,
        },
    };
    require_root();
    const DEV: u32 = (253 << 20) | 12;
    let counting = std::sync::Arc::new(standalone_counting(16, ONE_FILE_TABLES).unwrap());
    let file = counting
        .open(DEV, Default::default(), Default::default())
        .unwrap()
        .unwrap();
    let held = || join_adjacent(file.held().iter().map(|h| h.range).collect());
    // Ten seconds ago: far older than any reading's margin.
    let long_ago = Reading {
        at_ns: monotonic_ns() - 10_000_000_000,
    };
    // 64 KiB pieces, two in one 256 KiB chunk and one in the next.
    let a = SectorRange::new(4096, 128);
    let b = SectorRange::new(4096 + 256, 128);
    let c = SectorRange::new(4096 + 512, 128);
    assert_eq!(file.sync(&[a, b], &[a, b], long_ago).no_room, 0);
    assert_eq!(held(), vec![a, b]);
    // A stretch read saw `c` appear; its view still lacks `b` (allocated, event not taken).
    file.sync(&[c], &[a, c], Reading::now());
    assert_eq!(held(), vec![a, b, c], "b kept: the pass had no news of it");
    // A pass with news of `b` (its event, or the file giving it back) judges it.
    let changes = file.sync(&[b], &[a, c], Reading::now());
    assert_eq!(held(), vec![a, c], "b judged and taken out");
    assert_eq!(changes.deferred, vec![]);
    // Sectors held by a recording newer than the reading are left, and said to be left, so
    // that a later pass judges them again.
    let later = |s: u64| Reading {
        at_ns: monotonic_ns() + s * 1_000_000_000,
    };
    // (A chunk of its own, so that the record carries that reading's stamp.)
    let d = SectorRange::new(4096 + 1024, 128);
    file.sync(&[d], &[a, c, d], later(10));
    let changes = file.sync(&[d], &[a, c], Reading::now());
    assert_eq!(held(), vec![a, c, d], "d recorded after the reading: kept");
    assert_eq!(changes.deferred, vec![d], "and left for a later pass");
    let changes = file.sync(&changes.deferred, &[a, c], later(20));
    assert_eq!(held(), vec![a, c], "d judged by a later reading");
    assert_eq!(changes.deferred, vec![]);

    // The file comes to hold its whole 16 MiB block, seen by a pass with news of the rest
    // alone: the block's owner word counts every sector, and no span of it is left beside
    // (a bio would count twice).
    let block = SectorRange::new(0, filemapd_common::sector_map::BLOCK_SECTORS);
    let rest = filemapd::sectors::difference(&[block], &[a, c]);
    file.sync(&rest, &[block], Reading::now());
    let whole: Vec<_> = file
        .held()
        .iter()
        .map(|h| (h.range, h.whole_block))
        .collect();
    assert_eq!(whole, vec![(block, true)], "one owner word, no spans");
    let before = counting.counters(file.slot).unwrap();
    counting
        .charge_pretend_io(DEV, block, true, Duration::from_millis(1))
        .unwrap();
    let after = counting.counters(file.slot).unwrap();
    assert_eq!(after.write_sectors - before.write_sectors, block.len);
    counting.close(file.slot);
}

/// The bio hook on this machine's own kernel, which needs no device-mapper (the block layer
/// traces every bio-based device's bios, zram's as dm's): a file on a zram device, its
/// placement naming that device, is charged exactly its own sectors of real O_DIRECT IO
/// (writes over its blocks in random order, then a read of all of it), and nothing of another
/// file's IO beside it; every bio that began has ended, each with a time and a bucket.
async fn the_bio_hook_counts_real_io(fs_kind: FsKind) {
    use filemapd::{
        file::identity::kernel_dev,
        wake::ebpf::{IoHook, ONE_FILE_TABLES, counting::Reading},
    };
    use filemapd_tests::writers::{direct_read_whole, random_direct_writes};
    const SIZE: u64 = 4 << 20;
    const CHUNK: u64 = 64 << 10;
    require_root();
    let scratch = ScratchDir::new(
        Path::new("/var/tmp"),
        &format!("bio-hook-{}", fs_kind.name()),
    )
    .unwrap();
    let zramfs = filemapd_tests::ZramFs::new(&scratch.0, fs_kind).unwrap();
    let (path, other) = (
        zramfs.mount.dir.join("image"),
        zramfs.mount.dir.join("other"),
    );
    // Their blocks first: the measured IO allocates nothing.
    for (file, byte) in [(&path, 0x5a), (&other, 0xa5)] {
        fs::write(file, vec![byte; SIZE as usize]).unwrap();
        fs::File::open(file).unwrap().sync_all().unwrap();
    }
    let mut tracer = Tracer::load_counting_any_device(16, ONE_FILE_TABLES)
        .expect("eBPF programs load on the host kernel");
    let counting = std::sync::Arc::clone(tracer.counting().expect("the bio hook counts here"));
    assert_eq!(counting.hook(), IoHook::Bio);
    let file = fs::File::open(&path).unwrap();
    let dev = kernel_dev(file.metadata().unwrap().dev());
    let (counted, id) = watch_counted(&mut tracer, &counting, &file, dev);
    let extents = join_adjacent(sectors_of(&path));
    counted.sync(&extents, &extents, Reading::now());
    let held = join_adjacent(counted.held().iter().map(|h| h.range).collect());
    assert_eq!(held, extents, "the map holds the file");

    let before = counted.counters().unwrap();
    let written = random_direct_writes(&path, 0, SIZE, 0xb10);
    random_direct_writes(&other, 0, SIZE, 0x07e);
    direct_read_whole(&other);
    let read = direct_read_whole(&path);
    let after = counted.counters().unwrap();
    let counted_io = after.since(&before);

    assert_eq!(counted_io.write_sectors, written / 512, "sectors written");
    assert_eq!(counted_io.read_sectors, read / 512, "sectors read");
    // A 64 KiB write is one bio unless it crosses from one extent to the next.
    let (chunks, pieces) = (written / CHUNK, extents.len() as u64);
    assert!(
        (chunks..=chunks + pieces).contains(&counted_io.writes),
        "{} writes counted for {chunks} writes of 64 KiB over {pieces} extent(s)",
        counted_io.writes
    );
    assert!(counted_io.reads >= SIZE / (1 << 20), "{counted_io:?}");
    assert_eq!(after.in_flight(), 0, "every bio that began has ended");
    assert_eq!(
        counted_io.histogram.iter().sum::<u64>(),
        counted_io.reads + counted_io.writes,
        "one bucket per bio"
    );
    assert!(
        counted_io.write_ns > 0 && counted_io.read_ns > 0,
        "{counted_io:?}"
    );
    counting.close(counted.slot);
    tracer.unwatch(id.inode_key()).unwrap();
}

#[tokio::test]
async fn ext4_the_bio_hook_counts_real_io() {
    the_bio_hook_counts_real_io(FsKind::Ext4).await;
}

#[tokio::test]
async fn xfs_the_bio_hook_counts_real_io() {
    the_bio_hook_counts_real_io(FsKind::Xfs).await;
}

/// The bio hook counts a bio at its completion, which the block layer does not trace for a
/// request-based device (loop here, multipath on a dm host): a file there gets no slot, and a
/// directory there is not watched for new files (whose bios would stay in flight), each with
/// the reason; on a bio-based device (zram) both are taken.
#[tokio::test]
async fn the_bio_hook_refuses_request_based_devices() {
    use filemapd::{file::identity::kernel_dev, file::placement, wake::ebpf::ONE_FILE_TABLES};
    require_root();
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "bio-hook-request-based").unwrap();
    let loopfs = LoopFs::new(&scratch.0, FsKind::Ext4).unwrap();
    let zramfs = filemapd_tests::ZramFs::new(&scratch.0, FsKind::Ext4).unwrap();
    let mut tracer = Tracer::load_counting_any_device(16, ONE_FILE_TABLES)
        .expect("eBPF programs load on the host kernel");
    let counting = std::sync::Arc::clone(tracer.counting().expect("the bio hook counts here"));
    for (dir, request_based) in [(&loopfs.mount.dir, true), (&zramfs.mount.dir, false)] {
        let directory = fs::File::open(dir).unwrap();
        let id = FileId::of(&directory.metadata().unwrap());
        let dev = kernel_dev(directory.metadata().unwrap().dev());
        let mut dir_placement = placement::of(&directory, id).unwrap();
        dir_placement.dm_dev = dev;
        let opened = counting.open(dev, Default::default(), Default::default());
        let watched = tracer.watch_directory(id.inode_key(), dir_placement);
        if request_based {
            for (what, error) in [
                ("a file's slot", opened.err()),
                ("a directory's new files", watched.err()),
            ] {
                let error = format!("{:#}", error.unwrap_or_else(|| panic!("{what} taken")));
                assert!(error.contains("request-based"), "{what}: {error}");
            }
        } else {
            let counted = opened.unwrap().expect("a free slot");
            watched.unwrap();
            tracer.unwatch_directory(id.inode_key());
            counting.close(counted.slot);
        }
    }
}

/// Gives `file` a slot in `counting`, its sectors on the device `dev`, and has the tracer
/// watch it with that slot.
fn watch_counted(
    tracer: &mut Tracer,
    counting: &std::sync::Arc<filemapd::wake::ebpf::Counting>,
    file: &fs::File,
    dev: u32,
) -> (filemapd::wake::ebpf::CountedFile, FileId) {
    let counted = counting
        .open(dev, Default::default(), Default::default())
        .unwrap()
        .unwrap();
    let id = FileId::of(&file.metadata().unwrap());
    let mut placement = filemapd::file::placement::of(file, id).unwrap();
    placement.dm_dev = dev;
    placement.slot = counted.slot;
    tracer.watch(id.inode_key(), placement).unwrap();
    (counted, id)
}

/// A file of `head` bytes on a fresh file system, watched by a tracer whose (unattached)
/// counting holds it in a slot, on the pretend dm device `dev`. Unwatched when dropped.
struct CountedFileOnHost {
    path: std::path::PathBuf,
    /// Where the first `head` bytes lie, in sectors.
    head: Vec<filemapd::sectors::SectorRange>,
    counting: std::sync::Arc<filemapd::wake::ebpf::Counting>,
    counted: filemapd::wake::ebpf::CountedFile,
    tracer: Tracer,
    id: FileId,
    // Dropped last, in this order: the mount before its directory.
    _loopfs: LoopFs,
    _scratch: ScratchDir,
}

impl CountedFileOnHost {
    fn new(fs_kind: FsKind, label: &str, head: u64, dev: u32) -> Self {
        use filemapd::wake::ebpf::ONE_FILE_TABLES;
        require_root();
        let scratch = ScratchDir::new(
            Path::new("/var/tmp"),
            &format!("{label}-{}", fs_kind.name()),
        )
        .unwrap();
        let loopfs = LoopFs::new(&scratch.0, fs_kind).unwrap();
        let path = loopfs.mount.dir.join(label);
        fs::write(&path, vec![0x5a; head as usize]).unwrap();
        let file = fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        let head = join_adjacent(sectors_of(&path));
        let mut tracer =
            Tracer::load(16, ONE_FILE_TABLES).expect("eBPF programs load on the host kernel");
        let counting = tracer.counting_unattached(ONE_FILE_TABLES).unwrap();
        let (counted, id) = watch_counted(&mut tracer, &counting, &file, dev);
        Self {
            path,
            head,
            counting,
            counted,
            tracer,
            id,
            _loopfs: loopfs,
            _scratch: scratch,
        }
    }

    /// What the map holds for the file, joined.
    fn held(&self) -> Vec<filemapd::sectors::SectorRange> {
        join_adjacent(self.counted.held().iter().map(|h| h.range).collect())
    }

    fn counters(&self) -> filemapd_common::FileCounters {
        self.counted.counters().unwrap()
    }

    /// Counts a pretend write over `io`: (writes, sectors written) it added to the file's.
    fn count_write(&self, io: filemapd::sectors::SectorRange) -> (u64, u64) {
        let before = self.counters();
        self.counting
            .charge_pretend_io(self.counted.dev, io, true, Duration::ZERO)
            .unwrap();
        let after = self.counters();
        (
            after.writes - before.writes,
            after.write_sectors - before.write_sectors,
        )
    }
}

impl Drop for CountedFileOnHost {
    fn drop(&mut self) {
        let _ = self.tracer.unwatch(self.id.inode_key());
    }
}

fn join_adjacent(
    ranges: Vec<filemapd::sectors::SectorRange>,
) -> Vec<filemapd::sectors::SectorRange> {
    filemapd::sectors::join_adjacent(ranges)
}

fn difference(
    a: &[filemapd::sectors::SectorRange],
    b: &[filemapd::sectors::SectorRange],
) -> Vec<filemapd::sectors::SectorRange> {
    filemapd::sectors::difference(a, b)
}

fn sum(ranges: &[filemapd::sectors::SectorRange]) -> u64 {
    ranges.iter().map(|r| r.len).sum()
}

/// A file's extents as device sectors (filefrag).
fn sectors_of(path: &Path) -> Vec<filemapd::sectors::SectorRange> {
    filemapd_tests::filefrag_sectors(path)
        .unwrap()
        .into_iter()
        .map(|(s, l)| filemapd::sectors::SectorRange::new(s, l))
        .collect()
}

/// What each program costs the verifier (start-up time: the kernel walks every program when
/// it is loaded), each within a budget of about 1.5 times what it took when the budget was
/// set, so that a change that multiplies one is caught where it is made. The IO and new-file
/// probes are verified with a made-up dm layout: with none (no device-mapper here) they return
/// at once and the verifier would walk nothing of them. The counts are printed
/// (`--nocapture`); the bench's native part reports them too.
#[tokio::test]
async fn every_program_verifies_within_its_budget() {
    use filemapd::wake::ebpf::MANY_FILES_TABLES;
    require_root();
    let mut tracer = Tracer::load_pretending_device_mapper(16, MANY_FILES_TABLES)
        .expect("eBPF programs load on the host kernel");
    tracer.counting_unattached(MANY_FILES_TABLES).unwrap();
    let counts = tracer.verified_instructions();
    for (name, count) in &counts {
        println!("{name}: {count} instructions verified");
    }
    let mut faults = Vec::new();
    for (name, count) in &counts {
        match VERIFIER_BUDGETS.iter().find(|(n, _)| n == name) {
            Some((_, budget)) if count > budget => {
                faults.push(format!("{name}: {count} > its budget of {budget}"))
            }
            Some(_) => {}
            None => faults.push(format!(
                "{name} ({count}) has no budget in VERIFIER_BUDGETS"
            )),
        }
    }
    for (name, _) in VERIFIER_BUDGETS {
        if !counts.iter().any(|(n, _)| n == name) {
            faults.push(format!("{name} was not verified"));
        }
    }
    assert!(faults.is_empty(), "{}", faults.join("; "));
}

/// Instructions the verifier may walk, per program (see the test above), set at 1.5 times
/// what each took on 2026-12-06 on kernel 6.18.44-fc-v1272. That kernel walked up to 20
/// times as much before the `bpf_loop` callbacks' state moved from the stack to map memory
/// (it walks a callback's body again while the stack values it reads differ from round to
/// round): 2.1 million instructions in all, a 6.4 s start-up.
const VERIFIER_BUDGETS: &[(&str, u32)] = &[
    // The allocation programs: the event, the filter, the sector map's recording (10,263 at
    // most when set).
    ("ext4_allocate_blocks", 16_000),
    ("xfs_bmap_post_update", 16_000),
    ("xfs_bmap_pre_update", 16_000),
    ("xfs_iext_insert", 16_000),
    ("xfs_iext_remove", 16_000),
    ("xfs_iomap_alloc", 16_000),
    ("xfs_map_blocks_alloc", 16_000),
    // The removal programs: the event and the filter.
    ("ext4_es_remove_extent", 2_000),
    ("ext4_ext_remove_space", 2_000),
    ("xfs_bunmap", 2_000),
    ("xfs_swap_extent_after", 2_000),
    // The IO probe and the charge service share the walk of a bio through the sector map
    // (the probe also reads the dm device and the bio's time: 42,357 and 47,511 when set).
    ("dm_stats_account_io", 64_000),
    // The bio hook: the walk at a bio's queueing, the charge at its completion (98,514 and
    // 45,718 when set).
    ("block_bio_queue", 150_000),
    ("block_bio_complete", 70_000),
    ("charge_service", 72_000),
    ("carry_service", 500),
    ("dm_stats_message", 500),
    ("d_instantiate", 2_000),
    ("d_instantiate_new", 2_000),
];

/// `filemapd trace` on a file of a plain (loop-mounted) ext4, where no region can exist: it
/// says so in one line, prints the file's extents, then each allocation event followed by the
/// extents FIEMAP reads after it; SIGTERM ends it with exit 0.
#[test]
fn trace_on_a_plain_disk_prints_events_and_extents() {
    require_root();
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "trace-plain").unwrap();
    let loopfs = LoopFs::new(&scratch.0, FsKind::Ext4).unwrap();
    let path = loopfs.mount.dir.join("lab.img");
    write_and_sync(&path, 0, 64 << 10).unwrap();
    let mut child = std::process::Command::new(filemapd_tests::daemon::filemapd_binary())
        .arg("trace")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, from_trace) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> serde_json::Value {
        let line = from_trace
            .recv_timeout(EVENT_TIMEOUT)
            .unwrap_or_else(|_| panic!("no {what} line within {EVENT_TIMEOUT:?}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    // Its first line: the file as it is (one 64 KiB extent).
    let first = next("first extents");
    assert_eq!(first["type"], "extents", "{first}");
    assert_eq!(first["extents"][0]["length"], 64 << 10, "{first}");
    // A write past the end allocates: an event for it, then the extents read after it.
    write_and_sync(&path, 1 << 20, 64 << 10).unwrap();
    let mut seen = Vec::new();
    let grown = loop {
        let record = next("event or extents");
        seen.push(record.clone());
        if record["type"] == "extents"
            && record["extents"]
                .as_array()
                .is_some_and(|e| e.iter().any(|x| x["logical"] == 1 << 20))
        {
            break record;
        }
    };
    assert!(
        seen.iter().any(|r| r["type"] == "event"
            && r["tracepoint"]
                .as_str()
                .is_some_and(|t| t.starts_with("ext4:"))
            && r["logical_bytes"][0] == 1 << 20),
        "no allocation event at 1 MiB before {grown}: {seen:?}"
    );
    run("kill", &["-TERM", &child.id().to_string()]).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not on a device-mapper device")
            && stderr.contains("regions and IO counters need device-mapper"),
        "{stderr}"
    );
}

/// A scrape reads every slot's counters at once (`BPF_MAP_LOOKUP_BATCH`, 1,024 slots a call):
/// over 2,500 slots, each comes back as its own, the same as a lookup of that slot alone.
#[test]
fn every_slots_counters_are_read_at_once() {
    use filemapd::wake::ebpf::{ONE_FILE_TABLES, standalone_counting};
    use filemapd_common::{Bounds, FileCounters};
    require_root();
    let counting = std::sync::Arc::new(standalone_counting(3000, ONE_FILE_TABLES).unwrap());
    let opened: Vec<_> = (0..2500u64)
        .map(|n| {
            let base = FileCounters {
                reads: n + 1,
                write_sectors: 8 * n,
                ..FileCounters::default()
            };
            counting
                .open((253 << 20) | 12, Bounds::default(), base)
                .unwrap()
                .expect("a free slot")
        })
        .collect();
    let all = counting.all_counters().unwrap();
    assert_eq!(all.len(), 3000);
    for (n, file) in opened.iter().enumerate() {
        let read = &all[file.slot as usize];
        assert_eq!(
            (read.reads, read.write_sectors),
            (n as u64 + 1, 8 * n as u64),
            "slot {}",
            file.slot
        );
        assert_eq!(*read, counting.counters(file.slot).unwrap());
    }
}

/// systemd may stop the service the moment it says READY=1 (a restart right after a start):
/// the watch then ends as on any SIGTERM, exit 0, rather than dying of the signal before its
/// handler is in place. A directory of one file not on device-mapper, watched with eBPF and
/// stopped on READY=1, 10 times (it died in the first, before the fix).
#[test]
fn a_stop_right_after_ready_ends_the_watch_cleanly() {
    require_root();
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "stop-on-ready").unwrap();
    let loopfs = LoopFs::new(&scratch.0, FsKind::Ext4).unwrap();
    let dir = loopfs.mount.dir.join("images");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a.img"), vec![0x5a; 1 << 20]).unwrap();
    for round in 0..10 {
        let socket = scratch.0.join(format!("notify-{round}.sock"));
        let mut watch = filemapd_tests::daemon::NotifyingService::start(
            &filemapd_tests::daemon::filemapd_binary(),
            &["watch".as_ref(), "--ebpf".as_ref(), dir.as_os_str()],
            &socket,
        );
        watch.wait_ready(Duration::from_secs(60));
        let status = watch.stop();
        assert!(
            status.success(),
            "round {round}: the watch ended with {status}"
        );
    }
}

/// `watch --check-config` loads the programs as the watch would and says what they can do
/// here: nothing loaded without a reason to; with `--ebpf` they load, and say why the kernel
/// cannot count (this machine has no device-mapper); with `--regions none`, which needs the
/// counting, it fails with the reason the watch itself refuses to start with; with a
/// directory of regions none in the config, it fails saying its files would not be followed.
#[test]
fn check_config_says_whether_the_programs_load_here() {
    require_root();
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "check-ebpf").unwrap();
    let config = scratch.0.join("empty.toml");
    fs::write(&config, "").unwrap();
    let filemapd = |args: &[&str]| {
        let out = std::process::Command::new(filemapd_tests::daemon::filemapd_binary())
            .arg("watch")
            .args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("FILEMAPD_EBPF")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, said, _) = filemapd(&["--check-config"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("eBPF: not asked for: files poll every 0.5 s"),
        "{said}"
    );
    let (code, said, _) = filemapd(&["--check-config", "--ebpf"]);
    let loaded = "eBPF: the programs load here: allocation events wake the watch; the kernel cannot count the files' IO here: ";
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains(loaded), "no {loaded:?} in:\n{said}");

    let (code, said, _) = filemapd(&["--check-config", "--regions", "none"]);
    assert_eq!(code, Some(1), "{said}");
    let refused = said
        .lines()
        .find_map(|line| line.strip_prefix("eBPF: the watch would refuse to start: "))
        .unwrap_or_else(|| panic!("no refusal in:\n{said}"));
    assert!(
        refused.starts_with("--regions none: the kernel cannot count the files' IO here: "),
        "{refused}"
    );
    // The watch itself refuses with the same words, before it watches anything.
    let (code, _, errors) = filemapd(&["--regions", "none"]);
    assert_eq!(code, Some(1), "{errors}");
    assert_eq!(errors.trim_end().lines().last(), Some(refused), "{errors}");

    // A config's directory of regions none: the watch would start, without following its
    // files.
    let images = scratch.0.join("images");
    fs::create_dir(&images).unwrap();
    fs::write(
        &config,
        format!(
            "[[path]]\npath = \"{}\"\nregions = \"none\"\n",
            images.display()
        ),
    )
    .unwrap();
    let (code, said, _) = filemapd(&["--check-config"]);
    assert_eq!(code, Some(1), "{said}");
    let line = said.lines().find(|line| line.starts_with(loaded));
    assert!(
        line.is_some_and(|line| line.ends_with("; the files of regions none would not be followed")),
        "{said}"
    );
}
