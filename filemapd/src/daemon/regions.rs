//! Where a watched file's counters live besides the kernel's: a dmstats group of regions
//! that tile its extents (the default), one region per extent as lvm2 makes them, or none
//! (the kernel's counters alone: no region per extent costs the device anything).
use crate::reconcile::Mapping;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Regions {
    /// A group whose regions tile the extents, counters kept as extents grow.
    #[default]
    Tiled,
    /// A group of one region per extent (lvm2's mapping).
    Exact,
    /// No regions: the kernel counts the file (needs eBPF and the kernel's BTF).
    None,
}

impl Regions {
    /// How a group's regions follow the extents; `None` without a group.
    pub fn mapping(self) -> Option<Mapping> {
        match self {
            Regions::Tiled => Some(Mapping::Tiled),
            Regions::Exact => Some(Mapping::Exact),
            Regions::None => None,
        }
    }

    /// The mode a file with a group made beforehand keeps: its group's (tiled where none
    /// was asked for).
    pub fn with_group(self) -> Regions {
        match self {
            Regions::None => Regions::Tiled,
            kept => kept,
        }
    }
}

impl std::fmt::Display for Regions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Regions::Tiled => "tiled",
            Regions::Exact => "exact",
            Regions::None => "none",
        })
    }
}
