//! The VM host's service: how soon `filemapd watch --ebpf DIR` maps an image made in the
//! directory while it runs, from the image's first write (fsync returned: its blocks are
//! allocated) until regions cover it.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use filemapd::stats::StatsDevice;
use filemapd_tests::{DmFs, FsKind, write_and_sync};

use crate::{
    monitors::{Running, filemapd_binary, wait_covered},
    ms, quantile, report,
    usage::quiet,
};

pub fn run(images: usize) {
    report!("## A new image in a watched directory\n");
    report!(
        "`filemapd watch --ebpf DIR`, quiet; then {images} times: an empty image is made in DIR and"
    );
    report!(
        "1 MiB written to it with fsync; time from fsync's return to regions covering the image.\n"
    );
    report!("| file system | median ms | slowest ms |");
    report!("| --- | --- | --- |");
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        let dmfs = DmFs::new(fs_kind).unwrap();
        let dir = dmfs.mount.dir.join("images");
        fs::create_dir(&dir).unwrap();
        let device = StatsDevice::for_st_dev(fs::metadata(&dir).unwrap().dev()).unwrap();
        let watch = Running::of(
            Command::new(filemapd_binary())
                .args(["watch", "--ebpf"])
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        quiet(watch.pid(), Duration::from_secs(120));
        let mut latencies = Vec::new();
        for i in 0..images {
            let path = dir.join(format!("new{i}.img"));
            fs::File::create(&path).unwrap();
            write_and_sync(&path, 0, 1 << 20).unwrap();
            let written = Instant::now();
            let covered = wait_covered(&device, &path, 0, 1 << 20, Duration::from_secs(30));
            latencies.push(match covered {
                true => written.elapsed(),
                false => Duration::MAX,
            });
        }
        latencies.sort_unstable();
        let shown = |d: Duration| match d {
            Duration::MAX => "> 30000".to_string(),
            d => format!("{:.0}", ms(d)),
        };
        report!(
            "| {} | {} | {} |",
            fs_kind.name(),
            shown(quantile(&latencies, 0.5)),
            shown(latencies[latencies.len() - 1])
        );
        drop(watch);
    }
    report!("\nTarget: mapped ≤ 1 s after its first allocation.\n");
}
