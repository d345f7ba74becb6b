//! One pass: read what changed in the file, plan the regions near it (or the whole file),
//! carry the plan out, and decide whether to look again soon.
use std::time::Instant;

use anyhow::bail;
use log::{debug, info};

use super::{BACKLOG_PAUSE, Monitor, SETTLE, SETTLE_TRIES};
use crate::{
    daemon::trace,
    file::view::Reading,
    reconcile::{self, Plan},
    sectors::{SectorRange, difference},
    stats::{Group, new_group::GroupSpec},
    wake::ebpf::counting::{self, monotonic_ns},
};

impl Monitor {
    /// Maps the file and brings the group in line. Returns the group as it is now, or `None`
    /// when the file has no extents. `remembered`: the group is as the last update left it,
    /// so a change that events confined to a stretch of the file is planned there alone.
    pub(super) fn update(
        &mut self,
        group: Group,
        remembered: bool,
    ) -> anyhow::Result<Option<Group>> {
        let updated = self.update_group(group, remembered);
        self.forget_events_when_settled();
        updated
    }

    /// [`Monitor::update`] but for the events' wait, which every way out of it leaves alone.
    fn update_group(&mut self, group: Group, remembered: bool) -> anyhow::Result<Option<Group>> {
        self.tally.passes += 1;
        self.regions_changed = false;
        // Recordings after this instant may be missing from the reading: the kernel's sector
        // map keeps them.
        let read_at = counting::Reading::now();
        let span = if remembered { self.view.span() } else { None };
        let reading = self.view.read(&self.file, &self.path, remembered)?;
        self.settle();
        if self.view.map().is_empty() {
            // Kept only where a group like it is to come back (see `regroup_when_refilled`).
            self.emptied = self.regroup_when_refilled.then(|| {
                Box::new(GroupSpec {
                    alias: group.descriptor.alias.clone(),
                    program_id: group.program_id.clone(),
                    settings: group.settings.clone(),
                })
            });
            return Ok(None);
        }
        self.sync_kernel_map(read_at);
        let whole_read = matches!(reading, Reading::Whole);
        let plan = match reading {
            Reading::Stretch(change) if change.unchanged => return Ok(Some(group)),
            Reading::Stretch(change) => {
                let mut near: Vec<SectorRange> = change.before.clone();
                near.extend(&change.after);
                let members = group.places_near(&near);
                reconcile::plan_window(&members, &change.before, &change.after, self.mapping)
            }
            Reading::Whole => None,
        };
        let plan = match plan {
            Some(plan) => plan,
            None => match self.whole_plan(&group) {
                Some(plan) => plan,
                None => return Ok(Some(group)),
            },
        };
        // Only a pass that creates regions suspends the device: only it needs to know.
        let idle = plan.creations() > 0 && self.device_idle();
        let (plan, deferred) = plan.within(self.pacer.creation_allowance(Instant::now(), idle));
        let applying = Instant::now();
        let outcome = group.apply(&self.device, &plan)?;
        debug!(
            "applied a plan in {:?} ({:?} of it creating {} region(s){})",
            applying.elapsed(),
            outcome.creating,
            outcome.created,
            if idle { " on an idle device" } else { "" }
        );
        self.pacer
            .charge(outcome.created, outcome.creating, idle, Instant::now());
        if deferred {
            // The rest of the plan waits for the budgets: plan the whole file again then.
            self.tally.deferred += 1;
            self.view.note_unknown_change();
            self.recheck = Some((Instant::now() + BACKLOG_PAUSE, SETTLE_TRIES));
        }
        self.tally.created += outcome.created as u64;
        self.tally.deleted += outcome.deleted as u64;
        self.tally.fused += outcome.fused as u64;
        self.tally.dm_messages += outcome.messages;
        if outcome.created + outcome.deleted > 0 {
            info!(
                "Updated group {}: {} region(s), {} created, {} deleted",
                outcome.group.id,
                outcome.group.member_count(),
                outcome.created,
                outcome.deleted
            );
        }
        self.group_id = Some(outcome.group.id);
        if trace::enabled() {
            let now = monotonic_ns();
            trace::pass(trace::Pass {
                path: &self.path,
                number: self.tally.passes,
                read: if whole_read { None } else { span },
                created: outcome.created,
                deleted: outcome.deleted,
                regions: outcome.group.member_count(),
                dm_messages: outcome.messages,
                apply_us: applying.elapsed().as_micros(),
                event_to_region_us: (outcome.created > 0)
                    .then(|| self.oldest_event_ns.take())
                    .flatten()
                    .map(|oldest| now.saturating_sub(oldest) / 1000),
            });
        }
        if cfg!(debug_assertions) && self.event_driven() {
            self.check_remembered(&outcome.group)?;
        }
        Ok(Some(outcome.group))
    }

    /// A pass of a file without regions: read what changed, bring the kernel's map in line.
    pub(super) fn count_only_pass(&mut self) -> anyhow::Result<()> {
        self.tally.passes += 1;
        self.regions_changed = false;
        let read_at = counting::Reading::now();
        let span = self.view.span();
        let reading = self.view.read(&self.file, &self.path, true)?;
        self.settle();
        self.sync_kernel_map(read_at);
        if trace::enabled() {
            trace::pass(trace::Pass {
                path: &self.path,
                number: self.tally.passes,
                read: if matches!(reading, Reading::Whole) {
                    None
                } else {
                    span
                },
                created: 0,
                deleted: 0,
                regions: 0,
                dm_messages: 0,
                apply_us: 0,
                event_to_region_us: None,
            });
        }
        Ok(())
    }

