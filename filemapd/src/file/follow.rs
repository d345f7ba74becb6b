//! Following the file: has the inode been unlinked and closed (inode mode), has the path been
//! given a new file (path mode)?
use std::{
    fs::File,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;

use crate::file::identity::{FileId, check_mappable};

/// Whether any process other than this one holds the file open (see [`held_by_others`]).
pub fn held_elsewhere(file: FileId) -> bool {
    !held_by_others(|held| held == file).is_empty()
}

/// The files that processes other than this one hold open, of those `wanted` picks. Scans
/// /proc/*/fd and compares device and inode (a deleted file's descriptor still stats as the
/// file). Limits: a holder that opens and closes the file between two scans is missed, and
/// so is a mapping without an open descriptor (mmap after close); both are rare for VM
/// images.
pub fn held_by_others(wanted: impl Fn(FileId) -> bool) -> Vec<FileId> {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut held: Vec<FileId> = procs
        .filter_map(Result::ok)
        .filter(|p| {
            p.file_name()
                .to_str()
                .is_some_and(|n| n != me && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|p| std::fs::read_dir(p.path().join("fd")).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .map(|m| FileId::of(&m))
        .filter(|&id| wanted(id))
        .collect();
    held.sort_unstable_by_key(|id| (id.st_dev, id.ino));
    held.dedup();
    held
}

/// Whether the open file has no name left (all links removed).
pub fn unlinked(file: &File) -> anyhow::Result<bool> {
    Ok(file
        .metadata()
        .context("fstat of the monitored file")?
        .nlink()
        == 0)
}

/// What the path itself names now (a symlink is not followed), if it names anything.
pub fn id_at(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path).ok().map(|m| FileId::of(&m))
}

/// The file that replaced the followed one at its path, once vetted.
pub struct Replacement {
    pub file: File,
    pub metadata: std::fs::Metadata,
}

/// Opens what the path names now, for path mode to follow in place of the file it had: a
/// daemon running as root must not be steered by whoever can write to the directory into
/// mapping another file. `Ok(Err(reason))` when the new file is refused: a symbolic link (not
/// followed), a file on another device, another owner's file, or no regular file at all.
/// While the path names nothing, tries 10 times 100 ms apart as lvm2 does (a replacing
/// writer may be between unlink and rename); an error when it still names nothing.
pub fn reopen(path: &Path, device: u64, owner: u32) -> anyhow::Result<Result<Replacement, String>> {
    let mut tries = 0;
    let file = loop {
        match File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => break file,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Ok(Err("it is a symbolic link".into()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 9 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("could not re-open {}", path.display()));
            }
        }
    };
    let metadata = match check_mappable(&file, path) {
        Ok(metadata) => metadata,
        Err(e) => return Ok(Err(format!("{e:#}"))),
    };
    Ok(vet(&metadata, device, owner).map(|()| Replacement { file, metadata }))
}

/// The checks on the replacing file's identity ([`reopen`]).
fn vet(new: &std::fs::Metadata, device: u64, owner: u32) -> Result<(), String> {
    if new.dev() != device {
        return Err("it is on another device".into());
    }
    if new.uid() != owner {
        return Err(format!(
            "it belongs to uid {}, the file it replaced to uid {owner}",
            new.uid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory under the system's temp dir, removed on drop.
    struct Scratch(std::path::PathBuf);
    impl Scratch {
        fn new(label: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("filemapd-follow-{label}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_replacement_by_the_same_owner_on_the_same_device_is_taken() {
        let dir = Scratch::new("same");
        let path = dir.0.join("vm.img");
        std::fs::write(&path, b"x").unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert!(matches!(reopen(&path, m.dev(), m.uid()), Ok(Ok(_))));
    }

    #[test]
    fn symlinks_other_devices_and_other_owners_are_refused() {
        let dir = Scratch::new("refused");
        let target = dir.0.join("secret");
        std::fs::write(&target, b"x").unwrap();
        let m = std::fs::metadata(&target).unwrap();
        let link = dir.0.join("vm.img");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let refusal = |path: &Path, dev, uid| match reopen(path, dev, uid).unwrap() {
            Ok(_) => panic!("{} was taken", path.display()),
            Err(reason) => reason,
        };
        assert_eq!(refusal(&link, m.dev(), m.uid()), "it is a symbolic link");
        assert_eq!(
            refusal(&target, m.dev() + 1, m.uid()),
            "it is on another device"
        );
        assert!(refusal(&target, m.dev(), m.uid() + 1).contains(&format!("uid {}", m.uid())));
        let fifo = dir.0.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(refusal(&fifo, m.dev(), m.uid()).contains("not a regular file"));
    }

    #[test]
    fn a_path_that_stays_empty_is_an_error() {
        let dir = Scratch::new("empty");
        assert!(reopen(&dir.0.join("gone"), 0, 0).is_err());
    }
}
