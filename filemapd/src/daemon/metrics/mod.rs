//! `filemapd watch --metrics ADDR`: per-file IO and the daemon's health in Prometheus' text
//! format. Monitors publish what they know after each pass onto a [`Board`] (a lock and a
//! copy, no dm message); the IO counters are read with `@stats_print` only when Prometheus
//! scrapes ([`exposition`]), so an idle host is not woken between scrapes ([`server`]).
mod exposition;
mod server;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::bail;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::{
    daemon::tally::Tally,
    reconcile::Mapping,
    stats::{Group, RegionSettings, StatsDevice},
    wake::ebpf::CountedFile,
};

pub use server::{Endpoint, endpoint, scrape, serve};

/// How a monitor learns that its file changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// The kernel's allocation events.
    Events,
    /// Polling, and why (a metric label: short and fixed).
    Polling(&'static str),
}

/// What one monitor last published. Kept behind an `Arc` on the board: a scrape takes the
/// states it reads by reference, not by copy (10,000 files' copies were megabytes of fresh
/// memory, faulted in and zeroed, every scrape).
#[derive(Clone)]
struct FileState {
    path: String,
    /// `{path="…"`: the file's label in the text format, not yet closed (a sample may add
    /// its own), made once rather than every scrape.
    labels: String,
    /// The name of the file's dm device.
    device: String,
    /// The file's group; `None`: the file has no regions (the kernel counts it alone).
    group: Option<GroupState>,
    /// The group's alias; without a group, the file's name.
    alias: String,
    tally: Tally,
    wakeup: Wakeup,
    /// The file's slot in the in-kernel counting, read at scrape time: then its IO series
    /// are the kernel's, and no region is read.
    counted: Option<CountedFile>,
}

/// A file's group as its monitor last published it.
#[derive(Clone)]
struct GroupState {
    id: u64,
    /// Where its regions are read.
    device: Arc<StatsDevice>,
    regions: Vec<u64>,
    /// How its regions follow the file: `tiled` or `exact`.
    mode: &'static str,
    settings: RegionSettings,
}

impl FileState {
    fn new(
        path: String,
        device: String,
        group: Option<GroupState>,
        alias: String,
        figures: (Tally, Wakeup),
        counted: Option<&CountedFile>,
    ) -> Self {
        let (tally, wakeup) = figures;
        Self {
            labels: exposition::path_label(&path),
            path,
            device,
            group,
            alias,
            tally,
            wakeup,
            counted: counted.cloned(),
        }
    }

    /// A pass that left the file's group (or its lack of one) as it was: the figures alone.
    fn refresh(&mut self, tally: Tally, wakeup: Wakeup, counted: Option<&CountedFile>) {
        self.tally = tally;
        self.wakeup = wakeup;
        if self.counted.as_ref().map(|c| c.slot) != counted.map(|c| c.slot) {
            self.counted = counted.cloned();
        }
    }
}

/// What every monitor of a watch published, and the daemon-wide figures.
pub struct Board {
    files: Mutex<BTreeMap<u64, Arc<FileState>>>,
    next_key: AtomicU64,
    /// How long passes over files took.
    update_seconds: Histogram,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            files: Mutex::default(),
            next_key: AtomicU64::new(0),
            // 100 µs to ~3 s.
            update_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
        }
    }
}

impl Board {
    /// A place on the board for one monitor; it is cleared when the reporter is dropped
    /// (the monitor ended or was let go).
    pub fn reporter(self: &Arc<Self>) -> Reporter {
        Reporter {
            board: Arc::clone(self),
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Every file's state as last published (shared, not copied).
    fn snapshot(&self) -> Vec<Arc<FileState>> {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// One monitor's place on the [`Board`].
pub struct Reporter {
    board: Arc<Board>,
    key: u64,
}

impl Reporter {
    /// The file, the dm device it lies on, its group as the pass left it and how its
    /// regions follow it, what the monitor did so far and how it wakes. Called after every
    /// pass: a pass that left the group as it was (same id and alias, same count of regions,
    /// nothing created or deleted since) updates the figures alone, so that a pass stays as
    /// cheap as its change, whatever the group's size.
    pub fn publish(
        &self,
        path: &std::path::Path,
        device: &Arc<StatsDevice>,
        group: (&Group, Mapping),
        tally: Tally,
        wakeup: Wakeup,
        counted: Option<&CountedFile>,
    ) {
        let (group, mapping) = group;
        let alias = &group.descriptor.alias;
        let mut files = self.board.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = files.get_mut(&self.key)
            && let Some(known) = &state.group
            && known.id == group.id
            && state.alias == *alias
            && known.regions.len() == group.member_count()
            && (state.tally.created, state.tally.deleted) == (tally.created, tally.deleted)
        {
            // A copy only while a scrape still reads the state.
            Arc::make_mut(state).refresh(tally, wakeup, counted);
            return;
        }
        let state = FileState::new(
            path.display().to_string(),
            device.name().to_string(),
            Some(GroupState {
                id: group.id,
                device: Arc::clone(device),
                regions: group.members().map(|r| r.id).collect(),
                mode: match mapping {
                    Mapping::Tiled => "tiled",
                    Mapping::Exact => "exact",
                },
                settings: group.settings.clone(),
            }),
            alias.clone(),
            (tally, wakeup),
            counted,
        );
        files.insert(self.key, Arc::new(state));
    }

    /// Like [`Reporter::publish`], for a file without regions (the kernel counts it alone):
    /// only the name of its dm device is needed.
    pub fn publish_without_regions(
        &self,
        path: &std::path::Path,
        device_name: impl std::fmt::Display,
        tally: Tally,
        wakeup: Wakeup,
        counted: Option<&CountedFile>,
    ) {
        let mut files = self.board.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = files.get_mut(&self.key)
            && state.group.is_none()
        {
            Arc::make_mut(state).refresh(tally, wakeup, counted);
            return;
        }
        let state = FileState::new(
            path.display().to_string(),
            device_name.to_string(),
            None,
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            (tally, wakeup),
            counted,
        );
        files.insert(self.key, Arc::new(state));
    }

    /// A pass over the file took this long.
    pub fn observe_update(&self, took: Duration) {
        self.board.update_seconds.observe(took.as_secs_f64());
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.board
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// The address to serve on: a loopback one, unless serving other hosts was asked for
/// (per-file IO names the host's images).
pub fn check_address(address: SocketAddr, remote: bool) -> anyhow::Result<SocketAddr> {
    if !address.ip().is_loopback() && !remote {
        bail!(
            "metrics address {address} is reachable from other hosts: add --metrics-remote (in a config: metrics_remote = true) to serve them"
        );
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_without_the_remote_flag() {
        assert!(check_address("127.0.0.1:9101".parse().unwrap(), false).is_ok());
        assert!(check_address("[::1]:9101".parse().unwrap(), false).is_ok());
        assert!(check_address("0.0.0.0:9101".parse().unwrap(), false).is_err());
        assert!(check_address("192.0.2.1:9101".parse().unwrap(), false).is_err());
        assert!(check_address("0.0.0.0:9101".parse().unwrap(), true).is_ok());
    }
}
