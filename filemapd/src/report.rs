//! `filemapd report [FILE...]`: per file, what `dmstats report -o` prints for a group, under
//! dmstats' own column names, from the kernel's counters (all of the file's IO, whatever its
//! regions), read from the maps the counting daemons pin. Nothing is cleared (Debian's
//! dmstats reads regions with `@stats_print_clear`).
use std::{os::unix::fs::MetadataExt as _, path::PathBuf};

use anyhow::Context as _;
use filemapd_common::FileCounters;

use crate::{file::identity::FileId, wake::ebpf::pins};

/// dmstats' headings for the counters the kernel keeps (`dmstats report -o
/// read_count,read_sector_count,read_time,write_count,write_sector_count,write_time,
/// in_progress_count`); times in ns, as dmstats prints them.
const COLUMNS: [&str; 7] = [
    "#Reads",
    "#RdSectors",
    "AccRdTime",
    "#Writes",
    "#WrSectors",
    "AccWrTime",
    "#InProg",
];

/// Prints the table; false when a FILE named is counted by no daemon (said on stderr).
pub fn run(paths: &[PathBuf]) -> anyhow::Result<bool> {
    let mut rows: Vec<(String, FileCounters)> = Vec::new();
    let mut all_found = true;
    if paths.is_empty() {
        for file in pins::counted_files() {
            if let Some((_, counters)) = pins::find_counters(file.key)? {
                rows.push((file.path.display().to_string(), counters));
            }
        }
    }
    for path in paths {
        let metadata =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let key = FileId {
            st_dev: metadata.dev(),
            ino: metadata.ino(),
        }
        .inode_key();
        match pins::find_counters(key)? {
            Some((_, counters)) => rows.push((path.display().to_string(), counters)),
            None => {
                eprintln!("{}: no daemon counts it in the kernel", path.display());
                all_found = false;
            }
        }
    }
    print!("{}", table(&rows));
    Ok(all_found)
}

fn table(rows: &[(String, FileCounters)]) -> String {
    let width = rows
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let mut out = format!("{:<width$}", "Name");
    for column in COLUMNS {
        out += &format!(" {column:>10}");
    }
    out.push('\n');
    for (name, c) in rows {
        let cells = [
            c.reads,
            c.read_sectors,
            c.read_ns,
            c.writes,
            c.write_sectors,
            c.write_ns,
            c.in_flight(),
        ];
        out += &format!("{name:<width$}");
        for cell in cells {
            out += &format!(" {cell:>10}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_dmstats_headings_and_a_row_per_file() {
        let c = FileCounters {
            reads: 2,
            read_sectors: 4096,
            read_ns: 4_000_000,
            ..Default::default()
        };
        let text = table(&[("/var/lib/images/a.img".to_string(), c)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "Name",
                "#Reads",
                "#RdSectors",
                "AccRdTime",
                "#Writes",
                "#WrSectors",
                "AccWrTime",
                "#InProg"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "/var/lib/images/a.img",
                "2",
                "4096",
                "4000000",
                "0",
                "0",
                "0",
                "0"
            ]
        );
    }
}
