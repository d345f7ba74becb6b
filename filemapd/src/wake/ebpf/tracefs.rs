//! Reading tracepoint record layouts from tracefs `format` files. Offsets move between kernel
//! versions (and with config), so the kernel half is told them at load time.
use std::{fs, path::PathBuf};

use anyhow::{Context as _, bail};
use filemapd_common::Field;

/// Where tracefs is mounted, if it is: FILEMAPD_TRACEFS names a non-standard mount point.
pub fn root() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FILEMAPD_TRACEFS") {
        let dir = PathBuf::from(dir);
        if dir.join("events").is_dir() {
            return Ok(dir);
        }
        bail!("FILEMAPD_TRACEFS={} is not a tracefs mount", dir.display());
    }
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let dir = PathBuf::from(dir);
        if dir.join("events").is_dir() {
            return Ok(dir);
        }
    }
    bail!(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing; \
         `mount -t tracefs nodev /sys/kernel/tracing` mounts it)"
    )
}

/// The `format` description of one tracepoint, or `None` when the kernel lacks it.
pub fn read_format(category: &str, name: &str) -> anyhow::Result<Option<String>> {
    let path = root()?
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Finds a field in a format description: lines like
/// `field:dev_t dev; offset:8; size:4; signed:0;` (tab-separated).
pub fn find_field(format: &str, name: &str) -> Option<Field> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        // The name is the last word of the declaration, minus any array suffix.
        let field_name = decl.rsplit([' ', '*']).next()?.split('[').next()?;
        if field_name != name {
            return None;
        }
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        Some(Field {
            offset: offset?,
            size: size?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXT4_ALLOCATE_BLOCKS_6_18: &str = "name: ext4_allocate_blocks
ID: 1234
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:dev_t dev;	offset:8;	size:4;	signed:0;
	field:ino_t ino;	offset:16;	size:8;	signed:0;
	field:__u64 block;	offset:24;	size:8;	signed:0;
	field:unsigned int len;	offset:32;	size:4;	signed:0;
	field:__u32 logical;	offset:36;	size:4;	signed:0;
	field:void * leaf;	offset:40;	size:8;	signed:0;
	field:char comm[16];	offset:48;	size:16;	signed:0;

print fmt: \"dev %d,%d ino %lu\", REC->dev, REC->ino
";

    #[test]
    fn finds_fields_by_exact_name() {
        let f = |n| find_field(EXT4_ALLOCATE_BLOCKS_6_18, n);
        assert_eq!(f("dev"), Some(Field { offset: 8, size: 4 }));
        assert_eq!(
            f("ino"),
            Some(Field {
                offset: 16,
                size: 8
            })
        );
        assert_eq!(
            f("len"),
            Some(Field {
                offset: 32,
                size: 4
            })
        );
        assert_eq!(
            f("logical"),
            Some(Field {
                offset: 36,
                size: 4
            })
        );
        assert_eq!(
            f("leaf"),
            Some(Field {
                offset: 40,
                size: 8
            })
        );
        assert_eq!(
            f("comm"),
            Some(Field {
                offset: 48,
                size: 16
            })
        );
        assert_eq!(f("lblk"), None);
        assert_eq!(f("common"), None);
    }
}
