//! What a scrape answers: each watched file's IO and what its monitor published. A file the
//! kernel counts (eBPF, with the kernel's BTF) has its IO read from the kernel's counters, all
//! of it (every file's in one batch), and costs the scrape no dm message; another's is its
//! group's dm-stats counters, read now with `@stats_print` and summed over its regions. Times
//! are in seconds whatever the source (dm-stats counts ms, or ns with precise_timestamps; the
//! kernel counts ns).
//!
//! A file's series are labelled by its path alone, which stays while the file lives; what may
//! change (its group, the group's alias, who counts it) is in `filemapd_file_info`. A series
//! that does not apply to a file is left out for it (region series without a group), so that
//! a scrape of 10,000 files stays small.
use std::{fmt, sync::Arc};

use log::debug;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet},
    metrics::MetricType,
};

use super::{Board, FileState, Wakeup};
use filemapd_common::FileCounters;

use crate::{
    stats::{Group, RegionStats},
    wake::ebpf::CountedFile,
};

/// The per-file series; registered as a collector so that they are read at scrape time.
pub struct FileMetrics(pub Arc<Board>);

impl fmt::Debug for FileMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileMetrics")
    }
}

/// One file at scrape time.
struct Scraped {
    state: FileState,
    labels: [(&'static str, String); 1],
    /// All of the file's IO as the kernel counted it; `None` where the kernel does not count
    /// the file (or could not be read).
    kernel: Option<FileCounters>,
    /// The group's regions' counters, read only for a file the kernel does not count; `None`
    /// also when they could not be read (the file's IO series are then left out of this
    /// scrape rather than shown wrong).
    stats: Option<RegionStats>,
}

/// The IO series of one file, from the kernel or from its regions.
struct Io {
    reads: u64,
    read_sectors: u64,
    read_seconds: f64,
    writes: u64,
    write_sectors: u64,
    write_seconds: f64,
    in_flight: u64,
}

impl Scraped {
    /// `all_counted`: every slot's kernel counters, read at once for this scrape (`None`:
    /// read the file's alone).
    fn read(state: FileState, all_counted: Option<&[FileCounters]>) -> Self {
        let labels = [("path", label_value(&state.path))];
        let kernel = state.counted.as_ref().and_then(|counted| {
            match all_counted.and_then(|all| all.get(counted.slot as usize)) {
                Some(counters) => Some(*counters),
                None => counted
                    .counters()
                    .inspect_err(|e| debug!("{}: in-kernel counters left out: {e:#}", state.path))
                    .ok(),
            }
        });
        let stats = match kernel {
            Some(_) => None,
            None => group_stats(&state),
        };
        Self {
            state,
            labels,
            kernel,
            stats,
        }
    }

    fn io(&self) -> Option<Io> {
        if let Some(k) = &self.kernel {
            return Some(Io {
                reads: k.reads,
                read_sectors: k.read_sectors,
                read_seconds: k.read_ns as f64 / 1e9,
                writes: k.writes,
                write_sectors: k.write_sectors,
                write_seconds: k.write_ns as f64 / 1e9,
                in_flight: k.in_flight(),
            });
        }
        let c = self.stats.as_ref()?.counters;
        Some(Io {
            reads: c.reads,
            read_sectors: c.sectors_read,
            read_seconds: self.seconds(c.read_ms),
            writes: c.writes,
            write_sectors: c.sectors_written,
            write_seconds: self.seconds(c.write_ms),
            in_flight: c.in_flight,
        })
    }

    /// A time counter of the file's regions in seconds.
    fn seconds(&self, ticks: u64) -> f64 {
        let precise = self
            .state
            .group
            .as_ref()
            .is_some_and(|g| g.settings.precise_timestamps);
        ticks as f64 / if precise { 1e9 } else { 1e3 }
    }
}

/// The group's counters summed over its regions. A region may have gone since the monitor
/// published (its pass is running): then the group is listed afresh, once. `None` for a file
/// without a group.
fn group_stats(state: &FileState) -> Option<RegionStats> {
    let group = state.group.as_ref()?;
    let sum = |ids: &mut dyn Iterator<Item = u64>| -> anyhow::Result<RegionStats> {
        let mut total = RegionStats::default();
        for id in ids {
            let stats = group.device.stats(id)?;
            total.counters = total.counters + stats.counters;
            if total.histogram.len() < stats.histogram.len() {
                total.histogram.resize(stats.histogram.len(), 0);
            }
            for (sum, n) in total.histogram.iter_mut().zip(stats.histogram) {
                *sum += n;
            }
        }
        Ok(total)
    };
    match sum(&mut group.regions.iter().copied()) {
        Ok(stats) => return Some(stats),
        Err(e) => debug!("{}: reading the group again: {e:#}", state.path),
    }
    let listed = Group::load(&group.device, group.id).ok().flatten()?;
    sum(&mut listed.members().map(|r| r.id))
        .inspect_err(|e| debug!("{}: counters left out of this scrape: {e:#}", state.path))
        .ok()
}

/// Every slot's kernel counters at once, when any file is counted in the kernel (they all
/// share one counting).
fn all_kernel_counters(states: &[FileState]) -> Option<Vec<FileCounters>> {
    let counting = states
        .iter()
        .find_map(|s| s.counted.as_ref())
        .map(CountedFile::counting)?;
    counting
        .all_counters()
        .inspect_err(|e| debug!("reading every file's counters at once: {e:#}"))
        .ok()
}

impl Collector for FileMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let states = self.0.snapshot();
        let all_counted = all_kernel_counters(&states);
        let files: Vec<Scraped> = states
            .into_iter()
            .map(|state| Scraped::read(state, all_counted.as_deref()))
            .collect();
        let regions = |f: &Scraped| f.stats.as_ref().map(|s| s.counters);
        let e = &mut encoder;

        info(e, &files)?;
        counter(
            e,
            "filemapd_file_reads",
            "Reads of the file (counted in the kernel where it can, else by its dm-stats regions)",
            &files,
            |f| f.io().map(|io| io.reads),
        )?;
        counter(
            e,
            "filemapd_file_read_sectors",
            "512-byte sectors read",
            &files,
            |f| f.io().map(|io| io.read_sectors),
        )?;
        counter(
            e,
            "filemapd_file_read_seconds",
            "Time spent reading",
            &files,
            |f| f.io().map(|io| io.read_seconds),
        )?;
        counter(
            e,
            "filemapd_file_writes",
            "Writes to the file (counted in the kernel where it can, else by its dm-stats regions)",
            &files,
            |f| f.io().map(|io| io.writes),
        )?;
        counter(
            e,
            "filemapd_file_write_sectors",
            "512-byte sectors written",
            &files,
            |f| f.io().map(|io| io.write_sectors),
        )?;
        counter(
            e,
            "filemapd_file_write_seconds",
            "Time spent writing",
            &files,
            |f| f.io().map(|io| io.write_seconds),
        )?;
        gauge(
            e,
            "filemapd_file_in_flight",
            "IOs in flight now",
            &files,
            |f| f.io().map(|io| io.in_flight),
        )?;
        latency_histogram(e, &files)?;
        counter(
            e,
            "filemapd_file_unrecorded",
            "Allocations the kernel could not record at once (their IO may be uncounted until the next pass)",
            &files,
            |f| f.kernel.map(|k| k.unrecorded),
        )?;
        // What only dm-stats counts, for files counted by their regions.
        counter(
            e,
            "filemapd_file_reads_merged",
            "Reads merged with an adjacent one (dm-stats regions only)",
            &files,
            |f| regions(f).map(|c| c.reads_merged),
        )?;
        counter(
            e,
            "filemapd_file_writes_merged",
            "Writes merged with an adjacent one (dm-stats regions only)",
            &files,
            |f| regions(f).map(|c| c.writes_merged),
        )?;
        counter(
            e,
            "filemapd_file_io_seconds",
            "Time with IO in flight, io_ticks (dm-stats regions only)",
            &files,
            |f| regions(f).map(|c| f.seconds(c.io_ms)),
        )?;
        counter(
            e,
            "filemapd_file_queue_seconds",
            "IO time weighted by the IOs in flight, time in queue (dm-stats regions only)",
            &files,
            |f| regions(f).map(|c| f.seconds(c.weighted_io_ms)),
        )?;

        gauge(
            e,
            "filemapd_file_regions",
            "Regions in the file's group (files with a group only)",
            &files,
            |f| f.state.group.as_ref().map(|g| g.regions.len() as u64),
        )?;
        counter(
            e,
            "filemapd_file_events",
            "Allocation and removal events the kernel reported for the file",
            &files,
            |f| Some(f.state.tally.events),
        )?;
        counter(
            e,
            "filemapd_file_passes",
            "Passes that looked at the file",
            &files,
            |f| Some(f.state.tally.passes),
        )?;
        counter(
            e,
            "filemapd_file_lost_event_rescans",
            "Whole-file reads after the kernel's event ring overflowed",
            &files,
            |f| Some(f.state.tally.lost_rescans),
        )?;
        counter(
            e,
            "filemapd_file_regions_created",
            "Regions the daemon created for the file (files with a group only)",
            &files,
            |f| f.state.group.as_ref().map(|_| f.state.tally.created),
        )?;
        counter(
            e,
            "filemapd_file_regions_deleted",
            "Regions the daemon deleted for the file (files with a group only)",
            &files,
            |f| f.state.group.as_ref().map(|_| f.state.tally.deleted),
        )?;
        polling(e, &files)
    }
}

