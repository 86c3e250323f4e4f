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
/// exhaust memory. A bucket belongs to its slot, not to a prefix: prefixes
/// that collide share it, tokens and debt alike, and a slot changing hands
/// never refills it. Each slot is one token bucket whatever prefixes use
/// it, so no prefix, alone or together with the prefixes it collides with,
/// ever gets more than `burst` plus `rate` per second: collisions make
/// limiting stricter, never looser.
///
/// The hash is keyed with a secret random key ([`RateLimiter::random`]),
/// so which prefixes collide cannot be worked out from outside.
pub struct RateLimiter {
    buckets: Box<[Bucket]>,
    rate: f64,
    burst: f64,
    epoch: Instant,
    key: u64,
}

/// One slot's token bucket; `last_nanos == 0` means never used (full).
#[derive(Clone, Copy, Default)]
struct Bucket {
    tokens: f64,
    last_nanos: u64,
}

impl RateLimiter {
    /// `rate` requests per second per prefix, with bursts up to `burst`, in
    /// a table of `capacity` buckets (rounded up to a power of two), hashed
    /// with a fresh random key. Fails only if the OS random source does.
    pub fn random(rate: u32, burst: u32, capacity: usize) -> std::io::Result<RateLimiter> {
        let mut key = [0u8; 8];
        getrandom::fill(&mut key).map_err(std::io::Error::other)?;
        Ok(RateLimiter::new(rate, burst, capacity, u64::from_le_bytes(key)))
    }

    /// As [`random`](Self::random), with the hash key given: for tests and
    /// fuzzing, which need to know which prefixes collide. A server must use
    /// [`random`](Self::random): with a known key, colliding prefixes can
    /// be computed offline.
    pub fn new(rate: u32, burst: u32, capacity: usize, key: u64) -> RateLimiter {
        RateLimiter {
            buckets: vec![Bucket::default(); capacity.max(1).next_power_of_two()].into_boxed_slice(),
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            epoch: Instant::now(),
            key,
        }
    }

    /// Takes one token for `ip`'s prefix; `false` means drop the request.
    pub fn allow(&mut self, ip: IpAddr) -> bool {
        self.allow_at(ip, self.epoch.elapsed().as_nanos() as u64)
    }

    /// As [`allow`](Self::allow), at `now_nanos` since the limiter's epoch
    /// (for tests with a controlled clock).
    pub fn allow_at(&mut self, ip: IpAddr, now_nanos: u64) -> bool {
        let slot = self.slot(prefix_key(ip));
        let (rate, burst) = (self.rate, self.burst);
        let bucket = &mut self.buckets[slot];
        if bucket.last_nanos == 0 {
            // A slot no prefix has used yet starts full.
            bucket.tokens = burst;
        } else {
            // Whichever prefix used the slot last, its level carries over:
            // a collision shares the bucket, it never refills it.
            let elapsed = now_nanos.saturating_sub(bucket.last_nanos) as f64 / 1e9;
            bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        }
        bucket.last_nanos = bucket.last_nanos.max(now_nanos).max(1);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The table slot of a prefix key, under this limiter's secret key.
    fn slot(&self, prefix: u64) -> usize {
        (mix64(mix64(prefix ^ self.key) ^ self.key.rotate_left(32)) as usize) & (self.buckets.len() - 1)
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

    /// `count` requests alternating between `a` and `b`, all at `now`: how
    /// many were allowed.
    fn alternate(rl: &mut RateLimiter, a: IpAddr, b: IpAddr, count: usize, now: u64) -> usize {
        (0..count).filter(|i| rl.allow_at(if i % 2 == 0 { a } else { b }, now)).count()
    }

    /// A table of one bucket forces every prefix into one slot: two
    /// prefixes taking turns get no more together than one alone would.
    #[test]
    fn colliding_prefixes_never_get_more_than_one_prefix_alone() {
        let mut rl = RateLimiter::new(10, 5, 1, 1);
        let (a, b) = (ip("203.0.113.7"), ip("198.51.100.1"));
        let t0 = 1_000;
        assert_eq!(alternate(&mut rl, a, b, 100, t0), 5, "one burst between them");
        // A second later: 10 tokens of refill, capped at the burst.
        assert_eq!(alternate(&mut rl, a, b, 100, t0 + 1_000_000_000), 5);
        // Ten seconds of steady alternation, 100 requests a second: at most
        // the refill of one prefix (10/s), not of two.
        let start = t0 + 2_000_000_000;
        let allowed =
            (0..1000u64).filter(|&i| rl.allow_at(if i % 2 == 0 { a } else { b }, start + i * 10_000_000)).count();
        assert!(allowed <= 5 + 100, "{allowed} allowed in 10 s");
        assert!(allowed >= 95, "{allowed} allowed in 10 s: the shared bucket still refills");
    }

    /// Two prefixes that really collide under a known key (found by
    /// search, as an attacker who knew the key could) share one bucket,
    /// while a prefix in another slot keeps its own.
    #[test]
    fn prefixes_colliding_under_a_known_key_share_one_bucket() {
        let key = 0x5eed;
        let mut rl = RateLimiter::new(10, 5, 64, key);
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let slot_of = |rl: &RateLimiter, ip: IpAddr| rl.slot(prefix_key(ip));
        let b = (1..=255u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, i, 1)))
            .find(|&b| slot_of(&rl, b) == slot_of(&rl, a))
            .expect("among 255 prefixes, one shares a slot of 64 with a");
        let c = (1..=255u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 1, i, 1)))
            .find(|&c| slot_of(&rl, c) != slot_of(&rl, a))
            .expect("some prefix lands elsewhere");
        assert_ne!(prefix_key(a), prefix_key(b));
        assert_eq!(alternate(&mut rl, a, b, 100, 1_000), 5, "a and b share one burst");
        assert!(!rl.allow_at(b, 1_000) && !rl.allow_at(a, 1_000));
        assert_eq!((0..10).filter(|_| rl.allow_at(c, 1_000)).count(), 5, "c has a bucket of its own");
        // 100 ms refills one token, for the slot, not one per prefix.
        assert_eq!(alternate(&mut rl, a, b, 10, 100_001_000), 1);
    }

    /// Every limiter made for serving draws its own key, so colliding
    /// prefixes cannot be computed offline (or from another process).
    #[test]
    fn served_limiters_have_random_keys() {
        let one = RateLimiter::random(10, 5, 64).unwrap();
        let two = RateLimiter::random(10, 5, 64).unwrap();
        assert_ne!(one.key, two.key);
        assert_eq!(one.buckets.len(), 64);
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
