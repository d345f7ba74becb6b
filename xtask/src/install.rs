//! `cargo xtask install [--prefix DIR] [--etc DIR]`: the release build of filemapd in place on
//! this host, with what a VM host's operator needs around it:
//! - PREFIX/bin/filemapd, and PREFIX/sbin/dmfilemapd linking to it (Debian's dmstats looks for
//!   /sbin/dmfilemapd first, then PATH: an lvm2 daemon in /sbin would win);
//! - manual pages generated from the command line's own definitions, in PREFIX/share/man/man8;
//! - the systemd unit for `filemapd watch` in ETC/systemd/system (ETC defaults to /etc);
//! - ETC/filemapd/watch.toml, a config that names nothing yet (commented examples), unless
//!   one exists.
use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::cmd;

pub fn run(prefix: &Path, etc: &Path) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    cmd::status(
        Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "filemapd"])
            .current_dir(&root),
    )?;
    let built = root.join("target/release/filemapd");
    let bin = prefix.join("bin");
    let sbin = prefix.join("sbin");
    let man8 = prefix.join("share/man/man8");
    let units = etc.join("systemd/system");
    let config_dir = etc.join("filemapd");
    for dir in [&bin, &sbin, &man8, &units, &config_dir] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let filemapd = bin.join("filemapd");
    // A new inode, so that running daemons keep the binary they started with.
    let staged = bin.join(".filemapd.new");
    fs::copy(&built, &staged).with_context(|| format!("copying to {}", staged.display()))?;
    fs::rename(&staged, &filemapd)?;
    let dmfilemapd = sbin.join("dmfilemapd");
    let _ = fs::remove_file(&dmfilemapd);
    symlink(&filemapd, &dmfilemapd)?;

    cmd::stdout(Command::new(&filemapd).arg("man-pages").arg(&man8))?;

    let unit = fs::read_to_string(root.join("dist/filemapd.service"))?
        .replace("@BINDIR@", &bin.to_string_lossy())
        .replace("@ETCDIR@", &etc.to_string_lossy());
    let unit_path = units.join("filemapd.service");
    fs::write(&unit_path, unit)?;

    // For Grafana to import (Dashboards > New > Import).
    let share = prefix.join("share/filemapd");
    fs::create_dir_all(&share).with_context(|| format!("creating {}", share.display()))?;
    let dashboard = share.join("grafana-dashboard.json");
    fs::copy(root.join("dist/grafana-dashboard.json"), &dashboard)?;

    let config = config_dir.join("watch.toml");
    let kept = config.exists();
    if !kept {
        fs::copy(root.join("dist/watch.toml"), &config)?;
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644))?;
    }

    println!("installed:");
    for path in [
        &filemapd,
        &dmfilemapd,
        &man8.join("filemapd*.8"),
        &unit_path,
        &dashboard,
    ] {
        println!("  {}", path.display());
    }
    println!(
        "  {}{}",
        config.display(),
        if kept { " (kept as it was)" } else { "" }
    );
    // The unit no longer passes --metrics: a config kept from before names no address.
    if kept && !names_metrics_address(&fs::read_to_string(&config)?) {
        println!(
            "note: {} names no metrics address: add `metrics = \"127.0.0.1:9731\"` (as dist/watch.toml has) to serve Prometheus",
            config.display()
        );
    }
    println!("then: systemctl daemon-reload && systemctl enable --now filemapd");
    Ok(())
}

/// Whether a TOML config sets `metrics` (a line of its own, not commented out).
fn names_metrics_address(config: &str) -> bool {
    config.lines().any(|line| {
        line.trim_start()
            .strip_prefix("metrics")
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

/// Where `cargo xtask test` installs to check the installation: under target/.
pub fn staging_root() -> PathBuf {
    cmd::workspace_root().join("target/install-check")
}
