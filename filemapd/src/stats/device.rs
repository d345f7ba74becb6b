//! dm-stats on one device-mapper device: the `@stats_*` target messages, sent through
//! devicemapper-rs's DM_TARGET_MSG support; and the devices a process monitors, opened once.
use std::{collections::HashMap, sync::Arc};

use anyhow::{Context as _, bail};
use devicemapper::{DM, DevId, DmError, DmName, DmNameBuf, errors};

use super::{Counters, Group, Region, RegionSettings, RegionStats, region};

use crate::sectors::SectorRange;

/// What a failed message means, in a line: devicemapper-rs's own text for an ioctl error
/// spells out both ioctl headers, burying the errno. dm-stats answers ENOMEM when its regions
/// would take more than a quarter of RAM, which deserves saying.
fn describe(error: &DmError) -> String {
    match error {
        DmError::Core(errors::Error::Ioctl(_, _, _, errno)) => match **errno {
            nix::errno::Errno::ENOMEM => {
                "Cannot allocate memory (dm-stats keeps its regions within a quarter of RAM)"
                    .to_string()
            }
            errno => errno.desc().to_string(),
        },
        other => other.to_string(),
    }
}

/// A device-mapper device whose statistics we read and change.
pub struct StatsDevice {
    dm: DM,
    name: DmNameBuf,
    major: u32,
    minor: u32,
}

impl StatsDevice {
    /// The dm device with this device number (major, minor).
    pub fn open(major: u32, minor: u32) -> anyhow::Result<Self> {
        let dm = DM::new().map_err(|e| {
            anyhow::anyhow!("cannot open /dev/mapper/control ({e}): is device-mapper available?")
        })?;
        let devices = dm.list_devices().context("listing device-mapper devices")?;
        let Some((name, _, _)) = devices
            .into_iter()
            .find(|(_, dev, _)| dev.major == major && dev.minor == minor)
        else {
            bail!("device {major}:{minor} is not a device-mapper device");
        };
        Ok(Self {
            dm,
            name,
            major,
            minor,
        })
    }

    /// The dm device under a file system whose `st_dev` is given.
    pub fn for_st_dev(st_dev: u64) -> anyhow::Result<Self> {
        Self::open(libc::major(st_dev), libc::minor(st_dev))
    }

    pub fn name(&self) -> &DmName {
        &self.name
    }

    /// The /dev/mapper/control descriptor (kept open when daemonizing).
    pub fn control_fd(&self) -> i32 {
        use std::os::fd::AsRawFd as _;
        self.dm.as_raw_fd()
    }

    pub fn device_number(&self) -> (u32, u32) {
        (self.major, self.minor)
    }

    /// The device's IO so far: (IOs completed, IOs in flight), from its block-layer statistics
    /// in sysfs; `None` when they cannot be read.
    pub fn io_activity(&self) -> Option<(u64, u64)> {
        let path = format!("/sys/dev/block/{}:{}/stat", self.major, self.minor);
        let text = std::fs::read_to_string(path).ok()?;
        let fields: Vec<u64> = text
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // Fields 1 and 5: reads and writes completed; field 9: IOs in flight.
        Some((fields.first()? + fields.get(4)?, *fields.get(8)?))
    }

    /// Sends one `@stats_*` message; the answer, or "" when the kernel returned none.
    fn message(&self, msg: &str) -> anyhow::Result<String> {
        log::trace!("dm message to {}: {msg}", &*self.name);
        MESSAGES_SENT.with(|sent| sent.set(sent.get() + 1));
        let (_, answer) = self
            .dm
            .target_msg(&DevId::Name(&self.name), None, msg)
            .map_err(|e| {
                anyhow::anyhow!(
                    "device {}: message \"{msg}\" failed: {}",
                    &*self.name,
                    describe(&e)
                )
            })?;
        Ok(answer.unwrap_or_default())
    }

    /// Every region on the device, or those of one program_id.
    pub fn list(&self, program_id: Option<&str>) -> anyhow::Result<Vec<Region>> {
        let msg = match program_id {
            Some(p) => format!("@stats_list {p}"),
            None => "@stats_list".to_string(),
        };
        region::parse_list(&self.message(&msg)?)
            .with_context(|| format!("device {}: reading @stats_list", &*self.name))
    }

    /// Creates a one-area region; returns its id.
    pub fn create(
        &self,
        range: SectorRange,
        settings: &RegionSettings,
        program_id: &str,
        aux_data: &str,
    ) -> anyhow::Result<u64> {
        let opt = settings.create_args();
        let msg = if opt.is_empty() {
            format!(
                "@stats_create {range} {} {program_id} {aux_data}",
                range.len
            )
        } else {
            format!(
                "@stats_create {range} {} {opt} {program_id} {aux_data}",
                range.len
            )
        };
        self.message(&msg).and_then(|answer| {
            answer.trim().parse().with_context(|| {
                format!("device {}: @stats_create answered {answer:?}", &*self.name)
            })
        })
    }

    pub fn delete(&self, id: u64) -> anyhow::Result<()> {
        self.message(&format!("@stats_delete {id}")).map(drop)
    }

    pub fn set_aux(&self, id: u64, aux_data: &str) -> anyhow::Result<()> {
        self.message(&format!("@stats_set_aux {id} {aux_data}"))
            .map(drop)
    }

    /// A region's counters, summed over its areas.
    pub fn counters(&self, id: u64) -> anyhow::Result<Counters> {
        self.stats(id).map(|stats| stats.counters)
    }

    /// A region's counters and histogram, summed over its areas.
    pub fn stats(&self, id: u64) -> anyhow::Result<RegionStats> {
        region::parse_print(&self.message(&format!("@stats_print {id}"))?)
            .with_context(|| format!("device {}: region {id} counters", &*self.name))
    }
}

thread_local! {
    static MESSAGES_SENT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many `@stats_*` messages this thread has sent so far: an update (which never awaits)
/// counts its own as the difference, whatever other threads send meanwhile.
pub fn messages_sent() -> u64 {
    MESSAGES_SENT.with(|sent| sent.get())
}

/// The dm devices of the files a process monitors, opened once each (one control descriptor
/// per device, however many files live on it), and each device's region listing as it was
/// when the monitors started: a thousand files on one device need one `@stats_list`, not a
/// thousand.
#[derive(Default)]
pub struct Devices(HashMap<u64, (Arc<StatsDevice>, Option<Vec<Region>>)>);

impl Devices {
    pub fn for_st_dev(&mut self, st_dev: u64) -> anyhow::Result<Arc<StatsDevice>> {
        if let Some((device, _)) = self.0.get(&st_dev) {
            return Ok(Arc::clone(device));
        }
        let device = Arc::new(StatsDevice::for_st_dev(st_dev)?);
        self.0.insert(st_dev, (Arc::clone(&device), None));
        Ok(device)
    }

    /// The group as the start-up listing of its device shows it.
    pub fn group_at_start(&mut self, st_dev: u64, group_id: u64) -> anyhow::Result<Option<Group>> {
        let device = self.for_st_dev(st_dev)?;
        let (_, listing) = self.0.get_mut(&st_dev).expect("opened above");
        if listing.is_none() {
            *listing = Some(device.list(None)?);
        }
        Group::load_from(&device, listing.as_deref().unwrap_or_default(), group_id)
    }
}
