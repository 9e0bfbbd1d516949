//! Admission and rate limits: how many connections the server holds (in total and per client
//! address: an IPv4 address or an IPv6 /64), and how fast one connection may send.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::RateLimit;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server holds its maximum of {0} connections")]
    Full(usize),
    #[error("{0} connections from this address already")]
    PerIp(usize),
}

impl Refused {
    /// The HTTP answer, written before the request is even read.
    pub fn response(&self) -> &'static [u8] {
        match self {
            Refused::Full(_) => {
                b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\nContent-Type: text/plain\r\nContent-Length: 31\r\n\r\nserver at its connection limit\n"
            }
            Refused::PerIp(_) => {
                b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nRetry-After: 5\r\nContent-Type: text/plain\r\nContent-Length: 39\r\n\r\ntoo many connections from your address\n"
            }
        }
    }
}

/// Counts open connections; a [`Permit`] stands for one and gives it back when dropped.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub struct Permit {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self { max_total, max_per_ip, state: Mutex::new(Counts::default()) })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        let ip = client_address(ip);
        let mut counts = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total {
            return Err(Refused::Full(self.max_total));
        }
        let from_ip = counts.per_ip.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            return Err(Refused::PerIp(self.max_per_ip));
        }
        *from_ip += 1;
        counts.total += 1;
        Ok(Permit { limiter: self.clone(), ip })
    }

    pub fn open(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// What the per-address limit counts: an IPv4 address, or an IPv6 /64. One host is usually given a
/// whole /64 and may connect from any address in it, so counting single IPv6 addresses would let it
/// take any number of places.
fn client_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limiter.state.lock().unwrap_or_else(|p| p.into_inner());
        counts.total -= 1;
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A token bucket: `burst` messages at once, refilled at `per_sec`.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self { limit, tokens: f64::from(limit.burst), last: now }
    }

    /// Takes one message's token; false when the connection is over its rate.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.limit.per_sec).min(f64::from(self.limit.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn permits_count_in_total_and_per_address() {
        let limiter = ConnectionLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limiter.try_acquire(a).unwrap();
        let _a2 = limiter.try_acquire(a).unwrap();
        assert_eq!(limiter.try_acquire(a).unwrap_err(), Refused::PerIp(2));
        let _b1 = limiter.try_acquire(b).unwrap();
        assert_eq!(limiter.try_acquire(b).unwrap_err(), Refused::Full(3));
        drop(a1);
        assert_eq!(limiter.open(), 2);
        let _a3 = limiter.try_acquire(a).expect("a closed connection frees its place");
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let limiter = ConnectionLimiter::new(100, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _one = limiter.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _two = limiter.try_acquire(ip("2001:db8:1:2:ffff:aaaa:bbbb:cccc")).unwrap();
        assert_eq!(limiter.try_acquire(ip("2001:db8:1:2::99")).unwrap_err(), Refused::PerIp(2), "same /64");
        let _other = limiter.try_acquire(ip("2001:db8:1:3::1")).expect("another /64 is another client");
        let _v4 = limiter.try_acquire(ip("192.0.2.7")).unwrap();
        let _mapped = limiter.try_acquire(ip("::ffff:192.0.2.7")).unwrap();
        assert_eq!(limiter.try_acquire(ip("192.0.2.7")).unwrap_err(), Refused::PerIp(2), "mapped is the same IPv4");
        drop(_one);
        let _again = limiter.try_acquire(ip("2001:db8:1:2::5")).expect("a closed connection frees the /64's place");
    }

    #[test]
    fn refusals_are_complete_http_responses() {
        for refusal in [Refused::Full(1), Refused::PerIp(1)] {
            let text = std::str::from_utf8(refusal.response()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize =
                head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|n| n.parse().ok()).unwrap();
            assert_eq!(length, body.len(), "{text}");
        }
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = RateLimiter::new(RateLimit { per_sec: 10.0, burst: 5 }, start);
        assert!((0..5).all(|_| bucket.allow(start)));
        assert!(!bucket.allow(start), "the burst is spent");
        assert!(bucket.allow(start + Duration::from_millis(100)), "one token per 100 ms");
        assert!(!bucket.allow(start + Duration::from_millis(150)));
        assert!((0..5).all(|_| bucket.allow(start + Duration::from_secs(60))), "refills up to the burst only");
        assert!(!bucket.allow(start + Duration::from_secs(60)));
    }
}
