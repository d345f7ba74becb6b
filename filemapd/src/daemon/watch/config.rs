//! The watch config: one file per line, `<group_id> <inode|path> <absolute path>` (the path
//! last, so it may contain spaces); blank lines and lines starting with `#` are skipped. It
//! names the files a root daemon maps, so one that another user could write is refused.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::daemon::args::FollowMode;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEntry {
    pub group_id: u64,
    pub mode: FollowMode,
    pub path: PathBuf,
    /// Named by a PATH (not a config line): its group goes when the file does.
    pub from_path: bool,
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
                from_path: false,
            })
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
                WatchEntry {
                    group_id: 0,
                    mode: FollowMode::Inode,
                    path: "/var/lib/vm/a.img".into(),
                    from_path: false,
                },
                WatchEntry {
                    group_id: 3,
                    mode: FollowMode::Path,
                    path: "/var/lib/vm/my disk.img".into(),
                    from_path: false,
                },
            ]
        );
    }

    #[test]
    fn a_config_without_files_is_empty_not_wrong() {
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
