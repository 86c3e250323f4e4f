//! The client library and `tradeid get`: timeouts with retries, failover
//! across servers, `!ERRnnn` mapped to typed errors, and a filter that never
//! returns the same ID twice even when the network duplicates a reply.
//!
//! Replies carry no request tag. A reply that arrives after its request
//! timed out is still a fresh, unique ID (the server never repeats one), so
//! it is used, not discarded; a *repeated* ID can only be a network
//! duplicate, so the client drops any ID it returned recently.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::id::{Id, ID_LEN};
use crate::protocol::{self, ErrorCode, DEFAULT_MAX_BATCH};

/// How a [`Client`] behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Servers, tried in order; the client fails over to the next one.
    pub servers: Vec<SocketAddr>,
    /// How long to wait for each reply.
    pub timeout: Duration,
    /// Attempts per server before failing over.
    pub attempts: u32,
    /// The most IDs to ask for in one request.
    pub max_batch: u16,
    /// Pad requests so untrusted paths still allow the whole batch
    /// (reply ≤ 3 × request).
    pub pad: bool,
}

impl ClientConfig {
    /// How long to wait for each reply by default.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
    /// Attempts per server by default.
    pub const DEFAULT_ATTEMPTS: u32 = 3;

    /// Sensible defaults for `servers`.
    pub fn new(servers: Vec<SocketAddr>) -> ClientConfig {
        ClientConfig {
            servers,
            timeout: ClientConfig::DEFAULT_TIMEOUT,
            attempts: ClientConfig::DEFAULT_ATTEMPTS,
            max_batch: DEFAULT_MAX_BATCH,
            pad: true,
        }
    }
}

