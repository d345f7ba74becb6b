//! File checks on this machine's kernel: what filemapd refuses to map, and why.
use std::{fs, path::Path};

use filemapd::file::identity::check_mappable;
use filemapd_tests::{FsKind, LoopFs, ScratchDir, require_root, write_and_sync};

#[test]
fn btrfs_files_are_refused_with_the_reason() {
    require_root();
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "btrfs").unwrap();
    let loopfs = LoopFs::new(&scratch.0, FsKind::Btrfs).unwrap();
    let path = loopfs.mount.dir.join("f");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let err = check_mappable(&fs::File::open(&path).unwrap(), &path).unwrap_err();
    assert!(
        err.to_string()
            .contains("btrfs does not provide physical FIEMAP extent data"),
        "{err:#}"
    );
}

#[test]
fn directories_and_devices_are_refused_and_ext4_files_pass() {
    require_root();
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "kinds").unwrap();
    let loopfs = LoopFs::new(&scratch.0, FsKind::Ext4).unwrap();
    let dir = &loopfs.mount.dir;
    let err = check_mappable(&fs::File::open(dir).unwrap(), dir).unwrap_err();
    assert!(err.to_string().contains("is not a regular file"), "{err:#}");
    let null = Path::new("/dev/null");
    let err = check_mappable(&fs::File::open(null).unwrap(), null).unwrap_err();
    assert!(err.to_string().contains("is not a regular file"), "{err:#}");
    let path = dir.join("f");
    write_and_sync(&path, 0, 4096).unwrap();
    assert!(
        check_mappable(&fs::File::open(&path).unwrap(), &path)
            .unwrap()
            .is_file()
    );
}

#[test]
fn file_systems_map_to_their_tracepoint_category() {
    require_root();
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "categories").unwrap();
    for (fs_kind, expected) in [
        (FsKind::Ext4, Some("ext4")),
        (FsKind::Xfs, Some("xfs")),
        (FsKind::Btrfs, None),
    ] {
        let dir = scratch.0.join(fs_kind.name());
        fs::create_dir_all(&dir).unwrap();
        let loopfs = LoopFs::new(&dir, fs_kind).unwrap();
        let path = loopfs.mount.dir.join("f");
        write_and_sync(&path, 0, 4096).unwrap();
        let category =
            filemapd::file::identity::tracepoint_category(&fs::File::open(&path).unwrap());
        assert_eq!(category, expected, "{}", fs_kind.name());
    }
}
