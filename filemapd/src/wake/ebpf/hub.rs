//! One set of eBPF programs for many watched files: a task owns the tracer, keeps the kernel's
//! watch list, and routes each event to the feed of the file it concerns.
use std::{collections::HashMap, sync::Arc};

use filemapd_common::{Bounds, ExtentEvent, FileCounters, InodeKey, Placement, tracepoint};
use tokio::sync::{mpsc, oneshot};

use super::{CountedFile, Counting, Tracer};

/// What a feed receives: events for its inode, word that events were lost (map everything),
/// or word that another process deleted or relabelled dm-stats regions (check the group).
#[derive(Clone, Copy, Debug)]
pub enum Feed {
    Event(ExtentEvent),
    Lost,
    RegionsChanged,
}

enum Request {
    Watch(
        InodeKey,
        Placement,
        mpsc::UnboundedSender<Feed>,
        oneshot::Sender<anyhow::Result<()>>,
    ),
    /// With the counting slot to free once the kernel no longer watches the inode.
    Unwatch(InodeKey, Option<u32>),
}

/// A handle for starting and stopping watches; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    requests: mpsc::UnboundedSender<Request>,
    /// Tracepoint categories ("ext4", "xfs") with at least one attached program.
    categories: Vec<&'static str>,
    sees_region_changes: bool,
    counting: Option<Arc<Counting>>,
}

/// One file's share of the events.
pub struct EventFeed {
    key: InodeKey,
    events: mpsc::UnboundedReceiver<Feed>,
    hub: Hub,
    counted: Option<CountedFile>,
}

impl Hub {
    /// Starts the routing task on the current tokio runtime.
    pub fn spawn(tracer: Tracer) -> Hub {
        let mut categories: Vec<&'static str> =
            tracer.attached().iter().map(|t| t.category).collect();
        categories.dedup();
        let sees_region_changes = tracer.sees_region_changes();
        let counting = tracer.counting().cloned();
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(route(tracer, receiver));
        Hub {
            requests,
            categories,
            sees_region_changes,
            counting,
        }
    }

    /// The in-kernel counting of the watched files' IO, when this kernel allows it.
    pub fn counting(&self) -> Option<&Arc<Counting>> {
        self.counting.as_ref()
    }

    /// Whether feeds hear of other processes' region changes (so groups need no polling).
    pub fn sees_region_changes(&self) -> bool {
        self.sees_region_changes
    }

    /// Whether any program watches file systems of this tracepoint category.
    pub fn covers(&self, category: &str) -> bool {
        self.categories.contains(&category)
    }

    /// Watches an inode; returns once the kernel filters on it. With `placement` (where its
    /// blocks lie on its dm device) and the counting on, the kernel also counts its IO, with
    /// a latency histogram of `bounds`; `base` is what an earlier daemon counted.
    pub async fn watch(
        &self,
        key: InodeKey,
        placement: Option<Placement>,
        bounds: Bounds,
        base: FileCounters,
    ) -> anyhow::Result<EventFeed> {
        let counted = match (&self.counting, placement) {
            (Some(counting), Some(placement)) => counting
                .open(placement.dm_dev, bounds, base)
                .unwrap_or_else(|e| {
                    log::warn!("no in-kernel counting for inode {}: {e:#}", key.ino);
                    None
                }),
            _ => None,
        };
        let placement = match (&counted, placement) {
            (Some(counted), Some(placement)) => Placement {
                slot: counted.slot,
                ..placement
            },
            // Not counted: the kernel only filters.
            _ => Placement::default(),
        };
        let (sender, events) = mpsc::unbounded_channel();
        let (done, ack) = oneshot::channel();
        let stopped = || anyhow::anyhow!("the eBPF event task has stopped");
        let result = match self
            .requests
            .send(Request::Watch(key, placement, sender, done))
        {
            Ok(()) => ack.await.map_err(|_| stopped()).and_then(|r| r),
            Err(_) => Err(stopped()),
        };
        if let Err(e) = result {
            if let (Some(counted), Some(counting)) = (counted, &self.counting) {
                counting.close(counted.slot);
            }
            return Err(e);
        }
        Ok(EventFeed {
            key,
            events,
            hub: self.clone(),
            counted,
        })
    }
}

impl EventFeed {
    /// The file's slot in the in-kernel counting, when it has one.
    pub fn counted(&self) -> Option<&CountedFile> {
        self.counted.as_ref()
    }

    /// Waits for the next events of this inode and returns all that are queued.
    pub async fn next(&mut self) -> anyhow::Result<Vec<Feed>> {
        let first = self
            .events
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("the eBPF event task has stopped"))?;
        let mut batch = vec![first];
        while let Ok(more) = self.events.try_recv() {
            batch.push(more);
        }
        Ok(batch)
    }
}

impl Drop for EventFeed {
    fn drop(&mut self) {
        let slot = self.counted.as_ref().map(|c| c.slot);
        let _ = self.hub.requests.send(Request::Unwatch(self.key, slot));
    }
}

async fn route(mut tracer: Tracer, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut feeds: HashMap<InodeKey, mpsc::UnboundedSender<Feed>> = HashMap::new();
    let mut lost_seen = 0;
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                None => return, // every Hub handle is gone
                Some(Request::Watch(key, placement, feed, done)) => {
                    let result = tracer.watch(key, placement);
                    if result.is_ok() {
                        feeds.insert(key, feed);
                    }
                    let _ = done.send(result);
                }
                Some(Request::Unwatch(key, slot)) => {
                    feeds.remove(&key);
                    if let Err(e) = tracer.unwatch(key) {
                        log::warn!("{e:#}");
                    }
                    if let (Some(slot), Some(counting)) = (slot, tracer.counting()) {
                        counting.close(slot);
                    }
                }
            },
            events = tracer.next_events() => {
                let events = match events {
                    Ok(events) => events,
                    Err(e) => {
                        log::error!("reading eBPF events: {e:#}");
                        return;
                    }
                };
                for event in events {
                    if event.source == tracepoint::DM_STATS_CHANGED {
                        for feed in feeds.values() {
                            let _ = feed.send(Feed::RegionsChanged);
                        }
                    } else if let Some(feed) = feeds.get(&event.key) {
                        let _ = feed.send(Feed::Event(event));
                    }
                }
                let lost = tracer.lost_events().unwrap_or(lost_seen);
                if lost != lost_seen {
                    log::warn!("{} eBPF event(s) lost: mapping every file again", lost - lost_seen);
                    lost_seen = lost;
                    for feed in feeds.values() {
                        let _ = feed.send(Feed::Lost);
                    }
                }
            }
        }
    }
}
