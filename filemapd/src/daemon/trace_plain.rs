//! `filemapd trace` on files that are not on device-mapper (a kernel lab's plain disk): no
//! region can exist there, so it prints each allocation and removal event of the files and,
//! after each batch of them, the file's extents as FIEMAP reads them; until SIGINT or SIGTERM.
//! What a file's IO costs is counted only on device-mapper.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use filemapd_common::InodeKey;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    daemon::trace,
    file::{fiemap, identity::FileId},
    wake::ebpf::{ONE_FILE_TABLES, Tracepoint, Tracer},
};

/// Whether `path` lies on a device-mapper device (where regions, and the counting, can be).
pub fn on_device_mapper(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| crate::stats::StatsDevice::for_st_dev(m.dev()).is_ok())
}

struct Traced {
    path: PathBuf,
    file: File,
    block_size: u64,
}

pub async fn run(paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut files: HashMap<InodeKey, Traced> = HashMap::new();
    for path in paths {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let key = FileId::of(&metadata).inode_key();
        let block_size = metadata.blksize();
        files.insert(
            key,
            Traced {
                path: path.clone(),
                file,
                block_size,
            },
        );
    }
    let mut tracer = Tracer::load(files.len() as u32 + 8, ONE_FILE_TABLES)
        .context("loading the eBPF programs")?;
    for (key, traced) in &files {
        // No placement: the kernel reports the file's events and counts nothing for it.
        tracer.watch(*key, Default::default())?;
        trace::extents(&traced.path, &read(traced)?);
    }
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            events = tracer.next_events() => {
                let mut changed = HashSet::new();
                for event in events? {
                    let Some(traced) = files.get(&event.key) else {
                        continue;
                    };
                    let logical = Tracepoint::by_index(event.source)
                        .and_then(|tp| tp.byte_range(event.start, event.length, traced.block_size));
                    trace::event(&traced.path, &event, logical, None);
                    changed.insert(event.key);
                }
                for traced in changed.iter().filter_map(|key| files.get(key)) {
                    trace::extents(&traced.path, &read(traced)?);
                }
            }
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

/// The whole file's extents (no sync: what the file system has placed so far).
fn read(traced: &Traced) -> anyhow::Result<Vec<fiemap::Extent>> {
    fiemap::read_extents(&traced.file, 0, u64::MAX, false)
        .with_context(|| format!("FIEMAP of {}", traced.path.display()))
}
