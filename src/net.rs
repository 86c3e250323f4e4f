//! Sockets and batched datagram I/O: building SO_REUSEPORT sockets with
//! socket2, and `recvmmsg`/`sendmmsg` over buffers allocated once per
//! worker. Holds the crate's only syscall `unsafe`.
//!
//! Nothing here allocates, logs or returns an error per datagram: a send that
//! fails is counted and skipped. Only errors that mean the socket itself is
//! broken (a bug, not traffic) are returned; see [`is_fatal`].

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
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

/// Binds `count` SO_REUSEPORT sockets to `addr`. If `addr` has port 0, the
/// first socket's port is learned and the rest bind to it.
pub fn bind_group(
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

/// An ephemeral socket of `target`'s address family, connected to it (so
/// the kernel drops datagrams from any other source).
pub fn connect_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(target)?;
    Ok(socket)
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

/// Whether a socket error means the socket itself is unusable. These can
/// only come from a bug (a closed or wrong descriptor, a bad pointer), never
/// from traffic, so they end the worker. Everything else (ENOBUFS, EPERM
/// from a firewall, unreachable destinations, ...) can be provoked from
/// outside and is counted instead: ending the worker on it would hand an
/// attacker a kill switch.
pub fn is_fatal(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EBADF | libc::ENOTSOCK | libc::EFAULT | libc::EINVAL))
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
/// addressed to the sources of a [`RecvBatch`].
pub struct SendBatch {
    bufs: Box<[u8]>,
    slot_len: usize,
    lens: [usize; BATCH],
    sources: [usize; BATCH],
    queued: usize,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

/// What one [`SendBatch::send`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Replies the kernel accepted.
    pub sent: usize,
    /// Replies that failed and were skipped.
    pub failed: usize,
}

impl SendBatch {
    /// Allocates `BATCH` reply buffers of `slot_len` bytes once.
    pub fn new(slot_len: usize) -> SendBatch {
        SendBatch {
            bufs: vec![0u8; slot_len * BATCH].into_boxed_slice(),
            slot_len,
            lens: [0; BATCH],
            sources: [0; BATCH],
            queued: 0,
            // SAFETY: all-zero iovec and mmsghdr are valid empty values.
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            // SAFETY: as above.
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
        }
    }

    /// The buffer for the next reply. Write into it, then [`queue`](Self::queue).
    #[inline]
    pub fn next_buffer(&mut self) -> &mut [u8] {
        let start = self.queued * self.slot_len;
        &mut self.bufs[start..start + self.slot_len]
    }

    /// Queues the next reply: its first `len` bytes go to the source of
    /// datagram `source` of the receive batch passed to `send`.
    #[inline]
    pub fn queue(&mut self, len: usize, source: usize) {
        debug_assert!(len <= self.slot_len && source < BATCH);
        self.lens[self.queued] = len;
        self.sources[self.queued] = source;
        self.queued += 1;
    }

    /// Sends every queued reply, then empties the queue. Replies that fail
    /// are skipped and counted; a fatal socket error is returned.
    pub fn send(&mut self, socket: &UdpSocket, rx: &RecvBatch) -> io::Result<SendOutcome> {
        let count = std::mem::take(&mut self.queued);
        let mut outcome = SendOutcome::default();
        // Reply j's iovec covers its slot's first lens[j] bytes; its name is
        // the receive batch's address for the datagram it answers, with the
        // length the kernel reported.
        for j in 0..count {
            let start = j * self.slot_len;
            self.iovs[j] = libc::iovec { iov_base: self.bufs[start..].as_mut_ptr().cast(), iov_len: self.lens[j] };
            let src = &rx.hdrs[self.sources[j]].msg_hdr;
            let hdr = &mut self.hdrs[j].msg_hdr;
            hdr.msg_name = src.msg_name;
            hdr.msg_namelen = src.msg_namelen;
            hdr.msg_iov = &mut self.iovs[j];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
        let mut next = 0;
        while next < count {
            // SAFETY: headers next..count point at our own buffers and at the
            // address buffers of `rx`, all borrowed for the whole call, with
            // lengths set above. The kernel only reads them.
            let n =
                unsafe { libc::sendmmsg(socket.as_raw_fd(), self.hdrs[next..].as_mut_ptr(), (count - next) as u32, 0) };
            if n > 0 {
                next += n as usize;
                outcome.sent += n as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EBADF | libc::ENOTSOCK | libc::EFAULT) => return Err(err),
                _ => {
                    // This reply cannot go (unreachable, firewalled, no buffer
                    // space, a bad destination): skip it, keep the others.
                    next += 1;
                    outcome.failed += 1;
                }
            }
        }
        Ok(outcome)
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

/// The CPUs this process may run on (its affinity mask).
pub fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect()
}

/// Sends `datagram` `copies` times on a connected socket with one
/// `sendmmsg` per 64 copies (for load generators). Returns how many the
/// kernel accepted; stops early (without error) when the socket buffer is
/// full on a non-blocking socket.
pub fn send_repeated(socket: &UdpSocket, datagram: &[u8], copies: usize) -> io::Result<usize> {
    const CHUNK: usize = 64;
    let mut iov = libc::iovec { iov_base: datagram.as_ptr() as *mut libc::c_void, iov_len: datagram.len() };
    // SAFETY: all-zero mmsghdr is a valid empty value.
    let mut hdrs: [libc::mmsghdr; CHUNK] = unsafe { zeroed() };
    for hdr in hdrs.iter_mut() {
        // Connected socket: no name. Every header shares the one iovec.
        hdr.msg_hdr.msg_iov = &mut iov;
        hdr.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < copies {
        let batch = (copies - sent).min(CHUNK);
        // SAFETY: the headers and the iovec they point to live on this
        // stack frame for the whole call; the iovec covers `datagram`,
        // which the kernel only reads.
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), batch as u32, 0) };
        if n > 0 {
            sent += n as usize;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => break,
            _ if sent > 0 => break,
            _ => return Err(err),
        }
    }
    Ok(sent)
}

/// Waits up to `timeout` until any of `sockets` is readable; returns a
/// readiness flag per socket.
pub fn poll_readable(sockets: &[&UdpSocket], timeout: Duration, ready: &mut Vec<bool>) -> io::Result<()> {
    let mut fds: Vec<libc::pollfd> =
        sockets.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
        // lives for the whole call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        if rc >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    ready.clear();
    ready.extend(fds.iter().map(|f| f.revents & (libc::POLLIN | libc::POLLERR) != 0));
    Ok(())
}
