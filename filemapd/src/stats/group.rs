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
//! What each step costs, in dm messages: an isolated growth (one arrival, nobody leaves) is
//! three, the fewest that keep it safe: the `@stats_create` that carries its marker (a region
//! must never exist unmarked outside the descriptor), the descriptor's `@stats_set_aux` (the
//! switch), and the arrival's unmarking (a member left marked would, after a user's
//! `dmstats ungroup`, look like a stray of a later group with the same leader id, and be
//! deleted). Each leaver adds a mark and a delete; a fuse adds one `@stats_print` per kept
//! region not yet known to have counted IO, asked once its successor exists. The reconciler
//! fuses only extents past their tile budget (reconcile::TILES_PER_EXTENT), so most growths
//! are the three.
//!
//! When the leader itself leaves, the descriptor moves to the new lowest member (as in lvm2,
//! the group id changes). Step 2 is then two messages: the old leader first records the whole
//! new descriptor as `DMS_FILEMAPD_MOVED=<alias>:<members>#<aux>` (which dissolves the old group
//! and names its successor), then the new leader gets the descriptor. Killed anywhere, the next
//! pass finds the markers: a MOVED old leader is followed (and the move finished; also when
//! the daemon is restarted with the successor's id), marked regions outside the group are ours
//! and get deleted, marked members get planned again.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    reconcile::{Piece, Plan},
    sectors::SectorRange,
    stats::{GroupDescriptor, Region, RegionSettings, StatsDevice},
};

const PENDING_TAG: &str = "DMS_FILEMAPD_PENDING=";
const MOVED_TAG: &str = "DMS_FILEMAPD_MOVED=";

