//! Start-up at native speed (issue 25's target: `watch --ebpf` ready in ≤ 0.5 s). Under
//! emulation the watch takes seconds to load its programs; here, on this machine's kernel:
//! `filemapd watch --ebpf` until it tells systemd it is ready, every program loaded and
//! verified as a dm host's watch loads them, and what each cost the verifier.
use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use filemapd::wake::ebpf::{MANY_FILES_TABLES, Tracer};
use filemapd_tests::{FsKind, LoopFs, ScratchDir, daemon::NotifyingService};

use crate::{median, median_and_spread, monitors::filemapd_binary, ms, report};

/// How long the watch may take to say READY=1 before the bench gives up on it.
const READY_WITHIN: Duration = Duration::from_secs(60);
const TARGET_MS: f64 = 500.0;

pub fn run(rounds: usize) {
    report!("## Start-up at native speed\n");
    report!(
        "*On the machine's own kernel, not in the VM.* Here there is no device-mapper, so the\nwatch cannot read dm's layout and loads no IO probe: the first row is the real process\nfrom its start until it sends systemd READY=1 (`filemapd watch --ebpf DIR`, one 1 MiB file\nof a loop-mounted ext4, so none is mapped), the second loads and verifies every program as\na dm host's watch does, the IO probe and the new-file probes included (with a made-up\nlayout of dm's structures; not attached), in the bench's own process. Neither holds the\nread of dm's layout from the kernel's BTF that a dm host's first watch after boot makes\n(later ones find it in /run/filemapd). Median (lowest–highest) of {rounds} rounds.\n"
    );
    let runtime = crate::runtime_for_tracers();
    let _inside = runtime.enter();
    let mut loads = Vec::new();
    let mut counts = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let mut tracer = Tracer::load_pretending_device_mapper(16, MANY_FILES_TABLES)
            .expect("the eBPF programs load on this kernel");
        tracer
            .counting_unattached(MANY_FILES_TABLES)
            .expect("the counting's programs load on this kernel");
        loads.push(ms(started.elapsed()));
        counts = tracer.verified_instructions();
    }
    let readies = watch_until_ready(rounds);
    report!("| what | ms |");
    report!("| --- | --- |");
    report!(
        "| `filemapd watch --ebpf DIR` until READY=1 (no IO probe here) | {} |",
        median_and_spread(readies.clone(), 0)
    );
    report!(
        "| every program loaded and verified as a dm host's watch loads them | {} |",
        median_and_spread(loads.clone(), 0)
    );
    let verdict = |median_ms: f64| {
        if median_ms <= TARGET_MS {
            "met"
        } else {
            "missed"
        }
    };
    let (ready_ms, load_ms) = (median(readies), median(loads));
    report!(
        "\nTarget: ready in ≤ {TARGET_MS:.0} ms natively: the watch here {ready_ms:.0} ms ({}); with every program a dm host loads, the load alone {load_ms:.0} ms ({}).\n",
        verdict(ready_ms),
        verdict(load_ms)
    );
    let total: u32 = counts.iter().map(|(_, n)| n).sum();
    report!(
        "Instructions the verifier walked per program (the load's time is mostly this; the VM's\nkernels walk the same code). `host_ebpf`'s `every_program_verifies_within_its_budget`\nfails when a program passes its budget. All programs: {total}.\n"
    );
    report!("| program | instructions verified |");
    report!("| --- | --- |");
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (name, count) in counts {
        report!("| {name} | {count} |");
    }
    report!("");
}

/// Milliseconds from each start of `filemapd watch --ebpf DIR` to its READY=1.
fn watch_until_ready(rounds: usize) -> Vec<f64> {
    let scratch = ScratchDir::new(Path::new("/var/tmp"), "bench-start-up").unwrap();
    let loopfs = LoopFs::new(&scratch.0, FsKind::Ext4).unwrap();
    let dir = loopfs.mount.dir.join("images");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a.img"), vec![0x5a; 1 << 20]).unwrap();
    (0..rounds)
        .map(|round| {
            // Where systemd would listen for Type=notify's READY=1.
            let socket = scratch.0.join(format!("notify-{round}.sock"));
            let started = Instant::now();
            let mut watch = NotifyingService::start(
                &filemapd_binary(),
                &["watch".as_ref(), "--ebpf".as_ref(), dir.as_os_str()],
                &socket,
            );
            watch.wait_ready(READY_WITHIN);
            let ready = ms(started.elapsed());
            let status = watch.stop();
            assert!(status.success(), "the watch ended with {status} on SIGTERM");
            ready
        })
        .collect()
}
