//! What the kernel counts: dm-stats regions on a device-mapper device (the `@stats_*`
//! messages), and the groups of them that follow files.
pub mod descriptor;
pub mod device;
pub mod group;
pub mod hook;
pub mod id_set;
pub mod new_group;
pub mod region;

pub use descriptor::GroupDescriptor;
pub use device::{Devices, StatsDevice};
pub use group::Group;
pub use region::{Counters, Region, RegionSettings, RegionStats};
