//! `cargo xtask bench`: runs the benchmarks in the device-mapper VM and writes BENCHMARKS.md.
//! Absolute times under software emulation are slow and noisy; the table is for comparing the
//! monitors side by side in one run, hence the ratios.
use std::{fmt::Write as _, process::Command, time::Duration};

use anyhow::{Context as _, ensure};

use crate::{bench_report, cmd, lvm2, setup, vm};

/// Latency steps per monitor and file system: enough for a p99 of its own (issue 25 asks ≥ 500).
const DEFAULT_STEPS: u32 = 500;
const VM_MEMORY: &str = "8G";
/// The benchmark binary's rounds where FILEMAPD_BENCH_ROUNDS does not say.
const DEFAULT_ROUNDS: &str = "5";
/// The guest keeps its TSC as clock source. Under emulation it finds its vCPUs' TSCs out of
/// step and falls back to the HPET, whose every read is an emulated device access: in a
/// profile of the allocation programs, 60-75 % of their time went to `read_hpet` (one clock
/// read per event), and how long a read takes depends on what the other vCPU does. Hosts
/// read TSC or kvm-clock for a few tens of ns; this prices the programs as they run there.
const GUEST_CLOCK: &str = "tsc=reliable";

/// The bench's named parts, in the report's order. Each is run whole (one VM boot, and its
/// native sections on this machine's kernel after it) and written into BENCHMARKS.md as soon
/// as it ends, so that a run stopped in one part keeps the parts before it, and one part can
/// be run again alone (`--part NAME`). Together they take longer than one CI budget.
pub const PARTS: &[(&str, &[&str])] = &[
    ("latency", &["latency"]),
    ("writers", &["counted", "cost", "images"]),
    ("growth", &["appends", "idle", "scale"]),
    ("service", &["handoff", "new-image"]),
    ("native", &["native"]),
];

