//! The watch config, in one of two formats, and the options a watched PATH carries.
//! - TOML (a file named `*.toml`): `[[path]]` tables name files or directories with options
//!   for the groups filemapd makes; `[[group]]` tables name groups made beforehand.
//! - Lines (any other name): `<group_id> <inode|path> <absolute path>` per file (the path
//!   last, so it may contain spaces); blank lines and lines starting with `#` are skipped.
//!
//! It names the files a root daemon maps, so one that another user could write is refused.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::{
    daemon::{args::FollowMode, regions::Regions},
    oneshot::parse_bounds,
    reconcile::Mapping,
    stats::RegionSettings,
    wake::ebpf::{IoHook, check_map_extents},
};

/// What a config names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Groups made beforehand, each with its file.
    pub groups: Vec<WatchEntry>,
    /// Files and directories whose files get a group if they have none.
    pub paths: Vec<PathSpec>,
    /// Where to serve the metrics (`--metrics` on the command line wins).
    pub metrics: Option<MetricsAddress>,
    /// `handoff = true`: the socket to take hand-overs on (as `--handoff` does), the
    /// config's `handoff_socket` or [`crate::daemon::handoff::SOCKET`].
    pub handoff: Option<PathBuf>,
    /// `io_hook = "bio"|"dm-stats"`: which programs count the files' IO (`--io-hook` wins).
    pub io_hook: Option<IoHook>,
    /// `kernel_map_extents = N`: the extents the kernel's sector map is sized for
    /// (`--kernel-map-extents` wins).
    pub kernel_map_extents: Option<u32>,
}

/// `metrics = "ADDR"` and `metrics_remote = true|false` of a TOML config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddress {
    pub address: std::net::SocketAddr,
    /// Serving an address other hosts can reach is allowed.
    pub remote: bool,
}

/// A file, or a directory of files, to watch, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathSpec {
    pub path: PathBuf,
    pub follow: FollowMode,
    /// Keep a file's group when the file is deleted (by default it goes with the file).
    pub keep_group: bool,
    /// For groups filemapd makes: the alias (default: the file's name; not for a directory).
    pub alias: Option<String>,
    pub program_id: String,
    pub settings: RegionSettings,
    /// Where its files' counters live besides the kernel; `None`: the watch's `--regions`.
    pub regions: Option<Regions>,
}

