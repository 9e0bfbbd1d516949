//! Limits of one chat connection: its message rate (a token bucket), and the bounds of what it may
//! ask for and hold.

use std::time::{Duration, Instant};

/// A per-connection message rate: `per_sec` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Messages per second, on average.
    pub per_sec: f64,
    /// Messages allowed at once above the rate.
    pub burst: u32,
}

/// What one session may do.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Longest chat message, in characters.
    pub max_message_chars: usize,
    /// Longest display name, in characters.
    pub max_name_chars: usize,
    /// Messages sent on a join without `since`, so a new page shows recent conversation.
    pub join_backlog: usize,
    /// Most messages replayed by one join or history request.
    pub max_replay: usize,
    /// Requests per second, or none.
    pub rate_limit: Option<RateLimit>,
    /// How long a connection without a token has to send one.
    pub auth_timeout: Duration,
    /// Most rooms one publish may name.
    pub max_publish_rooms: usize,
    /// Most bytes of messages in one join's replay or one history answer (the outbox's bytes), so
    /// that a client that asks for much and reads slowly holds no more than a slow member does.
    pub max_replay_bytes: usize,
}

/// What the hub holds for each connection.
#[derive(Debug, Clone)]
pub struct HubLimits {
    /// Deliveries queued for one client before it counts as too slow.
    pub outbox_messages: usize,
    /// Bytes queued for one client before it counts as too slow.
    pub outbox_bytes: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Most members listed in one presence answer.
    pub max_presence: usize,
    /// Sessions one signed-in user (token subject) may have on this node at once; 0 is no limit.
    pub max_sessions_per_user: usize,
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
    use super::*;

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
