//! The file's extents as last read, indexed by logical offset, so that an event costs a FIEMAP
//! of the range it names and a look at that part of the map, not a walk over every extent.
//!
//! Regions follow the *merged* device ranges ([`fiemap::device_ranges`]): placed extents that
//! follow each other physically form one range, across holes in the file. So what a change to
//! one logical span does to the ranges reaches as far as the physically contiguous runs on
//! either side of it; [`ExtentMap::replace`] reports the ranges of that stretch before and
//! after, which is all a plan of the change needs.
//!
//! Regions follow the file's *data*: extents are cut at the end of the file (rounded up to
//! its block). What lies past it (xfs's speculative preallocation, `fallocate --keep-size`)
//! holds no data, and xfs gives preallocation back when the writer closes the file: a region
//! made over it would have to be deleted then, and its counters with it. Those blocks are
//! kept aside as tails (the in-kernel accounting still counts IO there until a region does).
use std::collections::{BTreeMap, BTreeSet};

use crate::{
    file::fiemap::{self, Extent, extent_flags},
    sectors::{self, SECTOR_SHIFT, SectorRange},
};

#[derive(Clone, Debug)]
pub struct ExtentMap {
    /// logical byte offset → extent (without the LAST flag, which only ends a FIEMAP read),
    /// cut at `eof`.
    extents: BTreeMap<u64, Extent>,
    /// Placed blocks past `eof`, by the logical offset of the extent they were cut from.
    tails: BTreeMap<u64, Extent>,
    /// Every placed piece of `extents` and `tails` as (physical, length, its key there), in
    /// device order: the file's sectors without a sort of every extent at each pass.
    by_place: BTreeSet<(u64, u64, u64)>,
    /// How many extents await a place (delayed allocation).
    unplaced: usize,
    /// Where the file's data ends, rounded up to its block (`u64::MAX`: nothing is cut).
    eof: u64,
    /// Names the placed pieces as they are: it changes whenever they may have, and no other
    /// map or state of this map had it (see [`ExtentMap::placed_version`]).
    placed_version: u64,
}

/// The next number for [`ExtentMap::placed_version`]: from one counter for every map, so that
/// a map read anew never repeats a version the map it replaces had.
fn next_placed_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Default for ExtentMap {
    fn default() -> Self {
        Self::new(Vec::new(), u64::MAX)
    }
}

/// What re-reading one stretch of the file changed on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StretchChange {
    /// The merged device ranges that the change took away and those it brought; every other
    /// range of the file is the same before and after.
    pub before: Vec<SectorRange>,
    pub after: Vec<SectorRange>,
    /// Whether the stretch's extents are exactly as they were.
    pub unchanged: bool,
}

impl ExtentMap {
    /// The map of a whole FIEMAP read, cut at `eof`.
    pub fn new(extents: Vec<Extent>, eof: u64) -> Self {
        let mut map = Self {
            extents: BTreeMap::new(),
            tails: BTreeMap::new(),
            by_place: BTreeSet::new(),
            unplaced: 0,
            eof,
            placed_version: next_placed_version(),
        };
        for extent in extents {
            map.insert(extent);
        }
        map
    }

    /// Where the map cuts extents.
    pub fn eof(&self) -> u64 {
        self.eof
    }

    /// The merged device ranges of the blocks past the end of the file.
    pub fn tail_ranges(&self) -> Vec<SectorRange> {
        fiemap::device_ranges(&self.tails.values().copied().collect::<Vec<_>>())
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Whether some extent has no place yet.
    pub fn has_unplaced(&self) -> bool {
        self.unplaced > 0
    }

    /// The merged device ranges of the whole file.
    pub fn device_ranges(&self) -> Vec<SectorRange> {
        fiemap::device_ranges(&self.extents.values().copied().collect::<Vec<_>>())
    }

    /// A number that stays the same while [`ExtentMap::placed_sectors`] does: a caller that
    /// kept the sectors of one version need not walk every extent again to learn that nothing
    /// moved (a pass that reads a stretch anew and finds it as it was keeps the version).
    pub fn placed_version(&self) -> u64 {
        self.placed_version
    }

    /// Every sector the file's placed blocks hold on the device, its end's tails too, sorted,
    /// joined where they touch or overlap: O(n) in device order, no sort.
    pub fn placed_sectors(&self) -> Vec<SectorRange> {
        let in_place_order = self
            .by_place
            .iter()
            .map(|&(physical, length, _)| {
                SectorRange::new(physical >> SECTOR_SHIFT, length >> SECTOR_SHIFT)
            })
            .filter(|range| range.len > 0);
        sectors::union_sorted(in_place_order)
    }

    /// Whether placed blocks of the file (before or past its end) hold the logical bytes
    /// `start..start + len`, in one extent or in several that follow each other: xfs writes
    /// an append into the front of its preallocation, and FIEMAP then shows the written part
    /// and the unwritten rest as two extents, while the allocation's event named both.
    pub fn holds_placed(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len);
        let mut at = start;
        while at < end {
            match self.placed_end_at(at) {
                Some(next) => at = next,
                None => return false,
            }
        }
        true
    }

