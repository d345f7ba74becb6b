//! What the daemon knows of the file's extents: the map as last read, what events said changed
//! since, and which event ranges FIEMAP has not shown yet.
use std::{fs::File, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::Context as _;

use crate::{
    file::extent_map::{ExtentMap, StretchChange},
    file::fiemap,
};

/// What the last look at the file saw; a change means the regions may be stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileState {
    blocks: u64,
    size: u64,
    /// Extents without a place yet (delayed allocation): look again until they have one.
    unplaced: bool,
}

/// What a read found.
#[derive(Debug)]
pub enum Reading {
    /// The whole file was read: plan every region.
    Whole,
    /// Only the span events named was read; this is what it changed.
    Stretch(StretchChange),
}

#[derive(Default)]
pub struct FileView {
    map: ExtentMap,
    last: Option<FileState>,
    /// Logical bytes that events said changed, re-read at each look until the events'
    /// effects have settled.
    span: Option<(u64, u64)>,
    /// The next read reads the whole file (events were lost, or one named no range).
    whole: bool,
    /// Logical byte ranges that events said were allocated and FIEMAP has not shown yet.
    unsettled: Vec<(u64, u64)>,
}

impl FileView {
    /// Forgets everything (the path now names another file).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub fn map(&self) -> &ExtentMap {
        &self.map
    }

    /// The logical bytes `(start, end)` the next read will look at, when events named them
    /// (`None`: the whole file, or nothing changed).
    pub fn span(&self) -> Option<(u64, u64)> {
        if self.whole { None } else { self.span }
    }

    /// Whether a read has run on this file.
    pub fn looked(&self) -> bool {
        self.last.is_some()
    }

    /// Notes an event's logical byte range (`len` 0: the event names no range, read it all).
    pub fn note_event(&mut self, start: u64, len: u64, allocated: bool) {
        if allocated && len > 0 {
            self.unsettled.push((start, len));
        } else if len > 0 {
            // Blocks on their way out (xfs gives an append's preallocation back when the
            // writer closes the file): what earlier events allocated there will never show.
            self.unsettled = without(&self.unsettled, start, start.saturating_add(len));
        }
        if len == 0 {
            self.whole = true;
            return;
        }
        let end = start.saturating_add(len);
        self.span = Some(match self.span {
            Some((lo, hi)) => (lo.min(start), hi.max(end)),
            None => (start, end),
        });
    }

    /// Events were lost, or the file changed in ways no event names: read it all next.
    pub fn note_unknown_change(&mut self) {
        self.whole = true;
    }

    /// Whether the file may have new or fewer extents since the last read (polling's test).
    pub fn changed(&self, file: &File) -> anyhow::Result<bool> {
        let Some(last) = self.last else {
            return Ok(true);
        };
        let m = file.metadata().context("fstat of the monitored file")?;
        Ok(last.unplaced || (m.blocks(), m.size()) != (last.blocks, last.size))
    }

    /// Reads the file's extents: only the span events named when there is one and `narrow`
    /// allows (the caller trusts its picture of the group), else all of them.
    pub fn read(&mut self, file: &File, path: &Path, narrow: bool) -> anyhow::Result<Reading> {
        let metadata = file.metadata().context("fstat of the monitored file")?;
        let eof = data_end(&metadata);
        let narrow = narrow && !self.whole && self.looked() && !self.map.is_empty();
        // Where the file ends moved: the extents about both ends are cut anew.
        let old_eof = self.map.eof();
        let span = self.span.map(|(lo, hi)| match old_eof == eof {
            true => (lo, hi),
            false => (lo.min(old_eof.min(eof)), hi.max(old_eof.max(eof))),
        });
        let reading = match span.filter(|(lo, hi)| narrow && lo < hi && old_eof != u64::MAX) {
            Some((lo, hi)) => {
                let (lo, hi) = self.map.widen(lo, hi);
                let fresh = fiemap::read_extents(file, lo, hi - lo, false)
                    .with_context(|| format!("FIEMAP of {} bytes {lo}..{hi}", path.display()))?;
                Reading::Stretch(self.map.replace(lo, hi, fresh, eof))
            }
            None => {
                let extents = fiemap::read_extents(file, 0, u64::MAX, false)
                    .with_context(|| format!("FIEMAP of {}", path.display()))?;
                self.map = ExtentMap::new(extents, eof);
                self.whole = false;
                Reading::Whole
            }
        };
        self.last = Some(FileState {
            blocks: metadata.blocks(),
            size: metadata.size(),
            unplaced: self.map.has_unplaced(),
        });
        let map = &self.map;
        self.unsettled
            .retain(|&(start, len)| !map.holds_placed(start, len));
        Ok(reading)
    }

    /// Every sector the file holds on its device, past its end too: what the kernel counts
    /// for it (sorted, disjoint, joined where they touch).
    pub fn all_sectors(&self) -> Vec<crate::sectors::SectorRange> {
        self.map.placed_sectors()
    }

    /// Event ranges FIEMAP has not shown placed yet.
    pub fn unsettled(&self) -> &[(u64, u64)] {
        &self.unsettled
    }

    /// Gives up on the event ranges (the next event or change of size catches up), and on
    /// the span once nothing more is expected from it.
    pub fn forget_span(&mut self) {
        self.unsettled.clear();
        self.span = None;
    }
}

/// The byte ranges `(start, len)` less the bytes `lo..hi`.
fn without(ranges: &[(u64, u64)], lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let mut left = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let end = start.saturating_add(len);
        if start < lo {
            left.push((start, end.min(lo) - start));
        }
        if end > hi {
            let from = start.max(hi);
            left.push((from, end - from));
        }
    }
    left
}

/// Where the file's data ends, rounded up to its block: what regions cover.
pub fn data_end(metadata: &std::fs::Metadata) -> u64 {
    let block = metadata.blksize().max(512);
    metadata.size().div_ceil(block).saturating_mul(block)
}

/// The device ranges of the file's data as regions cover them (cut at [`data_end`]), from
/// one FIEMAP of the whole file (`sync`: after writeback, as dmstats maps).
pub fn data_ranges(file: &File, sync: bool) -> std::io::Result<Vec<crate::sectors::SectorRange>> {
    let metadata = file.metadata()?;
    let extents = fiemap::read_extents(file, 0, u64::MAX, sync)?;
    Ok(ExtentMap::new(extents, data_end(&metadata)).device_ranges())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_settles_what_it_takes_away() {
        let mut view = FileView::default();
        view.note_event(1 << 20, 2 << 20, true);
        view.note_event(8192, 4096, true);
        // xfs gives the preallocation past the new end back: everything from there on.
        view.note_event((1 << 20) + 65536, u64::MAX, false);
        assert_eq!(view.unsettled(), &[(1 << 20, 65536), (8192, 4096)]);
        // A removal inside a range leaves both ends unsettled; an allocation after it counts.
        view.note_event(9216, 1024, false);
        view.note_event(9216, 1024, true);
        assert_eq!(
            view.unsettled(),
            &[(1 << 20, 65536), (8192, 1024), (10240, 2048), (9216, 1024)]
        );
    }
}
