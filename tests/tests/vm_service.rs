//! The VM host's service, as installed (run inside the VM by `cargo xtask test`, after it has
//! installed into target/install-check and built the Debian package into target/deb): the
//! unit's ExecStart run as systemd would run it, Debian's Prometheus scraping it, images
//! appearing, SIGHUP and SIGTERM; the package installed, run, removed and purged.
use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use filemapd_tests::{
    DmFs, FsKind,
    daemon::{
        CONVERGE, EXIT, append, converged, device_of, drop_in_search_path, filemapd_binary,
        group_by_alias, wait_converged,
    },
    ensure_bpffs,
    metrics::{
        Prometheus, dashboard_queries, dmstats_report, http_get, overwrite_first_mib, query,
        query_series, sample, write_sectors_now,
    },
    pids_of, require_device_mapper, run, run_env, wait_for_exit, wait_until, write_and_sync,
};

/// The installed unit's ExecStart and Environment.
struct Unit {
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

impl Unit {
    fn installed() -> Self {
        Self::at(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/install-check/etc/systemd/system/filemapd.service"),
        )
    }

    fn at(path: &Path) -> Self {
        let text = fs::read_to_string(path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: run this test through `cargo xtask test`, which installs there first",
                path.display()
            )
        });
        let values = |key: &'static str| {
            text.lines()
                .filter_map(move |l| l.strip_prefix(key))
                .collect::<Vec<_>>()
        };
        let argv: Vec<String> = values("ExecStart=")
            .first()
            .expect("the unit has an ExecStart")
            .split_whitespace()
            .map(String::from)
            .collect();
        let env = values("Environment=")
            .into_iter()
            .flat_map(str::split_whitespace)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { argv, env }
    }

    /// The value after `flag` in ExecStart.
    fn option(&self, flag: &str) -> &str {
        let at = self.argv.iter().position(|a| a == flag);
        at.and_then(|i| self.argv.get(i + 1))
            .unwrap_or_else(|| panic!("ExecStart has no {flag}: {:?}", self.argv))
    }
}

/// A tmpfs over a directory of the read-only root, for the test's own config; unmounted on drop.
struct Writable(PathBuf);

impl Writable {
    fn over(dir: &Path) -> Self {
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "mode=0755",
                "tmpfs",
                &dir.to_string_lossy(),
            ],
        )
        .unwrap();
        Self(dir.to_path_buf())
    }
}

impl Drop for Writable {
    fn drop(&mut self) {
        let _ = run("umount", &[&self.0.to_string_lossy()]);
    }
}

/// The service process, its stderr in a file (shown when the test fails); killed on drop.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Runs the unit's ExecStart with its environment and a NOTIFY_SOCKET, and waits for
    /// READY=1 as systemd would.
    fn start(unit: &Unit) -> Self {
        let socket_path = Path::new("/tmp/filemapd-test-notify.sock");
        let _ = fs::remove_file(socket_path);
        let socket = UnixDatagram::bind(socket_path).unwrap();
        socket.set_read_timeout(Some(2 * CONVERGE)).unwrap();
        let log = PathBuf::from("/tmp/filemapd-test-service.log");
        let child = Command::new(&unit.argv[0])
            .args(&unit.argv[1..])
            .envs(unit.env.iter().map(|(k, v)| (k, v)))
            .env("NOTIFY_SOCKET", socket_path)
            .stdin(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let service = Self { child, log };
        let mut message = [0u8; 256];
        let n = socket
            .recv(&mut message)
            .unwrap_or_else(|e| panic!("no READY=1 from the service ({e}):\n{}", service.log()));
        let said = String::from_utf8_lossy(&message[..n]);
        assert!(
            said.lines().any(|l| l == "READY=1"),
            "{said:?}\n{}",
            service.log()
        );
        service
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        run(
            "kill",
            &[&format!("-{signal}"), &self.child.id().to_string()],
        )
        .unwrap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("service log:\n{}", self.log());
        }
    }
}

