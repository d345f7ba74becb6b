//! What the IO probe needs to know about dm's structures on the running kernel: struct offsets
//! from the kernel's BTF (dm-mod's own BTF for `struct mapped_device`, which lives in a private
//! header), the meaning of `dm_stats_account_io`'s time argument (renamed between releases:
//! start_time, duration_jiffies, duration_ns) and the jiffy length from the kernel's config.
use std::path::Path;

use anyhow::{Context as _, bail};
use btf_rs::{Btf, Type};
use filemapd_common::{DmLayout, time_arg};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const DM_MOD: &str = "/sys/kernel/btf/dm_mod";

/// Reads the layout; fails (with the reason) when dm-mod is not loaded or has no BTF.
pub fn read() -> anyhow::Result<DmLayout> {
    let base = Btf::from_file(VMLINUX).with_context(|| format!("reading {VMLINUX}"))?;
    let dm = if Path::new(DM_MOD).exists() {
        Btf::from_split_file(DM_MOD, &base).with_context(|| format!("reading {DM_MOD}"))?
    } else {
        // dm-mod built into the kernel: its types are in vmlinux.
        Btf::from_file(VMLINUX)?
    };
    let stats_in_md = member_offset(&dm, "mapped_device", "stats")?;
    let disk_in_md = member_offset(&dm, "mapped_device", "disk")?;
    let major_in_disk = member_offset(&base, "gendisk", "major")?;
    let first_minor_in_disk = member_offset(&base, "gendisk", "first_minor")?;
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
    fn reads_hz_not_its_neighbours() {
        let config = "CONFIG_HZ_250=y\n# CONFIG_HZ_1000 is not set\nCONFIG_HZ=250\n";
        assert_eq!(config_hz(config), Some(250));
        assert_eq!(config_hz("CONFIG_HZ_250=y\n"), None);
    }
}
