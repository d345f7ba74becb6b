//! `cargo xtask demo`: in the device-mapper VM, put ext4 on dm-linear, write a fragmented file,
//! let Debian's dmstats map it into a region group, and show `dmstats list` beside filemapd's
//! own reading of the same group.
use std::process::Command;

use crate::{cmd, setup, vm};

const SCRIPT: &str = r#"set -e
modprobe -a dm_mod loop
cd /tmp
truncate -s 512M demo.img
LOOP=$(losetup --find --show demo.img)
dmsetup create filemapd-demo --table "0 $(blockdev --getsz $LOOP) linear $LOOP 0"
mkfs.ext4 -q /dev/mapper/filemapd-demo
mkdir -p /tmp/demo && mount /dev/mapper/filemapd-demo /tmp/demo
dd if=/dev/urandom of=/tmp/demo/vm.img bs=1M count=8 conv=fsync status=none
for mib in 1 3 6; do fallocate --punch-hole --offset $((mib << 20)) --length 524288 /tmp/demo/vm.img; done
sync
echo "\$ dmstats create --filemap --nomonitor /tmp/demo/vm.img"
dmstats create --filemap --nomonitor /tmp/demo/vm.img
echo; echo "\$ dmstats list --units s"
dmstats list --units s
echo; echo "\$ filefrag -v -b512 /tmp/demo/vm.img"
filefrag -v -b512 /tmp/demo/vm.img
echo; echo "\$ filemapd show /tmp/demo/vm.img"
FILEMAPD show /tmp/demo/vm.img
"#;

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    cmd::status(Command::new(env!("CARGO")).args(["build", "-p", "filemapd"]).current_dir(cmd::workspace_root()))?;
    let filemapd = cmd::workspace_root().join("target/debug/filemapd");
    let out = vm::run(&SCRIPT.replace("FILEMAPD", &filemapd.to_string_lossy()), vm::DEFAULT_TIMEOUT)?;
    print!("{}", out.output);
    anyhow::ensure!(out.success, "the demo failed in the VM ({})", out.status);
    Ok(())
}