impl PathSpec {
    /// A PATH from the command line: default options.
    pub fn plain(path: &Path, keep_group: bool) -> Self {
        Self {
            path: path.to_path_buf(),
            follow: FollowMode::Inode,
            keep_group,
            alias: None,
            program_id: "dmstats".to_string(),
            settings: RegionSettings::default(),
            regions: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEntry {
    /// The file's group; `None`: it has none (`regions = "none"`), the kernel counts it alone.
    pub group_id: Option<u64>,
    /// How its group's regions follow the extents; `None`: as the watch's `--regions` says.
    pub mapping: Option<Mapping>,
    /// A file without a group: its kernel histogram's bounds (its `[[path]]`'s).
    pub settings: RegionSettings,
    pub mode: FollowMode,
    pub path: PathBuf,
    /// The group goes when the file does (a file a PATH named, unless kept).
    pub delete_with_file: bool,
    /// A file a PATH named: emptied, it loses its group, and gets one like it back with its
    /// next blocks (a group made beforehand keeps lvm2's way: its monitor ends).
    pub regroup_when_refilled: bool,
}

impl WatchEntry {
    /// A file with a group made beforehand, its regions following the watch's `--regions`.
    pub fn of_group(group_id: u64, mode: FollowMode, path: PathBuf) -> Self {
        Self {
            group_id: Some(group_id),
            mapping: None,
            settings: RegionSettings::default(),
            mode,
            path,
            delete_with_file: false,
            regroup_when_refilled: false,
        }
    }
}

/// Reads and parses the config, refusing one that another user could have written: it names
/// the files a root daemon maps.
pub fn read_config(path: &Path) -> anyhow::Result<Config> {
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
    let parsed = match path.extension().is_some_and(|e| e == "toml") {
        true => parse_toml(&text),
        false => parse_config(&text).map(|groups| Config {
            groups,
            ..Config::default()
        }),
    };
    parsed.with_context(|| format!("in {}", path.display()))
}

/// The TOML format, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlConfig {
    metrics: Option<std::net::SocketAddr>,
    #[serde(default)]
    metrics_remote: bool,
    #[serde(default)]
    handoff: bool,
    handoff_socket: Option<PathBuf>,
    io_hook: Option<IoHook>,
    kernel_map_extents: Option<u32>,
    #[serde(default)]
    path: Vec<TomlPath>,
    #[serde(default)]
    group: Vec<TomlGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlPath {
    path: PathBuf,
    #[serde(default)]
    follow: Follow,
    #[serde(default)]
    keep_group: bool,
    alias: Option<String>,
    program_id: Option<String>,
    #[serde(default)]
    precise: bool,
    bounds: Option<String>,
    regions: Option<Regions>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlGroup {
    id: u64,
    path: PathBuf,
    #[serde(default)]
    follow: Follow,
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Follow {
    #[default]
    Inode,
    Path,
}

impl From<Follow> for FollowMode {
    fn from(follow: Follow) -> Self {
        match follow {
            Follow::Inode => FollowMode::Inode,
            Follow::Path => FollowMode::Path,
        }
    }
}

pub fn parse_toml(text: &str) -> anyhow::Result<Config> {
    let parsed: TomlConfig = toml::from_str(text).map_err(|e| {
        // toml's message spans lines (the line quoted, a caret): one line is enough here.
        let message = e.message().trim().to_string();
        match e
            .span()
            // The line the span starts on: one more than the line ends before it.
            .map(|span| text[..span.start].matches('\n').count() + 1)
        {
            Some(line) => anyhow::anyhow!("line {line}: {message}"),
            None => anyhow::anyhow!("{message}"),
        }
    })?;
    let absolute = |path: &Path| -> anyhow::Result<()> {
        if !path.is_absolute() {
            bail!("{}: the path must be absolute", path.display());
        }
        Ok(())
    };
    if parsed.metrics_remote && parsed.metrics.is_none() {
        bail!("metrics_remote is set without a metrics address");
    }
    let handoff = match (parsed.handoff, parsed.handoff_socket) {
        (true, Some(socket)) => {
            absolute(&socket)?;
            Some(socket)
        }
        (true, None) => Some(PathBuf::from(crate::daemon::handoff::SOCKET)),
        (false, Some(_)) => bail!("handoff_socket is set without handoff = true"),
        (false, None) => None,
    };
    let mut config = Config {
        metrics: parsed.metrics.map(|address| MetricsAddress {
            address,
            remote: parsed.metrics_remote,
        }),
        handoff,
        io_hook: parsed.io_hook,
        kernel_map_extents: parsed
            .kernel_map_extents
            .map(check_map_extents)
            .transpose()
            .context("kernel_map_extents")?,
        ..Config::default()
    };
    for group in parsed.group {
        absolute(&group.path)?;
        config.groups.push(WatchEntry::of_group(
            group.id,
            group.follow.into(),
            group.path,
        ));
    }
    for entry in parsed.path {
        absolute(&entry.path)?;
        let program_id = entry.program_id.unwrap_or_else(|| "dmstats".to_string());
        for (what, value) in [
            ("alias", entry.alias.as_deref()),
            ("program_id", Some(&program_id)),
        ] {
            one_word(what, value).with_context(|| entry.path.display().to_string())?;
        }
        let histogram = match &entry.bounds {
            Some(bounds) => parse_bounds(bounds, entry.precise)
                .with_context(|| format!("{}: bounds", entry.path.display()))?,
            None => Vec::new(),
        };
        config.paths.push(PathSpec {
            path: entry.path,
            follow: entry.follow.into(),
            keep_group: entry.keep_group,
            alias: entry.alias,
            program_id,
            settings: RegionSettings {
                precise_timestamps: entry.precise,
                histogram,
            },
            regions: entry.regions,
        });
    }
    Ok(config)
}

/// dm messages split on white space: an alias or program id must be one word (dmstats
/// cannot hold another either).
pub fn one_word(what: &str, value: Option<&str>) -> anyhow::Result<()> {
    if let Some(value) = value.filter(|v| v.is_empty() || v.contains(char::is_whitespace)) {
        bail!("{what} {value:?} must be one word");
    }
    Ok(())
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
            Ok(WatchEntry::of_group(group_id, mode, path))
        };
        entries.push(parse().with_context(|| format!("config line {number}: {line:?}"))?);
    }
    Ok(entries)
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
                WatchEntry::of_group(0, FollowMode::Inode, "/var/lib/vm/a.img".into()),
                WatchEntry::of_group(3, FollowMode::Path, "/var/lib/vm/my disk.img".into()),
            ]
        );
    }

