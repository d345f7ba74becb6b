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
//!
//! These families are written here in OpenMetrics' text format, a line at a time, rather than
//! through prometheus-client's encoder (which writes the daemon-wide series): 10,000 files are
//! ~350,000 lines a scrape, and the crate's dozen dynamic writes per line (name, suffix, each
//! label's parts, value) were most of a scrape's time.
use std::{borrow::Cow, fmt, sync::Arc};

use log::debug;

use super::{Board, FileState, Wakeup};
use filemapd_common::FileCounters;

use crate::{
    stats::{Group, RegionStats},
    wake::ebpf::CountedFile,
};

/// One file at scrape time.
struct Scraped<'a> {
    state: Arc<FileState>,
    /// All of the file's IO as the kernel counted it (borrowed from the scrape's batch);
    /// `None` where the kernel does not count the file (or could not be read).
    kernel: Option<Cow<'a, FileCounters>>,
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

impl<'a> Scraped<'a> {
    /// `all_counted`: every slot's kernel counters, read at once for this scrape (`None`:
    /// read the file's alone).
    fn read(state: Arc<FileState>, all_counted: Option<&'a [FileCounters]>) -> Self {
        let kernel = state.counted.as_ref().and_then(|counted| {
            match all_counted.and_then(|all| all.get(counted.slot as usize)) {
                Some(counters) => Some(Cow::Borrowed(counters)),
                None => counted
                    .counters()
                    .inspect_err(|e| debug!("{}: in-kernel counters left out: {e:#}", state.path))
                    .ok()
                    .map(Cow::Owned),
            }
        });
        let stats = match kernel {
            Some(_) => None,
            None => group_stats(&state),
        };
        Self {
            state,
            kernel,
            stats,
        }
    }

