//! The device-mapper VM: Debian's kernel under qemu's software emulation (this machine's
//! /dev/kvm cannot run stock kernels), booted by virtme-ng with the host's root file system
//! shared read-only, so binaries built here run unchanged inside. One boot runs one script;
//! callers batch their tests into it.
use std::{
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The VM's process group, for the signal handler: vng → virtme-run → qemu all live in it.
static VM_PROCESS_GROUP: AtomicI32 = AtomicI32::new(0);

/// Ctrl-C, SIGTERM or a hang-up of xtask must not leave qemu running.
extern "C" fn kill_vm_and_exit(signal: libc::c_int) {
    let group = VM_PROCESS_GROUP.load(Ordering::SeqCst);
    // SAFETY: kill and _exit are async-signal-safe.
    unsafe {
        if group > 0 {
            libc::kill(-group, libc::SIGKILL);
        }
        libc::_exit(128 + signal);
    }
}

fn kill_vm_on_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe { libc::signal(signal, kill_vm_and_exit as *const () as libc::sighandler_t) };
    }
}

/// Long enough for the whole VM suite of `cargo xtask test` on a slow host: it took about
/// 450 s per kernel on one machine and about 870 s on another (2026-11-27), whose emulation
/// ran 3 times slower; a hung VM still ends well within CI's 90 minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1500);

/// Guest memory for the test suite, the demo and `xtask vm` (vng's `--memory` syntax): enough
/// for their files' regions (each ~64 KiB of dm-stats memory); the bench asks for more.
pub const DEFAULT_MEMORY: &str = "2G";

pub struct VmOutput {
    /// Whether the script exited 0 inside the guest.
    pub success: bool,
    pub status: String,
    /// The guest's console output (stdout and stderr).
    pub output: String,
    pub elapsed: Duration,
}

/// Debian kernel series the VM tests run on, each by name (tracepoint formats, iomap and
/// dm-stats change between releases): bookworm's own 6.1 and its 6.12 LTS build. The first is
/// the one `demo`, `bench` and `vm` boot.
pub const KERNEL_SERIES: [&str; 2] = ["6.1", "6.12"];

/// Fails, naming the series there are, unless `series` is one of [`KERNEL_SERIES`].
pub fn check_series(series: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        KERNEL_SERIES.contains(&series),
        "no kernel series {series:?} (there are: {})",
        KERNEL_SERIES.join(", ")
    );
    Ok(())
}

/// The newest installed Debian kernel image of one series (`6.1` finds vmlinuz-6.1.0-56-amd64,
/// not 6.12).
pub fn kernel(series: &str) -> anyhow::Result<PathBuf> {
    let prefix = format!("vmlinuz-{series}.");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .with_context(|| format!("no {series} kernel in /boot: run `cargo xtask setup`"))
}

/// Boots the VM ([`DEFAULT_MEMORY`]), runs `script` with /bin/sh inside it, and returns its status and
/// output. Kills the whole qemu process group if it is not done within `timeout`.
pub fn run(script: &str, timeout: Duration) -> anyhow::Result<VmOutput> {
    run_on(KERNEL_SERIES[0], script, timeout, DEFAULT_MEMORY)
}

/// [`run`] on a kernel series of [`KERNEL_SERIES`], with an amount of guest memory (vng's
/// `--memory` syntax).
pub fn run_on(
    series: &str,
    script: &str,
    timeout: Duration,
    memory: &str,
) -> anyhow::Result<VmOutput> {
    run_with_args(series, script, timeout, memory, &[])
}

/// [`run_on`] with more kernel command-line arguments for the guest. A VM that ends within a
/// minute without any output never booted, and ran nothing of `script` (seen with the 6.12
/// kernel: 7.9 s into a test run's phase, right after another VM; exit status 255 once by
/// hand): it is started once more, and that is said.
pub fn run_with_args(
    series: &str,
    script: &str,
    timeout: Duration,
    memory: &str,
    kernel_args: &[&str],
) -> anyhow::Result<VmOutput> {
    let out = boot(series, script, timeout, memory, kernel_args)?;
    if out.success || !out.output.trim().is_empty() || out.elapsed >= Duration::from_secs(60) {
        return Ok(out);
    }
    eprintln!(
        "the VM on {series} ended ({}) after {:.1?} without any output: starting it once more",
        out.status, out.elapsed
    );
    boot(series, script, timeout, memory, kernel_args)
}

/// One boot of the VM for [`run_with_args`].
fn boot(
    series: &str,
    script: &str,
    timeout: Duration,
    memory: &str,
    kernel_args: &[&str],
) -> anyhow::Result<VmOutput> {
    let kernel = kernel(series)?;
    if !crate::cmd::succeeds(Command::new("qemu-system-x86_64").arg("--version")) {
        bail!("qemu-system-x86_64 not found: run `cargo xtask setup`");
    }
    kill_vm_on_signals();
    let started = Instant::now();
    let mut child = Command::new(crate::setup::vng())
        .args(["--disable-kvm", "--memory", memory, "--cpus", "2"])
        .args(kernel_args.iter().flat_map(|arg| ["--append", arg]))
        .arg("--run")
        .arg(&kernel)
        .arg("--exec")
        .arg(script)
        // vng crashes on a closed stdin, and its output must be read through a pipe.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start vng (virtme-ng): run `cargo xtask setup`")?;
    let pgid = child.id() as i32;
    VM_PROCESS_GROUP.store(pgid, Ordering::SeqCst);
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Whatever happened, no qemu of ours outlives this call.
    // SAFETY: signalling our own child's process group.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    VM_PROCESS_GROUP.store(0, Ordering::SeqCst);
    let _ = child.wait();
    let mut output = out_reader.join().unwrap_or_default();
    output.push_str(&err_reader.join().unwrap_or_default());
    let Some(status) = status else {
        bail!("the VM did not finish within {timeout:?}; its output:\n{output}");
    };
    Ok(VmOutput {
        success: status.success(),
        status: status.to_string(),
        output,
        elapsed: started.elapsed(),
    })
}
