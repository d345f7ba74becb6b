//! What PATHs name (on the command line or in a TOML config): a file, or every regular file
//! in a directory; each with the group it has, or one made as `dmstats create --filemap`
//! makes it, with the PATH's options.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use log::{info, warn};

use super::config::{MetricsAddress, PathSpec, WatchEntry, read_config};
use crate::{daemon::regions::Regions, oneshot, wake::ebpf::IoHook};

/// What to watch, and the PATHs that are directories (watched for new files).
pub struct Resolved {
    pub entries: Vec<WatchEntry>,
    pub directories: Vec<PathSpec>,
    /// The config's metrics address, if it names one.
    pub metrics: Option<MetricsAddress>,
    /// The config's hand-over socket, when it takes hand-overs.
    pub handoff: Option<PathBuf>,
    /// The config's `io_hook`, if it names one.
    pub io_hook: Option<IoHook>,
    /// The config's `kernel_map_extents`, if it names it.
    pub kernel_map_extents: Option<u32>,
}

/// What to watch: the config's groups, then the files its paths and the command line's PATHs
/// name (with regions as their `regions` says, else as `regions`). A file a PATH names that
/// cannot be mapped (no extents yet, not on a device-mapper device) is said and left out; a
/// file named twice is watched once, as first named.
pub fn resolve(
    config: Option<&Path>,
    paths: &[PathSpec],
    regions: Regions,
) -> anyhow::Result<Resolved> {
    let config = match config {
        Some(config) => read_config(config)?,
        None => Default::default(),
    };
    let mut entries = config.groups;
    let mut directories = Vec::new();
    for spec in config.paths.iter().chain(paths) {
        let resolved = std::fs::canonicalize(&spec.path)
            .with_context(|| format!("resolving {}", spec.path.display()))?;
        let spec = PathSpec {
            path: resolved,
            ..spec.clone()
        };
        for file in files_under(std::slice::from_ref(&spec.path))? {
            if entries.iter().any(|e| e.path == file) {
                continue;
            }
            match entry_for(&file, &spec, regions) {
                Ok(entry) => entries.push(entry),
                Err(e) => warn!("{}: not watched: {e:#}", file.display()),
            }
        }
        if spec.path.is_dir() {
            directories.push(spec);
        }
    }
    Ok(Resolved {
        entries,
        directories,
        metrics: config.metrics,
        handoff: config.handoff,
        io_hook: config.io_hook,
        kernel_map_extents: config.kernel_map_extents,
    })
}

/// A file `spec` names (itself, or as a file in its directory), with its group: adopted, or
/// made as dmstats makes it with the spec's options; or none, when its regions (the spec's,
/// else `regions`) are none and it has no group yet (a group someone made keeps following
/// its file).
pub(super) fn entry_for(
    file: &Path,
    spec: &PathSpec,
    regions: Regions,
) -> anyhow::Result<WatchEntry> {
    let regions = spec.regions.unwrap_or(regions);
    if regions == Regions::None && oneshot::existing_group(file)?.is_none() {
        return Ok(WatchEntry {
            group_id: None,
            mapping: None,
            settings: spec.settings.clone(),
            mode: spec.follow,
            path: file.to_path_buf(),
            delete_with_file: !spec.keep_group,
            regroup_when_refilled: true,
        });
    }
    // An alias names one file: for a directory's files each takes its own name.
    let alias = spec.alias.as_deref().filter(|_| spec.path == file);
    let mapped = oneshot::group_for(file, alias, &spec.program_id, spec.settings.clone())?;
    let regions = regions.with_group();
    if let Some(count) = mapped.created {
        info!(
            "{}: created group {} with {count} region(s)",
            file.display(),
            mapped.group
        );
    }
    Ok(WatchEntry {
        group_id: Some(mapped.group),
        mapping: regions.mapping(),
        settings: spec.settings.clone(),
        mode: spec.follow,
        path: file.to_path_buf(),
        delete_with_file: !spec.keep_group,
        regroup_when_refilled: true,
    })
}

/// The regular files PATHs name: a file itself, a directory's regular files (not its
/// subdirectories, nor symlinks), in name order.
pub(super) fn files_under(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let path =
            std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        if !path.is_dir() {
            files.push(path);
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(&path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_yields_its_regular_files_in_name_order() {
        let dir = std::env::temp_dir().join(format!("filemapd-files-under-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for name in ["b.img", "a.img", "sub/c.img"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        std::os::unix::fs::symlink(dir.join("a.img"), dir.join("link.img")).unwrap();
        let single = dir.join("sub/c.img");
        let files = files_under(&[dir.clone(), single.clone()]).unwrap();
        let dir = std::fs::canonicalize(&dir).unwrap();
        assert_eq!(
            files,
            vec![dir.join("a.img"), dir.join("b.img"), dir.join("sub/c.img")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
