//! `filemapd watch --metrics` against real device-mapper (run inside the VM by `cargo xtask
//! test`): what the endpoint serves equals what Debian's dmstats reports for the same group,
//! and the endpoint costs no wake-up while idle. Prometheus itself: vm_service.
use std::{path::Path, process::Command, time::Duration};

use filemapd_tests::{
    DmFs, FsKind, context_switches,
    daemon::{LoggedDaemon, device_of, file_ranges, group_by_alias, wait_converged},
    metrics::{
        dashboard_queries, dmstats_report, has_samples, http_get, map_with_bounds, metric_names,
        overwrite_first_mib, sample,
    },
    punch_hole, require_device_mapper, write_and_sync,
    writers::{direct_read_whole, random_direct_writes},
};

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
    // Series are labelled by the path alone; the rest is the info series'.
    let path_label = format!("path=\"{}\"", path.display());
    let labels = [path_label.as_str()];
    let value = |name: &str| sample(&text, name, &labels).unwrap();
    assert_eq!(
        sample(
            &text,
            "filemapd_file_info",
            &[
                labels[0],
                "alias=\"vm.img\"",
                &format!("group_id=\"{group}\""),
                &format!("device=\"{}\"", dmfs.name),
                "counted_by=\"kernel\"",
            ]
        )
        .unwrap(),
        1.0,
        "{text}"
    );
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
        &[labels[0], "le=\"+Inf\""],
    );
    assert_eq!(inf.unwrap(), ios as f64);
    assert!(
        sample(
            &text,
            "filemapd_file_io_latency_seconds_bucket",
            &[labels[0], "le=\"0.001\""]
        )
        .is_ok(),
        "no 1 ms bucket:\n{text}"
    );
    // Health.
    assert_eq!(value("filemapd_file_regions"), members.len() as f64);
    assert_eq!(
        sample(&text, "filemapd_file_polling", &[labels[0], "reason=\"\""]).unwrap(),
        0.0,
        "the file should be woken by events"
    );
    assert!(value("filemapd_file_passes_total") >= 1.0);
    assert_eq!(
        value("filemapd_file_uncounted_runs"),
        0.0,
        "the default sector map has room for a small file"
    );
    assert!(text.contains("filemapd_update_seconds_count"), "{text}");
    // Every series the shipped Grafana dashboard reads is served.
    for query in dashboard_queries() {
        for name in metric_names(&query) {
            assert!(
                has_samples(&text, &name),
                "the dashboard reads {name} ({query}), which the scrape lacks:\n{text}"
            );
        }
    }

    // Growth: the kernel counts all of the file's IO, the writes that came before their
    // regions too (its info says so, above); `dmstats report` (which clears the regions'
    // counters as it reads them) changes nothing of it.
    let written_sectors =
        |text: &str| sample(text, "filemapd_file_write_sectors_total", &labels).unwrap();
    let before = written_sectors(&http_get(address, "/metrics").unwrap().1);
    let written = random_direct_writes(&path, 2 << 20, 8 << 20, 7) / 512;
    wait_converged(&dmfs, &path, "vm.img", "growth");
    let text = http_get(address, "/metrics").unwrap().1;
    assert_eq!(written_sectors(&text) - before, written as f64, "{text}");
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

/// A sector map sized for fewer extents than the file has (`--kernel-map-extents 1`: 16
/// chunk entries) cannot hold all of its sectors: the daemon says so once, the gauge
/// `filemapd_file_uncounted_runs` gives the same count, and a read of the whole file is
/// counted short by the kernel, as the gauge warns.
#[test]
fn a_sector_map_too_small_says_what_goes_uncounted() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("holey.img");
    // 64 runs of 256 KiB, each in a chunk of its own or two: more than 16 chunk entries.
    write_and_sync(&path, 0, 32 << 20).unwrap();
    for run in (0..128u64).step_by(2) {
        punch_hole(&path, run << 18, 1 << 18).unwrap();
    }
    let p = path.to_string_lossy().into_owned();
    let address = "127.0.0.1:9104";
    let mut watch = LoggedDaemon::start(
        &[
            "watch",
            "--regions",
            "none",
            "--kernel-map-extents",
            "1",
            "-v",
            "--metrics",
            address,
            &p,
        ],
        &path,
        &[],
    );
    watch.wait_for_line("sized for 1 scattered extents");
    watch.wait_for_line("has no room for");
    let labels = [format!("path=\"{p}\"")];
    let labels = [labels[0].as_str()];
    // The pass publishes its figures just after it warns.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let gauge = loop {
        let text = http_get(address, "/metrics").unwrap().1;
        let gauge = sample(&text, "filemapd_file_uncounted_runs", &labels).unwrap();
        if gauge > 0.0 || std::time::Instant::now() > deadline {
            break gauge;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let held: u64 = file_ranges(&path).iter().map(|r| r.len).sum();
    let before = sample(
        &http_get(address, "/metrics").unwrap().1,
        "filemapd_file_read_sectors_total",
        &labels,
    )
    .unwrap();
    direct_read_whole(&path);
    let text = http_get(address, "/metrics").unwrap().1;
    let read = sample(&text, "filemapd_file_read_sectors_total", &labels).unwrap() - before;
    let log = watch.stop();
    let warnings: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("has no room for"))
        .collect();
    let [warning] = warnings.as_slice() else {
        panic!("said {} times:\n{}", warnings.len(), log.join("\n"));
    };
    let said: f64 = warning
        .split("has no room for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {warning:?}"));
    eprintln!("{said} runs without room; {read} of {held} sectors read counted");
    assert!(said > 0.0, "{warning}");
    assert_eq!(gauge, said, "the gauge and the warning: {warning}");
    assert!(
        read > 0.0 && read < held as f64,
        "the kernel counted {read} of the {held} sectors read, some of them in runs without room"
    );
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

/// `filemapd top --batch`: a file being written shows as written (MB/s and IOPS above 0, a
/// p99 from its histogram), with its group's regions, its mode, the kernel counting it and
/// events waking it.
#[test]
fn top_shows_the_file_being_written() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 2 << 20).unwrap();
    map_with_bounds(&path);
    let address = "127.0.0.1:9103";
    let watch = watch_with_metrics(&path, address);
    wait_converged(&dmfs, &path, "vm.img", "start-up");
    let (_, members) = group_by_alias(&device_of(&path), "vm.img").unwrap();

    let mut top = Command::new(filemapd_tests::daemon::filemapd_binary())
        .args([
            "top",
            "--metrics",
            address,
            "--interval",
            "2",
            "--batch",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Written over and over until top has printed its tables and exited (its second
    // interval is all writing, whenever its first reading was).
    while top.try_wait().unwrap().is_none() {
        overwrite_first_mib(&path);
    }
    let out = top.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last_table = printed.trim_end().rsplit("filemapd top:").next().unwrap();
    let row: Vec<&str> = last_table
        .lines()
        .find(|l| l.starts_with("vm.img"))
        .unwrap_or_else(|| panic!("no row for vm.img:\n{printed}"))
        .split_whitespace()
        .collect();
    let number = |column: usize| row[column].parse::<f64>().unwrap();
    assert!(
        number(2) > 0.0 && number(4) > 0.0,
        "no writes seen:\n{printed}"
    );
    assert_ne!(row[6], "-", "no p99:\n{printed}");
    assert_eq!(number(8), members.len() as f64, "{printed}");
    assert_eq!(&row[9..], ["tiled", "kernel", "events"], "{printed}");
    drop(watch);
}
