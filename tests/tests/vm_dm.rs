//! Real device-mapper (run inside the VM by `cargo xtask test`): regions that Debian's own
//! `dmstats create --filemap` made, read back through filemapd's device-mapper code, equal the
//! file's extents as FIEMAP and `filefrag -v` report them — on ext4 and on xfs.
use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

use filemapd::{dmstats, fiemap, sectors::SectorRange};
use filemapd_tests::{
    DmLinear, FsKind, LoopDevice, Mount, ScratchDir, filefrag_sectors, punch_hole, require_root,
    run, write_and_sync,
};

fn require_device_mapper() {
    require_root();
    if !Path::new("/dev/mapper/control").exists() {
        panic!("no /dev/mapper/control: this test needs a device-mapper kernel (`cargo xtask test` boots one)");
    }
}

/// A file system on dm-linear over a loop device; drops in reverse order of setup.
struct DmFs {
    mount: Mount,
    _dm: DmLinear,
    _loop: LoopDevice,
    _scratch: ScratchDir,
}

impl DmFs {
    fn new(fs: FsKind) -> Self {
        let scratch = ScratchDir::new(Path::new("/tmp"), &format!("dm-{}", fs.name())).unwrap();
        let lo = LoopDevice::attach_new_image(&scratch.0.join("backing.img"), 512).unwrap();
        let dm = DmLinear::create(&format!("filemapd-test-{}", fs.name()), &lo.path).unwrap();
        let mount = Mount::new(&dm.path, fs, &scratch.0.join("mnt")).unwrap();
        Self { mount, _dm: dm, _loop: lo, _scratch: scratch }
    }
}

/// Writes 8 MiB and punches three holes in it, so the file has four separate extents.
fn make_fragmented_file(path: &Path) {
    write_and_sync(path, 0, 8 << 20).unwrap();
    for mib in [1u64, 3, 6] {
        punch_hole(path, mib << 20, 512 << 10).unwrap();
    }
    fs::File::open(path).unwrap().sync_all().unwrap();
}

/// "…: Created new group with N region(s) as group ID G." → G
fn created_group_id(dmstats_output: &str) -> u64 {
    let tail = dmstats_output
        .split("group ID ")
        .nth(1)
        .unwrap_or_else(|| panic!("no group ID in dmstats output: {dmstats_output:?}"));
    tail.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().unwrap()
}

fn debian_filemap_matches_fiemap(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind);
    let path = dmfs.mount.dir.join("data.img");
    make_fragmented_file(&path);

    let out = run("dmstats", &["create", "--filemap", "--nomonitor", &path.to_string_lossy()]).unwrap();
    let group_id = created_group_id(&out);

    // filemapd's view of the group, through its own dm code.
    let st_dev = fs::metadata(&path).unwrap().dev();
    let device = dmstats::StatsDevice::for_st_dev(st_dev).unwrap();
    let regions = device.list(None).unwrap();
    let (descriptor, members) = dmstats::group_members(&regions, group_id)
        .unwrap()
        .unwrap_or_else(|| panic!("group {group_id} not found in {regions:#?}"));
    assert_eq!(descriptor.alias, "data.img", "dmstats names a filemap group after the file");
    assert_eq!(descriptor.members.len(), members.len(), "descriptor lists regions that do not exist");
    let region_ranges: Vec<SectorRange> = members.iter().map(|r| r.range).collect();

    // The file's extents, by FIEMAP and by e2fsprogs' filefrag.
    let file = fs::File::open(&path).unwrap();
    let extents = fiemap::read_extents(&file, 0, u64::MAX, true).unwrap();
    let fiemap_ranges = fiemap::device_ranges(&extents);
    let filefrag_ranges: Vec<SectorRange> =
        filefrag_sectors(&path).unwrap().into_iter().map(|(s, l)| SectorRange::new(s, l)).collect();

    assert!(fiemap_ranges.len() >= 4, "expected a fragmented file, FIEMAP shows {fiemap_ranges:?}");
    assert_eq!(fiemap_ranges, filefrag_ranges, "our FIEMAP reading disagrees with filefrag -v");
    assert_eq!(region_ranges, fiemap_ranges, "regions of group {group_id} != the file's extents");
    for region in &members {
        assert_eq!(region.step, region.range.len, "a filemap region has exactly one area");
        assert_eq!(region.program_id, "dmstats");
    }

    // Debian's own `dmstats list` shows the same regions.
    let listed = run("dmstats", &["list", "--units", "s", &dmfs_name(fs_kind)]).unwrap();
    assert_eq!(dmstats_list_regions(&listed), fiemap_ranges, "dmstats list:\n{listed}");

    run("dmstats", &["delete", "--allregions", &dmfs_name(fs_kind)]).unwrap();
    assert!(device.list(None).unwrap().is_empty(), "regions left after dmstats delete");
}

/// The region rows of `dmstats list --units s` (columns: Name GrpID RgID ObjType RgStart
/// RgSize ...), as sector ranges.
fn dmstats_list_regions(listing: &str) -> Vec<SectorRange> {
    listing
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() >= 6 && cols[3] == "region")
        .map(|cols| SectorRange::new(cols[4].parse().unwrap(), cols[5].parse().unwrap()))
        .collect()
}

fn dmfs_name(fs: FsKind) -> String {
    format!("filemapd-test-{}", fs.name())
}

#[test]
fn ext4_dmstats_filemap_regions_equal_the_files_extents() {
    debian_filemap_matches_fiemap(FsKind::Ext4);
}

#[test]
fn xfs_dmstats_filemap_regions_equal_the_files_extents() {
    debian_filemap_matches_fiemap(FsKind::Xfs);
}
