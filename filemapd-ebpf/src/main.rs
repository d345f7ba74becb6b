//! Kernel half of filemapd, by concern: `trigger` (one tiny program per block-allocation
//! tracepoint, filtered to the watched inodes, waking user space; and word of other
//! processes' region changes), `xfs_conversion` (which blocks xfs's writeback makes fresh),
//! `sector_map` (which watched files own which sectors of a dm device), `counting` (charges
//! each bio to the files owning its sectors: all of a file's IO, whatever regions exist),
//! `bio_hook` (the block layer's tracepoints, which call it for every bio, with no dm-stats
//! region) and `new_files` (a file made in a watched directory is watched from birth).
//! Everything that can happen in user space happens there.
#![no_std]
#![no_main]
// Compare-and-swap on map values: core's atomic types offer none on the eBPF target, whose
// instruction set (v3) has it.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod atomics;
mod bio_hook;
mod counting;
mod new_files;
mod sector_map;
mod trigger;
mod xfs_conversion;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
