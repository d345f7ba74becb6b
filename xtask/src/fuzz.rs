//! `cargo xtask fuzz --seconds N`: runs each cargo-fuzz target in fuzz/ for N seconds on the
//! installed nightly (the one the eBPF side builds with) and reports its executions.
//!
//! Inputs libFuzzer finds go to a scratch corpus under target/; the committed seeds in
//! fuzz/seeds/<target> are read only. A crash fails the task with the input's path: turn it
//! into a regression test beside the parser.
use std::{process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

pub const TARGETS: [&str; 4] = [
    "stats_list",
    "group_descriptor",
    "daemon_argv",
    "watch_config",
];

pub fn run(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    let toolchain = setup::ebpf_toolchain()?;
    install_cargo_fuzz(&toolchain)?;
    let targets: Vec<&str> = match only {
        Some(name) if TARGETS.contains(&name) => vec![name],
        Some(name) => bail!(
            "no fuzz target {name:?} (there are: {})",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    for target in targets {
        let scratch = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let seeds = root.join("fuzz/seeds").join(target);
        let started = Instant::now();
        let out = Command::new("cargo")
            .arg(format!("+{toolchain}"))
            .args(["fuzz", "run", target])
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .current_dir(root.join("fuzz"))
            .output()
            .context("cannot start cargo fuzz")?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let lines: Vec<&str> = log.lines().collect();
            bail!(
                "fuzz target {target} failed ({}):\n{}",
                out.status,
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        let executions = final_stat(&log, "number_of_executed_units").unwrap_or(0);
        println!(
            "fuzz {target}: {executions} executions in {:.0} s, no crash",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// cargo-fuzz, installed for the nightly once.
fn install_cargo_fuzz(toolchain: &str) -> anyhow::Result<()> {
    let installed = cmd::succeeds(
        Command::new("cargo")
            .arg(format!("+{toolchain}"))
            .args(["fuzz", "--version"]),
    );
    if installed {
        return Ok(());
    }
    println!("installing cargo-fuzz (cargo install, once)");
    cmd::status(Command::new("cargo").arg(format!("+{toolchain}")).args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--quiet",
    ]))
}

/// A `stat::<name>: <value>` line of libFuzzer's final statistics.
fn final_stat(log: &str, name: &str) -> Option<u64> {
    let prefix = format!("stat::{name}:");
    log.lines()
        .filter_map(|line| line.trim().strip_prefix(&prefix))
        .filter_map(|value| value.trim().parse().ok())
        .next_back()
}
