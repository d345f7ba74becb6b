//! Atomic steps on map values, which the kernel half and user space (through its mapping of
//! the tables) change concurrently. core's atomic types offer no compare-and-swap on the eBPF
//! target, whose instruction set (v3) has it: these wrap the intrinsics.
use core::intrinsics::{
    AtomicOrdering, atomic_and, atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg,
};

/// Compare-and-swap: whether `field` held `old` (and now holds `new`).
#[inline(always)]
pub fn cas(field: &mut u64, old: u64, new: u64) -> bool {
    // SAFETY: an aligned u64 of a map value.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(field, old, new)
    }
    .1
}

/// A store ordered after the ones before it (an atomic exchange).
#[inline(always)]
pub fn publish(field: &mut u64, value: u64) {
    // SAFETY: as in `cas`.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(field, value) };
}

/// A read of a field that others change atomically. Aligned 64-bit loads are single-copy
/// atomic, and the eBPF ISA up to v3 has no acquire load: eBPF runs on x86-64 here, whose
/// loads are not reordered with each other.
#[inline(always)]
pub fn load(field: &u64) -> u64 {
    // SAFETY: a plain read of an aligned u64.
    unsafe { core::ptr::read_volatile(field) }
}

/// Sets `bits` in `field`.
#[inline(always)]
pub fn set_bits(field: &mut u64, bits: u64) {
    // SAFETY: as in `cas`.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(field, bits) };
}

/// Clears `bits` in `field`.
#[inline(always)]
#[allow(dead_code)]
pub fn clear_bits(field: &mut u64, bits: u64) {
    // SAFETY: as in `cas`.
    unsafe { atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(field, !bits) };
}

/// Adds `delta` (wrapping: u64::MAX subtracts one). (The value before is not to be had: the
/// linker's target CPU allows no use of an atomic add's result.)
#[inline(always)]
pub fn add(field: *mut u64, delta: u64) {
    // SAFETY: an aligned u64 of a map value, only changed atomically.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(field, delta) };
}

/// A plain store that the compiler keeps in its place among the others.
#[inline(always)]
pub fn put(field: &mut u64, value: u64) {
    // SAFETY: a store to an aligned u64 of a map value.
    unsafe { core::ptr::write_volatile(field, value) };
}
