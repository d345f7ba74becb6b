//! What must hold at a quiescent checkpoint, checked against the kernel's region table and
//! Debian's dmstats: each group covers exactly its file's extents, foreign regions are
//! untouched, nothing of filemapd's is left in transit, and dmstats can read every group.
use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{bail, ensure};
use filemapd::stats::Region;

use super::slots::Slot;
use crate::{
    daemon::{converged_on, device_of, file_ranges, group_by_alias},
    run, wait_until,
};

/// How long a group may take to catch up at a checkpoint: far more than any pass needs, but
/// a backlog held back by the storm budget re-plans every 250 ms under emulation.
pub const SETTLE: Duration = Duration::from_secs(60);

/// A region as the oracle compares it: everything the kernel keeps but the counters.
pub fn describe(r: &Region) -> String {
    format!(
        "{} {} {} {:?}",
        r.range, r.program_id, r.aux_data, r.settings
    )
}

/// Regions that are not ours, by id, as they must stay.
pub type Foreign = BTreeMap<u64, String>;

/// Waits until every slot's group tiles its file, then checks the whole region table of the
/// device the slots share.
pub fn check_device(
    device: &str,
    mount: &Path,
    slots: &[&Slot],
    foreign: &Foreign,
) -> anyhow::Result<()> {
    for slot in slots {
        let path = slot.io_path();
        wait_until(
            &format!("{}'s group to tile its file", slot.name()),
            SETTLE,
            || converged_on(device, &path, &slot.alias()),
        )
        .map_err(|e| {
            let group = group_by_alias(&device_of(&path), &slot.alias())
                .map(|(id, members)| (id, members.iter().map(|r| r.range).collect::<Vec<_>>()));
            let file = file_ranges(&path);
            // Slow or stuck? Give it as long again, and say which.
            let late = wait_until("a late convergence", SETTLE, || {
                converged_on(device, &path, &slot.alias())
            });
            anyhow::anyhow!(
                "{e} ({})\nfile: {file:?}\ngroup: {group:?}",
                match late {
                    Ok(()) => "it converged within another 60 s",
                    Err(_) => "and not within another 60 s either",
                }
            )
        })?;
    }
    // A daemon killed in the middle of a move leaves its markers for the next one, which
    // clears them once it is up (loading its programs takes seconds in the emulated VM): the
    // groups may tile their files before that. Markers still there after this are reported.
    let unmarked = || {
        let regions = device_of(mount).list(None)?;
        Ok(regions
            .iter()
            .all(|r| !r.aux_data.contains("DMS_FILEMAPD_")))
    };
    let _ = wait_until("the device's in-flight markers to clear", SETTLE, unmarked);
    let regions = device_of(mount).list(None)?;
    let mut ours = std::collections::BTreeSet::new();
    for slot in slots {
        let (_, members) = group_by_alias(&device_of(mount), &slot.alias())
            .ok_or_else(|| anyhow::anyhow!("{}: group gone", slot.name()))?;
        ours.extend(members.iter().map(|r| r.id));
    }
    for region in &regions {
        ensure!(
            !region.aux_data.contains("DMS_FILEMAPD_"),
            "region {} still carries a marker: {}",
            region.id,
            describe(region)
        );
        match foreign.get(&region.id) {
            Some(expected) => ensure!(
                *expected == describe(region),
                "foreign region {} changed:\n  was {expected}\n  now {}",
                region.id,
                describe(region)
            ),
            None if ours.contains(&region.id) => {}
            None => bail!("orphan region {}: {}", region.id, describe(region)),
        }
    }
    for id in foreign.keys() {
        ensure!(
            regions.iter().any(|r| r.id == *id),
            "foreign region {id} was deleted"
        );
    }
    // Debian's dmstats must read what filemapd left, group by group.
    run("dmstats", &["list", device])?;
    for slot in slots {
        let id = slot.current_group_id();
        let report = run("dmstats", &["report", "--groupid", &id.to_string(), device])?;
        ensure!(
            report.contains(&slot.alias()),
            "dmstats report of group {id} does not name {}:\n{report}",
            slot.alias()
        );
    }
    Ok(())
}
