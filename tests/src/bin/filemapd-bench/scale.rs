//! Scale: one file with 10,000 extents (what does one update cost?), and 1,000 files in one
//! `filemapd watch` process (memory and idle cost).
use std::{
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use filemapd::{
    dmstats::{StatsDevice, group::GroupDescriptor, region::RegionSettings},
    fiemap,
};
use filemapd_tests::{DmFs, FsKind, map_without_daemon, write_and_sync};

use crate::{
    monitors::{Monitor, Running, wait_covered},
    ms, quantile, report,
    usage::{Usage, quiet, rss_kib},
};

const BLOCK: u64 = 4096;
const EXTENTS: u64 = 10_000;
const UPDATES: u64 = 10;

pub fn run() {
    many_extents();
    many_files(1000);
}

/// A file of EXTENTS one-block extents (every other block punched out); each update fills
/// one hole with fsync. Cost: time until a region covers it, and the monitor's CPU time from
/// the write until it has been quiet for a second.
fn many_extents() {
    report!("## Scale: one file with {EXTENTS} extents\n");
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("fragmented.img");
    write_and_sync(&path, 0, (2 * EXTENTS * BLOCK) as usize).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    for i in 0..EXTENTS {
        punch(&file, (2 * i + 1) * BLOCK, BLOCK);
    }
    file.sync_all().unwrap();
    let extents = fiemap::read_extents(&file, 0, u64::MAX, false)
        .unwrap()
        .len();
    let device = StatsDevice::for_st_dev(file.metadata().unwrap().dev()).unwrap();
    let size = file.metadata().unwrap().size();
    report!(
        "ext4, {extents} extents. Each of {UPDATES} updates writes one 4 KiB block into a hole"
    );
    report!(
        "(with fsync), once the monitor is past its start-up. Latency: fsync → a region covers"
    );
    report!(
        "it. Update CPU: the monitor's CPU time from the write until a second after the region"
    );
    report!("appeared, less its idle rate (measured just before) over that time.\n");
    report!("| monitor | idle CPU ms/s | median update ms | median update CPU ms |");
    report!("| --- | --- | --- | --- |");
    let mut medians = Vec::new();
    for (round, monitor) in Monitor::ALL.into_iter().enumerate() {
        let group = map_without_daemon(&path).unwrap();
        let running = monitor.spawn(&path, group).unwrap();
        assert!(wait_covered(
            &device,
            &path,
            0,
            size,
            Duration::from_secs(600)
        ));
        quiet(running.pid(), Duration::from_secs(120));
        let idle_window = Duration::from_secs(5);
        let idle = cpu_over(&running, idle_window).as_secs_f64() / idle_window.as_secs_f64();
        let (mut latencies, mut cpus) = (Vec::new(), Vec::new());
        for k in 0..UPDATES {
            let hole = (2 * (round as u64 * UPDATES + k) + 1) * BLOCK;
            let before = Usage::of(running.pid());
            let started = Instant::now();
            write_and_sync(&path, hole, BLOCK as usize).unwrap();
            let synced = Instant::now();
            assert!(wait_covered(
                &device,
                &path,
                hole,
                BLOCK,
                Duration::from_secs(60)
            ));
            latencies.push(synced.elapsed());
            std::thread::sleep(Duration::from_secs(1));
            // The update's share: what the monitor used beyond its idle rate meanwhile.
            let used = Usage::of(running.pid()).since(before).cpu;
            cpus.push(used.saturating_sub(started.elapsed().mul_f64(idle)));
        }
        latencies.sort_unstable();
        cpus.sort_unstable();
        let (latency, cpu) = (quantile(&latencies, 0.5), quantile(&cpus, 0.5));
        medians.push((monitor, latency, cpu));
        report!(
            "| {} | {:.1} | {:.1} | {:.1} |",
            monitor.name(),
            idle * 1000.0,
            ms(latency),
            ms(cpu)
        );
        drop(running);
        filemapd_tests::run("dmstats", &["delete", "--allregions", &dmfs.name]).unwrap();
    }
    let of = |m: Monitor| medians.iter().find(|(x, ..)| *x == m).unwrap();
    let (_, ebpf_latency, ebpf_cpu) = of(Monitor::Ebpf);
    let (_, ref_latency, ref_cpu) = of(Monitor::Reference);
    report!(
        "\n- lvm2 policy / filemapd --ebpf: update latency {:.0}×, update CPU {:.1}× (target ≥ 50× cheaper)\n",
        ms(*ref_latency) / ms(*ebpf_latency).max(0.001),
        ms(*ref_cpu) / ms(*ebpf_cpu).max(0.001)
    );
}

fn punch(file: &fs::File, offset: u64, len: u64) {
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    assert_eq!(
        rc,
        0,
        "punching a hole: {}",
        std::io::Error::last_os_error()
    );
}

fn cpu_over(running: &Running, over: Duration) -> Duration {
    let before = Usage::of(running.pid());
    std::thread::sleep(over);
    Usage::of(running.pid()).since(before).cpu
}

/// `files` small files, each in its own one-region group, all watched by one process.
fn many_files(files: usize) {
    report!("## Scale: {files} files in one `filemapd watch` process\n");
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let dir = &dmfs.mount.dir;
    let paths: Vec<_> = (0..files).map(|i| dir.join(format!("vm{i}.img"))).collect();
    for path in &paths {
        fs::write(path, vec![0x5a; 64 << 10]).unwrap();
    }
    filemapd_tests::run("sync", &[]).unwrap();
    let device = StatsDevice::for_st_dev(fs::metadata(dir).unwrap().dev()).unwrap();
    let mut config = String::new();
    for (i, path) in paths.iter().enumerate() {
        let group = make_group(&device, path, &format!("vm{i}"));
        config.push_str(&format!("{group} inode {}\n", path.display()));
    }
    let config_path = dir.join("watch.conf");
    fs::write(&config_path, config).unwrap();
    report!(
        "ext4, {files} files of 64 KiB, one group each. Start-up: until the process first used"
    );
    report!(
        "under 2 % of a CPU over 2 s (\"never quiet\": not within 120 s). Then RSS, and wake-ups"
    );
    report!(
        "and CPU over 30 s. Latency: one file grows by 64 KiB (fsync) → a region covers it, median"
    );
    report!("of 5.\n");
    report!("| mode | start-up s | RSS MiB | wake-ups / min | CPU ms / min | growth latency ms |");
    report!("| --- | --- | --- | --- | --- | --- |");
    for ebpf in [true, false] {
        let mut cmd = Command::new(
            std::env::current_exe()
                .unwrap()
                .parent()
                .unwrap()
                .join("filemapd"),
        );
        cmd.args(["watch", "--config", &config_path.to_string_lossy()]);
        if ebpf {
            cmd.arg("--ebpf");
        }
        let started = Instant::now();
        let running = Running::new(cmd.stdout(Stdio::null()).spawn().unwrap());
        let start_up = quiet(running.pid(), Duration::from_secs(120))
            .map_or("never quiet".to_string(), |_| {
                format!("{:.1}", started.elapsed().as_secs_f64())
            });
        let over = Duration::from_secs(30);
        let before = Usage::of(running.pid());
        std::thread::sleep(over);
        let (wakeups, cpu_ms) = Usage::of(running.pid()).since(before).per_minute(over);
        let rss = rss_kib(running.pid()) as f64 / 1024.0;
        let mut latencies = Vec::new();
        for k in 0..5 {
            let path = &paths[k * files / 5];
            let offset = fs::metadata(path).unwrap().len();
            write_and_sync(path, offset, 64 << 10).unwrap();
            let synced = Instant::now();
            let covered = wait_covered(&device, path, offset, 64 << 10, Duration::from_secs(30));
            latencies.push(if covered {
                synced.elapsed()
            } else {
                Duration::MAX
            });
        }
        latencies.sort_unstable();
        let median = quantile(&latencies, 0.5);
        report!(
            "| {} | {start_up} | {rss:.1} | {wakeups:.0} | {cpu_ms:.0} | {} |",
            if ebpf {
                "filemapd watch --ebpf"
            } else {
                "filemapd watch (polling, 0.5 s)"
            },
            if median == Duration::MAX {
                "> 30000".to_string()
            } else {
                format!("{:.1}", ms(median))
            }
        );
    }
    report!("\nTarget: < 50 MiB RSS for 1,000 files.\n");
}

/// A one-region group over a one-extent file, as `dmstats create --filemap` would make it
/// (made directly: a thousand dmstats runs under emulation would take minutes).
fn make_group(device: &StatsDevice, path: &Path, alias: &str) -> u64 {
    let file = fs::File::open(path).unwrap();
    let ranges = fiemap::device_ranges(&fiemap::read_extents(&file, 0, u64::MAX, false).unwrap());
    assert_eq!(ranges.len(), 1, "{} has one extent", path.display());
    let id = device
        .create(ranges[0], &RegionSettings::default(), "dmstats", "-")
        .unwrap();
    let descriptor = GroupDescriptor {
        alias: alias.to_string(),
        quoted: false,
        members: [id].into_iter().collect(),
        user_aux: Some("-".to_string()),
    };
    device.set_aux(id, &descriptor.to_string()).unwrap();
    id
}
