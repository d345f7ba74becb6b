//! `cargo xtask setup | test | demo | vm`: everything filemapd needs besides cargo itself.
mod bench;
mod cmd;
mod demo;
mod lvm2;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "filemapd's tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (apt packages, rust-src, bpf-linker, virtme-ng).
    Setup,
    /// Run every test: unit tests, eBPF tests on this kernel, device-mapper tests in a VM.
    Test,
    /// Boot the device-mapper VM, map a file with dmstats, show dmstats' and filemapd's view.
    Demo,
    /// Run the benchmarks in the VM and write BENCHMARKS.md (FILEMAPD_BENCH_STEPS, default 200).
    Bench,
    /// Run a shell command inside the device-mapper VM.
    Vm {
        /// The command line, run by /bin/sh in the guest.
        command: String,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
        Task::Bench => bench::run(),
        Task::Vm { command } => setup::run().and_then(|()| {
            let out = vm::run(&command, vm::DEFAULT_TIMEOUT)?;
            print!("{}", out.output);
            anyhow::ensure!(out.success, "the command failed in the VM ({})", out.status);
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
