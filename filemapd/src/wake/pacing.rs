//! Storm control: how often passes may run, and how much device time their region creations
//! may take.
//!
//! What a region costs, measured in the device-mapper VM (ext4, 256 MiB of random 64 KiB
//! O_DIRECT writes growing a file, Debian's 6.1 kernel):
//! - **while it exists**, every bio to the device: dm_stats_account_io walks the device's
//!   whole region list at the start and at the end of each bio. 1,400 regions of another
//!   file, none being created, made the writer 30–50 % slower. No pacing removes that cost:
//!   it follows the number of regions, i.e. how fragmented the mapped files are;
//! - **when it is created**, a device suspend: dm_stats_create runs under
//!   dm_internal_suspend_fast, which waits for the IO in flight. One pass that created 777
//!   regions back to back kept the writer stalled for 1.6 s;
//! - and memory: struct dm_stat holds a pointer per possible CPU (64 KiB with Debian's
//!   NR_CPUS=8192) and dm-stats refuses regions beyond a quarter of RAM: 2 GiB hold ~7,800
//!   regions, 8 GiB ~31,500.
//!
//! So two budgets, each a token bucket that refills with time:
//! - passes: [`PASS_BURST`] at once after a quiet spell, then [`PASS_RATE`] a second (each
//!   pass costs CPU beside the writer; events that arrive while a pass waits join it);
//! - device time: at most [`DEVICE_SHARE`] of the wall clock inside `@stats_create`, with a
//!   burst of [`DEVICE_BURST`]. A pass creates only as many regions as this budget buys at the
//!   cost creations had lately ([`Pacer::creation_allowance`]) and leaves the rest of its plan
//!   to later passes. The budget adapts to the device: while much IO is in flight, suspends
//!   take long and few regions are created; once the storm is over they are quick and the
//!   backlog goes fast.
//!
//! An isolated growth finds both full and is mapped at once. The price of a storm: IO to
//! blocks allocated during it is counted only once their region exists. Passes that look at
//! the group after another process changed regions are not paced at all (a deleted group must
//! stop its daemon at once).
use std::time::{Duration, Instant};

/// Passes that may run back to back after a quiet spell.
pub const PASS_BURST: f64 = 8.0;
/// Passes a second under a sustained storm.
pub const PASS_RATE: f64 = 25.0;
/// Share of the wall clock that region creations may keep the device suspended.
pub const DEVICE_SHARE: f64 = 0.05;
/// Device time that may be spent at once after a quiet spell.
pub const DEVICE_BURST: Duration = Duration::from_millis(50);
/// How far one costly pass may overdraw the device budget (the next waits at most 5 s).
pub const DEVICE_DEBT: Duration = Duration::from_millis(250);

/// Device time a pass may spend creating regions when the device did no IO since the previous
/// pass (a suspend then holds up nobody), without charging the budget.
pub const IDLE_BATCH: Duration = Duration::from_millis(500);
/// What one `@stats_create` is taken to cost until one has been measured.
const FIRST_CREATION_GUESS: Duration = Duration::from_millis(1);

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

    /// What the budget holds now (nothing while in debt).
    fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens.max(0.0)
    }

    fn spend(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - amount).max(-self.debt);
    }
}

#[derive(Debug)]
pub struct Pacer {
    passes: Bucket,
    /// Seconds of device suspension.
    device: Bucket,
    /// What one creation took lately (a moving average).
    per_creation: Duration,
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
            device: Bucket::full(
                DEVICE_BURST.as_secs_f64(),
                DEVICE_SHARE,
                0.0,
                DEVICE_DEBT.as_secs_f64(),
                now,
            ),
            per_creation: FIRST_CREATION_GUESS,
        }
    }

    /// How many regions the pass about to run may create: what the device-time budget holds
    /// now, at the cost creations had lately; on an idle device, an [`IDLE_BATCH`]'s worth.
    pub fn creation_allowance(&mut self, now: Instant, device_idle: bool) -> usize {
        let time = if device_idle {
            IDLE_BATCH.as_secs_f64()
        } else {
            self.device.available(now)
        };
        (time / self.per_creation.as_secs_f64()) as usize
    }

    /// When the next pass may run: `now` unless a budget is spent.
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.passes.ready_at(now).max(self.device.ready_at(now))
    }

    /// Charges a pass, the regions it created and the device time they took (free on an idle
    /// device).
    pub fn charge(&mut self, created: usize, creating: Duration, device_idle: bool, now: Instant) {
        self.passes.spend(1.0, now);
        // The cost that matters is a busy device's (an idle one's suspends are quicker).
        if !device_idle {
            self.device.spend(creating.as_secs_f64(), now);
            if created > 0 {
                self.per_creation = (self.per_creation * 3 + creating / created as u32) / 4;
            }
        }
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
            pacer.charge(0, Duration::ZERO, false, t0);
        }
        let wait = pacer.ready_at(t0) - t0;
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs_f64(1.0 / PASS_RATE));
        // A minute later the burst is back, and no more than the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..PASS_BURST as usize {
            assert_eq!(pacer.ready_at(later), later);
            pacer.charge(0, Duration::ZERO, false, later);
        }
        assert!(pacer.ready_at(later) > later);
    }

    #[test]
    fn one_costly_pass_delays_the_next_by_a_bounded_time() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        pacer.charge(0, Duration::from_secs(60), false, t0);
        let wait = pacer.ready_at(t0) - t0;
        let most = Duration::from_secs_f64(DEVICE_DEBT.as_secs_f64() / DEVICE_SHARE);
        assert!(wait <= most + Duration::from_millis(1), "{wait:?}");
    }

    #[test]
    fn the_allowance_is_what_the_device_budget_buys() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        // A full budget at the first guess of a creation's cost.
        assert_eq!(
            pacer.creation_allowance(t0, false),
            (DEVICE_BURST.as_secs_f64() / FIRST_CREATION_GUESS.as_secs_f64()) as usize
        );
        // Creations that took 20 ms each overdraw the device budget: none for now.
        pacer.charge(5, Duration::from_millis(100), false, t0);
        assert_eq!(pacer.creation_allowance(t0, false), 0);
        // Once the share has refilled the debt and some, a few (they cost more now).
        let later = t0 + Duration::from_secs(2);
        let allowance = pacer.creation_allowance(later, false);
        assert!((1..=20).contains(&allowance), "{allowance}");
        // On an idle device, a batch, and free.
        let batch = pacer.creation_allowance(later, true);
        assert!(batch > allowance, "{batch}");
        pacer.charge(batch, Duration::from_secs(1), true, later);
        assert_eq!(pacer.creation_allowance(later, false), allowance);
    }

    #[test]
    fn costly_creations_wait_for_their_share_of_device_time() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        pacer.charge(0, DEVICE_BURST + Duration::from_millis(10), false, t0);
        let wait = pacer.ready_at(t0) - t0;
        let expected = Duration::from_secs_f64(0.010 / DEVICE_SHARE);
        assert!(
            wait.abs_diff(expected) < Duration::from_millis(5),
            "{wait:?}"
        );
        assert_eq!(pacer.ready_at(t0 + wait), t0 + wait);
    }
}
