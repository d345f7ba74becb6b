//! `filemapd watch --handoff`: the service end of [`crate::daemon::handoff`]. Connections
//! are accepted here; each hand-over reaches the watch loop with the stream to answer on.
use std::{
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{debug, info, warn};
use tokio::{net::UnixListener, sync::mpsc};

use crate::daemon::handoff::{self, Handed};

/// A hand-over and the connection its answer goes back on.
pub struct Offer {
    pub handed: Handed,
    pub reply: Reply,
}

/// The connection to the daemon that handed a file over.
pub struct Reply(std::os::unix::net::UnixStream);

impl Reply {
    /// Tells the daemon whether the file was taken; it exits when it was.
    pub fn send(mut self, taken: Result<(), String>) {
        let line = match taken {
            Ok(()) => "taken\n".to_string(),
            Err(why) => format!("refused {why}\n"),
        };
        if let Err(e) = self.0.write_all(line.as_bytes()) {
            debug!("hand-over: answering the daemon: {e}");
        }
    }
}

/// Listens on `socket` (root only) and passes each hand-over on. Refuses to start when another
/// service answers on it; a socket left by a service that died is replaced.
pub fn listen(socket: &Path) -> anyhow::Result<mpsc::Receiver<Offer>> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!("another process takes hand-overs on {}", socket.display());
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot take hand-overs on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    info!("taking hand-overs on {}", socket.display());
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("hand-over: accepting a connection: {e}");
                    continue;
                }
            };
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            let trusted = stream
                .peer_cred()
                .is_ok_and(|c| c.uid() == 0 || c.uid() == me);
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let sender = sender.clone();
            // The daemon sends at once after connecting; read it off the runtime's thread.
            tokio::task::spawn_blocking(move || {
                let offer = read_offer(stream, trusted);
                if let Some(offer) = offer {
                    let _ = sender.blocking_send(offer);
                }
            });
        }
    });
    Ok(receiver)
}

fn read_offer(stream: std::os::unix::net::UnixStream, trusted: bool) -> Option<Offer> {
    let refuse = |stream: &std::os::unix::net::UnixStream, why: &str| {
        warn!("hand-over refused: {why}");
        let _ = (&mut &*stream).write_all(format!("refused {why}\n").as_bytes());
    };
    if !trusted {
        refuse(&stream, "only root may hand files over");
        return None;
    }
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    match handoff::receive(stream.as_raw_fd()) {
        Ok(handed) => Some(Offer {
            handed,
            reply: Reply(stream),
        }),
        Err(e) => {
            refuse(&stream, &format!("{e:#}"));
            None
        }
    }
}
