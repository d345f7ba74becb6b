//! Turning the process into a daemon the way dmfilemapd does: fork (the parent reports the
//! child's pid and exits 0), new session, cwd `/`, stdio to /dev/null unless verbose (but
//! never a descriptor it keeps), and every
//! inherited descriptor closed except those we still need (dmstats leaks its
//! /dev/mapper/control descriptor into the daemon). Must run before any thread exists.
use std::os::fd::RawFd;

use anyhow::Context as _;
use nix::{
    fcntl::{OFlag, open},
    sys::stat::Mode,
    unistd::{ForkResult, chdir, dup2_stderr, dup2_stdin, dup2_stdout, fork, setsid},
};

pub fn daemonize(keep: &[RawFd], verbose: u8) -> anyhow::Result<()> {
    // SAFETY: called while the process is single-threaded (before the tokio runtime starts).
    match unsafe { fork() }.context("fork failed")? {
        ForkResult::Parent { child } => {
            if verbose > 0 {
                eprintln!("Started dmfilemapd with pid={child}");
            }
            std::process::exit(0);
        }
        ForkResult::Child => {}
    }
    setsid().context("setsid failed")?;
    chdir("/").context("chdir / failed")?;
    if verbose == 0 {
        // A kept descriptor may be one of them: the file itself when it came as stdin
        // (`dmfilemapd 0 ... < FILE`, as a user may run it by hand).
        let null = open("/dev/null", OFlag::O_RDWR, Mode::empty()).context("opening /dev/null")?;
        if !keep.contains(&0) {
            dup2_stdin(&null)?;
        }
        if !keep.contains(&1) {
            dup2_stdout(&null)?;
        }
        if !keep.contains(&2) {
            dup2_stderr(&null)?;
        }
    }
    close_stray_fds(keep)
}

/// Closes every descriptor above stderr that is not in `keep`.
fn close_stray_fds(keep: &[RawFd]) -> anyhow::Result<()> {
    let open_fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .context("listing /proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open_fds
        .into_iter()
        .filter(|fd| *fd > 2 && !keep.contains(fd))
    {
        // The listing's own descriptor is already closed by now; EBADF for it is harmless.
        // SAFETY: these descriptors were inherited and nothing in this process uses them.
        unsafe { libc::close(fd) };
    }
    Ok(())
}