/// Why the client could not get IDs.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server answered in time.
    #[error("no reply from {servers:?} after {attempts} attempt(s) each; are they running and reachable, and is this host in their --allow list?")]
    Timeout {
        /// The servers tried.
        servers: Vec<SocketAddr>,
        /// Attempts per server.
        attempts: u32,
    },
    /// Every server's ID space is exhausted.
    #[error("every server reports its ID space exhausted (!ERR507)")]
    Exhausted,
    /// The server rejected the request as malformed (a version or opcode it
    /// does not support).
    #[error("server {server} rejected the request: !ERR{}", .code.number())]
    Rejected {
        /// The server.
        server: SocketAddr,
        /// Its error code.
        code: ErrorCode,
    },
    /// A socket error.
    #[error("socket error talking to {server}: {source}")]
    Io {
        /// The server.
        server: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// A connection-less client with one connected socket per server.
pub struct Client {
    config: ClientConfig,
    sockets: Vec<UdpSocket>,
    current: usize,
    exhausted: Vec<bool>,
    recent: RecentIds,
    spare: VecDeque<Id>,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
}

impl Client {
    /// Creates the sockets (one per server, connected, so replies from any
    /// other address are ignored by the kernel).
    pub fn new(config: ClientConfig) -> io::Result<Client> {
        if config.servers.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no server address given"));
        }
        let sockets = config.servers.iter().map(|&server| connect_udp(server)).collect::<io::Result<Vec<_>>>()?;
        Ok(Client {
            exhausted: vec![false; sockets.len()],
            sockets,
            current: 0,
            recent: RecentIds::new(RECENT_WINDOW),
            spare: VecDeque::new(),
            recv_buf: vec![0u8; 65536],
            send_buf: vec![0u8; protocol::padded_len(config.max_batch.max(1))],
            config,
        })
    }

    /// One new ID.
    pub fn next_id(&mut self) -> Result<Id, ClientError> {
        let mut ids = self.get(1)?;
        Ok(ids.pop().expect("get(1) returns one ID"))
    }

    /// `count` new IDs, never any returned before by this client.
    pub fn get(&mut self, count: usize) -> Result<Vec<Id>, ClientError> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if let Some(id) = self.spare.pop_front() {
                out.push(id);
                continue;
            }
            let want = (count - out.len()).min(usize::from(self.config.max_batch.max(1))) as u16;
            self.fetch(want)?;
        }
        Ok(out)
    }

    /// Gets at least one new ID into `spare`, trying every server.
    fn fetch(&mut self, want: u16) -> Result<(), ClientError> {
        let servers = self.sockets.len();
        for _ in 0..servers {
            if !self.exhausted[self.current] {
                match self.fetch_from(self.current, want)? {
                    Fetched::Some => return Ok(()),
                    Fetched::Exhausted => self.exhausted[self.current] = true,
                    Fetched::NoReply => {}
                }
            }
            self.current = (self.current + 1) % servers;
        }
        if self.exhausted.iter().all(|&e| e) {
            return Err(ClientError::Exhausted);
        }
        Err(ClientError::Timeout { servers: self.config.servers.clone(), attempts: self.config.attempts })
    }

    /// Asks server `index` for `want` IDs, up to `attempts` times. An
    /// `!ERR413` is an answer, not a lost attempt: the batch is halved until
    /// the server accepts it, and the client keeps that size from then on.
    fn fetch_from(&mut self, index: usize, mut want: u16) -> Result<Fetched, ClientError> {
        let server = self.config.servers[index];
        let io_err = |source| ClientError::Io { server, source };
        let mut unavailable_backoff = Duration::from_millis(1);
        let mut attempts_left = self.config.attempts.max(1);
        while attempts_left > 0 {
            attempts_left -= 1;
            let len = if self.config.pad { protocol::padded_len(want) } else { protocol::REQUEST_LEN };
            self.send_buf[..len].fill(0);
            protocol::encode_request(want, &mut self.send_buf);
            let socket = &self.sockets[index];
            match socket.send(&self.send_buf[..len]) {
                Ok(_) => {}
                // ECONNREFUSED from an earlier ICMP error: the server is down;
                // count it as a lost attempt.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::thread::sleep(self.config.timeout.min(Duration::from_millis(20)));
                    continue;
                }
                Err(e) => return Err(io_err(e)),
            }
            let deadline = Instant::now() + self.config.timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break; // this attempt timed out
                }
                socket.set_read_timeout(Some(left)).map_err(io_err)?;
                let n = match socket.recv(&mut self.recv_buf) {
                    Ok(n) => n,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_err(e)),
                };
                match classify(&self.recv_buf[..n]) {
                    Reply::Ids => {
                        let mut fresh = 0;
                        for raw in self.recv_buf[..n].chunks_exact(ID_LEN) {
                            let id = Id::from_wire(raw).expect("classify checked every ID");
                            if self.recent.insert(id) {
                                self.spare.push_back(id);
                                fresh += 1;
                            }
                        }
                        if fresh > 0 {
                            return Ok(Fetched::Some);
                        }
                        // Only duplicates: keep waiting for the real reply.
                    }
                    Reply::Error(ErrorCode::Exhausted) => return Ok(Fetched::Exhausted),
                    Reply::Error(ErrorCode::Unavailable) => {
                        // No block ready yet: back off briefly and retry.
                        std::thread::sleep(unavailable_backoff);
                        unavailable_backoff = (unavailable_backoff * 2).min(Duration::from_millis(50));
                        break;
                    }
                    Reply::Error(ErrorCode::TooMany) if want > 1 => {
                        // The server's --max-batch is below our batch: ask
                        // for half, at once, and never for more again.
                        want /= 2;
                        self.config.max_batch = self.config.max_batch.min(want);
                        attempts_left += 1;
                        break;
                    }
                    Reply::Error(code) => return Err(ClientError::Rejected { server, code }),
                    Reply::Malformed => {} // not from a tradeid server; ignore
                }
            }
        }
        Ok(Fetched::NoReply)
    }
}

/// An ephemeral socket of `target`'s address family, connected to it (so
/// the kernel drops datagrams from any other source).
fn connect_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(target)?;
    Ok(socket)
}

enum Fetched {
    Some,
    Exhausted,
    NoReply,
}

/// What a reply datagram is.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// One or more well-formed IDs.
    Ids,
    /// An `!ERRnnn` reply.
    Error(ErrorCode),
    /// Anything else.
    Malformed,
}

