//! dm-stats regions as the kernel lists them, and their counters.
//!
//! `@stats_list` answers one line per region (Documentation/admin-guide/device-mapper/
//! statistics.rst): `<id>: <start>+<len> <step> <program_id> <aux_data>` followed by
//! ` precise_timestamps` and ` histogram:b1,b2,...` when the region has them. Neither
//! program_id nor aux_data can hold white space (a message splits on it); `-` means empty.
use anyhow::{Context as _, bail, ensure};

use super::descriptor::GroupDescriptor;
use crate::sectors::SectorRange;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub id: u64,
    pub range: SectorRange,
    /// Area size in sectors (filemap regions have one area: step == len).
    pub step: u64,
    /// As the kernel has it: `-` when empty.
    pub program_id: String,
    /// As the kernel has it: `-` when empty.
    pub aux_data: String,
    pub settings: RegionSettings,
}

/// What a region was created with besides its place: new members of a group must copy these
/// from the leader exactly, or the group's counters and histograms disagree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionSettings {
    pub precise_timestamps: bool,
    /// Histogram boundaries as the kernel stores them (ns when precise, else ms).
    pub histogram: Vec<u64>,
}

impl RegionSettings {
    /// The histogram bounds in nanoseconds.
    pub fn bounds_ns(&self) -> Vec<u64> {
        let scale = if self.precise_timestamps {
            1
        } else {
            1_000_000
        };
        self.histogram
            .iter()
            .map(|b| b.saturating_mul(scale))
            .collect()
    }

    /// The optional-argument part of `@stats_create`: empty, or `<n> arg...`.
    pub fn create_args(&self) -> String {
        let mut args = Vec::new();
        if self.precise_timestamps {
            args.push("precise_timestamps".to_string());
        }
        if !self.histogram.is_empty() {
            let bounds: Vec<String> = self.histogram.iter().map(u64::to_string).collect();
            args.push(format!("histogram:{}", bounds.join(",")));
        }
        if args.is_empty() {
            String::new()
        } else {
            format!("{} {}", args.len(), args.join(" "))
        }
    }
}

impl Region {
    /// The group descriptor this region carries, if it leads a group.
    pub fn group(&self) -> anyhow::Result<Option<GroupDescriptor>> {
        GroupDescriptor::parse(&self.aux_data)
            .with_context(|| format!("region {} aux_data {:?}", self.id, self.aux_data))
    }
}

/// Parses a whole `@stats_list` answer (empty when there are no regions).
pub fn parse_list(text: &str) -> anyhow::Result<Vec<Region>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| parse_line(line).with_context(|| format!("@stats_list line {line:?}")))
        .collect()
}

fn parse_line(line: &str) -> anyhow::Result<Region> {
    let (id, rest) = line.split_once(": ").context("no \"<id>: \"")?;
    let mut fields = rest.split_ascii_whitespace();
    let mut next = |what: &str| fields.next().with_context(|| format!("missing {what}"));
    let (start, len) = next("start+length")?
        .split_once('+')
        .context("no '+' in start+length")?;
    let range = SectorRange::new(start.parse()?, len.parse()?);
    let step = next("step")?.parse()?;
    let program_id = next("program_id")?.to_string();
    let aux_data = next("aux_data")?.to_string();
    let mut settings = RegionSettings::default();
    for extra in fields {
        if extra == "precise_timestamps" {
            settings.precise_timestamps = true;
        } else if let Some(bounds) = extra.strip_prefix("histogram:") {
            settings.histogram = bounds
                .split(',')
                .map(|b| {
                    b.parse()
                        .with_context(|| format!("bad histogram bound {b:?}"))
                })
                .collect::<anyhow::Result<_>>()?;
        } else {
            bail!("unknown field {extra:?}");
        }
    }
    Ok(Region {
        id: id.trim().parse()?,
        range,
        step,
        program_id,
        aux_data,
        settings,
    })
}

