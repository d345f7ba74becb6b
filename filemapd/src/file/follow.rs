//! Following the file: has the inode been unlinked and closed (inode mode), has the path been
//! given a new file (path mode)?
use std::{fs::File, os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use anyhow::Context as _;

use crate::file::identity::FileId;

/// Whether any process other than this one holds the file open. Scans /proc/*/fd and compares
/// device and inode (a deleted file's descriptor still stats as the file).
/// Limits: a holder that opens and closes the file between two scans is missed, and so is a
/// mapping without an open descriptor (mmap after close); both are rare for VM images.
pub fn held_elsewhere(file: FileId) -> bool {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs
        .filter_map(Result::ok)
        .filter(|p| {
            p.file_name()
                .to_str()
                .is_some_and(|n| n != me && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|p| std::fs::read_dir(p.path().join("fd")).ok())
        .flatten()
        .filter_map(Result::ok)
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| FileId::of(&m) == file))
}

/// Whether the open file has no name left (all links removed).
pub fn unlinked(file: &File) -> anyhow::Result<bool> {
    Ok(file
        .metadata()
        .context("fstat of the monitored file")?
        .nlink()
        == 0)
}

/// What the path names now, if it names anything.
pub fn id_at(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| FileId::of(&m))
}

/// Re-opens the path, trying 10 times 100 ms apart as lvm2 does (a replacing writer may be
/// between unlink and rename).
pub fn reopen(path: &Path) -> anyhow::Result<File> {
    let mut last_error = None;
    for _ in 0..10 {
        match File::open(path) {
            Ok(file) => return Ok(file),
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last_error.unwrap()).with_context(|| format!("could not re-open {}", path.display()))
}
