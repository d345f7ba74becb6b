//! One-shot commands for hosts whose dmstats lacks `--filemap`, and for scripts:
//! `filemapd map FILE` makes the file's group as `dmstats create --filemap --nomonitor` does
//! (and says so in dmstats' words); `filemapd unmap FILE` deletes it.
use std::{fs::File, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, bail};

use crate::{
    file::{
        identity::{FileId, check_mappable},
        view,
    },
    sectors::SectorRange,
    stats::{
        RegionSettings, StatsDevice,
        new_group::{self, GroupSpec},
    },
};

/// The file, its device and its extents as regions (after writeback, as dmstats maps).
fn open(path: &Path) -> anyhow::Result<(FileId, StatsDevice, Vec<SectorRange>)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let metadata = check_mappable(&file, path)?;
    let device = StatsDevice::for_st_dev(metadata.dev())
        .with_context(|| format!("{} is not on a device-mapper device", path.display()))?;
    let ranges =
        view::data_ranges(&file, true).with_context(|| format!("FIEMAP of {}", path.display()))?;
    Ok((FileId::of(&metadata), device, ranges))
}

/// Maps `path` into a new group, or finishes and reports the group it already has (a file is
/// never mapped twice). Prints dmstats' line: "PATH: Created new group with N region(s) as
/// group ID G."
pub fn map(
    path: &Path,
    alias: Option<&str>,
    program_id: &str,
    settings: RegionSettings,
) -> anyhow::Result<u64> {
    let mapped = group_for(path, alias, program_id, settings)?;
    match mapped.created {
        Some(regions) => println!(
            "{}: Created new group with {regions} region(s) as group ID {}.",
            path.display(),
            mapped.group
        ),
        None => println!(
            "{}: already mapped as group ID {}.",
            path.display(),
            mapped.group
        ),
    }
    Ok(mapped.group)
}

/// A file's group, and whether it was just made (with how many regions).
pub struct Mapped {
    pub group: u64,
    pub created: Option<usize>,
}

/// The group that maps `path` already, if any (none while it has no extents).
pub fn existing_group(path: &Path) -> anyhow::Result<Option<u64>> {
    let (_, device, extents) = open(path)?;
    if extents.is_empty() {
        return Ok(None);
    }
    new_group::find_for_file(&device.list(None)?, &extents)
}

/// The group mapping `path`: the one it has (its leftover markers cleared), else a new one
/// made as dmstats makes it.
pub fn group_for(
    path: &Path,
    alias: Option<&str>,
    program_id: &str,
    settings: RegionSettings,
) -> anyhow::Result<Mapped> {
    let (file, device, extents) = open(path)?;
    if extents.is_empty() {
        // Before listing the device: a watch asks again at every write to a new file.
        bail!("{} has no extents to map yet", path.display());
    }
    let mut regions = device.list(None)?;
    let removed = new_group::remove_leftovers(&device, &regions, file)?;
    if removed > 0 {
        log::warn!(
            "removed {removed} region(s) an interrupted map of {} left",
            path.display()
        );
        regions = device.list(None)?;
    }
    if let Some(group) = new_group::find_for_file(&regions, &extents)? {
        new_group::finish(&device, &regions, group)?;
        return Ok(Mapped {
            group,
            created: None,
        });
    }
    let alias = match alias {
        Some(alias) => alias.to_string(),
        None => path
            .file_name()
            .with_context(|| format!("{} has no file name", path.display()))?
            .to_string_lossy()
            .into_owned(),
    };
    let spec = GroupSpec {
        alias,
        program_id: program_id.to_string(),
        settings,
    };
    let group = new_group::create(&device, &extents, &spec, file)?;
    Ok(Mapped {
        group,
        created: Some(extents.len()),
    })
}

/// Deletes the group mapping `path`.
pub fn unmap(path: &Path) -> anyhow::Result<()> {
    let (_, device, extents) = open(path)?;
    let regions = device.list(None)?;
    let Some(group) = new_group::find_for_file(&regions, &extents)? else {
        bail!("no group on {} maps {}", device.name(), path.display());
    };
    let deleted = new_group::delete(&device, &regions, group)?;
    println!(
        "{}: Deleted group ID {group} ({deleted} region(s)).",
        path.display()
    );
    Ok(())
}

/// dmstats' `--bounds`: a comma-separated list of times with a unit (ns, us, ms, s; none
/// means ms), as the kernel stores them: ns with precise timestamps, else whole ms.
pub fn parse_bounds(text: &str, precise: bool) -> anyhow::Result<Vec<u64>> {
    let mut bounds = Vec::new();
    for item in text.split(',').map(str::trim) {
        let digits = item.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let ns_per_unit: u64 = match &item[digits.len()..] {
            "ns" => 1,
            "us" => 1_000,
            "ms" | "" => 1_000_000,
            "s" => 1_000_000_000,
            unit => bail!("bad unit {unit:?} in bound {item:?} (ns, us, ms or s)"),
        };
        let value: u64 = digits
            .parse()
            .with_context(|| format!("bad bound {item:?}"))?;
        let ns = value
            .checked_mul(ns_per_unit)
            .with_context(|| format!("bound {item:?} is too large"))?;
        bounds.push(if precise {
            ns
        } else if ns % 1_000_000 == 0 {
            ns / 1_000_000
        } else {
            bail!("bound {item:?} is below the millisecond: it needs --precise")
        });
    }
    if bounds.windows(2).any(|w| w[0] >= w[1]) {
        bail!("bounds must increase: {text}");
    }
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_read_in_dmstats_units_and_stored_in_the_kernels() {
        assert_eq!(
            parse_bounds("10ms,20ms,1s", false).unwrap(),
            vec![10, 20, 1000]
        );
        assert_eq!(parse_bounds("5,7", false).unwrap(), vec![5, 7]);
        assert_eq!(
            parse_bounds("500us,1ms", true).unwrap(),
            vec![500_000, 1_000_000]
        );
        assert!(
            parse_bounds("500us", false)
                .unwrap_err()
                .to_string()
                .contains("--precise")
        );
        assert!(parse_bounds("20ms,10ms", false).is_err());
        assert!(parse_bounds("10min", false).is_err());
        assert!(parse_bounds("", false).is_err());
    }
}
