//! `cargo xtask setup | test | demo | bench | fuzz | torture | install | deb | vm`: everything filemapd needs besides cargo itself.
mod bench;
mod bench_report;
mod cmd;
mod deb;
mod demo;
mod fuzz;
mod install;
mod lvm2;
mod setup;
mod test;
mod torture;
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
    /// Run the benchmarks in the VM and write BENCHMARKS.md, part by part (FILEMAPD_BENCH_STEPS latency steps, default 500).
    Bench {
        /// Only this part (latency, writers, growth, service, native); repeatable.
        #[arg(long)]
        part: Vec<String>,
    },
    /// Fuzz the parsers (cargo-fuzz on the nightly) for some seconds per target.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (stats_list, group_descriptor, daemon_argv, watch_config).
        #[arg(long)]
        target: Option<String>,
    },
    /// Run the seeded torture (random changes, kills, foreign regions, an oracle at every
    /// checkpoint) in the device-mapper VM.
    Torture {
        /// How long to torture.
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
        /// Replay a run (a failure prints its seed); default: from the clock.
        #[arg(long)]
        seed: Option<u64>,
        /// The Debian kernel series to boot (6.1 or 6.12).
        #[arg(long, default_value = "6.1")]
        kernel: String,
    },
    /// Install filemapd on this host: binary, dmfilemapd link, man pages, systemd unit, config.
    Install {
        /// Where bin/, sbin/ and share/man/ go.
        #[arg(long, default_value = "/usr/local")]
        prefix: std::path::PathBuf,
        /// Where systemd/system/ and filemapd/ go.
        #[arg(long, default_value = "/etc")]
        etc: std::path::PathBuf,
    },
    /// Build a Debian package (target/deb/) holding what `install` installs, under /usr.
    Deb,
    /// Run a shell command inside the device-mapper VM.
    Vm {
        /// The command line, run by /bin/sh in the guest.
        command: String,
        /// Seconds before the VM is stopped.
        #[arg(long, default_value_t = vm::DEFAULT_TIMEOUT.as_secs())]
        timeout: u64,
        /// Guest memory, in vng's `--memory` syntax (dm-stats caps its regions at a quarter of it).
        #[arg(long, default_value = vm::DEFAULT_MEMORY)]
        memory: String,
        /// The Debian kernel series to boot (6.1 or 6.12).
        #[arg(long, default_value = "6.1")]
        kernel: String,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
        Task::Bench { part } => bench::run(&part),
        Task::Fuzz { seconds, target } => {
            setup::run().and_then(|()| fuzz::run(seconds, target.as_deref()))
        }
        Task::Torture {
            minutes,
            seed,
            kernel,
        } => torture::run(minutes, seed, &kernel),
        Task::Install { prefix, etc } => setup::run()
            .and_then(|()| install::run(&install::Layout::in_place(&prefix, &etc)))
            .map(drop),
        Task::Deb => setup::run().and_then(|()| deb::build()).map(|deb| {
            println!("built {}", deb.display());
        }),
        Task::Vm {
            command,
            timeout,
            memory,
            kernel,
        } => vm::check_series(&kernel)
            .and_then(|()| setup::run())
            .and_then(|()| {
                let out = vm::run_on(
                    &kernel,
                    &command,
                    std::time::Duration::from_secs(timeout),
                    &memory,
                )?;
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
