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
# filemapd installed as dmfilemapd, first on PATH: dmstats launches it itself.
mkdir -p /tmp/drop-in && ln -sf FILEMAPD /tmp/drop-in/dmfilemapd
export PATH=/tmp/drop-in:$PATH
echo "\$ dmstats create --filemap /tmp/demo/vm.img"
dmstats create --filemap /tmp/demo/vm.img
sleep 1
echo; echo "\$ pgrep -a dmfilemapd"; pgrep -a dmfilemapd
echo; echo "\$ dmstats list --units s"
dmstats list --units s | tee /tmp/before
echo; echo "\$ dd if=/dev/urandom of=/tmp/demo/vm.img bs=1M count=4 oflag=append conv=notrunc,fsync"
dd if=/dev/urandom of=/tmp/demo/vm.img bs=1M count=4 oflag=append conv=notrunc,fsync status=none
for i in $(seq 100); do dmstats list --units s > /tmp/after; cmp -s /tmp/before /tmp/after || break; sleep 0.1; done
echo; echo "\$ dmstats list --units s   (after the daemon's update)"
cat /tmp/after
echo; echo "\$ filefrag -v -b512 /tmp/demo/vm.img"
filefrag -v -b512 /tmp/demo/vm.img
echo; echo "\$ filemapd show /tmp/demo/vm.img"
FILEMAPD show /tmp/demo/vm.img
echo; echo "\$ dmstats delete --allregions filemapd-demo   (the daemon sees its group go and exits)"
dmstats delete --allregions filemapd-demo
for i in $(seq 100); do pgrep dmfilemapd >/dev/null || break; sleep 0.1; done
pgrep -a dmfilemapd || echo "no dmfilemapd running"
"#;

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    cmd::status(
        Command::new(env!("CARGO"))
            .args(["build", "-p", "filemapd"])
            .current_dir(cmd::workspace_root()),
    )?;
    let filemapd = cmd::workspace_root().join("target/debug/filemapd");
    // The guest sees the host's root read-only: the script travels as a file under target/.
    let script = cmd::workspace_root().join("target/demo.sh");
    std::fs::write(
        &script,
        SCRIPT.replace("FILEMAPD", &filemapd.to_string_lossy()),
    )?;
    let out = vm::run(&format!("sh {}", script.display()), vm::DEFAULT_TIMEOUT)?;
    print!("{}", out.output);
    anyhow::ensure!(out.success, "the demo failed in the VM ({})", out.status);
    Ok(())
}
