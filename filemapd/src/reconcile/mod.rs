//! The reconciler: a pure function from (the group's regions, the file's extents) to the
//! changes that make the regions cover the extents. No I/O here; the daemon applies the plan.
//!
//! Two mappings: `Exact` is lvm2's (one region per extent, so an extent that grows loses its
//! region and its counters); `Tiled` keeps every region that still lies inside an extent and
//! adds regions for the parts no region covers, so counters survive growth. An extent that
//! would hold more than [`TILES_PER_EXTENT`] regions is offered as a `fuse` run: the daemon
//! replaces the kept regions of the run that have counted nothing yet, together with the new
//! parts, by one region, so that an extent growing step by step (appends, a storm of writes)
//! keeps few tiles.
//!
//! lvm2 matches each extent with a linear search over the regions (quadratic in the extent
//! count). Here both sides are sorted once and walked together: O(n log n) for the whole file,
//! and [`plan_window`] plans only the part of the file an event changed.
mod window;

pub use window::plan_window;

use crate::sectors::SectorRange;

/// What to do to a group so that its regions equal the file's extents, one region per extent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Regions that already cover an extent exactly: left alone, counters intact.
    pub keep: Vec<u64>,
    /// Extents without a region: create one each.
    pub create: Vec<SectorRange>,
    /// Tiled only: the pieces of each extent that would hold too many regions (new parts,
    /// `Gap`, and kept regions, `Kept`, which are in `keep` too). Kept regions that have
    /// counted nothing may be fused with the gaps beside them into one region; the others
    /// stay, and split the run.
    pub fuse: Vec<Vec<Piece>>,
    /// Regions of the group that match no extent (or duplicate a kept one): delete.
    pub delete: Vec<u64>,
}

impl Plan {
    /// Whether the group already matches the file.
    pub fn is_noop(&self) -> bool {
        self.create.is_empty() && self.fuse.is_empty() && self.delete.is_empty()
    }

    /// The most regions carrying out the plan may create (a fuse run creates at most one per
    /// gap).
    pub fn creations(&self) -> usize {
        self.create.len() + self.fuse.iter().map(|run| gaps_in(run)).sum::<usize>()
    }

    /// The part of the plan that creates at most `allowance` regions, and whether some
    /// creations were left out. Creations are left out whole, in order; so that a storm's
    /// backlog always shrinks, the first one stays whatever it costs (a fuse run may create
    /// several). Deletions all stay (they suspend nothing); the kept regions of a run left
    /// out simply stay as they are.
    pub fn within(mut self, allowance: usize) -> (Plan, bool) {
        if self.creations() <= allowance.max(1) {
            return (self, false);
        }
        let mut left = allowance;
        let mut first = true;
        let mut fits = |cost: usize| {
            let fits = first || cost <= left;
            if fits {
                left = left.saturating_sub(cost);
                first = false;
            }
            fits
        };
        self.create.retain(|_| fits(1));
        self.fuse.retain(|run| fits(gaps_in(run)));
        (self, true)
    }
}

fn gaps_in(run: &[Piece]) -> usize {
    run.iter().filter(|p| matches!(p, Piece::Gap(_))).count()
}

/// A piece of a run that may be fused into one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Sectors no region covers.
    Gap(SectorRange),
    /// A kept region.
    Kept(u64, SectorRange),
}

