//! What the kernel half's probes need to know of the running kernel's structures: for the bio
//! hook, offsets in the block layer's bios and block devices; for the IO probe on dm-stats'
//! accounting, struct offsets in dm (dm-mod's own BTF for `struct
//! mapped_device`, which lives in a private header), the meaning of `dm_stats_account_io`'s
//! time argument (renamed between releases: start_time, duration_jiffies, duration_ns) and
//! the jiffy length from the kernel's config; for the new-file probe, offsets in the VFS's
//! dentries, inodes and super blocks.
use std::path::Path;

use anyhow::{Context as _, bail};
use btf_rs::{Btf, Type};
use filemapd_common::{BioLayout, DmLayout, VfsLayout, time_arg};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const DM_MOD: &str = "/sys/kernel/btf/dm_mod";

/// Where the layout is kept between daemon starts. Reading it parses the kernel's whole BTF
/// (btf-rs: about 0.2 s on hardware, seconds under emulation) for six numbers that change
/// only with the kernel and dm-mod; every daemon of the host starts with it (dmstats
/// launches one per group). /run is a tmpfs, gone at reboot; the directory is root's.
const CACHE: &str = "/run/filemapd/kernel-layout";

/// The layouts, read together (one parse of the kernel's BTF).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub dm: DmLayout,
    pub vfs: VfsLayout,
    pub bio: BioLayout,
}

impl KernelLayout {
    /// Plausible offsets of no real kernel, so that the verifier walks the probes whole: for
    /// verifying them where device-mapper is absent, never for running. The fields a probe
    /// checks before it does anything must be non-zero: `disk_in_md` (the IO probe on
    /// dm-stats), `bdev_in_bio` (the bio hook), `ino_in_inode` (the new-file probes).
    pub fn made_up() -> Self {
        Self {
            dm: DmLayout {
                stats_in_md: 512,
                disk_in_md: 64,
                major_in_disk: 0,
                first_minor_in_disk: 4,
                time_arg: time_arg::START_JIFFIES,
                ns_per_jiffy: 4_000_000,
            },
            vfs: VfsLayout {
                parent_in_dentry: 24,
                inode_in_dentry: 48,
                mode_in_inode: 0,
                ino_in_inode: 64,
                sb_in_inode: 40,
                generation_in_inode: 200,
                dev_in_sb: 16,
                _pad: 0,
            },
            bio: BioLayout {
                bdev_in_bio: 8,
                opf_in_bio: 16,
                sector_in_bio: 32,
                size_in_bio: 40,
                dev_in_bdev: 72,
                _pad: 0,
            },
        }
    }
}

/// The layout, from the cache when it was written for this boot and this dm-mod, else from
/// the kernel's BTF (then cached). Fails (with the reason) when dm-mod is not loaded or the
/// kernel has no BTF; dm's part is all zero when dm-mod has none.
pub fn read() -> anyhow::Result<KernelLayout> {
    // Built in or loaded, dm-mod shows here (it has parameters): without it there is nothing
    // to count, and no reason to parse the kernel's BTF.
    if !Path::new("/sys/module/dm_mod").exists() {
        bail!("dm-mod is not loaded");
    }
    let key = cache_key();
    let cached = key.as_deref().and_then(|key| {
        let text = std::fs::read_to_string(CACHE).ok()?;
        parse_cache(&text, key)
    });
    if let Some(layout) = cached {
        return Ok(layout);
    }
    let layout = read_btf()?;
    if let Some(key) = key
        && let Err(e) = write_cache(&key, &layout)
    {
        log::debug!("keeping dm's layout in {CACHE}: {e:#}");
    }
    Ok(layout)
}

/// What the layout depends on: this boot (the kernel), and dm-mod's BTF as loaded now.
fn cache_key() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let dm_mod = std::fs::metadata(DM_MOD).map_or(0, |m| m.len());
    Some(format!("boot {} dm_mod {dm_mod}", boot.trim()))
}

fn format_cache(key: &str, l: &KernelLayout) -> String {
    let (d, v, b) = (&l.dm, &l.vfs, &l.bio);
    format!(
        "{key}\n{} {} {} {} {} {}\n{} {} {} {} {} {} {}\n{} {} {} {} {}\n",
        d.stats_in_md,
        d.disk_in_md,
        d.major_in_disk,
        d.first_minor_in_disk,
        d.time_arg,
        d.ns_per_jiffy,
        v.parent_in_dentry,
        v.inode_in_dentry,
        v.mode_in_inode,
        v.ino_in_inode,
        v.sb_in_inode,
        v.generation_in_inode,
        v.dev_in_sb,
        b.bdev_in_bio,
        b.opf_in_bio,
        b.sector_in_bio,
        b.size_in_bio,
        b.dev_in_bdev,
    )
}

