//! Planning after an event: only the regions near the device ranges the event changed.
use super::{Mapping, Plan, plan};
use crate::sectors::{SectorRange, join_adjacent};

/// Plans one window of the file after an event: `before` and `after` are the merged device
/// ranges the window's extents covered before and after the change (every other range of the
/// file is unchanged), `members` the group's regions that overlap either. O(window), whatever
/// the size of the file.
///
/// Returns `None` when a member does not lie inside a `before` range: the group did not match
/// the file as remembered (another process, or a change no event named), so only a plan of the
/// whole file can be trusted.
pub fn plan_window(
    members: &[(u64, SectorRange)],
    before: &[SectorRange],
    after: &[SectorRange],
    mapping: Mapping,
) -> Option<Plan> {
    // Tiles may span ranges that touch on the device (see `plan_tiled`).
    let before = match mapping {
        Mapping::Tiled => join_adjacent(before.to_vec()),
        Mapping::Exact => {
            let mut before = before.to_vec();
            before.sort_unstable();
            before
        }
    };
    let inside_before = |range: &SectorRange| {
        let i = before.partition_point(|b| b.start <= range.start);
        i > 0 && range.end() <= before[i - 1].end()
    };
    if !members.iter().all(|(_, range)| inside_before(range)) {
        return None;
    }
    Some(plan(members, after, mapping))
}