fn counter<V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    files: &[Scraped],
    value: impl Fn(&Scraped) -> Option<V>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for file in files {
        if let Some(v) = value(file) {
            family
                .encode_family(&file.labels)?
                .encode_counter::<NoLabelSet, V, f64>(&v, None)?;
        }
    }
    Ok(())
}

fn gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    files: &[Scraped],
    value: impl Fn(&Scraped) -> Option<V>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for file in files {
        if let Some(v) = value(file) {
            family.encode_family(&file.labels)?.encode_gauge(&v)?;
        }
    }
    Ok(())
}

/// A label value as the text format spells it: prometheus-client writes values as given, and
/// one quote or newline in a file's name would make Prometheus refuse the whole scrape.
fn label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// What may change while a file lives, as labels of a constant 1: its group's id and alias
/// (its name without a group), its device, how its regions follow it (`mode`: tiled, exact,
/// none) and who counts its IO (`kernel` or `regions`).
fn info(encoder: &mut DescriptorEncoder<'_>, files: &[Scraped]) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "filemapd_file_info",
        "A watched file: its group, alias and device, how its regions follow it, and who counts its IO (the kernel, or its dm-stats regions)",
        None,
        MetricType::Gauge,
    )?;
    for file in files {
        let state = &file.state;
        let labels = [
            ("path", file.labels[0].1.as_str()),
            ("alias", &label_value(&state.alias)),
            ("device", &label_value(&state.device)),
            (
                "group_id",
                &state
                    .group
                    .as_ref()
                    .map(|g| g.id.to_string())
                    .unwrap_or_default(),
            ),
            ("mode", state.group.as_ref().map_or("none", |g| g.mode)),
            (
                "counted_by",
                if file.kernel.is_some() {
                    "kernel"
                } else {
                    "regions"
                },
            ),
        ];
        family.encode_family(&labels)?.encode_gauge(&1u64)?;
    }
    Ok(())
}

