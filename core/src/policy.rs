//! Who may ask, and how much: source validation, the allowlist, the trusted
//! networks exempt from the anti-amplification rule, and per-prefix rate
//! limiting. Pure decisions over addresses; no I/O.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Instant;

/// An IPv4 or IPv6 network, e.g. `10.0.0.0/8` or `fc00::/7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network. IPv4-mapped IPv6 addresses
    /// (`::ffff:a.b.c.d`) match IPv4 networks (`IpAddr::to_canonical`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u128::from(u32::from(net)) << 96, u128::from(u32::from(ip)) << 96, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(u128::from(net), u128::from(ip), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    prefix == 0 || (a ^ b) >> (128 - u32::from(prefix)) == 0
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an address or CIDR (like 10.0.0.0/8)"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?
            }
        };
        let cidr = Cidr { network, prefix };
        let host_bits_set = match network {
            IpAddr::V4(n) => prefix < 32 && (u32::from(n) << prefix) != 0,
            IpAddr::V6(n) => prefix < 128 && (u128::from(n) << prefix) != 0,
        };
        if host_bits_set {
            return Err(format!("{s:?} has host bits set; did you mean the network address?"));
        }
        Ok(cidr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The default allowlist: loopback and the private ranges.
pub fn default_allow() -> Vec<Cidr> {
    ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
        .iter()
        .map(|s| s.parse().expect("valid built-in CIDR"))
        .collect()
}

/// The default trusted networks (no amplification limit): loopback only.
pub fn default_trust() -> Vec<Cidr> {
    ["127.0.0.0/8", "::1/128"].iter().map(|s| s.parse().expect("valid built-in CIDR")).collect()
}

/// Whether a reply may ever be sent to `src`: never to port 0, broadcast,
/// multicast or unspecified addresses (they can only be spoofed).
pub fn valid_source(src: SocketAddr) -> bool {
    if src.port() == 0 {
        return false;
    }
    match src.ip().to_canonical() {
        IpAddr::V4(ip) => !(ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified()),
        IpAddr::V6(ip) => !(ip.is_multicast() || ip.is_unspecified()),
    }
}

/// A source decision list: allowlist and trusted networks.
#[derive(Clone, Debug)]
pub struct SourcePolicy {
    /// Sources that may be answered at all.
    pub allow: Vec<Cidr>,
    /// Sources exempt from the 3× amplification limit.
    pub trust: Vec<Cidr>,
}

impl SourcePolicy {
    /// Whether `ip` may be answered.
    #[inline]
    pub fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(ip))
    }

    /// Whether `ip` may get replies larger than 3× its request.
    #[inline]
    pub fn trusted(&self, ip: IpAddr) -> bool {
        self.trust.iter().any(|c| c.contains(ip))
    }
}

/// Per-prefix token buckets in a fixed-size table (one per worker), after
/// the response-rate limiting of NSD and BIND.
///
/// Sources are keyed by /24 (IPv4) or /56 (IPv6) and hashed into a table of
/// `capacity` buckets. The table never grows, so spoofed sources cannot
/// exhaust memory; two prefixes that collide share a bucket, which can only
/// make limiting stricter for them, never looser.
pub struct RateLimiter {
    buckets: Box<[Bucket]>,
    rate: f64,
    burst: f64,
    epoch: Instant,
    seed: u64,
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    key: u64,
    tokens: f64,
    last_nanos: u64,
}

impl RateLimiter {
    /// `rate` requests per second per prefix, with bursts up to `burst`.
    pub fn new(rate: u32, burst: u32, capacity: usize, seed: u64) -> RateLimiter {
        RateLimiter {
            buckets: vec![Bucket::default(); capacity.next_power_of_two()].into_boxed_slice(),
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            epoch: Instant::now(),
            seed,
        }
    }

    /// Takes one token for `ip`'s prefix; `false` means drop the request.
    pub fn allow(&mut self, ip: IpAddr) -> bool {
        self.allow_at(ip, self.epoch.elapsed().as_nanos() as u64)
    }

