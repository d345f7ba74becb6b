//! A filemap group on a device, and bringing its regions in line with a file's extents.
//!
//! Kill-safety. The kernel gives a new region the lowest free id and libdm leaves members'
//! aux_data `-`, so a region created but not yet listed in the descriptor would look like any
//! user's region if we died right then. So every region in transit carries a marker in its
//! aux_data:
//! 1. create the arrivals already marked `DMS_FILEMAPD_PENDING=<group>`; mark the leavers
//!    `DMS_FILEMAPD_PENDING=<new leader>`;
//! 2. write the new descriptor (one message: the switch);
//! 3. delete the leavers; clear the arrivals' markers.
//!
//! When the leader itself leaves, the descriptor moves to the new lowest member (as in lvm2,
//! the group id changes). Step 2 is then two messages: the old leader first records the whole
//! new descriptor as `DMS_FILEMAPD_MOVED=<alias>:<members>#<aux>` (which dissolves the old group
//! and names its successor), then the new leader gets the descriptor. Killed anywhere, the next
//! pass finds the markers: a MOVED old leader is followed (and the move finished), marked
//! regions outside the group are ours and get deleted, marked members get planned again.
use anyhow::{Context as _, bail};

use crate::{
    dmstats::{GroupDescriptor, Region, RegionSettings, StatsDevice},
    reconcile::{self, Mapping},
    sectors::SectorRange,
};

const PENDING_TAG: &str = "DMS_FILEMAPD_PENDING=";
const MOVED_TAG: &str = "DMS_FILEMAPD_MOVED=";

