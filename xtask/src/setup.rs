//! Idempotent installation of everything the build and the tests need. Each step first checks
//! whether its work is already done, so a second run takes seconds.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd::{self, succeeds};

/// Debian packages: the VM (qemu, Debian's 6.1 and 6.12 kernels and busybox for virtme-ng's initramfs), the
/// tools the tests drive (mkfs for ext4/xfs/btrfs, losetup, dmsetup/dmstats, filefrag, fallocate), LLVM 22 for
/// bpf-linker, libdevmapper + libclang for devicemapper-rs's bindings, and what the installation and metrics
/// checks run.
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "linux-image-amd64",
    "linux-image-6.12-amd64",
    "busybox-static",
    "kmod",
    "e2fsprogs",
    "xfsprogs",
    "btrfs-progs",
    "dmsetup",
    "util-linux",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "libdevmapper-dev",
    "libclang-dev",
    "pkg-config",
    // The installation check: systemd-analyze verify, man -l.
    "systemd",
    "man-db",
    // The metrics acceptance: Debian's Prometheus scrapes `watch --metrics` in the VM.
    "prometheus",
];

/// What `cargo xtask bench` needs beyond the tests: bpftrace, whose probe on dm-stats' message
/// handler is the latency section's witness of region creations.
const BENCH_PACKAGES: &[&str] = &["bpftrace"];

const BPF_LINKER_VERSION: &str = "0.13.0";
const VIRTME_NG_VERSION: &str = "1.42";

pub fn run() -> anyhow::Result<()> {
    require_root()?;
    let log = cmd::workspace_root().join("target/setup.log");
    std::fs::create_dir_all(log.parent().unwrap())?;
    apt_packages(APT_PACKAGES, &log)?;
    nightly_with_rust_src(&log)?;
    bpf_linker(&log)?;
    virtme_ng(&log)?;
    tracefs()?;
    Ok(())
}

/// One line per step that has work to do, whatever the installer prints (that goes to `log`):
/// `setup: installing X ... done in 42 s (log: target/setup.log)`.
fn step(what: &str, log: &Path, work: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    use std::io::Write as _;
    eprint!("setup: {what} ...");
    let _ = std::io::stderr().flush();
    let started = std::time::Instant::now();
    let result = work();
    match &result {
        Ok(()) => eprintln!(
            " done in {:.0} s (log: {})",
            started.elapsed().as_secs_f64(),
            log.display()
        ),
        Err(_) => eprintln!(" failed"),
    }
    result
}

/// The host eBPF tests read tracepoint formats from tracefs, which not every machine mounts
/// (this one's /sys/kernel/tracing comes empty).
fn tracefs() -> anyhow::Result<()> {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").is_dir() || Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    eprintln!("setup: mounting tracefs on {}", dir.display());
    cmd::status(
        Command::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(dir),
    )
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "filemapd's set-up and tests need root (apt-get, loop devices, mounts, eBPF): run as root"
        );
    }
    Ok(())
}

/// The bench's own tools, after everything `run` installs.
pub fn bench_tools() -> anyhow::Result<()> {
    run()?;
    apt_packages(
        BENCH_PACKAGES,
        &cmd::workspace_root().join("target/setup.log"),
    )
}

fn apt_packages(packages: &[&str], log: &Path) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let status = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !status.is_ok_and(|out| {
                String::from_utf8_lossy(&out.stdout).contains("install ok installed")
            })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {}", missing.join(" ")), log, || {
        cmd::logged(Command::new("apt-get").args(["update", "-qq"]), log)?;
        cmd::logged(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                // No initramfs for the VM kernel: virtme-ng boots it with its own.
                .env("INITRD", "No")
                .env("DEBIAN_FRONTEND", "noninteractive"),
            log,
        )
        .context("apt-get install failed")
    })
}

/// The eBPF toolchain named in filemapd-ebpf/rust-toolchain.toml, with rust-src for build-std.
pub fn ebpf_toolchain() -> anyhow::Result<String> {
    let path = cmd::workspace_root().join("filemapd-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|l| l.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .with_context(|| format!("no channel in {}", path.display()))
}

fn nightly_with_rust_src(log: &Path) -> anyhow::Result<()> {
    let toolchain = ebpf_toolchain()?;
    if !succeeds(Command::new("rustup").args(["run", &toolchain, "rustc", "--version"])) {
        bail!(
            "the Rust toolchain {toolchain:?} is not installed: run `rustup toolchain install {toolchain}`"
        );
    }
    let sysroot = cmd::stdout(
        Command::new("rustup").args(["run", &toolchain, "rustc", "--print", "sysroot"]),
    )?;
    if Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
    {
        return Ok(());
    }
    step(&format!("adding rust-src to {toolchain}"), log, || {
        cmd::logged(
            Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                &toolchain,
            ]),
            log,
        )
    })
}

fn bpf_linker(log: &Path) -> anyhow::Result<()> {
    if cmd::stdout(Command::new("bpf-linker").arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    // Its build script finds LLVM through llvm-config, which Debian keeps off PATH.
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let what = format!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    step(&what, log, || {
        cmd::logged(
            Command::new("cargo")
                .args([
                    "install",
                    "--locked",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                ])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("PATH", path),
            log,
        )
        .context("installing bpf-linker failed")
    })
}

/// virtme-ng's `vng`: on PATH, or in the scripts directory of the python3 that installed it
/// (pyenv shims and `--user` installs are not always on a CI shell's PATH).
pub fn vng() -> std::path::PathBuf {
    let scripts = cmd::stdout(Command::new("python3").args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ]));
    match scripts {
        Ok(dir) if Path::new(dir.trim()).join("vng").is_file() => Path::new(dir.trim()).join("vng"),
        _ => "vng".into(),
    }
}

fn virtme_ng(log: &Path) -> anyhow::Result<()> {
    if cmd::stdout(Command::new(vng()).arg("--version"))
        .is_ok_and(|v| v.contains(VIRTME_NG_VERSION))
    {
        return Ok(());
    }
    step(
        &format!("installing virtme-ng {VIRTME_NG_VERSION}"),
        log,
        || {
            cmd::logged(
                Command::new("python3").args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--root-user-action=ignore",
                    &format!("virtme-ng=={VIRTME_NG_VERSION}"),
                ]),
                log,
            )
            .context("pip install virtme-ng failed")
        },
    )
}
