//! What `cargo xtask install` puts in place, checked where `cargo xtask test` installed it
//! (target/install-check): the unit passes systemd's own check, the manual pages render, the
//! dmfilemapd name runs filemapd, and the config it ships watches nothing and only root writes.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/install-check");
    assert!(
        root.join("usr/local/bin/filemapd").is_file(),
        "{} holds no installation: run these tests through `cargo xtask test`, which installs there first",
        root.display()
    );
    root
}

fn man_dir() -> PathBuf {
    root().join("usr/local/share/man")
}

#[test]
fn the_unit_passes_systemd_analyze_verify_without_a_word() {
    let unit = root().join("etc/systemd/system/filemapd.service");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        // It also checks that the Documentation= pages exist.
        .env("MANPATH", man_dir())
        .output()
        .expect("systemd-analyze (package systemd) is missing: run `cargo xtask setup`");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    let text = fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains("Type=notify") && !text.contains("@BINDIR@") && !text.contains("@ETCDIR@"),
        "{text}"
    );
}

#[test]
fn every_manual_page_renders() {
    let pages: Vec<PathBuf> = fs::read_dir(man_dir().join("man8"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for name in [
        "filemapd.8",
        "filemapd-watch.8",
        "filemapd-map.8",
        "filemapd-unmap.8",
        "filemapd-show.8",
        "filemapd-trace.8",
        "filemapd-report.8",
    ] {
        assert!(
            pages.iter().any(|p| p.ends_with(name)),
            "{name} missing: {pages:?}"
        );
    }
    for page in &pages {
        let out = Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(page)
            .env("MANWIDTH", "80")
            .output()
            .expect("man (package man-db) is missing: run `cargo xtask setup`");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("NAME") && text.contains("SYNOPSIS"),
            "{}: {}",
            page.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // A NAME is one short line, as in dmstats(8); the detail is DESCRIPTION's.
        let name: Vec<&str> = text
            .lines()
            .skip_while(|l| l.trim() != "NAME")
            .skip(1)
            .take_while(|l| l.trim() != "SYNOPSIS")
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            name.len() == 1,
            "{}: NAME runs {} line(s): {name:?}",
            page.display(),
            name.len()
        );
    }
}

#[test]
fn dmfilemapd_runs_filemapd_with_lvm2s_arguments() {
    let link = root().join("usr/local/sbin/dmfilemapd");
    assert_eq!(
        fs::canonicalize(&link).unwrap(),
        fs::canonicalize(root().join("usr/local/bin/filemapd")).unwrap()
    );
    // Parsed as lvm2's arguments: lvm2's error line, exit 1.
    let out = Command::new(&link)
        .args(["0", "x", "/a", "inode"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "Could not parse group identifier: x"
    );
}

#[test]
fn the_shipped_config_watches_nothing_and_only_root_writes_it() {
    let config = root().join("etc/filemapd/watch.toml");
    let mode = fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let text = fs::read_to_string(&config).unwrap();
    // No file, and the metrics served on loopback (the unit passes no --metrics).
    let shipped = filemapd::daemon::watch::parse_toml(&text).unwrap();
    assert_eq!((shipped.paths.len(), shipped.groups.len()), (0, 0));
    let metrics = shipped
        .metrics
        .expect("the shipped config names the metrics address");
    assert_eq!(
        (metrics.address.to_string().as_str(), metrics.remote),
        ("127.0.0.1:9731", false)
    );
    let unit = fs::read_to_string(root().join("etc/systemd/system/filemapd.service")).unwrap();
    assert!(!unit.contains("--metrics"), "{unit}");
    // Its commented examples, uncommented, are a valid config.
    let examples: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = filemapd::daemon::watch::parse_toml(&examples)
        .unwrap_or_else(|e| panic!("{e:#}\n{examples}"));
    assert_eq!(
        (config.paths.len(), config.groups.len()),
        (1, 1),
        "{examples}"
    );
}

#[test]
fn the_grafana_dashboard_is_installed_and_reads_only_filemapd_series() {
    let path = root().join("usr/local/share/filemapd/grafana-dashboard.json");
    let text = fs::read_to_string(&path).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dashboard["uid"], "filemapd-per-image-io");
    // Whether each series exists is vm_metrics' check (a live scrape).
    for query in filemapd_tests::metrics::dashboard_queries() {
        assert!(
            !filemapd_tests::metrics::metric_names(&query).is_empty(),
            "{query}"
        );
    }
}
