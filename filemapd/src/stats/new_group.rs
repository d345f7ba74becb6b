//! Making a file's group as `dmstats create --filemap` makes it (one region per extent, the
//! descriptor `DMS_GROUP=<alias>:<members>#-` on the lowest region, program id `dmstats`), and
//! removing one, for `filemapd map` / `unmap`.
//!
//! Kill-safety, as for updates (see [`super::group`]): until the descriptor is written, the
//! new regions are not a group, so each carries a marker. The first one made is marked
//! `DMS_FILEMAPD_MAPPING=<dev>:<ino>` (the file's identity), every later one
//! `DMS_FILEMAPD_PENDING=<first id>`. Writing the descriptor on the first region is the switch;
//! the members' markers are cleared after it. A run killed before the switch leaves marked
//! regions that the next `map` of the same file removes first; one killed after it leaves a
//! group whose remaining markers the next `map` (or any daemon's pass) clears.
use anyhow::{Context as _, bail};

use super::{GroupDescriptor, Region, RegionSettings, StatsDevice, group, id_set::IdSet};
use crate::{file::identity::FileId, sectors::SectorRange};

const MAPPING_TAG: &str = "DMS_FILEMAPD_MAPPING=";

/// What a new group is created with (dmstats' `--alias`, `--program-id`, `--precise`,
/// `--bounds`).
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub alias: String,
    pub program_id: String,
    pub settings: RegionSettings,
}

fn mapping_marker(file: FileId) -> String {
    format!("{MAPPING_TAG}{}:{}", file.st_dev, file.ino)
}

/// Removes what a killed `map` of this file left before its switch: the region marked with
/// the file's identity, and the regions marked pending for it. Returns how many went.
pub fn remove_leftovers(
    device: &StatsDevice,
    regions: &[Region],
    file: FileId,
) -> anyhow::Result<usize> {
    let marker = mapping_marker(file);
    let mut removed = 0;
    for first in regions.iter().filter(|r| r.aux_data == marker) {
        let pending = group::pending_marker(first.id);
        for region in regions.iter().filter(|r| r.aux_data == pending) {
            device.delete(region.id)?;
            removed += 1;
        }
        device.delete(first.id)?;
        removed += 1;
    }
    Ok(removed)
}

/// Creates a group with one region per range (sorted by place, as dmstats does) and returns
/// its id. On an error, the regions made so far are deleted again.
pub fn create(
    device: &StatsDevice,
    ranges: &[SectorRange],
    spec: &GroupSpec,
    file: FileId,
) -> anyhow::Result<u64> {
    GroupDescriptor::validate_alias(&spec.alias)?;
    let Some((&first_range, rest)) = ranges.split_first() else {
        bail!("the file has no extents to map");
    };
    let first = device
        .create(
            first_range,
            &spec.settings,
            &spec.program_id,
            &mapping_marker(file),
        )
        .with_context(|| format!("creating a region for {first_range}"))?;
    let mut created = vec![first];
    let pending = group::pending_marker(first);
    for &range in rest {
        match device.create(range, &spec.settings, &spec.program_id, &pending) {
            // The kernel hands out the lowest free id: a lower one appears only if another
            // process freed it meanwhile. The first region must lead (lowest id), so start over.
            Ok(id) if id < first => {
                created.push(id);
                undo(device, &created);
                bail!("region ids were freed while mapping (another dmstats user?): try again");
            }
            Ok(id) => created.push(id),
            Err(e) => {
                undo(device, &created);
                return Err(e.context(format!("creating a region for {range}")));
            }
        }
    }
    group::crash_point("mapped");
    let mut members = IdSet::new();
    for &id in &created {
        members.insert(id);
    }
    let descriptor = GroupDescriptor {
        alias: spec.alias.clone(),
        quoted: false,
        members,
        user_aux: Some("-".into()),
    };
    device.set_aux(first, &descriptor.to_string())?;
    group::crash_point("grouped");
    for &id in &created[1..] {
        device.set_aux(id, "-")?;
    }
    Ok(first)
}