/// The cached layout, when the cache was written under `key`.
fn parse_cache(text: &str, key: &str) -> Option<KernelLayout> {
    let mut lines = text.lines();
    if lines.next()? != key {
        return None;
    }
    let mut numbers = |count: usize| -> Option<Vec<u32>> {
        let n: Vec<u32> = lines
            .next()?
            .split_whitespace()
            .map(|n| n.parse().ok())
            .collect::<Option<_>>()?;
        (n.len() == count).then_some(n)
    };
    let d = numbers(6)?;
    let v = numbers(7)?;
    let b = numbers(5)?;
    Some(KernelLayout {
        dm: DmLayout {
            stats_in_md: d[0],
            disk_in_md: d[1],
            major_in_disk: d[2],
            first_minor_in_disk: d[3],
            time_arg: d[4],
            ns_per_jiffy: d[5],
        },
        vfs: VfsLayout {
            parent_in_dentry: v[0],
            inode_in_dentry: v[1],
            mode_in_inode: v[2],
            ino_in_inode: v[3],
            sb_in_inode: v[4],
            generation_in_inode: v[5],
            dev_in_sb: v[6],
            _pad: 0,
        },
        bio: BioLayout {
            bdev_in_bio: b[0],
            opf_in_bio: b[1],
            sector_in_bio: b[2],
            size_in_bio: b[3],
            dev_in_bdev: b[4],
            _pad: 0,
        },
    })
}

/// Written whole under another name, then renamed: a reader never sees half of it.
fn write_cache(key: &str, layout: &KernelLayout) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let path = Path::new(CACHE);
    let dir = path.parent().context("the cache has a directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let partial = dir.join(format!(".kernel-layout.{}", std::process::id()));
    std::fs::write(&partial, format_cache(key, layout))?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// The layouts the bio hook and the new-file probes need, from the kernel's own BTF alone
/// (none of dm's, which stays all zero), uncached: for tests that count the IO of plain
/// block devices, where device-mapper is absent.
pub fn read_for_any_device() -> anyhow::Result<KernelLayout> {
    let base = Btf::from_file(VMLINUX).with_context(|| format!("reading {VMLINUX}"))?;
    let (vfs, bio) = read_vmlinux(&base)?;
    Ok(KernelLayout {
        dm: DmLayout::default(),
        vfs,
        bio,
    })
}

/// Reads the layout from the kernel's BTF.
fn read_btf() -> anyhow::Result<KernelLayout> {
    let base = Btf::from_file(VMLINUX).with_context(|| format!("reading {VMLINUX}"))?;
    let (vfs, bio) = read_vmlinux(&base)?;
    // Only the probe on dm-stats' accounting needs dm's layout; the bio hook counts without.
    let dm = read_dm(&base).unwrap_or_else(|e| {
        log::info!("dm-mod's layout unknown, only the bio hook can count: {e:#}");
        DmLayout::default()
    });
    Ok(KernelLayout { dm, vfs, bio })
}

/// dm's layout, from dm-mod's BTF (split from the kernel's, `base`).
fn read_dm(base: &Btf) -> anyhow::Result<DmLayout> {
    let dm = if Path::new(DM_MOD).exists() {
        Btf::from_split_file(DM_MOD, base).with_context(|| format!("reading {DM_MOD}"))?
    } else {
        // dm-mod built into the kernel: its types are in vmlinux.
        Btf::from_file(VMLINUX)?
    };
    let stats_in_md = member_offset(&dm, "mapped_device", "stats")?;
    let disk_in_md = member_offset(&dm, "mapped_device", "disk")?;
    let major_in_disk = member_offset(base, "gendisk", "major")?;
    let first_minor_in_disk = member_offset(base, "gendisk", "first_minor")?;
    let time_arg = match parameter_name(&dm, "dm_stats_account_io", 5)?.as_str() {
        "start_time" => time_arg::START_JIFFIES,
        "duration_jiffies" => time_arg::DURATION_JIFFIES,
        "duration_ns" => time_arg::DURATION_NS,
        other => {
            log::debug!(
                "dm_stats_account_io's time argument is called {other:?}: durations read 0"
            );
            time_arg::UNKNOWN
        }
    };
    let ns_per_jiffy = match kernel_hz() {
        Some(hz) => (1_000_000_000 / hz) as u32,
        None => {
            log::debug!("CONFIG_HZ unknown: durations of uncovered IO read 0");
            0
        }
    };
    Ok(DmLayout {
        stats_in_md,
        disk_in_md,
        major_in_disk,
        first_minor_in_disk,
        time_arg,
        ns_per_jiffy,
    })
}

/// The VFS's and the block layer's layouts, from the kernel's own BTF.
fn read_vmlinux(base: &Btf) -> anyhow::Result<(VfsLayout, BioLayout)> {
    let vfs = VfsLayout {
        parent_in_dentry: member_offset(base, "dentry", "d_parent")?,
        inode_in_dentry: member_offset(base, "dentry", "d_inode")?,
        mode_in_inode: member_offset(base, "inode", "i_mode")?,
        ino_in_inode: member_offset(base, "inode", "i_ino")?,
        sb_in_inode: member_offset(base, "inode", "i_sb")?,
        generation_in_inode: member_offset(base, "inode", "i_generation")?,
        dev_in_sb: member_offset(base, "super_block", "s_dev")?,
        _pad: 0,
    };
    let iter_in_bio = member_offset(base, "bio", "bi_iter")?;
    let bio = BioLayout {
        bdev_in_bio: member_offset(base, "bio", "bi_bdev")?,
        opf_in_bio: member_offset(base, "bio", "bi_opf")?,
        sector_in_bio: iter_in_bio + member_offset(base, "bvec_iter", "bi_sector")?,
        size_in_bio: iter_in_bio + member_offset(base, "bvec_iter", "bi_size")?,
        dev_in_bdev: member_offset(base, "block_device", "bd_dev")?,
        _pad: 0,
    };
    Ok((vfs, bio))
}

/// The byte offset of a (non-bitfield) member of a struct.
fn member_offset(btf: &Btf, structure: &str, member: &str) -> anyhow::Result<u32> {
    for candidate in btf.resolve_types_by_name(structure)? {
        let Type::Struct(s) = candidate else { continue };
        for m in &s.members {
            if btf.resolve_name(m)? == member {
                if m.bitfield_size().is_some_and(|size| size != 0) || m.bit_offset() % 8 != 0 {
                    bail!("{structure}.{member} is a bitfield");
                }
                return Ok(m.bit_offset() / 8);
            }
        }
        bail!("struct {structure} has no member {member}");
    }
    bail!("no struct {structure} in the kernel's BTF")
}

/// The name of a function's parameter (0-based), as BTF records it.
fn parameter_name(btf: &Btf, function: &str, index: usize) -> anyhow::Result<String> {
    for candidate in btf.resolve_types_by_name(function)? {
        let Type::Func(func) = candidate else {
            continue;
        };
        let Type::FuncProto(proto) = btf.resolve_chained_type(&func)? else {
            bail!("{function} has no prototype in BTF");
        };
        let parameter = proto
            .parameters
            .get(index)
            .with_context(|| format!("{function} has fewer than {} parameters", index + 1))?;
        return Ok(btf.resolve_name(parameter)?);
    }
    bail!("no function {function} in the kernel's BTF")
}

/// CONFIG_HZ of the running kernel, from its config file (Debian ships one in /boot).
fn kernel_hz() -> Option<u64> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let path = format!("/boot/config-{}", release.trim());
    let text = std::fs::read_to_string(path).ok()?;
    config_hz(&text)
}