    /// As [`allow`](Self::allow), at `now_nanos` since the limiter's epoch
    /// (for tests with a controlled clock).
    pub fn allow_at(&mut self, ip: IpAddr, now_nanos: u64) -> bool {
        let key = prefix_key(ip);
        let slot = (mix64(key ^ self.seed) as usize) & (self.buckets.len() - 1);
        let bucket = &mut self.buckets[slot];
        if bucket.key != key || bucket.last_nanos == 0 {
            // A new prefix (or a collision taking over): start with a full
            // burst. Taking over a slot forgets the old prefix's debt, but a
            // spoofer who churns slots only earns tokens for prefixes it
            // does not receive replies at.
            *bucket = Bucket { key, tokens: self.burst, last_nanos: now_nanos.max(1) };
        } else {
            let elapsed = now_nanos.saturating_sub(bucket.last_nanos) as f64 / 1e9;
            bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
            bucket.last_nanos = now_nanos.max(1);
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The rate-limit key: the /24 of an IPv4 address or the /56 of an IPv6 one.
fn prefix_key(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8) | 1 << 63,
        IpAddr::V6(v6) => (u128::from(v6) >> 72) as u64 & !(1 << 63),
    }
}

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.255.1.2")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped matches");
        let v6: Cidr = "fc00::/7".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert!("192.168.1.7".parse::<Cidr>().unwrap().contains(ip("192.168.1.7")));
        assert!(!"192.168.1.7".parse::<Cidr>().unwrap().contains(ip("192.168.1.8")));
    }

    #[test]
    fn cidr_errors_are_clear() {
        assert!("10.0.0.0/33".parse::<Cidr>().unwrap_err().contains("prefix must be 0..=32"));
        assert!("10.0.0.1/8".parse::<Cidr>().unwrap_err().contains("host bits set"));
        assert!("bogus".parse::<Cidr>().unwrap_err().contains("not an address or CIDR"));
        assert!("fd00::1/8".parse::<Cidr>().unwrap_err().contains("host bits"));
    }

    #[test]
    fn default_lists() {
        let policy = SourcePolicy { allow: default_allow(), trust: default_trust() };
        for allowed in ["127.0.0.1", "10.1.2.3", "172.31.0.1", "192.168.0.1", "::1", "fd00::5"] {
            assert!(policy.allowed(ip(allowed)), "{allowed}");
        }
        for denied in ["8.8.8.8", "172.32.0.1", "2001:db8::1", "100.64.0.1"] {
            assert!(!policy.allowed(ip(denied)), "{denied}");
        }
        assert!(policy.trusted(ip("127.0.0.2")) && policy.trusted(ip("::1")));
        assert!(!policy.trusted(ip("10.0.0.1")));
    }

    #[test]
    fn invalid_sources() {
        assert!(!valid_source("10.0.0.1:0".parse().unwrap()));
        assert!(!valid_source("255.255.255.255:53".parse().unwrap()));
        assert!(!valid_source("224.0.0.1:53".parse().unwrap()));
        assert!(!valid_source("[ff02::1]:53".parse().unwrap()));
        assert!(!valid_source("0.0.0.0:53".parse().unwrap()));
        assert!(valid_source("127.0.0.1:5000".parse().unwrap()));
    }

    #[test]
    fn rate_limiter_refills_and_keys_by_prefix() {
        let mut rl = RateLimiter::new(10, 5, 64, 1);
        let a = ip("203.0.113.7");
        let same_24 = ip("203.0.113.200");
        let other = ip("198.51.100.1");
        let t0 = 1_000;
        for _ in 0..5 {
            assert!(rl.allow_at(a, t0));
        }
        assert!(!rl.allow_at(a, t0), "burst spent");
        assert!(!rl.allow_at(same_24, t0), "same /24 shares the bucket");
        assert!(rl.allow_at(other, t0), "another prefix is independent");
        // 10/s: 100 ms gives one token back.
        assert!(rl.allow_at(a, t0 + 100_000_000));
        assert!(!rl.allow_at(a, t0 + 100_000_000));
        // Refill caps at the burst.
        let later = t0 + 60_000_000_000;
        let allowed = (0..20).filter(|_| rl.allow_at(a, later)).count();
        assert_eq!(allowed, 5);
        // IPv6 keys by /56.
        assert!(rl.allow_at(ip("2001:db8:0:1::1"), t0));
        assert_eq!(prefix_key(ip("2001:db8:0:1::1")), prefix_key(ip("2001:db8:0:ff::2")));
        assert_ne!(prefix_key(ip("2001:db8:0:100::1")), prefix_key(ip("2001:db8:0:1::1")));
    }

    #[test]
    fn rate_limiter_memory_is_bounded_under_spoofing() {
        let mut rl = RateLimiter::new(1, 1, 256, 7);
        for i in 0..100_000u32 {
            rl.allow_at(IpAddr::V4(Ipv4Addr::from(i << 8)), 1_000);
        }
        assert_eq!(rl.buckets.len(), 256);
    }
}
