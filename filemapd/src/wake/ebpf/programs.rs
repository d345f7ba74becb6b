//! Loading and attaching the kernel half's programs beyond the allocation tracepoints: the
//! probe on dm-stats' message handler, the in-kernel counting's (the bio hook or the probe on
//! dm-stats' accounting, the xfs conversion probes, the new-file probes), and the counting
//! over the object's maps.
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{KProbe, Program, ProgramError, RawTracePoint, links::FdLink},
};
use filemapd_common::{InodeKey, Placement, names, sector_map::TableLogs};
use std::{
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
};
use tokio::io::unix::AsyncFd;

use super::{counting::Counting, io_hook::IoHook, kernel_layout, pins, restart, sector_map};

/// The kernel half, built by build.rs.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filemapd"));

/// The in-kernel counting's maps with its IO probe verified but attached to nothing, for
/// tests and benchmarks on machines without device-mapper.
pub fn standalone_counting(max_files: u32, tables: TableLogs) -> anyhow::Result<Counting> {
    raise_memlock_limit();
    let mut ebpf = EbpfLoader::new()
        .override_global(names::TABLE_LOGS, &tables, true)
        .map_max_entries(names::COUNTERS, max_files.max(1))
        .map_max_entries(names::BOUNDS, max_files.max(1))
        .map_max_entries(names::CHUNKS, 1 << tables.chunks)
        .map_max_entries(names::MAKING, 1 << tables.chunks)
        .map_max_entries(names::BLOCKS, 1 << tables.blocks)
        .load(OBJECT)
        .context("loading the eBPF object")?;
    let counting = unattached_counting_over(&mut ebpf, tables)?;
    counting.serve_from(Arc::new(Mutex::new(ebpf)));
    Ok(counting)
}

/// The probes on `dm_stats_message`'s entry and return (in dm-mod, so absent where
/// device-mapper is not loaded).
pub(super) fn attach_region_probe(
    ebpf: &mut Ebpf,
    links: &mut restart::Links,
) -> anyhow::Result<()> {
    attach_kprobes(
        ebpf,
        names::DM_STATS_MESSAGE,
        &[names::DM_STATS_MESSAGE, names::DM_STATS_MESSAGE_RETURN],
        links,
    )
}

/// Loads the kprobe (or kretprobe) programs `programs` and attaches them to `function`; their
/// links go to `links` where it keeps them.
fn attach_kprobes(
    ebpf: &mut Ebpf,
    function: &str,
    programs: &[&str],
    links: &mut restart::Links,
) -> anyhow::Result<()> {
    for &name in programs {
        let program = load_kprobe(ebpf, name)?;
        let link = program
            .attach(function, 0)
            .with_context(|| format!("attaching {name} to {function}"))?;
        if links.keeps() {
            links.hold(name, FdLink::try_from(program.take_link(link)?)?);
        }
    }
    Ok(())
}

/// Loads (verifies) the kprobe program `name` of the object.
fn load_kprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut KProbe> {
    load_program(ebpf, name, KProbe::load)
}

/// Loads (verifies) the raw tracepoint program `name` of the object.
fn load_raw_tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<&'a mut RawTracePoint> {
    load_program(ebpf, name, RawTracePoint::load)
}

/// The program `name` of the object as a `P`, loaded (verified) with `load`.
pub(super) fn load_program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &str,
    load: impl FnOnce(&mut P) -> Result<(), ProgramError>,
) -> anyhow::Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program: &mut P = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} is missing from the eBPF object"))?
        .try_into()?;
    load(program).with_context(|| format!("verifying program {name}"))?;
    Ok(program)
}

/// The bio hook's programs, attached to the block tracepoints they are named after; their
/// links go to `links` where it keeps them.
fn attach_bio_hook(ebpf: &mut Ebpf, links: &mut restart::Links) -> anyhow::Result<()> {
    for name in [names::BLOCK_BIO_COMPLETE, names::BLOCK_BIO_QUEUE] {
        let program = load_raw_tracepoint(ebpf, name)?;
        let link = program
            .attach(name)
            .with_context(|| format!("attaching {name} to block:{name}"))?;
        if links.keeps() {
            links.hold(name, FdLink::from(program.take_link(link)?));
        }
    }
    Ok(())
}

/// The maps through which the kernel watches new files from birth (see `new_files` in the
/// kernel half).
pub(super) struct NewFiles {
    pub(super) dirs: HashMap<MapData, InodeKey, Placement>,
    pub(super) spare: Array<MapData, u64>,
}

/// The probes that watch a new file in a watched directory from birth, and their maps.
pub(super) fn attach_new_files(
    ebpf: &mut Ebpf,
    links: &mut restart::Links,
) -> anyhow::Result<NewFiles> {
    for name in [names::D_INSTANTIATE, names::D_INSTANTIATE_NEW] {
        attach_kprobes(ebpf, name, &[name], links)?;
    }
    Ok(NewFiles {
        dirs: HashMap::try_from(take_map(ebpf, names::WATCHED_DIRS)?)?,
        spare: Array::try_from(take_map(ebpf, names::SPARE)?)?,
    })
}

