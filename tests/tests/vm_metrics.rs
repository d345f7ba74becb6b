//! `filemapd watch --metrics` against real device-mapper (run inside the VM by `cargo xtask
//! test`): what the endpoint serves equals what Debian's dmstats reports for the same group,
//! and the endpoint costs no wake-up while idle. Prometheus itself: vm_service.
use std::{path::Path, process::Command, time::Duration};

use filemapd_tests::{
    DmFs, FsKind, context_switches,
    daemon::{LoggedDaemon, device_of, group_by_alias, wait_converged},
    metrics::{
        dashboard_queries, dmstats_report, has_samples, http_get, map_with_bounds, metric_names,
        overwrite_first_mib, sample,
    },
    require_device_mapper, write_and_sync,
    writers::random_direct_writes,
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
