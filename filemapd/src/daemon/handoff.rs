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
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, getsockopt, recvmsg, sendmsg,
    sockopt::PeerCredentials,
};

use crate::daemon::args::FollowMode;

/// Where the service listens unless its config says otherwise.
pub const SOCKET: &str = "/run/filemapd/handoff.sock";

/// Where a daemon offers its file: `FILEMAPD_HANDOFF_SOCKET` (a service whose config names
/// another socket), else [`SOCKET`]. dmstats passes its own environment to the daemons it
/// starts.
pub fn socket_for_daemons() -> PathBuf {
    std::env::var_os("FILEMAPD_HANDOFF_SOCKET")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SOCKET))
}

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
        Ok(stream) => {
            check_listener(&stream, socket)?;
            hand_over(stream, fd, group_id, mode, path).map(|()| true)
        }
        Err(_) => Ok(false), // no service (or a stale socket)
    }
}

/// The descriptor goes only to a service running as root or as this daemon's user: a socket
/// named by the environment may lie where others can listen first.
fn check_listener(stream: &UnixStream, socket: &Path) -> anyhow::Result<()> {
    let uid = getsockopt(stream, PeerCredentials)
        .with_context(|| format!("who listens on {}", socket.display()))?
        .uid();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if uid != 0 && uid != me {
        bail!(
            "the process listening on {} runs as uid {uid}, neither root nor this daemon's user: the file is not handed to it",
            socket.display()
        );
    }
    Ok(())
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
    fn a_service_of_this_user_is_trusted() {
        let (daemon, _service) = UnixStream::pair().unwrap();
        check_listener(&daemon, Path::new("/run/test.sock")).unwrap();
    }

    /// A socket where another user listens (here: nobody, 65534) gets no descriptor.
    #[test]
    fn a_listener_of_another_user_gets_nothing() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
        let dir = std::env::temp_dir().join(format!("filemapd-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let socket = dir.join("h.sock");
        let _ = std::fs::remove_file(&socket);
        let address = nix::sys::socket::UnixAddr::new(&socket).unwrap();
        let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
        // The listener is a forked child that becomes nobody: after a fork in a threaded
        // process only plain system calls, on what was prepared before it.
        // SAFETY: the child makes system calls only and ends with _exit.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => unsafe {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    libc::_exit(1);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let bound = libc::bind(
                    fd,
                    nix::sys::socket::SockaddrLike::as_ptr(&address),
                    nix::sys::socket::SockaddrLike::len(&address),
                );
                if bound != 0 || libc::listen(fd, 1) != 0 {
                    libc::_exit(2);
                }
                libc::write(ready_w.as_raw_fd(), b"r".as_ptr().cast(), 1);
                libc::pause();
                libc::_exit(0)
            },
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop(ready_w);
        let mut ready = [0u8; 1];
        let got = nix::unistd::read(&ready_r, &mut ready);
        let file = File::open("/proc/self/status").unwrap();
        let offered = offer(
            &socket,
            file.as_raw_fd(),
            1,
            FollowMode::Inode,
            Path::new("/a"),
        );
        let _ = nix::sys::signal::kill(child, nix::sys::signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got.ok(), Some(1), "the listener as nobody did not start");
        let err = format!("{:#}", offered.unwrap_err());
        assert!(err.contains("uid 65534"), "{err}");
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
