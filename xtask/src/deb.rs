//! `cargo xtask deb`: a Debian package of what `cargo xtask install` installs, laid out as a
//! package's files are (/usr/bin, /usr/sbin, /usr/share, the unit in /usr/lib/systemd/system,
//! /etc/filemapd/watch.toml as a conffile), built by dpkg-deb from a staged tree. Installing
//! it starts and enables nothing (the operator names the images first); removing it stops the
//! service; purging it also removes what the service and the operator left: the config, the
//! unit's enablement, /run/filemapd and the counters pinned under /sys/fs/bpf/filemapd.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{cmd, install};

/// Where the package and its file list are written.
pub fn output_dir() -> PathBuf {
    cmd::workspace_root().join("target/deb")
}

/// The final paths of the package's files, one a line, as `dpkg -L` should list them.
pub fn file_list() -> PathBuf {
    output_dir().join("filemapd.files")
}

/// Builds the package; returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    let out = output_dir();
    let tree = out.join("root");
    let _ = fs::remove_dir_all(&tree);
    let layout = install::Layout {
        prefix: "/usr".into(),
        etc: "/etc".into(),
        units: "/usr/lib/systemd/system".into(),
        stage: Some(tree.clone()),
    };
    let installed = install::run(&layout)?;

    let version = cmd::stdout(Command::new(tree.join("usr/bin/filemapd")).arg("--version"))?
        .split_whitespace()
        .nth(1)
        .context("filemapd --version printed no version")?
        .to_string();
    let arch = cmd::stdout(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let debian = tree.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    fs::write(
        debian.join("control"),
        control(&version, &arch, installed_kib(&tree)?),
    )?;
    fs::write(debian.join("conffiles"), "/etc/filemapd/watch.toml\n")?;
    for (name, script) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let path = debian.join(name);
        fs::write(&path, script)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }

    let deb = out.join(format!("filemapd_{version}_{arch}.deb"));
    cmd::status(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&tree)
            .arg(&deb),
    )?;
    let list: String = installed
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    fs::write(file_list(), list)?;
    Ok(deb)
}

fn control(version: &str, arch: &str, installed_kib: u64) -> String {
    format!(
        "Package: filemapd
Version: {version}
Architecture: {arch}
Maintainer: filemapd developers <root@localhost>
Installed-Size: {installed_kib}
Depends: libc6, libgcc-s1
Recommends: dmsetup
Section: admin
Priority: optional
Description: per-file IO counters for device-mapper (a dmfilemapd that follows extents)
 filemapd keeps a dmstats region group in step with the extents of one file, woken by
 the kernel's block-allocation tracepoints through eBPF, and can count each file's IO in
 the kernel without a region per extent. It installs as dmfilemapd, the daemon Debian's
 dmstats starts for `dmstats create --filemap`, and as a service (`filemapd watch`) that
 follows a VM host's images and serves their IO to Prometheus.
"
    )
}

/// The tree's size in KiB, as dpkg wants it in Installed-Size.
fn installed_kib(tree: &Path) -> anyhow::Result<u64> {
    let out = cmd::stdout(
        Command::new("du")
            .args(["-sk", "--exclude=DEBIAN"])
            .arg(tree),
    )?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")
}

/// After unpacking: systemd learns of the unit; nothing is started or enabled at a first
/// install (the config names no image yet). An upgrade restarts a running service, which
/// takes up again what it followed.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    if [ -n "$2" ] && systemctl is-active --quiet filemapd.service; then
        systemctl restart filemapd.service || true
    fi
fi
exit 0
"#;

/// Before removal (not an upgrade): the service stops while its binary is still there, and
/// the programs a stopped service leaves counting for its successor (pinned links) go.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop filemapd.service || true
fi
if [ "$1" = remove ]; then
    rm -rf /sys/fs/bpf/filemapd/*/links
fi
exit 0
"#;

/// After removal; at purge, what the service and the operator left behind goes too (dpkg
/// removes the conffile itself).
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -f /etc/systemd/system/multi-user.target.wants/filemapd.service
    rm -rf /run/filemapd /sys/fs/bpf/filemapd
    rmdir /etc/filemapd 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
exit 0
"#;