    /// Where the placed piece (extent, or tail past the end) holding logical byte `at` ends.
    fn placed_end_at(&self, at: u64) -> Option<u64> {
        let holds = |e: &&Extent| e.is_placed() && e.logical <= at && at < e.logical + e.length;
        // Tails are keyed by the extent they were cut from, which starts before them.
        let head = self.extents.range(..=at).next_back().map(|(_, e)| e);
        let tail = self.tails.range(..=at).next_back().map(|(_, e)| e);
        head.filter(holds)
            .or(tail.filter(holds))
            .map(|e| e.logical + e.length)
    }

    /// Widens the logical span `lo..hi` to the whole extents it cuts into: FIEMAP of the
    /// wider span then tells the whole truth about every extent a [`replace`](Self::replace)
    /// drops (a hole punched into an extent's tail would otherwise lose its head).
    pub fn widen(&self, lo: u64, hi: u64) -> (u64, u64) {
        let lo = match self.extents.range(..lo).next_back() {
            Some((_, e)) if e.logical + e.length > lo => e.logical,
            _ => lo,
        };
        let hi = match self.extents.range(..hi).next_back() {
            Some((_, e)) if e.logical + e.length > hi => e.logical + e.length,
            _ => hi,
        };
        (lo, hi)
    }

    /// Replaces what the map says of the logical span `lo..hi` with `fresh`, a FIEMAP of that
    /// span (whole extents overlapping it, which may reach beyond it), the file now ending at
    /// `eof`. When the end moved, the span must take in both ends (the caller widens it).
    /// O((k + r) log n) for k extents in the span and r in the physically contiguous runs on
    /// either side.
    pub fn replace(&mut self, lo: u64, hi: u64, fresh: Vec<Extent>, eof: u64) -> StretchChange {
        let lo = fresh.iter().map(|e| e.logical).fold(lo, u64::min);
        let hi = fresh
            .iter()
            .map(|e| e.logical.saturating_add(e.length))
            .fold(hi, u64::max);
        let (lo, hi) = self.widen(lo, hi);
        let (from, to) = (self.run_start_before(lo), self.run_end_after(hi));

        let old_stretch = self.stretch(from, to);
        let old_places = self.places_in(from, to, lo, hi);
        let dropped_tails: Vec<u64> = self.tails.range(lo..hi).map(|(&at, _)| at).collect();
        for at in dropped_tails {
            self.take_tail(at);
        }
        self.eof = eof;
        let dropped: Vec<u64> = self.extents.range(lo..hi).map(|(&at, _)| at).collect();
        for at in dropped {
            if let Some(extent) = self.take_extent(at)
                && !extent.is_placed()
            {
                self.unplaced -= 1;
            }
        }
        for extent in fresh {
            self.insert(extent);
        }
        let new_stretch = self.stretch(from, to);
        // Only extents and tails in lo..hi were taken out and put back. An extent whose
        // flags alone changed (unwritten to written) holds the same sectors.
        if old_places != self.places_in(from, to, lo, hi) {
            self.placed_version = next_placed_version();
        }
        // Ranges the stretch holds before and after alike did not change: leave them out.
        let mut before = fiemap::device_ranges(&old_stretch);
        let mut after = fiemap::device_ranges(&new_stretch);
        let common: BTreeSet<SectorRange> = before
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .intersection(&after.iter().copied().collect())
            .copied()
            .collect();
        before.retain(|r| !common.contains(r));
        after.retain(|r| !common.contains(r));
        StretchChange {
            before,
            after,
            unchanged: old_stretch == new_stretch,
        }
    }

