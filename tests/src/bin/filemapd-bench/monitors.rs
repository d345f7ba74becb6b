//! The monitors compared, started as processes of their own, and the instruments that watch
//! what they did to the kernel's region table.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use filemapd::{
    file::{extent_map::ExtentMap, fiemap, view},
    sectors::SectorRange,
    stats::{Counters, Group, StatsDevice},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monitor {
    /// No monitor: the writer alone (the baseline for interference).
    Nothing,
    Ebpf,
    /// `--ebpf` with the in-kernel counting switched off (its cost).
    EbpfUnaccounted,
    Polling,
    /// lvm2's own dmfilemapd, built by `cargo xtask bench` from Debian's source.
    Lvm2,
    /// `filemapd watch --regions none FILE`: the kernel's counters alone, no group.
    RegionsNone,
}

impl Monitor {
    pub const ALL: [Monitor; 3] = [Monitor::Ebpf, Monitor::Polling, Monitor::Lvm2];

    pub fn name(self) -> &'static str {
        match self {
            Monitor::Nothing => "no monitor",
            Monitor::Ebpf => "filemapd --ebpf",
            Monitor::EbpfUnaccounted => "filemapd --ebpf, no in-kernel counting",
            Monitor::Polling => "filemapd (polling, 0.5 s)",
            Monitor::Lvm2 => "lvm2 dmfilemapd 2.03.16 (real)",
            Monitor::RegionsNone => "filemapd watch --regions none",
        }
    }

    /// Whether the monitor follows the file with a group (all but the kernel's counters
    /// alone, which need none made for the file).
    pub fn has_group(self) -> bool {
        self != Monitor::RegionsNone
    }

    /// Whether filemapd's eBPF programs run for it.
    pub fn runs_ebpf(self) -> bool {
        matches!(
            self,
            Monitor::Ebpf | Monitor::EbpfUnaccounted | Monitor::RegionsNone
        )
    }

    /// Waits until an eBPF monitor has attached its programs and watches the file (loading
    /// them takes seconds under emulation), and is quiet, so that measuring starts as it
    /// would on a host where the daemon runs first. The others are ready once started.
    pub fn wait_ready(self, running: Option<&Running>) {
        let ready = match self {
            Monitor::Ebpf | Monitor::EbpfUnaccounted => "Waking on events only",
            Monitor::RegionsNone => "watching 1 file(s)",
            _ => return,
        };
        if let Some(running) = running {
            assert!(
                running.wait_until_settled(ready, Duration::from_secs(120)),
                "{} never said it was ready ({ready:?}), or never became quiet",
                self.name()
            );
        }
    }

    /// Starts the monitor on `path` and its group; `None` for [`Monitor::Nothing`]. Each runs
    /// with its defaults (0.5 s interval), in the foreground, in inode mode, as dmstats would
    /// start it; filemapd logs at info level to a file, for the tally it writes when it stops.
    pub fn spawn(self, path: &Path, group: u64) -> Option<Running> {
        let p = path.to_string_lossy().into_owned();
        let g = group.to_string();
        let mut log = None;
        let mut cmd = match self {
            Monitor::Nothing => return None,
            Monitor::Lvm2 => {
                let (daemon, lib) = (
                    lvm2_env("FILEMAPD_BENCH_LVM2"),
                    lvm2_env("FILEMAPD_BENCH_LVM2_LIB"),
                );
                let mut cmd = Command::new(daemon);
                cmd.args(["0", &g, &p, "inode", "1", "0"])
                    .env("LD_LIBRARY_PATH", lib)
                    .stderr(Stdio::null());
                cmd
            }
            Monitor::RegionsNone => {
                return Some(Running::filemapd(&["watch", "--regions", "none", "-v", &p]));
            }
            Monitor::Ebpf | Monitor::EbpfUnaccounted | Monitor::Polling => {
                let mut cmd = Command::new(filemapd_binary());
                if self != Monitor::Polling {
                    cmd.arg("--ebpf");
                }
                if self == Monitor::EbpfUnaccounted {
                    cmd.env("FILEMAPD_NO_COUNTING", "1");
                }
                let file = PathBuf::from(format!("/tmp/filemapd-bench-{}.log", std::process::id()));
                cmd.args(["0", &g, &p, "inode", "1", "1"])
                    .stderr(fs::File::create(&file).unwrap());
                log = Some(file);
                cmd
            }
        };
        cmd.stdin(fs::File::open(path).unwrap())
            .stdout(Stdio::null());
        Some(Running {
            child: cmd.spawn().unwrap(),
            log,
        })
    }
}

/// The filemapd built beside the benchmark (`cargo xtask bench` builds both, release).
pub fn filemapd_binary() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("filemapd")
}

fn lvm2_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the benchmark with `cargo xtask bench`, which builds lvm2's dmfilemapd")
    })
}

