//! Which programs count the watched files' IO: the bio hook or the probe on dm-stats'
//! accounting, as asked or as this kernel allows.
use filemapd_common::names;

use super::tracefs;

/// Which programs count the watched files' IO (`watch --io-hook`, the config's `io_hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoHook {
    /// The block layer's tracepoints at every bio's queueing and completion (`bio_hook` in
    /// the kernel half): a device's dm-stats needs no region, but every bio of the host pays
    /// the hook a look at its device.
    #[value(
        help = "the block layer's tracepoints: no region on any device; every bio of the host pays a look"
    )]
    Bio,
    /// A kprobe on dm-stats' per-bio accounting, which runs only while the device has a
    /// region (see [`crate::stats::hook`]): only the counted devices' bios pay.
    #[value(
        help = "a probe on dm-stats' accounting: only counted devices' bios pay; a device whose files have no region keeps one of filemapd's own"
    )]
    DmStats,
}

/// The name `--io-hook` and the config take.
impl std::fmt::Display for IoHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = clap::ValueEnum::to_possible_value(self).expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

impl IoHook {
    /// The hook `wanted` (else `FILEMAPD_IO_HOOK=bio|dm-stats`, for daemons that dmstats
    /// launches), or, where none is wanted, the probe on dm-stats' accounting where dm's
    /// layout is known and the bio hook where it is not (dm-mod without BTF). Err: why the
    /// hook wanted, or every hook, cannot run.
    pub(super) fn choose(dm_known: bool, wanted: Option<IoHook>) -> Result<IoHook, String> {
        let wanted = wanted.or_else(|| {
            let asked = std::env::var("FILEMAPD_IO_HOOK").ok()?;
            <IoHook as clap::ValueEnum>::from_str(&asked, false)
                .inspect_err(|_| {
                    log::warn!(
                        "FILEMAPD_IO_HOOK={asked:?} names no hook (bio, dm-stats): choosing as if it were unset"
                    )
                })
                .ok()
        });
        // The tracepoints are looked for only where the bio hook may be chosen.
        let bio_possible = || {
            let present = |name| matches!(tracefs::read_format("block", name), Ok(Some(_)));
            present(names::BLOCK_BIO_QUEUE) && present(names::BLOCK_BIO_COMPLETE)
        };
        match wanted {
            Some(IoHook::DmStats) if dm_known => Ok(IoHook::DmStats),
            Some(IoHook::DmStats) => Err("the dm-stats hook needs dm-mod's BTF".to_string()),
            Some(IoHook::Bio) if bio_possible() => {
                log::info!("counting through the block tracepoints (the bio hook, as asked)");
                Ok(IoHook::Bio)
            }
            Some(IoHook::Bio) => {
                Err("this kernel has no block tracepoints for the bio hook".to_string())
            }
            None if dm_known => Ok(IoHook::DmStats),
            None if bio_possible() => Ok(IoHook::Bio),
            None => Err("no BTF for dm-mod, and no block tracepoints".to_string()),
        }
    }
}