    #[test]
    fn toml_paths_carry_their_options_and_groups_their_ids() {
        let config = parse_toml(
            r#"
            metrics = "[::1]:9731"
            handoff = true
            handoff_socket = "/run/images/handoff.sock"
            io_hook = "bio"

            [[path]]
            path = "/var/lib/libvirt/images"
            follow = "path"
            precise = true
            bounds = "1ms,10ms"

            regions = "none"

            [[path]]
            path = "/srv/db.img"
            alias = "db"
            keep_group = true

            [[group]]
            id = 3
            path = "/srv/old.img"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.groups,
            vec![WatchEntry::of_group(
                3,
                FollowMode::Inode,
                "/srv/old.img".into()
            )]
        );
        let [images, db] = config.paths.as_slice() else {
            panic!("{config:?}")
        };
        assert_eq!(images.follow, FollowMode::Path);
        assert!(images.settings.precise_timestamps && !images.keep_group);
        assert_eq!(images.settings.histogram, vec![1_000_000, 10_000_000]);
        assert_eq!(images.regions, Some(Regions::None));
        assert_eq!(db.regions, None, "the watch's --regions");
        assert_eq!((db.alias.as_deref(), db.keep_group), (Some("db"), true));
        assert_eq!(db.program_id, "dmstats");
        assert!(db.settings.histogram.is_empty());
        assert_eq!(
            config.metrics,
            Some(MetricsAddress {
                address: "[::1]:9731".parse().unwrap(),
                remote: false
            })
        );
        assert_eq!(config.handoff, Some("/run/images/handoff.sock".into()));
        let default = parse_toml("handoff = true\n").unwrap();
        assert_eq!(default.handoff, Some("/run/filemapd/handoff.sock".into()));
        assert_eq!(parse_toml("handoff = false\n").unwrap().handoff, None);
        assert_eq!(config.io_hook, Some(IoHook::Bio));
        let dm_stats = parse_toml("io_hook = \"dm-stats\"\n").unwrap();
        assert_eq!(dm_stats.io_hook, Some(IoHook::DmStats));
        assert_eq!(default.io_hook, None, "as the daemon chooses");
        assert_eq!(default.kernel_map_extents, None, "the daemon's default");
        let sized = parse_toml("kernel_map_extents = 200000\n").unwrap();
        assert_eq!(sized.kernel_map_extents, Some(200_000));
    }

    #[test]
    fn bad_toml_says_what_and_where_in_a_line() {
        for (text, expected) in [
            ("[[path]]\npath = \"rel/a.img\"\n", "must be absolute"),
            ("[[path]]\npath = \"/a\"\nfollow = \"name\"\n", "line 3"),
            ("[[path]]\npath = \"/a\"\ncolour = 1\n", "unknown field"),
            ("[[path]]\npath = \"/a\"\nbounds = \"fast\"\n", "bounds"),
            ("[[path]]\npath = \"/a\"\nalias = \"my disk\"\n", "one word"),
            ("[[path]]\npath = \"/a\"\nregions = \"some\"\n", "line 3"),
            ("[[group]]\npath = \"/a\"\n", "missing field `id`"),
            ("[[path]\n", "line 1"),
            ("metrics = \"localhost\"\n", "line 1"),
            ("metrics_remote = true\n", "without a metrics address"),
            (
                "handoff_socket = \"/run/h.sock\"\n",
                "without handoff = true",
            ),
            (
                "handoff = true\nhandoff_socket = \"h.sock\"\n",
                "must be absolute",
            ),
            ("handoff = \"yes\"\n", "line 1"),
            ("io_hook = \"kprobe\"\n", "line 1"),
            ("kernel_map_extents = 0\n", "kernel_map_extents: 0"),
            ("kernel_map_extents = 9000000\n", "at most 3000000"),
            ("kernel_map_extents = -1\n", "line 1"),
        ] {
            let err = format!("{:#}", parse_toml(text).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{text:?}: {err}");
        }
    }

    #[test]
    fn a_config_without_files_is_empty_not_wrong() {
        assert_eq!(parse_toml("# nothing yet\n").unwrap(), Config::default());
        assert_eq!(parse_config("# nothing yet\n\n").unwrap(), vec![]);
    }

    #[test]
    fn bad_lines_name_their_number() {
        for (text, expected) in [
            ("x inode /a", "config line 1"),
            ("0 both /a", "bad mode"),
            ("0 inode a.img", "absolute"),
            ("0 inode", "absolute"),
            ("0 inode /a\n1 path rel", "config line 2"),
        ] {
            let err = format!("{:#}", parse_config(text).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
