//! dm-stats calls its per-bio accounting, where the kernel's counting probe sits, only while
//! the device has a region (`dm_stats_used`). A device whose files are counted in the kernel
//! alone (`--regions none`) gets one small region of filemapd's own: the first 8 sectors,
//! program id `filemapd`, aux_data `DMS_FILEMAPD_HOOK`. One per device whoever watches it
//! (made under a lock), left in place when the watch ends: it costs each bio one region to
//! look at, and Debian's dmstats lists it only with `--allprograms`.
use std::{fs::File, os::fd::AsRawFd as _};

use anyhow::Context as _;

use super::{RegionSettings, StatsDevice};
use crate::sectors::SectorRange;

pub const PROGRAM_ID: &str = "filemapd";
pub const AUX_DATA: &str = "DMS_FILEMAPD_HOOK";
/// Where the locks that keep two processes from making two hooks live (root's tmpfs).
const LOCKS: &str = "/run/filemapd";

/// Makes sure the device has its hook region; true when this call made it.
pub fn ensure(device: &StatsDevice) -> anyhow::Result<bool> {
    if has_hook(device)? {
        return Ok(false);
    }
    let (major, minor) = device.device_number();
    std::fs::create_dir_all(LOCKS).with_context(|| format!("creating {LOCKS}"))?;
    let path = format!("{LOCKS}/hook-{major}:{minor}.lock");
    let lock = File::create(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: flock on a descriptor we hold; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {path}"));
    }
    if has_hook(device)? {
        return Ok(false);
    }
    device
        .create(
            SectorRange::new(0, 8),
            &RegionSettings::default(),
            PROGRAM_ID,
            AUX_DATA,
        )
        .context("creating the region that keeps dm-stats' accounting on")?;
    Ok(true)
}

fn has_hook(device: &StatsDevice) -> anyhow::Result<bool> {
    Ok(device
        .list(Some(PROGRAM_ID))?
        .iter()
        .any(|r| r.aux_data == AUX_DATA))
}
