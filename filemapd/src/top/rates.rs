//! What `filemapd top` shows per file: rates between two scrapes, latency quantiles from the
//! histogram's growth between them, and the file's state; sorted by a chosen column.
use super::exposition::{FileSample, Scrape};

/// One row of the view.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub path: String,
    pub alias: String,
    pub read_mbps: f64,
    pub write_mbps: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    /// Seconds; `None` without IO in the interval or without a histogram.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub in_flight: f64,
    pub regions: Option<f64>,
    pub mode: String,
    pub counted_by: String,
    /// `events`, or why the file is polled.
    pub wakeup: String,
}

/// The columns a view can be sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Read plus write MB/s.
    Mbps,
    /// Read plus write IOs per second.
    Iops,
    /// The 99th percentile latency.
    P99,
    /// Regions in the file's group.
    Regions,
    /// The file's alias, alphabetically.
    Name,
}

impl SortBy {
    const ALL: [SortBy; 5] = [
        SortBy::Mbps,
        SortBy::Iops,
        SortBy::P99,
        SortBy::Regions,
        SortBy::Name,
    ];

    /// The next column (the view's `s` key).
    pub fn next(self) -> Self {
        let at = Self::ALL.iter().position(|s| *s == self).unwrap_or(0);
        Self::ALL[(at + 1) % Self::ALL.len()]
    }

    pub fn name(self) -> &'static str {
        match self {
            SortBy::Mbps => "MB/s",
            SortBy::Iops => "IOPS",
            SortBy::P99 => "p99",
            SortBy::Regions => "regions",
            SortBy::Name => "name",
        }
    }
}

/// The rows for the files of `now`, rated against `before` over `seconds`; a file new since
/// `before` is rated from zero.
pub fn rows(before: &Scrape, now: &Scrape, seconds: f64) -> Vec<Row> {
    let seconds = seconds.max(1e-3);
    now.iter()
        .map(|(path, n)| {
            let empty = FileSample::default();
            let b = before.get(path).unwrap_or(&empty);
            // Counters that went back (a file's regions re-read) rate from zero.
            let rate = |now: f64, before: f64| (now - before).max(0.0) / seconds;
            let grown = growth(&b.buckets, &n.buckets);
            Row {
                path: path.clone(),
                alias: n.alias.clone(),
                read_mbps: rate(n.read_sectors, b.read_sectors) * 512.0 / 1e6,
                write_mbps: rate(n.write_sectors, b.write_sectors) * 512.0 / 1e6,
                read_iops: rate(n.reads, b.reads),
                write_iops: rate(n.writes, b.writes),
                p50: quantile(0.5, &grown),
                p99: quantile(0.99, &grown),
                in_flight: n.in_flight,
                regions: n.regions,
                mode: n.mode.clone(),
                counted_by: n.counted_by.clone(),
                wakeup: n.polling.clone().unwrap_or_else(|| "events".to_string()),
            }
        })
        .collect()
}

/// Sorts rows, the largest first (names alphabetically), or the other way round.
pub fn sort(rows: &mut [Row], by: SortBy, reversed: bool) {
    let key = |r: &Row| match by {
        SortBy::Mbps => r.read_mbps + r.write_mbps,
        SortBy::Iops => r.read_iops + r.write_iops,
        SortBy::P99 => r.p99.unwrap_or(-1.0),
        SortBy::Regions => r.regions.unwrap_or(-1.0),
        SortBy::Name => 0.0,
    };
    rows.sort_by(|a, b| {
        let order = match by {
            SortBy::Name => a.alias.cmp(&b.alias).then_with(|| a.path.cmp(&b.path)),
            _ => key(b).total_cmp(&key(a)).then_with(|| a.path.cmp(&b.path)),
        };
        if reversed { order.reverse() } else { order }
    });
}

/// The histogram's growth between two scrapes, bucket by bucket (cumulative counts); the
/// newer one alone where the bounds differ (a file's histogram changed).
fn growth(before: &[(f64, f64)], now: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let same_bounds = before.len() == now.len() && before.iter().zip(now).all(|(b, n)| b.0 == n.0);
    if !same_bounds {
        return now.to_vec();
    }
    now.iter()
        .zip(before)
        .map(|(n, b)| (n.0, (n.1 - b.1).max(0.0)))
        .collect()
}

/// The `q` quantile of cumulative buckets, as Prometheus' histogram_quantile estimates it:
/// linear within the bucket that holds it (from 0 for the first); the highest finite bound
/// when it falls in the last, unbounded one.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                0.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(read_sectors: f64, buckets: &[(f64, f64)]) -> FileSample {
        FileSample {
            alias: "a".into(),
            counted_by: "kernel".into(),
            read_sectors,
            reads: read_sectors / 8.0,
            buckets: buckets.to_vec(),
            ..FileSample::default()
        }
    }

    #[test]
    fn rates_are_the_growth_over_the_interval() {
        let before = Scrape::from([("/a".to_string(), sample(0.0, &[]))]);
        let now = Scrape::from([("/a".to_string(), sample(2048.0 * 10.0, &[]))]);
        let rows = rows(&before, &now, 2.0);
        // 10 MiB in 2 s.
        assert!((rows[0].read_mbps - 5.24288).abs() < 1e-9, "{rows:?}");
        assert_eq!(rows[0].read_iops, 1280.0);
        assert_eq!(rows[0].wakeup, "events");
    }

    #[test]
    fn quantiles_interpolate_as_prometheus_does() {
        let buckets = [
            (0.001, 50.0),
            (0.01, 90.0),
            (0.1, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(0.5, &buckets), Some(0.001));
        // Rank 70 is halfway through the second bucket.
        assert!((quantile(0.7, &buckets).unwrap() - 0.0055).abs() < 1e-12);
        assert_eq!(quantile(0.5, &[(0.001, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.99, &[(0.001, 0.0), (f64::INFINITY, 4.0)]),
            Some(0.001)
        );
    }

    #[test]
    fn latency_is_of_the_interval_only() {
        let before = Scrape::from([(
            "/a".to_string(),
            sample(0.0, &[(0.001, 100.0), (f64::INFINITY, 100.0)]),
        )]);
        let now = Scrape::from([(
            "/a".to_string(),
            sample(0.0, &[(0.001, 100.0), (f64::INFINITY, 110.0)]),
        )]);
        // The ten new IOs all took over 1 ms.
        assert_eq!(rows(&before, &now, 1.0)[0].p50, Some(0.001));
        assert_eq!(rows(&now, &now, 1.0)[0].p50, None);
    }

    #[test]
    fn the_busiest_first_unless_reversed() {
        let row = |path: &str, mbps: f64| Row {
            path: path.into(),
            alias: path.into(),
            read_mbps: mbps,
            write_mbps: 0.0,
            read_iops: 0.0,
            write_iops: 0.0,
            p50: None,
            p99: None,
            in_flight: 0.0,
            regions: None,
            mode: "none".into(),
            counted_by: "kernel".into(),
            wakeup: "events".into(),
        };
        let mut rows = vec![row("b", 1.0), row("a", 5.0), row("c", 3.0)];
        sort(&mut rows, SortBy::Mbps, false);
        assert_eq!(
            rows.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["a", "c", "b"]
        );
        sort(&mut rows, SortBy::Name, true);
        assert_eq!(
            rows.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["c", "b", "a"]
        );
        assert_eq!(SortBy::Name.next(), SortBy::Mbps);
    }
}
