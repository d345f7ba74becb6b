//! filemapd: keeps a dm-stats region group in step with one file's extents.
pub mod args;
pub mod daemonize;
pub mod dmstats;
pub mod ebpf;
pub mod extent_map;
pub mod fiemap;
pub mod file_device;
pub mod file_view;
pub mod follow;
pub mod group;
pub mod monitor;
pub mod notify;
pub mod pacing;
pub mod reconcile;
pub mod sectors;
pub mod tally;
pub mod watch;
