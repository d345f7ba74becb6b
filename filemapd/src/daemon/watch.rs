//! `filemapd watch --config FILE`: one process and one set of eBPF programs for many
//! (file, group) pairs, as a VM host with many images wants.
//!
//! The config has one file per line, `<group_id> <inode|path> <absolute path>` (the path last,
//! so it may contain spaces); blank lines and lines starting with `#` are skipped.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{error, info, warn};
use tokio::task::JoinSet;

use crate::{
    daemon::args::FollowMode,
    daemon::monitor::Monitor,
    reconcile::Mapping,
    stats::Devices,
    wake::ebpf::{Hub, Tracer},
    wake::notify::Notifier,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEntry {
    pub group_id: u64,
    pub mode: FollowMode,
    pub path: PathBuf,
}

/// Reads and parses the config, refusing one that another user could have written: it names
/// the files a root daemon maps.
pub fn read_config(path: &Path) -> anyhow::Result<Vec<WatchEntry>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let metadata = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if let Err(reason) = writable_only_by_trusted(metadata.mode(), metadata.uid(), me) {
        bail!("refusing the config {}: {reason}", path.display());
    }
    let text =
        std::io::read_to_string(file).with_context(|| format!("reading {}", path.display()))?;
    parse_config(&text)
}

/// Whether a file with this mode and owner can be written only by root or by `me`.
fn writable_only_by_trusted(mode: u32, owner: u32, me: u32) -> Result<(), String> {
    if mode & 0o002 != 0 {
        return Err(format!(
            "any user can write it (mode {:o}; chmod o-w)",
            mode & 0o7777
        ));
    }
    if owner != 0 && owner != me {
        return Err(format!(
            "it belongs to uid {owner}, neither root nor this user"
        ));
    }
    Ok(())
}

pub fn parse_config(text: &str) -> anyhow::Result<Vec<WatchEntry>> {
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parse = || -> anyhow::Result<WatchEntry> {
            let mut fields = line.splitn(3, char::is_whitespace);
            let group = fields.next().unwrap_or_default();
            let group_id = group
                .parse()
                .with_context(|| format!("bad group id {group:?}"))?;
            let mode = match fields.next().unwrap_or_default() {
                "inode" => FollowMode::Inode,
                "path" => FollowMode::Path,
                other => bail!("bad mode {other:?} (inode or path)"),
            };
            let path = PathBuf::from(fields.next().unwrap_or_default().trim());
            if !path.is_absolute() {
                bail!("the path must be absolute");
            }
            Ok(WatchEntry {
                group_id,
                mode,
                path,
            })
        };
        entries.push(parse().with_context(|| format!("config line {number}: {line:?}"))?);
    }
    if entries.is_empty() {
        bail!("the config names no files");
    }
    Ok(entries)
}

/// Monitors every entry until each one's group is gone (or its file is). Returns false if any
/// monitor stopped on an error.
pub async fn run(
    entries: &[WatchEntry],
    interval: Duration,
    ebpf: bool,
    mapping: Mapping,
) -> anyhow::Result<bool> {
    raise_open_file_limit();
    let mut devices = Devices::default();
    let mut monitors = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut monitor = Monitor::open(
            &entry.path,
            entry.group_id,
            entry.mode,
            interval,
            &mut devices,
        )?;
        if mapping == Mapping::Exact {
            monitor.use_exact_mapping();
        }
        monitors.push(monitor);
    }
    drop(devices); // the start-up listings: each monitor has its group now
    if ebpf {
        // Twice the files: a path-mode monitor watches its new file before letting the old go.
        match Tracer::load(2 * entries.len() as u32) {
            Ok(tracer) => {
                let hub = Hub::spawn(tracer);
                let notifier = Notifier::spawn_or_warn();
                for monitor in &mut monitors {
                    monitor.use_ebpf(&hub, notifier.as_ref()).await?;
                }
                info!("eBPF trigger for {} file(s)", monitors.len());
            }
            Err(e) => warn!("eBPF trigger unavailable ({e:#}): polling every {interval:?}"),
        }
    }
    info!("watching {} file(s)", monitors.len());
    let mut tasks = JoinSet::new();
    for mut monitor in monitors {
        tasks.spawn(async move {
            let result = monitor.run().await;
            info!("{}: {}", monitor.path().display(), monitor.tally());
            (monitor.path().to_path_buf(), result)
        });
    }
    let mut all_ok = true;
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            (path, Ok(exit)) => info!("{}: {}", path.display(), exit.message()),
            (path, Err(e)) => {
                error!("{}: {e:#}", path.display());
                all_ok = false;
            }
        }
    }
    Ok(all_ok)
}

/// Each watched file holds a descriptor: let the process use as many as its hard limit allows.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_others_can_write_is_refused() {
        assert!(writable_only_by_trusted(0o644, 0, 0).is_ok());
        assert!(writable_only_by_trusted(0o664, 1000, 1000).is_ok());
        assert!(writable_only_by_trusted(0o600, 0, 1000).is_ok());
        let world = writable_only_by_trusted(0o666, 0, 0).unwrap_err();
        assert!(world.contains("any user can write it (mode 666"), "{world}");
        assert!(writable_only_by_trusted(0o1777, 0, 0).is_err());
        let other = writable_only_by_trusted(0o644, 1000, 0).unwrap_err();
        assert!(other.contains("uid 1000"), "{other}");
    }

    #[test]
    fn reads_entries_and_skips_comments() {
        let entries = parse_config(
            "# images\n0 inode /var/lib/vm/a.img\n\n  3 path /var/lib/vm/my disk.img\n",
        )
        .unwrap();
        assert_eq!(
            entries,
            vec![
                WatchEntry {
                    group_id: 0,
                    mode: FollowMode::Inode,
                    path: "/var/lib/vm/a.img".into()
                },
                WatchEntry {
                    group_id: 3,
                    mode: FollowMode::Path,
                    path: "/var/lib/vm/my disk.img".into()
                },
            ]
        );
    }

    #[test]
    fn bad_lines_name_their_number() {
        for (text, expected) in [
            ("x inode /a", "config line 1"),
            ("0 both /a", "bad mode"),
            ("0 inode a.img", "absolute"),
            ("0 inode", "absolute"),
            ("# nothing\n", "names no files"),
            ("0 inode /a\n1 path rel", "config line 2"),
        ] {
            let err = format!("{:#}", parse_config(text).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
