//! Storm control: how often passes may run, and how much device time their region creations
//! may take.
//!
//! Each `@stats_create` suspends the device until its in-flight IO drains (dm_stats_create
//! runs under dm_internal_suspend_fast): the monitored workload waits for as long as the
//! message takes, and then some: measured under random O_DIRECT growth, ~900 creations a
//! second cost the writer ~20 %, although each message returned in tens of microseconds.
//! And each pass costs CPU beside the writer. So three budgets, each a token bucket that
//! refills with time:
//! - passes: [`PASS_BURST`] at once after a quiet spell, then [`PASS_RATE`] a second;
//! - creations: [`CREATION_BURST`] at once, then [`CREATION_RATE`] a second;
//! - device time: at most [`DEVICE_SHARE`] of the wall clock inside `@stats_create`, with a
//!   burst of [`DEVICE_BURST`]; this one adapts to the device: one whose suspends take long
//!   (much IO in flight) affords fewer creations.
//!
//! An isolated growth finds all full and is mapped at once. In a storm, a pass that is due
//! waits until every budget allows it; the events that arrive meanwhile join that pass, so
//! a storm of N allocations costs far fewer than N passes, and its new regions are fewer and
//! larger (gaps that fill up meanwhile join, and fuse with regions that counted nothing).
//!
//! A pass may overdraw the creation budgets (it creates what its plan needs), but by a bounded
//! debt: however costly one pass was, the next waits at most 5 s. Passes that look at the
//! group after another process changed regions are not paced at all (a deleted group must
//! stop its daemon at once).
//!
//! What pacing cannot know: how long the storm lasts. A burst of writes just larger than the
//! pass budget waits up to 1 / PASS_RATE for its last region.
use std::time::{Duration, Instant};

/// Passes that may run back to back after a quiet spell.
pub const PASS_BURST: f64 = 8.0;
/// Passes a second under a sustained storm.
pub const PASS_RATE: f64 = 25.0;
/// Region creations that may run back to back after a quiet spell.
pub const CREATION_BURST: f64 = 25.0;
/// Region creations a second under a sustained storm.
pub const CREATION_RATE: f64 = 50.0;
/// Share of the wall clock that region creations may keep the device suspended.
pub const DEVICE_SHARE: f64 = 0.05;
/// Device time that may be spent at once after a quiet spell.
pub const DEVICE_BURST: Duration = Duration::from_millis(50);
/// How far one costly pass may overdraw the device budget (the next waits at most 5 s).
pub const DEVICE_DEBT: Duration = Duration::from_millis(250);

/// A budget that refills at `rate` a second up to `cap`. Spending may overdraw it down to
/// `-debt`; it allows spending again once it holds `need`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    cap: f64,
    rate: f64,
    need: f64,
    debt: f64,
    at: Instant,
}

impl Bucket {
    fn full(cap: f64, rate: f64, need: f64, debt: f64, now: Instant) -> Self {
        Self {
            tokens: cap,
            cap,
            rate,
            need,
            debt,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.cap);
        self.at = now;
    }

    /// When the budget holds what a spending needs (`now` if it does).
    fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= self.need {
            now
        } else {
            now + Duration::from_secs_f64((self.need - self.tokens) / self.rate)
        }
    }

    fn spend(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - amount).max(-self.debt);
    }
}

#[derive(Debug)]
pub struct Pacer {
    passes: Bucket,
    creations: Bucket,
    /// Seconds of device suspension.
    device: Bucket,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Pacer {
    pub fn new(now: Instant) -> Self {
        Self {
            // A pass needs a whole pass; creations may go while any device time is left.
            passes: Bucket::full(PASS_BURST, PASS_RATE, 1.0, PASS_BURST, now),
            creations: Bucket::full(CREATION_BURST, CREATION_RATE, 0.0, 5.0 * CREATION_RATE, now),
            device: Bucket::full(
                DEVICE_BURST.as_secs_f64(),
                DEVICE_SHARE,
                0.0,
                DEVICE_DEBT.as_secs_f64(),
                now,
            ),
        }
    }

    /// When the next pass may run: `now` unless a budget is spent.
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.passes
            .ready_at(now)
            .max(self.creations.ready_at(now))
            .max(self.device.ready_at(now))
    }

    /// Charges a pass, the regions it created and the device time they took.
    pub fn charge(&mut self, created: usize, creating: Duration, now: Instant) {
        self.passes.spend(1.0, now);
        self.creations.spend(created as f64, now);
        self.device.spend(creating.as_secs_f64(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_passes_go_at_once_and_a_storm_runs_at_the_pass_rate() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        for _ in 0..PASS_BURST as usize {
            assert_eq!(pacer.ready_at(t0), t0);
            pacer.charge(0, Duration::ZERO, t0);
        }
        let wait = pacer.ready_at(t0) - t0;
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs_f64(1.0 / PASS_RATE));
        // A minute later the burst is back, and no more than the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..PASS_BURST as usize {
            assert_eq!(pacer.ready_at(later), later);
            pacer.charge(0, Duration::ZERO, later);
        }
        assert!(pacer.ready_at(later) > later);
    }

    #[test]
    fn a_pass_that_created_many_regions_waits_for_the_creation_rate() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        pacer.charge(CREATION_BURST as usize + 50, Duration::ZERO, t0);
        let wait = pacer.ready_at(t0) - t0;
        let expected = Duration::from_secs_f64(50.0 / CREATION_RATE);
        assert!(
            wait.abs_diff(expected) < Duration::from_millis(5),
            "{wait:?}"
        );
        // However many: at most 5 s.
        pacer.charge(100_000, Duration::ZERO, t0);
        assert!(pacer.ready_at(t0) - t0 <= Duration::from_secs(5) + Duration::from_millis(1));
    }

    #[test]
    fn one_costly_pass_delays_the_next_by_a_bounded_time() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        pacer.charge(0, Duration::from_secs(60), t0);
        let wait = pacer.ready_at(t0) - t0;
        let most = Duration::from_secs_f64(DEVICE_DEBT.as_secs_f64() / DEVICE_SHARE);
        assert!(wait <= most + Duration::from_millis(1), "{wait:?}");
    }

    #[test]
    fn costly_creations_wait_for_their_share_of_device_time() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        pacer.charge(0, DEVICE_BURST + Duration::from_millis(10), t0);
        let wait = pacer.ready_at(t0) - t0;
        let expected = Duration::from_secs_f64(0.010 / DEVICE_SHARE);
        assert!(
            wait.abs_diff(expected) < Duration::from_millis(5),
            "{wait:?}"
        );
        assert_eq!(pacer.ready_at(t0 + wait), t0 + wait);
    }
}
