//! The reconciler: a pure function from (the group's regions, the file's extents) to the
//! changes that make the regions equal the extents. No I/O here; the daemon applies the plan.
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

/// Plans the change from `members` (the group's regions: id and range) to `extents` (the
/// file's merged extents, in any order). Only ids in `members` ever appear in the plan.
pub fn plan(members: &[(u64, SectorRange)], extents: &[SectorRange]) -> Plan {
    let mut regions: Vec<(SectorRange, u64)> = members.iter().map(|&(id, r)| (r, id)).collect();
    regions.sort_unstable();
    let mut wanted: Vec<SectorRange> = extents.to_vec();
    wanted.sort_unstable();

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start: u64, len: u64) -> SectorRange {
        SectorRange::new(start, len)
    }

    #[test]
    fn matching_group_is_a_noop() {
        let p = plan(&[(0, r(100, 8)), (1, r(300, 8))], &[r(300, 8), r(100, 8)]);
        assert!(p.is_noop());
        assert_eq!(p.keep, vec![0, 1]);
    }

    #[test]
    fn growth_of_the_last_extent_replaces_its_region() {
        // Exact (lvm2-compatible) mapping: a longer extent is a different region.
        let p = plan(&[(0, r(100, 8)), (1, r(300, 8))], &[r(100, 8), r(300, 16)]);
        assert_eq!(p, Plan { keep: vec![0], create: vec![r(300, 16)], delete: vec![1] });
    }

    #[test]
    fn new_extent_is_created_and_truncated_extent_deleted() {
        let p = plan(&[(4, r(100, 8)), (5, r(300, 8))], &[r(100, 8), r(500, 8)]);
        assert_eq!(p, Plan { keep: vec![4], create: vec![r(500, 8)], delete: vec![5] });
    }

    #[test]
    fn duplicate_regions_keep_one() {
        let p = plan(&[(2, r(100, 8)), (7, r(100, 8))], &[r(100, 8)]);
        assert_eq!(p, Plan { keep: vec![2], create: vec![], delete: vec![7] });
    }

    #[test]
    fn empty_file_deletes_everything() {
        let p = plan(&[(0, r(1, 1))], &[]);
        assert_eq!(p, Plan { keep: vec![], create: vec![], delete: vec![0] });
    }

    /// Applies a plan the way the daemon would, with fresh ids for created regions.
    fn apply(members: &[(u64, SectorRange)], p: &Plan) -> Vec<(u64, SectorRange)> {
        let mut next_id = members.iter().map(|&(id, _)| id + 1).max().unwrap_or(0);
        let mut out: Vec<_> = members.iter().filter(|(id, _)| !p.delete.contains(id)).copied().collect();
        for &range in &p.create {
            out.push((next_id, range));
            next_id += 1;
        }
        out
    }

    fn sorted_ranges(v: &[(u64, SectorRange)]) -> Vec<SectorRange> {
        let mut ranges: Vec<_> = v.iter().map(|&(_, r)| r).collect();
        ranges.sort_unstable();
        ranges
    }

    fn ranges() -> impl Strategy<Value = Vec<SectorRange>> {
        // Small coordinates so that regions and extents often coincide.
        proptest::collection::vec((0u64..40, 1u64..4).prop_map(|(s, l)| r(s * 8, l * 8)), 0..30)
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
            let p = plan(&members, &extents);

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
            prop_assert!(plan(&after, &extents).is_noop());
            // Every kept region still has its old range (its counters survive).
            for id in &p.keep {
                let before = members.iter().find(|(i, _)| i == id).unwrap().1;
                prop_assert!(extents.contains(&before));
            }
        }
    }
}
