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
    sectors::{SectorRange, join_adjacent},
    stats::{Group, group::FuseShadow},
};

/// How much older than a pass's reading of the file a piece of the uncovered set must be for
/// the pass to drop it as given back.
const PIECE_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// What a pass read of the file's place on the device.
enum Looked {
    /// Every merged device range of the file, read whole by this pass.
    Whole(Vec<SectorRange>),
    /// A changed stretch: its ranges before and after.
    Stretch {
        before: Vec<SectorRange>,
        after: Vec<SectorRange>,
    },
}

impl Monitor {
    /// Maps the file and brings the group in line. Returns the group as it is now, or `None`
    /// when the file has no extents. `remembered`: the group is as the last update left it,
    /// so a change that events confined to a stretch of the file is planned there alone.
    pub(super) fn update(
        &mut self,
        group: Group,
        remembered: bool,
    ) -> anyhow::Result<Option<Group>> {
        self.tally.passes += 1;
        self.regions_changed = false;
        // Pieces of the uncovered set recorded after this instant may be missing from the
        // reading: the tidy after the pass leaves them be.
        let read_at = crate::wake::ebpf::accounting::monotonic_ns();
        let span = if remembered { self.view.span() } else { None };
        let reading = self.view.read(&self.file, &self.path, remembered)?;
        self.settle();
        if self.view.map().is_empty() {
            return Ok(None);
        }
        // Where the file is now, over what this pass read afresh: the in-kernel accounting
        // drops pieces that lay there and no longer do (blocks given back). Only a whole read
        // is fresh everywhere: the map kept between stretches lacks allocations whose events
        // are still on their way.
        let fresh_whole = matches!(reading, Reading::Whole);
        let mut looked = Looked::Stretch {
            before: Vec::new(),
            after: Vec::new(),
        };
        let plan = match reading {
            Reading::Stretch(change) if change.unchanged => return Ok(Some(group)),
            Reading::Stretch(change) => {
                let mut near: Vec<SectorRange> = change.before.clone();
                near.extend(&change.after);
                let members = group.places_near(&near);
                looked = Looked::Stretch {
                    before: change.before.clone(),
                    after: change.after.clone(),
                };
                reconcile::plan_window(&members, &change.before, &change.after, self.mapping)
            }
            Reading::Whole => None,
        };
        let plan = match plan {
            Some(plan) => plan,
            None => {
                // Only the in-kernel accounting needs the ranges here (whole_plan makes its own).
                if fresh_whole && self.account().is_some() {
                    looked = Looked::Whole(self.view.map().device_ranges());
                }
                match self.whole_plan(&group) {
                    Some(plan) => plan,
                    None => return Ok(Some(group)),
                }
            }
        };
        // Only a pass that creates regions suspends the device: only it needs to know.
        let idle = plan.creations() > 0 && self.device_idle();
        let (plan, deferred) = plan.within(self.pacer.creation_allowance(Instant::now(), idle));
        let applying = Instant::now();
        let shadow = self
            .account()
            .zip(self.placement)
            .map(|(account, placement)| crate::wake::ebpf::FileShadow {
                account,
                dev: placement.dm_dev,
                block: 1 << placement.sector_shift,
            });
        let outcome = group.apply(
            &self.device,
            &plan,
            shadow.as_ref().map(|s| s as &dyn FuseShadow),
        )?;
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
        if outcome.created + outcome.deleted > 0 {
            info!(
                "Updated group {}: {} region(s), {} created, {} deleted",
                outcome.group.id,
                outcome.group.member_count(),
                outcome.created,
                outcome.deleted
            );
        }
        self.group_id = outcome.group.id;
        self.tidy_uncovered(&outcome.group, &looked, read_at);
        if trace::enabled() {
            let now = crate::wake::ebpf::accounting::monotonic_ns();
            trace::pass(trace::Pass {
                path: &self.path,
                number: self.tally.passes,
                read: match looked {
                    Looked::Stretch { .. } => span,
                    Looked::Whole(_) => None,
                },
                created: outcome.created,
                deleted: outcome.deleted,
                regions: outcome.group.member_count(),
                apply_us: applying.elapsed().as_micros(),
                event_to_region_us: self
                    .oldest_event_ns
                    .take()
                    .filter(|_| outcome.created > 0)
                    .map(|oldest| now.saturating_sub(oldest) / 1000),
            });
        }
        if cfg!(debug_assertions) && self.event_driven() {
            self.check_remembered(&outcome.group)?;
        }
        Ok(Some(outcome.group))
    }

    /// Drops the file's pieces of the in-kernel uncovered set that a region of the group now
    /// covers (made before the accounting knew of them) or that the file gave back.
    fn tidy_uncovered(&self, group: &Group, looked: &Looked, read_at: u64) {
        let Some(account) = self.account() else {
            return;
        };
        // Blocks past the end of the file are still the file's (no region covers them yet):
        // a piece is judged against them joined to the ranges they continue.
        let tails = self.view.tail_ranges();
        // (A file's blocks never overlap, so joining what touches is all it takes.)
        let with_tails =
            |ranges: &[SectorRange]| join_adjacent(ranges.iter().chain(&tails).copied().collect());
        let inside = |ranges: &[SectorRange], piece: SectorRange| {
            ranges
                .iter()
                .any(|r| r.start <= piece.start && piece.end() <= r.end())
        };
        let now = match looked {
            Looked::Whole(ranges) => with_tails(ranges),
            Looked::Stretch { after, .. } => with_tails(after),
        };
        // Only pieces recorded well before the reading can be judged by it (a margin over
        // the instant between a tracepoint and its extent showing in FIEMAP).
        let judged_before = read_at.saturating_sub(PIECE_MARGIN.as_nanos() as u64);
        let stale = |piece: SectorRange, born_ns: u64| {
            let gone = born_ns < judged_before
                && !inside(&now, piece)
                && match looked {
                    Looked::Whole(_) => true,
                    Looked::Stretch { before, .. } => before
                        .iter()
                        .any(|r| r.start < piece.end() && piece.start < r.end()),
                };
            let covered = group.covers(piece);
            if gone && !covered {
                debug!(
                    "{}: uncovered sectors {piece} given back (recorded {} ms before the read)",
                    self.path.display(),
                    read_at.saturating_sub(born_ns) / 1_000_000
                );
            }
            gone || covered
        };
        // A whole read judges every piece of the file; a stretch only those near it (the
        // pieces its own creations covered are gone already, see `CreationWitness`).
        let result = match (looked, self.placement) {
            (Looked::Stretch { before, .. }, Some(placement)) => {
                account.tidy_near(placement.dm_dev, before, stale)
            }
            _ => account.tidy(stale),
        };
        match result {
            Ok(0) => {}
            Ok(n) => debug!(
                "dropped {n} piece(s) of {} from the uncovered set",
                self.path.display()
            ),
            Err(e) => log::warn!(
                "tidying the uncovered set of {}: {e:#}",
                self.path.display()
            ),
        }
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
