//! What a scrape answers: each watched file's dm-stats counters, read now with `@stats_print`
//! and summed over its group's regions, and what its monitor published. Times are in seconds
//! whatever the group's timestamps (dm-stats counts ms, or ns with precise_timestamps).
use std::{fmt, sync::Arc};

use log::debug;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet},
    metrics::MetricType,
};

use super::{Board, FileState, Wakeup};
use filemapd_common::UncoveredTotals;

use crate::stats::{Counters, Group, RegionStats};

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
    labels: [(&'static str, String); 4],
    /// `None` when the group's regions could not be read (the file's IO series are left out
    /// of this scrape rather than shown wrong).
    stats: Option<RegionStats>,
    /// IO the kernel counted before the file's regions existed; `None` without the accounting.
    uncovered: Option<UncoveredTotals>,
}

impl Scraped {
    fn read(state: FileState) -> Self {
        let labels = [
            ("path", state.path.clone()),
            ("alias", state.alias.clone()),
            ("device", state.device.name().to_string()),
            ("group_id", state.group_id.to_string()),
        ];
        let stats = group_stats(&state);
        let uncovered = state.account.as_ref().and_then(|account| {
            account
                .totals()
                .inspect_err(|e| debug!("{}: in-kernel totals left out: {e:#}", state.path))
                .ok()
        });
        Self {
            state,
            labels,
            stats,
            uncovered,
        }
    }

    /// A time counter in seconds.
    fn seconds(&self, ticks: u64) -> f64 {
        let per_second = match self.state.settings.precise_timestamps {
            true => 1e9,
            false => 1e3,
        };
        ticks as f64 / per_second
    }
}

/// The group's counters summed over its regions. A region may have gone since the monitor
/// published (its pass is running): then the group is listed afresh, once.
fn group_stats(state: &FileState) -> Option<RegionStats> {
    let sum = |ids: &mut dyn Iterator<Item = u64>| -> anyhow::Result<RegionStats> {
        let mut total = RegionStats::default();
        for id in ids {
            let stats = state.device.stats(id)?;
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
    match sum(&mut state.regions.iter().copied()) {
        Ok(stats) => return Some(stats),
        Err(e) => debug!("{}: reading the group again: {e:#}", state.path),
    }
    let group = Group::load(&state.device, state.group_id).ok().flatten()?;
    sum(&mut group.members().map(|r| r.id))
        .inspect_err(|e| debug!("{}: counters left out of this scrape: {e:#}", state.path))
        .ok()
}

impl Collector for FileMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let files: Vec<Scraped> = self.0.snapshot().into_iter().map(Scraped::read).collect();
        let io = |f: &Scraped| f.stats.as_ref().map(|s| s.counters);
        let e = &mut encoder;

        counter(
            e,
            "filemapd_file_reads",
            "Reads completed in the file's group of dm-stats regions",
            &files,
            |f| io(f).map(|c| c.reads),
        )?;
        counter(
            e,
            "filemapd_file_reads_merged",
            "Reads merged with an adjacent one",
            &files,
            |f| io(f).map(|c| c.reads_merged),
        )?;
        counter(
            e,
            "filemapd_file_read_sectors",
            "512-byte sectors read",
            &files,
            |f| io(f).map(|c| c.sectors_read),
        )?;
        counter(
            e,
            "filemapd_file_read_seconds",
            "Time spent reading",
            &files,
            |f| io(f).map(|c| f.seconds(c.read_ms)),
        )?;
        counter(
            e,
            "filemapd_file_writes",
            "Writes completed in the file's group of dm-stats regions",
            &files,
            |f| io(f).map(|c| c.writes),
        )?;
        counter(
            e,
            "filemapd_file_writes_merged",
            "Writes merged with an adjacent one",
            &files,
            |f| io(f).map(|c| c.writes_merged),
        )?;
        counter(
            e,
            "filemapd_file_write_sectors",
            "512-byte sectors written",
            &files,
            |f| io(f).map(|c| c.sectors_written),
        )?;
        counter(
            e,
            "filemapd_file_write_seconds",
            "Time spent writing",
            &files,
            |f| io(f).map(|c| f.seconds(c.write_ms)),
        )?;
        counter(
            e,
            "filemapd_file_io_seconds",
            "Time with IO in flight (io_ticks)",
            &files,
            |f| io(f).map(|c| f.seconds(c.io_ms)),
        )?;
        counter(
            e,
            "filemapd_file_queue_seconds",
            "IO time weighted by the IOs in flight (time in queue)",
            &files,
            |f| io(f).map(|c| f.seconds(c.weighted_io_ms)),
        )?;
        gauge(
            e,
            "filemapd_file_in_flight",
            "IOs in flight now",
            &files,
            |f| io(f).map(|c: Counters| c.in_flight),
        )?;
        latency_histogram(e, &files)?;
        uncovered_series(e, &files)?;

        gauge(
            e,
            "filemapd_file_regions",
            "Regions in the file's group",
            &files,
            |f| Some(f.state.regions.len() as u64),
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
            "Regions the daemon created for the file",
            &files,
            |f| Some(f.state.tally.created),
        )?;
        counter(
            e,
            "filemapd_file_regions_deleted",
            "Regions the daemon deleted for the file",
            &files,
            |f| Some(f.state.tally.deleted),
        )?;
        polling(e, &files)
    }
}

/// IO that landed in the file's freshly allocated sectors before a region covered them,
/// counted in the kernel: added to the series above, it is all of the file's IO.
fn uncovered_series(e: &mut DescriptorEncoder<'_>, files: &[Scraped]) -> fmt::Result {
    let kernel = |f: &Scraped| f.uncovered;
    counter(
        e,
        "filemapd_file_uncovered_reads",
        "Reads of the file no region counted (before its region existed), counted in the kernel",
        files,
        |f| kernel(f).map(|t| t.reads),
    )?;
    counter(
        e,
        "filemapd_file_uncovered_read_sectors",
        "512-byte sectors read before their region existed, counted in the kernel",
        files,
        |f| kernel(f).map(|t| t.read_sectors),
    )?;
    counter(
        e,
        "filemapd_file_uncovered_writes",
        "Writes of the file no region counted (before its region existed), counted in the kernel",
        files,
        |f| kernel(f).map(|t| t.writes),
    )?;
    counter(
        e,
        "filemapd_file_uncovered_write_sectors",
        "512-byte sectors written before their region existed, counted in the kernel",
        files,
        |f| kernel(f).map(|t| t.write_sectors),
    )?;
    counter(
        e,
        "filemapd_file_uncovered_io_seconds",
        "Time those reads and writes took (0 where the kernel's tick length is unknown)",
        files,
        |f| kernel(f).map(|t| (t.read_ns + t.write_ns) as f64 / 1e9),
    )?;
    counter(
        e,
        "filemapd_file_uncovered_unrecorded",
        "Allocations the kernel could not record whole (their IO may be uncounted)",
        files,
        |f| kernel(f).map(|t| t.unrecorded),
    )
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

/// The group's latency histogram (groups made with bounds), as Prometheus' cumulative one.
/// dm-stats' buckets are [b(i-1), b(i)), Prometheus' are up to and including `le`: an IO
/// of exactly a bound's latency is one bucket higher here than Prometheus' reading of it.
fn latency_histogram(encoder: &mut DescriptorEncoder<'_>, files: &[Scraped]) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "filemapd_file_io_latency_seconds",
        "IO latency by the group's histogram bounds (dmstats --bounds); sum is read plus write time",
        None,
        MetricType::Histogram,
    )?;
    for file in files {
        let Some(stats) = &file.stats else { continue };
        let bounds = &file.state.settings.histogram;
        if bounds.is_empty() || stats.histogram.len() != bounds.len() + 1 {
            continue;
        }
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .map(|&b| file.seconds(b))
            .chain([f64::MAX]) // prometheus-client's +Inf
            .zip(stats.histogram.iter().copied())
            .collect();
        let count = stats.histogram.iter().sum();
        let sum = file.seconds(stats.counters.read_ms + stats.counters.write_ms);
        family
            .encode_family(&file.labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}
