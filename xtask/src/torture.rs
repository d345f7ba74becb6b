//! `cargo xtask torture [--minutes N] [--seed S] [--kernel SERIES]`: the seeded torture run
//! (tests/src/torture) alone, for as long as asked, in one VM boot. `cargo xtask test` runs
//! it for two minutes on each kernel with the VM suite.
use std::{process::Command, time::Duration};

use anyhow::ensure;

use crate::{cmd, setup, test, vm};

pub fn run(minutes: f64, seed: Option<u64>, kernel: &str) -> anyhow::Result<()> {
    setup::run()?;
    vm::check_series(kernel)?;
    ensure!(minutes > 0.0, "--minutes must be positive");
    cmd::status(
        Command::new(env!("CARGO"))
            .args(["build", "-p", "filemapd"])
            .current_dir(cmd::workspace_root()),
    )?;
    let binary = test::test_binary("vm_torture")?;
    let seed = seed.map_or(String::new(), |s| format!("FILEMAPD_TORTURE_SEED={s} "));
    let script = format!(
        "modprobe -a dm_mod loop || exit 1; FILEMAPD_TORTURE_MINUTES={minutes} {seed}{} --test-threads=1 --nocapture",
        binary.display()
    );
    // The run, its last checkpoint (up to two minutes when it fails) and the boot.
    let timeout = Duration::from_secs_f64(minutes * 60.0) + Duration::from_secs(600);
    let out = vm::run_on(kernel, &script, timeout, vm::DEFAULT_MEMORY)?;
    print!("{}", out.output);
    ensure!(out.success, "the torture run failed ({})", out.status);
    Ok(())
}