/// Classifies a reply datagram.
pub fn classify(reply: &[u8]) -> Reply {
    if let Some(code) = ErrorCode::parse(reply) {
        return Reply::Error(code);
    }
    if !reply.is_empty()
        && reply.len().is_multiple_of(ID_LEN)
        && reply.chunks_exact(ID_LEN).all(|r| Id::from_wire(r).is_some())
    {
        Reply::Ids
    } else {
        Reply::Malformed
    }
}

/// The last `capacity` IDs returned, for dropping network duplicates.
struct RecentIds {
    set: HashSet<Id>,
    order: VecDeque<Id>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> RecentIds {
        RecentIds { set: HashSet::with_capacity(capacity), order: VecDeque::with_capacity(capacity), capacity }
    }

    /// `false` if `id` was seen within the window.
    fn insert(&mut self, id: Id) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id);
        true
    }
}

/// How many recent IDs the duplicate filter remembers.
const RECENT_WINDOW: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_replies() {
        assert_eq!(classify(b"B762F00"), Reply::Ids);
        assert_eq!(classify(b"B762F00ZZZZZZZ"), Reply::Ids);
        assert_eq!(classify(b"!ERR503"), Reply::Error(ErrorCode::Unavailable));
        assert_eq!(classify(b"B762F0"), Reply::Malformed);
        assert_eq!(classify(b"b762f00"), Reply::Malformed);
        assert_eq!(classify(b""), Reply::Malformed);
    }

    #[test]
    fn recent_window_forgets_oldest() {
        let mut recent = RecentIds::new(2);
        let id = |v| Id::from_value(v).unwrap();
        assert!(recent.insert(id(1)));
        assert!(!recent.insert(id(1)));
        assert!(recent.insert(id(2)));
        assert!(recent.insert(id(3)));
        assert!(recent.insert(id(1)), "1 fell out of the window");
        assert!(!recent.insert(id(3)));
    }

    /// A stand-in server that answers `!ERR413` to any request for more
    /// than `max_batch` IDs, and fresh IDs otherwise; returns its address
    /// and the counts it was asked for.
    fn server_with_max_batch(max_batch: u16) -> (SocketAddr, std::sync::mpsc::Receiver<u16>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let (asked, counts) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut next = 0u64;
            let mut buf = [0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                if n < protocol::REQUEST_LEN {
                    continue;
                }
                let count = u16::from_be_bytes([buf[4], buf[5]]).max(1);
                if asked.send(count).is_err() {
                    return;
                }
                let reply: Vec<u8> = if count > max_batch {
                    ErrorCode::TooMany.reply().to_vec()
                } else {
                    (0..u64::from(count)).flat_map(|i| Id::from_value(next + i).unwrap().to_bytes()).collect()
                };
                next += u64::from(count);
                let _ = socket.send_to(&reply, from);
            }
        });
        (addr, counts)
    }

    /// `!ERR413` makes the client halve its batch until accepted, and
    /// remember that size; it is never taken for a lost reply.
    #[test]
    fn too_many_shrinks_the_batch_until_accepted_and_remembers_it() {
        let (server, asked) = server_with_max_batch(50);
        let config = ClientConfig { attempts: 1, ..ClientConfig::new(vec![server]) };
        let mut client = Client::new(config).unwrap();
        let ids = client.get(400).unwrap();
        assert_eq!(ids.len(), 400);
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 400, "all unique");
        let counts: Vec<u16> = asked.try_iter().collect();
        // 175 and 87 are refused, 43 is accepted and kept.
        assert_eq!(&counts[..3], &[175, 87, 43]);
        assert!(counts[3..].iter().all(|&c| c <= 43), "{counts:?}");
        assert_eq!(client.config.max_batch, 43);
    }

    #[test]
    fn a_silent_server_times_out_without_hanging() {
        // A bound socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = ClientConfig {
            timeout: Duration::from_millis(30),
            attempts: 2,
            ..ClientConfig::new(vec![silent.local_addr().unwrap()])
        };
        let started = Instant::now();
        let err = Client::new(config).unwrap().get(1).unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
