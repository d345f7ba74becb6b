//! `filemapd top`'s input: a `filemapd watch --metrics` endpoint's text, fetched over plain
//! HTTP/1.0 (one request, the whole answer; no client crate for a GET on loopback) and read
//! into one record per watched file.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// One file's series in one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileSample {
    pub alias: String,
    pub mode: String,
    pub counted_by: String,
    pub reads: f64,
    pub writes: f64,
    pub read_sectors: f64,
    pub write_sectors: f64,
    pub in_flight: f64,
    /// `None`: the file has no group (and so no regions).
    pub regions: Option<f64>,
    /// `None`: woken by events; else why it is polled.
    pub polling: Option<String>,
    /// The latency histogram's cumulative buckets: (upper bound in seconds, count), rising;
    /// the last bound is infinite.
    pub buckets: Vec<(f64, f64)>,
}

/// Every watched file of a scrape, by path.
pub type Scrape = BTreeMap<String, FileSample>;

/// GETs `/metrics` from `address` (host:port).
pub fn fetch(address: &str) -> anyhow::Result<String> {
    let mut stream =
        TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {address}\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .with_context(|| format!("reading from {address}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("{address} answered without HTTP headers"))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        bail!("{address} answered HTTP {status}, not metrics");
    }
    // HTTP/1.0 ends an answer with the connection, also one cut short: OpenMetrics' last
    // line tells them apart.
    if !body.ends_with("# EOF\n") {
        bail!("{address}'s answer was cut short (it lacks OpenMetrics' closing # EOF)");
    }
    Ok(body.to_string())
}

/// The per-file series of a scrape's text; other lines are passed over.
pub fn parse(text: &str) -> Scrape {
    let mut files = Scrape::new();
    for line in text.lines() {
        let Some(sample) = Sample::of(line) else {
            continue;
        };
        let Some(path) = sample.label("path") else {
            continue;
        };
        let file = files.entry(path.to_string()).or_default();
        let value = sample.value;
        match sample.name {
            "filemapd_file_info" => {
                file.alias = sample.label("alias").unwrap_or_default().to_string();
                file.mode = sample.label("mode").unwrap_or_default().to_string();
                file.counted_by = sample.label("counted_by").unwrap_or_default().to_string();
            }
            "filemapd_file_reads_total" => file.reads = value,
            "filemapd_file_writes_total" => file.writes = value,
            "filemapd_file_read_sectors_total" => file.read_sectors = value,
            "filemapd_file_write_sectors_total" => file.write_sectors = value,
            "filemapd_file_in_flight" => file.in_flight = value,
            "filemapd_file_regions" => file.regions = Some(value),
            "filemapd_file_polling" => {
                file.polling =
                    (value != 0.0).then(|| sample.label("reason").unwrap_or_default().to_string());
            }
            "filemapd_file_io_latency_seconds_bucket" => {
                let bound = match sample.label("le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::NAN),
                    None => f64::NAN,
                };
                if !bound.is_nan() {
                    file.buckets.push((bound, value));
                }
            }
            _ => {}
        }
    }
    for file in files.values_mut() {
        file.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    // Only paths with an info series are files (a stray label elsewhere is not).
    files.retain(|_, f| !f.counted_by.is_empty());
    files
}

/// One sample line: `name{key="value",...} value`.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl<'a> Sample<'a> {
    fn of(line: &'a str) -> Option<Self> {
        if line.starts_with('#') || line.trim().is_empty() {
            return None;
        }
        let name_end = line.find(['{', ' '])?;
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(inner)?;
            labels = parsed;
            rest = after;
        }
        let value = rest.split_whitespace().next()?.parse().ok()?;
        Some(Self {
            name,
            labels,
            value,
        })
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `key="value",...}` with the text format's escapes (`\\`, `\"`, `\n`); returns the labels
/// and what follows the closing brace.
fn parse_labels(mut text: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches(',');
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (at, c) = chars.next()?;
            match c {
                '"' => break at,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        text = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP filemapd_file_info A watched file
# TYPE filemapd_file_info gauge
filemapd_file_info{path="/img/a \"b\".img",alias="ab",device="vg-images",group_id="",mode="none",counted_by="kernel"} 1
filemapd_file_info{path="/img/c.img",alias="c",device="vg-images",group_id="4",mode="tiled",counted_by="kernel"} 1
filemapd_file_reads_total{path="/img/a \"b\".img"} 10
filemapd_file_write_sectors_total{path="/img/c.img"} 2048
filemapd_file_regions{path="/img/c.img"} 3
filemapd_file_io_latency_seconds_bucket{le="+Inf",path="/img/c.img"} 5
filemapd_file_io_latency_seconds_bucket{le="0.001",path="/img/c.img"} 2
filemapd_file_polling{path="/img/c.img",reason="no BTF"} 1
filemapd_file_polling{path="/img/a \"b\".img",reason=""} 0
filemapd_update_seconds_count 7
"#;

    #[test]
    fn a_scrape_reads_into_one_record_per_file() {
        let files = parse(SCRAPE);
        assert_eq!(files.len(), 2);
        let a = &files["/img/a \"b\".img"];
        assert_eq!((a.alias.as_str(), a.mode.as_str()), ("ab", "none"));
        assert_eq!((a.reads, a.regions, a.polling.clone()), (10.0, None, None));
        let c = &files["/img/c.img"];
        assert_eq!((c.write_sectors, c.regions), (2048.0, Some(3.0)));
        assert_eq!(c.polling.as_deref(), Some("no BTF"));
        assert_eq!(c.buckets, vec![(0.001, 2.0), (f64::INFINITY, 5.0)]);
    }

    #[test]
    fn lines_that_are_not_samples_are_passed_over() {
        assert!(parse("garbage\n{\nname{path=\"x\" 1\n").is_empty());
    }
}