/// A monitor process, killed when dropped.
pub struct Running {
    child: Child,
    /// filemapd's log.
    log: Option<PathBuf>,
}

impl Running {
    /// A process started elsewhere (a `filemapd watch`).
    pub fn of(child: Child) -> Self {
        Self { child, log: None }
    }

    /// `filemapd ARGS`, its log (at info level, `-v`) in a file for [`Running::wait_for_log`].
    pub fn filemapd(args: &[&str]) -> Self {
        let file = PathBuf::from(format!(
            "/tmp/filemapd-bench-{}-{}.log",
            std::process::id(),
            args.len()
        ));
        let child = Command::new(filemapd_binary())
            .args(args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&file).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            log: Some(file),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until filemapd's log has a line with `text` (say, that its kernel filter holds
    /// the file); false after `limit`, or for a monitor without a log.
    pub fn wait_for_log(&self, text: &str, limit: Duration) -> bool {
        let Some(log) = &self.log else {
            return false;
        };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if fs::read_to_string(log).is_ok_and(|l| l.contains(text)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// [`Running::wait_for_log`], then until the process is past its start-up work (quiet,
    /// see [`crate::usage::quiet`]): what is measured next must not share the CPUs with that
    /// work. Under emulation a busy second vCPU even speeds a synchronous writer up (it never
    /// sleeps, so it is never woken): a busy loop at nice 19 took the 100-images writer from
    /// ~20 to 26-49 MB/s. False after `limit`.
    pub fn wait_until_settled(&self, text: &str, limit: Duration) -> bool {
        self.wait_for_log(text, limit) && crate::usage::quiet(self.pid(), limit).is_some()
    }

    /// Stops the monitor with SIGTERM (filemapd ends between passes and logs its tally) and
    /// returns filemapd's tally line, if it wrote one.
    pub fn stop(self) -> Option<String> {
        self.stop_and_read_log()?
            .lines()
            .find(|l| l.contains(" passes ("))
            .map(str::to_string)
    }

    /// Stops the monitor with SIGTERM and returns filemapd's whole log.
    pub fn stop_and_read_log(mut self) -> Option<String> {
        filemapd_tests::send_signal(self.child.id() as i32, nix::sys::signal::SIGTERM);
        let _ = self.child.wait();
        // A `watch` leaves its counting programs pinned for its next start: they would run
        // on every bio of the rows after this one.
        let _ = fs::remove_dir_all(filemapd::wake::ebpf::restart::pinned_links(self.child.id()));
        fs::read_to_string(self.log.as_ref()?).ok()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(log) = &self.log {
            let _ = fs::remove_file(log);
        }
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
    let wanted = sectors_of(path, offset, len);
    let started = Instant::now();
    let deadline = started + limit;
    while Instant::now() < deadline {
        let mut regions: Vec<SectorRange> =
            device.list(None).unwrap().iter().map(|r| r.range).collect();
        regions.sort_unstable_by_key(|r| r.start);
        if !wanted.is_empty() && wanted.iter().all(|w| covered(w, &regions)) {
            return true;
        }
        // Fine-grained for latencies, coarse when catching up takes seconds: each listing
        // holds dm-stats' mutex, which the monitor's creations need too.
        let pause =
            (started.elapsed() / 50).clamp(Duration::from_micros(200), Duration::from_millis(20));
        std::thread::sleep(pause);
    }
    false
}

/// The device sectors that hold bytes `offset..offset + len` of the file, as FIEMAP shows them
/// now, cut at the end of the file as the daemon's regions are.
pub fn sectors_of(path: &Path, offset: u64, len: u64) -> Vec<SectorRange> {
    let file = fs::File::open(path).unwrap();
    let eof = view::data_end(&file.metadata().unwrap());
    ExtentMap::new(
        fiemap::read_extents(&file, offset, len, false).unwrap(),
        eof,
    )
    .device_ranges()
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

/// The (one) group on `device`, or `None` when no region carries a group descriptor any more
/// (lvm2's daemon was seen to lose its group: a result to report, not a crash).
pub fn the_group(device: &StatsDevice) -> Option<Group> {
    let regions = device.list(None).unwrap();
    regions
        .iter()
        .find_map(|r| Group::find(&regions, r.id).ok().flatten())
}

/// Counters summed over the regions of the (one) group on `device`. Stop the monitor first:
/// it could delete a region between the listing and the reading.
pub fn group_counters(device: &StatsDevice) -> Option<Counters> {
    let group = the_group(device)?;
    Some(
        group
            .members()
            .map(|m| device.counters(m.id).unwrap())
            .sum(),
    )
}

/// The sectors written that filemapd's exit log says the kernel counted before their regions
/// existed ("... counted in the kernel: R reads (S sectors, x ms), W writes (T sectors, y ms)").
pub fn kernel_sectors_written(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("counted in the kernel:"))?;
    let writes = line.split("), ").nth(1)?;
    writes
        .split('(')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
