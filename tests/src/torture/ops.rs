//! The torture's operations: every way a test can change a file's extent map (or the regions
//! beside it), drawn from a seeded generator so that a seed replays the same run.
use std::{
    fmt, fs,
    os::{fd::AsRawFd as _, unix::fs::FileExt as _},
    path::Path,
};

use anyhow::Context as _;

use crate::{run, writers::Rng};

/// Nothing touches a file's first 64 KiB after it is made: a file without extents ends its
/// daemon by design (lvm2's "File contains no extents"), which is not what the torture tests.
pub const HEAD: u64 = 64 << 10;
/// Files stay below this size, so that two file systems of 512 MiB never fill up.
pub const MAX_SIZE: u64 = 40 << 20;
/// fallocate's shifting modes want block-aligned ranges; 64 KiB suits every block size here.
const ALIGN: u64 = 64 << 10;

/// fallocate(2) modes, by their flag names.
#[derive(Clone, Copy, Debug)]
pub enum Falloc {
    Plain,
    KeepSize,
    ZeroRange,
    PunchHole,
    CollapseRange,
    InsertRange,
}

impl Falloc {
    fn flags(self) -> libc::c_int {
        match self {
            Falloc::Plain => 0,
            Falloc::KeepSize => libc::FALLOC_FL_KEEP_SIZE,
            Falloc::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
            Falloc::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Falloc::CollapseRange => libc::FALLOC_FL_COLLAPSE_RANGE,
            Falloc::InsertRange => libc::FALLOC_FL_INSERT_RANGE,
        }
    }
}

/// What one step does to one file (or, for the foreign ones, to its device).
#[derive(Clone, Debug)]
pub enum Op {
    /// Writes through the page cache, at the end or anywhere (holes, rewrites); fsync or not.
    Write {
        offset: u64,
        len: u64,
        fsync: bool,
    },
    Fallocate {
        mode: Falloc,
        offset: u64,
        len: u64,
    },
    Truncate {
        size: u64,
    },
    /// Path mode: a new file of `len` bytes renamed over the path.
    ReplaceByRename {
        len: u64,
    },
    /// Inode mode: unlink the file while the torture holds it open (later writes go through
    /// the held descriptor).
    UnlinkWhileHeld,
    /// Close the held, unlinked file: its daemon must exit; the slot starts a new file.
    CloseHeld,
    /// xfs: a reflink copy, so that later writes to the file copy on write (blocks move while
    /// the size and the block count stay the same).
    ReflinkCopy,
    /// e4defrag / xfs_fsr: moves the file's blocks, size and block count unchanged.
    Defragment,
    /// A region of the user's own on the same device (`dmstats create --start --length`).
    ForeignCreate {
        start: u64,
        len: u64,
    },
    /// `dmstats delete` of one of those (the n-th, modulo how many there are).
    ForeignDelete {
        nth: u64,
    },
    /// SIGKILL the file's daemon at once (likely mid-pass) and start it again as dmstats
    /// would; a `filemapd watch` is restarted with its config.
    Kill,
    SyncDropCaches,
}

