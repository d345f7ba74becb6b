//! Real device-mapper (run inside the VM by `cargo xtask test`): regions that Debian's own
//! `dmstats create --filemap` made, read back through filemapd's device-mapper code, equal the
//! file's extents as FIEMAP and `filefrag -v` report them — on ext4 and on xfs.
use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

use filemapd::{file::fiemap, sectors::SectorRange, stats};
use filemapd_tests::{
    DmFs, FsKind, dmstats_list_regions, filefrag_sectors, map_without_daemon, punch_hole,
    require_device_mapper, run, write_and_sync,
};

/// Writes 8 MiB and punches three holes in it, so the file has four separate extents.
fn make_fragmented_file(path: &Path) {
    write_and_sync(path, 0, 8 << 20).unwrap();
    for mib in [1u64, 3, 6] {
        punch_hole(path, mib << 20, 512 << 10).unwrap();
    }
    fs::File::open(path).unwrap().sync_all().unwrap();
}

fn debian_filemap_matches_fiemap(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let path = dmfs.mount.dir.join("data.img");
    make_fragmented_file(&path);

    let group_id = map_without_daemon(&path).unwrap();

    // filemapd's view of the group, through its own dm code.
    let st_dev = fs::metadata(&path).unwrap().dev();
    let device = stats::StatsDevice::for_st_dev(st_dev).unwrap();
    let regions = device.list(None).unwrap();
    let group = stats::Group::find(&regions, group_id)
        .unwrap()
        .unwrap_or_else(|| panic!("group {group_id} not found in {regions:#?}"));
    let (descriptor, members): (_, Vec<_>) = (&group.descriptor, group.members().collect());
    assert_eq!(
        descriptor.alias, "data.img",
        "dmstats names a filemap group after the file"
    );
    assert_eq!(
        descriptor.members.len(),
        members.len(),
        "descriptor lists regions that do not exist"
    );
    let region_ranges: Vec<SectorRange> = members.iter().map(|r| r.range).collect();

    // The file's extents, by FIEMAP and by e2fsprogs' filefrag.
    let file = fs::File::open(&path).unwrap();
    let extents = fiemap::read_extents(&file, 0, u64::MAX, true).unwrap();
    let fiemap_ranges = fiemap::device_ranges(&extents);
    let filefrag_ranges: Vec<SectorRange> = filefrag_sectors(&path)
        .unwrap()
        .into_iter()
        .map(|(s, l)| SectorRange::new(s, l))
        .collect();

    assert!(
        fiemap_ranges.len() >= 4,
        "expected a fragmented file, FIEMAP shows {fiemap_ranges:?}"
    );
    assert_eq!(
        fiemap_ranges, filefrag_ranges,
        "our FIEMAP reading disagrees with filefrag -v"
    );
    assert_eq!(
        region_ranges, fiemap_ranges,
        "regions of group {group_id} != the file's extents"
    );
    for region in &members {
        assert_eq!(
            region.step, region.range.len,
            "a filemap region has exactly one area"
        );
        assert_eq!(region.program_id, "dmstats");
    }

    // Debian's own `dmstats list` shows the same regions.
    let listed: Vec<SectorRange> = dmstats_list_regions(&dmfs.name)
        .unwrap()
        .into_iter()
        .map(|(s, l)| SectorRange::new(s, l))
        .collect();
    assert_eq!(listed, fiemap_ranges, "dmstats list disagrees");

    run("dmstats", &["delete", "--allregions", &dmfs.name]).unwrap();
    assert!(
        device.list(None).unwrap().is_empty(),
        "regions left after dmstats delete"
    );
}

#[test]
fn ext4_dmstats_filemap_regions_equal_the_files_extents() {
    debian_filemap_matches_fiemap(FsKind::Ext4);
}

#[test]
fn xfs_dmstats_filemap_regions_equal_the_files_extents() {
    debian_filemap_matches_fiemap(FsKind::Xfs);
}