    /// Brings the kernel's sector map in line with the file as this pass read it (at
    /// `read_at`): every block where the file's sectors changed since the last pass, where
    /// the kernel recorded allocations since, or (after lost events) where it holds any.
    pub(super) fn sync_kernel_map(&mut self, read_at: counting::Reading) {
        let Some(counted) = self.counted().cloned() else {
            return;
        };
        let version = self.view.map().placed_version();
        let map = &mut self.kernel_map;
        // Nothing moved, nothing recorded, nothing lost: the sync would change no block, and
        // its sweeps over every extent are what a large file's settling pass spent most on.
        if map.synced_version == Some(version) && map.recorded.is_empty() && !map.unknown {
            return;
        }
        let now = self.view.all_sectors();
        let mut over = difference(&map.synced, &now);
        over.extend(difference(&now, &map.synced));
        over.append(&mut map.recorded);
        if std::mem::take(&mut map.unknown) {
            over.extend(counted.held().iter().map(|h| h.range));
        }
        let changes = counted.sync(&over, &now, read_at);
        // Said when it changes: a file left without room is synced whole at every pass.
        let uncounted = changes.no_room as u64;
        if uncounted != self.tally.uncounted_runs {
            if uncounted > 0 {
                log::warn!(
                    "{}: the kernel's sector map has no room for {uncounted} run(s) of its sectors: their IO goes uncounted until room is made (kernel_map_extents sizes the map)",
                    self.path.display(),
                );
            } else {
                log::info!(
                    "{}: the kernel's sector map holds all of its sectors again",
                    self.path.display()
                );
            }
            self.tally.uncounted_runs = uncounted;
        }
        if changes.words > 0 {
            debug!(
                "{}: {} word(s) of the kernel's sector map changed",
                self.path.display(),
                changes.words
            );
        }
        // With no room, the next pass goes over all the file's sectors again.
        (map.synced, map.synced_version) = if changes.no_room > 0 {
            (Vec::new(), None)
        } else {
            (now, Some(version))
        };
        // Left for now (held by too recent a recording): the next pass judges them again.
        map.recorded.extend(changes.deferred);
    }

    /// Whether the device did no IO since the last look and has none in flight, so that
    /// suspending it for region creations holds up nobody.
    fn device_idle(&mut self) -> bool {
        let activity = self.device.io_activity();
        let last = std::mem::replace(&mut self.io_seen, activity.map(|(done, _)| done));
        matches!(activity, Some((done, 0)) if last == Some(done))
    }

    /// A plan over every extent and region; `None` while no extent has a place yet.
    fn whole_plan(&mut self, group: &Group) -> Option<Plan> {
        self.tally.whole_passes += 1;
        let ranges = self.view.map().device_ranges();
        if ranges.is_empty() {
            debug!("all extents of {} await allocation", self.path.display());
            return None;
        }
        Some(reconcile::plan(&group.places(), &ranges, self.mapping))
    }

    /// Debug builds (the tests): the group as an update says it left it must be what the
    /// kernel lists, or the event-driven mode, which lists only after others' changes, drifts.
    fn check_remembered(&self, remembered: &Group) -> anyhow::Result<()> {
        let listed = Group::load(&self.device, remembered.id)?;
        let fields = |g: &Group| -> Vec<(u64, SectorRange, String)> {
            g.members()
                .map(|r| (r.id, r.range, r.aux_data.clone()))
                .collect()
        };
        let listed = listed.as_ref().map(fields);
        if listed.as_ref() != Some(&fields(remembered)) {
            bail!(
                "group {} as remembered differs from the kernel's listing:\n  remembered {:?}\n  listed {:?}",
                remembered.id,
                fields(remembered),
                listed
            );
        }
        Ok(())
    }

    /// The events a pass answered wait for their region until a pass makes it: xfs shows a
    /// delayed allocation's blocks only after writeback, which a settling pass (no new
    /// event) may be the first to see. Once the file is settled, what made no region stops
    /// waiting, so that a later growth's wait starts at its own event. Called after every
    /// update, whichever way it ended.
    fn forget_events_when_settled(&mut self) {
        if self.recheck.is_none() {
            self.oldest_event_ns = None;
        }
    }

    /// Decides whether to look again soon after events: while their ranges have not shown
    /// placed in FIEMAP, for at most SETTLE_TRIES looks.
    fn settle(&mut self) {
        self.recheck = match self.recheck.take() {
            None => None,
            Some((_, 0)) => {
                if !self.view.unsettled().is_empty() {
                    debug!(
                        "event ranges {:?} never showed in FIEMAP; giving up on them",
                        self.view.unsettled()
                    );
                }
                None
            }
            // The first look after events is always followed by one more (removals fire before
            // the blocks go); after that, look again only while event ranges are outstanding.
            Some((_, tries)) if tries < SETTLE_TRIES && self.view.unsettled().is_empty() => None,
            Some((_, tries)) => Some((Instant::now() + SETTLE, tries - 1)),
        };
        if self.recheck.is_none() {
            self.view.forget_span();
        }
    }
}
