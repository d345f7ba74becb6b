//! For the metrics tests: filemapd's endpoint and Prometheus' query API read over plain
//! HTTP/1.0 (a request, the whole answer, the connection closed: enough for a test, no client
//! crate), Debian's Prometheus run, and what dmstats and dmsetup say for comparison.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{ScratchDir, created_group_id, daemon::CONVERGE, run, wait_until};

/// `GET path` from `address`: the status code and the body.
pub fn http_get(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut answer = String::new();
    ask(address, path)?.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {answer:?}"))?;
    Ok((status_of(head)?, body.to_string()))
}

/// `GET path` from `address` as a scraper pays for it, the body read and dropped as it comes
/// (no copy of it kept): the status code and the body's length in bytes. For the bench, whose
/// answers of 10,000 files are tens of MB.
pub fn http_get_len(address: &str, path: &str) -> anyhow::Result<(u16, usize)> {
    let mut stream = ask(address, path)?;
    let mut buffer = vec![0u8; 256 << 10];
    let mut head = Vec::new();
    // The body's bytes so far; `None` until the head's end was read.
    let mut body: Option<usize> = None;
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        match &mut body {
            Some(bytes) => *bytes += n,
            None => {
                head.extend_from_slice(&buffer[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    body = Some(head.len() - end - 4);
                    head.truncate(end);
                }
            }
        }
    }
    let body = body.with_context(|| format!("no end of headers in {head:?}"))?;
    Ok((status_of(&String::from_utf8_lossy(&head))?, body))
}

/// A connection to `address` that has sent `GET path` (HTTP/1.0: the answer ends with it).
fn ask(address: &str, path: &str) -> anyhow::Result<TcpStream> {
    let mut stream =
        TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    Ok(stream)
}

/// The status code of an answer's head (`HTTP/1.1 200 OK` ...).
fn status_of(head: &str) -> anyhow::Result<u16> {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))
}

/// The value of the sample `name{...}` whose labels include every one of `labels`
/// (`key="value"` each), from a scrape in the text format.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
    let mut found = text.lines().filter(|line| {
        line.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            && labels.iter().all(|l| line.contains(l))
    });
    let Some(line) = found.next() else {
        bail!("no sample {name} with {labels:?} in:\n{text}");
    };
    if found.next().is_some() {
        bail!("more than one sample {name} with {labels:?} in:\n{text}");
    }
    let value = line.rsplit(' ').next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("sample {line:?} has no number"))
}

/// A group made by Debian's dmstats with latency bounds (1 ms, 10 ms, 100 ms), for `watch`
/// to adopt; returns its id.
pub fn map_with_bounds(path: &Path) -> u64 {
    let out = run(
        "dmstats",
        &[
            "create",
            "--filemap",
            "--nomonitor",
            "--bounds",
            "1ms,10ms,100ms",
            &path.to_string_lossy(),
        ],
    )
    .unwrap();
    created_group_id(&out).unwrap()
}

/// Overwrites the file's first MiB with O_DIRECT: 2,048 sectors into blocks it already has,
/// so the group's regions count them and nothing else.
pub fn overwrite_first_mib(path: &Path) {
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", path.display()),
            "bs=64k",
            "count=16",
            "oflag=direct",
            "conv=notrunc,fsync",
            "status=none",
        ],
    )
    .unwrap();
}

/// `dmstats report`'s `fields` for the group (its `group` row; the others are its regions'
/// areas), as Debian's tool reads the kernel. Mind that the report clears what it read:
/// libdm reads with `@stats_print_clear`, so the counters start again from 0 after it.
pub fn dmstats_report(device: &str, group_id: u64, fields: &[&str]) -> Vec<u64> {
    // `--groupid` does not narrow a report to the group: its row is picked by its id.
    let out = run(
        "dmstats",
        &[
            "report",
            "--groupid",
            &group_id.to_string(),
            "-o",
            &format!("obj_type,group_id,{}", fields.join(",")),
            "--noheadings",
            "--separator",
            " ",
            device,
        ],
    )
    .unwrap();
    let rows: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("group {group_id} ")))
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "one row for group {group_id} expected:\n{out}"
    );
    let values: Vec<u64> = rows[0]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("not a count: {out}")))
        .collect();
    assert_eq!(values.len(), fields.len(), "{out}");
    values
}

/// The group's write sectors as the kernel has them now, through Debian's dmsetup (which,
/// unlike `dmstats report`, leaves them as they are): `@stats_print` of each region.
pub fn write_sectors_now(device: &str, regions: &[u64]) -> u64 {
    regions
        .iter()
        .map(|id| {
            let out = run(
                "dmsetup",
                &["message", device, "0", &format!("@stats_print {id}")],
            )
            .unwrap();
            out.lines()
                .filter_map(|l| l.split_whitespace().nth(7))
                .map(|v| v.parse::<u64>().unwrap())
                .sum::<u64>()
        })
        .sum()
}

/// Debian's Prometheus, killed on drop.
pub struct Prometheus {
    child: Child,
    _data: ScratchDir,
}

impl Prometheus {
    /// Scrapes `target` every second; serves its API on `listen`.
    pub fn start(target: &str, listen: &str) -> Self {
        let data = ScratchDir::new(Path::new("/tmp"), "prometheus").unwrap();
        let config = data.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: filemapd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let storage: PathBuf = data.0.join("tsdb");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", storage.display()))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("Debian's prometheus package (cargo xtask setup installs it)");
        let prometheus = Self { child, _data: data };
        // Up to a minute: an emulated VM starts a Go program slowly.
        wait_until("Prometheus to be ready", 2 * CONVERGE, || {
            Ok(http_get(listen, "/-/ready").is_ok_and(|(status, _)| status == 200))
        })
        .unwrap();
        prometheus
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one value of an instant query through Prometheus' HTTP API; `None` while it has none.
pub fn query(listen: &str, promql: &str) -> anyhow::Result<Option<f64>> {
    let results = query_series(listen, promql)?;
    match results.as_slice() {
        [] => Ok(None),
        [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
        _ => anyhow::bail!(
            "query {promql:?} matched {} series: {results:?}",
            results.len()
        ),
    }
}

/// Every series an instant query answers (an error for PromQL that Prometheus refuses).
pub fn query_series(listen: &str, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(listen, &format!("/api/v1/query?query={encoded}"))?;
    anyhow::ensure!(status == 200, "query {promql:?}: HTTP {status}: {body}");
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    answer["data"]["result"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no result in {body}"))
}

/// The PromQL of every panel of the shipped Grafana dashboard (dist/grafana-dashboard.json),
/// as Prometheus can run it: the rate window and the image selection filled in.
pub fn dashboard_queries() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| {
            target["expr"]
                .as_str()
                .expect("every target has an expr")
                .replace("$__rate_interval", "1m")
                .replace("$alias", ".*")
        })
        .collect();
    assert!(!queries.is_empty(), "no query in {}", path.display());
    for query in &queries {
        assert!(!query.contains('$'), "a variable left in {query}");
    }
    queries
}

/// The metric names a query reads (`filemapd_...`), each as a scrape spells its samples.
pub fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(at) = rest.find("filemapd_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// Whether a scrape has a sample of `name`.
pub fn has_samples(text: &str, name: &str) -> bool {
    text.lines().any(|line| {
        line.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}
