//! The bio hook: the IO probe without dm-stats. The block layer traces every bio once as it
//! is queued (`block:block_bio_queue`, a dm device's own bios before dm maps them) and, having
//! traced that, once more at its completion (`block:block_bio_complete`). At the queueing the
//! bio is walked through the sector map (its files' IO in flight goes up) and, when it is some
//! watched file's, kept under its address; at the completion what was kept is charged, with
//! the time between. Nothing of dm-mod is read and no region is needed on the device: its
//! dm-stats costs its bios nothing. Every bio of the host pays for the look at its device.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::HashMap,
    programs::RawTracePointContext,
};
use filemapd_common::BioLayout;

use crate::counting::{How, charge, counts_now};

/// The watched files' bios in flight, by the address of their `struct bio`. Shared with a
/// service's successor (pinned, as the gate word is), so that a bio queued before a restart is
/// charged by whichever daemon counts when it completes. An entry whose completion no program
/// saw (its programs went first) is left until its address is a new bio's.
#[map]
static BIOS: HashMap<u64, BioStart> = HashMap::with_max_entries(BIOS_IN_FLIGHT, 0);
/// Bios of watched files in flight at once, at most (deep queues on every counted device).
const BIOS_IN_FLIGHT: u32 = 16_384;

/// What a watched file's bio was at its queueing.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BioStart {
    queued_ns: u64,
    sector: u64,
    end: u64,
    /// The device, and `How`'s write bit.
    how: u64,
}

/// Set by user space at load time from the kernel's BTF; all zero leaves the hook idle.
#[unsafe(no_mangle)]
static BIO_LAYOUT: BioLayout = BioLayout {
    bdev_in_bio: 0,
    opf_in_bio: 0,
    sector_in_bio: 0,
    size_in_bio: 0,
    dev_in_bdev: 0,
    _pad: 0,
};

/// `block_bio_queue(struct bio *bio)`.
#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn block_bio_queue(ctx: RawTracePointContext) -> i32 {
    // SAFETY: plain data in .rodata that user space sets at load time.
    let layout: BioLayout = unsafe { core::ptr::read_volatile(&BIO_LAYOUT) };
    if layout.bdev_in_bio == 0 || !counts_now() {
        return 0;
    }
    let bio: u64 = ctx.arg(0);
    let Some(seen) = read_bio(bio, &layout) else {
        return 0;
    };
    let end = seen.sector + seen.sectors;
    // A bio's start only raises its files' IO in flight: its direction is read (one probe
    // read fewer for every other bio of the host) once it is known to be a watched file's.
    let started = How {
        write: false,
        end: false,
    }
    .with(seen.dev);
    if seen.sectors == 0 || charge(started, seen.sector, end, 0) == 0 {
        return 0;
    }
    let how = How {
        write: is_write(bio, &layout),
        end: false,
    }
    .with(seen.dev);
    let start = BioStart {
        // SAFETY: a helper without arguments or preconditions.
        queued_ns: unsafe { bpf_ktime_get_ns() },
        sector: seen.sector,
        end,
        how,
    };
    if BIOS.insert(&bio, &start, 0).is_err() {
        // No room: the bio is counted now, its time unknown, so that its files' IO in flight
        // does not stay raised.
        charge(how | How::END, seen.sector, end, 0);
    }
    0
}

/// `block_bio_complete(struct request_queue *q, struct bio *bio)`.
#[raw_tracepoint(tracepoint = "block_bio_complete")]
pub fn block_bio_complete(ctx: RawTracePointContext) -> i32 {
    // The daemon that counts now charges the bio (a stopped service's programs may still
    // run), and takes it out: of two programs that both do, only the one whose removal
    // succeeds.
    if !counts_now() {
        return 0;
    }
    let bio: u64 = ctx.arg(1);
    // SAFETY: a copy taken at once; only this program takes the entry out.
    let Some(start) = (unsafe { BIOS.get(&bio) }).copied() else {
        return 0;
    };
    if BIOS.remove(&bio).is_err() {
        return 0;
    }
    // SAFETY: as above.
    let now = unsafe { bpf_ktime_get_ns() };
    charge(
        start.how | How::END,
        start.sector,
        start.end,
        now.wrapping_sub(start.queued_ns),
    );
    0
}

/// What the hook needs of every bio.
struct Seen {
    dev: u32,
    sector: u64,
    sectors: u64,
}

/// The bio's device (kernel dev_t) and sectors, read at the layout's offsets.
#[inline(always)]
fn read_bio(bio: u64, layout: &BioLayout) -> Option<Seen> {
    // SAFETY (every read): the helper checks the access; the offsets are the kernel's own.
    let bdev: u64 =
        unsafe { bpf_probe_read_kernel((bio + layout.bdev_in_bio as u64) as *const u64) }.ok()?;
    if bdev == 0 {
        return None;
    }
    let dev: u32 =
        unsafe { bpf_probe_read_kernel((bdev + layout.dev_in_bdev as u64) as *const u32) }.ok()?;
    let sector: u64 =
        unsafe { bpf_probe_read_kernel((bio + layout.sector_in_bio as u64) as *const u64) }.ok()?;
    let bytes: u32 =
        unsafe { bpf_probe_read_kernel((bio + layout.size_in_bio as u64) as *const u32) }.ok()?;
    Some(Seen {
        dev,
        sector,
        sectors: u64::from(bytes >> 9),
    })
}

/// Whether the bio writes: its operation is the low byte of bi_opf, and odd ones write
/// (op_is_write). A read that fails counts it as a read.
#[inline(always)]
fn is_write(bio: u64, layout: &BioLayout) -> bool {
    // SAFETY: as in `read_bio`.
    let opf: u32 = unsafe { bpf_probe_read_kernel((bio + layout.opf_in_bio as u64) as *const u32) }
        .unwrap_or(0);
    opf & 1 == 1
}
