//! `cargo xtask test`: unit tests, eBPF tests on this kernel, device-mapper tests and a
//! two-minute torture run in one VM boot per Debian kernel series (6.1 and 6.12); ends with
//! one line `N passed, N failed`.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{cmd, install, setup, vm};

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    /// Stages that failed without reporting a failed test (build errors, crashes).
    broken: Vec<String>,
}

impl Tally {
    /// Adds the `test result:` lines of libtest output; a stage that failed without any
    /// failed test counts as one failure, so a crash is never reported as a pass.
    fn add(&mut self, stage: &str, output: &str, success: bool) {
        let mut failed_here = 0;
        for line in output
            .lines()
            .filter_map(|l| l.trim().strip_prefix("test result: "))
        {
            let count = |word: &str| -> u64 {
                line.split([';', '.'])
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().parse().ok())
                    .unwrap_or(0)
            };
            self.passed += count(" passed");
            failed_here += count(" failed");
        }
        self.failed += failed_here;
        if !success && failed_here == 0 {
            self.failed += 1;
            self.broken.push(stage.to_string());
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run()?;
    let mut tally = Tally::default();

    eprintln!("== unit tests");
    let (out, ok) = cargo_test(&[])?;
    tally.add("unit tests", &out, ok);

    eprintln!("== installing into a staging root (checked by host_install)");
    let staging = install::staging_root();
    let _ = std::fs::remove_dir_all(&staging);
    let layout = install::Layout::in_place(&staging.join("usr/local"), &staging.join("etc"));
    if let Err(e) = install::run(&layout) {
        eprintln!("the staged installation failed: {e:#}");
        tally.add("installation", "", false);
    }

    eprintln!("== the Debian package (installed, run and purged by vm_service)");
    let _ = std::fs::remove_dir_all(crate::deb::output_dir());
    if let Err(e) = crate::deb::build() {
        eprintln!("building the Debian package failed: {e:#}");
        tally.add("Debian package", "", false);
    }

    eprintln!("== eBPF and file-system tests on the host kernel, and the test crate's own");
    // host_ebpf runs the daemon's binary too (`filemapd trace` on a plain disk).
    build_daemon()?;
    let (out, ok) = cargo_test(&[
        "-p",
        "filemapd-tests",
        "--lib",
        "--bins",
        "--test",
        "host_ebpf",
        "--test",
        "host_files",
        "--test",
        "host_install",
        "--",
        "--test-threads=1",
    ])?;
    tally.add("host tests", &out, ok);

    let script = vm_script();
    for series in vm::KERNEL_SERIES {
        let stage = format!("VM tests on {series}");
        let run = script
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|script| {
                let kernel = vm::kernel(series)?;
                eprintln!(
                    "== device-mapper tests in the VM, kernel {}",
                    kernel.display()
                );
                vm_tests(series, script)
            });
        match run {
            Ok((out, ok)) => tally.add(&stage, &out, ok),
            Err(e) => {
                eprintln!("{stage} could not run: {e:#}");
                tally.add(&stage, "", false);
            }
        }
    }

    eprintln!("== done in {:.0?}", started.elapsed());
    for stage in &tally.broken {
        eprintln!("{stage}: failed before reporting test results (see above)");
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        bail!("{} test(s) failed", tally.failed);
    }
    Ok(())
}

/// Runs `cargo test ARGS`, echoing and returning its stdout.
fn cargo_test(args: &[&str]) -> anyhow::Result<(String, bool)> {
    let mut child = Command::new(env!("CARGO"))
        .arg("test")
        .args(args)
        .current_dir(cmd::workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let mut out = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        out.push_str(&line);
        out.push('\n');
    }
    Ok((out, child.wait()?.success()))
}

/// Device-mapper test targets; all run in one VM boot. The torture (two minutes, a seed from
/// the clock) comes last and shows its seed and figures even when it passes.
const VM_TEST_TARGETS: &[&str] = &[
    "vm_dm",
    "vm_daemon",
    "vm_ebpf",
    "vm_growth",
    "vm_counting",
    "vm_trace",
    "vm_metrics",
    "vm_service",
    "vm_map",
    "vm_faults",
    "vm_torture",
];

/// Builds the VM test binaries (and the daemon they launch) on the host, once for every
/// kernel, and returns the guest script that runs them all.
fn vm_script() -> anyhow::Result<String> {
    build_daemon()?;
    let mut script = String::from("modprobe -a dm_mod loop || exit 1; status=0");
    for target in VM_TEST_TARGETS {
        let binary = test_binary(target)?;
        let show = if *target == "vm_torture" {
            " --nocapture"
        } else {
            ""
        };
        script.push_str(&format!(
            "; {} --test-threads=1{show} || status=1",
            binary.display()
        ));
    }
    script.push_str("; exit $status");
    Ok(script)
}

/// The debug build of the daemon, which the integration tests run.
fn build_daemon() -> anyhow::Result<()> {
    cmd::status(
        Command::new(env!("CARGO"))
            .args(["build", "-p", "filemapd"])
            .current_dir(cmd::workspace_root()),
    )
}

/// Runs the VM tests' `script` in one VM boot on a kernel of `series`.
fn vm_tests(series: &str, script: &str) -> anyhow::Result<(String, bool)> {
    let out = vm::run_on(series, script, vm::DEFAULT_TIMEOUT, vm::DEFAULT_MEMORY)?;
    if !out.success {
        eprintln!("the VM on {series} ended: {}", out.status);
    }
    println!("{}", out.output);
    eprintln!("(VM boot + tests on {series}: {:.1?})", out.elapsed);
    Ok((out.output, out.success))
}

/// Builds one integration-test target and returns its executable.
pub fn test_binary(target: &str) -> anyhow::Result<PathBuf> {
    let json = cmd::stdout(
        Command::new(env!("CARGO"))
            .args([
                "test",
                "-p",
                "filemapd-tests",
                "--test",
                target,
                "--no-run",
                "--message-format=json",
            ])
            .current_dir(cmd::workspace_root()),
    )?;
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == target)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no executable for test target {target}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_libtest_summaries() {
        let mut t = Tally::default();
        t.add(
            "a",
            "test result: ok. 25 passed; 0 failed; 0 ignored; 0 measured\n",
            true,
        );
        t.add(
            "b",
            "test result: FAILED. 1 passed; 2 failed; 0 ignored\n",
            false,
        );
        assert_eq!((t.passed, t.failed), (26, 2));
        assert!(t.broken.is_empty());
    }

    #[test]
    fn a_stage_that_dies_without_results_counts_as_a_failure() {
        let mut t = Tally::default();
        t.add("vm", "kernel panic\n", false);
        assert_eq!((t.passed, t.failed), (0, 1));
        assert_eq!(t.broken, vec!["vm".to_string()]);
    }
}
