//! Time the kernel spent running eBPF programs (BPF_ENABLE_STATS), to price the in-kernel
//! accounting directly: the writer's own throughput moves by more than the target between
//! rounds in the emulated VM, the programs' run time does not.
use std::{collections::BTreeMap, os::fd::OwnedFd, time::Duration};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

/// The kernel's names for the IO probe's programs (names are cut to 15 bytes): the bio hook's
/// two, and the probe on dm-stats' accounting.
const IO_PROBE: [&str; 3] = ["block_bio_queue", "block_bio_compl", "dm_stats_accoun"];

/// Keeps run-time statistics on while it lives.
pub struct ProgramClock {
    _stats: OwnedFd,
}

/// Run time and runs, summed over every loaded program and for the IO probe alone, and per
/// program name.
#[derive(Clone, Default, Debug)]
pub struct ProgramTime {
    pub all: Duration,
    pub io_probe: Duration,
    pub io_probe_runs: u64,
    pub by_name: BTreeMap<String, (Duration, u64)>,
}

impl ProgramClock {
    pub fn start() -> Self {
        let stats = enable_stats(Stats::RunTime)
            .expect("BPF_ENABLE_STATS (Linux 5.8+, root) for the programs' run time");
        Self { _stats: stats }
    }

    /// Totals so far. The bench VM runs no other eBPF user, so "every program" is the
    /// monitor's.
    pub fn read(&self) -> ProgramTime {
        let mut time = ProgramTime::default();
        for info in loaded_programs().flatten() {
            time.all += info.run_time();
            let name = info.name_as_str().unwrap_or("?").to_string();
            let entry = time.by_name.entry(name).or_default();
            entry.0 += info.run_time();
            entry.1 += info.run_count();
            if info.name_as_str().is_some_and(|n| IO_PROBE.contains(&n)) {
                time.io_probe += info.run_time();
                time.io_probe_runs += info.run_count();
            }
        }
        time
    }
}

impl ProgramTime {
    /// One line: each program that ran, its runs and µs per run, busiest first.
    pub fn breakdown(&self) -> String {
        let mut rows: Vec<_> = self.by_name.iter().collect();
        rows.sort_by_key(|(_, (time, _))| std::cmp::Reverse(*time));
        rows.iter()
            .map(|(name, (time, runs))| {
                format!(
                    "{name} {runs} × {:.1} µs",
                    time.as_secs_f64() * 1e6 / (*runs).max(1) as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::ops::Sub for ProgramTime {
    type Output = ProgramTime;
    fn sub(self, earlier: ProgramTime) -> ProgramTime {
        let by_name = self
            .by_name
            .iter()
            .map(|(name, &(time, runs))| {
                let (was, ran) = earlier.by_name.get(name).copied().unwrap_or_default();
                (
                    name.clone(),
                    (time.saturating_sub(was), runs.saturating_sub(ran)),
                )
            })
            .filter(|(_, (_, runs))| *runs > 0)
            .collect();
        ProgramTime {
            all: self.all.saturating_sub(earlier.all),
            io_probe: self.io_probe.saturating_sub(earlier.io_probe),
            io_probe_runs: self.io_probe_runs.saturating_sub(earlier.io_probe_runs),
            by_name,
        }
    }
}
