//! When to look again: sleeping until an event, a notice, a recheck or the interval, with
//! passes held back while the pacer says so.
use std::{os::unix::fs::MetadataExt as _, time::Instant};

use log::debug;

use super::{Monitor, REGIONS_QUIET, SETTLE, SETTLE_TRIES, Trigger};
use crate::{
    daemon::trace,
    sectors::SectorRange,
    wake::ebpf::{Change, Feed, Tracepoint},
};

impl Monitor {
    /// Sleeps until the next check; true when the file must be mapped again whatever its size
    /// says (events arrived, or a recheck after events is due). A pass that is due waits while
    /// region creations have spent their budget (see [`crate::wake::pacing`]); events arriving
    /// meanwhile join it.
    pub(super) async fn wait(&mut self) -> anyhow::Result<bool> {
        let mut pass_due: Option<Instant> = None;
        let mut paced = false;
        loop {
            let now = Instant::now();
            let recheck_due = self.recheck.map(|(at, _)| at);
            let event_driven = self.event_driven();
            let due = pass_due.into_iter().chain(recheck_due).min();
            let deadline = due.map(|due| {
                if self.regions_changed {
                    return due;
                }
                let ready = self.pacer.ready_at(now);
                if ready > due.max(now) && !paced {
                    paced = true;
                    self.tally.paced += 1;
                }
                due.max(ready)
            });
            if pass_due.is_some() && deadline.is_some_and(|at| at <= now) {
                return Ok(true);
            }
            let deadline = deadline
                .or((!event_driven).then(|| now + self.interval))
                .map(tokio::time::Instant::from);
            let Trigger::Ebpf { feed, notices, .. } = &mut self.trigger else {
                debug!("Waiting for check interval");
                tokio::time::sleep_until(deadline.expect("polling has a deadline")).await;
                return Ok(recheck_due.is_some());
            };
            let notice = async {
                match notices {
                    Some(notices) => notices.next().await,
                    None => std::future::pending().await,
                }
            };
            let timer = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                batch = feed.next() => {
                    if self.take_events(batch?)? {
                        pass_due.get_or_insert(Instant::now());
                    }
                    // Only region changes: wait for them to be over.
                }
                notice = notice => {
                    notice?;
                    return Ok(false);
                }
                _ = timer => return Ok(pass_due.is_some() || recheck_due.is_some()),
            }
        }
    }

    /// Notes what a batch of events says changed, and arranges a look shortly after. Returns
    /// whether the file's extents may have changed (not only other processes' regions).
    fn take_events(&mut self, batch: Vec<Feed>) -> anyhow::Result<bool> {
        let block_size = self.file.metadata()?.blksize();
        let mut extents_changed = false;
        for item in batch {
            match item {
                Feed::Lost => {
                    // Events were lost: read the whole file, list the group again, and look
                    // for the file's sectors all over the kernel's map.
                    self.tally.lost_rescans += 1;
                    self.view.note_unknown_change();
                    self.known_group = None;
                    self.kernel_map.unknown = true;
                    extents_changed = true;
                }
                Feed::RegionsChanged => {
                    self.known_group = None;
                    self.regions_changed = true;
                    // Look again once the other process is done (each change postpones).
                    let at = Instant::now() + REGIONS_QUIET;
                    self.recheck = Some((at, SETTLE_TRIES));
                }
                Feed::Event(event) => {
                    let Some(tp) = Tracepoint::by_index(event.source) else {
                        continue;
                    };
                    let logical = tp.byte_range(event.start, event.length, block_size);
                    // Where the kernel may have recorded an allocation: looked at by the next
                    // pass, whatever FIEMAP shows then (a delayed allocation is nowhere yet).
                    if let Some(p) = self.placement.filter(|p| p.dm_dev != 0)
                        && event.physical_length > 0
                        && !tp.is_placeholder(event.physical_start)
                    {
                        let start = p.sector_of(event.physical_start);
                        let len = p.sectors_in(event.physical_length);
                        self.kernel_map.recorded.push(SectorRange::new(start, len));
                    }
                    if trace::enabled() {
                        trace::event(&self.path, &event, logical, self.placement.as_ref());
                        let oldest = self.oldest_event_ns.get_or_insert(event.ktime_ns);
                        *oldest = (*oldest).min(event.ktime_ns);
                    }
                    match logical {
                        Some((start, len)) => {
                            debug!(
                                "event {}: {:?} bytes {start}+{len}, blocks {}+{}",
                                tp.name, tp.change, event.physical_start, event.physical_length
                            );
                            self.view
                                .note_event(start, len, tp.change == Change::Allocated);
                        }
                        None => {
                            debug!("event {}: {:?}", tp.name, tp.change);
                            self.view.note_unknown_change();
                        }
                    }
                    self.tally.events += 1;
                    extents_changed = true;
                }
            }
        }
        if extents_changed {
            // Removals fire before the blocks go: look once more shortly after.
            self.recheck = Some((Instant::now() + SETTLE, SETTLE_TRIES));
        }
        Ok(extents_changed)
    }
}
