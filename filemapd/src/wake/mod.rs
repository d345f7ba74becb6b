//! When to look again: the kernel's allocation events (eBPF), the file's fate (inotify), and
//! how often a storm of them may cost a pass (pacing).
pub mod ebpf;
pub mod notify;
pub mod pacing;