fn write_config(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
}

/// Runs the drop-in for `group` in the foreground, as dmstats would start it for `path` with
/// `file` open as its descriptor, and checks that it handed the file over and exited 0.
fn hand_over_in_foreground(group: u64, path: &Path, file: &Path, env: &[(&str, &str)]) {
    let mut daemon = Command::new(filemapd_binary())
        .args([
            "0",
            &group.to_string(),
            &path.to_string_lossy(),
            "inode",
            "1",
            "0",
        ])
        .envs(env.iter().copied())
        .stdin(fs::File::open(file).unwrap())
        .spawn()
        .unwrap();
    assert!(
        wait_for_exit(daemon.id() as i32, EXIT).unwrap(),
        "the daemon did not hand over"
    );
    assert!(daemon.wait().unwrap().success());
}

/// Whether the endpoint lists a file with this alias (in its info series).
fn served(address: &str, alias: &str) -> anyhow::Result<bool> {
    let (_, text) = http_get(address, "/metrics")?;
    Ok(text.contains(&format!("alias=\"{alias}\"")))
}

/// The acceptance of issue 11, in one boot of the service: its images get groups (with the
/// config's bounds), a new image is mapped once written, Prometheus holds a file's write
/// sectors as `dmstats report` gives them, a dmstats-launched daemon hands its file over,
/// SIGHUP swaps one watched directory for another (and keeps the handed-over file),
/// SIGTERM ends it with exit 0 and every group tiling its file; started again, it follows
/// the handed-over file again.
#[test]
fn the_service_as_its_unit_runs_it() {
    require_device_mapper();
    let unit = Unit::installed();
    let config = PathBuf::from(unit.option("--config"));
    // The shipped config names the metrics address (the unit passes none); each config
    // written here keeps it.
    let metrics = filemapd::daemon::watch::parse_toml(&fs::read_to_string(&config).unwrap())
        .unwrap()
        .metrics
        .expect("the shipped config names a metrics address")
        .address
        .to_string();
    let write_config = |path: &Path, text: &str| {
        write_config(path, &format!("metrics = \"{metrics}\"\n{text}"));
    };
    let _etc = Writable::over(config.parent().unwrap());
    let dmfs = DmFs::new(FsKind::Xfs).unwrap();
    let images = dmfs.mount.dir.join("images");
    let other = dmfs.mount.dir.join("other");
    for dir in [&images, &other] {
        fs::create_dir(dir).unwrap();
    }
    let old = images.join("old.img");
    write_and_sync(&old, 0, 2 << 20).unwrap();
    let moved_in = other.join("b.img");
    write_and_sync(&moved_in, 0, 1 << 20).unwrap();
    write_config(
        &config,
        &format!(
            "[[path]]\npath = \"{}\"\nbounds = \"1ms,10ms\"\n",
            images.display()
        ),
    );

    let service = Service::start(&unit);
    let device = device_of(&old);
    wait_converged(&dmfs, &old, "old.img", "the service's start");
    let (_, members) = group_by_alias(&device, "old.img").unwrap();
    assert_eq!(
        members[0].settings.histogram,
        vec![1, 10],
        "the config's bounds (ms)"
    );

    // A new image after the start, empty at first: mapped once it has blocks.
    let new = images.join("new.img");
    fs::File::create(&new).unwrap();
    write_and_sync(&new, 0, 1 << 20).unwrap();
    let written = Instant::now();
    wait_converged(&dmfs, &new, "new.img", "a new image's first write");
    eprintln!(
        "new image mapped {:.0} ms after its first write's fsync returned (emulated VM)",
        written.elapsed().as_secs_f64() * 1000.0
    );

    // Prometheus, pointed at the unit's address, holds what dmstats reports.
    let listen = "127.0.0.1:9090";
    let _prometheus = Prometheus::start(&metrics, listen);
    let promql = "filemapd_file_write_sectors_total{path=~\".*/new[.]img\"}";
    wait_until(
        "Prometheus' first scrape of the service",
        2 * CONVERGE,
        || Ok(query(listen, promql)?.is_some()),
    )
    .unwrap();
    overwrite_first_mib(&new);
    let (group, members) = group_by_alias(&device, "new.img").unwrap();
    let regions: Vec<u64> = members.iter().map(|r| r.id).collect();
    let now = write_sectors_now(&dmfs.name, &regions);
    assert!(now >= 2048, "the kernel counted {now} sectors written");
    let mut stored = None;
    let waited = wait_until("Prometheus to store the write", 2 * CONVERGE, || {
        stored = query(listen, promql)?;
        Ok(stored == Some(now as f64))
    });
    assert!(
        waited.is_ok(),
        "Prometheus holds {stored:?}, the kernel counts {now} write sectors for group {group}"
    );
    let reported = dmstats_report(&dmfs.name, group, &["write_sector_count"])[0];
    assert_eq!(
        stored,
        Some(reported as f64),
        "Prometheus vs dmstats report"
    );
    assert_eq!(query(listen, "up{job=\"filemapd\"}").unwrap(), Some(1.0));
    // Every panel of the shipped Grafana dashboard is PromQL this Prometheus runs (a bad one
    // is refused with HTTP 400), and each has an answer for the service's images.
    for panel_query in dashboard_queries() {
        wait_until(
            &format!("an answer to the dashboard's {panel_query}"),
            2 * CONVERGE,
            || Ok(!query_series(listen, &panel_query)?.is_empty()),
        )
        .unwrap();
    }

    // A daemon Debian's dmstats starts hands its file to the service and exits; the service
    // follows the file from then on.
    let launched = dmfs.mount.dir.join("launched.img");
    write_and_sync(&launched, 0, 1 << 20).unwrap();
    run_env(
        "dmstats",
        &["create", "--filemap", &launched.to_string_lossy()],
        &[("PATH", &drop_in_search_path())],
    )
    .unwrap();
    let launched_arg = launched.to_string_lossy().into_owned();
    wait_until(
        "the launched daemon to hand over and exit",
        CONVERGE,
        || Ok(served(&metrics, "launched.img")? && pids_of("dmfilemapd", &launched_arg).is_empty()),
    )
    .unwrap();
    append(&launched, 2);
    wait_converged(
        &dmfs,
        &launched,
        "launched.img",
        "growth the service followed",
    );
    // The endpoint follows the group's new regions (published by the pass that made them).
    let (_, members) = group_by_alias(&device, "launched.img").unwrap();
    wait_until(
        "the endpoint to count the grown group's regions",
        CONVERGE,
        || {
            let (_, text) = http_get(&metrics, "/metrics")?;
            Ok(
                sample(&text, "filemapd_file_regions", &["/launched.img\""])?
                    == members.len() as f64,
            )
        },
    )
    .unwrap();

    // A daemon started for an image the service watches already (as `dmstats update_filemap`
    // starts one; in the foreground, so that its exit is the hand-over's end): taken, and the
    // image still watched once (its path spelt another way).
    let (old_group, _) = group_by_alias(&device, "old.img").unwrap();
    let spelt = images.join("../images/old.img");
    hand_over_in_foreground(old_group, &spelt, &old, &[]);
    let (_, text) = http_get(&metrics, "/metrics").unwrap();
    sample(&text, "filemapd_file_regions", &["/old.img\""])
        .unwrap_or_else(|e| panic!("old.img watched twice? {e}"));

    // SIGHUP: the other directory instead of the images. Its file gets a group; the images
    // are let go, their groups kept.
    write_config(
        &config,
        &format!("[[path]]\npath = \"{}\"\n", other.display()),
    );
    service.signal("HUP");
    wait_converged(&dmfs, &moved_in, "b.img", "a reload adding its directory");
    wait_until("the reload to let the images go", CONVERGE, || {
        Ok(!served(&metrics, "old.img")? && served(&metrics, "b.img")?)
    })
    .unwrap();
    assert!(
        served(&metrics, "launched.img").unwrap(),
        "a reload let a handed-over file go"
    );
    for alias in ["old.img", "new.img"] {
        assert!(
            group_by_alias(&device, alias).is_some(),
            "{alias}'s group went"
        );
    }

    // SIGTERM: exit 0, every group tiling its file, nothing in transit.
    let mut service = service;
    service.signal("TERM");
    assert!(
        wait_for_exit(service.child.id() as i32, EXIT).unwrap(),
        "the service outlived SIGTERM"
    );
    let status = service.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.log());
    for (path, alias) in [
        (&old, "old.img"),
        (&new, "new.img"),
        (&moved_in, "b.img"),
        (&launched, "launched.img"),
    ] {
        assert!(
            converged(&dmfs, path, alias).unwrap(),
            "{alias} after SIGTERM"
        );
    }
    let regions = device.list(None).unwrap();
    // Only the hook that keeps dm-stats' accounting on for the kernel's counting may stay.
    assert!(
        regions.iter().all(|r| !r.aux_data.contains("DMS_FILEMAPD_")
            || r.aux_data == filemapd::stats::hook::AUX_DATA),
        "a marker was left: {regions:?}"
    );
    // The stop named the handed-over file that nobody follows until the next start.
    let stop =
        "launched.img (group launched.img): followed by nobody until the service starts again";
    assert!(service.log().contains(stop), "{}", service.log());

    // Started again, as a restart or an upgrade does: the handed-over file is followed again
    // beside the configured one, by the one service (no daemon of dmstats' own).
    let service = Service::start(&unit);
    wait_until(
        "the restarted service to follow the handed-over file",
        CONVERGE,
        || served(&metrics, "launched.img"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", service.log()));
    append(&launched, 1);
    append(&moved_in, 1);
    wait_converged(&dmfs, &launched, "launched.img", "growth after a restart");
    wait_converged(&dmfs, &moved_in, "b.img", "growth after a restart");
    assert!(pids_of("dmfilemapd", &launched_arg).is_empty());
    let mut service = service;
    service.signal("TERM");
    assert!(
        wait_for_exit(service.child.id() as i32, EXIT).unwrap(),
        "the restarted service outlived SIGTERM"
    );
    assert_eq!(
        service.child.wait().unwrap().code(),
        Some(0),
        "{}",
        service.log()
    );
}

/// Where the package is installed from in the VM: dpkg with a database of its own and a
/// stand-in for systemd. The database holds the packages the package depends on and one that
/// owns the directories the system has already (dpkg reads the host's whole database, 790
/// packages, in over three minutes under emulation; this one in a second). The stand-in:
/// /run/systemd/system exists (so the maintainer scripts think systemd runs) and `systemctl`
/// ahead in PATH records each call and says the service is inactive. All go on drop.
struct PackageSandbox {
    dir: PathBuf,
    made_run_dir: bool,
}

impl PackageSandbox {
    /// `files`: the package's files (their final paths).
    fn new(files: &std::collections::BTreeSet<String>) -> Self {
        let dir = PathBuf::from("/tmp/filemapd-test-package");
        let _ = fs::remove_dir_all(&dir);
        let admin = dir.join("dpkg");
        for sub in ["updates", "info", "triggers"] {
            fs::create_dir_all(admin.join(sub)).unwrap();
        }
        // (run() trims the output: the blank line between stanzas is put back.)
        let mut status = run("dpkg-query", &["-s", "libc6", "libgcc-s1"]).unwrap();
        status += "\n\nPackage: filemapd-test-system\nStatus: install ok installed\nPriority: optional\nVersion: 1\nArchitecture: all\nMaintainer: test <root@localhost>\nDescription: the directories the system has before the package\n";
        fs::write(admin.join("status"), status).unwrap();
        fs::write(admin.join("available"), "").unwrap();
        let arch = run("dpkg", &["--print-architecture"]).unwrap();
        for package in ["libc6", "libgcc-s1"] {
            let list = admin.join(format!("info/{package}:{}.list", arch.trim()));
            fs::write(list, "").unwrap();
        }
        let mut existing = std::collections::BTreeSet::from(["/.".to_string()]);
        for file in files {
            existing.extend(
                Path::new(file)
                    .ancestors()
                    .skip(1)
                    .filter(|d| *d != Path::new("/") && d.is_dir())
                    .map(|d| d.display().to_string()),
            );
        }
        // And a file of its own: a package whose every path another one also has would
        // "disappear" at that one's install.
        existing.insert("/usr/share/doc/filemapd-test-system/marker".to_string());
        let list: String = existing.iter().map(|d| format!("{d}\n")).collect();
        fs::write(admin.join("info/filemapd-test-system.list"), list).unwrap();

        let script = dir.join("systemctl");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$*\" >> {}/calls\n[ \"$1\" = is-active ] && exit 3\nexit 0\n",
                dir.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let run_dir = Path::new("/run/systemd/system");
        let made_run_dir = !run_dir.exists();
        fs::create_dir_all(run_dir).unwrap();
        Self { dir, made_run_dir }
    }

    fn dpkg_command(&self, args: &[&str]) -> Command {
        let path = format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap());
        let mut dpkg = Command::new("dpkg");
        dpkg.arg(format!("--admindir={}", self.dir.join("dpkg").display()))
            .args(args)
            .env("PATH", path);
        dpkg
    }

    /// Runs dpkg with `args`; panics unless it succeeds. Returns its stdout.
    fn dpkg(&self, args: &[&str]) -> String {
        let out = self.dpkg_command(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "dpkg {args:?}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// The systemctl calls so far, one line each (`daemon-reload`, `stop filemapd.service`).
    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for PackageSandbox {
    fn drop(&mut self) {
        if self.made_run_dir {
            let _ = fs::remove_dir_all("/run/systemd");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The Debian package (`cargo xtask deb`), installed with a database of its own (see
/// [`PackageSandbox`]): `dpkg -i` puts exactly the install tree's files in place and starts
/// and enables nothing; the unit's command from the package follows an image
/// in the config's directory; removal stops the service; purge leaves none of its files, the
/// config it was given, nor what the service left under /run and /sys/fs/bpf.
#[test]
fn the_debian_package_installs_runs_and_purges_without_a_trace() {
    require_device_mapper();
    // As on a host (systemd mounts it): where a stopped service pins its programs.
    ensure_bpffs();
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/deb");
    let deb = fs::read_dir(&built)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| {
            panic!(
                "no .deb in {}: run this test through `cargo xtask test`, which builds it (`cargo xtask deb`)",
                built.display()
            )
        });
    let expected: std::collections::BTreeSet<String> =
        fs::read_to_string(built.join("filemapd.files"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
    let package = PackageSandbox::new(&expected);

    package.dpkg(&["-i", &deb.to_string_lossy()]);
    let calls = package.calls();
    assert!(
        calls.iter().all(|c| !["start", "enable", "restart"]
            .iter()
            .any(|v| c.starts_with(v))),
        "the install asked systemd for {calls:?}"
    );
    assert!(
        pids_of("filemapd", "watch").is_empty(),
        "something started filemapd"
    );
    // What dpkg says the package holds (directories aside) is the install tree.
    let listed = package.dpkg(&["-L", "filemapd"]);
    let listed: std::collections::BTreeSet<String> = listed
        .lines()
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()))
        .map(String::from)
        .collect();
    assert_eq!(listed, expected);

    // The packaged unit's command, as systemd would run it, follows an image it is given.
    let unit = Unit::at(Path::new("/usr/lib/systemd/system/filemapd.service"));
    assert_eq!(unit.argv[0], "/usr/bin/filemapd");
    let config = PathBuf::from(unit.option("--config"));
    let shipped = fs::read_to_string(&config).unwrap();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let images = dmfs.mount.dir.join("images");
    fs::create_dir(&images).unwrap();
    let image = images.join("vm.img");
    write_and_sync(&image, 0, 1 << 20).unwrap();
    write_config(
        &config,
        &format!("{shipped}\n[[path]]\npath = \"{}\"\n", images.display()),
    );
    let service = Service::start(&unit);
    wait_converged(&dmfs, &image, "vm.img", "the packaged service's start");
    append(&image, 1);
    wait_converged(
        &dmfs,
        &image,
        "vm.img",
        "growth the packaged service followed",
    );
    service.signal("TERM");
    assert!(
        wait_for_exit(service.child.id() as i32, EXIT).unwrap(),
        "the packaged service did not end on SIGTERM"
    );
    // Its counting programs stay pinned for its next start...
    let links = PathBuf::from(format!("/sys/fs/bpf/filemapd/{}/links", service.child.id()));
    assert!(
        links.is_dir(),
        "the stopped service left no {}",
        links.display()
    );
    drop(service);

    package.dpkg(&["-r", "filemapd"]);
    assert!(
        package.calls().iter().any(|c| c == "stop filemapd.service"),
        "removal did not stop the service: {:?}",
        package.calls()
    );
    // ... but not past the package's removal.
    assert!(!links.exists(), "{} is left after removal", links.display());
    package.dpkg(&["--purge", "filemapd"]);
    let left: Vec<&str> = expected
        .iter()
        .map(String::as_str)
        .chain(["/etc/filemapd", "/run/filemapd", "/sys/fs/bpf/filemapd"])
        .filter(|p| fs::symlink_metadata(p).is_ok())
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(
        package
            .dpkg_command(&["-s", "filemapd"])
            .output()
            .is_ok_and(|out| !out.status.success()),
        "dpkg still knows the package"
    );
}

/// The config takes hand-overs on a socket of its own (`handoff = true`, `handoff_socket`),
/// without `--handoff`: a daemon started with FILEMAPD_HANDOFF_SOCKET naming it hands its file
/// over and exits, and the service follows the file's growth from then on.
#[test]
fn a_config_names_its_own_hand_over_socket() {
    use filemapd_tests::daemon::LoggedDaemon;
    require_device_mapper();
    let dmfs = DmFs::new(FsKind::Ext4).unwrap();
    let path = dmfs.mount.dir.join("vm.img");
    write_and_sync(&path, 0, 1 << 20).unwrap();
    let p = path.to_string_lossy().into_owned();
    let out = run(&filemapd_binary().to_string_lossy(), &["map", &p]).unwrap();
    let group = filemapd_tests::created_group_id(&out).unwrap();
    let socket_dir = Path::new("/run/filemapd-config-test");
    let socket = socket_dir.join("handoff.sock");
    let config = dmfs.mount.dir.join("watch.toml");
    write_config(
        &config,
        &format!(
            "handoff = true\nhandoff_socket = \"{}\"\n",
            socket.display()
        ),
    );
    let c = config.to_string_lossy().into_owned();
    let mut service = LoggedDaemon::start(&["watch", "--config", &c, "-v"], &config, &[]);
    // Said once the socket is bound, after "waiting for SIGHUP" (CI once raced the two).
    service.wait_for_line(&format!("taking hand-overs on {}", socket.display()));
    assert!(
        socket.exists(),
        "the service listens on the config's socket"
    );

    let s = socket.to_string_lossy().into_owned();
    hand_over_in_foreground(group, &path, &path, &[("FILEMAPD_HANDOFF_SOCKET", &s)]);
    service.wait_for_line("handed over by a dmstats-launched daemon");
    append(&path, 2);
    wait_converged(&dmfs, &path, "vm.img", "growth the service followed");
    service.stop();
    let _ = fs::remove_dir_all(socket_dir);
}