    fn insert(&mut self, mut extent: Extent) {
        extent.flags &= !extent_flags::LAST;
        let end = extent.logical.saturating_add(extent.length);
        if extent.is_placed() && end > self.eof {
            let head = self.eof.saturating_sub(extent.logical);
            self.put_tail(
                extent.logical,
                Extent {
                    logical: extent.logical + head,
                    physical: extent.physical + head,
                    length: extent.length - head,
                    ..extent
                },
            );
            if head == 0 {
                return;
            }
            extent.length = head;
        }
        if !extent.is_placed() {
            self.unplaced += 1;
        }
        if let Some(old) = self.put_extent(extent)
            && !old.is_placed()
        {
            self.unplaced -= 1;
        }
    }

    /// The map's only ways of changing `extents` and `tails`: they keep `by_place` in step.
    fn put_extent(&mut self, extent: Extent) -> Option<Extent> {
        let old = self.extents.insert(extent.logical, extent);
        if let Some(old) = old.filter(Extent::is_placed) {
            self.by_place
                .remove(&(old.physical, old.length, old.logical));
        }
        if extent.is_placed() {
            self.by_place
                .insert((extent.physical, extent.length, extent.logical));
        }
        old
    }

    fn take_extent(&mut self, at: u64) -> Option<Extent> {
        let old = self.extents.remove(&at)?;
        if old.is_placed() {
            self.by_place.remove(&(old.physical, old.length, at));
        }
        Some(old)
    }

    fn put_tail(&mut self, key: u64, tail: Extent) {
        if let Some(old) = self.tails.insert(key, tail) {
            self.by_place.remove(&(old.physical, old.length, key));
        }
        self.by_place.insert((tail.physical, tail.length, key));
    }

    fn take_tail(&mut self, key: u64) {
        if let Some(old) = self.tails.remove(&key) {
            self.by_place.remove(&(old.physical, old.length, key));
        }
    }

    /// The placed pieces of the extents in `from..to` and of the tails in `lo..hi`: (whether a
    /// tail, key, physical, length).
    fn places_in(&self, from: u64, to: u64, lo: u64, hi: u64) -> Vec<(bool, u64, u64, u64)> {
        let extents = self.extents.range(from..to).map(|(&at, e)| (false, at, e));
        let tails = self.tails.range(lo..hi).map(|(&at, t)| (true, at, t));
        extents
            .chain(tails)
            .filter(|(_, _, e)| e.is_placed())
            .map(|(tail, at, e)| (tail, at, e.physical, e.length))
            .collect()
    }

    fn stretch(&self, from: u64, to: u64) -> Vec<Extent> {
        self.extents.range(from..to).map(|(_, e)| *e).collect()
    }

    /// Where the physically contiguous run of placed extents ending before `lo` starts (`lo`
    /// when none ends before it): no range of the file crosses that offset.
    fn run_start_before(&self, lo: u64) -> u64 {
        let mut placed = self
            .extents
            .range(..lo)
            .rev()
            .map(|(_, e)| e)
            .filter(|e| e.is_placed());
        let Some(mut first) = placed.next() else {
            return lo;
        };
        for earlier in placed {
            if earlier.physical + earlier.length != first.physical {
                break;
            }
            first = earlier;
        }
        first.logical
    }

