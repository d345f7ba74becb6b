//! What each tracepoint the kernel half listens to means: where its fields are called what,
//! in which unit, and whether it grows or shrinks a file's mapping.
use filemapd_common::tracepoint as tp;

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
}

#[derive(Debug)]
pub struct Tracepoint {
    /// Index shared with the kernel half (`filemapd_common::tracepoint`).
    pub index: u32,
    pub category: &'static str,
    /// Also the name of the program in the eBPF object.
    pub name: &'static str,
    pub change: Change,
    /// Field holding the first logical unit affected, and its unit.
    pub start: (&'static str, Unit),
    /// Field holding how many units are affected.
    pub length: (&'static str, Unit),
}

pub static TRACEPOINTS: [Tracepoint; tp::COUNT] = [
    // Every ext4 block allocation, buffered writeback and direct alike; lblk is `logical`.
    Tracepoint {
        index: tp::EXT4_ALLOCATE_BLOCKS,
        category: "ext4",
        name: "ext4_allocate_blocks",
        change: Change::Allocated,
        start: ("logical", Unit::FsBlocks),
        length: ("len", Unit::FsBlocks),
    },
    // xfs writeback turning delayed allocation into real blocks.
    Tracepoint {
        index: tp::XFS_MAP_BLOCKS_ALLOC,
        category: "xfs",
        name: "xfs_map_blocks_alloc",
        change: Change::Allocated,
        start: ("startoff", Unit::FsBlocks),
        length: ("blockcount", Unit::FsBlocks),
    },
    // xfs allocating at write time: direct IO, unwritten extents.
    Tracepoint {
        index: tp::XFS_IOMAP_ALLOC,
        category: "xfs",
        name: "xfs_iomap_alloc",
        change: Change::Allocated,
        start: ("startoff", Unit::FsBlocks),
        length: ("blockcount", Unit::FsBlocks),
    },
];

impl Tracepoint {
    pub fn by_index(index: u32) -> Option<&'static Tracepoint> {
        TRACEPOINTS.get(index as usize).filter(|t| t.index == index)
    }

    /// The logical byte range an event names, given the inode's block size.
    pub fn byte_range(&self, start: u64, length: u64, block_size: u64) -> (u64, u64) {
        let bytes = |value: u64, unit| match unit {
            Unit::FsBlocks => value.saturating_mul(block_size),
            Unit::Bytes => value,
        };
        (bytes(start, self.start.1), bytes(length, self.length.1))
    }
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
        assert_eq!(t.byte_range(3, 2, 4096), (12288, 8192));
    }
}