/// Whether each file is polled (1) or woken by events (0); a polled file says why.
fn polling(encoder: &mut DescriptorEncoder<'_>, files: &[Scraped]) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "filemapd_file_polling",
        "1 when the file is polled instead of woken by the kernel's events; reason says why",
        None,
        MetricType::Gauge,
    )?;
    for file in files {
        let (value, reason) = match file.state.wakeup {
            Wakeup::Events => (0u64, ""),
            Wakeup::Polling(reason) => (1, reason),
        };
        let mut labels = file.labels.to_vec();
        labels.push(("reason", reason.to_string()));
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// The file's latency histogram, as Prometheus' cumulative one: the kernel's (the group's
/// bounds, or powers of two), else its group's (groups made with bounds). dm-stats' buckets
/// are [b(i-1), b(i)), Prometheus' are up to and including `le`: an IO of exactly a bound's
/// latency is one bucket higher here than Prometheus' reading of it.
fn latency_histogram(encoder: &mut DescriptorEncoder<'_>, files: &[Scraped]) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "filemapd_file_io_latency_seconds",
        "IO latency (the kernel's histogram, or the group's: dmstats --bounds); sum is read plus write time",
        None,
        MetricType::Histogram,
    )?;
    for file in files {
        let (bounds, counts, sum): (Vec<f64>, Vec<u64>, f64) = match (&file.kernel, &file.stats) {
            (Some(k), _) => {
                let Some(counted) = &file.state.counted else {
                    continue;
                };
                let bounds = counted.bounds.used();
                (
                    bounds.iter().map(|&ns| ns as f64 / 1e9).collect(),
                    k.histogram[..=bounds.len()].to_vec(),
                    (k.read_ns + k.write_ns) as f64 / 1e9,
                )
            }
            (None, Some(stats)) => {
                let Some(group) = &file.state.group else {
                    continue;
                };
                let bounds = &group.settings.histogram;
                if bounds.is_empty() || stats.histogram.len() != bounds.len() + 1 {
                    continue;
                }
                (
                    bounds.iter().map(|&b| file.seconds(b)).collect(),
                    stats.histogram.clone(),
                    file.seconds(stats.counters.read_ms + stats.counters.write_ms),
                )
            }
            (None, None) => continue,
        };
        let buckets: Vec<(f64, u64)> = bounds
            .into_iter()
            .chain([f64::MAX]) // prometheus-client's +Inf
            .zip(counts.iter().copied())
            .collect();
        let count = counts.iter().sum();
        family
            .encode_family(&file.labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_as_the_text_format_wants() {
        assert_eq!(label_value("/var/lib/vm1.img"), "/var/lib/vm1.img");
        assert_eq!(
            label_value("/images/a \"quoted\"\\name\n.img"),
            "/images/a \\\"quoted\\\"\\\\name\\n.img"
        );
    }
}
