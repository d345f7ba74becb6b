//! A Prometheus scrape of many files counted by the kernel, natively. The scale section
//! measures a whole `watch --regions none` in the VM, where building the answer costs about
//! 9 ns a byte under emulation (this section run in the VM: 360 ms for 37.7 MB), and sending
//! it about as much again; here the same answer is built on this machine's kernel: the
//! daemon's metrics board with one file per slot of real counting maps, read in one batch as
//! a scrape reads them; then the same board served by the daemon's own HTTP server and
//! fetched over a loopback socket, as Prometheus fetches it.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Instant};

use filemapd::{
    daemon::{
        metrics::{self, Board, Wakeup},
        tally::Tally,
    },
    wake::ebpf::{MANY_FILES_TABLES, standalone_counting},
};
use filemapd_common::{Bounds, FileCounters};

use crate::{median_and_spread, native::SOME_DM_DEVICE, report};

/// A path as long as the scale section's (`/tmp/…/mnt/images/vmN.img`), so that the
/// answers' sizes compare.
const IMAGES: &str = "/tmp/filemapd-scratch-XXXXXX/mnt/images";

pub fn run(rounds: usize) {
    let scrapes = rounds.max(5);
    report!("## A scrape of files counted by the kernel, natively\n");
    report!(
        "*On the machine's own kernel, not in the VM.* The metrics board of `watch --regions\nnone` with N files, each published as its monitor publishes it and counted in a slot of\nreal counting maps (carried-over counts of one 64 KiB write, so that no value is a bare\n0), answered as a scrape answers: every slot's counters read in one batch, then the text\nformat; then the whole scrape: the board served by the daemon's HTTP server (on a\ncurrent-thread runtime, as `watch` runs it), fetched over a loopback socket and read to its\nend. Cells: ms per scrape, median (lowest–highest) of {scrapes} after a first; the answer's\nsize (compare the scale section's, made in the VM by a real watch).\n"
    );
    report!("| files | answer built, ms | whole scrape over HTTP, ms | scrape KiB |");
    report!("| --- | --- | --- | --- |");
    let mut written_once = FileCounters {
        writes: 1,
        write_sectors: 128,
        write_ns: 180_000,
        ..Default::default()
    };
    written_once.histogram[4] = 1;
    for files in [1_000usize, 10_000] {
        let counting = Arc::new(
            standalone_counting(files as u32 + 1, MANY_FILES_TABLES)
                .expect("the counting maps load on this kernel"),
        );
        let board = Arc::new(Board::default());
        let published: Vec<_> = (0..files)
            .map(|i| {
                let counted = counting
                    .open(SOME_DM_DEVICE, Bounds::default(), written_once)
                    .unwrap()
                    .expect("a slot for every file");
                let reporter = board.reporter();
                reporter.publish_without_regions(
                    &PathBuf::from(format!("{IMAGES}/vm{i}.img")),
                    "filemapd-bench",
                    Tally {
                        passes: 1,
                        ..Default::default()
                    },
                    Wakeup::Events,
                    Some(&counted),
                );
                (reporter, counted)
            })
            .collect();
        let endpoint = metrics::endpoint(Arc::clone(&board));
        let mut first = Vec::new();
        metrics::scrape(&endpoint, |piece| {
            first.extend_from_slice(&piece);
            true
        })
        .expect("a scrape");
        let first = String::from_utf8(first).expect("the text format is UTF-8");
        assert!(
            first.contains(&format!("{IMAGES}/vm{}.img", files - 1)),
            "the scrape names every file"
        );
        let ms = (0..scrapes)
            .map(|_| {
                let started = Instant::now();
                // As the server answers: each piece handed on (and here dropped) when full.
                let mut bytes = 0;
                metrics::scrape(&endpoint, |piece| {
                    bytes += piece.len();
                    true
                })
                .expect("a scrape");
                let took = started.elapsed();
                assert_eq!(bytes, first.len(), "scrapes of the same counts");
                took.as_secs_f64() * 1e3
            })
            .collect();
        let over_http = scrapes_over_http(&board, scrapes, first.len());
        report!(
            "| {files} | {} | {} | {} |",
            median_and_spread(ms, 1),
            median_and_spread(over_http, 1),
            first.len() >> 10
        );
        for (_, counted) in published {
            counting.close(counted.slot);
        }
    }
    report!("");
}

/// `scrapes` scrapes of the board through the daemon's HTTP server, after a first: ms each,
/// from the request to the answer's last byte. Each answer must be `bytes` long.
fn scrapes_over_http(board: &Arc<Board>, scrapes: usize, bytes: usize) -> Vec<f64> {
    let address = SocketAddr::from(([127, 0, 0, 1], 9739));
    let runtime = crate::runtime_for_tracers();
    let server = runtime
        .block_on(metrics::serve(address, Arc::clone(board)))
        .expect("the bench's metrics port is free");
    // The server runs on its own thread, as the watch's runtime would, while this one scrapes.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = std::thread::spawn(move || {
        runtime.block_on(async {
            tokio::select! {
                _ = server => {}
                _ = stopped => {}
            }
        })
    });
    let scrape = || {
        let started = Instant::now();
        let (status, got) =
            filemapd_tests::metrics::http_get_len(&address.to_string(), "/metrics").unwrap();
        assert_eq!((status, got), (200, bytes), "a whole answer over HTTP");
        started.elapsed().as_secs_f64() * 1e3
    };
    scrape();
    let ms = (0..scrapes).map(|_| scrape()).collect();
    let _ = stop.send(());
    serving.join().unwrap();
    ms
}
