//! filemapd's command line. For now: `filemapd show FILE [GROUP_ID]`, which prints a file's
//! extents next to the regions of its dm-stats group. The dmfilemapd-compatible daemon form
//! comes with issue 3.
use std::{fs, os::unix::fs::MetadataExt as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use filemapd::{dmstats, fiemap, sectors::SectorRange};

#[derive(Parser)]
#[command(version, about = "Keeps a dm-stats region group in step with a file's extents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a file's extents (FIEMAP, in sectors of its dm device) beside its group's regions.
    Show {
        /// The file.
        path: PathBuf,
        /// The group to compare with; default: the first group whose regions lie in the file.
        group_id: Option<u64>,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Show { path, group_id } => show(&path, group_id),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("filemapd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn show(path: &PathBuf, group_id: Option<u64>) -> anyhow::Result<()> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let extents = fiemap::device_ranges(&fiemap::read_extents(&file, 0, u64::MAX, false)?);
    let device = dmstats::StatsDevice::for_st_dev(metadata.dev())
        .with_context(|| format!("{} is not on a device-mapper device", path.display()))?;
    let regions = device.list(None)?;
    let group_id = match group_id {
        Some(id) => id,
        None => regions
            .iter()
            .find(|r| r.group().ok().flatten().is_some() && extents.contains(&r.range))
            .map(|r| r.id)
            .with_context(|| format!("no group on {} covers {}", device.name(), path.display()))?,
    };
    let (descriptor, members) = dmstats::group_members(&regions, group_id)?
        .with_context(|| format!("no group {group_id} on {}", device.name()))?;
    println!(
        "{} on {} ({}:{}), group {group_id} alias {:?}",
        path.display(),
        device.name(),
        device.device_number().0,
        device.device_number().1,
        descriptor.alias
    );
    println!("{:>24}  {:>24}", "file extent (sectors)", "region (id: sectors)");
    let regions: Vec<(u64, SectorRange)> = members.iter().map(|r| (r.id, r.range)).collect();
    for row in 0..extents.len().max(regions.len()) {
        let extent = extents.get(row).map(ToString::to_string).unwrap_or_default();
        let region = regions.get(row).map(|(id, r)| format!("{id}: {r}")).unwrap_or_default();
        println!("{extent:>24}  {region:>24}");
    }
    let matches = extents == regions.iter().map(|(_, r)| *r).collect::<Vec<_>>();
    println!("{}", if matches { "regions match the file" } else { "regions DIFFER from the file" });
    Ok(())
}
