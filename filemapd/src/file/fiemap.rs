//! Reading a file's extents with the FS_IOC_FIEMAP ioctl, and turning them into the sector
//! ranges that dm-stats regions cover.
//!
//! Written by hand on nix's ioctl macro because the `fiemap` crate cannot do what the daemon
//! needs: it always maps the whole file (no logical range, so no incremental re-read after an
//! event) and asks for 8 extents per call (1,250 ioctls for a 10,000-extent file).
use std::{io, mem, os::fd::AsFd, os::fd::AsRawFd};

use crate::sectors::{SECTOR_SHIFT, SectorRange};

/// `fe_flags` bits (linux/fiemap.h).
pub mod extent_flags {
    pub const LAST: u32 = 0x1;
    pub const UNKNOWN: u32 = 0x2;
    pub const DELALLOC: u32 = 0x4;
    pub const UNWRITTEN: u32 = 0x800;
}

/// `fm_flags`: write back the file's dirty data before mapping it.
pub const FLAG_SYNC: u32 = 0x1;

/// Extents asked for per ioctl: 512 × 56 bytes fits in 28 KiB of buffer.
const BATCH: usize = 512;

/// One extent as FIEMAP reports it, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    /// Extents without a settled physical place (delayed allocation, unknown location) cannot
    /// be given a region yet.
    pub fn is_placed(&self) -> bool {
        self.flags & (extent_flags::UNKNOWN | extent_flags::DELALLOC) == 0
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct RawFiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [RawExtent; BATCH],
}

// _IOWR('f', 11, struct fiemap): the kernel's size field is the header alone (32 bytes).
nix::ioctl_readwrite_bad!(
    fs_ioc_fiemap,
    nix::request_code_readwrite!(
        b'f',
        11,
        mem::size_of::<RawFiemap>() - BATCH * mem::size_of::<RawExtent>()
    ),
    RawFiemap
);

/// Every extent that overlaps the logical byte range `start..start + len`, in logical order.
/// `sync` sets FIEMAP_FLAG_SYNC (forces writeback first: lvm2's behaviour, costly for the writer).
pub fn read_extents(file: &impl AsFd, start: u64, len: u64, sync: bool) -> io::Result<Vec<Extent>> {
    let end = start.saturating_add(len);
    let mut extents = Vec::new();
    let mut request = Box::new(RawFiemap {
        fm_start: 0,
        fm_length: 0,
        fm_flags: 0,
        fm_mapped_extents: 0,
        fm_extent_count: BATCH as u32,
        fm_reserved: 0,
        fm_extents: [RawExtent::default(); BATCH],
    });
    let mut next = start;
    while next < end {
        request.fm_start = next;
        request.fm_length = end - next;
        request.fm_flags = if sync { FLAG_SYNC } else { 0 };
        request.fm_mapped_extents = 0;
        // SAFETY: `request` is a valid fiemap header followed by room for BATCH extents,
        // which is what fm_extent_count tells the kernel.
        loop {
            match unsafe { fs_ioc_fiemap(file.as_fd().as_raw_fd(), &mut *request) } {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(_) => break,
            }
        }
        let mapped = &request.fm_extents[..request.fm_mapped_extents as usize];
        let Some(last) = mapped.last() else { break };
        extents.extend(mapped.iter().map(|e| Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            length: e.fe_length,
            flags: e.fe_flags,
        }));
        if last.fe_flags & extent_flags::LAST != 0 {
            break;
        }
        next = last.fe_logical + last.fe_length;
    }
    Ok(extents)
}

/// The sector ranges a file occupies on its device, as lvm2 maps them into regions: placed
/// extents only, physically contiguous neighbours merged into one range, bytes → sectors.
pub fn device_ranges(extents: &[Extent]) -> Vec<SectorRange> {
    let mut merged: Vec<(u64, u64)> = Vec::new(); // (physical, length) in bytes
    for extent in extents.iter().filter(|e| e.is_placed()) {
        match merged.last_mut() {
            Some((physical, length)) if *physical + *length == extent.physical => {
                *length += extent.length;
            }
            _ => merged.push((extent.physical, extent.length)),
        }
    }
    merged
        .into_iter()
        .map(|(physical, length)| {
            SectorRange::new(physical >> SECTOR_SHIFT, length >> SECTOR_SHIFT)
        })
        .filter(|range| range.len > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    #[test]
    fn contiguous_extents_merge_and_convert_to_sectors() {
        let extents = [
            ext(0, 1 << 20, 4096, 0),
            ext(4096, (1 << 20) + 4096, 8192, extent_flags::UNWRITTEN),
            ext(12288, 8 << 20, 4096, extent_flags::LAST),
        ];
        assert_eq!(
            device_ranges(&extents),
            vec![SectorRange::new(2048, 24), SectorRange::new(16384, 8)]
        );
    }

    #[test]
    fn unplaced_extents_are_skipped_and_do_not_break_a_run() {
        let extents = [
            ext(0, 4096, 4096, 0),
            ext(
                4096,
                0,
                4096,
                extent_flags::DELALLOC | extent_flags::UNKNOWN,
            ),
            ext(8192, 8192, 4096, extent_flags::LAST),
        ];
        assert_eq!(device_ranges(&extents), vec![SectorRange::new(8, 16)]);
    }

    #[test]
    fn logically_discontiguous_but_physically_adjacent_extents_merge() {
        // lvm2 merges on physical adjacency alone; a hole in the file does not split a region.
        let extents = [ext(0, 0x10000, 4096, 0), ext(1 << 20, 0x11000, 4096, 0)];
        assert_eq!(device_ranges(&extents), vec![SectorRange::new(128, 16)]);
    }

    #[test]
    fn no_extents_no_ranges() {
        assert!(device_ranges(&[]).is_empty());
    }
}