/// For the kill-safety tests only: `FILEMAPD_TEST_CRASH_AT=<point>` aborts the process at that
/// point of an update, as a kill would.
pub(crate) fn crash_point(point: &str) {
    if std::env::var_os("FILEMAPD_TEST_CRASH_AT").is_some_and(|p| p == point) {
        log::warn!("FILEMAPD_TEST_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

pub(crate) fn pending_marker(group_id: u64) -> String {
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

/// A group as listed now: its leader's descriptor and settings, and its member regions,
/// indexed by id and by place so that a pass touches only the regions near a change.
#[derive(Clone, Debug)]
pub struct Group {
    pub id: u64,
    pub descriptor: GroupDescriptor,
    pub program_id: String,
    pub settings: RegionSettings,
    members: BTreeMap<u64, Region>,
    /// The members by place: (range, id).
    by_place: BTreeSet<(SectorRange, u64)>,
    /// Regions outside the group marked pending for it (left by an interrupted update).
    pub strays: Vec<Region>,
    /// Members found to have counted IO: they never fuse, and counters only grow, so one
    /// `@stats_print` each is enough.
    busy: BTreeSet<u64>,
}

/// What an update did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub created: usize,
    pub deleted: usize,
    /// Regions that left because a longer one took their place (they had counted nothing).
    pub fused: usize,
    /// Time spent in `@stats_create`, during which the device was suspended.
    pub creating: Duration,
    /// The `@stats_*` messages the update sent.
    pub messages: u64,
    /// The group as the update left it, as a fresh listing would show it (as long as no other
    /// process changed regions meanwhile). Its id changes when the leader's extent went away.
    pub group: Group,
}

/// Whether a region has counted nothing yet (all of `@stats_print`'s counters zero), so that
/// replacing it loses nothing.
fn counted_nothing(device: &StatsDevice, id: u64) -> anyhow::Result<bool> {
    Ok(device.counters(id)? == Default::default())
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
        let mut group = Group {
            id: group_id,
            program_id: leader.program_id.clone(),
            settings: leader.settings.clone(),
            members: BTreeMap::new(),
            by_place: BTreeSet::new(),
            strays: Vec::new(),
            busy: BTreeSet::new(),
            descriptor,
        };
        for region in regions {
            if group.descriptor.members.contains(region.id) {
                group.add(region.clone());
            } else if pending_for(region) == Some(group_id) {
                group.strays.push(region.clone());
            }
        }
        Ok(Some(group))
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
        // Asked for by the successor's id before the move was finished (killed between the
        // MOVED marker and the new descriptor): the successor still carries its arrival
        // marker, naming the old leader, whose MOVED marker names it. Finish the move.
        let retired = old
            .aux_data
            .strip_prefix(PENDING_TAG)
            .and_then(|id| id.parse::<u64>().ok())
            .and_then(|id| regions.iter().find(|r| r.id == id));
        if let Some(retired) = retired
            && moved_to(retired).and_then(|d| d.leader()) == Some(group_id)
        {
            return Self::load_from(device, regions, retired.id);
        }
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

    /// The member regions, in id order.
    pub fn members(&self) -> impl Iterator<Item = &Region> {
        self.members.values()
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Every member as (id, range), for a plan of the whole file.
    pub fn places(&self) -> Vec<(u64, SectorRange)> {
        self.by_place
            .iter()
            .map(|&(range, id)| (id, range))
            .collect()
    }

    /// The members overlapping any of `ranges`, as (id, range): O(k log n) for k found.
    /// Members of a consistent group do not overlap, so walking back from a range's end stops
    /// at the first member that ends before the range starts.
    pub fn places_near(&self, ranges: &[SectorRange]) -> Vec<(u64, SectorRange)> {
        let mut found = BTreeMap::new();
        for range in ranges {
            let upto = (SectorRange::new(range.end(), 0), 0);
            for &(place, id) in self.by_place.range(..upto).rev() {
                if place.end() <= range.start {
                    break;
                }
                found.insert(id, place);
            }
        }
        found.into_iter().collect()
    }

    /// Whether the members together cover every sector of `range`.
    pub fn covers(&self, range: SectorRange) -> bool {
        let mut places: Vec<SectorRange> = self
            .places_near(&[range])
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        places.sort_unstable();
        let mut reached = range.start;
        for place in places {
            if place.start > reached {
                break;
            }
            reached = reached.max(place.end());
        }
        reached >= range.end()
    }

    fn add(&mut self, region: Region) {
        self.by_place.insert((region.range, region.id));
        self.members.insert(region.id, region);
    }

    fn remove(&mut self, id: u64) {
        if let Some(region) = self.members.remove(&id) {
            self.by_place.remove(&(region.range, id));
        }
        self.busy.remove(&id);
    }

    /// Whether member `id` may be taken as idle until asked: it does not lead the group
    /// (replacing the leader would change the group's id at every growth) and has not been
    /// found to have counted IO.
    fn may_be_idle(&self, id: u64) -> bool {
        id != self.id && !self.busy.contains(&id)
    }

    /// Asks the kernel whether member `id` has counted nothing yet (once per member, until it
    /// has: counters only grow).
    fn found_idle(&mut self, device: &StatsDevice, id: u64) -> anyhow::Result<bool> {
        let idle = counted_nothing(device, id)?;
        if !idle {
            self.busy.insert(id);
        }
        Ok(idle)
    }

    /// The parts of a fuse run that become regions, each member not found busy taken as idle.
    fn fuse_parts(&self, run: &[Piece]) -> Vec<FusePart> {
        fuse_parts(run, |id| self.may_be_idle(id))
    }

    /// Creates the plan's arrivals, marked `marker`: a region for each new extent, and the
    /// longer regions of its fuse runs. Those are made first, each member they replace taken
    /// as idle, and the members are asked only then (see [`Group::apply`]); a member found
    /// busy splits its run again: the longer region made over it goes, the parts beside it
    /// are made. On a failure, every region made here is deleted again.
    fn create_arrivals(
        &mut self,
        device: &StatsDevice,
        plan: &Plan,
        marker: &str,
    ) -> anyhow::Result<Arrivals> {
        let mut arrivals = Arrivals::default();
        match self.try_create_arrivals(device, plan, marker, &mut arrivals) {
            Ok(()) => Ok(arrivals),
            Err(e) => {
                for &id in &arrivals.ids {
                    let _ = device.delete(id);
                }
                Err(e)
            }
        }
    }

    fn try_create_arrivals(
        &mut self,
        device: &StatsDevice,
        plan: &Plan,
        marker: &str,
        arrivals: &mut Arrivals,
    ) -> anyhow::Result<()> {
        let mut runs: Vec<Vec<FusePart>> =
            plan.fuse.iter().map(|run| self.fuse_parts(run)).collect();
        let spans = runs.iter().flatten().map(|part| part.span);
        for range in plan.create.iter().copied().chain(spans) {
            arrivals.create(device, self, range, marker)?;
        }
        for (run, parts) in plan.fuse.iter().zip(&mut runs) {
            let mut split = false;
            for id in parts.iter().flat_map(|part| part.absorbed.iter().copied()) {
                split |= !self.found_idle(device, id)?;
            }
            if split {
                log::debug!(
                    "a fuse run of group {} held a busy region: split again",
                    self.id
                );
                let fresh = self.fuse_parts(run);
                for part in parts.iter().filter(|&part| !fresh.contains(part)) {
                    arrivals.delete(device, part.span)?;
                }
                for part in fresh.iter().filter(|&part| !parts.contains(part)) {
                    arrivals.create(device, self, part.span, marker)?;
                }
                *parts = fresh;
            }
        }
        arrivals.absorbed = runs
            .into_iter()
            .flatten()
            .flat_map(|part| part.absorbed)
            .collect();
        Ok(())
    }

    /// Carries out `plan` (whose ids must all be members); regions outside the group are never
    /// touched. On a failure half-way, the regions created so far are deleted again. Consumes
    /// the group (it may have thousands of members): the outcome carries it on, changed in
    /// O(plan · log n).
    pub fn apply(mut self, device: &StatsDevice, plan: &Plan) -> anyhow::Result<Outcome> {
        let sent_before = super::device::messages_sent();
        let marker = pending_marker(self.id);
        let mut deleted = 0;

        for stray in std::mem::take(&mut self.strays) {
            device
                .delete(stray.id)
                .with_context(|| format!("deleting stray region {}", stray.id))?;
            deleted += 1;
        }
        // Kept members still marked from an interrupted pass.
        let marked: Vec<u64> = plan
            .keep
            .iter()
            .copied()
            .filter(|&id| id != self.id)
            .filter(|id| {
                self.members
                    .get(id)
                    .is_some_and(|r| pending_for(r).is_some())
            })
            .collect();
        for id in marked {
            device.set_aux(id, "-")?;
            self.relabel(id, "-");
        }
        if plan.is_noop() {
            return Ok(Outcome {
                created: 0,
                deleted,
                fused: 0,
                creating: Duration::ZERO,
                messages: super::device::messages_sent() - sent_before,
                group: self,
            });
        }

        // Fuse runs: the kept regions of a run that have counted nothing leave, and one new
        // region covers them with the gaps beside them; a region that has counted something
        // (or leads the group: replacing it would change the group's id at every growth)
        // stays and splits the run. The longer region is made first, and the regions it
        // replaces are asked whether they counted anything only then: one that had not has
        // had its successor counting beside it all along, so no IO leaves the regions' view
        // (IO to both until it goes is kept by the successor), and no question stands between
        // an allocation and the region that covers it. One found busy after all splits its
        // run again: the longer region made over it goes, and what that counted over the gaps
        // meanwhile leaves the regions' view (not the kernel's counters, which count every IO
        // of the file).
        for id in &plan.delete {
            if let Some(region) = self.members.get(id) {
                log::debug!("region {id} at {} leaves group {}", region.range, self.id);
            }
        }

        // 1. Create the arrivals, marked for this group; then mark the leavers for the group
        //    as it will be (the leader keeps its descriptor until the switch).
        let arrivals = self.create_arrivals(device, plan, &marker)?;
        let mut leaving = plan.delete.clone();
        leaving.extend(&arrivals.absorbed);
        let fused = arrivals.absorbed.len();
        leaving.sort_unstable();
        let (create, created, creating) = (arrivals.ranges, arrivals.ids, arrivals.creating);
        let survivors = self.members.len() - leaving.len();
        if survivors == 0 && create.is_empty() {
            bail!(
                "the file has no extents: nothing to keep the group {} on",
                self.id
            );
        }
        let mut members = self.descriptor.members.clone();
        for id in &leaving {
            members.remove(*id);
        }
        members.extend(created.iter().copied());
        let descriptor = self.descriptor.with_members(members);
        let leader = descriptor
            .leader()
            .expect("a group with regions has a leader");
        for &id in leaving.iter().filter(|&&id| id != self.id) {
            device.set_aux(id, &pending_marker(leader))?;
        }
        crash_point("created");

        // 2. The switch. A moving group first hands the new descriptor to its old leader
        //    (dissolving the old group), then installs it on the new leader.
        let old_id = self.id;
        if leader != old_id {
            device.set_aux(old_id, &moved_marker(&descriptor))?;
            log::info!("group_id changed from {old_id} to {leader}");
            crash_point("switched");
        }
        device.set_aux(leader, &descriptor.to_string())?;

        // 3. Remove the leavers, unmark the arrivals. (A fused region's IO since its check
        //    was counted by its successor too.)
        for &id in &leaving {
            device
                .delete(id)
                .with_context(|| format!("deleting region {id}"))?;
        }
        crash_point("deleted");
        for &id in created.iter().filter(|&&id| id != leader) {
            device.set_aux(id, "-")?;
        }
        // A retired leader that stays a member (a new region took a lower id) drops its MOVED
        // marker: the new leader holds the descriptor now.
        let retired_member = leader != old_id && !leaving.contains(&old_id);
        if retired_member {
            device.set_aux(old_id, "-")?;
        }

        // What the device now holds, as a listing would show it.
        for &id in &leaving {
            self.remove(id);
        }
        for (&id, &range) in created.iter().zip(&create) {
            self.add(Region {
                id,
                range,
                step: range.len,
                program_id: self.program_id.clone(),
                aux_data: "-".to_string(),
                settings: self.settings.clone(),
            });
        }
        if retired_member {
            self.relabel(old_id, "-");
        }
        self.relabel(leader, &descriptor.to_string());
        self.id = leader;
        self.descriptor = descriptor;
        Ok(Outcome {
            created: created.len(),
            deleted: deleted + leaving.len(),
            fused,
            creating,
            messages: super::device::messages_sent() - sent_before,
            group: self,
        })
    }

    /// Notes a member's new aux_data.
    fn relabel(&mut self, id: u64, aux_data: &str) {
        if let Some(region) = self.members.get_mut(&id) {
            region.aux_data = aux_data.to_string();
        }
    }
}

/// One part of a fuse run that becomes one region: its span, and the kept regions it replaces.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FusePart {
    span: SectorRange,
    absorbed: Vec<u64>,
}

/// The parts of a fuse run that become regions when the kept regions for which `joins` holds
/// join the gaps beside them: a kept region that does not join splits the run, and a part of
/// kept regions alone (no gap) stays as it is.
fn fuse_parts(run: &[Piece], joins: impl Fn(u64) -> bool) -> Vec<FusePart> {
    let mut parts = Vec::new();
    let mut part: Option<(SectorRange, bool)> = None; // (span, holds a gap)
    let mut absorbed = Vec::new();
    let mut end_part = |part: &mut Option<(SectorRange, bool)>, absorbed: &mut Vec<u64>| {
        if let Some((span, true)) = part.take() {
            parts.push(FusePart {
                span,
                absorbed: std::mem::take(absorbed),
            });
        }
        absorbed.clear();
    };
    for piece in run {
        if let Piece::Kept(id, _) = *piece {
            if !joins(id) {
                end_part(&mut part, &mut absorbed);
                continue;
            }
            absorbed.push(id);
        }
        let range = piece.range();
        part = Some(match part {
            None => (range, matches!(piece, Piece::Gap(_))),
            Some((span, gap)) => (
                SectorRange::new(span.start, range.end() - span.start),
                gap || matches!(piece, Piece::Gap(_)),
            ),
        });
    }
    end_part(&mut part, &mut absorbed);
    parts
}

/// The regions an update made, in the order made: ranges and ids side by side.
#[derive(Default)]
struct Arrivals {
    ranges: Vec<SectorRange>,
    ids: Vec<u64>,
    /// The members the longer ones replace.
    absorbed: Vec<u64>,
    /// Time spent in `@stats_create`, during which the device was suspended.
    creating: Duration,
}

impl Arrivals {
    fn create(
        &mut self,
        device: &StatsDevice,
        group: &Group,
        range: SectorRange,
        marker: &str,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let made = device.create(range, &group.settings, &group.program_id, marker);
        self.creating += started.elapsed();
        let id =
            made.with_context(|| format!("creating a region for {range} in group {}", group.id))?;
        self.ranges.push(range);
        self.ids.push(id);
        Ok(())
    }

    /// Deletes the arrival made over `range` (marked, so safe at any point).
    fn delete(&mut self, device: &StatsDevice, range: SectorRange) -> anyhow::Result<()> {
        let at = self
            .ranges
            .iter()
            .position(|&r| r == range)
            .expect("only an arrival made is deleted");
        let id = self.ids[at];
        device
            .delete(id)
            .with_context(|| format!("deleting region {id}, made over a busy region"))?;
        self.ranges.remove(at);
        self.ids.remove(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::region::parse_list;

    #[test]
    fn a_fuse_run_splits_at_the_regions_that_do_not_join() {
        let kept = |id, start| Piece::Kept(id, SectorRange::new(start, 8));
        let gap = |start| Piece::Gap(SectorRange::new(start, 8));
        let run = [kept(1, 0), gap(8), kept(2, 16), gap(24), kept(3, 32)];
        assert_eq!(
            fuse_parts(&run, |_| true),
            vec![FusePart {
                span: SectorRange::new(0, 40),
                absorbed: vec![1, 2, 3]
            }]
        );
        assert_eq!(
            fuse_parts(&run, |id| id != 2),
            vec![
                FusePart {
                    span: SectorRange::new(0, 16),
                    absorbed: vec![1]
                },
                FusePart {
                    span: SectorRange::new(24, 16),
                    absorbed: vec![3]
                }
            ]
        );
        // Kept regions alone, with no gap between them, make nothing new.
        assert_eq!(
            fuse_parts(&[kept(1, 0), kept(2, 8), gap(16)], |id| id == 1),
            vec![FusePart {
                span: SectorRange::new(16, 8),
                absorbed: vec![]
            }]
        );
        assert_eq!(fuse_parts(&[kept(1, 0), kept(2, 8)], |_| true), vec![]);
    }

    #[test]
    fn finds_a_groups_members_and_strays_and_ignores_other_regions() {
        let regions = parse_list(
            "0: 100+8 8 dmstats DMS_GROUP=f:0,2#-\n1: 300+8 8 dmstats -\n2: 200+8 8 dmstats -\n\
             3: 400+8 8 dmstats DMS_FILEMAPD_PENDING=0\n",
        )
        .unwrap();
        let group = Group::find(&regions, 0).unwrap().unwrap();
        assert_eq!(group.descriptor.alias, "f");
        assert_eq!(
            group.members().map(|r| r.id).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(
            group.strays.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(
            group.places_near(&[SectorRange::new(196, 8)]),
            vec![(2, SectorRange::new(200, 8))]
        );
        assert!(
            Group::find(&regions, 1).unwrap().is_none(),
            "region 1 leads no group"
        );
        assert!(Group::find(&regions, 7).unwrap().is_none(), "no region 7");
    }
}
