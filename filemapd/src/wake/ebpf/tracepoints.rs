//! What each tracepoint the kernel half listens to means: where its fields are called what,
//! in which unit, and whether it grows or shrinks a file's mapping.
use anyhow::Context as _;
use filemapd_common::{TracepointLayout, layout_flags, tracepoint as tp};

use super::tracefs;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// File system blocks (the inode's block size).
    FsBlocks,
    Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Blocks were allocated to the file.
    Allocated,
    /// Blocks are being removed from the file (truncate, punch hole).
    Removed,
    /// The file's whole mapping was exchanged with another file's (a defragmenter): blocks
    /// moved while the size and the block count stayed the same. No range: read it all.
    Exchanged,
}

/// Where in the file an event's change lies, in the tracepoint's own fields.
#[derive(Debug)]
pub struct Range {
    /// Field holding the first logical unit affected, and its unit.
    pub start: (&'static str, Unit),
    /// Field holding how many units are affected, or the last one affected.
    pub length: (&'static str, Unit),
    /// Whether `length` is really an inclusive end.
    pub length_is_end: bool,
}

#[derive(Debug)]
pub struct Tracepoint {
    /// Index shared with the kernel half (`filemapd_common::tracepoint`).
    pub index: u32,
    pub category: &'static str,
    /// Also the name of the program in the eBPF object.
    pub name: &'static str,
    pub change: Change,
    /// `None` for a change of the whole file ([`Change::Exchanged`]).
    pub range: Option<Range>,
    /// Drop records whose field has all these bits set (see `TracepointLayout::skip`).
    pub skip: Option<(&'static str, u64)>,
    /// Fields holding where freshly allocated blocks lie (start block, block count), for the
    /// in-kernel accounting; only on tracepoints that report nothing but fresh blocks (or
    /// delayed-allocation placeholders, which `physical_skip` drops).
    pub physical: Option<(&'static str, &'static str)>,
    pub physical_skip: u64,
    /// Record an allocation only when this field has all these bits (its data flag).
    pub data_flag: Option<(&'static str, u64)>,
    /// `filemapd_common::layout_flags`.
    pub flags: u32,
}

/// xfs marks an in-core extent that has no blocks yet (delayed allocation) with a start block
/// whose top 35 bits are all set (STARTBLOCKMASK in xfs_format.h).
const XFS_DELALLOC_STARTBLOCK: u64 = ((1 << 35) - 1) << 17;

pub static TRACEPOINTS: [Tracepoint; tp::COUNT] = [
    // Every ext4 block allocation, buffered writeback and direct alike; lblk is `logical`.
    Tracepoint {
        index: tp::EXT4_ALLOCATE_BLOCKS,
        category: "ext4",
        name: "ext4_allocate_blocks",
        change: Change::Allocated,
        range: Some(Range {
            start: ("logical", Unit::FsBlocks),
            length: ("len", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: None,
        physical: Some(("block", "len")),
        physical_skip: 0,
        // EXT4_MB_HINT_DATA: a regular file's data (its extent-tree blocks come without it).
        data_flag: Some(("flags", 0x0020)),
        flags: 0,
    },
    // xfs writeback turning delayed allocation into real blocks.
    Tracepoint {
        index: tp::XFS_MAP_BLOCKS_ALLOC,
        category: "xfs",
        name: "xfs_map_blocks_alloc",
        change: Change::Allocated,
        range: Some(Range {
            start: ("startoff", Unit::FsBlocks),
            length: ("blockcount", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: None,
        physical: Some(("startblock", "blockcount")),
        // Buffered writes report their delayed-allocation reservation here too.
        physical_skip: XFS_DELALLOC_STARTBLOCK,
        data_flag: None,
        flags: 0,
    },
    // xfs allocating at write time: direct IO, unwritten extents.
    Tracepoint {
        index: tp::XFS_IOMAP_ALLOC,
        category: "xfs",
        name: "xfs_iomap_alloc",
        change: Change::Allocated,
        range: Some(Range {
            start: ("startoff", Unit::FsBlocks),
            length: ("blockcount", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: None,
        physical: Some(("startblock", "blockcount")),
        // Buffered writes report their delayed-allocation reservation here too.
        physical_skip: XFS_DELALLOC_STARTBLOCK,
        data_flag: None,
        flags: 0,
    },
    // ext4 truncate and punch hole, before the blocks go; `end` is inclusive (EXT_MAX_BLOCKS
    // for a truncate).
    Tracepoint {
        index: tp::EXT4_EXT_REMOVE_SPACE,
        category: "ext4",
        name: "ext4_ext_remove_space",
        change: Change::Removed,
        range: Some(Range {
            start: ("start", Unit::FsBlocks),
            length: ("end", Unit::FsBlocks),
            length_is_end: true,
        }),
        skip: None,
        physical: None,
        physical_skip: 0,
        data_flag: None,
        flags: 0,
    },
    // xfs unmapping blocks from a file: truncate, punch hole, collapse.
    Tracepoint {
        index: tp::XFS_BUNMAP,
        category: "xfs",
        name: "xfs_bunmap",
        change: Change::Removed,
        range: Some(Range {
            start: ("fileoff", Unit::FsBlocks),
            length: ("len", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: None,
        physical: None,
        physical_skip: 0,
        data_flag: None,
        flags: 0,
    },
    // Any new extent in an xfs file's in-core extent list with real blocks: covers fallocate
    // (unwritten extents) and writeback; delayed-allocation placeholders are skipped.
    Tracepoint {
        index: tp::XFS_IEXT_INSERT,
        category: "xfs",
        name: "xfs_iext_insert",
        change: Change::Allocated,
        range: Some(Range {
            start: ("startoff", Unit::FsBlocks),
            length: ("blockcount", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: Some(("startblock", XFS_DELALLOC_STARTBLOCK)),
        physical: Some(("startblock", "blockcount")),
        physical_skip: XFS_DELALLOC_STARTBLOCK,
        data_flag: None,
        flags: layout_flags::XFS_CONVERSION,
    },
    // An existing xfs extent grew, shrank or changed state (e.g. fallocate next to it).
    Tracepoint {
        index: tp::XFS_BMAP_POST_UPDATE,
        category: "xfs",
        name: "xfs_bmap_post_update",
        change: Change::Allocated,
        range: Some(Range {
            start: ("startoff", Unit::FsBlocks),
            length: ("blockcount", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: Some(("startblock", XFS_DELALLOC_STARTBLOCK)),
        physical: Some(("startblock", "blockcount")),
        physical_skip: XFS_DELALLOC_STARTBLOCK,
        data_flag: None,
        flags: layout_flags::XFS_CONVERSION,
    },
    // ext4 dropping a range from its extent cache: truncate and punch (beside
    // ext4_ext_remove_space), and e4defrag's extent swap (EXT4_IOC_MOVE_EXT), which fires no
    // other event for the file. `len` is a count of blocks.
    Tracepoint {
        index: tp::EXT4_ES_REMOVE_EXTENT,
        category: "ext4",
        name: "ext4_es_remove_extent",
        change: Change::Removed,
        range: Some(Range {
            start: ("lblk", Unit::FsBlocks),
            length: ("len", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: None,
        physical: None,
        physical_skip: 0,
        data_flag: None,
        flags: 0,
    },
    // xfs_fsr swapped the file's extents with a defragmented copy's (XFS_IOC_SWAPEXT), for
    // the file itself (`which` 0) and the copy (1); only the watched inode gets through.
    Tracepoint {
        index: tp::XFS_SWAP_EXTENT_AFTER,
        category: "xfs",
        name: "xfs_swap_extent_after",
        change: Change::Exchanged,
        range: None,
        skip: None,
        physical: None,
        physical_skip: 0,
        data_flag: None,
        flags: 0,
    },
    // Silent, for the accounting only: during a delayed allocation's conversion, the delayed
    // record before its update, and records removed when neighbours merge.
    Tracepoint {
        index: tp::XFS_BMAP_PRE_UPDATE,
        category: "xfs",
        name: "xfs_bmap_pre_update",
        change: Change::Allocated,
        range: Some(Range {
            start: ("startoff", Unit::FsBlocks),
            length: ("blockcount", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: None,
        physical: Some(("startblock", "blockcount")),
        physical_skip: XFS_DELALLOC_STARTBLOCK,
        data_flag: None,
        flags: layout_flags::SILENT | layout_flags::XFS_CONVERSION,
    },
    Tracepoint {
        index: tp::XFS_IEXT_REMOVE,
        category: "xfs",
        name: "xfs_iext_remove",
        change: Change::Allocated,
        range: Some(Range {
            start: ("startoff", Unit::FsBlocks),
            length: ("blockcount", Unit::FsBlocks),
            length_is_end: false,
        }),
        skip: None,
        physical: Some(("startblock", "blockcount")),
        physical_skip: XFS_DELALLOC_STARTBLOCK,
        data_flag: None,
        flags: layout_flags::SILENT | layout_flags::XFS_CONVERSION,
    },
];

impl Tracepoint {
    pub fn by_index(index: u32) -> Option<&'static Tracepoint> {
        TRACEPOINTS.get(index as usize).filter(|t| t.index == index)
    }

    /// Whether an event's physical start is a delayed allocation's placeholder: no place on
    /// the device at all.
    pub fn is_placeholder(&self, physical_start: u64) -> bool {
        self.physical_skip != 0 && physical_start & self.physical_skip == self.physical_skip
    }

    /// The logical byte range an event names, given the inode's block size; `None` when it
    /// names the whole file.
    pub fn byte_range(&self, start: u64, length: u64, block_size: u64) -> Option<(u64, u64)> {
        let range = self.range.as_ref()?;
        let bytes = |value: u64, unit| match unit {
            Unit::FsBlocks => value.saturating_mul(block_size),
            Unit::Bytes => value,
        };
        let length = if range.length_is_end {
            length.saturating_sub(start).saturating_add(1)
        } else {
            length
        };
        Some((bytes(start, range.start.1), bytes(length, range.length.1)))
    }
}

/// The layout of one tracepoint on this kernel, `None` when the kernel lacks the tracepoint.
pub(super) fn layout_of(point: &Tracepoint) -> anyhow::Result<Option<TracepointLayout>> {
    let Some(format) = tracefs::read_format(point.category, point.name)? else {
        return Ok(None);
    };
    let field = |name: &str| {
        tracefs::find_field(&format, name).with_context(|| {
            format!(
                "tracepoint {}:{} has no field {name:?}",
                point.category, point.name
            )
        })
    };
    let (skip, skip_mask) = match point.skip {
        Some((name, mask)) => (field(name)?, mask),
        None => (Default::default(), 0),
    };
    // A change of the whole file has no range: its start and length read as 0.
    let (start, length) = match &point.range {
        Some(range) => (field(range.start.0)?, field(range.length.0)?),
        None => Default::default(),
    };
    let (data_flags, data_mask) = match point.data_flag {
        Some((name, mask)) => (field(name)?, mask),
        None => (Default::default(), 0),
    };
    let (physical_start, physical_length) = match point.physical {
        Some((start, length)) => (field(start)?, field(length)?),
        None => Default::default(),
    };
    Ok(Some(TracepointLayout {
        dev: field("dev")?,
        ino: field("ino")?,
        start,
        length,
        skip,
        physical_start,
        physical_length,
        flags: point.flags,
        skip_mask,
        physical_skip_mask: point.physical_skip,
        data_flags,
        _pad2: 0,
        data_mask,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_indexed_by_the_shared_constants() {
        for (i, t) in TRACEPOINTS.iter().enumerate() {
            assert_eq!(t.index as usize, i, "{} is out of place", t.name);
            assert!(std::ptr::eq(Tracepoint::by_index(t.index).unwrap(), t));
        }
        assert!(Tracepoint::by_index(tp::COUNT as u32).is_none());
    }

    #[test]
    fn block_units_scale_by_block_size() {
        let t = Tracepoint::by_index(tp::EXT4_ALLOCATE_BLOCKS).unwrap();
        assert_eq!(t.byte_range(3, 2, 4096), Some((12288, 8192)));
    }

    #[test]
    fn inclusive_ends_become_lengths() {
        let t = Tracepoint::by_index(tp::EXT4_EXT_REMOVE_SPACE).unwrap();
        assert_eq!(t.byte_range(4, 7, 1024), Some((4096, 4096)));
        assert_eq!(t.change, Change::Removed);
    }

    #[test]
    fn an_exchange_names_the_whole_file() {
        let t = Tracepoint::by_index(tp::XFS_SWAP_EXTENT_AFTER).unwrap();
        assert_eq!(t.byte_range(0, 0, 4096), None);
    }
}
