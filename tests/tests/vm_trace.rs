//! `filemapd trace` against real device-mapper (run inside the VM by `cargo xtask test`): the
//! JSON lines it prints for a growing file name the allocation tracepoint, the inode, and a
//! physical place that `filefrag -v` shows in the file; a pass that made the regions, with its
//! event-to-region time; the in-kernel totals at the end; and `--ebpf-log` shows the kernel
//! filter's own verdicts.
use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use filemapd_tests::{
    DmFs, FsKind,
    daemon::{CONVERGE, filemapd_binary, wait_converged},
    filefrag_sectors, require_device_mapper, write_and_sync,
};
use serde_json::Value;

fn trace_shows_events_passes_and_totals(fs_kind: FsKind, tracepoints: &[&str]) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("lab.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let mut child = Command::new(filemapd_binary())
        .args(["trace", "--ebpf-log", &path.to_string_lossy()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel::<Value>();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            if tx.send(value).is_err() {
                break;
            }
        }
    });
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let log = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());
    // The trace has mapped the file once its first pass is out.
    let first = lines
        .recv_timeout(CONVERGE)
        .expect("no trace line at start-up");
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
    let mut seen: Vec<Value> = Vec::new();
    let made_regions = loop {
        let made = seen
            .iter()
            .find(|l| l["type"] == "pass" && l["regions_created"].as_u64() > Some(0));
        if let Some(made) = made.filter(|_| seen.iter().any(placed)) {
            break made.clone();
        }
        let line = lines.recv_timeout(CONVERGE).unwrap_or_else(|e| {
            panic!("no pass made regions, or no {tracepoints:?} event placed blocks ({e}); lines:\n{seen:#?}")
        });
        seen.push(line);
    };
    let ino = std::fs::metadata(&path).unwrap().ino();
    let event = seen.iter().find(|l| placed(l)).expect("seen above");
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
    // A pass that answered events says how long they waited for their region; a pass that
    // read the whole file for another reason may have made the region before the event came.
    assert!(
        made_regions["event_to_region_us"].as_u64().is_some() || made_regions["whole_file"] == true,
        "{made_regions}"
    );
    assert!(made_regions["fiemap_bytes"].is_array() || made_regions["whole_file"] == true);

    // SIGTERM: the totals line, then exit 0.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let totals = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("no totals line after SIGTERM");
        if line["type"] == "totals" {
            break line;
        }
    };
    assert!(
        totals["write_sectors"].as_u64().is_some_and(|n| n > 0),
        "{totals}"
    );
    assert_eq!(totals["counted_by"], "kernel", "{totals}");
    assert!(child.wait().unwrap().success());
    let log = log.join().unwrap();
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
