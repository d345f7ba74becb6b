//! The benchmarks `cargo xtask bench` runs inside the device-mapper VM. Each compares, in one
//! run and on the same kernel, filemapd with eBPF, filemapd polling, and lvm2's own
//! dmfilemapd (built by xtask from Debian's source; FILEMAPD_BENCH_LVM2 names it).
//!
//! Output: the markdown body of BENCHMARKS.md, each line prefixed with [`OUT`] so that xtask
//! can pick it out of the VM's console.
mod appends;
mod counted;
mod handoff;
mod images;
mod latency;
mod monitors;
mod native;
mod new_image;
mod program_time;
mod region_cost;
mod scale;
mod usage;

use std::time::Duration;

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
    let steps: usize = env_number("FILEMAPD_BENCH_STEPS", 200);
    let only = std::env::var("FILEMAPD_BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    if wanted("latency") {
        latency::run(steps);
    }
    let rounds = env_number("FILEMAPD_BENCH_ROUNDS", 5);
    if wanted("counted") {
        counted::run(rounds, counted::Scope::Whole);
    } else if only.split(',').any(|o| o == "accounting") {
        // The accounting's cost alone, for a quick look.
        counted::run(rounds, counted::Scope::AccountingCost);
    }
    if wanted("cost") {
        region_cost::run(rounds);
    }
    if wanted("images") {
        images::run(rounds);
    }
    if wanted("appends") {
        appends::run(rounds);
    }
    if wanted("idle") {
        usage::run_idle(Duration::from_secs(env_number(
            "FILEMAPD_BENCH_IDLE_SECS",
            60,
        )));
    }
    if wanted("scale") {
        scale::run();
    } else if wanted("extents") {
        // The one-file parts of scale alone: an update of a 10,000- and a 30,000-extent group.
        scale::many_extents_rows();
    } else if wanted("files") {
        // The many-files parts of scale alone, for a quick look; FILEMAPD_BENCH_FILES=N,...
        // runs only the rows without regions for those counts.
        match std::env::var("FILEMAPD_BENCH_FILES") {
            Ok(counts) => {
                let counts: Vec<usize> = counts.split(',').filter_map(|n| n.parse().ok()).collect();
                scale::many_files_without_regions(&counts);
            }
            Err(_) => {
                scale::many_files(1000);
                scale::many_files_without_regions(&[1000, 10_000]);
            }
        }
    }
    if wanted("handoff") {
        handoff::run(100);
    }
    if wanted("new-image") {
        new_image::run(5);
    }
    // On the machine's own kernel, outside the VM: only when named.
    if only.split(',').any(|o| o == "native") {
        native::run(rounds);
        native::probe_cost();
    } else if only.split(',').any(|o| o == "probe") {
        native::probe_cost();
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

/// The median of some rounds' values.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    quantile(&values, 0.5)
}

/// Median and spread (lowest–highest) of some rounds' values, as a table cell.
pub fn median_and_spread(mut values: Vec<f64>, decimals: usize) -> String {
    values.sort_unstable_by(f64::total_cmp);
    format!(
        "{:.decimals$} ({:.decimals$}–{:.decimals$})",
        quantile(&values, 0.5),
        values[0],
        values[values.len() - 1]
    )
}
