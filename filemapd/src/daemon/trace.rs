//! `filemapd trace`: one JSON object per line on stdout for each allocation or removal event of
//! the watched files, each pass the daemon made of them, and each file's totals (all its IO,
//! as the kernel counted it) when it stops. For kernel labs: what the file system did, when, and what it cost to follow.
//! Off (and free: one relaxed load) unless the trace command turned it on.
use std::{
    io::Write as _,
    sync::atomic::{AtomicBool, Ordering},
};

use serde_json::{Value, json};

use crate::wake::ebpf::{Tracepoint, counting};
use filemapd_common::{ExtentEvent, FileCounters, Placement};

static ON: AtomicBool = AtomicBool::new(false);

pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

fn emit(record: Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (the reader went away) ends nothing but the trace.
    let _ = writeln!(out, "{record}");
    let _ = out.flush();
}

/// An event as the kernel reported it: where in the file (bytes), where on the device (the
/// tracepoint's raw block numbers, and sectors of the dm device when the placement is known).
pub fn event(
    path: &std::path::Path,
    event: &ExtentEvent,
    logical: Option<(u64, u64)>,
    placement: Option<&Placement>,
) {
    if !enabled() {
        return;
    }
    let tracepoint = Tracepoint::by_index(event.source);
    let delayed = tracepoint.is_some_and(|t| t.is_placeholder(event.physical_start));
    let physical = (event.physical_length > 0).then(|| {
        let mut physical = json!({
            "blocks": [event.physical_start, event.physical_length],
            "delayed_allocation": delayed,
        });
        if let Some(p) = placement.filter(|_| !delayed) {
            physical["sectors"] = json!([
                p.sector_of(event.physical_start),
                p.sectors_in(event.physical_length)
            ]);
        }
        physical
    });
    emit(json!({
        "type": "event",
        "path": path,
        "tracepoint": tracepoint.map(|t| format!("{}:{}", t.category, t.name)),
        "change": tracepoint.map(|t| format!("{:?}", t.change).to_lowercase()),
        "dev": format!("{}:{}", event.key.dev >> 20, event.key.dev & 0xfffff),
        "ino": event.key.ino,
        "logical_bytes": logical.map(|(start, len)| [start, len]),
        "physical": physical,
        "ktime_ns": event.ktime_ns,
    }));
}

/// What one pass did.
pub struct Pass<'a> {
    pub path: &'a std::path::Path,
    pub number: u64,
    /// The logical bytes read with FIEMAP (`None`: the whole file).
    pub read: Option<(u64, u64)>,
    pub created: usize,
    pub deleted: usize,
    pub regions: usize,
    /// The `@stats_*` messages the update sent.
    pub dm_messages: u64,
    /// Time spent carrying out the plan (creating and deleting regions).
    pub apply_us: u128,
    /// From the oldest event still waiting for a region (answered by this pass, or by the
    /// passes before it that settled the same change) to the end of its region creations.
    pub event_to_region_us: Option<u64>,
}

pub fn pass(p: Pass<'_>) {
    if !enabled() {
        return;
    }
    emit(json!({
        "type": "pass",
        "path": p.path,
        "pass": p.number,
        "fiemap_bytes": p.read.map(|(start, end)| [start, end - start]),
        "whole_file": p.read.is_none(),
        "regions_created": p.created,
        "regions_deleted": p.deleted,
        "regions": p.regions,
        "dm_messages": p.dm_messages,
        "apply_us": p.apply_us,
        "event_to_region_us": p.event_to_region_us,
    }));
}

/// A file's totals when its monitor stops: all its IO, as the kernel counted it.
pub fn totals(path: &std::path::Path, totals: &FileCounters) {
    if !enabled() {
        return;
    }
    emit(json!({
        "type": "totals",
        "path": path,
        "counted_by": "kernel",
        "reads": totals.reads,
        "read_sectors": totals.read_sectors,
        "read_seconds": totals.read_ns as f64 / 1e9,
        "writes": totals.writes,
        "write_sectors": totals.write_sectors,
        "write_seconds": totals.write_ns as f64 / 1e9,
        "in_flight": totals.in_flight(),
        "unrecorded": totals.unrecorded,
        "unwalked": totals.unwalked,
        "summary": counting::describe(totals),
    }));
}

/// A file's extents as FIEMAP reads them now (files off device-mapper, where no region can
/// follow them): logical and physical bytes, length and FIEMAP's flags.
pub fn extents(path: &std::path::Path, extents: &[crate::file::fiemap::Extent]) {
    if !enabled() {
        return;
    }
    emit(json!({
        "type": "extents",
        "path": path,
        "extents": extents
            .iter()
            .map(|e| json!({
                "logical": e.logical,
                "physical": e.physical,
                "length": e.length,
                "flags": e.flags,
            }))
            .collect::<Vec<_>>(),
    }));
}
