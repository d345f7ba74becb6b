//! The files the service follows for dmstats-launched daemons, recorded under /run/filemapd
//! so that the service, stopped and started again (a restart, an upgrade), takes them up once
//! more: a hand-over reaches only a running service, and the daemon that made it has exited.
//! /run is emptied at boot, when those daemons' groups have nobody to follow them anyway.
//!
//! One line per file, `<group_id> <inode|path> <alias> <path>` (the path last: it may hold
//! spaces). The id is the group's at hand-over; a group whose leader moved since keeps its
//! alias, and its members still lie in the file, which is how it is found again.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use log::warn;

use crate::{
    daemon::args::FollowMode,
    file::view,
    stats::{Group, StatsDevice, new_group},
};

const RECORD: &str = "/run/filemapd/handed";

/// A handed-over file as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub group_id: u64,
    pub mode: FollowMode,
    pub alias: String,
    pub path: PathBuf,
}

/// Replaces the record with `files` (written aside, then renamed: a service killed while
/// writing leaves the old record whole).
pub fn save<'a>(files: impl Iterator<Item = &'a Recorded>) -> anyhow::Result<()> {
    let record = Path::new(RECORD);
    let dir = record.parent().expect("the record has a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let aside = record.with_extension("new");
    let mut text = String::new();
    for f in files {
        text.push_str(&format!(
            "{} {} {} {}\n",
            f.group_id,
            f.mode,
            f.alias,
            f.path.display()
        ));
    }
    let mut file =
        std::fs::File::create(&aside).with_context(|| format!("writing {}", aside.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", aside.display()))?;
    std::fs::rename(&aside, record).with_context(|| format!("replacing {RECORD}"))
}

/// The files recorded by the service before this one; none when there is no record. A line
/// that cannot be read is said and skipped.
pub fn load() -> Vec<Recorded> {
    let text = match std::fs::read_to_string(RECORD) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!("{RECORD}: {e}: no handed-over files taken up again");
            return Vec::new();
        }
    };
    parse(&text)
        .into_iter()
        .filter_map(|line| line.inspect_err(|e| warn!("{RECORD}: {e}")).ok())
        .collect()
}

fn parse(text: &str) -> Vec<Result<Recorded, String>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            let mut fields = line.splitn(4, ' ');
            let group_id = fields.next().and_then(|id| id.parse().ok());
            let mode = match fields.next() {
                Some("inode") => Some(FollowMode::Inode),
                Some("path") => Some(FollowMode::Path),
                _ => None,
            };
            let alias = fields.next().filter(|a| !a.is_empty());
            let path = fields.next().map(PathBuf::from).filter(|p| p.is_absolute());
            match (group_id, mode, alias, path) {
                (Some(group_id), Some(mode), Some(alias), Some(path)) => Ok(Recorded {
                    group_id,
                    mode,
                    alias: alias.to_string(),
                    path,
                }),
                _ => Err(format!(
                    "line {}: not `<group_id> <inode|path> <alias> <path>`",
                    n + 1
                )),
            }
        })
        .collect()
}

/// The id the recorded file's group has now: the recorded one while it still leads a group
/// of that alias (a move the service did not finish is finished here), else the group of that
/// alias whose members all lie in the file. Fails, changing nothing, when neither is there.
pub fn current_group(recorded: &Recorded) -> anyhow::Result<u64> {
    let file = std::fs::File::open(&recorded.path)
        .with_context(|| format!("opening {}", recorded.path.display()))?;
    let st_dev = std::os::unix::fs::MetadataExt::dev(&file.metadata()?);
    let device = StatsDevice::for_st_dev(st_dev)?;
    if let Some(group) = Group::load(&device, recorded.group_id)?
        && group.descriptor.alias == recorded.alias
    {
        return Ok(group.id);
    }
    let regions = device.list(None)?;
    let extents = view::data_ranges(&file, false)?;
    let same_alias: Vec<_> = regions
        .iter()
        .filter(|r| {
            r.group()
                .ok()
                .flatten()
                .is_none_or(|g| g.alias == recorded.alias)
        })
        .cloned()
        .collect();
    match new_group::find_for_file(&same_alias, &extents)? {
        Some(id) => Ok(id),
        None => bail!(
            "no group {} maps it any more (group {} is gone)",
            recorded.alias,
            recorded.group_id
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_bad_lines_are_named() {
        let lines = parse(
            "7 inode vm.img /images/vm one.img\n\n9 path b.img /b.img\nx inode a /a\n3 inode a relative\n",
        );
        assert_eq!(
            lines[0],
            Ok(Recorded {
                group_id: 7,
                mode: FollowMode::Inode,
                alias: "vm.img".into(),
                path: "/images/vm one.img".into()
            })
        );
        assert_eq!(lines[1].as_ref().unwrap().mode, FollowMode::Path);
        assert!(lines[2].as_ref().unwrap_err().starts_with("line 4:"));
        assert!(lines[3].as_ref().unwrap_err().starts_with("line 5:"));
    }
}
