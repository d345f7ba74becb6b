//! `filemapd watch --check-config`: what a config and PATHs would have the watch follow, and
//! how, printed one file per line; nothing is made or changed. A config that cannot be read
//! or parsed fails with the line at fault; so does a PATH that is not there. With eBPF, what
//! the kernel's sector map is sized for, against the extents the files hold now, and whether
//! the programs load here (they are loaded and attached for a moment, as the watch would):
//! where an option needs the kernel's counting and cannot have it, the watch would refuse to
//! start, and the check fails with the same reason.
use std::path::Path;

use super::{
    Options,
    config::{Config, read_config},
    counting_demanded_by, loads_ebpf, map_extents,
    paths::files_under,
    refusal,
};
use crate::{
    daemon::regions::Regions,
    file::fiemap,
    oneshot,
    wake::ebpf::{IoHook, Tracer, tables_for_extents, tables_size},
};

/// Prints what would be watched; returns whether every file named can be (a file without
/// extents yet can: the watch takes it up at its first blocks) and the watch would start.
pub fn check(options: &Options) -> anyhow::Result<bool> {
    let Options {
        config,
        paths,
        regions,
        kernel_map_extents,
        ..
    } = options;
    let regions = *regions;
    let config = match config {
        Some(config) => read_config(config)?,
        None => Config::default(),
    };
    let mut all_ok = true;
    // As the watch decides it: a file left to the kernel's counters alone needs them.
    let mut files_need_counting = regions == Regions::None;
    let (map_extents, sized_by) = map_extents(*kernel_map_extents, config.kernel_map_extents);
    println!(
        "kernel map: with eBPF, sized for {} ({sized_by}): {} of the kernel's memory, taken whole at start",
        extents(u64::from(map_extents)),
        tables_size(tables_for_extents(map_extents))
    );
    let mut extents_now = 0;
    if let Some(metrics) = config.metrics {
        match crate::daemon::metrics::check_address(metrics.address, metrics.remote) {
            Ok(address) => println!(
                "metrics: served at http://{address}/metrics unless --metrics says otherwise"
            ),
            Err(e) => {
                println!("metrics: {e:#}");
                all_ok = false;
            }
        }
    }
    if let Some(socket) = &config.handoff {
        println!(
            "handoff: takes the files dmstats-launched daemons hand over on {}",
            socket.display()
        );
        if socket != std::path::Path::new(crate::daemon::handoff::SOCKET) {
            println!(
                "handoff: daemons look there only with FILEMAPD_HANDOFF_SOCKET={} in their environment",
                socket.display()
            );
        }
    }
    for entry in &config.groups {
        let group = entry.group_id.expect("a [[group]] names its group");
        let found = oneshot::existing_group(&entry.path);
        let state = match found {
            Ok(Some(id)) if id == group => Ok("its group is there".to_string()),
            Ok(_) => Err(format!(
                "no group {group} maps it now: the watch would refuse it"
            )),
            Err(e) => Err(format!("the watch would refuse it: {e:#}")),
        };
        all_ok &= state.is_ok();
        let state = state.unwrap_or_else(|refused| refused);
        println!(
            "{}: group {group} made beforehand, followed by {}; {state}",
            entry.path.display(),
            entry.mode
        );
    }
    for spec in config.paths.iter().chain(paths) {
        let regions = spec.regions.unwrap_or(regions);
        let files = match files_under(std::slice::from_ref(&spec.path)) {
            Ok(files) => files,
            Err(e) => {
                println!("{}: not there: {e:#}", spec.path.display());
                all_ok = false;
                continue;
            }
        };
        let named = std::fs::canonicalize(&spec.path).unwrap_or_else(|_| spec.path.clone());
        if spec.path.is_dir() {
            files_need_counting |= regions == Regions::None;
            println!(
                "{}: a directory of {} file(s); files made there later are counted from birth, regions {regions}",
                spec.path.display(),
                files.len()
            );
        }
        for file in files {
            let how = match (regions, oneshot::existing_group(&file)) {
                (_, Ok(Some(id))) => format!("adopts group {id}, regions {}", regions.with_group()),
                (Regions::None, Ok(None)) => {
                    files_need_counting = true;
                    "regions none: the kernel's counters alone".into()
                }
                (_, Ok(None)) => {
                    let alias = spec
                        .alias
                        .clone()
                        .filter(|_| named == file)
                        .or_else(|| file.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .unwrap_or_default();
                    format!(
                        "no group yet: one made as dmstats makes it (alias {alias}, program id {}), regions {regions}",
                        spec.program_id
                    )
                }
                (_, Err(e)) => {
                    all_ok = false;
                    println!(
                        "{}: the watch would skip it: {e:#}, followed by {}",
                        file.display(),
                        spec.follow
                    );
                    continue;
                }
            };
            println!("{}: {how}, followed by {}", file.display(), spec.follow);
            extents_now += placed_extents(&file);
        }
    }
    let held = format!("kernel map: the files hold {} now", extents(extents_now));
    if extents_now > u64::from(map_extents) {
        println!(
            "{held}, more than it is sized for: some of their IO may go uncounted (filemapd_file_uncounted_runs says; raise kernel_map_extents)"
        );
    } else {
        println!("{held}");
    }
    let io_hook = options.io_hook.or(config.io_hook);
    if loads_ebpf(options.ebpf, files_need_counting, io_hook) {
        all_ok &= programs_load(
            map_extents,
            io_hook,
            regions,
            files_need_counting,
            options.interval,
        );
    } else {
        println!(
            "eBPF: not asked for: files poll every {} s (--ebpf wakes them on allocation instead)",
            options.interval.as_secs_f64()
        );
    }
    Ok(all_ok)
}

/// Loads the programs as the watch would, says what they do here, and returns whether the
/// watch would start and follow every file: one that the kernel's counters alone would count
/// (`files_need_counting`) it stops following where the kernel cannot count.
fn programs_load(
    map_extents: u32,
    io_hook: Option<IoHook>,
    regions: Regions,
    files_need_counting: bool,
    interval: std::time::Duration,
) -> bool {
    // The ring buffer registers with a runtime's reactor, which the check otherwise lacks.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            println!("eBPF: not tried: starting a runtime: {e}");
            return false;
        }
    };
    let _inside = runtime.enter();
    let loaded = Tracer::load_to_check(tables_for_extents(map_extents), io_hook);
    if let Some(refused) = refusal(&loaded, counting_demanded_by(regions, io_hook).as_deref()) {
        println!("eBPF: the watch would refuse to start: {refused}");
        return false;
    }
    let uncounted = "; the files of regions none would not be followed";
    match loaded {
        Ok(tracer) => match (tracer.counting(), tracer.counting_unavailable()) {
            (Some(counting), _) => {
                println!(
                    "eBPF: the programs load here: allocation events wake the watch, and the kernel counts the files' IO through the {} hook",
                    counting.hook()
                );
                true
            }
            (None, why) => {
                println!(
                    "eBPF: the programs load here: allocation events wake the watch; the kernel cannot count the files' IO here: {}{}",
                    why.unwrap_or("no reason given"),
                    if files_need_counting { uncounted } else { "" }
                );
                !files_need_counting
            }
        },
        Err(e) => {
            println!(
                "eBPF: cannot be used here ({e:#}): files would poll every {} s{}",
                interval.as_secs_f64(),
                if files_need_counting { uncounted } else { "" }
            );
            !files_need_counting
        }
    }
}

/// The file's extents on its device now, as FIEMAP lists them (0 when it cannot be read:
/// its line said why already).
fn placed_extents(file: &Path) -> u64 {
    let Ok(opened) = std::fs::File::open(file) else {
        return 0;
    };
    fiemap::read_extents(&opened, 0, u64::MAX, false)
        .map(|extents| extents.iter().filter(|e| e.is_placed()).count() as u64)
        .unwrap_or(0)
}

fn extents(n: u64) -> String {
    match n {
        1 => "1 extent".to_string(),
        n => format!("{n} extents"),
    }
}
