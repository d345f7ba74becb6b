//! `filemapd trace` as a child process: its JSON lines as they come, and its log.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::Duration,
};

use serde_json::Value;

use crate::daemon::filemapd_binary;

pub struct TraceRun {
    child: Child,
    lines: mpsc::Receiver<Value>,
    log: Option<JoinHandle<Vec<String>>>,
    /// Every line received so far.
    pub seen: Vec<Value>,
}

impl TraceRun {
    /// `filemapd trace EXTRA... FILE`.
    pub fn start(extra: &[&str], file: &Path) -> TraceRun {
        let mut child = Command::new(filemapd_binary())
            .arg("trace")
            .args(extra)
            .arg(file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel::<Value>();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log =
            std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());
        TraceRun {
            child,
            lines,
            log: Some(log),
            seen: Vec::new(),
        }
    }

    /// The next line, within `timeout`; fails with `what` and the lines so far.
    pub fn next(&mut self, timeout: Duration, what: &str) -> Value {
        let line = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!(
                "no trace line: {what} ({e}); lines so far:\n{:#?}",
                self.seen
            )
        });
        self.seen.push(line.clone());
        line
    }

    /// Reads lines until one satisfies `wanted`; returns it.
    pub fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        loop {
            let line = self.next(timeout, what);
            if wanted(&line) {
                return line;
            }
        }
    }

    /// SIGTERM; the lines up to the `totals` line, whether it exited 0, and its log.
    pub fn stop(mut self) -> (Value, bool, Vec<String>) {
        crate::send_signal(self.child.id() as i32, nix::sys::signal::SIGTERM);
        let totals = self.until(Duration::from_secs(30), "the totals after SIGTERM", |l| {
            l["type"] == "totals"
        });
        let success = self.child.wait().unwrap().success();
        let log = self.log.take().unwrap().join().unwrap();
        (totals, success, log)
    }
}

impl Drop for TraceRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