impl Piece {
    pub fn range(&self) -> SectorRange {
        match *self {
            Piece::Gap(range) | Piece::Kept(_, range) => range,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// One region per extent (lvm2's dmfilemapd).
    Exact,
    /// Regions tile the extents: each sector of an extent in exactly one region.
    Tiled,
}

/// Plans the change from `members` (the group's regions: id and range) to `extents` (the
/// file's merged extents, in any order). Only ids in `members` ever appear in the plan.
pub fn plan(members: &[(u64, SectorRange)], extents: &[SectorRange], mapping: Mapping) -> Plan {
    match mapping {
        Mapping::Exact => plan_exact(members, extents),
        Mapping::Tiled => plan_tiled(members, extents),
    }
}

/// Both sides sorted by place: regions as (range, id), extents as ranges.
fn sorted(
    members: &[(u64, SectorRange)],
    extents: &[SectorRange],
) -> (Vec<(SectorRange, u64)>, Vec<SectorRange>) {
    let regions = by_place(members);
    let mut wanted: Vec<SectorRange> = extents.to_vec();
    wanted.sort_unstable();
    (regions, wanted)
}

/// The regions as (range, id), sorted by place.
fn by_place(members: &[(u64, SectorRange)]) -> Vec<(SectorRange, u64)> {
    let mut regions: Vec<(SectorRange, u64)> = members.iter().map(|&(id, r)| (r, id)).collect();
    regions.sort_unstable();
    regions
}

fn plan_exact(members: &[(u64, SectorRange)], extents: &[SectorRange]) -> Plan {
    let (regions, wanted) = sorted(members, extents);

    let mut result = Plan::default();
    let mut r = 0;
    for extent in wanted {
        // Regions sorting before this extent match nothing (the extents are sorted too).
        while r < regions.len() && regions[r].0 < extent {
            result.delete.push(regions[r].1);
            r += 1;
        }
        if r < regions.len() && regions[r].0 == extent {
            result.keep.push(regions[r].1);
            r += 1;
        } else {
            result.create.push(extent);
        }
    }
    result.delete.extend(regions[r..].iter().map(|&(_, id)| id));
    result.keep.sort_unstable();
    result.delete.sort_unstable();
    result
}

fn plan_tiled(members: &[(u64, SectorRange)], extents: &[SectorRange]) -> Plan {
    // Tiles cover the file's sectors, whatever logical order their extents are in: ranges
    // that touch on the device are one span here. (Merged ranges follow logical order, so a
    // new extent between two physically adjacent ones splits their range; a region over both
    // still counts only the file's IO, and deleting it would lose its counters.)
    let spans = spans_of(extents);
    let regions = by_place(members);

    let mut result = Plan::default();
    let mut r = 0;
    for (extent, joined) in spans {
        // Regions starting before this extent cannot lie inside it (extents do not overlap).
        while r < regions.len() && regions[r].0.start < extent.start {
            result.delete.push(regions[r].1);
            r += 1;
        }
        // The extent as pieces: kept regions and the gaps between them.
        let mut pieces = Vec::new();
        let mut covered_to = extent.start;
        while r < regions.len() && regions[r].0.start < extent.end() {
            let (range, id) = regions[r];
            if range.start >= covered_to && range.end() <= extent.end() {
                if range.start > covered_to {
                    pieces.push(Piece::Gap(SectorRange::new(
                        covered_to,
                        range.start - covered_to,
                    )));
                }
                pieces.push(Piece::Kept(id, range));
                result.keep.push(id);
                covered_to = range.end();
            } else {
                // Overlaps a kept region, or sticks out of the extent.
                result.delete.push(id);
            }
            r += 1;
        }
        if covered_to < extent.end() {
            pieces.push(Piece::Gap(SectorRange::new(
                covered_to,
                extent.end() - covered_to,
            )));
        }
        cover_gaps(&pieces, TILES_PER_EXTENT * joined, &mut result);
    }
    result.delete.extend(regions[r..].iter().map(|&(_, id)| id));
    result.keep.sort_unstable();
    result.delete.sort_unstable();
    result
}

/// The most regions an extent keeps before its growth fuses them. Below it, new parts simply
/// become regions of their own: an isolated growth then costs three dm messages (see
/// stats/group.rs), no `@stats_print` of its neighbours. Past it, the whole span is offered
/// as one fuse run, so that one fuse takes back several growths' tiles at once (an extent
/// that grows by appends holds 1 to 4 regions, and pays for a fuse every few appends, not at
/// each one). A span of extents that touch on the device (xfs lays a file written out of
/// order end to end) may hold as many for each extent it joins.
pub const TILES_PER_EXTENT: usize = 4;

/// The extents as spans of ranges that touch on the device, sorted, each with how many
/// extents it joins.
fn spans_of(extents: &[SectorRange]) -> Vec<(SectorRange, usize)> {
    let mut sorted = extents.to_vec();
    sorted.sort_unstable();
    let mut spans: Vec<(SectorRange, usize)> = Vec::with_capacity(sorted.len());
    for range in sorted {
        match spans.last_mut() {
            Some((last, joined)) if last.end() == range.start => {
                last.len += range.len;
                *joined += 1;
            }
            _ => spans.push((range, 1)),
        }
    }
    spans
}

/// Covers a span's gaps: each becomes a region while the span holds at most `budget` regions
/// so; past that, the span's pieces are one run to fuse.
fn cover_gaps(pieces: &[Piece], budget: usize, result: &mut Plan) {
    let gaps = pieces.iter().filter_map(|p| match p {
        Piece::Gap(range) => Some(*range),
        Piece::Kept(..) => None,
    });
    if pieces.len() <= budget {
        result.create.extend(gaps);
    } else if gaps.count() > 0 {
        result.fuse.push(pieces.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sectors::join_adjacent;
    use proptest::prelude::*;

    fn r(start: u64, len: u64) -> SectorRange {
        SectorRange::new(start, len)
    }

    #[test]
    fn a_plan_within_an_allowance_creates_no_more_keeps_its_deletions_and_says_so() {
        let members = [(1, r(100, 8)), (2, r(500, 8)), (3, r(900, 8))];
        // Region 2's extent is gone; 1 grew (a fuse run with one gap); four extents are new.
        let extents = [
            r(100, 16),
            r(200, 8),
            r(300, 8),
            r(400, 8),
            r(700, 8),
            r(900, 8),
        ];
        let plan = plan(&members, &extents, Mapping::Tiled);
        assert_eq!(plan.creations(), 5);
        let (whole, deferred) = plan.clone().within(5);
        assert!(!deferred);
        assert_eq!(whole, plan);

        let (part, deferred) = plan.clone().within(2);
        assert!(deferred);
        assert_eq!(part.creations(), 2);
        assert_eq!(part.delete, plan.delete, "deletions are never held back");
        assert_eq!(part.keep, plan.keep);
        // Zero still makes progress.
        assert_eq!(plan.within(0).0.creations(), 1);
    }

    #[test]
    fn matching_group_is_a_noop() {
        let p = plan(
            &[(0, r(100, 8)), (1, r(300, 8))],
            &[r(300, 8), r(100, 8)],
            Mapping::Exact,
        );
        assert!(p.is_noop());
        assert_eq!(p.keep, vec![0, 1]);
    }

    #[test]
    fn growth_of_the_last_extent_replaces_its_region() {
        // Exact (lvm2-compatible) mapping: a longer extent is a different region.
        let p = plan(
            &[(0, r(100, 8)), (1, r(300, 8))],
            &[r(100, 8), r(300, 16)],
            Mapping::Exact,
        );
        assert_eq!(
            p,
            Plan {
                keep: vec![0],
                create: vec![r(300, 16)],
                delete: vec![1],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn new_extent_is_created_and_truncated_extent_deleted() {
        let p = plan(
            &[(4, r(100, 8)), (5, r(300, 8))],
            &[r(100, 8), r(500, 8)],
            Mapping::Exact,
        );
        assert_eq!(
            p,
            Plan {
                keep: vec![4],
                create: vec![r(500, 8)],
                delete: vec![5],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn duplicate_regions_keep_one() {
        let p = plan(
            &[(2, r(100, 8)), (7, r(100, 8))],
            &[r(100, 8)],
            Mapping::Exact,
        );
        assert_eq!(
            p,
            Plan {
                keep: vec![2],
                delete: vec![7],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn empty_file_deletes_everything() {
        let p = plan(&[(0, r(1, 1))], &[], Mapping::Exact);
        assert_eq!(
            p,
            Plan {
                delete: vec![0],
                ..Plan::default()
            }
        );
    }

    /// Applies a plan the way the daemon would, with fresh ids for created regions. `absorb`:
    /// every kept region in a fuse run has counted nothing (the run becomes one region);
    /// otherwise each has counted something (the run's gaps become regions).
    fn apply(members: &[(u64, SectorRange)], p: &Plan, absorb: bool) -> Vec<(u64, SectorRange)> {
        let mut next_id = members.iter().map(|&(id, _)| id + 1).max().unwrap_or(0);
        let mut gone: Vec<u64> = p.delete.clone();
        let mut fresh = Vec::new();
        fresh.extend(p.create.iter().copied());
        for run in &p.fuse {
            if absorb {
                let start = run[0].range().start;
                let end = run.last().unwrap().range().end();
                fresh.push(SectorRange::new(start, end - start));
                gone.extend(run.iter().filter_map(|piece| match piece {
                    Piece::Kept(id, _) => Some(*id),
                    Piece::Gap(_) => None,
                }));
            } else {
                fresh.extend(run.iter().filter_map(|piece| match piece {
                    Piece::Gap(range) => Some(*range),
                    Piece::Kept(..) => None,
                }));
            }
        }
        let mut out: Vec<_> = members
            .iter()
            .filter(|(id, _)| !gone.contains(id))
            .copied()
            .collect();
        for range in fresh {
            out.push((next_id, range));
            next_id += 1;
        }
        out
    }

    #[test]
    fn a_tile_over_extents_that_a_new_one_parts_logically_is_kept() {
        // Extents at sectors 100+8 and 108+8 followed each other in the file (one merged range,
        // one region); a write between them logically parts the merged ranges. The region
        // still counts only the file's sectors: it stays, with its counters (seen on xfs under
        // random O_DIRECT growth, where deleting it lost its IO).
        let members = [(0, r(100, 16))];
        let p = plan(&members, &[r(100, 8), r(500, 8), r(108, 8)], Mapping::Tiled);
        assert_eq!(p.keep, vec![0]);
        assert!(p.delete.is_empty());
        assert_eq!(p.create, vec![r(500, 8)]);
    }

    fn sorted_ranges(v: &[(u64, SectorRange)]) -> Vec<SectorRange> {
        let mut ranges: Vec<_> = v.iter().map(|&(_, r)| r).collect();
        ranges.sort_unstable();
        ranges
    }

    fn ranges() -> impl Strategy<Value = Vec<SectorRange>> {
        // Small coordinates so that regions and extents often coincide.
        proptest::collection::vec(
            (0u64..40, 1u64..4).prop_map(|(s, l)| r(s * 8, l * 8)),
            0..30,
        )
    }

    proptest! {
        #[test]
        fn applying_the_plan_yields_the_extents(
            old in ranges(),
            mut extents in ranges(),
        ) {
            extents.sort_unstable();
            extents.dedup();
            let members: Vec<(u64, SectorRange)> =
                old.into_iter().enumerate().map(|(i, r)| (i as u64 * 3, r)).collect();
            let p = plan(&members, &extents, Mapping::Exact);

            // Only the group's own regions are ever kept or deleted, each exactly once.
            let ids: Vec<u64> = members.iter().map(|&(id, _)| id).collect();
            let mut touched: Vec<u64> = p.keep.iter().chain(&p.delete).copied().collect();
            touched.sort_unstable();
            let mut all = ids.clone();
            all.sort_unstable();
            prop_assert_eq!(touched, all);

            let after = apply(&members, &p, false);
            prop_assert_eq!(sorted_ranges(&after), extents.clone());
            // Idempotent: planning again changes nothing.
            prop_assert!(plan(&after, &extents, Mapping::Exact).is_noop());
            // Every kept region still has its old range (its counters survive).
            for id in &p.keep {
                let before = members.iter().find(|(i, _)| i == id).unwrap().1;
                prop_assert!(extents.contains(&before));
            }
        }
    }

    #[test]
    fn tiled_growth_keeps_the_old_region_and_adds_the_tail() {
        let p = plan(
            &[(0, r(100, 8)), (1, r(300, 8))],
            &[r(100, 8), r(300, 24)],
            Mapping::Tiled,
        );
        assert_eq!(
            p,
            Plan {
                keep: vec![0, 1],
                create: vec![r(308, 16)],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn tiled_shrink_replaces_a_region_that_sticks_out() {
        let p = plan(
            &[(0, r(100, 8)), (1, r(108, 16))],
            &[r(100, 16)],
            Mapping::Tiled,
        );
        assert_eq!(
            p,
            Plan {
                keep: vec![0],
                create: vec![r(108, 8)],
                delete: vec![1],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn tiled_fills_holes_between_kept_regions_and_drops_overlaps() {
        let p = plan(
            &[(0, r(100, 8)), (1, r(104, 8)), (2, r(120, 8))],
            &[r(100, 32)],
            Mapping::Tiled,
        );
        assert_eq!(
            p,
            Plan {
                keep: vec![0, 2],
                create: vec![r(108, 12), r(128, 4)],
                delete: vec![1],
                ..Plan::default()
            }
        );
    }

    /// Whether `regions` cover each sector of `extents` exactly once, and nothing else.
    fn tiles_exactly(regions: &[(u64, SectorRange)], extents: &[SectorRange]) -> bool {
        let mut tiles: Vec<SectorRange> = regions.iter().map(|&(_, r)| r).collect();
        tiles.sort_unstable();
        let disjoint = tiles.windows(2).all(|pair| pair[0].end() <= pair[1].start);
        let mut wanted = extents.to_vec();
        wanted.sort_unstable();
        disjoint && join_adjacent(tiles) == join_adjacent(wanted)
    }

    /// Regions as a consistent pass leaves them: one per extent (exact), or each extent cut
    /// into tiles at the sector offsets `cuts` suggests (tiled).
    fn tile(extents: &[SectorRange], cuts: &[u64], mapping: Mapping) -> Vec<(u64, SectorRange)> {
        let mut cuts = cuts.iter().cycle();
        let mut out = Vec::new();
        for extent in extents {
            let mut at = extent.start;
            while at < extent.end() {
                let len = match mapping {
                    Mapping::Exact => extent.len,
                    Mapping::Tiled => {
                        (cuts.next().copied().unwrap_or(1) * 8).min(extent.end() - at)
                    }
                };
                out.push((out.len() as u64, r(at, len)));
                at += len;
            }
        }
        out
    }

    /// The bench's case at its own scale: 100,000 one-block extents, a hole filled, three
    /// extents become one range. The window plan (two regions near it) equals the plan of the
    /// whole file.
    #[test]
    fn a_window_plan_at_100k_extents_matches_the_whole_plan() {
        let extents: Vec<SectorRange> = (0..100_000).map(|i| r(16 * i, 8)).collect();
        let members: Vec<(u64, SectorRange)> = extents
            .iter()
            .enumerate()
            .map(|(i, &e)| (i as u64, e))
            .collect();
        let k = 54_321;
        let before = vec![extents[k], extents[k + 1]];
        let after = vec![r(16 * k as u64, 24)];
        let mut whole_file = extents.clone();
        whole_file.splice(k..k + 2, after.clone());
        let near = vec![members[k], members[k + 1]];
        for mapping in [Mapping::Exact, Mapping::Tiled] {
            let local = plan_window(&near, &before, &after, mapping).unwrap();
            let whole = plan(&members, &whole_file, mapping);
            assert_eq!(
                (&local.create, &local.fuse, &local.delete),
                (&whole.create, &whole.fuse, &whole.delete),
                "{mapping:?}"
            );
            assert!(!local.is_noop());
        }
    }

    /// An extent grown by 100 appends: three growths in four are a plain creation (no
    /// neighbour to look at), and the extent never holds more than the budget.
    #[test]
    fn appends_fuse_once_every_few_growths_and_keep_within_the_budget() {
        let mut members = vec![(0, r(1000, 8))];
        let mut fuses = 0;
        for n in 2..=100 {
            let p = plan(&members, &[r(1000, 8 * n)], Mapping::Tiled);
            fuses += p.fuse.len();
            members = apply(&members, &p, true);
            assert!(members.len() <= TILES_PER_EXTENT, "{members:?}");
            assert!(tiles_exactly(&members, &[r(1000, 8 * n)]));
        }
        // A fused extent is one region; it takes three plain growths, and the fourth fuses.
        assert_eq!(fuses, 99 / TILES_PER_EXTENT, "{fuses} fuses in 99 growths");
    }

    /// xfs lays a file written out of order end to end: one span of many extents. Each
    /// extent it joins may hold its share of tiles before a growth there fuses.
    #[test]
    fn a_span_of_touching_extents_has_a_budget_for_each() {
        // Five extents touching on the device, each with its region, and a sixth touching
        // them: six regions for six extents, no fuse.
        let members: Vec<(u64, SectorRange)> = (0..5).map(|i| (i, r(100 + 8 * i, 8))).collect();
        let grown: Vec<SectorRange> = (0..6).map(|i| r(100 + 8 * i, 8)).collect();
        let p = plan(&members, &grown, Mapping::Tiled);
        assert_eq!(p.create, vec![r(140, 8)]);
        assert!(p.fuse.is_empty());
        // One extent as long as the six: its budget is four regions, and six are over it.
        let p = plan(&members, &[r(100, 48)], Mapping::Tiled);
        assert_eq!(p.fuse.len(), 1);
        assert!(p.create.is_empty());
    }

    #[test]
    fn an_extent_past_its_tile_budget_is_one_run() {
        // Four regions and two gaps would be six regions: the whole extent is offered.
        let p = plan(
            &[
                (0, r(100, 8)),
                (1, r(108, 8)),
                (2, r(124, 8)),
                (3, r(140, 8)),
            ],
            &[r(100, 48), r(300, 8)],
            Mapping::Tiled,
        );
        assert_eq!(p.create, vec![r(300, 8)]);
        assert_eq!(
            p.fuse,
            vec![vec![
                Piece::Kept(0, r(100, 8)),
                Piece::Kept(1, r(108, 8)),
                Piece::Gap(r(116, 8)),
                Piece::Kept(2, r(124, 8)),
                Piece::Gap(r(132, 8)),
                Piece::Kept(3, r(140, 8)),
            ]]
        );
        assert_eq!(p.keep, vec![0, 1, 2, 3]);
    }

    fn disjoint_extents() -> impl Strategy<Value = Vec<SectorRange>> {
        // Extents never overlap or touch: the file's merged extents are separated by gaps.
        proptest::collection::vec((1u64..6, 1u64..6), 0..20).prop_map(|gaps_and_lens| {
            let mut at = 0;
            gaps_and_lens
                .into_iter()
                .map(|(gap, len)| {
                    at += gap * 8;
                    let extent = r(at, len * 8);
                    at += len * 8;
                    extent
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn tiled_plans_tile_the_extents_and_keep_what_still_fits(
            old in ranges(),
            extents in disjoint_extents(),
        ) {
            let members: Vec<(u64, SectorRange)> =
                old.into_iter().enumerate().map(|(i, r)| (i as u64, r)).collect();
            let p = plan(&members, &extents, Mapping::Tiled);

            let mut touched: Vec<u64> = p.keep.iter().chain(&p.delete).copied().collect();
            touched.sort_unstable();
            prop_assert_eq!(touched, (0..members.len() as u64).collect::<Vec<_>>());

            for absorb in [false, true] {
                let after = apply(&members, &p, absorb);
                prop_assert!(tiles_exactly(&after, &extents), "{:?} after {:?}", after, p);
                prop_assert!(plan(&after, &extents, Mapping::Tiled).is_noop());
            }
            // A member lying wholly inside an extent without overlapping a kept one is kept.
            for &(id, range) in &members {
                let inside = extents.iter().any(|e| e.start <= range.start && range.end() <= e.end());
                if !inside {
                    prop_assert!(p.delete.contains(&id));
                }
            }
        }

        #[test]
        fn plans_held_to_an_allowance_converge_to_the_same_tiling(
            old in ranges(),
            extents in disjoint_extents(),
            allowance in 0usize..4,
            absorb in proptest::bool::ANY,
        ) {
            let mut members: Vec<(u64, SectorRange)> =
                old.into_iter().enumerate().map(|(i, r)| (i as u64, r)).collect();
            let backlog = plan(&members, &extents, Mapping::Tiled).creations();
            let mut rounds = 0;
            loop {
                let p = plan(&members, &extents, Mapping::Tiled);
                let (part, deferred) = p.clone().within(allowance);
                // Over the allowance only by the one creation that always goes.
                prop_assert!(
                    part.creations() <= allowance || part.create.len() + part.fuse.len() == 1
                );
                members = apply(&members, &part, absorb);
                if !deferred {
                    break;
                }
                rounds += 1;
                prop_assert!(rounds <= backlog, "the backlog must shrink every round");
            }
            prop_assert!(tiles_exactly(&members, &extents), "{:?}", members);
        }

        #[test]
        fn a_window_plan_ends_where_the_whole_file_plan_ends(
            before in disjoint_extents(),
            window in (0usize..20, 0usize..4),
            replacement in disjoint_extents(),
            grow_by in proptest::option::of(1u64..5),
            cuts in proptest::collection::vec(1u64..6, 0..40),
            mapping in prop_oneof![Just(Mapping::Exact), Just(Mapping::Tiled)],
        ) {
            // The group tiles the file's ranges as a consistent earlier pass left it.
            let members = tile(&before, &cuts, mapping);
            // Ranges [from, to) change: the replacement goes into the space they held, shifted
            // past the end of the device so that nothing else overlaps it.
            let from = window.0.min(before.len());
            let to = (from + window.1).min(before.len());
            let shift = before.last().map_or(0, |e| e.end()) + 8;
            let old_window: Vec<SectorRange> = before[from..to].to_vec();
            let new_window: Vec<SectorRange> = match grow_by {
                // The window's ranges grow in place, up to the next range of the file.
                Some(by) => (from..to)
                    .map(|i| {
                        let limit = before.get(i + 1).map_or(u64::MAX, |next| next.start);
                        let end = (before[i].end() + by * 8).min(limit);
                        r(before[i].start, end - before[i].start)
                    })
                    .collect(),
                None => replacement.iter().map(|e| r(e.start + shift, e.len)).collect(),
            };
            let mut after_all: Vec<SectorRange> = before[..from].to_vec();
            after_all.extend(&new_window);
            after_all.extend(&before[to..]);

            let near: Vec<(u64, SectorRange)> = members
                .iter()
                .filter(|(_, m)| {
                    old_window.iter().chain(&new_window).any(|w| m.start < w.end() && w.start < m.end())
                })
                .copied()
                .collect();
            let local = plan_window(&near, &old_window, &new_window, mapping)
                .expect("a consistent group is planned locally");
            let whole = plan(&members, &after_all, mapping);
            prop_assert_eq!(&local.delete, &whole.delete);
            match mapping {
                Mapping::Exact => {
                    prop_assert_eq!(&local.create, &whole.create);
                    prop_assert_eq!(&local.fuse, &whole.fuse);
                    prop_assert_eq!(
                        sorted_ranges(&apply(&members, &local, true)),
                        sorted_ranges(&apply(&members, &whole, true))
                    );
                }
                // Tiles span ranges that touch on the device: a kept region just outside the
                // window, touching it, may join a fuse run of the whole plan and not of the
                // window's. Either way every sector of the file is in exactly one region.
                Mapping::Tiled => {
                    for applied in [apply(&members, &local, true), apply(&members, &whole, true)] {
                        let ranges = sorted_ranges(&applied);
                        prop_assert!(ranges.windows(2).all(|w| w[0].end() <= w[1].start));
                        prop_assert_eq!(join_adjacent(ranges), join_adjacent(after_all.clone()));
                    }
                }
            }
        }

        #[test]
        fn a_window_plan_refuses_a_group_that_does_not_match(
            before in disjoint_extents(),
        ) {
            prop_assume!(!before.is_empty());
            // A region sticking out of the remembered ranges: only a whole plan can be trusted.
            let stray = r(before[0].start, before[0].len + 1);
            prop_assert!(plan_window(&[(9, stray)], &before, &before, Mapping::Tiled).is_none());
        }

        #[test]
        fn exact_regions_are_already_tiles(extents in disjoint_extents()) {
            let members: Vec<(u64, SectorRange)> =
                extents.iter().enumerate().map(|(i, &r)| (i as u64, r)).collect();
            prop_assert!(plan(&members, &extents, Mapping::Tiled).is_noop());
        }
    }
}