fn config_hz(config: &str) -> Option<u64> {
    config
        .lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))
        .and_then(|value| value.trim().parse().ok())
        .filter(|&hz| hz > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_serves_its_own_key_only() {
        let layout = KernelLayout {
            dm: DmLayout {
                stats_in_md: 424,
                disk_in_md: 184,
                major_in_disk: 0,
                first_minor_in_disk: 4,
                time_arg: 1,
                ns_per_jiffy: 4_000_000,
            },
            vfs: VfsLayout {
                parent_in_dentry: 24,
                inode_in_dentry: 48,
                mode_in_inode: 0,
                ino_in_inode: 64,
                sb_in_inode: 40,
                generation_in_inode: 448,
                dev_in_sb: 16,
                _pad: 0,
            },
            bio: BioLayout {
                bdev_in_bio: 8,
                opf_in_bio: 16,
                sector_in_bio: 32,
                size_in_bio: 40,
                dev_in_bdev: 76,
                _pad: 0,
            },
        };
        let text = format_cache("boot a dm_mod 7", &layout);
        assert_eq!(parse_cache(&text, "boot a dm_mod 7"), Some(layout));
        assert_eq!(parse_cache(&text, "boot b dm_mod 7"), None);
        assert_eq!(
            parse_cache("boot a dm_mod 7\n1 2 3\n", "boot a dm_mod 7"),
            None
        );
        assert_eq!(parse_cache("", "boot a dm_mod 7"), None);
    }

    #[test]
    fn reads_hz_not_its_neighbours() {
        let config = "CONFIG_HZ_250=y\n# CONFIG_HZ_1000 is not set\nCONFIG_HZ=250\n";
        assert_eq!(config_hz(config), Some(250));
        assert_eq!(config_hz("CONFIG_HZ_250=y\n"), None);
    }
}
