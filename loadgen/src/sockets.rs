//! Socket helpers of the load generator, on top of `tradeid-udp`'s batches:
//! connected client sockets, sending a request many times in one
//! `sendmmsg`, and waiting for any of several sockets to become readable.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use tradeid_udp::{SendBatch, BATCH};

/// An ephemeral socket of `target`'s address family, connected to it (so
/// the kernel drops datagrams from any other source).
pub(crate) fn connect_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(target)?;
    Ok(socket)
}

/// Sends `datagram` up to `copies` times on a connected socket, `BATCH` per
/// `sendmmsg`. Returns how many the kernel took; stops early (without an
/// error) when a send fails, e.g. because the socket buffer of a
/// non-blocking socket is full. `batch` must have slots of at least
/// `datagram.len()` bytes.
pub(crate) fn send_copies(
    batch: &mut SendBatch,
    socket: &UdpSocket,
    datagram: &[u8],
    copies: usize,
) -> io::Result<usize> {
    let mut sent = 0;
    while sent < copies {
        for _ in 0..(copies - sent).min(BATCH) {
            batch.next_buffer()[..datagram.len()].copy_from_slice(datagram);
            batch.queue_to_peer(datagram.len());
        }
        let outcome = batch.send(socket)?;
        sent += outcome.sent;
        if outcome.failed > 0 {
            break;
        }
    }
    Ok(sent)
}

/// Waits up to `timeout` until any of `sockets` is readable.
pub(crate) fn wait_readable(sockets: &[UdpSocket], timeout: Duration) -> io::Result<()> {
    let mut fds: Vec<PollFd<'_>> = sockets.iter().map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN)).collect();
    let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match nix::poll::poll(&mut fds, PollTimeout::from(millis)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
