//! Reading the server's `GET /metrics` (OpenMetrics text) in tests.

use std::time::{Duration, Instant};

/// The value of the sample `series` (`name{labels}`, or `name` alone) in an exposition text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// The server's `/metrics` text now (empty if it answered with something else).
pub fn text(addr: &str) -> String {
    let (_, body) = super::http_json(addr, "GET", "/metrics", None, None);
    body.as_str().unwrap_or_default().to_owned()
}

/// `series` in the server's `/metrics` now.
pub fn metric(addr: &str, series: &str) -> Option<f64> {
    sample(&text(addr), series)
}

/// Waits until `series` reaches at least `at_least` (counters settle as the server answers; they
/// exist from the start, at 0); the `/metrics` text that showed it. Fails after 10 s.
pub fn wait_for(addr: &str, series: &str, at_least: f64) -> String {
    let started = Instant::now();
    loop {
        let text = text(addr);
        if sample(&text, series).is_some_and(|v| v >= at_least) {
            return text;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{series} never reached {at_least}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
