//! Memory glibc's malloc would otherwise keep: a long-lived daemon's RSS should be what it
//! holds, not what it once held.

/// Gives back to the kernel the heap pages freed so far (reading the kernel's BTF takes ~30 MB
/// for a moment at start; the allocations made since hold the heap's top, so malloc would not
/// trim it by itself).
pub fn give_back_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free pages of malloc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Serves buffers over 256 KiB (a scrape's text: MBs for thousands of files) from their own
/// mappings, returned whole when freed. By default glibc raises this threshold to the size of
/// the last such buffer freed, and later ones stay in the heap after use.
pub fn map_large_buffers_apart() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes malloc's tuning.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}
