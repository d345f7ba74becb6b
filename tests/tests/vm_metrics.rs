//! `filemapd watch --metrics` against real device-mapper (run inside the VM by `cargo xtask
//! test`): what the endpoint serves equals what Debian's dmstats reports for the same group,
//! Debian's Prometheus scrapes and stores it, and the endpoint costs no wake-up while idle.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use filemapd_tests::{
    DmFs, FsKind, ScratchDir, context_switches,
    daemon::{CONVERGE, LoggedDaemon, device_of, group_by_alias, wait_converged},
    metrics::{http_get, sample},
    require_device_mapper, run, wait_until, write_and_sync,
};

/// A group made by Debian's dmstats with latency bounds (1 ms, 10 ms, 100 ms), for `watch`
/// to adopt; returns its id.
fn map_with_bounds(path: &Path) -> u64 {
    let out = run(
        "dmstats",
        &[
            "create",
            "--filemap",
            "--nomonitor",
            "--bounds",
            "1ms,10ms,100ms",
            &path.to_string_lossy(),
        ],
    )
    .unwrap();
    filemapd_tests::created_group_id(&out).unwrap()
}

/// Overwrites the file's first MiB with O_DIRECT: 2,048 sectors into blocks it already has,
/// so the group's regions count them and nothing else.
fn overwrite_first_mib(path: &Path) {
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", path.display()),
            "bs=64k",
            "count=16",
            "oflag=direct",
            "conv=notrunc,fsync",
            "status=none",
        ],
    )
    .unwrap();
}

/// `dmstats report`'s `fields` for the group (its `group` row; the others are its regions'
/// areas), as Debian's tool reads the kernel. Mind that the report clears what it read:
/// libdm reads with `@stats_print_clear`, so the counters start again from 0 after it.
fn dmstats_report(device: &str, group_id: u64, fields: &[&str]) -> Vec<u64> {
    let out = run(
        "dmstats",
        &[
            "report",
            "--groupid",
            &group_id.to_string(),
            "-o",
            &format!("obj_type,{}", fields.join(",")),
            "--noheadings",
            "--separator",
            " ",
            device,
        ],
    )
    .unwrap();
    let rows: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("group "))
        .collect();
    assert_eq!(rows.len(), 1, "one group row expected:\n{out}");
    let values: Vec<u64> = rows[0]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("not a count: {out}")))
        .collect();
    assert_eq!(values.len(), fields.len(), "{out}");
    values
}

/// The group's write sectors as the kernel has them now, through Debian's dmsetup (which,
/// unlike `dmstats report`, leaves them as they are): `@stats_print` of each region.
fn write_sectors_now(device: &str, regions: &[u64]) -> u64 {
    regions
        .iter()
        .map(|id| {
            let out = run(
                "dmsetup",
                &["message", device, "0", &format!("@stats_print {id}")],
            )
            .unwrap();
            out.lines()
                .filter_map(|l| l.split_whitespace().nth(7))
                .map(|v| v.parse::<u64>().unwrap())
                .sum::<u64>()
        })
        .sum()
}

fn watch_with_metrics(path: &Path, address: &str) -> LoggedDaemon {
    let p = path.to_string_lossy().into_owned();
    let mut watch = LoggedDaemon::start(
        &["watch", "--ebpf", "-v", "--metrics", address, &p],
        path,
        &[],
    );
    watch.wait_for_line("watching 1 file(s)");
    watch
}

/// One scrape: every per-file series agrees with dmstats and @stats_print for the group; the
/// latency histogram comes from the group's bounds; the daemon says it is event-driven.
#[test]
fn the_endpoint_serves_what_dmstats_reports() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let group = map_with_bounds(&path);
    let address = "127.0.0.1:9101";
    let watch = watch_with_metrics(&path, address);
    wait_converged(&dmfs, &path, "vm.img", "start-up");
    overwrite_first_mib(&path);

    let (status, text) = http_get(address, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let labels = [
        "alias=\"vm.img\"",
        &format!("group_id=\"{group}\""),
        &format!("device=\"{}\"", dmfs.name),
    ];
    let value = |name: &str| sample(&text, name, &labels).unwrap();
    // Nothing does IO between the scrape and the report.
    let reported = dmstats_report(
        &dmfs.name,
        group,
        &[
            "write_sector_count",
            "write_count",
            "read_sector_count",
            "read_count",
        ],
    );
    assert!(
        reported[0] >= 2048,
        "dmstats counted {} sectors written",
        reported[0]
    );
    let served = [
        "filemapd_file_write_sectors_total",
        "filemapd_file_writes_total",
        "filemapd_file_read_sectors_total",
        "filemapd_file_reads_total",
    ]
    .map(|name| value(name) as u64);
    assert_eq!(
        served.as_slice(),
        reported.as_slice(),
        "served vs dmstats report"
    );
    // The histogram: every IO in a bucket; the bounds in seconds.
    let device = device_of(&path);
    let (_, members) = group_by_alias(&device, "vm.img").unwrap();
    let ios = reported[1] + reported[3];
    assert!(ios > 0);
    assert_eq!(value("filemapd_file_io_latency_seconds_count"), ios as f64);
    let inf = sample(
        &text,
        "filemapd_file_io_latency_seconds_bucket",
        &[&labels[0], "le=\"+Inf\""],
    );
    assert_eq!(inf.unwrap(), ios as f64);
    assert!(
        sample(
            &text,
            "filemapd_file_io_latency_seconds_bucket",
            &[&labels[0], "le=\"0.001\""]
        )
        .is_ok(),
        "no 1 ms bucket:\n{text}"
    );
    // Health.
    assert_eq!(value("filemapd_file_regions"), members.len() as f64);
    assert_eq!(
        sample(&text, "filemapd_file_polling", &[&labels[0], "reason=\"\""]).unwrap(),
        0.0,
        "the file should be woken by events"
    );
    assert!(value("filemapd_file_passes_total") >= 1.0);
    assert!(text.contains("filemapd_update_seconds_count"), "{text}");
    // Anything but /metrics is not served.
    assert_eq!(http_get(address, "/").unwrap().0, 404);

    // A second watch cannot take the port: it says so in a line and exits 1.
    let p = path.to_string_lossy().into_owned();
    let out = Command::new(filemapd_tests::daemon::filemapd_binary())
        .args(["watch", "--metrics", address, &p])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot listen on 127.0.0.1:9101"),
        "{stderr}"
    );
    watch.stop();
}

