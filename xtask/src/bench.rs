//! `cargo xtask bench`: runs the benchmarks in the device-mapper VM and writes BENCHMARKS.md.
//! Absolute times under software emulation are slow and noisy; the table is for comparing the
//! monitors side by side in one run, hence the ratios.
use std::{fmt::Write as _, process::Command, time::Duration};

use anyhow::{Context as _, ensure};

use crate::{cmd, lvm2, setup, vm};

const DEFAULT_STEPS: u32 = 200;
const VM_MEMORY: &str = "8G";
/// The guest keeps its TSC as clock source. Under emulation it finds its vCPUs' TSCs out of
/// step and falls back to the HPET, whose every read is an emulated device access: in a
/// profile of the allocation programs, 60-75 % of their time went to `read_hpet` (one clock
/// read per event), and how long a read takes depends on what the other vCPU does. Hosts
/// read TSC or kvm-clock for a few tens of ns; this prices the programs as they run there.
const GUEST_CLOCK: &str = "tsc=reliable";

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    let lvm2 = lvm2::build()?;
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
    // Knobs pass through to the benchmark (fewer steps, a subset) for quick looks.
    let knobs: String = [
        "FILEMAPD_BENCH_ONLY",
        "FILEMAPD_BENCH_IDLE_SECS",
        "FILEMAPD_BENCH_ROUNDS",
        "FILEMAPD_BENCH_FILES",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v} ")))
    .collect();
    // "native" runs on this machine's own kernel, after the VM (never beside it: they would
    // share the cores); the other sections in the VM.
    let only = std::env::var("FILEMAPD_BENCH_ONLY").unwrap_or_default();
    let in_vm: Vec<&str> = only
        .split(',')
        .filter(|o| !o.is_empty() && !NATIVE.contains(o))
        .collect();
    let mut body = String::new();
    let mut guest_kernel = "-".to_string();
    if only.is_empty() || !in_vm.is_empty() {
        let vm_knobs = knobs.replace(
            &format!("FILEMAPD_BENCH_ONLY={only} "),
            &format!("FILEMAPD_BENCH_ONLY={} ", in_vm.join(",")),
        );
        let out = run_in_vm(&lvm2, &bench, steps, &vm_knobs)?;
        body.push_str(&report_lines(&out));
        guest_kernel = out
            .lines()
            .find(|l| l.contains("-amd64"))
            .unwrap_or("?")
            .trim()
            .to_string();
    }
    let native_only: Vec<&str> = only.split(',').filter(|o| NATIVE.contains(o)).collect();
    if only.is_empty() || !native_only.is_empty() {
        let mut native = Command::new(&bench);
        native.env(
            "FILEMAPD_BENCH_ONLY",
            if only.is_empty() {
                NATIVE[0].to_string()
            } else {
                native_only.join(",")
            },
        );
        if let Ok(rounds) = std::env::var("FILEMAPD_BENCH_ROUNDS") {
            native.env("FILEMAPD_BENCH_ROUNDS", rounds);
        }
        body.push_str(&report_lines(&cmd::stdout(&mut native)?));
    }
    let command = if knobs.is_empty() && steps == DEFAULT_STEPS {
        "cargo xtask bench".to_string()
    } else {
        format!("FILEMAPD_BENCH_STEPS={steps} {knobs}cargo xtask bench")
    };
    let markdown = format!("{}{body}", header(&command, &guest_kernel)?);
    std::fs::write(root.join("BENCHMARKS.md"), &markdown)?;
    print!("{markdown}");
    Ok(())
}

/// The sections that run on this machine's own kernel rather than in the VM ("native"
/// holds "probe", the IO probe's cost alone).
const NATIVE: [&str; 2] = ["native", "probe"];

/// Runs the benchmark in the device-mapper VM; its console output.
fn run_in_vm(
    lvm2: &lvm2::Reference,
    bench: &std::path::Path,
    steps: u32,
    knobs: &str,
) -> anyhow::Result<String> {
    let script = format!(
        "modprobe -a dm_mod loop && uname -r && FILEMAPD_BENCH_STEPS={steps} \
         FILEMAPD_BENCH_LVM2={} FILEMAPD_BENCH_LVM2_LIB={} {knobs}{}",
        lvm2.daemon.display(),
        lvm2.lib_dir.display(),
        bench.display()
    );
    // dm-stats caps its memory at a quarter of the RAM: with 2 GiB, dmstats itself fails to
    // map a 10,000-extent file ("Cannot allocate memory" at region 7805).
    let out = vm::run_with_args(
        vm::KERNEL_SERIES[0],
        &script,
        Duration::from_secs(3 * 3600),
        VM_MEMORY,
        &[GUEST_CLOCK],
    )?;
    ensure!(
        out.success,
        "the benchmark failed in the VM ({}):\n{}",
        out.status,
        out.output
    );
    Ok(out.output)
}

/// The prefix of the benchmark's report lines in the VM's console output.
const BENCH_LINE: &str = "BENCH|";

/// The report's lines in a benchmark's output, without their prefix.
fn report_lines(output: &str) -> String {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(BENCH_LINE))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn header(command: &str, guest_kernel: &str) -> anyhow::Result<String> {
    let host_kernel = cmd::stdout(Command::new("uname").arg("-r"))?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Produced by `{command}`; regenerate with the same command. The monitors compared, \
         side by side in one run: filemapd with its eBPF trigger, filemapd polling (lvm2's 0.5 s \
         interval; both tile, the default), and **lvm2's own dmfilemapd** (2.03.16, built by the \
         bench from Debian's lvm2 source package, the source of the VM's dmstats 1.02.185, and \
         run with its own libdevmapper).\n"
    )?;
    writeln!(
        md,
        "Machine: {cpus} host cores, host kernel {}; the benchmark runs in a VM under qemu software \
         emulation (TCG, 2 vCPUs, {VM_MEMORY} of RAM), guest kernel {guest_kernel} (Debian) booted with \
         `{GUEST_CLOCK}` (TSC clock source, as on real hosts, instead of the emulated HPET), dm-linear \
         over a loop device over tmpfs. Absolute times are those of an emulated machine: compare rows, not \
         numbers with other machines.\n",
        host_kernel.trim()
    )?;
    Ok(md)
}
