//! `filemapd map` / `unmap` against real device-mapper and Debian's dmstats: the group it
//! makes is the one `dmstats create --filemap --nomonitor` makes (less the blocks past the end
//! of the file, which filemapd leaves out), reads as such, and a run
//! killed at any point is finished or cleaned up by the next.
use std::{path::Path, process::Command};

use filemapd::{
    file::{extent_map::ExtentMap, fiemap, view},
    sectors::SectorRange,
};

use filemapd_tests::{
    DmFs, FsKind,
    daemon::{
        converged_exactly, file_ranges, filemapd_binary, group_by_alias, region_line, region_table,
        user_region,
    },
    map_without_daemon, require_device_mapper, run, write_and_sync,
};

/// Runs `filemapd ARGS` with extra environment; (exit code, stdout, stderr).
fn filemapd(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(filemapd_binary())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file of `chunks` 64 KiB extents, each apart from the next.
fn fragmented_file(dmfs: &DmFs, name: &str, chunks: u64) -> std::path::PathBuf {
    let path = dmfs.mount.dir.join(name);
    let filler = dmfs.mount.dir.join(format!("{name}.filler"));
    for chunk in 0..chunks {
        write_and_sync(&path, chunk << 16, 64 << 10).unwrap();
        write_and_sync(&filler, chunk << 16, 64 << 10).unwrap();
    }
    path
}

fn group_ranges(path: &Path, alias: &str) -> Vec<String> {
    let (_, members) = group_by_alias(&filemapd_tests::daemon::device_of(path), alias).unwrap();
    let mut ranges: Vec<String> = members.iter().map(|r| r.range.to_string()).collect();
    ranges.sort();
    ranges
}

/// `ranges` ("start+len") less the file's blocks past its end.
fn without_tails(path: &Path, ranges: Vec<String>) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap();
    let extents = fiemap::read_extents(&file, 0, u64::MAX, false).unwrap();
    let tails = ExtentMap::new(extents, view::data_end(&file.metadata().unwrap())).tail_ranges();
    let mut cut: Vec<String> = Vec::new();
    for text in ranges {
        let (start, len) = text.split_once('+').unwrap();
        let mut pieces = vec![SectorRange::new(
            start.parse().unwrap(),
            len.parse().unwrap(),
        )];
        for tail in &tails {
            pieces = pieces
                .into_iter()
                .flat_map(|r| {
                    let before =
                        SectorRange::new(r.start, tail.start.clamp(r.start, r.end()) - r.start);
                    let after_start = tail.end().clamp(r.start, r.end());
                    let after = SectorRange::new(after_start, r.end() - after_start);
                    [before, after]
                })
                .filter(|r| r.len > 0)
                .collect();
        }
        cut.extend(pieces.iter().map(|r| r.to_string()));
    }
    cut.sort();
    cut
}

fn maps_as_dmstats_does(fs_kind: FsKind) {
    require_device_mapper();
    let dmfs = DmFs::new(fs_kind).unwrap();
    let mine = user_region(&dmfs);
    let path = fragmented_file(&dmfs, "vm.img", 6);
    let p = path.to_string_lossy().into_owned();
    let baseline = region_table(&path);

    let (code, out, err) = filemapd(&["map", &p], &[]);
    assert_eq!(code, Some(0), "{err}");
    let group = filemapd_tests::created_group_id(&out).unwrap();
    assert!(
        converged_exactly(&dmfs, &path, "vm.img").unwrap(),
        "one region per extent"
    );
    let ours = group_ranges(&path, "vm.img");
    // Debian's dmstats reads it: the alias names the group in list and report.
    let list = run("dmstats", &["list", "--group", &dmfs.name]).unwrap();
    assert!(list.contains("vm.img"), "{list}");
    let report = run(
        "dmstats",
        &["report", "--groupid", &group.to_string(), &dmfs.name],
    )
    .unwrap();
    assert!(report.contains("vm.img"), "{report}");

    // A file is never mapped twice.
    let (code, out, err) = filemapd(&["map", &p], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("already mapped as group ID {group}")),
        "{out}"
    );

    let (code, _, err) = filemapd(&["unmap", &p], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(region_table(&path), baseline, "unmap left regions");

    // The real thing maps the same file to the same regions, but for the blocks past the end
    // of the file (xfs keeps its speculative preallocation after the second close), which
    // dmstats covers and filemapd leaves out.
    map_without_daemon(&path).unwrap();
    assert_eq!(
        without_tails(&path, group_ranges(&path, "vm.img")),
        ours,
        "dmstats maps it differently"
    );
    assert_eq!(
        region_line(&dmfs, |r| r.range == SectorRange::new(8, 16)),
        mine,
        "the user's region changed"
    );
}

