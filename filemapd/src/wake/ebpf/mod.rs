//! The eBPF trigger: loads the kernel half, tells it each tracepoint's layout, attaches what
//! this kernel offers, and hands the events for watched inodes to user space.
pub mod hub;
pub mod tracefs;
pub mod tracepoints;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{KProbe, TracePoint},
};
use filemapd_common::{ExtentEvent, InodeKey, LAYOUTS_LEN, TracepointLayout, names};
use tokio::io::unix::AsyncFd;

pub use hub::{EventFeed, Feed, Hub};
pub use tracepoints::{Change, TRACEPOINTS, Tracepoint};

/// The kernel half, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filemapd"));

/// Loaded and attached eBPF programs plus their maps.
pub struct Tracer {
    // Keeps the programs attached for as long as the tracer lives.
    _ebpf: Ebpf,
    watched: HashMap<MapData, InodeKey, u8>,
    events: AsyncFd<RingBuf<MapData>>,
    lost: PerCpuArray<MapData, u64>,
    attached: Vec<&'static Tracepoint>,
    /// Whether the kprobe on dm-stats' message handler is attached (it needs dm loaded).
    sees_region_changes: bool,
}

impl Tracer {
    /// Loads the programs with room for `max_watched` inodes and attaches every tracepoint this
    /// kernel has. Fails (with the reason) when none can be attached.
    pub fn load(max_watched: u32) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let mut layouts = [TracepointLayout::default(); LAYOUTS_LEN];
        let mut present = Vec::new();
        for tp in &TRACEPOINTS {
            match layout_of(tp)? {
                Some(layout) => {
                    layouts[tp.index as usize] = layout;
                    present.push(tp);
                }
                None => log::debug!("tracepoint {}:{} not available", tp.category, tp.name),
            }
        }
        if present.is_empty() {
            bail!("none of filemapd's tracepoints exist on this kernel");
        }
        let own_tgid = std::process::id();
        // The fault tests shrink the filter (more files than room) and the ring (overflow).
        let max_watched = test_size("FILEMAPD_TEST_WATCH_ROOM").unwrap_or(max_watched);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::LAYOUTS, &layouts, true)
            .override_global(names::OWN_TGID, &own_tgid, true)
            .map_max_entries(names::WATCHED, max_watched.max(1));
        if let Some(bytes) = test_size("FILEMAPD_TEST_RING_BYTES") {
            loader.map_max_entries(names::EVENTS, bytes);
        }
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
        let mut attached = Vec::new();
        for tp in present {
            let program: &mut TracePoint = ebpf
                .program_mut(tp.name)
                .with_context(|| format!("program {} missing from the eBPF object", tp.name))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifying program {}", tp.name))?;
            program
                .attach(tp.category, tp.name)
                .with_context(|| format!("attaching to {}:{}", tp.category, tp.name))?;
            attached.push(tp);
        }
        let sees_region_changes = match attach_region_probe(&mut ebpf) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("no word of other processes' region changes: {e:#}");
                false
            }
        };
        let watched = HashMap::try_from(take_map(&mut ebpf, names::WATCHED)?)?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)?;
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the fd stays
        // open for as long as it is registered.
        let events = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        let lost = PerCpuArray::try_from(take_map(&mut ebpf, names::LOST)?)?;
        Ok(Self {
            _ebpf: ebpf,
            watched,
            events,
            lost,
            attached,
            sees_region_changes,
        })
    }

    /// Whether events report other processes deleting regions or rewriting their aux_data
    /// (so a deleted group needs no polling to be noticed).
    pub fn sees_region_changes(&self) -> bool {
        self.sees_region_changes
    }

    /// The tracepoints the programs are attached to.
    pub fn attached(&self) -> &[&'static Tracepoint] {
        &self.attached
    }

    pub fn watch(&mut self, key: InodeKey) -> anyhow::Result<()> {
        self.watched
            .insert(key, 1, 0)
            .with_context(|| format!("watching {key:?}"))
    }

    pub fn unwatch(&mut self, key: InodeKey) -> anyhow::Result<()> {
        match self.watched.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("unwatching {key:?}")),
        }
    }

    /// Waits until at least one event is ready, then returns every event in the buffer.
    pub async fn next_events(&mut self) -> anyhow::Result<Vec<ExtentEvent>> {
        loop {
            let mut guard = self.events.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<ExtentEvent>() {
                    // SAFETY: the kernel half writes exactly one ExtentEvent per record;
                    // read_unaligned because ring records are only 8-byte aligned.
                    batch.push(unsafe { item.as_ptr().cast::<ExtentEvent>().read_unaligned() });
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }

    /// Events dropped because the ring buffer was full, since load.
    pub fn lost_events(&self) -> anyhow::Result<u64> {
        Ok(self.lost.get(&0, 0)?.iter().sum())
    }
}

/// A size the fault tests set through the environment (never set in production).
fn test_size(variable: &str) -> Option<u32> {
    let value = std::env::var(variable).ok()?.parse().ok()?;
    log::warn!("{variable}={value}: a test size, not for production");
    Some(value)
}

/// The probes on `dm_stats_message`'s entry and return (in dm-mod, so absent where
/// device-mapper is not loaded).
fn attach_region_probe(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for name in [names::DM_STATS_MESSAGE, names::DM_STATS_MESSAGE_RETURN] {
        let program: &mut KProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing from the eBPF object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("verifying program {name}"))?;
        program
            .attach(names::DM_STATS_MESSAGE, 0)
            .with_context(|| format!("attaching {name} to {}", names::DM_STATS_MESSAGE))?;
    }
    Ok(())
}

/// The layout of one tracepoint on this kernel, `None` when the kernel lacks the tracepoint.
fn layout_of(tp: &Tracepoint) -> anyhow::Result<Option<TracepointLayout>> {
    let Some(format) = tracefs::read_format(tp.category, tp.name)? else {
        return Ok(None);
    };
    let field = |name: &str| {
        tracefs::find_field(&format, name).with_context(|| {
            format!(
                "tracepoint {}:{} has no field {name:?}",
                tp.category, tp.name
            )
        })
    };
    let (skip, skip_mask) = match tp.skip {
        Some((name, mask)) => (field(name)?, mask),
        None => (Default::default(), 0),
    };
    // A change of the whole file has no range: its start and length read as 0.
    let (start, length) = match &tp.range {
        Some(range) => (field(range.start.0)?, field(range.length.0)?),
        None => Default::default(),
    };
    Ok(Some(TracepointLayout {
        dev: field("dev")?,
        ino: field("ino")?,
        start,
        length,
        skip,
        _pad: 0,
        skip_mask,
    }))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
fn raise_memlock_limit() {
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
