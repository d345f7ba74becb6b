//! The monitors compared, started as processes of their own, and the instruments that watch
//! what they did to the kernel's region table.
use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use filemapd::{dmstats::StatsDevice, fiemap, group::Group, sectors::SectorRange};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Monitor {
    /// No monitor: the writer alone (the baseline for interference).
    Nothing,
    Ebpf,
    Polling,
    Reference,
}

impl Monitor {
    pub const ALL: [Monitor; 3] = [Monitor::Ebpf, Monitor::Polling, Monitor::Reference];

    pub fn name(self) -> &'static str {
        match self {
            Monitor::Nothing => "no monitor",
            Monitor::Ebpf => "filemapd --ebpf",
            Monitor::Polling => "filemapd (polling, 0.5 s)",
            Monitor::Reference => "lvm2 policy (re-created)",
        }
    }

    /// Starts the monitor on `path` and its group; `None` for [`Monitor::Nothing`]. filemapd
    /// runs with its defaults (0.5 s interval), as dmstats would start it.
    pub fn spawn(self, path: &Path, group: u64) -> Option<Running> {
        let exe = std::env::current_exe().unwrap();
        let p = path.to_string_lossy().into_owned();
        let g = group.to_string();
        let mut cmd = match self {
            Monitor::Nothing => return None,
            Monitor::Reference => {
                let mut cmd = Command::new(&exe);
                cmd.args(["reference", &p, &g]);
                cmd
            }
            Monitor::Ebpf | Monitor::Polling => {
                let mut cmd = Command::new(exe.parent().unwrap().join("filemapd"));
                if self == Monitor::Ebpf {
                    cmd.arg("--ebpf");
                }
                cmd.args(["0", &g, &p, "inode", "1"])
                    .stdin(fs::File::open(path).unwrap());
                cmd
            }
        };
        cmd.stdout(Stdio::null());
        Some(Running(cmd.spawn().unwrap()))
    }
}

/// A monitor process, killed when dropped.
pub struct Running(Child);

impl Running {
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spins (this is the measuring instrument) until regions cover the sectors backing the
/// logical bytes `offset..offset+len` of `path`; false if they do not within `limit`.
pub fn wait_covered(
    device: &StatsDevice,
    path: &Path,
    offset: u64,
    len: u64,
    limit: Duration,
) -> bool {
    let file = fs::File::open(path).unwrap();
    let wanted = fiemap::device_ranges(&fiemap::read_extents(&file, offset, len, false).unwrap());
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut regions: Vec<SectorRange> =
            device.list(None).unwrap().iter().map(|r| r.range).collect();
        regions.sort_unstable_by_key(|r| r.start);
        if !wanted.is_empty() && wanted.iter().all(|w| covered(w, &regions)) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// Whether regions sorted by start cover every sector of `wanted` between them (a tiled
/// extent is covered by several adjacent regions).
fn covered(wanted: &SectorRange, regions: &[SectorRange]) -> bool {
    let mut next = wanted.start; // the first sector not yet known to be covered
    for region in regions {
        if region.start > next {
            break;
        }
        next = next.max(region.end());
        if next >= wanted.end() {
            return true;
        }
    }
    false
}

/// Sectors written as counted by the regions of the (one) group on `device`. Stop the monitor
/// first: it could delete a region between the listing and the reading.
pub fn group_sectors_written(device: &StatsDevice) -> u64 {
    let regions = device.list(None).unwrap();
    let group = regions
        .iter()
        .find_map(|r| Group::find(&regions, r.id).unwrap())
        .expect("the device holds a group");
    group
        .members()
        .map(|m| device.counters(m.id).unwrap().sectors_written)
        .sum()
}
