//! lvm2's own dmfilemapd, built from Debian's lvm2 source package (2.03.16, the source of the
//! dmstats 1.02.185 in the VM), for the bench to run beside filemapd. Built outside the
//! repository, under [`BUILD_ROOT`], and never committed; a second run finds it built. The VM
//! does not see /var (virtme-ng lays tmpfs over it), so the daemon and its libdevmapper are
//! copied into the workspace's target directory (build output, ignored by git).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Where the source is unpacked and built.
pub const BUILD_ROOT: &str = "/var/cache/filemapd-bench";
/// What `./configure` needs beyond the compilers; `dpkg-dev` unpacks the source package.
const BUILD_PACKAGES: &[&str] = &["dpkg-dev", "libaio-dev", "libblkid-dev", "pkg-config"];
/// A deb-src twin of Debian's own entry, written only when no source entry exists.
const DEB_SRC_ENTRY: &str = "/etc/apt/sources.list.d/filemapd-deb-src.sources";

/// lvm2's daemon and the directory of the libdevmapper it was built with (LD_LIBRARY_PATH).
pub struct Reference {
    pub daemon: PathBuf,
    pub lib_dir: PathBuf,
}

pub fn build() -> anyhow::Result<Reference> {
    let built = match built()? {
        Some(found) => found,
        None => build_from_source()?,
    };
    let dir = cmd::workspace_root().join("target/lvm2-reference");
    fs::create_dir_all(&dir)?;
    let daemon = dir.join("dmfilemapd");
    fs::copy(&built.daemon, &daemon)?;
    fs::copy(
        built.lib_dir.join("libdevmapper.so.1.02"),
        dir.join("libdevmapper.so.1.02"),
    )?;
    Ok(Reference {
        daemon,
        lib_dir: dir,
    })
}

fn build_from_source() -> anyhow::Result<Reference> {
    eprintln!("bench: building lvm2's dmfilemapd from Debian's source under {BUILD_ROOT}");
    source_entry()?;
    cmd::status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(BUILD_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing lvm2's build dependencies")?;
    fs::create_dir_all(BUILD_ROOT)?;
    cmd::status(
        Command::new("apt-get")
            .args(["source", "-qq", "lvm2"])
            .current_dir(BUILD_ROOT),
    )
    .context("apt-get source lvm2")?;
    let tree = source_tree()?.context("apt-get source left no lvm2-* tree")?;
    cmd::status(
        Command::new("./configure")
            .args([
                "--enable-dmfilemapd",
                "--disable-selinux",
                "--disable-udev_sync",
                "--disable-udev_rules",
                "--disable-readline",
            ])
            .current_dir(&tree),
    )
    .context("configuring lvm2")?;
    cmd::status(
        Command::new("make")
            .args(["-j2", "-C", "libdm"])
            .current_dir(&tree),
    )
    .context("building lvm2's libdm and dmfilemapd")?;
    built()?.context("the lvm2 build produced no libdm/dm-tools/dmfilemapd")
}

fn source_tree() -> anyhow::Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(BUILD_ROOT) else {
        return Ok(None);
    };
    for entry in entries {
        let path = entry?.path();
        let is_tree = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("lvm2-"));
        if is_tree && path.is_dir() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn built() -> anyhow::Result<Option<Reference>> {
    let Some(tree) = source_tree()? else {
        return Ok(None);
    };
    let reference = Reference {
        daemon: tree.join("libdm/dm-tools/dmfilemapd"),
        lib_dir: tree.join("libdm"),
    };
    Ok(
        (reference.daemon.is_file() && reference.lib_dir.join("libdevmapper.so.1.02").exists())
            .then_some(reference),
    )
}

/// Makes `apt-get source` work: Debian's images list binary suites only.
fn source_entry() -> anyhow::Result<()> {
    // apt-cache showsrc exits 0 with nothing to say when no source entry is configured.
    let listed = Command::new("apt-cache").args(["showsrc", "lvm2"]).output();
    if listed.is_ok_and(|out| out.status.success() && !out.stdout.is_empty()) {
        return Ok(());
    }
    let debian = Path::new("/etc/apt/sources.list.d/debian.sources");
    let Ok(text) = fs::read_to_string(debian) else {
        bail!(
            "no Debian source entry to copy ({} missing): add a deb-src entry for lvm2",
            debian.display()
        );
    };
    fs::write(
        DEB_SRC_ENTRY,
        text.replace("Types: deb\n", "Types: deb-src\n"),
    )?;
    cmd::status(Command::new("apt-get").args(["update", "-qq"]))
}
