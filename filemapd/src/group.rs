//! A filemap group on a device, and bringing its regions in line with a file's extents.
//!
//! Kill-safety. The kernel gives a new region the lowest free id and libdm leaves members'
//! aux_data `-`, so a region created but not yet listed in the descriptor would look like any
//! user's region if we died right then. So every region we are about to add or remove carries
//! a marker, `DMS_FILEMAPD_PENDING=<group>`, while it is in transit:
//!   1. mark the regions to delete; create the new ones already marked;
//!   2. write the new descriptor (one message: the switch);
//!   3. delete the marked leavers; clear the markers of the new members.
//! Killed anywhere, the next pass finds marked regions: non-members marked for our group are
//! ours and get deleted; marked members are planned again and their markers cleared.
//! When the leader itself leaves, the descriptor moves to the new lowest member (as lvm2 does,
//! so the group id changes); between writing the new leader's descriptor and marking the old
//! leader (two consecutive messages) both descriptors exist. `load` recognises that state — a
//! group whose new members are all marked for ours — and finishes the move.
use anyhow::{Context as _, bail};

use crate::{
    dmstats::{GroupDescriptor, Region, RegionSettings, StatsDevice},
    reconcile,
    sectors::SectorRange,
};

const PENDING_TAG: &str = "DMS_FILEMAPD_PENDING=";

fn pending_marker(group_id: u64) -> String {
    format!("{PENDING_TAG}{group_id}")
}

/// The group id a region is marked pending for, if any.
fn pending_for(region: &Region) -> Option<u64> {
    region.aux_data.strip_prefix(PENDING_TAG)?.parse().ok()
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The group's id afterwards (changes when the leader's extent went away).
    pub group_id: u64,
    pub created: usize,
    pub deleted: usize,
}

impl Group {
    /// Finds group `group_id` among `regions`; `None` when it no longer exists.
    pub fn find(regions: &[Region], group_id: u64) -> anyhow::Result<Option<Group>> {
        let Some(leader) = regions.iter().find(|r| r.id == group_id) else { return Ok(None) };
        let Some(descriptor) = leader.group()? else { return Ok(None) };
        if descriptor.leader() != Some(group_id) {
            return Ok(None);
        }
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

    /// Lists the device and finds the group, finishing a leader move that was interrupted:
    /// if `group_id` is marked pending for group N, or another group lists only our members
    /// and regions marked for us, that group is the one to follow.
    pub fn load(device: &StatsDevice, group_id: u64) -> anyhow::Result<Option<Group>> {
        let regions = device.list(None)?;
        let Some(old) = regions.iter().find(|r| r.id == group_id) else { return Ok(None) };
        if let Some(new_id) = pending_for(old) {
            log::info!("group_id changed from {group_id} to {new_id}");
            return Group::find(&regions, new_id);
        }
        let Some(group) = Group::find(&regions, group_id)? else { return Ok(None) };
        for successor in regions.iter().filter(|r| r.id != group_id) {
            let Ok(Some(descriptor)) = successor.group() else { continue };
            let member = |id: &u64| group.descriptor.members.binary_search(id).is_ok();
            let ours = |id: &u64| member(id) || group.strays.iter().any(|s| s.id == *id);
            // Regions belong to one group at most, so a group made of our regions (and of its
            // new leader, unmarked by the switch) is our interrupted move. A new leader alone
            // cannot be told from a user's one-region group: that case is left alone.
            let moved = descriptor.leader() == Some(successor.id)
                && descriptor.members.iter().all(|id| *id == successor.id || ours(id))
                && descriptor.members.iter().any(|id| member(id));
            if moved {
                log::info!("finishing an interrupted move of group {group_id} to {}", successor.id);
                device.set_aux(group_id, &pending_marker(successor.id))?;
                return Group::load(device, successor.id);
            }
        }
        Ok(Some(group))
    }

    /// Changes the group's regions to equal `extents`; regions outside the group are never
    /// touched. On a failure half-way, the regions created so far are deleted again.
    pub fn update(&self, device: &StatsDevice, extents: &[SectorRange]) -> anyhow::Result<Outcome> {
        let members: Vec<(u64, SectorRange)> = self.members.iter().map(|r| (r.id, r.range)).collect();
        let plan = reconcile::plan(&members, extents);
        let marker = pending_marker(self.id);
        let mut outcome = Outcome { group_id: self.id, ..Outcome::default() };

        for stray in &self.strays {
            device.delete(stray.id).with_context(|| format!("deleting stray region {}", stray.id))?;
            outcome.deleted += 1;
        }
        // Kept members still marked from an interrupted pass.
        for region in self.members.iter().filter(|r| r.id != self.id && pending_for(r).is_some()) {
            if plan.keep.binary_search(&region.id).is_ok() {
                device.set_aux(region.id, "-")?;
            }
        }
        if plan.is_noop() {
            return Ok(outcome);
        }
        if plan.keep.is_empty() && plan.create.is_empty() {
            bail!("the file has no extents: nothing to keep the group {} on", self.id);
        }

        // 1. Mark leavers (the leader keeps its descriptor until the switch), create arrivals.
        for &id in plan.delete.iter().filter(|&&id| id != self.id) {
            device.set_aux(id, &marker)?;
        }
        let mut created = Vec::with_capacity(plan.create.len());
        for &range in &plan.create {
            match device.create(range, &self.settings, &self.program_id, &marker) {
                Ok(id) => created.push(id),
                Err(e) => {
                    for &id in &created {
                        let _ = device.delete(id);
                    }
                    return Err(e.context(format!("creating a region for {range} in group {}", self.id)));
                }
            }
        }

        // 2. The switch: one message makes the new member list the group.
        let mut new_members = plan.keep.clone();
        new_members.extend(&created);
        let descriptor = self.descriptor.with_members(new_members);
        let leader = descriptor.leader().expect("a group with regions has a leader");
        device.set_aux(leader, &descriptor.to_string())?;
        if leader != self.id {
            // The old leader leaves: from here on, only the new descriptor exists.
            device.set_aux(self.id, &pending_marker(leader))?;
            log::info!("group_id changed from {} to {leader}", self.id);
        }

        // 3. Remove the leavers, unmark the arrivals.
        for &id in &plan.delete {
            device.delete(id).with_context(|| format!("deleting region {id}"))?;
        }
        for &id in created.iter().filter(|&&id| id != leader) {
            device.set_aux(id, "-")?;
        }
        outcome.group_id = leader;
        outcome.created = created.len();
        outcome.deleted += plan.delete.len();
        Ok(outcome)
    }
}