/// Between scrapes the endpoint adds no wake-up to an idle event-driven watch: not one context
/// switch of any thread over a span longer than tokio's idle-thread keep-alive (10 s).
#[test]
fn an_idle_watch_serving_metrics_does_not_wake() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Xfs).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    map_with_bounds(&path);
    let address = "127.0.0.1:9102";
    let watch = watch_with_metrics(&path, address);
    wait_converged(&dmfs, &path, "vm.img", "start-up");
    // A scrape first, so that whatever it starts (the blocking thread that reads dm-stats) is
    // there to be watched.
    assert_eq!(http_get(address, "/metrics").unwrap().0, 200);
    // The scrape's own tail (the connection closed, the reading thread parked) may lag its
    // answer a little: the idle span starts a second later.
    std::thread::sleep(Duration::from_secs(1));
    let pid = watch.child.id();
    let before = (context_switches(pid), threads(pid));
    std::thread::sleep(Duration::from_secs(12)); // the span measured, not a synchronisation
    let after = (context_switches(pid), threads(pid));
    assert_eq!(
        after.0, before.0,
        "the idle watch woke up; its threads before: {:?}, after: {:?}",
        before.1, after.1
    );
    assert_eq!(http_get(address, "/metrics").unwrap().0, 200);
    watch.stop();
}

/// Each thread's name and context switches, for a failure's message.
fn threads(pid: u32) -> Vec<(String, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .map(|task| {
            let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
            let status = read("status");
            let switches = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
                .iter()
                .map(|k| filemapd_tests::status_field(&status, k))
                .sum();
            (read("comm").trim().to_string(), switches)
        })
        .collect()
}

/// Debian's Prometheus, killed on drop.
struct Prometheus {
    child: Child,
    _data: ScratchDir,
}

impl Prometheus {
    /// Scrapes `target` every second; serves its API on `listen`.
    fn start(target: &str, listen: &str) -> Self {
        let data = ScratchDir::new(Path::new("/tmp"), "prometheus").unwrap();
        let config = data.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: filemapd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let storage: PathBuf = data.0.join("tsdb");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", storage.display()))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("Debian's prometheus package (cargo xtask setup installs it)");
        let prometheus = Self { child, _data: data };
        // Up to a minute: an emulated VM starts a Go program slowly.
        wait_until("Prometheus to be ready", 2 * CONVERGE, || {
            Ok(http_get(listen, "/-/ready").is_ok_and(|(status, _)| status == 200))
        })
        .unwrap();
        prometheus
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one value of an instant query through Prometheus' HTTP API; `None` while it has none.
fn query(listen: &str, promql: &str) -> anyhow::Result<Option<f64>> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(listen, &format!("/api/v1/query?query={encoded}"))?;
    anyhow::ensure!(status == 200, "query {promql:?}: HTTP {status}: {body}");
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    let results = answer["data"]["result"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no result in {body}"))?;
    match results.as_slice() {
        [] => Ok(None),
        [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
        _ => anyhow::bail!("query {promql:?} matched {} series: {body}", results.len()),
    }
}

/// The acceptance: Prometheus, pointed at the endpoint, holds the file's write sectors as
/// `dmstats report` gives them for its group after a known write.
#[test]
fn prometheus_stores_the_write_sectors_dmstats_reports() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Xfs).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    let group = map_with_bounds(&path);
    let target = "127.0.0.1:9103";
    let watch = watch_with_metrics(&path, target);
    wait_converged(&dmfs, &path, "vm.img", "start-up");
    let listen = "127.0.0.1:9090";
    let _prometheus = Prometheus::start(target, listen);
    let promql = "filemapd_file_write_sectors_total{alias=\"vm.img\"}";
    wait_until(
        "Prometheus' first scrape of the endpoint",
        2 * CONVERGE,
        || Ok(query(listen, promql)?.is_some()),
    )
    .unwrap();

    overwrite_first_mib(&path);
    let device = device_of(&path);
    let (_, members) = group_by_alias(&device, "vm.img").unwrap();
    let regions: Vec<u64> = members.iter().map(|r| r.id).collect();
    let now = write_sectors_now(&dmfs.name, &regions);
    assert!(now >= 2048, "the kernel counted {now} sectors written");
    // Prometheus scrapes every second: wait for a scrape taken after the write.
    let mut stored = None;
    let waited = wait_until("Prometheus to store the write", 2 * CONVERGE, || {
        stored = query(listen, promql)?;
        Ok(stored == Some(now as f64))
    });
    assert!(
        waited.is_ok(),
        "Prometheus holds {stored:?}, the kernel counts {now} write sectors for group {group}"
    );
    let reported = dmstats_report(&dmfs.name, group, &["write_sector_count"])[0];
    assert_eq!(
        stored,
        Some(reported as f64),
        "Prometheus vs dmstats report for group {group}"
    );
    assert_eq!(query(listen, "up{job=\"filemapd\"}").unwrap(), Some(1.0));
    watch.stop();
}
