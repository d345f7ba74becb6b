//! The counting maps of a running daemon, pinned in bpffs under its pid, so that another
//! process (`filemapd show`, `filemapd report`) can read a file's in-kernel counters: WATCHED
//! gives the file's slot, COUNTERS the slot's counts. A daemon removes its directory when its tracer goes; one
//! killed outright leaves it, and the next daemon to start clears it.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use filemapd_common::{FileCounters, InodeKey, Placement, names};

const ROOT: &str = "/sys/fs/bpf/filemapd";

/// A daemon's pin directory, removed on drop.
pub struct PinDir(PathBuf);

impl PinDir {
    /// Pins `watched` and `counters` for this process; `None` (said why) when bpffs is not
    /// mounted or not writable.
    pub fn pin(watched: &Map, counters: &Map) -> Option<PinDir> {
        clear_stale();
        let dir = Path::new(ROOT).join(std::process::id().to_string());
        let result = (|| -> anyhow::Result<()> {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            watched.pin(dir.join(names::WATCHED))?;
            counters.pin(dir.join(names::COUNTERS))?;
            Ok(())
        })();
        match result {
            Ok(()) => Some(PinDir(dir)),
            Err(e) => {
                log::info!(
                    "in-kernel counters not readable by other processes (bpffs at /sys/fs/bpf?): {e:#}"
                );
                let _ = std::fs::remove_dir_all(&dir);
                None
            }
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the pin directories of processes that no longer run.
fn clear_stale() {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The in-kernel counters of the inode `key`, from whichever running daemon counts it: (its
/// pid, the counters); `None` when none does.
pub fn find_counters(key: InodeKey) -> anyhow::Result<Option<(u32, FileCounters)>> {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return Ok(None);
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let dir = entry.path();
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = dir.join(name);
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        let watched: HashMap<MapData, InodeKey, Placement> =
            HashMap::try_from(open(names::WATCHED)?)?;
        let Ok(placement) = watched.get(&key, 0) else {
            continue;
        };
        if placement.dm_dev == 0 {
            continue;
        }
        let counters: PerCpuArray<MapData, FileCounters> =
            PerCpuArray::try_from(open(names::COUNTERS)?)?;
        let values = counters.get(&placement.slot, 0)?;
        return Ok(Some((pid, FileCounters::sum(values.iter()))));
    }
    Ok(None)
}
