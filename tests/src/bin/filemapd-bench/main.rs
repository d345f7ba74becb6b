//! The benchmarks `cargo xtask bench` runs inside the device-mapper VM. Each compares, in one
//! run and on the same kernel, filemapd with eBPF, filemapd polling, and lvm2's own
//! dmfilemapd (built by xtask from Debian's source; FILEMAPD_BENCH_LVM2 names it).
//!
//! Output: the markdown body of BENCHMARKS.md, each line prefixed with [`OUT`] so that xtask
//! can pick it out of the VM's console.
mod appends;
mod bio_hook;
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
mod scrape;
mod start_up;
mod usage;
mod witness;

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
    let steps: usize = env_number("FILEMAPD_BENCH_STEPS", 500);
    let only = std::env::var("FILEMAPD_BENCH_ONLY").unwrap_or_default();
    let named = |name: &str| only.split(',').any(|o| o == name);
    let wanted = |name: &str| only.is_empty() || named(name);
    let rounds = env_number("FILEMAPD_BENCH_ROUNDS", 5);
    if wanted("latency") {
        timed(|| latency::run(steps));
    }
    if wanted("counted") {
        timed(|| counted::run(rounds, counted::Scope::Whole));
    } else if named("accounting") {
        // The accounting's cost alone, for a quick look.
        timed(|| counted::run(rounds, counted::Scope::AccountingCost));
    }
    if wanted("cost") {
        timed(|| region_cost::run(rounds));
    }
    if wanted("images") {
        timed(|| images::run(rounds));
    }
    if wanted("appends") {
        timed(|| appends::run(rounds));
    }
    if wanted("idle") {
        let idle = Duration::from_secs(env_number("FILEMAPD_BENCH_IDLE_SECS", 60));
        timed(|| usage::run_idle(idle));
    }
    if wanted("scale") {
        timed(scale::many_extents_rows);
        timed(scale::many_files_rows);
    } else if named("extents") {
        // The one-file parts of scale alone: an update of a 10,000- and a 30,000-extent group.
        timed(scale::many_extents_rows);
    } else if named("files") {
        // The many-files parts of scale alone, for a quick look; FILEMAPD_BENCH_FILES=N,...
        // runs only the rows without regions for those counts.
        match std::env::var("FILEMAPD_BENCH_FILES") {
            Ok(counts) => {
                let counts: Vec<usize> = counts.split(',').filter_map(|n| n.parse().ok()).collect();
                timed(|| scale::many_files_without_regions(&counts));
            }
            Err(_) => timed(scale::many_files_rows),
        }
    }
    if wanted("handoff") {
        timed(|| handoff::run(100));
    }
    if wanted("new-image") {
        timed(|| new_image::run(5));
    }
    // On the machine's own kernel, outside the VM: only when named.
    if named("native") {
        timed(|| {
            native::run(rounds);
            native::probe_cost();
            scrape::run(rounds);
            bio_hook::run(rounds);
            start_up::run(rounds);
        });
    } else if named("probe") {
        timed(native::probe_cost);
    } else if named("scrape") {
        timed(|| scrape::run(rounds));
    } else if named("bio-hook") {
        timed(|| bio_hook::run(rounds));
    } else if named("start-up") {
        timed(|| start_up::run(rounds));
    }
}

/// Runs one section and says under it how long it took, so that a reader (and whoever splits
/// the bench into parts) sees where a run's time goes.
fn timed(section: impl FnOnce()) {
    let started = std::time::Instant::now();
    section();
    report!(
        "*This section ran for {:.1} min.*\n",
        started.elapsed().as_secs_f64() / 60.0
    );
}

/// A runtime for a tracer in the bench's own process, to enter while the tracer lives: it
/// registers its ring with the runtime when it loads.
pub fn runtime_for_tracers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
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

/// A writer-slowdown target judged as the report judges every such target: met only when the
/// median slowdown meets it, and said when the rounds' range straddles it. Round i of
/// `monitored` ran beside round i of `baseline` (MB/s each); the median slowdown is that of the
/// medians, as the tables show it.
pub fn slowdown_verdict(what: &str, baseline: &[f64], monitored: &[f64], target: f64) -> String {
    let Slowdowns {
        at_median,
        low,
        high,
        rounds,
    } = slowdowns(baseline, monitored);
    let verdict = if at_median <= target { "met" } else { "missed" };
    let straddles = if low <= target && target < high {
        format!(", a range that straddles {target} %")
    } else {
        String::new()
    };
    format!(
        "- {what}: slowdown ≤ {target} % {verdict} (median {at_median:+.1} %; rounds {low:+.1} to {high:+.1} %{straddles}, {rounds} rounds)"
    )
}

/// A monitor's slowdowns of a writer, %, against the writer alone: from the two medians, and
/// the lowest and highest of the rounds' (each round's pair).
pub struct Slowdowns {
    pub at_median: f64,
    pub low: f64,
    pub high: f64,
    pub rounds: usize,
}

/// The slowdowns of a writer's MB/s with a monitor (`monitored`) against without
/// (`baseline`), round by round.
pub fn slowdowns(baseline: &[f64], monitored: &[f64]) -> Slowdowns {
    let slowdown = |b: f64, m: f64| (b - m) / b * 100.0;
    let mut rounds: Vec<f64> = baseline
        .iter()
        .zip(monitored)
        .map(|(&b, &m)| slowdown(b, m))
        .collect();
    rounds.sort_unstable_by(f64::total_cmp);
    Slowdowns {
        at_median: slowdown(median(baseline.to_vec()), median(monitored.to_vec())),
        low: rounds[0],
        high: rounds[rounds.len() - 1],
        rounds: rounds.len(),
    }
}
