//! Time the kernel spent running eBPF programs (BPF_ENABLE_STATS), to price the in-kernel
//! accounting directly: the writer's own throughput moves by more than the target between
//! rounds in the emulated VM, the programs' run time does not.
use std::{os::fd::OwnedFd, time::Duration};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

/// The kernel's name for the IO probe (program names are cut to 15 bytes).
const IO_PROBE: &str = "dm_stats_accoun";

/// Keeps run-time statistics on while it lives.
pub struct ProgramClock {
    _stats: OwnedFd,
}

/// Run time and runs, summed over every loaded program and for the IO probe alone.
#[derive(Clone, Copy, Default, Debug)]
pub struct ProgramTime {
    pub all: Duration,
    pub io_probe: Duration,
    pub io_probe_runs: u64,
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
            if info.name_as_str() == Some(IO_PROBE) {
                time.io_probe += info.run_time();
                time.io_probe_runs += info.run_count();
            }
        }
        time
    }
}

impl std::ops::Sub for ProgramTime {
    type Output = ProgramTime;
    fn sub(self, earlier: ProgramTime) -> ProgramTime {
        ProgramTime {
            all: self.all.saturating_sub(earlier.all),
            io_probe: self.io_probe.saturating_sub(earlier.io_probe),
            io_probe_runs: self.io_probe_runs.saturating_sub(earlier.io_probe_runs),
        }
    }
}
