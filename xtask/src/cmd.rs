//! Running commands, with errors that say which command failed.
use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};

/// Runs a command with inherited output; fails unless it exits 0.
pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

/// Runs a command with its output (stdout and stderr) appended to `log`: for installers whose
/// progress output nobody reads. On failure the error quotes the log's last lines.
pub fn logged(cmd: &mut Command, log: &std::path::Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let status = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        anyhow::bail!(
            "{cmd:?} failed ({status}); the end of {}:\n{}",
            log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    Ok(())
}

/// Runs a command; its stdout (stderr passes through), or an error if it fails.
pub fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed ({})", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a command can be started and exits 0 (its output discarded).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_failure_quotes_the_end_of_its_log() {
        let log = std::env::temp_dir().join(format!("xtask-logged-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        logged(Command::new("sh").args(["-c", "echo quiet"]), &log).unwrap();
        let err = logged(
            Command::new("sh").args(["-c", "echo why >&2; exit 3"]),
            &log,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("why") && err.contains("quiet"), "{err}");
        std::fs::remove_file(&log).unwrap();
    }
}