fn undo(device: &StatsDevice, created: &[u64]) {
    for &id in created {
        let _ = device.delete(id);
    }
}

/// The group mapping a file: a group whose every member lies inside the file's extents.
pub fn find_for_file(regions: &[Region], extents: &[SectorRange]) -> anyhow::Result<Option<u64>> {
    let inside = |r: &SectorRange| {
        extents
            .iter()
            .any(|e| e.start <= r.start && r.end() <= e.end())
    };
    for leader in regions {
        let Some(descriptor) = leader.group()? else {
            continue;
        };
        if descriptor.leader() != Some(leader.id) {
            continue;
        }
        let members: Vec<&Region> = regions
            .iter()
            .filter(|r| descriptor.members.contains(r.id))
            .collect();
        if !members.is_empty() && members.iter().all(|r| inside(&r.range)) {
            return Ok(Some(leader.id));
        }
    }
    Ok(None)
}

/// Clears the markers a `map` killed after its switch left on the group's members.
pub fn finish(device: &StatsDevice, regions: &[Region], group_id: u64) -> anyhow::Result<()> {
    let pending = group::pending_marker(group_id);
    for region in regions.iter().filter(|r| r.aux_data == pending) {
        device.set_aux(region.id, "-")?;
    }
    Ok(())
}

/// Deletes a group: its other members first, the leader (which names them) last, so that a
/// run killed half-way leaves a group that another `unmap` finds and finishes.
pub fn delete(device: &StatsDevice, regions: &[Region], group_id: u64) -> anyhow::Result<usize> {
    let leader = regions
        .iter()
        .find(|r| r.id == group_id)
        .with_context(|| format!("no region {group_id}"))?;
    let descriptor = leader
        .group()?
        .with_context(|| format!("region {group_id} leads no group"))?;
    let mut deleted = 0;
    for region in regions
        .iter()
        .filter(|r| r.id != group_id && descriptor.members.contains(r.id))
    {
        device.delete(region.id)?;
        deleted += 1;
    }
    group::crash_point("unmapping");
    device.delete(group_id)?;
    Ok(deleted + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::region::parse_list;

    #[test]
    fn a_file_is_mapped_by_the_group_whose_members_all_lie_in_its_extents() {
        let regions = parse_list(
            "0: 100+8 8 dmstats DMS_GROUP=a:0,2#-\n1: 300+8 8 dmstats -\n2: 200+8 8 dmstats -\n\
             3: 500+8 8 dmstats DMS_GROUP=b:3-4#-\n4: 600+8 8 dmstats -\n",
        )
        .unwrap();
        let extents = |list: &[(u64, u64)]| -> Vec<SectorRange> {
            list.iter().map(|&(s, l)| SectorRange::new(s, l)).collect()
        };
        assert_eq!(
            find_for_file(&regions, &extents(&[(100, 8), (200, 16)])).unwrap(),
            Some(0)
        );
        assert_eq!(
            find_for_file(&regions, &extents(&[(496, 200)])).unwrap(),
            Some(3)
        );
        // A user's region inside the extents (1) makes no group; half a group is not the file's.
        assert_eq!(
            find_for_file(&regions, &extents(&[(300, 8)])).unwrap(),
            None
        );
        assert_eq!(
            find_for_file(&regions, &extents(&[(100, 8)])).unwrap(),
            None
        );
        assert_eq!(find_for_file(&regions, &[]).unwrap(), None);
    }

    #[test]
    fn the_markers_name_the_file_and_the_first_region() {
        let file = FileId {
            st_dev: 2049,
            ino: 12,
        };
        assert_eq!(mapping_marker(file), "DMS_FILEMAPD_MAPPING=2049:12");
        assert_eq!(group::pending_marker(7), "DMS_FILEMAPD_PENDING=7");
    }
}
