//! `filemapd trace` against real device-mapper (run inside the VM by `cargo xtask test`): the
//! JSON lines it prints for a growing file name the allocation tracepoint, the inode, and a
//! physical place that `filefrag -v` shows in the file; a pass that made the regions, with its
//! event-to-region time; the in-kernel totals at the end; and `--ebpf-log` shows the kernel
//! filter's own verdicts.
use std::os::unix::fs::MetadataExt as _;

use filemapd_tests::{
    DmFs, FsKind,
    daemon::{CONVERGE, wait_converged},
    filefrag_sectors, punch_hole, require_device_mapper,
    trace::TraceRun,
    write_and_sync,
};
use serde_json::Value;

fn trace_shows_events_passes_and_totals(fs_kind: FsKind, tracepoints: &[&str]) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("lab.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let mut trace = TraceRun::start(&["--ebpf-log"], &path);
    // The trace has mapped the file once its first pass is out.
    let first = trace.next(CONVERGE, "at start-up");
    assert_eq!(first["type"], "pass", "{first}");
    wait_converged(&dmfs, &path, "lab.img", "start-up");

    write_and_sync(&path, 1 << 20, 1 << 20).unwrap();
    // Until a pass made the regions and an event placed the new blocks (xfs places them at
    // writeback, and the event may come after the pass that FIEMAP already let see them).
    let placed = |l: &Value| {
        l["type"] == "event"
            && tracepoints.contains(&l["tracepoint"].as_str().unwrap_or(""))
            && l["physical"]["sectors"].is_array()
    };
    let made = |l: &Value| l["type"] == "pass" && l["regions_created"].as_u64() > Some(0);
    while !(trace.seen.iter().any(made) && trace.seen.iter().any(placed)) {
        trace.next(
            CONVERGE,
            "a pass that made regions, and an event that placed blocks",
        );
    }
    let made_regions = trace.seen.iter().find(|l| made(l)).unwrap().clone();
    let ino = std::fs::metadata(&path).unwrap().ino();
    let event = trace.seen.iter().find(|l| placed(l)).unwrap().clone();
    assert_eq!(event["ino"], ino, "{event}");
    assert_eq!(event["change"], "allocated", "{event}");
    assert!(event["ktime_ns"].as_u64() > Some(0), "{event}");
    // The event's physical sectors start in the file as filefrag sees it (xfs may go on past
    // EOF: writeback also turned its speculative preallocation into blocks, which filefrag
    // does not list).
    let sectors = event["physical"]["sectors"]
        .as_array()
        .unwrap_or_else(|| panic!("no physical sectors: {event}"));
    let (start, len) = (sectors[0].as_u64().unwrap(), sectors[1].as_u64().unwrap());
    let extents = filefrag_sectors(&path).unwrap();
    assert!(
        extents.iter().any(|&(s, l)| s <= start
            && start < s + l
            && (fs_kind == FsKind::Xfs || start + len <= s + l)),
        "event sectors {start}+{len} are not in filefrag's extents {extents:?}"
    );
    // A pass that made the region of events says how long they waited for it, also when it
    // is the settling pass after the one that answered them (xfs's blocks show in FIEMAP
    // after writeback); a pass that read the whole file for another reason may have made the
    // region before the event came.
    assert!(
        made_regions["event_to_region_us"].as_u64().is_some() || made_regions["whole_file"] == true,
        "{made_regions}"
    );
    assert!(made_regions["fiemap_bytes"].is_array() || made_regions["whole_file"] == true);
    assert!(
        made_regions["dm_messages"].as_u64() > Some(0),
        "{made_regions}"
    );

    // SIGTERM: the totals line, then exit 0.
    let (totals, exited_0, log) = trace.stop();
    assert!(
        totals["write_sectors"].as_u64().is_some_and(|n| n > 0),
        "{totals}"
    );
    assert_eq!(totals["counted_by"], "kernel", "{totals}");
    assert!(exited_0);
    assert!(
        log.iter().any(|l| l.contains(&format!("inode {ino} kept"))),
        "--ebpf-log shows the kernel filter keeping the file's events:\n{}",
        log.join("\n")
    );
}

#[test]
fn ext4_trace() {
    trace_shows_events_passes_and_totals(FsKind::Ext4, &["ext4:ext4_allocate_blocks"]);
}

#[test]
fn xfs_trace() {
    // Writeback turns the delayed allocation's record into a real one (updated in place, or
    // merged into its neighbour's, or inserted beside what stays delayed).
    trace_shows_events_passes_and_totals(
        FsKind::Xfs,
        &["xfs:xfs_bmap_post_update", "xfs:xfs_iext_insert"],
    );
}

/// An isolated growth of a tiled group costs three dm messages: the region's creation
/// (carrying its in-transit marker), the group's new descriptor, and the marker's removal. No
/// neighbour is asked for its counters (no `@stats_print`): below the tile budget nothing is
/// fused, also where the new block joins the regions on both its sides into one extent (a
/// punched block written again goes back to its place).
fn isolated_growths_cost_three_dm_messages(fs_kind: FsKind) {
    const HOLES: u64 = 8;
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("holes.img");
    write_and_sync(&path, 0, (HOLES << 20) as usize).unwrap();
    let hole = |i: u64| (i << 20) + (512 << 10);
    for i in 0..HOLES {
        punch_hole(&path, hole(i), 4096).unwrap();
    }
    let mut trace = TraceRun::start(&[], &path);
    trace.next(CONVERGE, "the start-up pass");
    wait_converged(&dmfs, &path, "holes.img", "start-up");
    // Every other hole: each growth then joins two regions' extents, never more.
    for i in (0..HOLES).step_by(2) {
        write_and_sync(&path, hole(i), 4096).unwrap();
        let pass = trace.until(CONVERGE, "a pass that covered the new block", |l| {
            l["type"] == "pass" && l["regions_created"].as_u64() > Some(0)
        });
        assert_eq!(
            pass["dm_messages"],
            3,
            "growth {i}: {pass}\nfilefrag: {:?}\n{}",
            filefrag_sectors(&path).unwrap(),
            filemapd_tests::run("dmstats", &["list", "--units", "s", &dmfs.name]).unwrap()
        );
        wait_converged(&dmfs, &path, "holes.img", "a block in a hole");
    }
    let (_, exited_0, _) = trace.stop();
    assert!(exited_0);
}

#[test]
fn ext4_isolated_growths_cost_three_dm_messages() {
    isolated_growths_cost_three_dm_messages(FsKind::Ext4);
}

#[test]
fn xfs_isolated_growths_cost_three_dm_messages() {
    isolated_growths_cost_three_dm_messages(FsKind::Xfs);
}
