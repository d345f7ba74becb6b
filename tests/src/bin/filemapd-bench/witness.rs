//! The kernel's witness of region creations: bpftrace probes dm-stats' message handler and
//! reports each `@stats_create` that succeeded, with its range and the CLOCK_MONOTONIC time at
//! which the handler returned (the region counts IO from then on). The bench asks nothing of
//! dm while steps run: a witness that lists regions itself takes dm-stats' mutex, which the
//! monitor's creations need, and its CPU, which the monitor shares under emulation.
//!
//! It also times every message's handling per process: what a monitor's updates cost in
//! dm-stats itself, which no monitor can take off.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use filemapd::sectors::{SectorRange, difference, union};

/// `dm_stats_message(md, argc, argv, result, maxlen)` is dm-mod's entry for every `@stats_*`
/// message. The range is remembered per thread at entry and said at return with the result
/// (1: the region exists); every message's time in the handler is said with its process.
/// BEGIN runs once every probe is attached.
const SCRIPT: &str = r#"
BEGIN { printf("ready\n"); }
kprobe:dm_stats_message
{
    @entered[tid] = nsecs;
}
kprobe:dm_stats_message
/ arg1 >= 2 && str(*(uint64 *)arg2) == "@stats_create" /
{
    @range[tid] = str(*(uint64 *)(arg2 + 8));
}
kretprobe:dm_stats_message
/ @entered[tid] != 0 /
{
    printf("handled %d %llu\n", pid, nsecs - @entered[tid]);
    delete(@entered[tid]);
}
kretprobe:dm_stats_message
/ @range[tid] != "" /
{
    printf("created %llu %d %s\n", nsecs, retval, @range[tid]);
    delete(@range[tid]);
}
"#;

/// One region creation as the kernel saw it.
#[derive(Clone, Copy, Debug)]
struct Creation {
    /// CLOCK_MONOTONIC, ns: when the handler returned.
    at_ns: u64,
    range: SectorRange,
}

pub struct Witness {
    bpftrace: Child,
    lines: mpsc::Receiver<Creation>,
    /// Every creation said so far, in order.
    seen: Vec<Creation>,
    /// Per process: its messages' time in dm-stats' handler so far, ns.
    handled: Arc<Mutex<HashMap<u32, u64>>>,
}

impl Witness {
    /// Starts bpftrace and waits until its probes are attached. Panics with the reason when it
    /// cannot (the bench has no other witness to fall back on).
    pub fn start() -> Self {
        let mut bpftrace = Command::new("bpftrace")
            .args(["-B", "line", "-e", SCRIPT])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bpftrace, the latency witness (cargo xtask bench installs it)");
        let stdout = BufReader::new(bpftrace.stdout.take().unwrap());
        let (ready_tx, ready_rx) = mpsc::channel();
        let (tx, lines) = mpsc::channel();
        let handled = Arc::new(Mutex::new(HashMap::new()));
        let handled_by_reader = handled.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else if let Some((pid, ns)) = parse_handled(&line) {
                    *handled_by_reader.lock().unwrap().entry(pid).or_insert(0) += ns;
                } else if let Some(creation) = parse(&line)
                    && tx.send(creation).is_err()
                {
                    return;
                }
            }
        });
        // bpftrace compiles its script first: slow under emulation.
        ready_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("bpftrace never attached its probes to dm_stats_message");
        Witness {
            bpftrace,
            lines,
            seen: Vec::new(),
            handled,
        }
    }

    /// The time process `pid`'s dm-stats messages spent in the kernel's handler so far (as
    /// the witness has read it: call a little after the messages).
    pub fn handling(&self, pid: u32) -> Duration {
        Duration::from_nanos(self.handled.lock().unwrap().get(&pid).copied().unwrap_or(0))
    }

    /// Forgets the creations said so far (a new group, on another device, is measured next).
    pub fn forget(&mut self) {
        self.seen.clear();
        while self.lines.try_recv().is_ok() {}
    }

    /// When (CLOCK_MONOTONIC, ns) regions first covered every sector of `wanted` (sorted,
    /// disjoint), counting the regions in `before` (existing before the creations said since
    /// the last `forget`) as always there: 0 if they alone cover it. `None` if it is not
    /// covered within `limit`.
    pub fn covered_at(
        &mut self,
        wanted: &[SectorRange],
        before: &[SectorRange],
        limit: Duration,
    ) -> Option<u64> {
        let mut missing = difference(wanted, &union(before.to_vec()));
        if missing.is_empty() {
            return Some(0);
        }
        let deadline = Instant::now() + limit;
        let mut next = 0;
        loop {
            while next < self.seen.len() {
                let creation = self.seen[next];
                next += 1;
                missing = difference(&missing, &[creation.range]);
                if missing.is_empty() {
                    return Some(creation.at_ns);
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(creation) => self.seen.push(creation),
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("bpftrace, the witness, died"),
            }
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.bpftrace.kill();
        let _ = self.bpftrace.wait();
    }
}

/// `handled <pid> <ns>`: one message's time in the handler.
fn parse_handled(line: &str) -> Option<(u32, u64)> {
    let (pid, ns) = line.strip_prefix("handled ")?.split_once(' ')?;
    Some((pid.parse().ok()?, ns.parse().ok()?))
}

/// `created <ns> <result> <range>`, the range `<start>+<length>` or `-` (the whole device).
/// Failed creations (result other than 1) are left out.
fn parse(line: &str) -> Option<Creation> {
    let mut words = line.strip_prefix("created ")?.split(' ');
    let at_ns = words.next()?.parse().ok()?;
    if words.next()? != "1" {
        return None;
    }
    let range = match words.next()? {
        "-" => SectorRange::new(0, u64::MAX / 2),
        range => {
            let (start, len) = range.split_once('+')?;
            SectorRange::new(start.parse().ok()?, len.parse().ok()?)
        }
    };
    Some(Creation { at_ns, range })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_probes_lines() {
        let c = parse("created 123456789 1 2048+128").unwrap();
        assert_eq!(
            (c.at_ns, c.range),
            (123_456_789, SectorRange::new(2048, 128))
        );
        assert!(parse("created 5 -22 2048+128").is_none());
        assert_eq!(parse("created 5 1 -").unwrap().range.start, 0);
        assert!(parse("Attaching 3 probes...").is_none());
        assert_eq!(parse_handled("handled 42 1500"), Some((42, 1500)));
        assert!(parse_handled("created 5 1 -").is_none());
        assert!(parse("handled 42 1500").is_none());
    }
}
