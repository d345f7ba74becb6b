//! filemapd: keeps a dm-stats region group in step with one file's extents.
//!
//! One folder per concern: `file` (what the file looks like: FIEMAP, the extent map, following
//! the file), `stats` (what the kernel counts: dm-stats messages, regions, groups), `wake`
//! (when to look again: eBPF, inotify, pacing), `reconcile` (the pure plan from one to the
//! other), and `daemon` (the loop that ties them, its command line and its many-file mode).
pub mod daemon;
pub mod file;
pub mod memory;
pub mod oneshot;
pub mod reconcile;
pub mod report;
pub mod sectors;
pub mod show;
pub mod stats;
pub mod top;
pub mod wake;
