//! The systemd readiness protocol (`sd_notify`) for the packaged `Type=notify` unit:
//! `READY=1` once the listeners are bound and the stores open, `RELOADING=1` then
//! `READY=1` again around a SIGHUP reload (the unit's `ExecReload` sends the
//! signal; `Type=notify-reload`, which would need `MONOTONIC_USEC` too, is newer
//! than Debian 12's systemd 252), `STOPPING=1` when a stop begins. Outside systemd (no `NOTIFY_SOCKET`) it does nothing. It must never
//! stop the server: a message that cannot be sent is logged and forgotten.
//!
//! A few lines over a Unix datagram socket rather than a crate: the protocol is one
//! datagram of `KEY=VALUE` lines, and the socket is a path or, with a leading `@`, an
//! abstract name (Linux).

use std::ffi::OsStr;
use std::io;

/// Tells systemd the server is serving: call once every listener is bound.
pub fn notify_ready() {
    notify("READY=1");
}

/// Tells systemd a reload (SIGHUP) has begun; [`notify_ready`] says it is over.
pub fn notify_reloading() {
    notify("RELOADING=1");
}

/// Tells systemd the server is stopping: call when the shutdown signal arrives.
pub fn notify_stopping() {
    notify("STOPPING=1");
}

/// Sends `state` to `$NOTIFY_SOCKET`, when systemd set it.
fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(error) = send(&socket, state) {
        tracing::warn!(%error, state, socket = %socket.to_string_lossy(), "cannot notify systemd");
    }
}

/// Sends one notification datagram to `socket` (a path, or `@name` for an abstract
/// socket).
#[cfg(unix)]
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;

    let datagram = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => send_abstract(&datagram, name, state),
        None => datagram
            .send_to(state.as_bytes(), std::path::Path::new(socket))
            .map(drop),
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(
    datagram: &std::os::unix::net::UnixDatagram,
    name: &[u8],
    state: &str,
) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    datagram.send_to_addr(state.as_bytes(), &address).map(drop)
}

#[cfg(all(unix, not(target_os = "linux")))]
fn send_abstract(
    _datagram: &std::os::unix::net::UnixDatagram,
    _name: &[u8],
    _state: &str,
) -> io::Result<()> {
    Err(io::Error::other("abstract sockets exist on Linux only"))
}

/// Not on Unix: there is no systemd to tell.
#[cfg(not(unix))]
pub fn send(_socket: &OsStr, _state: &str) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::send;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn ready_reaches_a_socket_named_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();

        send(path.as_os_str(), "READY=1").unwrap();

        let mut buffer = [0u8; 64];
        let length = systemd.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stopping_reaches_an_abstract_socket_named_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("lime-server-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let systemd = UnixDatagram::bind_addr(&address).unwrap();

        send(format!("@{name}").as_ref(), "STOPPING=1").unwrap();

        let mut buffer = [0u8; 64];
        let length = systemd.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(send(dir.path().join("absent").as_os_str(), "READY=1").is_err());
    }
}