    /// `{path="…"`: the file's label, not yet closed (a sample may add its own).
    fn labels(&self) -> &str {
        &self.state.labels
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
fn all_kernel_counters(states: &[Arc<FileState>]) -> Option<Vec<FileCounters>> {
    let counting = states
        .iter()
        .find_map(|s| s.counted.as_ref())
        .map(CountedFile::counting)?;
    counting
        .all_counters()
        .inspect_err(|e| debug!("reading every file's counters at once: {e:#}"))
        .ok()
}

/// Writes every watched file's series, read now, to `out`.
pub fn write_files(board: &Board, out: &mut dyn fmt::Write) -> fmt::Result {
    let states = board.snapshot();
    let all_counted = all_kernel_counters(&states);
    let files: Vec<Scraped<'_>> = states
        .into_iter()
        .map(|state| Scraped::read(state, all_counted.as_deref()))
        .collect();
    let regions = |f: &Scraped| f.stats.as_ref().map(|s| s.counters);
    let e = &mut Text {
        out,
        line: String::with_capacity(256),
    };

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
        |f| f.kernel.as_ref().map(|k| k.unrecorded),
    )?;
    gauge(
        e,
        "filemapd_file_uncounted_runs",
        "Runs of the file's sectors the kernel's sector map had no room for at the last pass: their IO goes uncounted (kernel_map_extents sizes the map)",
        &files,
        |f| f.kernel.as_ref().map(|_| f.state.tally.uncounted_runs),
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

/// Lines of the text format, each built in one buffer and written whole.
struct Text<'w> {
    out: &'w mut dyn fmt::Write,
    line: String,
}

impl Text<'_> {
    /// A family's `# HELP` and `# TYPE` lines, before its samples.
    fn family(&mut self, name: &str, help: &str, kind: &str) -> fmt::Result {
        self.line.clear();
        for (what, text) in [("HELP", help), ("TYPE", kind)] {
            for part in ["# ", what, " ", name, " ", text, "\n"] {
                self.line.push_str(part);
            }
        }
        self.out.write_str(&self.line)
    }

    /// `name` + `suffix`, the file's `labels` and `more` of them (`,key="value"…`), then the
    /// value.
    fn sample(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &str,
        more: &str,
        value: impl Number,
    ) -> fmt::Result {
        self.line.clear();
        for part in [name, suffix, labels, more, "} "] {
            self.line.push_str(part);
        }
        value.push_to(&mut self.line);
        self.line.push('\n');
        self.out.write_str(&self.line)
    }
}

/// A sample's value as the text format spells it (as prometheus-client does: itoa, dtoa).
trait Number {
    fn push_to(&self, text: &mut String);
}

impl Number for u64 {
    fn push_to(&self, text: &mut String) {
        text.push_str(itoa::Buffer::new().format(*self));
    }
}

impl Number for f64 {
    fn push_to(&self, text: &mut String) {
        text.push_str(dtoa::Buffer::new().format(*self));
    }
}

fn counter<V: Number>(
    text: &mut Text<'_>,
    name: &str,
    help: &str,
    files: &[Scraped],
    value: impl Fn(&Scraped) -> Option<V>,
) -> fmt::Result {
    text.family(name, help, "counter")?;
    for file in files {
        if let Some(v) = value(file) {
            text.sample(name, "_total", file.labels(), "", v)?;
        }
    }
    Ok(())
}

fn gauge<V: Number>(
    text: &mut Text<'_>,
    name: &str,
    help: &str,
    files: &[Scraped],
    value: impl Fn(&Scraped) -> Option<V>,
) -> fmt::Result {
    text.family(name, help, "gauge")?;
    for file in files {
        if let Some(v) = value(file) {
            text.sample(name, "", file.labels(), "", v)?;
        }
    }
    Ok(())
}

/// `{path="…"`: a file's label as its samples start, not yet closed.
pub(super) fn path_label(path: &str) -> String {
    format!("{{path=\"{}\"", label_value(path))
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
fn info(text: &mut Text<'_>, files: &[Scraped]) -> fmt::Result {
    const NAME: &str = "filemapd_file_info";
    text.family(
        NAME,
        "A watched file: its group, alias and device, how its regions follow it, and who counts its IO (the kernel, or its dm-stats regions)",
        "gauge",
    )?;
    for file in files {
        let state = &file.state;
        let more = format!(
            ",alias=\"{}\",device=\"{}\",group_id=\"{}\",mode=\"{}\",counted_by=\"{}\"",
            label_value(&state.alias),
            label_value(&state.device),
            state
                .group
                .as_ref()
                .map(|g| g.id.to_string())
                .unwrap_or_default(),
            state.group.as_ref().map_or("none", |g| g.mode),
            if file.kernel.is_some() {
                "kernel"
            } else {
                "regions"
            },
        );
        text.sample(NAME, "", file.labels(), &more, 1u64)?;
    }
    Ok(())
}

/// Whether each file is polled (1) or woken by events (0); a polled file says why.
fn polling(text: &mut Text<'_>, files: &[Scraped]) -> fmt::Result {
    const NAME: &str = "filemapd_file_polling";
    text.family(
        NAME,
        "1 when the file is polled instead of woken by the kernel's events; reason says why",
        "gauge",
    )?;
    for file in files {
        let (value, reason) = match file.state.wakeup {
            Wakeup::Events => (0u64, ""),
            Wakeup::Polling(reason) => (1, reason),
        };
        let more = format!(",reason=\"{}\"", label_value(reason));
        text.sample(NAME, "", file.labels(), &more, value)?;
    }
    Ok(())
}

/// The file's latency histogram, as Prometheus' cumulative one: the kernel's (the group's
/// bounds, or powers of two), else its group's (groups made with bounds). dm-stats' buckets
/// are [b(i-1), b(i)), Prometheus' are up to and including `le`: an IO of exactly a bound's
/// latency is one bucket higher here than Prometheus' reading of it.
fn latency_histogram(text: &mut Text<'_>, files: &[Scraped]) -> fmt::Result {
    const NAME: &str = "filemapd_file_io_latency_seconds";
    text.family(
        NAME,
        "IO latency (the kernel's histogram, or the group's: dmstats --bounds); sum is read plus write time",
        "histogram",
    )?;
    // The `,le="…"` labels of the last bounds seen: most files share theirs.
    let mut le: (Vec<f64>, Vec<String>) = Default::default();
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
        if le.0 != bounds {
            le.1 = bounds
                .iter()
                .map(|b| format!(",le=\"{}\"", dtoa::Buffer::new().format(*b)))
                .chain([",le=\"+Inf\"".to_string()])
                .collect();
            le.0 = bounds;
        }
        text.sample(NAME, "_sum", file.labels(), "", sum)?;
        text.sample(
            NAME,
            "_count",
            file.labels(),
            "",
            counts.iter().sum::<u64>(),
        )?;
        let mut cumulative = 0;
        for (le, count) in le.1.iter().zip(&counts) {
            cumulative += count;
            text.sample(NAME, "_bucket", file.labels(), le, cumulative)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc};

    use super::*;
    use crate::daemon::tally::Tally;

    #[test]
    fn a_file_is_written_in_the_text_format() {
        let board = Arc::new(Board::default());
        let reporter = board.reporter();
        reporter.publish_without_regions(
            Path::new("/images/a \"b\".img"),
            "vg-images",
            Tally {
                passes: 3,
                events: 2,
                ..Default::default()
            },
            Wakeup::Polling("no-btf"),
            None,
        );
        let mut text = String::new();
        write_files(&board, &mut text).unwrap();
        let path = r#"{path="/images/a \"b\".img""#;
        for line in [
            "# HELP filemapd_file_passes Passes that looked at the file\n".to_string(),
            "# TYPE filemapd_file_passes counter\n".to_string(),
            format!("filemapd_file_passes_total{path}}} 3\n"),
            format!("filemapd_file_events_total{path}}} 2\n"),
            format!("filemapd_file_lost_event_rescans_total{path}}} 0\n"),
            format!(
                r#"filemapd_file_info{path},alias="a \"b\".img",device="vg-images",group_id="",mode="none",counted_by="regions"}} 1"#
            ) + "\n",
            format!(r#"filemapd_file_polling{path},reason="no-btf"}} 1"#) + "\n",
            "# TYPE filemapd_file_io_latency_seconds histogram\n".to_string(),
        ] {
            assert!(text.contains(&line), "no {line:?} in:\n{text}");
        }
        // Neither kernel counters nor regions: no IO series rather than zeros.
        assert!(!text.contains("filemapd_file_reads_total"), "{text}");
        assert!(
            !text.contains("filemapd_file_io_latency_seconds_count"),
            "{text}"
        );
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 5);
    }

    #[test]
    fn label_values_are_escaped_as_the_text_format_wants() {
        assert_eq!(label_value("/var/lib/vm1.img"), "/var/lib/vm1.img");
        assert_eq!(
            label_value("/images/a \"quoted\"\\name\n.img"),
            "/images/a \\\"quoted\\\"\\\\name\\n.img"
        );
    }
}