impl Op {
    /// The operation's name without its arguments, for the run's tally.
    pub fn kind(&self) -> String {
        match self {
            Op::Fallocate { mode, .. } => format!("Fallocate {mode:?}"),
            other => format!("{other:?}")
                .split([' ', '{'])
                .next()
                .unwrap_or_default()
                .to_string(),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Op::Write { offset, len, fsync } => write!(
                f,
                "write {len} at {offset}{}",
                if *fsync { ", fsync" } else { "" }
            ),
            Op::Fallocate { mode, offset, len } => {
                write!(f, "fallocate {mode:?} {len} at {offset}")
            }
            Op::Truncate { size } => write!(f, "truncate to {size}"),
            Op::ReplaceByRename { len } => write!(f, "replace by rename ({len} bytes)"),
            Op::ForeignCreate { start, len } => {
                write!(f, "foreign dmstats create {len} sectors at {start}")
            }
            Op::ForeignDelete { nth } => write!(f, "foreign dmstats delete (#{nth})"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// What the generator needs to know about the file it picks for.
pub struct Target {
    pub size: u64,
    pub path_mode: bool,
    pub held: bool,
    pub xfs: bool,
    /// Sectors of the dm device, for foreign regions.
    pub device_sectors: u64,
}

/// Draws the next operation for `target`. Weights favour the changes VM images see most
/// (writes, holes, growth); the rare ones still come up every few dozen steps.
pub fn next_op(rng: &mut Rng, target: &Target) -> Op {
    let size = target.size.max(HEAD);
    let aligned = |rng: &mut Rng, from: u64, to: u64| -> u64 {
        let (from, to) = (
            from.div_ceil(ALIGN),
            (to / ALIGN).max(from.div_ceil(ALIGN) + 1),
        );
        (from + rng.below(to - from)) * ALIGN
    };
    let len = |rng: &mut Rng| (1 + rng.below(16)) * (4 << 10) * (1 << rng.below(5));
    if target.held && rng.below(8) == 0 {
        return Op::CloseHeld;
    }
    loop {
        let op = match rng.below(100) {
            0..=19 => Op::Write {
                offset: size,
                len: len(rng),
                fsync: rng.below(2) == 0,
            },
            20..=39 => Op::Write {
                offset: aligned(rng, HEAD, size + (8 << 20)) + rng.below(16) * 4096,
                len: len(rng),
                fsync: rng.below(2) == 0,
            },
            40..=51 => {
                let mode = [
                    Falloc::Plain,
                    Falloc::KeepSize,
                    Falloc::ZeroRange,
                    Falloc::PunchHole,
                    Falloc::PunchHole,
                    Falloc::CollapseRange,
                    Falloc::InsertRange,
                ][rng.below(7) as usize];
                let offset = aligned(rng, HEAD, size + (4 << 20));
                Op::Fallocate {
                    mode,
                    offset,
                    len: ALIGN * (1 + rng.below(32)),
                }
            }
            52..=57 => Op::Truncate {
                size: if rng.below(2) == 0 {
                    HEAD + rng.below(size - HEAD + 1)
                } else {
                    size + rng.below(8 << 20)
                },
            },
            58..=61 if target.path_mode => Op::ReplaceByRename {
                len: HEAD + rng.below(8 << 20),
            },
            62..=63 if !target.path_mode && !target.held => Op::UnlinkWhileHeld,
            64..=67 if target.xfs && !target.held => Op::ReflinkCopy,
            68..=70 if !target.held => Op::Defragment,
            71..=76 => Op::ForeignCreate {
                start: rng.below(target.device_sectors - 1024),
                len: 8 * (1 + rng.below(128)),
            },
            77..=80 => Op::ForeignDelete {
                nth: rng.next_u64(),
            },
            81..=83 if !target.held => Op::Kill,
            84..=89 => Op::SyncDropCaches,
            _ => continue,
        };
        return match op {
            // Keep files within bounds: past the cap, only shrinking changes of size.
            Op::Write { offset, len, .. } if offset + len > MAX_SIZE => Op::Truncate {
                size: HEAD + rng.below(MAX_SIZE / 2),
            },
            Op::Truncate { size } if size > MAX_SIZE => Op::Truncate { size: MAX_SIZE / 2 },
            Op::Fallocate {
                mode: Falloc::Plain | Falloc::InsertRange,
                ..
            } if size > MAX_SIZE / 2 => Op::Fallocate {
                mode: Falloc::PunchHole,
                offset: aligned(rng, HEAD, size),
                len: ALIGN * 8,
            },
            op => op,
        };
    }
}

/// Applies a change of the file's contents or size at `path`. Returns what the kernel said
/// when it refused the change (a shifting fallocate past the end, say): a refusal is part
/// of the test, not a failure.
pub fn change_file(path: &Path, op: &Op) -> anyhow::Result<Option<String>> {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match *op {
        Op::Write { offset, len, fsync } => {
            file.write_all_at(&vec![0xa5; len as usize], offset)?;
            if fsync {
                file.sync_all()?;
            }
        }
        Op::Fallocate { mode, offset, len } => {
            // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
            let rc = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    mode.flags(),
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc != 0 {
                return Ok(Some(std::io::Error::last_os_error().to_string()));
            }
        }
        Op::Truncate { size } => file.set_len(size)?,
        _ => unreachable!("{op} is not a change of one file"),
    }
    Ok(None)
}

/// A new file of `len` bytes (at least [`HEAD`]), written and synced.
pub fn make_file(path: &Path, len: u64) -> anyhow::Result<()> {
    crate::write_and_sync(path, 0, len.max(HEAD) as usize)
}

/// Moves the file's blocks without changing its size: e4defrag on ext4, xfs_fsr on xfs.
/// Either may decline (nothing to gain); that is reported, not failed.
pub fn defragment(path: &Path, xfs: bool) -> anyhow::Result<String> {
    let before = crate::daemon::file_ranges(path);
    let p = path.to_string_lossy();
    let (tool, args): (&str, Vec<&str>) = if xfs {
        ("xfs_fsr", vec!["-v", &p])
    } else {
        ("e4defrag", vec![&p])
    };
    if let Err(e) = run(tool, &args) {
        return Ok(format!("declined: {e}"));
    }
    let after = crate::daemon::file_ranges(path);
    Ok(if after == before {
        "nothing moved".into()
    } else {
        format!("moved: {} extents → {}", before.len(), after.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator never touches a file's head (its daemon would exit for lack of extents)
    /// and never grows a file past the cap, whatever the file's state.
    #[test]
    fn generated_ops_keep_the_head_and_the_cap() {
        let mut rng = Rng(12345);
        for i in 0..20_000u64 {
            let target = Target {
                size: HEAD + (i * 7919) % MAX_SIZE,
                path_mode: i % 3 == 0,
                held: i % 5 == 0,
                xfs: i % 2 == 0,
                device_sectors: 1 << 20,
            };
            let op = next_op(&mut rng, &target);
            match op {
                Op::Write { offset, len, .. } => {
                    assert!(offset >= HEAD && offset + len <= MAX_SIZE, "{op}")
                }
                Op::Fallocate { offset, .. } => assert!(offset >= HEAD, "{op}"),
                Op::Truncate { size } => assert!((HEAD..=MAX_SIZE).contains(&size), "{op}"),
                Op::ReflinkCopy => assert!(target.xfs && !target.held, "{op}"),
                Op::UnlinkWhileHeld | Op::Defragment | Op::Kill => {
                    assert!(!target.held, "{op} on a held file")
                }
                Op::ReplaceByRename { .. } => assert!(target.path_mode, "{op}"),
                Op::ForeignCreate { start, len } => {
                    assert!(start + len <= target.device_sectors)
                }
                _ => {}
            }
        }
    }
}
