//! File checks on this machine's kernel: what filemapd refuses to map, and why; and how its
//! printing commands end when their reader goes.
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

/// Regions cover a file's data: FIEMAP reports blocks past the end of the file (here from
/// `fallocate --keep-size`, as xfs's speculative preallocation does), and `data_ranges` cuts
/// them off at the end rounded up to the block, on ext4 and xfs alike.
#[test]
fn data_ranges_stop_at_the_end_of_the_file() {
    use std::os::unix::fs::MetadataExt as _;

    use filemapd::file::{fiemap, view};
    use filemapd_tests::run;

    require_root();
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "data-end").unwrap();
    for fs_kind in [FsKind::Ext4, FsKind::Xfs] {
        let dir = scratch.0.join(fs_kind.name());
        fs::create_dir_all(&dir).unwrap();
        let loopfs = LoopFs::new(&dir, fs_kind).unwrap();
        let path = loopfs.mount.dir.join("f");
        // 10000 bytes of data (3 blocks of 4 KiB), then 1 MiB kept past the end.
        write_and_sync(&path, 0, 10_000).unwrap();
        run(
            "fallocate",
            &[
                "--keep-size",
                "--offset",
                "0",
                "--length",
                "1MiB",
                &path.to_string_lossy(),
            ],
        )
        .unwrap();
        let file = fs::File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().size(), 10_000);
        let every: u64 =
            fiemap::device_ranges(&fiemap::read_extents(&file, 0, u64::MAX, false).unwrap())
                .iter()
                .map(|r| r.len)
                .sum();
        assert!(
            every >= 2048,
            "{}: FIEMAP shows the kept MiB ({every} sectors)",
            fs_kind.name()
        );
        let data: u64 = view::data_ranges(&file, false)
            .unwrap()
            .iter()
            .map(|r| r.len)
            .sum();
        assert_eq!(data, 24, "{}: three 4 KiB blocks of data", fs_kind.name());
    }
}

/// `report` and `watch --check-config` piped into a reader that has gone (`| head` after its
/// lines) end by SIGPIPE, as other tools do, without a panic's message on stderr.
#[test]
fn printing_commands_end_quietly_when_their_reader_goes() {
    use std::os::unix::process::ExitStatusExt as _;
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "sigpipe").unwrap();
    let file = scratch.0.join("f.img");
    write_and_sync(&file, 0, 64 << 10).unwrap();
    for args in [&["report"][..], &["watch", "--check-config"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(filemapd_tests::daemon::filemapd_binary())
            .args(args)
            .arg(&file)
            .stdout(writer)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}, stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let errors = String::from_utf8_lossy(&out.stderr);
        assert!(!errors.contains("panicked"), "{args:?}: {errors}");
    }
}
