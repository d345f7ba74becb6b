//! One set of eBPF programs for many watched files: a task owns the tracer, keeps the kernel's
//! watch list, and routes each event to the feed of the file it concerns.
use std::collections::HashMap;

use filemapd_common::{ExtentEvent, InodeKey, tracepoint};
use tokio::sync::{mpsc, oneshot};

use super::Tracer;

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
        mpsc::UnboundedSender<Feed>,
        oneshot::Sender<anyhow::Result<()>>,
    ),
    Unwatch(InodeKey),
}

/// A handle for starting and stopping watches; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    requests: mpsc::UnboundedSender<Request>,
    /// Tracepoint categories ("ext4", "xfs") with at least one attached program.
    categories: Vec<&'static str>,
    sees_region_changes: bool,
}

/// One file's share of the events.
pub struct EventFeed {
    key: InodeKey,
    events: mpsc::UnboundedReceiver<Feed>,
    hub: Hub,
}

impl Hub {
    /// Starts the routing task on the current tokio runtime.
    pub fn spawn(tracer: Tracer) -> Hub {
        let mut categories: Vec<&'static str> =
            tracer.attached().iter().map(|t| t.category).collect();
        categories.dedup();
        let sees_region_changes = tracer.sees_region_changes();
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(route(tracer, receiver));
        Hub {
            requests,
            categories,
            sees_region_changes,
        }
    }

    /// Whether feeds hear of other processes' region changes (so groups need no polling).
    pub fn sees_region_changes(&self) -> bool {
        self.sees_region_changes
    }

    /// Whether any program watches file systems of this tracepoint category.
    pub fn covers(&self, category: &str) -> bool {
        self.categories.contains(&category)
    }

    /// Watches an inode; returns once the kernel filters on it.
    pub async fn watch(&self, key: InodeKey) -> anyhow::Result<EventFeed> {
        let (sender, events) = mpsc::unbounded_channel();
        let (done, ack) = oneshot::channel();
        self.requests
            .send(Request::Watch(key, sender, done))
            .map_err(|_| anyhow::anyhow!("the eBPF event task has stopped"))?;
        ack.await
            .map_err(|_| anyhow::anyhow!("the eBPF event task has stopped"))??;
        Ok(EventFeed {
            key,
            events,
            hub: self.clone(),
        })
    }
}

impl EventFeed {
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
        let _ = self.hub.requests.send(Request::Unwatch(self.key));
    }
}

async fn route(mut tracer: Tracer, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut feeds: HashMap<InodeKey, mpsc::UnboundedSender<Feed>> = HashMap::new();
    let mut lost_seen = 0;
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                None => return, // every Hub handle is gone
                Some(Request::Watch(key, feed, done)) => {
                    let result = tracer.watch(key);
                    if result.is_ok() {
                        feeds.insert(key, feed);
                    }
                    let _ = done.send(result);
                }
                Some(Request::Unwatch(key)) => {
                    feeds.remove(&key);
                    if let Err(e) = tracer.unwatch(key) {
                        log::warn!("{e:#}");
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
