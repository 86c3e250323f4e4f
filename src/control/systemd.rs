//! systemd integration: sd_notify(3) messages and the watchdog interval.
//! A leaf: it knows nothing of what it reports.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The watchdog interval systemd asked for, if it is meant for this process
/// (`WATCHDOG_USEC`, and `WATCHDOG_PID` if set).
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends datagrams to `$NOTIFY_SOCKET` (a path, or `@abstract`); does
/// nothing when it is not set.
pub(crate) struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    pub(crate) fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Notifier { socket }
    }

    /// Sends one notification (e.g. `READY=1`); failures are logged.
    pub(crate) fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!("cannot notify systemd ({message:?}): {e}");
            }
        }
    }
}
