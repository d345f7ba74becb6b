//! eBPF on this machine's own kernel (no device-mapper needed): the allocation programs report
//! a watched inode's new blocks and nothing of an unwatched inode's, on ext4 and on xfs; every
//! event reaches user space even when the kernel does not wake it for each; and the in-kernel
//! accounting's uncovered set, over its real maps, stays walkable when cut, and holds a chunk's
//! allocations beyond what its entry of the chunk table takes.
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

    let mut tracer = Tracer::load(16).expect("eBPF programs load on the host kernel");
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
    let mut tracer = Tracer::load(16).expect("eBPF programs load on the host kernel");
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
    let mut tracer = Tracer::load(16).unwrap();
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

/// The uncovered set, without device-mapper: a region ending inside a piece exactly the size
/// of a marker level's block (4 MiB) cuts it, and a walk still finds the parts outside the
/// region. (Such a cut once left the block without its marker: walks stepped over the parts,
/// and their IO was counted nowhere.)
#[test]
fn a_cut_piece_leaves_its_parts_where_walks_find_them() {
    use std::sync::Arc;

    use filemapd::{
        sectors::{SectorRange, join_adjacent},
        stats::{CreationWitness as _, group::FuseShadow as _},
        wake::ebpf::{FileShadow, standalone_accounting},
    };
    require_root();
    let accounting = Arc::new(standalone_accounting().unwrap());
    let account = accounting.open_account().unwrap().unwrap();
    let (major, minor) = (253, 3);
    let dev = (major << 20) | minor;
    // Put in as the kernel cuts an allocation: aligned pieces, 1032192+8192 among them.
    let allocation = SectorRange::new(786512, 260216);
    let file = FileShadow {
        account: &account,
        dev,
        block: 8,
    };
    file.shadow(allocation).unwrap();
    let region = SectorRange::new(786512, 249736); // ends at 1036248, inside that piece
    let ticket = accounting
        .before_create((major, minor), region)
        .expect("the region takes the pieces it covers");
    accounting.after_create(ticket, true);
    // A walk over the whole allocation, as an IO from inside the region onwards walks: it
    // steps through the blocks the region took, and must not step over the parts left.
    let (found, held) = accounting.pieces_found_and_held(dev, allocation).unwrap();
    assert_eq!(found, held, "a walk misses pieces the set holds");
    let rest = SectorRange::new(region.end(), allocation.end() - region.end());
    assert_eq!(
        join_adjacent(held),
        vec![rest],
        "the parts outside the region"
    );
}

/// The uncovered set's spans over real allocations, without device-mapper: the allocation
/// programs record a growing file's fresh extents exactly, walks find what the set holds
/// and the IO probe's walk charges it (run on a pretend IO), a region's creation takes
/// exactly its sectors out (splitting the span it lies inside), and a tidy takes the rest.
async fn spans_hold_fresh_allocations(fs_kind: FsKind) {
    use filemapd::{
        sectors::{SectorRange, join_adjacent, parts_not_in},
        stats::CreationWitness as _,
    };
    use filemapd_tests::writers::random_direct_writes;
    const HEAD: u64 = 1 << 20;
    const DEV: u32 = (253 << 20) | 7;
    let f = AccountedFile::new(fs_kind, "spans", HEAD, DEV);
    let (path, head, accounting, account) = (&f.path, f.head.clone(), &f.accounting, &f.account);
    random_direct_writes(path, HEAD, 4 << 20, 0x5eed);

    let fresh: Vec<SectorRange> = sectors_of(path)
        .into_iter()
        .flat_map(|extent| parts_not_in(extent, head.clone()))
        .collect();
    assert!(!fresh.is_empty(), "the writes allocated nothing");
    let first = fresh.iter().map(|r| r.start).min().unwrap();
    let last = fresh.iter().map(|r| r.end()).max().unwrap();
    let whole = SectorRange::new(first, last - first);
    let held_now = || {
        let (found, held) = accounting.pieces_found_and_held(DEV, whole).unwrap();
        assert_eq!(found, held, "a walk misses what the set holds");
        join_adjacent(held)
    };
    assert_eq!(
        held_now(),
        join_adjacent(fresh.clone()),
        "recorded vs allocated"
    );
    // An IO over all of it, as the IO probe walks one, is charged each fresh sector.
    let charged = || {
        let before = account.totals().unwrap();
        accounting.charge_pretend_io(DEV, whole, true).unwrap();
        let after = account.totals().unwrap();
        (
            after.writes - before.writes,
            after.write_sectors - before.write_sectors,
        )
    };
    let sum = |ranges: &[SectorRange]| ranges.iter().map(|r| r.len).sum::<u64>();
    assert_eq!(charged(), (1, sum(&fresh)), "charged vs allocated");

    // A region of two blocks inside the first 64 KiB allocation: the span is split around it.
    let inside = fresh
        .iter()
        .find(|r| r.len >= 128)
        .expect("a whole 64 KiB allocation");
    let region = SectorRange::new(inside.start + 16, 16);
    let ticket = accounting
        .before_create((DEV >> 20, DEV & 0xfffff), region)
        .expect("the region takes the span it lies in");
    accounting.after_create(ticket, true);
    let left: Vec<SectorRange> = fresh
        .iter()
        .flat_map(|&r| parts_not_in(r, vec![region]))
        .collect();
    assert_eq!(
        held_now(),
        join_adjacent(left.clone()),
        "after the region's creation"
    );
    assert_eq!(
        charged(),
        (1, sum(&left)),
        "charged after the region's creation"
    );

    // A failed creation gives back what it took.
    let ticket = accounting
        .before_create((DEV >> 20, DEV & 0xfffff), whole)
        .expect("the region takes every span");
    accounting.after_create(ticket, false);
    assert_eq!(held_now(), join_adjacent(left), "after a failed creation");

    account.tidy(|_, _| true).unwrap();
    assert_eq!(held_now(), vec![], "after a tidy of everything");
    assert_eq!(charged(), (0, 0), "charged after a tidy of everything");
}

