//! One set of programs per host, whoever launches: a `dmfilemapd` that Debian's dmstats starts
//! hands its file (the descriptor dmstats gave it) to a running `filemapd watch --handoff`
//! over a local socket and exits; the service keeps that group from then on. With no service,
//! the daemon runs alone as before. Only root (or the service's own user) may hand a file
//! over: the service checks the peer's credentials.
//!
//! The exchange: one message carrying the descriptor (SCM_RIGHTS) and the text
//! `filemapd-handoff 1\n<group_id>\n<inode|path>\n<path>`; the answer is one line, `taken`
//! or `refused <why>`.
use std::{
    fs::File,
    io::{IoSlice, IoSliceMut, Read as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::daemon::args::FollowMode;

/// Where the service listens.
pub const SOCKET: &str = "/run/filemapd/handoff.sock";

const HEADER: &str = "filemapd-handoff 1";

/// How long a daemon waits for the service's answer before running alone.
const ANSWER: Duration = Duration::from_secs(10);

/// Daemon side: offers the file to the service. `Ok(true)`: the service took it (the daemon
/// exits); `Ok(false)`: no service listens; `Err`: a service is there but refused or failed
/// (the daemon runs alone, after saying why).
pub fn offer(
    socket: &Path,
    fd: RawFd,
    group_id: u64,
    mode: FollowMode,
    path: &Path,
) -> anyhow::Result<bool> {
    match UnixStream::connect(socket) {
        Ok(stream) => hand_over(stream, fd, group_id, mode, path).map(|()| true),
        Err(_) => Ok(false), // no service (or a stale socket)
    }
}

/// Sends the file and what to watch on a connected stream, and waits for `taken`.
fn hand_over(
    mut stream: UnixStream,
    fd: RawFd,
    group_id: u64,
    mode: FollowMode,
    path: &Path,
) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(ANSWER))?;
    let text = format!("{HEADER}\n{group_id}\n{mode}\n{}", path.display());
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        &[ControlMessage::ScmRights(&[fd])],
        MsgFlags::empty(),
        None,
    )
    .context("handing the file to the service")?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .context("waiting for the service's answer")?;
    match answer.trim() {
        "taken" => Ok(()),
        other => bail!(
            "the service did not take the file: {}",
            other.strip_prefix("refused ").unwrap_or(other)
        ),
    }
}

/// A file handed over: its group, how it is followed, its path, and the descriptor.
pub struct Handed {
    pub what: HandedGroup,
    pub file: File,
}

/// What a hand-over names (the watch makes its own entry of it: this module stays free of
/// the watch's types, which use it).
#[derive(Debug, PartialEq, Eq)]
pub struct HandedGroup {
    pub group_id: u64,
    pub mode: FollowMode,
    pub path: PathBuf,
}

/// Service side: reads one hand-over from a connected daemon (the caller has checked its
/// credentials and that the socket is readable).
pub fn receive(socket: RawFd) -> anyhow::Result<Handed> {
    let mut buffer = [0u8; 8192];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let message = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("reading a hand-over")?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(received);
        }
    }
    let length = message.bytes;
    // SAFETY: the kernel just installed these descriptors in this process for us; each is
    // owned from here on (closed when dropped).
    let mut files: Vec<File> = fds
        .into_iter()
        .map(|fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    let text = std::str::from_utf8(&buffer[..length]).context("a hand-over that is not text")?;
    let what = parse(text)?;
    if files.len() != 1 {
        bail!("a hand-over must carry one descriptor, not {}", files.len());
    }
    Ok(Handed {
        what,
        file: files.remove(0),
    })
}

fn parse(text: &str) -> anyhow::Result<HandedGroup> {
    let mut lines = text.splitn(4, '\n');
    if lines.next() != Some(HEADER) {
        bail!("not a filemapd hand-over");
    }
    let group_id = lines
        .next()
        .and_then(|g| g.parse().ok())
        .context("a hand-over without a group id")?;
    let mode = match lines.next() {
        Some("inode") => FollowMode::Inode,
        Some("path") => FollowMode::Path,
        other => bail!("a hand-over with mode {other:?}"),
    };
    let path = PathBuf::from(lines.next().unwrap_or_default());
    if !path.is_absolute() {
        bail!("a hand-over whose path is not absolute");
    }
    Ok(HandedGroup {
        group_id,
        mode,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_goes_across_with_what_to_watch() {
        let (daemon, service) = UnixStream::pair().unwrap();
        let file = File::open("/proc/self/status").unwrap();
        let path = Path::new("/var/lib/images/my vm.img");
        let offering = std::thread::spawn(move || {
            hand_over(daemon, file.as_raw_fd(), 7, FollowMode::Path, path).map(|()| drop(file))
        });
        let handed = receive(service.as_raw_fd()).unwrap();
        assert_eq!(
            handed.what,
            HandedGroup {
                group_id: 7,
                mode: FollowMode::Path,
                path: path.to_path_buf()
            }
        );
        assert!(handed.file.metadata().is_ok());
        std::io::Write::write_all(&mut &service, b"taken\n").unwrap();
        drop(service);
        offering.join().unwrap().unwrap();
    }

    #[test]
    fn bad_hand_overs_are_refused() {
        for text in [
            "hello\n0\ninode\n/a",
            "filemapd-handoff 1\nx\ninode\n/a",
            "filemapd-handoff 1\n0\nboth\n/a",
            "filemapd-handoff 1\n0\ninode\nrelative",
            "filemapd-handoff 1\n0",
        ] {
            assert!(parse(text).is_err(), "{text:?}");
        }
    }
}
