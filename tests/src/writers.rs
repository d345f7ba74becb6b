//! Writers that make files grow the way VM images do, shared by the VM tests and the bench.
use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    fs,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
    time::Duration,
};

/// A guest's write with cache=none, as the writers here make it.
pub const WRITE_CHUNK: usize = 64 << 10;

/// A VM image with cache=none: 64 KiB O_DIRECT writes at random 64 KiB-aligned offsets of the
/// sparse span `head..head + span`, as many bytes as the span (so some land twice), then one
/// fsync. The file is first sized to the span's end. Returns the bytes written.
pub fn random_direct_writes(path: &Path, head: u64, span: u64, seed: u64) -> u64 {
    let file = open_direct_for_writing(path);
    file.set_len(head + span).unwrap();
    let buffer = AlignedBuffer::new(WRITE_CHUNK);
    let chunks = span / WRITE_CHUNK as u64;
    let mut rng = Rng(seed);
    for _ in 0..chunks {
        let offset = head + rng.below(chunks) * WRITE_CHUNK as u64;
        file.write_all_at(buffer.bytes(), offset).unwrap();
    }
    file.sync_all().unwrap();
    chunks * WRITE_CHUNK as u64
}

/// A running VM rewriting its image in place: `passes` passes of 64 KiB O_DIRECT writes over
/// the file's first `span` bytes, through one descriptor (no resize, no fsync, one close).
/// Returns the writes made.
pub fn direct_rewrites(path: &Path, span: u64, passes: u64) -> u64 {
    let file = open_direct_for_writing(path);
    let buffer = AlignedBuffer::new(WRITE_CHUNK);
    let chunks = span / WRITE_CHUNK as u64;
    for _ in 0..passes {
        for chunk in 0..chunks {
            file.write_all_at(buffer.bytes(), chunk * WRITE_CHUNK as u64)
                .unwrap();
        }
    }
    passes * chunks
}

/// Small allocations close together on the disk: `count` O_DIRECT writes of one 4 KiB block,
/// each `stride` bytes after the last, from `head` (the file is first sized to their end),
/// each with an fsync so that each is its own allocation.
pub fn spaced_block_writes(path: &Path, head: u64, count: u64, stride: u64) {
    let file = open_direct_for_writing(path);
    file.set_len(head + count * stride).unwrap();
    let buffer = AlignedBuffer::new(4096);
    for k in 0..count {
        file.write_all_at(buffer.bytes(), head + k * stride)
            .unwrap();
        file.sync_all().unwrap();
    }
}

/// The file opened for O_DIRECT writes (no page cache: each write is its own bio).
fn open_direct_for_writing(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap()
}

/// Reads the whole file with O_DIRECT, 1 MiB at a time (no page cache: every byte is a read
/// of the device); returns the bytes read.
pub fn direct_read_whole(path: &Path) -> u64 {
    const CHUNK: usize = 1 << 20;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let len = file.metadata().unwrap().len();
    let mut buffer = AlignedBuffer::new(CHUNK);
    let mut at = 0;
    while at < len {
        let n = file.read_at(buffer.bytes_mut(), at).unwrap();
        assert!(n > 0, "{} ends before its size", path.display());
        at += n as u64;
    }
    at
}

/// xorshift64: reproducible pseudo-random numbers without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A pretend extent as the bench crowds the kernel's sector map with: its start (in
    /// sectors, 4 KiB-aligned, in `[lo, hi)`) and its length, 4 to 64 KiB.
    pub fn scattered_extent(&mut self, lo: u64, hi: u64) -> (u64, u64) {
        let start = lo + self.below((hi - lo) / 8) * 8;
        (start, 8 * (1 + self.below(16)))
    }

    pub fn duration_below(&mut self, max: Duration) -> Duration {
        max.mul_f64((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// A page-aligned buffer, as O_DIRECT wants.
struct AlignedBuffer {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuffer {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: ptr points to len bytes we own.
        unsafe { std::ptr::write_bytes(ptr, 0x5a, len) };
        Self { ptr, layout }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialised bytes, alive as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}
