//! A service restarted (SIGTERM, then the same command again: `systemctl restart`, an
//! upgrade) counts its files' IO through the gap. The stopping service pins its programs'
//! links beside its maps, so that they go on counting while no daemon runs. Its successor
//! loads with the same gate word (`names::GATE`: the pid of the daemon whose IO probe counts),
//! takes the files up while the predecessor still counts them, then writes its own pid there —
//! one store, so that each bio is counted by exactly one of the two — adds what the
//! predecessor counted since each file was taken up, and unpins the predecessor's links,
//! which stops its programs.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::{
    maps::{Array, Map, MapData},
    programs::links::FdLink,
};
use filemapd_common::names;

use super::pins;

/// Where a stopped service's links are pinned, in its pin directory.
const LINKS: &str = "links";

/// Where the daemon `pid` pins its links when it stops for a successor (removing it stops
/// the programs).
pub fn pinned_links(pid: u32) -> PathBuf {
    Path::new(pins::ROOT).join(pid.to_string()).join(LINKS)
}

/// A stopped service whose programs still count its files' IO.
pub struct Predecessor {
    pub pid: u32,
    dir: PathBuf,
}

impl Predecessor {
    /// The pin directory of a daemon that no longer runs, with its links pinned and its gate
    /// word holding its own pid (a successor that stopped before it took over left the word
    /// to the daemon before it, whose programs still count).
    pub fn find() -> Option<Predecessor> {
        pins::by_pid(pins::ROOT)
            .into_iter()
            .filter(|(_, dir, running)| !running && dir.join(LINKS).is_dir())
            .find(|(pid, dir, _)| gate_holder(&dir.join(names::GATE)) == Some(*pid))
            .map(|(pid, dir, _)| Predecessor { pid, dir })
    }

    /// Its gate word's pin, which the successor loads its programs with.
    pub fn gate(&self) -> PathBuf {
        self.dir.join(names::GATE)
    }

    /// Its bios in flight's pin, shared as the gate word is.
    pub fn bios(&self) -> PathBuf {
        self.dir.join(names::BIOS)
    }

    /// Unpins its links: its programs stop (its maps stay with the files not taken up).
    pub fn detach(&self) {
        let links = self.dir.join(LINKS);
        match std::fs::remove_dir_all(&links) {
            // Gone with its directory: none of its files lives on.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                log::warn!("unpinning {}: {e}", links.display())
            }
            _ => {}
        }
    }
}

/// The pid a pinned gate word holds.
fn gate_holder(path: &Path) -> Option<u32> {
    let map = Map::from_map_data(MapData::from_pin(path).ok()?).ok()?;
    let gate: Array<MapData, u32> = Array::try_from(map).ok()?;
    gate.get(&0, 0).ok()
}

/// The links of a service's programs, taken out of aya's keeping (where they would be
/// detached when the process ends) so that they can be pinned for a successor. Empty where
/// they are not kept: a daemon that is not the service, or a kernel whose probes are not
/// attached through links (before Linux 5.15).
#[derive(Default)]
pub struct Links {
    kept: Option<Vec<(String, FdLink)>>,
}

impl Links {
    /// Links that a successor can take over, where the kernel allows it.
    pub fn for_successor() -> Self {
        if !aya::features().bpf_perf_link() {
            log::info!("this kernel attaches probes without links: a restart's gap goes uncounted");
            return Self::default();
        }
        Self {
            kept: Some(Vec::new()),
        }
    }

    /// Whether attached programs' links are to be handed here.
    pub fn keeps(&self) -> bool {
        self.kept.is_some()
    }

    pub fn hold(&mut self, program: &str, link: FdLink) {
        if let Some(kept) = &mut self.kept {
            kept.push((program.to_string(), link));
        }
    }

    /// Pins every link under `dir`: the programs stay attached after this process ends.
    pub fn pin_for_successor(&mut self, dir: &Path) {
        let Some(kept) = self.kept.take() else {
            return;
        };
        let links = dir.join(LINKS);
        let count = kept.len();
        let result = (|| -> anyhow::Result<()> {
            std::fs::create_dir_all(&links)
                .with_context(|| format!("creating {}", links.display()))?;
            for (i, (program, link)) in kept.into_iter().enumerate() {
                link.pin(links.join(format!("{i}-{program}")))
                    .with_context(|| format!("pinning the link of {program}"))?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => log::info!(
                "{count} program(s) pinned in {}: the files' IO is counted until the next start",
                links.display()
            ),
            Err(e) => {
                log::warn!("the files' IO goes uncounted until the next start: {e:#}");
                let _ = std::fs::remove_dir_all(&links);
            }
        }
    }
}
