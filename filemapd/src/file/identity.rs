//! Which inode on which device a file is, in the encodings user space and the kernel use.
use std::os::unix::fs::MetadataExt as _;

use filemapd_common::InodeKey;

/// The file's device and inode as `fstat` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// glibc's dev_t encoding.
    pub st_dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(metadata: &std::fs::Metadata) -> Self {
        Self {
            st_dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }

    /// The key the eBPF programs compare against: tracepoints print the kernel's internal
    /// dev_t (`major << 20 | minor`), not glibc's encoding.
    pub fn inode_key(&self) -> InodeKey {
        InodeKey {
            dev: kernel_dev(self.st_dev),
            _pad: 0,
            ino: self.ino,
        }
    }
}

/// glibc dev_t → the kernel's internal `MKDEV(major, minor)`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    (libc::major(st_dev) << 20) | (libc::minor(st_dev) & 0xfffff)
}

/// The tracepoint category that reports allocations for the file system holding `file`
/// (ext2/3/4 share ext4's driver and magic), if filemapd has programs for it.
pub fn tracepoint_category(file: &std::fs::File) -> Option<&'static str> {
    const EXT4_SUPER_MAGIC: i64 = 0xef53;
    const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
    match nix::sys::statfs::fstatfs(file).ok()?.filesystem_type().0 as i64 {
        EXT4_SUPER_MAGIC => Some("ext4"),
        XFS_SUPER_MAGIC => Some("xfs"),
        _ => None,
    }
}

/// btrfs's statfs magic: its FIEMAP reports logical addresses within its own chunk mapping,
/// not places on the block device.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// Refuses files whose extents cannot be turned into regions: not a regular file, or on btrfs.
/// (Whether the device is a device-mapper device is checked when the device is opened.)
pub fn check_mappable(
    file: &std::fs::File,
    path: &std::path::Path,
) -> anyhow::Result<std::fs::Metadata> {
    use anyhow::Context as _;
    let metadata = file
        .metadata()
        .with_context(|| format!("fstat {}", path.display()))?;
    anyhow::ensure!(
        metadata.is_file(),
        "{} is not a regular file",
        path.display()
    );
    let fs =
        nix::sys::statfs::fstatfs(file).with_context(|| format!("fstatfs {}", path.display()))?;
    anyhow::ensure!(
        fs.filesystem_type().0 as i64 != BTRFS_SUPER_MAGIC,
        "{}: btrfs does not provide physical FIEMAP extent data",
        path.display()
    );
    Ok(metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_glibc_dev_t_to_kernel_encoding() {
        // 253:3 (a dm device) and 7:0 (loop0); glibc puts minor's high bits above major's.
        assert_eq!(kernel_dev(libc::makedev(253, 3)), (253 << 20) | 3);
        assert_eq!(kernel_dev(libc::makedev(7, 0)), 7 << 20);
        assert_eq!(kernel_dev(libc::makedev(259, 300)), (259 << 20) | 300);
    }
}
