//! Batched UDP for tradeid: building SO_REUSEPORT socket groups with
//! socket2, and `recvmmsg`/`sendmmsg` over buffers allocated once per
//! thread. This crate holds the project's only syscall `unsafe`; the server's
//! workers and the load generator both build on it.
//!
//! Nothing here allocates, logs or returns an error per datagram: a send that
//! fails is counted and skipped. Only errors that mean the socket itself is
//! broken (a bug, not traffic) are returned; see [`is_fatal`].

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 32;

/// Receive buffer per datagram. A valid request is 8 bytes; longer ones are
/// padding, and their true length is still reported (MSG_TRUNC).
pub const RECV_SLOT: usize = 2048;

/// How sockets are built.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    /// SO_RCVBUF to ask for, in bytes.
    pub recv_buffer: usize,
    /// SO_SNDBUF to ask for, in bytes.
    pub send_buffer: usize,
    /// How long a blocking receive waits before the worker looks around
    /// (for shutdown and heartbeats).
    pub read_timeout: Duration,
}

/// Buffer sizes the kernel actually granted (Linux reports double the
/// usable size; these are the raw values it returns).
#[derive(Clone, Copy, Debug)]
pub struct GrantedBuffers {
    /// SO_RCVBUF as read back.
    pub recv: usize,
    /// SO_SNDBUF as read back.
    pub send: usize,
}

/// Binds `count` SO_REUSEPORT sockets to `addr`.
///
/// Port 0 means a port no other socket holds. The kernel's own choice for
/// an SO_REUSEPORT socket does not promise that: it may pick a port that
/// another SO_REUSEPORT group of the same user holds, and join that group
/// (it skips only the ports it could not share). So the port is first
/// taken by a plain socket, which the kernel never gives a held port, then
/// released and the group bound there. If something took it in between,
/// the group is dropped and another port chosen, at most
/// [`PORT_ZERO_TRIES`] times.
pub fn bind_group(
    addr: SocketAddr,
    count: usize,
    options: &SocketOptions,
) -> io::Result<(Vec<UdpSocket>, SocketAddr, GrantedBuffers)> {
    if addr.port() != 0 {
        return bind_group_on(addr, count, options);
    }
    for _ in 0..PORT_ZERO_TRIES {
        // The probe's own address keeps an IPv6 scope (`fe80::1%2`).
        let local = UdpSocket::bind(addr)?.local_addr()?;
        match bind_group_on(local, count, options) {
            // A /proc that cannot be read leaves the check to the caller,
            // which reports it (the server refuses to start without it).
            Ok(group) if foreign_sockets(local, &group.0).map_or(true, |found| found.is_empty()) => return Ok(group),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("every one of {PORT_ZERO_TRIES} free ports chosen for {addr} was taken while binding to it"),
    ))
}

/// How many ports [`bind_group`] tries for port 0 before giving up.
pub const PORT_ZERO_TRIES: usize = 16;

/// Binds `count` SO_REUSEPORT sockets to `addr`, which has a port.
fn bind_group_on(
    addr: SocketAddr,
    count: usize,
    options: &SocketOptions,
) -> io::Result<(Vec<UdpSocket>, SocketAddr, GrantedBuffers)> {
    let (first, granted) = bind_one(addr, options)?;
    let local = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(bind_one(local, options)?.0);
    }
    Ok((sockets, local, granted))
}

fn bind_one(addr: SocketAddr, options: &SocketOptions) -> io::Result<(UdpSocket, GrantedBuffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    // Buffer sizes are best effort: the kernel caps them at net.core.*mem_max
    // and we report what we got rather than fail.
    let _ = socket.set_recv_buffer_size(options.recv_buffer);
    let _ = socket.set_send_buffer_size(options.send_buffer);
    socket.set_read_timeout(Some(options.read_timeout))?;
    socket.bind(&addr.into())?;
    let granted = GrantedBuffers { recv: socket.recv_buffer_size()?, send: socket.send_buffer_size()? };
    Ok((socket.into(), granted))
}

/// A UDP socket bound to the same port as ours that we did not create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignSocket {
    /// Its local address.
    pub addr: SocketAddr,
    /// Its socket inode (as in `/proc/PID/fd`).
    pub inode: u64,
    /// The user that owns it.
    pub uid: u32,
}

