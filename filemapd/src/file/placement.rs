//! How a file system numbers its blocks on its device, so that the kernel half can turn the
//! block numbers an allocation tracepoint reports into device sectors by itself: ext4 counts
//! blocks from the device's start; xfs numbers them per allocation group (AG), with the AG
//! number in the high bits.
use std::os::fd::AsRawFd as _;

use anyhow::{Context as _, bail};
use filemapd_common::Placement;

use super::identity::{FileId, kernel_dev, tracepoint_category};

/// `struct xfs_fsop_geom_v1` from xfs_fs.h, up to what is read here and padded to its size
/// (112 bytes). No maintained crate exposes xfs's geometry ioctl, hence this declaration.
#[repr(C)]
#[derive(Default)]
struct XfsGeometryV1 {
    blocksize: u32,
    rtextsize: u32,
    agblocks: u32,
    agcount: u32,
    _rest: [u32; 24],
}

// XFS_IOC_FSGEOMETRY_V1 = _IOR('X', 100, struct xfs_fsop_geom_v1).
nix::ioctl_read!(xfs_geometry_v1, b'X', 100, XfsGeometryV1);
// FS_IOC_GETVERSION = _IOR('v', 1, long): the inode's generation (ext4, xfs), which nix and
// libc do not wrap. The kernel writes an int, whatever the size the number encodes.
nix::ioctl_read!(inode_generation, b'v', 1, libc::c_long);

/// Where `file`'s blocks lie on the device-mapper device it sits on (`slot` left 0).
pub fn of(file: &std::fs::File, id: FileId) -> anyhow::Result<Placement> {
    let block_size = nix::sys::statfs::fstatfs(file)
        .context("fstatfs")?
        .block_size() as u64;
    let sector_shift = shift_of(block_size)?;
    // The kernel's sector map holds a file's sectors in units of 4 KiB (see
    // filemapd_common::sector_map): a smaller block could share a unit with another file.
    if block_size < 4096 {
        bail!(
            "its file system's blocks are {block_size} bytes: the kernel counts in units of 4 KiB"
        );
    }
    let (ag_block_log, ag_blocks) = match tracepoint_category(file) {
        Some("xfs") => {
            let mut geometry = XfsGeometryV1::default();
            // SAFETY: the ioctl fills a struct of the size its number encodes.
            unsafe { xfs_geometry_v1(file.as_raw_fd(), &mut geometry) }
                .context("XFS_IOC_FSGEOMETRY_V1")?;
            if geometry.blocksize as u64 != block_size || geometry.agblocks == 0 {
                bail!(
                    "xfs geometry disagrees with statfs (block size {} vs {block_size}, {} blocks per AG)",
                    geometry.blocksize,
                    geometry.agblocks
                );
            }
            (ag_block_log(geometry.agblocks), geometry.agblocks as u64)
        }
        Some(_) => (0, 0),
        None => bail!("not on a file system with allocation tracepoints"),
    };
    Ok(Placement {
        dm_dev: kernel_dev(id.st_dev),
        slot: 0,
        sector_shift,
        ag_block_log,
        ag_blocks,
        generation: generation_of(file),
        _pad: 0,
    })
}

/// The inode's generation: with its device and number, it names the file itself (a new file
/// may reuse a deleted one's inode number, not its generation). 0 where the file system
/// does not say.
pub fn generation_of(file: &std::fs::File) -> u32 {
    let mut generation: libc::c_long = 0;
    // SAFETY: the ioctl writes at most a long into the value given.
    match unsafe { inode_generation(file.as_raw_fd(), &mut generation) } {
        Ok(_) => generation as u32,
        Err(_) => 0,
    }
}

/// log2(block size / 512).
fn shift_of(block_size: u64) -> anyhow::Result<u32> {
    if !block_size.is_power_of_two() || block_size < 512 {
        bail!("block size {block_size} is not a power of two of at least 512");
    }
    Ok(block_size.trailing_zeros() - 9)
}

/// xfs's sb_agblklog: the bits an AG's block number takes, log2 of agblocks rounded up.
fn ag_block_log(ag_blocks: u32) -> u32 {
    32 - (ag_blocks - 1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_become_sector_shifts() {
        assert_eq!(shift_of(4096).unwrap(), 3);
        assert_eq!(shift_of(1024).unwrap(), 1);
        assert!(shift_of(3000).is_err());
    }

    #[test]
    fn ag_numbers_sit_above_the_rounded_up_log() {
        assert_eq!(ag_block_log(65536), 16);
        assert_eq!(ag_block_log(65537), 17);
        // mkfs.xfs on a 512 MiB device: 4 AGs of 32768 blocks.
        assert_eq!(ag_block_log(32768), 15);
        assert_eq!(ag_block_log(20000), 15);
    }

    #[test]
    fn the_geometry_struct_has_the_kernels_size() {
        assert_eq!(size_of::<XfsGeometryV1>(), 112);
    }
}