/// One area's counters from `@stats_print` (statistics.rst lists them in this order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub reads: u64,
    pub reads_merged: u64,
    pub sectors_read: u64,
    pub read_ms: u64,
    pub writes: u64,
    pub writes_merged: u64,
    pub sectors_written: u64,
    pub write_ms: u64,
    pub in_flight: u64,
    pub io_ms: u64,
    pub weighted_io_ms: u64,
}

/// A region's `@stats_print`: its counters and, when it has histogram bounds, how many IOs
/// fell in each latency bucket (bounds b1..bn give n + 1 buckets: below b1, [b1, b2), ...,
/// bn and above), each summed over its areas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionStats {
    pub counters: Counters,
    pub histogram: Vec<u64>,
}

/// Parses a `@stats_print` answer and sums its areas: `<start>+<len> <counter>...` per line.
/// The eleven counters come first; regions with precise timestamps add columns after them
/// (not read here), and a region with a histogram ends each line with `a:b:c` bucket counts.
pub fn parse_print(text: &str) -> anyhow::Result<RegionStats> {
    let mut stats = RegionStats::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_ascii_whitespace().skip(1).collect();
        let values: Vec<u64> = fields
            .iter()
            .take(11)
            .map(|v| {
                v.parse()
                    .with_context(|| format!("bad counter {v:?} in {line:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        ensure!(
            values.len() == 11,
            "@stats_print line has {} counters: {line:?}",
            values.len()
        );
        stats.counters = stats.counters
            + Counters {
                reads: values[0],
                reads_merged: values[1],
                sectors_read: values[2],
                read_ms: values[3],
                writes: values[4],
                writes_merged: values[5],
                sectors_written: values[6],
                write_ms: values[7],
                in_flight: values[8],
                io_ms: values[9],
                weighted_io_ms: values[10],
            };
        let Some(buckets) = fields.last().filter(|f| f.contains(':')) else {
            continue;
        };
        let buckets: Vec<u64> = buckets
            .split(':')
            .map(|v| {
                v.parse()
                    .with_context(|| format!("bad histogram count {v:?} in {line:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        if stats.histogram.is_empty() {
            stats.histogram = vec![0; buckets.len()];
        }
        ensure!(
            stats.histogram.len() == buckets.len(),
            "@stats_print areas disagree on the histogram's buckets: {line:?}"
        );
        for (sum, n) in stats.histogram.iter_mut().zip(buckets) {
            *sum += n;
        }
    }
    Ok(stats)
}

/// [`parse_print`]'s counters alone.
pub fn parse_counters(text: &str) -> anyhow::Result<Counters> {
    parse_print(text).map(|stats| stats.counters)
}

impl std::ops::Add for Counters {
    type Output = Counters;
    fn add(self, b: Counters) -> Counters {
        Counters {
            reads: self.reads + b.reads,
            reads_merged: self.reads_merged + b.reads_merged,
            sectors_read: self.sectors_read + b.sectors_read,
            read_ms: self.read_ms + b.read_ms,
            writes: self.writes + b.writes,
            writes_merged: self.writes_merged + b.writes_merged,
            sectors_written: self.sectors_written + b.sectors_written,
            write_ms: self.write_ms + b.write_ms,
            in_flight: self.in_flight + b.in_flight,
            io_ms: self.io_ms + b.io_ms,
            weighted_io_ms: self.weighted_io_ms + b.weighted_io_ms,
        }
    }
}

/// Counters of several areas or regions, added up.
impl std::iter::Sum for Counters {
    fn sum<I: Iterator<Item = Counters>>(counters: I) -> Counters {
        counters.fold(Counters::default(), |a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_precise_regions_with_a_histogram() {
        // As Debian's 6.1 kernel prints a region with precise_timestamps and histogram:10,20.
        let c = parse_counters("270336+4096 1 0 8 0 2 0 16 3 0 3 3 0 0 1:0:2\n").unwrap();
        assert_eq!(
            (c.reads, c.sectors_read, c.writes, c.sectors_written),
            (1, 8, 2, 16)
        );
        assert_eq!(c.io_ms, 3);
    }

    #[test]
    fn histogram_buckets_are_summed_over_areas() {
        let stats = parse_print(
            "0+8 1 0 8 0 0 0 0 0 0 1 1 0 0 1:0:0\n8+8 0 0 0 0 2 0 16 3 0 3 3 0 0 0:1:1\n",
        )
        .unwrap();
        assert_eq!(stats.histogram, vec![1, 1, 1]);
        assert_eq!((stats.counters.reads, stats.counters.writes), (1, 2));
        assert!(
            parse_print("0+8 1 0 8 0 0 0 0 0 0 1 1\n")
                .unwrap()
                .histogram
                .is_empty()
        );
        assert!(
            parse_print("0+8 1 0 8 0 0 0 0 0 0 1 1 0 0 1:0\n8+8 0 0 0 0 0 0 0 0 0 0 0 0 0 1:0:0\n")
                .is_err()
        );
        assert!(parse_print("0+8 1 0 8 0 0 0 0 0 0 1 1 0 0 1:x:0\n").is_err());
    }

    #[test]
    fn parses_the_reference_example() {
        let regions = parse_list(
            "0: 278528+32768 32768 dmstats DMS_GROUP=f1:0-1#-\n1: 270336+8192 8192 dmstats -\n",
        )
        .unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].id, 0);
        assert_eq!(regions[0].range, SectorRange::new(278528, 32768));
        assert_eq!(regions[0].step, 32768);
        assert_eq!(regions[0].program_id, "dmstats");
        assert_eq!(
            regions[0].group().unwrap().unwrap().members.to_vec(),
            vec![0, 1]
        );
        assert_eq!(regions[1].aux_data, "-");
        assert_eq!(regions[1].group().unwrap(), None);
    }

    #[test]
    fn parses_precise_timestamps_and_histogram() {
        let r = parse_list("4: 0+8 8 dmstats - precise_timestamps histogram:1000000,2000000\n")
            .unwrap()
            .remove(0);
        assert!(r.settings.precise_timestamps);
        assert_eq!(r.settings.histogram, vec![1_000_000, 2_000_000]);
        assert_eq!(
            r.settings.create_args(),
            "2 precise_timestamps histogram:1000000,2000000"
        );
    }

    #[test]
    fn histogram_without_precise_timestamps() {
        let r = parse_list("0: 0+8 8 - - histogram:10,20,30")
            .unwrap()
            .remove(0);
        assert!(!r.settings.precise_timestamps);
        assert_eq!(r.settings.create_args(), "1 histogram:10,20,30");
        assert_eq!(RegionSettings::default().create_args(), "");
    }

    #[test]
    fn empty_answer_is_no_regions() {
        assert!(parse_list("").unwrap().is_empty());
    }

    #[test]
    fn garbage_is_an_error_that_names_the_line() {
        let err = parse_list("0: 12 8 dmstats -").unwrap_err();
        assert!(format!("{err:#}").contains("0: 12 8 dmstats -"), "{err:#}");
        assert!(parse_list("0: 0+8 8 dmstats - surprise").is_err());
        assert!(parse_list("x: 0+8 8 dmstats -").is_err());
    }

    #[test]
    fn counters_sum_over_areas() {
        let c = parse_counters("0+8 1 0 8 0 2 0 16 4 0 4 4 0 0\n8+8 3 1 24 1 0 0 0 0 0 1 1 0 0\n")
            .unwrap();
        assert_eq!(
            (c.reads, c.sectors_read, c.writes, c.sectors_written),
            (4, 32, 2, 16)
        );
        assert!(parse_counters("0+8 1 2 3").is_err());
    }
}
