//! Where the log goes: to stderr while the daemon is attached to whoever started it (so that
//! a refused start is seen there), to syslog once it has detached (on systemd hosts journald
//! reads /dev/log). lvm2's daemon logs nothing at verbose 0; filemapd keeps warnings and
//! errors there, and adds info at 1, debug at 2, trace at 3.
use std::sync::OnceLock;

use log::{Log, Metadata, Record};
use syslog::{BasicLogger, Facility, Formatter3164};

struct DaemonLog {
    stderr: env_logger::Logger,
    syslog: OnceLock<BasicLogger>,
}

impl Log for DaemonLog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.stderr.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.stderr.matches(record) {
            return;
        }
        match self.syslog.get() {
            Some(syslog) => syslog.log(record),
            None => self.stderr.log(record),
        }
    }

    fn flush(&self) {
        self.stderr.flush();
    }
}

static LOG: OnceLock<&'static DaemonLog> = OnceLock::new();

/// Logs to stderr at the level `verbose` asks for (RUST_LOG overrides it).
pub fn init(verbose: u8) {
    let level = ["warn", "info", "debug", "trace"][usize::from(verbose.min(3))];
    let stderr = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .build();
    log::set_max_level(stderr.filter());
    let daemon_log: &'static DaemonLog = Box::leak(Box::new(DaemonLog {
        stderr,
        syslog: OnceLock::new(),
    }));
    if log::set_logger(daemon_log).is_ok() {
        let _ = LOG.set(daemon_log);
    }
}

/// After detaching: log to syslog as `process[pid]` (facility daemon) from now on. Returns
/// why not when nothing listens on /dev/log (the log then goes where stderr goes).
pub fn detach(process: &str) -> Result<(), String> {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: process.to_string(),
        pid: std::process::id(),
    };
    let syslog = syslog::unix(formatter).map_err(|e| e.to_string())?;
    let log = LOG.get().ok_or("the log is not set up")?;
    let _ = log.syslog.set(BasicLogger::new(syslog));
    Ok(())
}
