//! What the file looks like: its extents (FIEMAP), the map of them the daemon keeps, which
//! file it is and whether it can be mapped, where its file system numbers its blocks, and
//! whether it is still there.
pub mod extent_map;
pub mod fiemap;
pub mod follow;
pub mod identity;
pub mod placement;
pub mod view;
