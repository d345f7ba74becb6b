//! `filemapd show FILE [GROUP_ID]`: a file's extents (FIEMAP, in sectors of its dm device)
//! beside its group's regions and the group's dm-stats totals, when it has a group; and what
//! the kernel counted of it (all of its IO), when a running daemon counts it.
use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, bail};

use crate::{
    file::{identity::FileId, view},
    sectors::{SectorRange, join_adjacent},
    stats::{self, Group, StatsDevice},
    wake::ebpf::{counting, pins},
};

pub fn run(path: &Path, group_id: Option<u64>) -> anyhow::Result<()> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let extents = view::data_ranges(&file, false)?;
    let device = StatsDevice::for_st_dev(metadata.dev())
        .with_context(|| format!("{} is not on a device-mapper device", path.display()))?;
    let regions = device.list(None)?;
    let group_id = match group_id {
        Some(id) => Some(id),
        None => regions
            .iter()
            .find(|r| {
                r.group().ok().flatten().is_some()
                    && extents
                        .iter()
                        .any(|e| e.start <= r.range.start && r.range.end() <= e.end())
            })
            .map(|r| r.id),
    };
    let (major, minor) = device.device_number();
    match group_id {
        Some(id) => {
            let group = Group::find(&regions, id)?
                .with_context(|| format!("no group {id} on {}", device.name()))?;
            println!(
                "{} on {} ({major}:{minor}), group {id} alias {:?}",
                path.display(),
                device.name(),
                group.descriptor.alias
            );
            beside_regions(&device, &group, &extents)?;
        }
        None => {
            println!(
                "{} on {} ({major}:{minor}), no group: the kernel counts it alone",
                path.display(),
                device.name()
            );
            println!("{:>24}", "file extent (sectors)");
            for extent in &extents {
                println!("{:>24}", extent.to_string());
            }
        }
    }
    match pins::find_counters(FileId::of(&metadata).inode_key())? {
        Some((pid, totals)) => println!(
            "counted in the kernel, all of its IO (daemon {pid}): {}",
            counting::describe(&totals)
        ),
        None => {
            println!("counted in the kernel: no daemon with in-kernel counting watches this file")
        }
    }
    Ok(())
}

/// The extents beside the group's regions, whether they match, and the regions' totals.
fn beside_regions(
    device: &StatsDevice,
    group: &Group,
    extents: &[SectorRange],
) -> anyhow::Result<()> {
    println!(
        "{:>24}  {:>24}",
        "file extent (sectors)", "region (id: sectors)"
    );
    let mut regions: Vec<(u64, SectorRange)> = group.members().map(|r| (r.id, r.range)).collect();
    regions.sort_unstable_by_key(|&(_, r)| r);
    for row in 0..extents.len().max(regions.len()) {
        let extent = extents
            .get(row)
            .map(ToString::to_string)
            .unwrap_or_default();
        let region = regions
            .get(row)
            .map(|(id, r)| format!("{id}: {r}"))
            .unwrap_or_default();
        println!("{extent:>24}  {region:>24}");
    }
    // Several regions may tile one extent (growth keeps the old region's counters).
    let places: Vec<SectorRange> = regions.iter().map(|&(_, r)| r).collect();
    let disjoint = places.windows(2).all(|w| w[0].end() <= w[1].start);
    let matches = disjoint && join_adjacent(places) == join_adjacent(extents.to_vec());
    println!(
        "{}",
        if matches {
            "regions cover the file exactly"
        } else {
            "regions DIFFER from the file"
        }
    );
    let mut counted = stats::Counters::default();
    for &(id, _) in &regions {
        counted = counted + device.counters(id)?;
    }
    println!(
        "counted by the group's regions: {} reads ({} sectors, {} ms), {} writes ({} sectors, {} ms)",
        counted.reads,
        counted.sectors_read,
        counted.read_ms,
        counted.writes,
        counted.sectors_written,
        counted.write_ms
    );
    Ok(())
}
