//! Files made in a watched directory are counted from birth: a probe on the two functions
//! that give a new inode its name (`d_instantiate`, `d_instantiate_new`) watches a regular
//! file made in a directory of `WATCHED_DIRS` at once, in a spare slot user space keeps
//! ready, before its first write can allocate. User space hears of it (a `NEW_FILE` event)
//! and takes the slot over when it takes the file up.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{kprobe, map},
    maps::{Array, HashMap},
    programs::ProbeContext,
};
use filemapd_common::{ExtentEvent, InodeKey, Placement, SPARE_SLOTS, VfsLayout, tracepoint as tp};

use crate::{
    atomics::{cas, load},
    trigger::{send, watch_new},
};

/// Directories whose new regular files are watched from birth: the placement they get.
/// Resized by user space at load time.
#[map]
static WATCHED_DIRS: HashMap<InodeKey, Placement> = HashMap::with_max_entries(1, 0);

/// Slots user space keeps ready for such files: slot + 1, 0 when taken.
#[map]
static SPARE: Array<u64> = Array::with_max_entries(SPARE_SLOTS, 0);

/// Where the next file's spare is taken: counts up, taken modulo SPARE_SLOTS.
#[map]
static SPARE_CURSOR: Array<u64> = Array::with_max_entries(1, 0);

/// Set by user space at load time from the kernel's BTF; all zero leaves the probes idle.
#[unsafe(no_mangle)]
static VFS_LAYOUT: VfsLayout = VfsLayout {
    parent_in_dentry: 0,
    inode_in_dentry: 0,
    mode_in_inode: 0,
    ino_in_inode: 0,
    sb_in_inode: 0,
    generation_in_inode: 0,
    dev_in_sb: 0,
    _pad: 0,
};

const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;

/// `void d_instantiate(struct dentry *entry, struct inode *inode)`.
#[kprobe]
pub fn d_instantiate(ctx: ProbeContext) -> u32 {
    adopt(&ctx);
    0
}

/// `void d_instantiate_new(struct dentry *entry, struct inode *inode)`.
#[kprobe]
pub fn d_instantiate_new(ctx: ProbeContext) -> u32 {
    adopt(&ctx);
    0
}

#[inline(always)]
fn adopt(ctx: &ProbeContext) -> Option<()> {
    // SAFETY: plain data in .rodata that user space sets at load time.
    let l: VfsLayout = unsafe { core::ptr::read_volatile(&VFS_LAYOUT) };
    if l.ino_in_inode == 0 {
        return None;
    }
    let dentry: u64 = ctx.arg(0)?;
    let inode: u64 = ctx.arg(1)?;
    if inode == 0 {
        return None;
    }
    let mode: u16 = read(inode + l.mode_in_inode as u64)?;
    if mode & S_IFMT != S_IFREG {
        return None;
    }
    let sb: u64 = read(inode + l.sb_in_inode as u64)?;
    let dev: u32 = read(sb + l.dev_in_sb as u64)?;
    let parent: u64 = read(dentry + l.parent_in_dentry as u64)?;
    let dir: u64 = read(parent + l.inode_in_dentry as u64)?;
    let dir_key = InodeKey {
        dev,
        _pad: 0,
        ino: read(dir + l.ino_in_inode as u64)?,
    };
    // SAFETY: a copy is taken at once; user space only inserts and removes whole entries.
    let template = unsafe { WATCHED_DIRS.get(&dir_key) }.copied()?;
    let key = InodeKey {
        dev,
        _pad: 0,
        ino: read(inode + l.ino_in_inode as u64)?,
    };
    let (slot, place) = take_spare()?;
    let placement = Placement {
        slot,
        generation: read(inode + l.generation_in_inode as u64)?,
        ..template
    };
    if !watch_new(&key, &placement) {
        // Watched already (user space was first): the slot goes back to its place.
        cas(place, 0, slot as u64 + 1);
        return None;
    }
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    send(
        &ExtentEvent {
            key,
            source: tp::NEW_FILE,
            _pad: 0,
            start: slot as u64,
            length: dir_key.ino,
            ktime_ns: now,
            physical_start: 0,
            physical_length: 0,
        },
        0,
    );
    Some(())
}

/// A spare slot, taken from the next place round the table (user space refills it): one
/// look, no loop (Linux 6.1's verifier refuses this loop's shape). None when that place is
/// empty: more files were made than user space refilled since, or another was made at the
/// same instant and took it.
#[inline(always)]
fn take_spare() -> Option<(u32, &'static mut u64)> {
    // SAFETY: an array value, only changed atomically.
    let cursor = unsafe { &mut *SPARE_CURSOR.get_ptr_mut(0)? };
    let at = load(cursor);
    cas(cursor, at, at.wrapping_add(1));
    let index = (at % SPARE_SLOTS as u64) as u32;
    // SAFETY: an array value, only changed atomically.
    let spare = unsafe { &mut *SPARE.get_ptr_mut(index)? };
    let held = load(spare);
    (held != 0 && cas(spare, held, 0)).then(|| ((held - 1) as u32, spare))
}

#[inline(always)]
fn read<T>(address: u64) -> Option<T> {
    // SAFETY: a kernel address read through the helper, which checks the access.
    unsafe { bpf_probe_read_kernel(address as *const T) }.ok()
}
