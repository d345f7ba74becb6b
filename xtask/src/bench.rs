//! `cargo xtask bench`: runs the benchmarks in the device-mapper VM and writes BENCHMARKS.md.
//! Absolute times under software emulation are slow and noisy; the table is for comparing the
//! monitors side by side in one run, hence the ratios.
use std::{fmt::Write as _, process::Command, time::Duration};

use anyhow::{Context as _, ensure};

use crate::{cmd, setup, vm};

const DEFAULT_STEPS: u32 = 200;

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    let steps: u32 = std::env::var("FILEMAPD_BENCH_STEPS")
        .ok()
        .map(|s| s.parse().context("FILEMAPD_BENCH_STEPS must be a number"))
        .transpose()?
        .unwrap_or(DEFAULT_STEPS);
    let root = cmd::workspace_root();
    cmd::status(
        Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "-p",
                "filemapd",
                "-p",
                "filemapd-tests",
                "--bin",
                "filemapd",
                "--bin",
                "filemapd-bench",
            ])
            .current_dir(&root),
    )?;
    let bench = root.join("target/release/filemapd-bench");
    let script = format!(
        "modprobe -a dm_mod loop && uname -r && FILEMAPD_BENCH_STEPS={steps} {}",
        bench.display()
    );
    let out = vm::run(&script, Duration::from_secs(3 * 3600))?;
    ensure!(
        out.success,
        "the benchmark failed in the VM ({}):\n{}",
        out.status,
        out.output
    );
    let rows: Vec<&str> = out.output.lines().filter(|l| l.starts_with("| ")).collect();
    let guest_kernel = out
        .output
        .lines()
        .find(|l| l.contains("-amd64"))
        .unwrap_or("?")
        .trim();
    let markdown = report(&rows, steps, guest_kernel)?;
    std::fs::write(root.join("BENCHMARKS.md"), &markdown)?;
    print!("{markdown}");
    Ok(())
}

fn report(rows: &[&str], steps: u32, guest_kernel: &str) -> anyhow::Result<String> {
    let host_kernel = cmd::stdout(Command::new("uname").arg("-r"))?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Produced by `cargo xtask bench` (FILEMAPD_BENCH_STEPS={steps}); regenerate with the same command.\n"
    )?;
    writeln!(
        md,
        "Machine: {cpus} host cores, host kernel {}; the benchmark runs in a VM under qemu software \
         emulation (TCG, 2 vCPUs, 2 GiB), guest kernel {guest_kernel} (Debian), dm-linear over a loop \
         device over tmpfs. Absolute times are those of an emulated machine: compare rows, not \
         numbers with other machines.\n",
        host_kernel.trim()
    )?;
    writeln!(
        md,
        "## Latency: writer's fsync returned → a region covers the new data\n"
    )?;
    writeln!(
        md,
        "Each step appends 64 KiB with fsync, then the benchmark spins on `@stats_list` until group"
    )?;
    writeln!(
        md,
        "regions cover every sector FIEMAP shows for the new bytes.\n"
    )?;
    writeln!(
        md,
        "\"missed\": steps whose new data had no region 2 s after fsync (counted as slower"
    )?;
    writeln!(md, "than any measured step in the percentiles).\n")?;
    writeln!(
        md,
        "| fs | monitor | steps | missed | median ms | p99 ms | max ms |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |")?;
    for row in rows {
        writeln!(md, "{row}")?;
    }
    writeln!(md)?;
    for fs in ["ext4", "xfs"] {
        let median = |monitor: &str| -> Option<f64> {
            rows.iter()
                .map(|r| r.split('|').map(str::trim).collect::<Vec<_>>())
                .find(|c| c.len() > 6 && c[1] == fs && c[2].starts_with(monitor))
                .and_then(|c| c[5].parse().ok())
        };
        if let (Some(ebpf), Some(reference)) = (median("filemapd --ebpf"), median("lvm2 policy")) {
            writeln!(
                md,
                "- {fs}: median latency, lvm2 policy / filemapd --ebpf = {:.0}×",
                reference / ebpf.max(0.001)
            )?;
        }
    }
    writeln!(
        md,
        "\nNot measured yet: counted IO, idle cost, 10,000-extent updates, 1,000 files, writer interference."
    )?;
    Ok(md)
}