/// Every UDP socket in this network namespace that could receive
/// datagrams meant for `addr`, other than `ours`: bound to the same port
/// with the same address, or where either side is a wildcard (`0.0.0.0`,
/// `::`). Read from `/proc/net/udp` and `/proc/net/udp6`, matching socket
/// inodes, so it sees sockets of every process and user.
///
/// SO_REUSEPORT lets a second socket of the same user join a port; the
/// kernel then splits traffic between the two. A server that must never
/// share its address calls this after binding: if two servers start at
/// once, each sees the other and at least one refuses.
pub fn foreign_sockets(addr: SocketAddr, ours: &[UdpSocket]) -> io::Result<Vec<ForeignSocket>> {
    foreign_sockets_except(addr, &socket_inodes(ours)?)
}

/// [`foreign_sockets`], with our sockets named by their inodes (from
/// [`socket_inodes`]): for a check repeated after the sockets have gone to
/// their threads.
pub fn foreign_sockets_except(addr: SocketAddr, mine: &[u64]) -> io::Result<Vec<ForeignSocket>> {
    let mut foreign = Vec::new();
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            // No IPv6 in this kernel: nothing can be bound there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let Some(entry) = parse_proc_udp_line(line) else { continue };
            if entry.addr.port() == addr.port() && overlaps(entry.addr.ip(), addr.ip()) && !mine.contains(&entry.inode)
            {
                foreign.push(entry);
            }
        }
    }
    Ok(foreign)
}

/// Whether datagrams for `ours` could reach a socket bound to `theirs`.
fn overlaps(theirs: IpAddr, ours: IpAddr) -> bool {
    theirs.is_unspecified() || ours.is_unspecified() || theirs.to_canonical() == ours.to_canonical()
}

/// The inodes of `sockets`, as [`foreign_sockets_except`] takes them.
pub fn socket_inodes(sockets: &[UdpSocket]) -> io::Result<Vec<u64>> {
    sockets.iter().map(socket_inode).collect()
}

/// The inode of a socket, from its `/proc/self/fd` entry.
fn socket_inode(socket: &UdpSocket) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))?.ino())
}

/// Parses one line of `/proc/net/udp{,6}`:
/// `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`,
/// addresses as hex of the kernel's in-memory words, ports big-endian hex.
fn parse_proc_udp_line(line: &str) -> Option<ForeignSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (ip_hex, port_hex) = fields.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let ip = match ip_hex.len() {
        8 => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(ip_hex, 16).ok()?.to_ne_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                let word = u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(ForeignSocket {
        addr: SocketAddr::new(ip, port),
        uid: fields.get(7)?.parse().ok()?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// Steers each datagram to the socket whose index equals the CPU it arrived
/// on, modulo the group size (`SO_ATTACH_REUSEPORT_CBPF`, "ld cpu; mod n").
/// Set on any one socket of the group; applies to the whole group.
pub fn attach_cpu_steering(socket: &UdpSocket, group_size: u32) -> io::Result<()> {
    let mut program = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        },
        libc::sock_filter { code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16, jt: 0, jf: 0, k: group_size },
        libc::sock_filter { code: (libc::BPF_RET | libc::BPF_A) as u16, jt: 0, jf: 0, k: 0 },
    ];
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    // SAFETY: `fprog` points at `program`, which outlives the call; the
    // kernel copies the program and does not keep the pointer. The option
    // length is the size of the struct we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a socket error means the socket itself is unusable: the one list
/// both directions use. These can only come from a bug (a closed or wrong
/// descriptor, a bad pointer), never from traffic, so they end the worker.
/// Everything else (ENOBUFS, EPERM from a firewall, unreachable or invalid
/// destinations, ...) can be provoked from outside and is counted instead:
/// ending the worker on it would hand an attacker a kill switch. EINVAL is
/// left out for that reason: on a send it can depend on the destination.
pub fn is_fatal(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EBADF | libc::ENOTSOCK | libc::EFAULT))
}

/// Whether to block for the first datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Block (up to the socket's read timeout) for the first datagram, then
    /// take whatever else is queued.
    ForOne,
    /// Return at once, with whatever is queued.
    No,
}

/// Receive side of a worker: `BATCH` slots of `RECV_SLOT` bytes.
pub struct RecvBatch {
    bufs: Box<[[u8; RECV_SLOT]]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch::new()
    }
}

impl RecvBatch {
    /// Allocates the batch once.
    pub fn new() -> RecvBatch {
        RecvBatch {
            bufs: vec![[0u8; RECV_SLOT]; BATCH].into_boxed_slice(),
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs
            // for which all-zero bytes are a valid (empty) value.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            // SAFETY: as above.
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            // SAFETY: as above.
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
        }
    }

