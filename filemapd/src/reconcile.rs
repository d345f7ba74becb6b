//! The reconciler: a pure function from (the group's regions, the file's extents) to the
//! changes that make the regions cover the extents. No I/O here; the daemon applies the plan.
//!
//! Two mappings: `Exact` is lvm2's (one region per extent, so an extent that grows loses its
//! region and its counters); `Tiled` keeps every region that still lies inside an extent and
//! adds regions for the parts no region covers, so counters survive growth.
//!
//! lvm2 matches each extent with a linear search over the regions (quadratic in the extent
//! count). Here both sides are sorted once and walked together: O(n log n).
use crate::sectors::SectorRange;

/// What to do to a group so that its regions equal the file's extents, one region per extent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Regions that already cover an extent exactly: left alone, counters intact.
    pub keep: Vec<u64>,
    /// Extents without a region: create one each.
    pub create: Vec<SectorRange>,
    /// Regions of the group that match no extent (or duplicate a kept one): delete.
    pub delete: Vec<u64>,
}

impl Plan {
    /// Whether the group already matches the file.
    pub fn is_noop(&self) -> bool {
        self.create.is_empty() && self.delete.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    let mut regions: Vec<(SectorRange, u64)> = members.iter().map(|&(id, r)| (r, id)).collect();
    regions.sort_unstable();
    let mut wanted: Vec<SectorRange> = extents.to_vec();
    wanted.sort_unstable();
    (regions, wanted)
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
    let (regions, wanted) = sorted(members, extents);

    let mut result = Plan::default();
    let mut r = 0;
    for extent in wanted {
        // Regions starting before this extent cannot lie inside it (extents do not overlap).
        while r < regions.len() && regions[r].0.start < extent.start {
            result.delete.push(regions[r].1);
            r += 1;
        }
        let mut covered_to = extent.start;
        while r < regions.len() && regions[r].0.start < extent.end() {
            let (range, id) = regions[r];
            if range.start >= covered_to && range.end() <= extent.end() {
                if range.start > covered_to {
                    result
                        .create
                        .push(SectorRange::new(covered_to, range.start - covered_to));
                }
                result.keep.push(id);
                covered_to = range.end();
            } else {
                // Overlaps a kept region, or sticks out of the extent.
                result.delete.push(id);
            }
            r += 1;
        }
        if covered_to < extent.end() {
            result
                .create
                .push(SectorRange::new(covered_to, extent.end() - covered_to));
        }
    }
    result.delete.extend(regions[r..].iter().map(|&(_, id)| id));
    result.keep.sort_unstable();
    result.delete.sort_unstable();
    result
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
                delete: vec![1]
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
                delete: vec![5]
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
                create: vec![],
                delete: vec![7]
            }
        );
    }

    #[test]
    fn empty_file_deletes_everything() {
        let p = plan(&[(0, r(1, 1))], &[], Mapping::Exact);
        assert_eq!(
            p,
            Plan {
                keep: vec![],
                create: vec![],
                delete: vec![0]
            }
        );
    }

    /// Applies a plan the way the daemon would, with fresh ids for created regions.
    fn apply(members: &[(u64, SectorRange)], p: &Plan) -> Vec<(u64, SectorRange)> {
        let first_new = members.iter().map(|&(id, _)| id + 1).max().unwrap_or(0);
        let mut out: Vec<_> = members
            .iter()
            .filter(|(id, _)| !p.delete.contains(id))
            .copied()
            .collect();
        out.extend(
            p.create
                .iter()
                .enumerate()
                .map(|(i, &range)| (first_new + i as u64, range)),
        );
        out
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

            let after = apply(&members, &p);
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
                delete: vec![]
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
                delete: vec![1]
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
                delete: vec![1]
            }
        );
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

            let after = apply(&members, &p);
            // Each sector of each extent in exactly one region, and nowhere else.
            let mut tiles: Vec<SectorRange> = after.iter().map(|&(_, r)| r).collect();
            tiles.sort_unstable();
            for pair in tiles.windows(2) {
                prop_assert!(pair[0].end() <= pair[1].start, "overlapping regions {:?}", pair);
            }
            let mut wanted = extents.clone();
            wanted.sort_unstable();
            prop_assert_eq!(join_adjacent(tiles), join_adjacent(wanted));
            prop_assert!(plan(&after, &extents, Mapping::Tiled).is_noop());
            // A member lying wholly inside an extent without overlapping a kept one is kept.
            for &(id, range) in &members {
                let inside = extents.iter().any(|e| e.start <= range.start && range.end() <= e.end());
                if !inside {
                    prop_assert!(p.delete.contains(&id));
                }
            }
        }

        #[test]
        fn exact_regions_are_already_tiles(extents in disjoint_extents()) {
            let members: Vec<(u64, SectorRange)> =
                extents.iter().enumerate().map(|(i, &r)| (i as u64, r)).collect();
            prop_assert!(plan(&members, &extents, Mapping::Tiled).is_noop());
        }
    }
}
