//! The benchmarks `cargo xtask bench` runs inside the device-mapper VM. Each compares, in one
//! run and on the same kernel, filemapd with eBPF, filemapd polling, and a re-creation of
//! lvm2's policy (500 ms loop, inotify + st_blocks, FIEMAP_FLAG_SYNC, full exact re-map) that
//! lives here, in the benchmark, not in the product.
//!
//! Output: the markdown body of BENCHMARKS.md, each line prefixed with [`OUT`] so that xtask
//! can pick it out of the VM's console. `filemapd-bench reference PATH GROUP` runs the lvm2
//! policy as a process of its own, so that its CPU time and wake-ups can be read like
//! filemapd's.
mod counted;
mod latency;
mod monitors;
mod reference;
mod scale;
mod usage;

use std::{path::PathBuf, time::Duration};

/// Marks the lines of the report in the VM's console output.
pub const OUT: &str = "BENCH|";

/// Prints lines of the report (each marked, blank ones too).
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {
        for line in format!($($arg)*).split('\n') {
            println!("{}{line}", $crate::OUT);
        }
    };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("reference") {
        let path = PathBuf::from(&args[2]);
        let group: u64 = args[3].parse().expect("group id");
        reference::run(&path, group);
        return;
    }
    let steps: usize = env_number("FILEMAPD_BENCH_STEPS", 200);
    let only = std::env::var("FILEMAPD_BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    if wanted("latency") {
        latency::run(steps);
    }
    if wanted("counted") {
        counted::run(env_number("FILEMAPD_BENCH_ROUNDS", 3));
    }
    if wanted("idle") {
        usage::run_idle(Duration::from_secs(env_number(
            "FILEMAPD_BENCH_IDLE_SECS",
            60,
        )));
    }
    if wanted("scale") {
        scale::run();
    }
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The value at quantile `q` of sorted `values`.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}
