//! What a monitor did over its life, logged when it stops: the figures a storm test and an
//! operator read (how many events became how many passes, regions made and removed).
use std::fmt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Allocation or removal events for the file.
    pub events: u64,
    /// Passes that looked at the file.
    pub passes: u64,
    /// Of those, passes that read and planned the whole file (the rest: a changed stretch).
    pub whole_passes: u64,
    /// Passes held back because region creations had spent their device-time budget.
    pub paced: u64,
    /// Passes that created only part of what their plan needed (storm control) and left the
    /// rest to later passes.
    pub deferred: u64,
    pub created: u64,
    pub deleted: u64,
    /// Regions replaced by a longer one because they had counted nothing yet.
    pub fused: u64,
    /// `@stats_*` messages the updates sent.
    pub dm_messages: u64,
    /// Times the kernel's ring buffer overflowed and the whole file was read again.
    pub lost_rescans: u64,
    /// Not over its life but now: runs of the file's sectors that the kernel's sector map had
    /// no room for at the last pass (their IO goes uncounted).
    pub uncounted_runs: u64,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} events, {} passes ({} of the whole file), {} paced, {} deferred, {} regions created, {} deleted ({} fused into longer ones), {} dm messages, {} rescans after lost events",
            self.events,
            self.passes,
            self.whole_passes,
            self.paced,
            self.deferred,
            self.created,
            self.deleted,
            self.fused,
            self.dm_messages,
            self.lost_rescans
        )
    }
}