/// The programs of the in-kernel counting (the bio hook; or probes on dm-mod's per-bio
/// accounting and on its cleanup of a device), and its maps.
pub(super) fn attach_counting(
    ebpf: &mut Ebpf,
    hook: IoHook,
    layout: &kernel_layout::KernelLayout,
    watched: &aya::maps::Map,
    tables: TableLogs,
    links: &mut restart::Links,
) -> anyhow::Result<(Counting, Option<pins::PinDir>)> {
    match hook {
        IoHook::Bio => {
            log::debug!("bio layout for the in-kernel counting: {:?}", layout.bio);
            attach_bio_hook(ebpf, links)?;
        }
        IoHook::DmStats => {
            log::debug!("dm layout for the in-kernel counting: {:?}", layout.dm);
            // The cleanup probe first: the IO probe remembers devices only while it is
            // attached.
            for name in [names::DM_STATS_CLEANUP, names::DM_STATS_ACCOUNT_IO] {
                attach_kprobes(ebpf, name, &[name], links)?;
            }
        }
    }
    // xfs's writeback conversions (xfs may not be loaded: then only direct IO on xfs is
    // recorded at once, buffered writes by the pass after their allocation).
    if let Err(e) = attach_kprobes(
        ebpf,
        names::XFS_BMAPI_CONVERT_DELALLOC,
        &[
            names::XFS_BMAPI_CONVERT_DELALLOC,
            names::XFS_BMAPI_CONVERT_DELALLOC_RETURN,
        ],
        links,
    ) {
        log::info!("no recording of xfs writeback's allocations at once: {e:#}");
    }
    let counters = take_map(ebpf, names::COUNTERS)?;
    let pins = pins::PinDir::pin(watched, &counters);
    let counting = counting_over(ebpf, counters, tables, hook)?;
    Ok((counting, pins))
}

/// The counting over the object's maps, its IO probe (and the new-file probes) verified but
/// not attached.
pub(super) fn unattached_counting_over(
    ebpf: &mut Ebpf,
    tables: TableLogs,
) -> anyhow::Result<Counting> {
    for name in [
        names::DM_STATS_ACCOUNT_IO,
        names::D_INSTANTIATE,
        names::D_INSTANTIATE_NEW,
    ] {
        load_kprobe(ebpf, name)?;
    }
    for name in [names::BLOCK_BIO_QUEUE, names::BLOCK_BIO_COMPLETE] {
        load_raw_tracepoint(ebpf, name)?;
    }
    let counters = take_map(ebpf, names::COUNTERS)?;
    counting_over(ebpf, counters, tables, IoHook::DmStats)
}

/// The counting over the object's maps (`counters` already taken out, to be pinned), its
/// `hook`'s programs loaded: the one that walks bios is kept to read how often the kernel
/// skipped it (`Counting::io_probe_skips`).
fn counting_over(
    ebpf: &mut Ebpf,
    counters: aya::maps::Map,
    tables: TableLogs,
    hook: IoHook,
) -> anyhow::Result<Counting> {
    let walker = match hook {
        IoHook::Bio => names::BLOCK_BIO_QUEUE,
        IoHook::DmStats => names::DM_STATS_ACCOUNT_IO,
    };
    let io_probe = ebpf
        .program(walker)
        .context("the IO probe")?
        .fd()?
        .try_clone()?;
    for service in [names::CHARGE_SERVICE, names::CARRY_SERVICE] {
        load_raw_tracepoint(ebpf, service)?;
    }
    let map = sector_map::SectorMap::new(
        take_map(ebpf, names::CHUNKS)?,
        take_map(ebpf, names::BLOCKS)?,
        take_map(ebpf, names::MAKING)?,
        tables,
    )?;
    let aya::maps::Map::PerCpuArray(data) = &counters else {
        anyhow::bail!("the counters map is not a per-CPU array");
    };
    let counters_fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the counters map's descriptor")?;
    Ok(Counting::new(
        map,
        PerCpuArray::try_from(counters)?,
        counters_fd,
        Array::try_from(take_map(ebpf, names::BOUNDS)?)?,
        io_probe,
        hook,
    ))
}

/// Passes the programs' aya-log records to this process's logger as they come.
pub(super) fn spawn_program_log(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("starting the eBPF programs' log")?;
    // SAFETY: the logger owns its ring buffer's fd and lives inside the AsyncFd, so the fd
    // stays open for as long as it is registered.
    let mut logger = unsafe { AsyncFd::register(logger) }
        .map_err(|e| anyhow::anyhow!("registering the eBPF programs' log with tokio: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

pub(super) fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
pub(super) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
