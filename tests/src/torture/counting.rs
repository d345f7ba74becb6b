//! The kernel's counters at a quiescent checkpoint, for each file kept both ways (a tiled
//! group, and the kernel's counting by an eBPF daemon): an O_DIRECT read of the whole file is
//! counted sector for sector the same by the kernel (`filemapd report`) and by the group's
//! regions (`@stats_print`), which checks that the kernel's map of the file is the file after
//! every change the torture made; and the kernel's totals never go back while the file lives,
//! across kills and restarts of its daemon.
use std::{collections::BTreeMap, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, ensure};
use filemapd::stats::Counters;

use super::{
    oracle::SETTLE,
    slots::{Keeper, Slot},
};
use crate::{
    daemon::{device_of, filemapd_binary, group_by_alias},
    run, wait_until,
    writers::direct_read_whole,
};

/// A file's kernel totals as last seen: ((inode, generation), [reads, read sectors, writes,
/// written sectors]). The generation tells a new file from an old one whose inode number
/// the file system gave again (ext4 does at once).
pub type LastSeen = BTreeMap<String, ((u64, u32), [u64; 4])>;

/// Checks one slot (those without the kernel's counting are left alone).
pub fn check(slot: &Slot, last: &mut LastSeen) -> anyhow::Result<()> {
    if !matches!(slot.keeper, Keeper::EbpfPath | Keeper::Watch) {
        return Ok(());
    }
    let path = slot.path_for_others();
    // Listed once the daemon has put the file's sectors in the kernel's map (a relaunched
    // daemon may still be loading its programs), under the path it was given: a daemon
    // started for an unlinked file names it by its /proc path.
    let names = [&slot.path, &path].map(|p| p.to_string_lossy().into_owned());
    wait_until(&format!("{} to be counted", slot.name()), SETTLE, || {
        Ok(run(&filemapd_binary().to_string_lossy(), &["report"])?
            .lines()
            .any(|l| {
                names
                    .iter()
                    .any(|n| l.split_whitespace().next() == Some(n.as_str()))
            }))
    })?;
    let file = std::fs::File::open(&path)?;
    let ino = (
        file.metadata()?.ino(),
        filemapd::file::placement::generation_of(&file),
    );
    let before = reported(&path)?;
    if let Some((seen_ino, seen)) = last.get(&slot.name())
        && *seen_ino == ino
    {
        ensure!(
            before.iter().zip(seen).all(|(now, then)| now >= then),
            "{}: the kernel's totals went back, from {seen:?} to {before:?} (reads, read sectors, writes, written sectors)",
            slot.name()
        );
    }
    let regions_before = region_counters(slot)?;
    direct_read_whole(&slot.io_path());
    let after = reported(&path)?;
    let regions_after = region_counters(slot)?;
    let kernel_read = after[1] - before[1];
    let regions_read = regions_after.sectors_read - regions_before.sectors_read;
    ensure!(
        kernel_read == regions_read,
        "{}: a read of the whole file counted {kernel_read} sectors in the kernel, {regions_read} in the group's regions",
        slot.name()
    );
    ensure!(
        after[3] == before[3],
        "{}: a read counted as {} written sectors",
        slot.name(),
        after[3] - before[3]
    );
    last.insert(slot.name(), (ino, after));
    Ok(())
}

/// `filemapd report PATH`: (reads, read sectors, writes, written sectors).
fn reported(path: &Path) -> anyhow::Result<[u64; 4]> {
    let out = run(
        &filemapd_binary().to_string_lossy(),
        &["report", &path.to_string_lossy()],
    )?;
    let row = out
        .lines()
        .nth(1)
        .with_context(|| format!("no row in `filemapd report`:\n{out}"))?;
    let cells: Vec<u64> = row
        .split_whitespace()
        .skip(1)
        .map(|c| c.parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("row {row:?}"))?;
    ensure!(cells.len() >= 5, "row {row:?}");
    Ok([cells[0], cells[1], cells[3], cells[4]])
}

/// The group's regions' counters, summed.
fn region_counters(slot: &Slot) -> anyhow::Result<Counters> {
    let device = device_of(&slot.io_path());
    let (_, members) = group_by_alias(&device, &slot.alias())
        .with_context(|| format!("{}: group gone", slot.name()))?;
    members.iter().map(|r| device.counters(r.id)).sum()
}