    /// Where the physically contiguous run of placed extents starting at or after `hi` ends.
    fn run_end_after(&self, hi: u64) -> u64 {
        let mut placed = self
            .extents
            .range(hi..)
            .map(|(_, e)| e)
            .filter(|e| e.is_placed());
        let Some(mut last) = placed.next() else {
            return hi;
        };
        for later in placed {
            if last.physical + last.length != later.physical {
                break;
            }
            last = later;
        }
        last.logical + last.length
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags: 0,
        }
    }

    #[test]
    fn extents_are_cut_at_the_end_of_the_file() {
        // 16 KiB at 1 MiB, the file ending at 8 KiB; 8 KiB more wholly past the end.
        let map = ExtentMap::new(
            vec![ext(0, 1 << 20, 16384), ext(16384, 4 << 20, 8192)],
            8192,
        );
        assert_eq!(map.device_ranges(), vec![SectorRange::new(2048, 16)]);
        assert_eq!(
            map.tail_ranges(),
            vec![SectorRange::new(2048 + 16, 16), SectorRange::new(8192, 16)]
        );
        // Placed blocks all the same: an event's range past the end has settled.
        assert!(map.holds_placed(0, 16384));
        assert!(map.holds_placed(12288, 4096));
        assert!(map.holds_placed(16384, 8192));
        assert!(!map.holds_placed(24576, 4096));
    }

    #[test]
    fn an_event_over_written_and_unwritten_extents_has_settled() {
        // xfs: 64 KiB appended at 1 MiB into a preallocation that reaches 3 MiB. The event
        // named 1 MiB..3 MiB; FIEMAP shows the written blocks to the end of the file, then
        // the unwritten rest, physically next to them, as an extent of its own.
        let unwritten = Extent {
            flags: extent_flags::UNWRITTEN,
            ..ext(1114112, (1 << 20) + 1114112, 2031616)
        };
        let map = ExtentMap::new(vec![ext(0, 1 << 20, 1114112), unwritten], 1114112);
        assert!(map.holds_placed(1 << 20, 2 << 20));
        assert!(map.holds_placed(0, 3 << 20));
        assert!(!map.holds_placed(0, (3 << 20) + 4096));
        // A hole between two extents is not held.
        let map = ExtentMap::new(
            vec![ext(0, 1 << 20, 8192), ext(12288, 2 << 20, 4096)],
            16384,
        );
        assert!(!map.holds_placed(0, 16384));
        assert!(map.holds_placed(12288, 4096));
    }

    #[test]
    fn the_placed_version_changes_only_with_the_placed_pieces() {
        let extents = vec![ext(0, 1 << 20, 4096), ext(8192, 2 << 20, 4096)];
        let mut map = ExtentMap::new(extents.clone(), 12288);
        let first = map.placed_version();
        // A stretch read again and found as it was (a settling pass).
        map.replace(8192, 12288, vec![ext(8192, 2 << 20, 4096)], 12288);
        assert_eq!(map.placed_version(), first);
        // Written where it was unwritten: the same sectors.
        let unwritten = Extent {
            flags: extent_flags::UNWRITTEN,
            ..ext(8192, 2 << 20, 4096)
        };
        map.replace(8192, 12288, vec![unwritten], 12288);
        assert_eq!(map.placed_version(), first);
        // The hole filled, elsewhere on the device.
        map.replace(4096, 8192, vec![ext(4096, 3 << 20, 4096)], 12288);
        let filled = map.placed_version();
        assert_ne!(filled, first);
        // Only a tail past the end moves (xfs gives preallocation back).
        map.replace(8192, 16384, vec![ext(8192, 2 << 20, 8192)], 12288);
        assert_ne!(map.placed_version(), filled);
        // A map read anew never repeats an old map's version.
        assert_ne!(ExtentMap::new(extents, 12288).placed_version(), first);
    }

    #[test]
    fn a_file_growing_into_its_preallocation_grows_its_range() {
        let mut map = ExtentMap::new(vec![ext(0, 1 << 20, 16384)], 8192);
        // The caller widens the span over the old and the new end.
        let change = map.replace(8192, 12288, vec![ext(0, 1 << 20, 16384)], 12288);
        assert_eq!(change.before, vec![SectorRange::new(2048, 16)]);
        assert_eq!(change.after, vec![SectorRange::new(2048, 24)]);
        assert_eq!(map.tail_ranges(), vec![SectorRange::new(2048 + 24, 8)]);
        // Given back at close: no tail is left.
        let change = map.replace(0, 12288, vec![ext(0, 1 << 20, 12288)], 12288);
        assert!(change.unchanged);
        assert!(map.tail_ranges().is_empty());
    }

    #[test]
    fn growth_at_the_end_reports_the_grown_range_only() {
        let mut map = ExtentMap::new(
            vec![ext(0, 1 << 20, 4096), ext(1 << 20, 8 << 20, 4096)],
            u64::MAX,
        );
        let change = map.replace(
            4096 + (1 << 20),
            4096,
            vec![ext(1 << 20, 8 << 20, 8192)],
            u64::MAX,
        );
        assert_eq!(change.before, vec![SectorRange::new(16384, 8)]);
        assert_eq!(change.after, vec![SectorRange::new(16384, 16)]);
        assert!(!change.unchanged);
        assert_eq!(
            map.device_ranges(),
            vec![SectorRange::new(2048, 8), SectorRange::new(16384, 16)]
        );
    }

    #[test]
    fn a_change_reaches_the_physically_contiguous_neighbours() {
        // Extents 0 and 2 are physically contiguous around a hole at 4 KiB; filling the hole
        // elsewhere splits nothing, but the stretch spans the whole run.
        let mut map = ExtentMap::new(vec![ext(0, 4096, 4096), ext(8192, 8192, 4096)], u64::MAX);
        let change = map.replace(4096, 4096, vec![ext(4096, 1 << 20, 4096)], u64::MAX);
        assert_eq!(change.before, vec![SectorRange::new(8, 16)]);
        assert_eq!(
            change.after,
            vec![
                SectorRange::new(8, 8),
                SectorRange::new(2048, 8),
                SectorRange::new(16, 8)
            ]
        );
        // Untouched neighbours that stay as they were are left out.
        let change = map.replace(4096, 4096, vec![ext(4096, 4 << 20, 4096)], u64::MAX);
        assert_eq!(change.before, vec![SectorRange::new(2048, 8)]);
        assert_eq!(change.after, vec![SectorRange::new(8192, 8)]);
    }

    #[test]
    fn extents_that_vanished_from_the_span_are_dropped() {
        // A truncate to 4 KiB: the span from 4 KiB on now maps only the shortened first extent.
        let mut map = ExtentMap::new(
            vec![ext(0, 4096, 8192), ext(1 << 20, 1 << 24, 8192)],
            u64::MAX,
        );
        let (lo, hi) = map.widen(4096, u64::MAX);
        map.replace(lo, hi, vec![ext(0, 4096, 4096)], u64::MAX);
        assert_eq!(map.device_ranges(), vec![SectorRange::new(8, 8)]);
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn a_merged_extent_replaces_its_parts_and_the_flag_last_is_dropped() {
        let mut map = ExtentMap::new(vec![ext(0, 4096, 4096), ext(4096, 8192, 4096)], u64::MAX);
        let mut merged = ext(0, 4096, 12288);
        merged.flags = extent_flags::LAST;
        let change = map.replace(4096, 8192, vec![merged], u64::MAX);
        assert_eq!(map.len(), 1);
        assert_eq!(change.before, vec![SectorRange::new(8, 16)]);
        assert_eq!(change.after, vec![SectorRange::new(8, 24)]);
        assert!(!change.unchanged);
    }

    /// 100,000 one-block extents, every other block a hole; a hole filled in place joins three
    /// extents into one range, and the map reports just that.
    #[test]
    fn a_hole_filled_among_100k_extents_reports_three_ranges_becoming_one() {
        let block = 4096;
        let extents: Vec<Extent> = (0..100_000)
            .map(|i| ext(2 * i * block, (1 << 30) + 2 * i * block, block))
            .collect();
        let mut map = ExtentMap::new(extents, u64::MAX);
        let k = 77_777;
        let hole = (2 * k + 1) * block;
        // The event names the hole; FIEMAP of it returns the whole merged extent.
        let (lo, hi) = map.widen(hole, hole + block);
        let fresh = vec![ext(2 * k * block, (1 << 30) + 2 * k * block, 3 * block)];
        let change = map.replace(lo, hi, fresh, u64::MAX);
        let sector = |bytes: u64| bytes >> 9;
        let at = sector((1 << 30) + 2 * k * block);
        assert_eq!(
            change.before,
            vec![SectorRange::new(at, 8), SectorRange::new(at + 16, 8)]
        );
        assert_eq!(change.after, vec![SectorRange::new(at, 24)]);
        assert_eq!(map.len(), 100_000 - 1);
    }

    fn file() -> impl Strategy<Value = Vec<Extent>> {
        // Logical extents of 1..4 blocks with gaps; physical places often contiguous.
        proptest::collection::vec((0u64..2, 1u64..4, 0u64..3, any::<bool>()), 0..25).prop_map(|v| {
            let (mut logical, mut physical) = (0, 1000);
            v.into_iter()
                .map(|(gap, len, jump, placed)| {
                    logical += gap * 4096;
                    physical += jump * 4096;
                    let mut e = ext(logical, physical, len * 4096);
                    if !placed {
                        e.flags = extent_flags::DELALLOC;
                    }
                    logical += len * 4096;
                    physical += len * 4096;
                    e
                })
                .collect()
        })
    }

    proptest! {
        /// The file's sectors in device order, kept beside the logical maps, are what those maps
        /// hold (ends cut and moved, extents replaced and dropped, blocks unplaced), and change
        /// only with their version.
        #[test]
        fn placed_sectors_follow_every_change(
            old in file(),
            steps in proptest::collection::vec((file(), 0u64..30, 1u64..30, 0u64..40), 1..6),
            first_eof in 0u64..40,
        ) {
            let mut map = ExtentMap::new(old, first_eof * 4096);
            for (new, start, len, eof) in steps {
                let (lo, hi) = map.widen(start * 4096, (start + len) * 4096);
                let fresh: Vec<Extent> = new
                    .into_iter()
                    .filter(|e| e.logical < hi && lo < e.logical + e.length)
                    .collect();
                let (version, sectors) = (map.placed_version(), map.placed_sectors());
                map.replace(lo, hi, fresh, eof * 4096);
                let mut expected = map.device_ranges();
                expected.extend(map.tail_ranges());
                prop_assert_eq!(map.placed_sectors(), crate::sectors::union(expected));
                // A version kept promises the same sectors.
                if map.placed_version() == version {
                    prop_assert_eq!(map.placed_sectors(), sectors);
                }
            }
        }

        /// Replacing a span with what the new file holds there gives the new file's map, and
        /// the reported stretch accounts for every range that changed.
        #[test]
        fn replacing_a_span_is_rereading_the_file(
            old in file(),
            new in file(),
            span in (0u64..30, 1u64..30),
        ) {
            let (lo, hi) = (span.0 * 4096, (span.0 + span.1) * 4096);
            // The new file: the old one outside lo..hi (after widening), the new one inside.
            let mut map = ExtentMap::new(old.clone(), u64::MAX);
            let (wlo, whi) = map.widen(lo, hi);
            let fresh: Vec<Extent> = new
                .iter()
                .filter(|e| e.logical < whi && wlo < e.logical + e.length)
                .copied()
                .collect();
            let flo = fresh.iter().map(|e| e.logical).fold(wlo, u64::min);
            let fhi = fresh.iter().map(|e| e.logical + e.length).fold(whi, u64::max);
            let (flo, fhi) = map.widen(flo, fhi);
            let mut whole: Vec<Extent> = old
                .iter()
                .filter(|e| e.logical + e.length <= flo || e.logical >= fhi)
                .copied()
                .chain(fresh.iter().copied())
                .collect();
            whole.sort_by_key(|e| e.logical);
            // Physically overlapping extents cannot exist in one file: skip such pairs.
            let mut places: Vec<(u64, u64)> = whole.iter().filter(|e| e.is_placed()).map(|e| (e.physical, e.length)).collect();
            places.sort_unstable();
            prop_assume!(places.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));

            let before_all = map.device_ranges();
            let change = map.replace(wlo, whi, fresh, u64::MAX);
            let after_all = fiemap::device_ranges(&whole);
            prop_assert_eq!(map.device_ranges(), after_all.clone());
            prop_assert_eq!(map.has_unplaced(), whole.iter().any(|e| !e.is_placed()));
            // before_all minus the stretch's old ranges, plus its new ones, is after_all.
            let mut rebuilt: Vec<SectorRange> = before_all
                .iter()
                .filter(|r| !change.before.contains(r))
                .copied()
                .chain(change.after.iter().copied())
                .collect();
            rebuilt.sort_unstable();
            let mut expected = after_all;
            expected.sort_unstable();
            prop_assert_eq!(rebuilt, expected);
        }
    }
}