pub fn run(parts: &[String]) -> anyhow::Result<()> {
    setup::bench_tools()?;
    // Taken before the run: changes made while it runs do not show in its figures.
    let commit = commit()?;
    let chosen: Vec<&(&str, &[&str])> = if parts.is_empty() {
        PARTS.iter().collect()
    } else {
        parts
            .iter()
            .map(|name| {
                PARTS.iter().find(|(n, _)| n == name).with_context(|| {
                    let names: Vec<&str> = PARTS.iter().map(|(n, _)| *n).collect();
                    format!("no bench part {name:?} (parts: {})", names.join(", "))
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let bench = Bench::build()?;
    let root = cmd::workspace_root();
    // Sections picked one by one are work in progress: their report is never BENCHMARKS.md.
    if let Ok(only) = std::env::var("FILEMAPD_BENCH_ONLY") {
        let sections: Vec<&str> = only.split(',').filter(|s| !s.is_empty()).collect();
        let (body, _) = bench.sections(&sections)?;
        let partial = root.join("target/bench-partial.md");
        std::fs::write(
            &partial,
            format!("<!-- FILEMAPD_BENCH_ONLY={only} at {commit}: not the report -->\n{body}"),
        )?;
        print!("{body}");
        println!(
            "(sections picked by FILEMAPD_BENCH_ONLY: written to {})",
            partial.display()
        );
        return Ok(());
    }
    let report_path = root.join("BENCHMARKS.md");
    for (name, sections) in chosen {
        let started = std::time::Instant::now();
        let (body, kernel) = bench.sections(sections)?;
        let run = bench_report::PartRun {
            name: name.to_string(),
            commit: commit.clone(),
            date: cmd::stdout(Command::new("date").args(["-u", "+%Y-%m-%d"]))?
                .trim()
                .to_string(),
            rounds: bench
                .knob("FILEMAPD_BENCH_ROUNDS")
                .unwrap_or(DEFAULT_ROUNDS.into()),
            minutes: format!("{:.0}", started.elapsed().as_secs_f64() / 60.0),
            kernel,
        };
        let old = std::fs::read_to_string(&report_path).unwrap_or_default();
        let mut blocks = bench_report::blocks(&old);
        blocks.retain(|b| b.run.name != *name);
        blocks.push(bench_report::Block { run, body });
        let report = bench_report::render(&intro()?, PARTS, &blocks);
        std::fs::write(&report_path, &report)?;
        println!("bench part {name} written to BENCHMARKS.md");
    }
    print!("{}", std::fs::read_to_string(&report_path)?);
    Ok(())
}

/// The benchmark binary, built, with what it needs to run sections.
struct Bench {
    binary: std::path::PathBuf,
    lvm2: lvm2::Reference,
    steps: u32,
}

impl Bench {
    fn build() -> anyhow::Result<Self> {
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
        Ok(Bench {
            binary: root.join("target/release/filemapd-bench"),
            lvm2,
            steps,
        })
    }

    fn knob(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    /// Knobs that pass through to the benchmark (fewer rounds, a shorter idle).
    fn knobs(&self) -> String {
        [
            "FILEMAPD_BENCH_IDLE_SECS",
            "FILEMAPD_BENCH_ROUNDS",
            "FILEMAPD_BENCH_FILES",
            "FILEMAPD_BENCH_10K_ONLY",
        ]
        .iter()
        .filter_map(|k| self.knob(k).map(|v| format!("{k}={v} ")))
        .collect()
    }

    /// Runs `sections`: those of the VM in one boot, then the native ones on this machine's
    /// own kernel (never beside the VM: they would share the cores). The report's markdown,
    /// and the guest kernel ("-" when no section ran in the VM).
    fn sections(&self, sections: &[&str]) -> anyhow::Result<(String, String)> {
        let (native, in_vm): (Vec<&str>, Vec<&str>) =
            sections.iter().partition(|s| NATIVE.contains(s));
        let mut body = String::new();
        let mut guest_kernel = "-".to_string();
        if !in_vm.is_empty() {
            let knobs = format!("{}FILEMAPD_BENCH_ONLY={} ", self.knobs(), in_vm.join(","));
            let out = run_in_vm(&self.lvm2, &self.binary, self.steps, &knobs)?;
            body.push_str(&report_lines(&out));
            guest_kernel = out
                .lines()
                .find(|l| l.contains("-amd64"))
                .unwrap_or("?")
                .trim()
                .to_string();
        }
        if !native.is_empty() {
            let mut bench = Command::new(&self.binary);
            bench.env("FILEMAPD_BENCH_ONLY", native.join(","));
            if let Some(rounds) = self.knob("FILEMAPD_BENCH_ROUNDS") {
                bench.env("FILEMAPD_BENCH_ROUNDS", rounds);
            }
            body.push_str(&report_lines(&cmd::stdout(&mut bench)?));
        }
        Ok((body, guest_kernel))
    }
}

/// The sections that run on this machine's own kernel rather than in the VM ("native"
/// holds "probe", the IO probe's cost alone, and "start-up").
const NATIVE: [&str; 5] = ["native", "probe", "scrape", "bio-hook", "start-up"];

/// Runs the benchmark in the device-mapper VM; its console output.
fn run_in_vm(
    lvm2: &lvm2::Reference,
    bench: &std::path::Path,
    steps: u32,
    knobs: &str,
) -> anyhow::Result<String> {
    // A bench that dies (the OOM killer, a panic) leaves the kernel's log
    // in the output, so that the reason is on record and not guessed at.
    let script = format!(
        "modprobe -a dm_mod loop && uname -r && FILEMAPD_BENCH_STEPS={steps} \
         FILEMAPD_BENCH_LVM2={} FILEMAPD_BENCH_LVM2_LIB={} {knobs}{} \
         || {{ rc=$?; echo \"the bench exited with $rc; the kernel's last words:\"; \
         dmesg | tail -n 40; exit $rc; }}",
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

/// The commit of the code the bench ran: the newest that changed anything but the report
/// itself (a commit of BENCHMARKS.md alone measures nothing new, so parts run on either side
/// of it are one commit's), and whether the tree held changes beside it (then the figures
/// are not that commit's alone).
fn commit() -> anyhow::Result<String> {
    let root = cmd::workspace_root();
    let head = cmd::stdout(
        Command::new("git")
            .args(["log", "-1", "--format=%h", "--", ".", ":!BENCHMARKS.md"])
            .current_dir(&root),
    )?;
    let changes = cmd::stdout(
        Command::new("git")
            // The report itself is not part of what is measured.
            .args([
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!BENCHMARKS.md",
            ])
            .current_dir(&root),
    )?;
    Ok(if changes.trim().is_empty() {
        head.trim().to_string()
    } else {
        format!("{} with uncommitted changes", head.trim())
    })
}

/// What the report says first: what is compared, and on what machine.
fn intro() -> anyhow::Result<String> {
    let host_kernel = cmd::stdout(Command::new("uname").arg("-r"))?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut md = String::new();
    writeln!(
        md,
        "Produced by `cargo xtask bench`, in the parts below (`--part NAME` runs one again; each \
         section says how long it ran). The monitors compared, side by side in one run: \
         filemapd with its eBPF trigger, filemapd polling (lvm2's 0.5 s interval; both tile, \
         the default), and **lvm2's own dmfilemapd** (2.03.16, built by the bench from Debian's \
         lvm2 source package, the source of the VM's dmstats 1.02.185, and run with its own \
         libdevmapper). A part's commit is that of the code it measured: the newest commit that \
         changed more than this report.\n"
    )?;
    writeln!(
        md,
        "Machine: {cpus} host cores, host kernel {}; the benchmark runs in a VM under qemu software \
         emulation (TCG, 2 vCPUs, {VM_MEMORY} of RAM), the guest kernel of each part's row booted with \
         `{GUEST_CLOCK}` (TSC clock source, as on real hosts, instead of the emulated HPET), dm-linear \
         over a loop device over tmpfs. Absolute times are those of an emulated machine: compare rows, not \
         numbers with other machines.",
        host_kernel.trim()
    )?;
    Ok(md)
}