    /// Receives up to `BATCH` datagrams. `Ok(0)` means the wait timed out or
    /// nothing was queued.
    pub fn recv(&mut self, socket: &UdpSocket, wait: Wait) -> io::Result<usize> {
        // Pointers are rebuilt before every call, so moving the batch is
        // harmless. The arithmetic: slot i's iovec covers bufs[i] (RECV_SLOT
        // bytes), and its name buffer is addrs[i].
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: RECV_SLOT };
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // MSG_TRUNC makes msg_len the datagram's true length even when it was
        // cut to RECV_SLOT, which the amplification limit needs.
        let flags = libc::MSG_TRUNC
            | match wait {
                Wait::ForOne => libc::MSG_WAITFORONE,
                Wait::No => libc::MSG_DONTWAIT,
            };
        loop {
            // SAFETY: every header points into buffers owned by `self` that
            // stay alive and unaliased for the call (we hold `&mut self`);
            // lengths match the buffers set up just above; vlen is the
            // header count.
            let n = unsafe {
                libc::recvmmsg(socket.as_raw_fd(), self.hdrs.as_mut_ptr(), BATCH as u32, flags, std::ptr::null_mut())
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(0),
                _ => return Err(err),
            }
        }
    }

    /// The bytes of datagram `i` that were kept (at most `RECV_SLOT`).
    #[inline]
    pub fn payload(&self, i: usize) -> &[u8] {
        let len = (self.hdrs[i].msg_len as usize).min(RECV_SLOT);
        &self.bufs[i][..len]
    }

    /// The true length of datagram `i` on the wire.
    #[inline]
    pub fn wire_len(&self, i: usize) -> usize {
        self.hdrs[i].msg_len as usize
    }

    /// The source of datagram `i`.
    #[inline]
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        let storage = &self.addrs[i];
        let len = self.hdrs[i].msg_hdr.msg_namelen as usize;
        match i32::from(storage.ss_family) {
            libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET, and
                // at least its size), and sockaddr_storage is large and
                // aligned enough for any sockaddr.
                let sin = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Send side of a worker: `BATCH` reply buffers of `slot_len` bytes each,
/// each with its own destination address (copied from the [`RecvBatch`]
/// entry it answers, or none on a connected socket).
pub struct SendBatch {
    bufs: Box<[u8]>,
    slot_len: usize,
    lens: [usize; BATCH],
    addrs: Box<[libc::sockaddr_storage]>,
    addr_lens: [libc::socklen_t; BATCH],
    queued: usize,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

/// What one [`SendBatch::send`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Datagrams the kernel accepted.
    pub sent: usize,
    /// Datagrams that failed and were skipped.
    pub failed: usize,
    /// The OS error number of the last failure, if any (for a rate-limited
    /// log line; the hot path only counts).
    pub last_errno: Option<i32>,
}

impl SendBatch {
    /// Allocates `BATCH` reply buffers of `slot_len` bytes once.
    pub fn new(slot_len: usize) -> SendBatch {
        SendBatch {
            bufs: vec![0u8; slot_len * BATCH].into_boxed_slice(),
            slot_len,
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs
            // for which all-zero bytes are a valid (empty) value.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            addr_lens: [0; BATCH],
            queued: 0,
            // SAFETY: as above.
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            // SAFETY: as above.
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
        }
    }

    /// The buffer for the next datagram. Write into it, then queue it.
    #[inline]
    pub fn next_buffer(&mut self) -> &mut [u8] {
        let start = self.queued * self.slot_len;
        &mut self.bufs[start..start + self.slot_len]
    }

    /// Whether all `BATCH` slots are queued.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.queued == BATCH
    }

    /// Queues the next datagram's first `len` bytes as the reply to
    /// datagram `i` of `rx` (its source address is copied).
    #[inline]
    pub fn queue_reply(&mut self, len: usize, rx: &RecvBatch, i: usize) {
        debug_assert!(len <= self.slot_len && i < BATCH && !self.is_full());
        let name_len = (rx.hdrs[i].msg_hdr.msg_namelen as usize).min(size_of::<libc::sockaddr_storage>());
        // Only the bytes the kernel wrote (16 for IPv4, 28 for IPv6).
        // SAFETY: both are sockaddr_storage; `name_len` is at most its size;
        // they are different allocations, so they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&rx.addrs[i] as *const libc::sockaddr_storage).cast::<u8>(),
                (&mut self.addrs[self.queued] as *mut libc::sockaddr_storage).cast::<u8>(),
                name_len,
            );
        }
        self.addr_lens[self.queued] = name_len as libc::socklen_t;
        self.lens[self.queued] = len;
        self.queued += 1;
    }

    /// Queues the next datagram's first `len` bytes for a connected
    /// socket's peer: the client side (the load generator sends its
    /// requests this way). It stays here, not in the load generator,
    /// because [`send`](Self::send) is what turns the missing address into
    /// a null `msg_name`.
    #[inline]
    pub fn queue_to_peer(&mut self, len: usize) {
        debug_assert!(len <= self.slot_len && !self.is_full());
        self.addr_lens[self.queued] = 0;
        self.lens[self.queued] = len;
        self.queued += 1;
    }

    /// Sends every queued datagram, then empties the queue. Datagrams that
    /// fail are skipped and counted; a fatal socket error (see
    /// [`is_fatal`]) is returned.
    pub fn send(&mut self, socket: &UdpSocket) -> io::Result<SendOutcome> {
        let count = std::mem::take(&mut self.queued);
        let mut outcome = SendOutcome::default();
        // Datagram j's iovec covers its slot's first lens[j] bytes; its name
        // is its own copied address (none for a connected socket).
        for j in 0..count {
            let start = j * self.slot_len;
            self.iovs[j] = libc::iovec { iov_base: self.bufs[start..].as_mut_ptr().cast(), iov_len: self.lens[j] };
            let hdr = &mut self.hdrs[j].msg_hdr;
            hdr.msg_name = if self.addr_lens[j] == 0 {
                std::ptr::null_mut()
            } else {
                (&mut self.addrs[j] as *mut libc::sockaddr_storage).cast()
            };
            hdr.msg_namelen = self.addr_lens[j];
            hdr.msg_iov = &mut self.iovs[j];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
        let mut next = 0;
        while next < count {
            // SAFETY: headers next..count point at buffers and addresses owned
            // by `self` (borrowed mutably for the whole call), with lengths
            // set above. The kernel only reads them.
            let n =
                unsafe { libc::sendmmsg(socket.as_raw_fd(), self.hdrs[next..].as_mut_ptr(), (count - next) as u32, 0) };
            if n > 0 {
                next += n as usize;
                outcome.sent += n as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if is_fatal(&err) {
                return Err(err);
            }
            // This datagram cannot go (unreachable, firewalled, no buffer
            // space, a bad destination): skip it, keep the others.
            next += 1;
            outcome.failed += 1;
            outcome.last_errno = err.raw_os_error();
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn options() -> SocketOptions {
        SocketOptions { recv_buffer: 1 << 20, send_buffer: 1 << 20, read_timeout: Duration::from_millis(500) }
    }

    /// Replies go to the source of the datagram they answer, even after the
    /// receive batch has been reused for the next round.
    #[test]
    fn replies_reach_their_own_sources() {
        let (sockets, local, _) = bind_group("127.0.0.1:0".parse().unwrap(), 1, &options()).unwrap();
        let clients: Vec<UdpSocket> = (0..5).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for (i, c) in clients.iter().enumerate() {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            c.send_to(&[i as u8; 9], local).unwrap();
        }
        let mut rx = RecvBatch::new();
        let mut tx = SendBatch::new(16);
        let mut got = 0;
        while got < clients.len() {
            let n = rx.recv(&sockets[0], Wait::ForOne).unwrap();
            for i in 0..n {
                let payload = rx.payload(i);
                assert_eq!((payload.len(), rx.wire_len(i)), (9, 9));
                let tag = payload[0];
                assert_eq!(rx.source(i), Some(clients[usize::from(tag)].local_addr().unwrap()));
                tx.next_buffer()[..3].copy_from_slice(&[tag, tag, tag]);
                tx.queue_reply(3, &rx, i);
            }
            got += n;
            // Clobber the receive batch before sending: the replies carry
            // their own copies of the addresses.
            rx = RecvBatch::new();
            let outcome = tx.send(&sockets[0]).unwrap();
            assert_eq!((outcome.sent, outcome.failed), (n, 0));
        }
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 16];
            let (len, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..len], from), (&[i as u8; 3][..], local));
        }
    }

    #[test]
    fn connected_sends_and_true_lengths_of_cut_datagrams() {
        let (sockets, local, _) = bind_group("127.0.0.1:0".parse().unwrap(), 2, &options()).unwrap();
        assert_eq!(sockets.len(), 2);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(local).unwrap();
        let mut tx = SendBatch::new(RECV_SLOT + 100);
        tx.next_buffer().fill(7);
        tx.queue_to_peer(RECV_SLOT + 100);
        assert_eq!(tx.send(&client).unwrap().sent, 1);
        let mut rx = RecvBatch::new();
        let mut n = 0;
        for socket in sockets.iter().cycle().take(8) {
            n = rx.recv(socket, Wait::No).unwrap();
            if n > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(n, 1);
        assert_eq!(rx.payload(0).len(), RECV_SLOT, "kept bytes are capped");
        assert_eq!(rx.wire_len(0), RECV_SLOT + 100, "the true length is reported");
    }

    #[test]
    fn proc_net_udp_lines_parse() {
        let v4 = "  9291: 0100007F:C32D 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 128343 2 0000000037725bda 0";
        let s = parse_proc_udp_line(v4).unwrap();
        assert_eq!(s, ForeignSocket { addr: "127.0.0.1:49965".parse().unwrap(), inode: 128_343, uid: 0 });
        let v6 = "  100: 00000000000000000000000001000000:1B9E 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 777 2 0 0";
        let s = parse_proc_udp_line(v6).unwrap();
        assert_eq!((s.addr, s.uid, s.inode), ("[::1]:7070".parse().unwrap(), 1000, 777));
        assert!(parse_proc_udp_line("  sl  local_address rem_address").is_none());
    }

    /// Another socket joining our port through SO_REUSEPORT is seen; our
    /// own group is not; a wildcard on the same port counts too.
    #[test]
    fn foreign_sockets_on_our_port_are_found() {
        let (ours, local, _) = bind_group("127.0.0.1:0".parse().unwrap(), 2, &options()).unwrap();
        assert_eq!(foreign_sockets(local, &ours).unwrap(), vec![]);
        let (intruder, _, _) = bind_group(local, 1, &options()).unwrap();
        let found = foreign_sockets(local, &ours).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].addr, local);
        assert_eq!(found[0].inode, socket_inode(&intruder[0]).unwrap());
        drop(intruder);
        assert_eq!(foreign_sockets(local, &ours).unwrap(), vec![]);
        let wildcard = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), local.port());
        let (_wild, _, _) = bind_group(wildcard, 1, &options()).unwrap();
        assert_eq!(foreign_sockets(local, &ours).unwrap().len(), 1, "a wildcard socket on our port");
    }

    /// The kernel's own port-0 choice for an SO_REUSEPORT socket may land
    /// in another group of the same user (about one bind in 28,000 per
    /// group held, with the default port range); a port-0 group never does.
    /// Without the guard, 1000 groups land in one of 300 held ports about
    /// 10 times. On 127.0.0.2, so that neither the held sockets nor the
    /// kernel's own choices below overlap the other tests' (127.0.0.1).
    #[test]
    fn a_port_zero_group_never_joins_another_group() {
        let private: SocketAddr = "127.0.0.2:0".parse().unwrap();
        let held: Vec<Socket> = (0..300).map(|_| reuse_port_socket(private)).collect();
        let held_ports: HashSet<u16> =
            held.iter().map(|s| s.local_addr().unwrap().as_socket().unwrap().port()).collect();
        // What the guard is for (about 3000 * 300 / 28232 = 32 landings
        // here); a kernel that skips held ports would show none.
        let joined = (0..3000)
            .filter(|_| {
                held_ports.contains(&reuse_port_socket(private).local_addr().unwrap().as_socket().unwrap().port())
            })
            .count();
        eprintln!("the kernel's own port-0 choice landed in a held port {joined} times in 3000");
        for _ in 0..1000 {
            let (_group, local, _) = bind_group(private, 2, &options()).unwrap();
            assert!(!held_ports.contains(&local.port()), "a port-0 group joined the held group on {local}");
        }
    }

    fn reuse_port_socket(addr: SocketAddr) -> Socket {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).unwrap();
        socket.set_reuse_port(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket
    }

    #[test]
    fn only_descriptor_bugs_are_fatal() {
        for errno in [libc::EBADF, libc::ENOTSOCK, libc::EFAULT] {
            assert!(is_fatal(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::EINVAL, libc::EPERM, libc::ENOBUFS, libc::ECONNREFUSED, libc::EAGAIN, libc::EHOSTUNREACH] {
            assert!(!is_fatal(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
    }
}
