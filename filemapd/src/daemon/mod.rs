//! The daemon: lvm2's command line, detaching, where the log goes, the loop that keeps one group in step with one
//! file, many files in one process, and what it all did (the tally; the trace's JSON lines).
pub mod args;
pub mod daemonize;
pub mod handoff;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod regions;
pub mod tally;
pub mod trace;
pub mod trace_plain;
pub mod watch;
