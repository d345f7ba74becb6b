//! Every slot of a per-CPU array in a few `bpf(BPF_MAP_LOOKUP_BATCH)` calls, for a scrape of
//! thousands of files: one lookup per slot costs a system call each (under emulation ~14 µs a
//! slot, 140 ms at 10,000 files). aya 0.14 has no batch operations and no well-kept crate
//! offers them without building libbpf's C, so this one command is called here directly;
//! kernels without it (before Linux 5.6) get `None` and the caller reads slot by slot.
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// `BPF_MAP_LOOKUP_BATCH`, from include/uapi/linux/bpf.h.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C, align(8))]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Slots read per call: a bounded buffer whatever the map's size.
const SLOTS_PER_CALL: u32 = 1024;

/// The values of slots `0..slots` of the per-CPU array behind `map`, `cpus` per slot (the
/// kernel's possible CPUs) in slot order; `V` must be the map's value type, a `#[repr(C)]`
/// type of integers (any bytes are a valid `V`) whose size is a multiple of 8, as the kernel
/// lays per-CPU values out. `None` when this kernel cannot read maps in batches.
pub fn per_cpu_values<V: Copy + Default>(
    map: BorrowedFd<'_>,
    slots: u32,
    cpus: usize,
) -> std::io::Result<Option<Vec<V>>> {
    assert_eq!(size_of::<V>() % 8, 0, "per-CPU values are 8-byte aligned");
    let mut values = vec![V::default(); slots as usize * cpus];
    let mut keys = vec![0u32; SLOTS_PER_CALL as usize];
    let mut read = 0u32;
    let mut next = 0u32;
    while read < slots {
        let mut attr = BatchAttr {
            // The first call starts at the map's beginning (no in_batch).
            in_batch: if read == 0 { 0 } else { &raw const next as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values[read as usize * cpus..].as_mut_ptr() as u64,
            count: SLOTS_PER_CALL.min(slots - read),
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers that hold `count` keys and `count * cpus` values
        // (`values` has room from `read` on for `slots - read` slots, and count is no more);
        // the kernel writes no further and keeps no pointer after the call.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if result < 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                // The end of the map: `count` says how many this call still filled.
                Some(libc::ENOENT) => {
                    read += attr.count;
                    break;
                }
                Some(libc::EINVAL | libc::ENOTSUP | libc::EOPNOTSUPP) if read == 0 => {
                    return Ok(None);
                }
                _ => return Err(error),
            }
        }
        if attr.count == 0 {
            break;
        }
        read += attr.count;
    }
    values.truncate(read as usize * cpus);
    Ok(Some(values))
}
