//! Reading filemapd's metrics endpoint and Prometheus' query API over plain HTTP/1.0 (a
//! request, the whole answer, the connection closed): enough for a test, no client crate.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// `GET path` from `address`: the status code and the body.
pub fn http_get(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream =
        TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {answer:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
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