#[test]
fn ext4_maps_as_dmstats_does() {
    maps_as_dmstats_does(FsKind::Ext4);
}
#[test]
fn xfs_maps_as_dmstats_does() {
    maps_as_dmstats_does(FsKind::Xfs);
}

/// dmstats' Debian build drops --precise for filemaps; `map` keeps it, and the bounds, on
/// every region.
#[test]
fn map_keeps_precise_timestamps_and_bounds_on_every_region() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = fragmented_file(&dmfs, "db.img", 3);
    let p = path.to_string_lossy().into_owned();
    let (code, _, err) = filemapd(
        &[
            "map",
            &p,
            "--alias",
            "dbvol",
            "--precise",
            "--bounds",
            "500us,2ms",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    let (_, members) = group_by_alias(&filemapd_tests::daemon::device_of(&path), "dbvol").unwrap();
    assert_eq!(members.len(), file_ranges(&path).len());
    for region in &members {
        assert!(region.settings.precise_timestamps, "{region:?}");
        assert_eq!(
            region.settings.histogram,
            vec![500_000, 2_000_000],
            "{region:?}"
        );
        assert_eq!(region.program_id, "dmstats");
    }
}

/// Killed after creating its regions, after writing the descriptor, or half-way through an
/// unmap: the next run leaves exactly the group (or nothing), without markers.
#[test]
fn a_map_or_unmap_killed_at_any_point_is_finished_by_the_next() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Xfs).unwrap();
    user_region(&dmfs);
    let path = fragmented_file(&dmfs, "vm.img", 4);
    let p = path.to_string_lossy().into_owned();
    let baseline = region_table(&path);
    for point in ["mapped", "grouped"] {
        let (code, _, err) = filemapd(&["map", &p], &[("FILEMAPD_TEST_CRASH_AT", point)]);
        assert_eq!(code, None, "expected an abort at {point}: {err}");
        let (code, _, err) = filemapd(&["map", &p], &[]);
        assert_eq!(code, Some(0), "after a kill at {point}: {err}");
        let table = region_table(&path);
        assert!(
            !table.iter().any(|l| l.contains("DMS_FILEMAPD_")),
            "{point}: {table:#?}"
        );
        // One region per extent (the file system may have put two chunks side by side).
        let extents = file_ranges(&path).len();
        assert_eq!(table.len(), baseline.len() + extents, "{point}: {table:#?}");
        assert!(
            converged_exactly(&dmfs, &path, "vm.img").unwrap(),
            "{point}"
        );
        let (code, _, err) = filemapd(&["unmap", &p], &[("FILEMAPD_TEST_CRASH_AT", "unmapping")]);
        assert_eq!(code, None, "expected an abort while unmapping: {err}");
        let (code, _, err) = filemapd(&["unmap", &p], &[]);
        assert_eq!(code, Some(0), "unmap after a kill: {err}");
        assert_eq!(region_table(&path), baseline, "after unmapping ({point})");
    }
}

/// Bad input: one line, exit 1, nothing changed.
#[test]
fn map_and_unmap_refuse_what_they_cannot_do() {
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = fragmented_file(&dmfs, "vm.img", 2);
    let p = path.to_string_lossy().into_owned();
    let baseline = region_table(&path);
    let elsewhere = "/proc/version";
    let dir = dmfs.mount.dir.to_string_lossy().into_owned();
    for (args, says) in [
        (vec!["unmap", p.as_str()], "no group"),
        (vec!["map", elsewhere], "not on a device-mapper device"),
        (vec!["map", dir.as_str()], "not a regular file"),
        (vec!["map", p.as_str(), "--bounds", "5us"], "--precise"),
        (
            vec!["map", p.as_str(), "--alias", "two words"],
            "white space",
        ),
        (vec!["map", "/nonexistent/vm.img"], "opening"),
    ] {
        let (code, _, err) = filemapd(&args, &[]);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(region_table(&path), baseline, "{args:?} changed regions");
    }
}
