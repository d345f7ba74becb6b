//! Latency benchmark, run inside the device-mapper VM by `cargo xtask bench`: how long after
//! a writer's fsync returns does the group have a region covering the new data? Compares, in
//! one run and on the same kernel, filemapd with eBPF, filemapd polling, and a re-creation of
//! lvm2's policy (500 ms loop, inotify + st_blocks, FIEMAP_FLAG_SYNC, full exact re-map) that
//! lives here, in the benchmark, not in the product. Prints one markdown table row per case.
//! Writes come after a random pause of up to 500 ms, so they fall at random points of a
//! polling loop's cycle.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use filemapd::{
    dmstats::StatsDevice, fiemap, group::Group, reconcile::Mapping, sectors::SectorRange,
};
use filemapd_tests::{DmFs, FsKind, map_without_daemon, write_and_sync};

/// The monitors compared.
#[derive(Clone, Copy)]
enum Monitor {
    Ebpf,
    Polling,
    Reference,
}

impl Monitor {
    fn name(self) -> &'static str {
        match self {
            Monitor::Ebpf => "filemapd --ebpf",
            Monitor::Polling => "filemapd (polling, 0.5 s)",
            Monitor::Reference => "lvm2 policy (re-created)",
        }
    }
}

const STEP: usize = 64 << 10;
/// A step whose new data has no region after this long counts as missed (lvm2's policy misses
/// growth that does not change st_blocks, e.g. into xfs's speculative preallocation).
const MISS_AFTER: Duration = Duration::from_secs(2);

fn main() {
    let steps: usize = std::env::var("FILEMAPD_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let filemapd = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("filemapd");
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        for monitor in [Monitor::Ebpf, Monitor::Polling, Monitor::Reference] {
            let mut latencies = measure(fs_kind, monitor, steps, &filemapd);
            // Misses (None) sort last: they are slower than any measured step.
            latencies.sort_unstable_by_key(|l| l.unwrap_or(Duration::MAX));
            let missed = latencies.iter().filter(|l| l.is_none()).count();
            let at =
                |q: f64| show(latencies[((latencies.len() as f64 - 1.0) * q).round() as usize]);
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                fs_kind.name(),
                monitor.name(),
                latencies.len(),
                missed,
                at(0.5),
                at(0.99),
                show(*latencies.last().unwrap()),
            );
        }
    }
}

/// Milliseconds, or "> limit" for a step whose data was not covered in time.
fn show(latency: Option<Duration>) -> String {
    match latency {
        Some(d) => format!("{:.1}", ms(d)),
        None => format!("> {:.0}", ms(MISS_AFTER)),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Appends STEP bytes `steps` times; for each, the time from fsync's return until a region of
/// the group covers every sector of the new data.
fn measure(
    fs_kind: FsKind,
    monitor: Monitor,
    steps: usize,
    filemapd: &Path,
) -> Vec<Option<Duration>> {
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("bench.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let group = map_without_daemon(&path).unwrap();
    let device = StatsDevice::for_st_dev(fs::metadata(&path).unwrap().dev()).unwrap();
    let running = Arc::new(AtomicBool::new(true));
    let mut daemon: Option<Child> = None;
    let mut reference = None;
    match monitor {
        Monitor::Ebpf | Monitor::Polling => {
            let mut cmd = Command::new(filemapd);
            if matches!(monitor, Monitor::Ebpf) {
                cmd.args(["--ebpf", "--interval", "3600"]);
            }
            let p = path.to_string_lossy().into_owned();
            cmd.args(["0", &group.to_string(), &p, "inode", "1"])
                .stdin(fs::File::open(&path).unwrap());
            daemon = Some(cmd.spawn().unwrap());
        }
        Monitor::Reference => {
            let (path, running) = (path.clone(), Arc::clone(&running));
            reference = Some(std::thread::spawn(move || {
                reference_policy(&path, group, &running)
            }));
        }
    }
    // Settled: the first map is done when the group covers the file.
    assert!(
        wait_covered(&device, &path, 0, 1 << 20, Duration::from_secs(60)),
        "the first map never came"
    );
    let mut latencies = Vec::with_capacity(steps);
    let mut jitter = Jitter(0x9e37_79b9_7f4a_7c15);
    for _ in 0..steps {
        // A random pause first, so that writes do not fall into step with a polling loop
        // (each step ends right after a poll found the data; without it, the next write would
        // always land just after a poll and wait a whole interval).
        std::thread::sleep(jitter.next_below(Duration::from_millis(500)));
        let offset = fs::metadata(&path).unwrap().len();
        write_and_sync(&path, offset, STEP).unwrap();
        let synced = Instant::now();
        let covered = wait_covered(&device, &path, offset, STEP as u64, MISS_AFTER);
        latencies.push(covered.then(|| synced.elapsed()));
    }
    running.store(false, Ordering::SeqCst);
    if let Some(mut child) = daemon {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    if let Some(thread) = reference {
        thread.join().unwrap();
    }
    latencies
}

/// xorshift64: reproducible pauses without a dependency.
struct Jitter(u64);

impl Jitter {
    fn next_below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// Spins (this is the measuring instrument) until group regions cover the sectors backing the
/// logical bytes `offset..offset+len`; false if they do not within `limit`.
fn wait_covered(
    device: &StatsDevice,
    path: &PathBuf,
    offset: u64,
    len: u64,
    limit: Duration,
) -> bool {
    let file = fs::File::open(path).unwrap();
    let wanted = fiemap::device_ranges(&fiemap::read_extents(&file, offset, len, false).unwrap());
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let regions = device.list(None).unwrap();
        let covered = |r: &SectorRange| {
            regions
                .iter()
                .any(|g| g.range.start <= r.start && r.end() <= g.range.end())
        };
        if !wanted.is_empty() && wanted.iter().all(covered) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// lvm2's dmfilemapd loop as the reference describes it: every 500 ms read inotify; on
/// IN_MODIFY compare st_blocks; when it changed, FIEMAP the whole file with FIEMAP_FLAG_SYNC
/// and re-map exactly (a grown extent loses its region).
fn reference_policy(path: &Path, mut group_id: u64, running: &AtomicBool) {
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
    while running.load(Ordering::SeqCst) {
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
            group_id = outcome.group_id;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
