//! systemd's notification protocol (`sd_notify`), without libsystemd: one datagram per
//! message to `$NOTIFY_SOCKET`. Outside systemd (no socket) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tracing::debug;

#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, NotifyAddr)>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
enum NotifyAddr {
    Path(std::path::PathBuf),
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> Self {
        Self::new(
            std::env::var_os("NOTIFY_SOCKET").map(|s| s.to_string_lossy().into_owned()),
            std::env::var("WATCHDOG_USEC").ok(),
            std::env::var("WATCHDOG_PID").ok(),
        )
    }

    /// `socket`: `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    /// `watchdog_usec` / `watchdog_pid`: as systemd sets them; the watchdog applies only
    /// when the pid is ours (or unset).
    pub fn new(
        socket: Option<String>,
        watchdog_usec: Option<String>,
        watchdog_pid: Option<String>,
    ) -> Self {
        let addr = socket.and_then(|s| {
            if let Some(name) = s.strip_prefix('@') {
                #[cfg(target_os = "linux")]
                return Some(NotifyAddr::Abstract(name.as_bytes().to_vec()));
                #[cfg(not(target_os = "linux"))]
                return None;
            }
            (!s.is_empty()).then(|| NotifyAddr::Path(s.into()))
        });
        let socket = addr.and_then(|a| UnixDatagram::unbound().ok().map(|u| (u, a)));
        let ours = watchdog_pid
            .map(|p| p.trim().parse::<u32>().ok() == Some(std::process::id()))
            .unwrap_or(true);
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Self { socket, watchdog }
    }

    /// The watchdog timeout systemd expects pings within, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Send one notification such as `READY=1` or `STATUS=...`. Failures are logged at
    /// debug only: losing a status line must never disturb the daemon.
    pub fn notify(&self, state: &str) {
        let Some((sock, addr)) = &self.socket else {
            return;
        };
        let r = match addr {
            NotifyAddr::Path(p) => sock.send_to(state.as_bytes(), p),
            #[cfg(target_os = "linux")]
            NotifyAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
            }
        };
        if let Err(e) = r {
            debug!("sd_notify {state:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket_and_watchdog_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(
            Some(path.display().to_string()),
            Some("3000000".into()),
            Some(std::process::id().to_string()),
        );
        assert_eq!(n.watchdog(), Some(Duration::from_secs(3)));
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }

    #[test]
    fn watchdog_for_another_pid_or_no_socket_is_ignored() {
        let n = Notifier::new(None, Some("3000000".into()), Some("1".into()));
        assert_eq!(n.watchdog(), None);
        assert!(!n.enabled());
        n.notify("READY=1"); // no-op, no panic
    }
}