#[tokio::test]
async fn ext4_spans_hold_fresh_allocations() {
    spans_hold_fresh_allocations(FsKind::Ext4).await;
}

#[tokio::test]
async fn xfs_spans_hold_fresh_allocations() {
    spans_hold_fresh_allocations(FsKind::Xfs).await;
}

/// More small allocations in one 256 KiB chunk than its entry of the chunk table holds (the
/// rest go to the trie): the set keeps every one of them where a walk finds it, and an IO
/// over them is charged each.
async fn a_full_chunk_keeps_every_allocation(fs_kind: FsKind) {
    use filemapd::sectors::{SectorRange, join_adjacent, parts_not_in};
    use filemapd_common::{CHUNK_LOG, SPANS_PER_CHUNK};
    use filemapd_tests::writers::spaced_block_writes;
    const HEAD: u64 = 1 << 20;
    const DEV: u32 = (253 << 20) | 9;
    let f = AccountedFile::new(fs_kind, "full", HEAD, DEV);
    let (path, head, accounting, account) = (&f.path, f.head.clone(), &f.accounting, &f.account);
    // Blocks 8 KiB apart in the file: each its own allocation, a hole between neighbours.
    let count = 2 * SPANS_PER_CHUNK as u64 + 4;
    spaced_block_writes(path, HEAD, count, 8192);

    let fresh: Vec<SectorRange> = sectors_of(path)
        .into_iter()
        .flat_map(|extent| parts_not_in(extent, head.clone()))
        .collect();
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
        busiest > SPANS_PER_CHUNK,
        "the writes should put more than {SPANS_PER_CHUNK} allocations in one chunk, the \
         busiest has {busiest}: {fresh:?}"
    );
    let first = fresh.iter().map(|r| r.start).min().unwrap();
    let last = fresh.iter().map(|r| r.end()).max().unwrap();
    let whole = SectorRange::new(first, last - first);
    let (found, held) = accounting.pieces_found_and_held(DEV, whole).unwrap();
    assert_eq!(found, held, "a walk misses what the set holds");
    assert_eq!(
        join_adjacent(held),
        join_adjacent(fresh.clone()),
        "recorded vs allocated"
    );
    let before = account.totals().unwrap();
    accounting.charge_pretend_io(DEV, whole, true).unwrap();
    let after = account.totals().unwrap();
    let sum: u64 = fresh.iter().map(|r| r.len).sum();
    assert_eq!(
        (
            after.writes - before.writes,
            after.write_sectors - before.write_sectors
        ),
        (1, sum),
        "charged vs allocated"
    );
    account.tidy(|_, _| true).unwrap();
    let (found, held) = accounting.pieces_found_and_held(DEV, whole).unwrap();
    assert_eq!(
        (found, held),
        (vec![], vec![]),
        "after a tidy of everything"
    );
}

#[tokio::test]
async fn ext4_a_full_chunk_keeps_every_allocation() {
    a_full_chunk_keeps_every_allocation(FsKind::Ext4).await;
}

#[tokio::test]
async fn xfs_a_full_chunk_keeps_every_allocation() {
    a_full_chunk_keeps_every_allocation(FsKind::Xfs).await;
}

/// A file of `head` bytes on a fresh file system, watched by a tracer whose (unattached)
/// accounting holds it in a slot, on the pretend dm device `dev`. Unwatched when dropped.
struct AccountedFile {
    path: std::path::PathBuf,
    /// Where the first `head` bytes lie, in sectors.
    head: Vec<filemapd::sectors::SectorRange>,
    accounting: std::sync::Arc<filemapd::wake::ebpf::Accounting>,
    account: filemapd::wake::ebpf::FileAccount,
    tracer: Tracer,
    id: FileId,
    // Dropped last, in this order: the mount before its directory.
    _loopfs: LoopFs,
    _scratch: ScratchDir,
}

impl AccountedFile {
    fn new(fs_kind: FsKind, label: &str, head: u64, dev: u32) -> Self {
        use filemapd::file::placement;
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
        let head = sectors_of(&path);
        let mut tracer = Tracer::load(16).expect("eBPF programs load on the host kernel");
        let accounting = tracer.accounting_unattached().unwrap();
        let account = accounting.open_account().unwrap().unwrap();
        let id = FileId::of(&file.metadata().unwrap());
        let mut placement = placement::of(&file, id).unwrap();
        placement.dm_dev = dev;
        placement.slot = account.slot;
        tracer.watch(id.inode_key(), placement).unwrap();
        Self {
            path,
            head,
            accounting,
            account,
            tracer,
            id,
            _loopfs: loopfs,
            _scratch: scratch,
        }
    }
}

impl Drop for AccountedFile {
    fn drop(&mut self) {
        let _ = self.tracer.unwatch(self.id.inode_key());
    }
}

/// A file's extents as device sectors (filefrag).
fn sectors_of(path: &Path) -> Vec<filemapd::sectors::SectorRange> {
    filemapd_tests::filefrag_sectors(path)
        .unwrap()
        .into_iter()
        .map(|(s, l)| filemapd::sectors::SectorRange::new(s, l))
        .collect()
}
