//! Files that turn up in watched directories. inotify tells of names coming and going in
//! the directories, and of writes only to the files not taken up yet (an image made empty is
//! mapped once written to): a write to an image already watched is no news, and hearing of
//! each would wake the watch at every write of every image on the host.
use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use log::warn;

use super::PathSpec;
use crate::wake::notify::{Notices, Notifier};

#[derive(Default)]
pub(super) struct NewFiles {
    /// The directories' own inotify instance (made at the first directory): inotify keeps one
    /// set of events per inode and instance, and a waiting file's write notices must not
    /// change what its monitor hears once it is taken up (nor the reverse).
    notifier: Option<Notifier>,
    /// None without directories, or when inotify failed (said): new files then wait for
    /// SIGHUP.
    notices: Option<Notices>,
    /// The directories' files not taken up yet, each with the reason last said.
    waiting: HashMap<PathBuf, String>,
}

impl NewFiles {
    /// Notices for these directories from now on, instead of those before.
    pub fn watch(&mut self, directories: &[PathSpec]) {
        self.notices = None;
        if directories.is_empty() {
            return;
        }
        if self.notifier.is_none() {
            self.notifier = Notifier::spawn_or_warn();
        }
        let dirs: Vec<&Path> = directories.iter().map(|d| d.path.as_path()).collect();
        self.notices = self.notifier.as_ref().and_then(|n| {
            n.watch_directories(&dirs)
                .inspect_err(|e| warn!("new files will wait for SIGHUP: {e:#}"))
                .ok()
        });
    }

    /// Whether any notice can come (else a sweep finds nothing new).
    pub fn are_noticed(&self) -> bool {
        self.notices.is_some()
    }

    /// The next notice; never without notices.
    pub async fn next(&mut self) -> anyhow::Result<()> {
        match &mut self.notices {
            Some(notices) => notices.next().await,
            None => std::future::pending().await,
        }
    }

    /// `file` is not taken up, for `why`: its writes are noticed from the next
    /// [`NewFiles::swept`] on. True when the reason is news, to be said.
    pub fn waits(&mut self, file: &Path, why: String) -> bool {
        self.waiting
            .insert(file.to_path_buf(), why.clone())
            .as_ref()
            != Some(&why)
    }

    /// `file` is watched now.
    pub fn taken_up(&mut self, file: &Path) {
        self.waiting.remove(file);
    }

    /// After a sweep of the directories, which listed `listed`: what left them waits no more,
    /// and inotify tells of writes to exactly the files still waiting.
    pub fn swept(&mut self, listed: &HashSet<PathBuf>) {
        self.waiting.retain(|file, _| listed.contains(file));
        if let Some(notices) = &mut self.notices {
            notices.notice_writes_to(&self.waiting.keys().cloned().collect());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_news_once_until_it_changes() {
        let mut new_files = NewFiles::default();
        let file = Path::new("/images/a.img");
        assert!(new_files.waits(file, "no extents".into()));
        assert!(!new_files.waits(file, "no extents".into()));
        assert!(new_files.waits(file, "not on dm".into()));
        new_files.taken_up(file);
        assert!(new_files.waits(file, "not on dm".into()));
    }

    #[test]
    fn a_file_that_left_the_directories_waits_no_more() {
        let mut new_files = NewFiles::default();
        let (kept, gone) = (Path::new("/images/a.img"), Path::new("/images/b.img"));
        new_files.waits(kept, "no extents".into());
        new_files.waits(gone, "no extents".into());
        new_files.swept(&HashSet::from([kept.to_path_buf()]));
        assert!(!new_files.waits(kept, "no extents".into()));
        assert!(new_files.waits(gone, "no extents".into()));
    }
}
