//! `cargo xtask install [--prefix DIR] [--etc DIR]`: the release build of filemapd in place on
//! this host, with what a VM host's operator needs around it:
//! - PREFIX/bin/filemapd, and PREFIX/sbin/dmfilemapd linking to it (Debian's dmstats looks for
//!   /sbin/dmfilemapd first, then PATH: an lvm2 daemon in /sbin would win);
//! - manual pages generated from the command line's own definitions, in PREFIX/share/man/man8;
//! - the systemd unit for `filemapd watch` in ETC/systemd/system (ETC defaults to /etc);
//! - the Grafana dashboard in PREFIX/share/filemapd;
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

/// Where the installed files go.
pub struct Layout {
    /// bin/, sbin/ and share/ go under it.
    pub prefix: PathBuf,
    /// filemapd/watch.toml goes under it.
    pub etc: PathBuf,
    /// The unit's directory.
    pub units: PathBuf,
    /// Writes land under this directory instead of at their paths (a package's tree); the
    /// installed files name their final paths all the same.
    pub stage: Option<PathBuf>,
}

impl Layout {
    /// An installation in place: the unit in ETC/systemd/system.
    pub fn in_place(prefix: &Path, etc: &Path) -> Self {
        Self {
            prefix: prefix.to_path_buf(),
            etc: etc.to_path_buf(),
            units: etc.join("systemd/system"),
            stage: None,
        }
    }

    /// Where a file of final path `path` is written.
    fn place(&self, path: &Path) -> PathBuf {
        match &self.stage {
            Some(stage) => stage.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.to_path_buf(),
        }
    }
}

/// The release build, then everything installed as `layout` says; returns the files written
/// (their final paths).
pub fn run(layout: &Layout) -> anyhow::Result<Vec<PathBuf>> {
    let root = cmd::workspace_root();
    cmd::status(
        Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "filemapd"])
            .current_dir(&root),
    )?;
    let built = root.join("target/release/filemapd");
    let bin = layout.prefix.join("bin");
    let sbin = layout.prefix.join("sbin");
    let man8 = layout.prefix.join("share/man/man8");
    let share = layout.prefix.join("share/filemapd");
    let config_dir = layout.etc.join("filemapd");
    for dir in [&bin, &sbin, &man8, &share, &layout.units, &config_dir] {
        let dir = layout.place(dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut installed = Vec::new();

    let filemapd = bin.join("filemapd");
    // A new inode, so that running daemons keep the binary they started with.
    let staged = layout.place(&bin.join(".filemapd.new"));
    fs::copy(&built, &staged).with_context(|| format!("copying to {}", staged.display()))?;
    fs::rename(&staged, layout.place(&filemapd))?;
    installed.push(filemapd.clone());
    let dmfilemapd = sbin.join("dmfilemapd");
    let _ = fs::remove_file(layout.place(&dmfilemapd));
    symlink(&filemapd, layout.place(&dmfilemapd))?;
    installed.push(dmfilemapd.clone());

    let pages = layout.place(&man8);
    cmd::stdout(
        Command::new(layout.place(&filemapd))
            .arg("man-pages")
            .arg(&pages),
    )?;
    for page in fs::read_dir(&pages)? {
        let name = page?.file_name();
        if name.to_string_lossy().starts_with("filemapd") {
            installed.push(man8.join(name));
        }
    }

    let unit = fs::read_to_string(root.join("dist/filemapd.service"))?
        .replace("@BINDIR@", &bin.to_string_lossy())
        .replace("@ETCDIR@", &layout.etc.to_string_lossy());
    let unit_path = layout.units.join("filemapd.service");
    fs::write(layout.place(&unit_path), unit)?;
    installed.push(unit_path.clone());

    // For Grafana to import (Dashboards > New > Import).
    let dashboard = share.join("grafana-dashboard.json");
    fs::copy(
        root.join("dist/grafana-dashboard.json"),
        layout.place(&dashboard),
    )?;
    installed.push(dashboard.clone());

    let config = config_dir.join("watch.toml");
    let kept = layout.place(&config).exists();
    if !kept {
        fs::copy(root.join("dist/watch.toml"), layout.place(&config))?;
        fs::set_permissions(layout.place(&config), fs::Permissions::from_mode(0o644))?;
    }
    installed.push(config.clone());

    println!("installed:");
    for path in [
        &filemapd,
        &dmfilemapd,
        &man8.join("filemapd*.8"),
        &unit_path,
        &dashboard,
    ] {
        println!("  {}", layout.place(path).display());
    }
    println!(
        "  {}{}",
        layout.place(&config).display(),
        if kept { " (kept as it was)" } else { "" }
    );
    // The unit no longer passes --metrics: a config kept from before names no address.
    if kept && !names_metrics_address(&fs::read_to_string(layout.place(&config))?) {
        println!(
            "note: {} names no metrics address: add `metrics = \"127.0.0.1:9731\"` (as dist/watch.toml has) to serve Prometheus",
            config.display()
        );
    }
    if layout.stage.is_none() {
        println!("then: systemctl daemon-reload && systemctl enable --now filemapd");
    }
    Ok(installed)
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
