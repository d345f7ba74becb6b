//! lvm2's dmfilemapd loop as the reference describes it, re-created for comparison: every
//! 500 ms check the group, read inotify; on IN_MODIFY compare st_blocks; when it changed,
//! FIEMAP the whole file with FIEMAP_FLAG_SYNC and re-map exactly (a grown extent loses its
//! region and its counters).
use std::{fs, os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use filemapd::{dmstats::StatsDevice, fiemap, group::Group, reconcile::Mapping};

pub fn run(path: &Path, mut group_id: u64) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let file = fs::File::open(path).unwrap();
    let device = StatsDevice::for_st_dev(file.metadata().unwrap().dev()).unwrap();
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    inotify
        .add_watch(
            path,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DELETE_SELF,
        )
        .unwrap();
    let mut blocks = u64::MAX; // map once at start, as dmstats did
    loop {
        let Some(group) = Group::load(&device, group_id).unwrap() else {
            return;
        };
        let modified = inotify
            .read_events()
            .map(|e| !e.is_empty())
            .unwrap_or(false);
        let now_blocks = file.metadata().unwrap().blocks();
        if (modified || blocks == u64::MAX) && now_blocks != blocks {
            blocks = now_blocks;
            let extents = fiemap::read_extents(&file, 0, u64::MAX, true).unwrap();
            let outcome = group
                .update(&device, &fiemap::device_ranges(&extents), Mapping::Exact)
                .unwrap();
            group_id = outcome.group.id;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