/// For the kill-safety tests only: `FILEMAPD_TEST_CRASH_AT=<point>` aborts the process at that
/// point of an update, as a kill would.
fn crash_point(point: &str) {
    if std::env::var_os("FILEMAPD_TEST_CRASH_AT").is_some_and(|p| p == point) {
        log::warn!("FILEMAPD_TEST_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

fn pending_marker(group_id: u64) -> String {
    format!("{PENDING_TAG}{group_id}")
}

/// The group a region in transit belongs to: the group named by a PENDING marker, or the
/// successor named by a MOVED marker.
fn pending_for(region: &Region) -> Option<u64> {
    if let Some(id) = region.aux_data.strip_prefix(PENDING_TAG) {
        return id.parse().ok();
    }
    moved_to(region)?.leader()
}

/// The descriptor a retired leader handed on, if it carries one.
fn moved_to(region: &Region) -> Option<GroupDescriptor> {
    let rest = region.aux_data.strip_prefix(MOVED_TAG)?;
    GroupDescriptor::parse(&format!("DMS_GROUP={rest}"))
        .ok()
        .flatten()
}

fn moved_marker(descriptor: &GroupDescriptor) -> String {
    let text = descriptor.to_string();
    format!(
        "{MOVED_TAG}{}",
        text.strip_prefix("DMS_GROUP=").unwrap_or(&text)
    )
}

/// A group as listed now: its leader's descriptor and settings, and its member regions.
#[derive(Clone, Debug)]
pub struct Group {
    pub id: u64,
    pub descriptor: GroupDescriptor,
    pub program_id: String,
    pub settings: RegionSettings,
    pub members: Vec<Region>,
    /// Regions outside the group marked pending for it (left by an interrupted update).
    pub strays: Vec<Region>,
}

/// What an update did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub created: usize,
    pub deleted: usize,
    /// The group as the update left it, as a fresh listing would show it (as long as no other
    /// process changed regions meanwhile). Its id changes when the leader's extent went away.
    pub group: Group,
}

impl Group {
    /// Finds group `group_id` among `regions`; `None` when it no longer exists.
    pub fn find(regions: &[Region], group_id: u64) -> anyhow::Result<Option<Group>> {
        let Some(leader) = regions.iter().find(|r| r.id == group_id) else {
            return Ok(None);
        };
        let Some(descriptor) = leader.group()? else {
            return Ok(None);
        };
        if descriptor.leader() != Some(group_id) {
            return Ok(None);
        }
        log::debug!("Found group_id {group_id}: alias=\"{}\"", descriptor.alias);
        let members: Vec<Region> = regions
            .iter()
            .filter(|r| descriptor.members.binary_search(&r.id).is_ok())
            .cloned()
            .collect();
        let strays = regions
            .iter()
            .filter(|r| pending_for(r) == Some(group_id))
            .filter(|r| descriptor.members.binary_search(&r.id).is_err())
            .cloned()
            .collect();
        Ok(Some(Group {
            id: group_id,
            program_id: leader.program_id.clone(),
            settings: leader.settings.clone(),
            descriptor,
            members,
            strays,
        }))
    }

    /// Lists the device and finds the group, following (and finishing) a leader move.
    pub fn load(device: &StatsDevice, group_id: u64) -> anyhow::Result<Option<Group>> {
        Self::load_from(device, &device.list(None)?, group_id)
    }

    /// [`Group::load`] from a listing already taken (one listing can serve many groups).
    pub fn load_from(
        device: &StatsDevice,
        regions: &[Region],
        group_id: u64,
    ) -> anyhow::Result<Option<Group>> {
        let Some(old) = regions.iter().find(|r| r.id == group_id) else {
            return Ok(None);
        };
        if let Some(descriptor) = moved_to(old) {
            let Some(new_id) = descriptor.leader() else {
                return Ok(None);
            };
            log::info!("group_id changed from {group_id} to {new_id}");
            let successor = regions.iter().find(|r| r.id == new_id);
            if successor.is_some_and(|r| !matches!(r.group(), Ok(Some(_)))) {
                log::info!("finishing the interrupted move of group {group_id} to {new_id}");
                device.set_aux(new_id, &descriptor.to_string())?;
                return Group::load(device, new_id);
            }
            return Group::find(regions, new_id);
        }
        Group::find(regions, group_id)
    }

    /// Changes the group's regions to cover `extents`; regions outside the group are never
    /// touched. On a failure half-way, the regions created so far are deleted again.
    /// Consumes the group (it may have thousands of members): the outcome carries it on.
    pub fn update(
        self,
        device: &StatsDevice,
        extents: &[SectorRange],
        mapping: Mapping,
    ) -> anyhow::Result<Outcome> {
        let members: Vec<(u64, SectorRange)> =
            self.members.iter().map(|r| (r.id, r.range)).collect();
        let plan = reconcile::plan(&members, extents, mapping);
        let marker = pending_marker(self.id);
        let mut deleted = 0;

        for stray in &self.strays {
            device
                .delete(stray.id)
                .with_context(|| format!("deleting stray region {}", stray.id))?;
            deleted += 1;
        }
        // Kept members still marked from an interrupted pass.
        let mut unmarked = Vec::new();
        for region in self
            .members
            .iter()
            .filter(|r| r.id != self.id && pending_for(r).is_some())
        {
            if plan.keep.binary_search(&region.id).is_ok() {
                device.set_aux(region.id, "-")?;
                unmarked.push(region.id);
            }
        }
        if plan.is_noop() {
            return Ok(Outcome {
                created: 0,
                deleted,
                group: self.into_left(&unmarked),
            });
        }
        if plan.keep.is_empty() && plan.create.is_empty() {
            bail!(
                "the file has no extents: nothing to keep the group {} on",
                self.id
            );
        }

        // 1. Create the arrivals, marked for this group; then mark the leavers for the group
        //    as it will be (the leader keeps its descriptor until the switch).
        let mut created = Vec::with_capacity(plan.create.len());
        for &range in &plan.create {
            match device.create(range, &self.settings, &self.program_id, &marker) {
                Ok(id) => created.push(id),
                Err(e) => {
                    for &id in &created {
                        let _ = device.delete(id);
                    }
                    return Err(e.context(format!(
                        "creating a region for {range} in group {}",
                        self.id
                    )));
                }
            }
        }
        let mut new_members = plan.keep.clone();
        new_members.extend(&created);
        let descriptor = self.descriptor.with_members(new_members);
        let leader = descriptor
            .leader()
            .expect("a group with regions has a leader");
        for &id in plan.delete.iter().filter(|&&id| id != self.id) {
            device.set_aux(id, &pending_marker(leader))?;
        }
        crash_point("created");

        // 2. The switch. A moving group first hands the new descriptor to its old leader
        //    (dissolving the old group), then installs it on the new leader.
        if leader != self.id {
            device.set_aux(self.id, &moved_marker(&descriptor))?;
            log::info!("group_id changed from {} to {leader}", self.id);
            crash_point("switched");
        }
        device.set_aux(leader, &descriptor.to_string())?;

        // 3. Remove the leavers, unmark the arrivals.
        for &id in &plan.delete {
            device
                .delete(id)
                .with_context(|| format!("deleting region {id}"))?;
        }
        crash_point("deleted");
        for &id in created.iter().filter(|&&id| id != leader) {
            device.set_aux(id, "-")?;
        }

        // What the device now holds, as a listing would show it.
        let old_id = self.id;
        let mut after = self.into_left(&unmarked);
        after
            .members
            .retain(|r| plan.keep.binary_search(&r.id).is_ok());
        after.members.extend(
            created
                .iter()
                .zip(&plan.create)
                .map(|(&id, &range)| Region {
                    id,
                    range,
                    step: range.len,
                    program_id: after.program_id.clone(),
                    aux_data: "-".to_string(),
                    settings: after.settings.clone(),
                }),
        );
        after.members.sort_unstable_by_key(|r| r.id);
        if leader != old_id {
            after.relabel(old_id, &moved_marker(&descriptor));
        }
        after.relabel(leader, &descriptor.to_string());
        after.id = leader;
        after.descriptor = descriptor;
        Ok(Outcome {
            created: created.len(),
            deleted: deleted + plan.delete.len(),
            group: after,
        })
    }

    /// The group after its strays were deleted and `unmarked` members relabelled `-`.
    fn into_left(mut self, unmarked: &[u64]) -> Group {
        self.strays.clear();
        for &id in unmarked {
            self.relabel(id, "-");
        }
        self
    }

    /// Notes a member's new aux_data.
    fn relabel(&mut self, id: u64, aux_data: &str) {
        if let Some(region) = self.members.iter_mut().find(|r| r.id == id) {
            region.aux_data = aux_data.to_string();
        }
    }
}
