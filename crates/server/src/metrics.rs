//! What `GET /metrics` exports (Prometheus / OpenMetrics text, through `prometheus-client`): counters
//! of connections, messages and failures, and the latency of publishes. One set per process, like a
//! log: the chat core, the transports and the listener count into [`metrics()`] without carrying it
//! around. `docs/operations.md` lists each metric and what to alert on.
//!
//! Counters on the fan-out path (deliveries) are resolved once per label here, so counting is one
//! atomic add, never a label lookup.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a client reaches the chat: the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    WebSocket,
    Sse,
    LongPoll,
    /// `POST /publish` and `POST /api/...`.
    Http,
}

impl Transport {
    const ALL: [Transport; 4] = [Transport::WebSocket, Transport::Sse, Transport::LongPoll, Transport::Http];

    pub fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Sse => "sse",
            Self::LongPoll => "longpoll",
            Self::Http => "http",
        }
    }
}

/// Why a connection or handshake was refused: the `reason` label of `switchboard_connections_refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A connection limit (in all, or per address).
    Limit,
    /// A page of an origin that may not connect.
    Origin,
    /// No token, or a bad or expired one.
    Auth,
    /// Not a valid WebSocket handshake, or a bad SSE/poll request.
    BadHandshake,
}

impl Refusal {
    const ALL: [Refusal; 4] = [Refusal::Limit, Refusal::Origin, Refusal::Auth, Refusal::BadHandshake];

    fn label(self) -> &'static str {
        match self {
            Self::Limit => "limit",
            Self::Origin => "origin",
            Self::Auth => "auth",
            Self::BadHandshake => "bad_handshake",
        }
    }
}

type Labels = [(&'static str, &'static str); 1];

/// Every `reason` of `switchboard_messages_refused_total`: the chat's error codes, and the rate limit.
const MESSAGE_REFUSALS: [&str; 9] = [
    "bad_json",
    "bad_request",
    "unknown_room",
    "too_long",
    "not_allowed",
    "bad_token",
    "too_many",
    "unavailable",
    "rate_limit",
];
/// Every `kind` of `switchboard_engine_errors_total` ([`crate::engine::EngineError::kind`]).
const ENGINE_ERRORS: [&str; 6] = ["open", "write", "read", "busy", "unavailable", "closed"];

/// Makes every series of a labelled family exist from the start: at zero, it is exported (and
/// alerts on `rate()` see it begin) before the first event.
fn precreate(family: &Family<Labels, Counter>, key: &'static str, values: &[&'static str]) {
    for value in values {
        drop(family.get_or_create(&[(key, *value)]));
    }
}

/// Counters by transport, resolved ahead.
pub struct ByTransport([Counter; 4]);

impl ByTransport {
    fn new(family: &Family<Labels, Counter>) -> Self {
        Self(Transport::ALL.map(|t| family.get_or_create(&[("transport", t.label())]).clone()))
    }

    pub fn inc(&self, transport: Transport) {
        self.by(transport, 1);
    }

    pub fn by(&self, transport: Transport, n: u64) {
        self.0[transport as usize].inc_by(n);
    }
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub connections_opened: ByTransport,
    connections_refused: Family<Labels, Counter>,
    pub messages_published: ByTransport,
    pub messages_delivered: ByTransport,
    messages_refused: Family<Labels, Counter>,
    pub slow_consumer_cuts: ByTransport,
    /// WebSocket handshakes accepted, by HTTP version: `[HTTP/1.1 upgrade, HTTP/2 extended CONNECT]`.
    websocket_handshakes: [Counter; 2],
    auth_failures: Family<Labels, Counter>,
    pub token_expiries: Counter,
    engine_errors: Family<Labels, Counter>,
    publish_ack_seconds: [Histogram; 4],
    pub publish_delivery_seconds: Histogram,
    connections: Gauge,
    sessions: Gauge,
    rooms: Gauge,
    tasks: Gauge,
}

/// Latency buckets: 100 µs to about 1.6 s, doubling.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let counters = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<Labels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let opened = counters(&mut registry, "connections_opened", "Chat sessions opened, by transport");
        let connections_refused =
            counters(&mut registry, "connections_refused", "Connections and handshakes refused, by reason");
        let published = counters(&mut registry, "messages_published", "Messages stored (not duplicates), by transport");
        let delivered =
            counters(&mut registry, "messages_delivered", "Messages handed to a client's connection, by transport");
        let messages_refused =
            counters(&mut registry, "messages_refused", "Publishes refused (an error answered), by reason");
        let cuts =
            counters(&mut registry, "slow_consumer_cuts", "Sessions let go for not reading fast enough, by transport");
        let handshakes = counters(
            &mut registry,
            "websocket_handshakes",
            "WebSocket handshakes accepted, by HTTP version (1.1: Upgrade, 2: extended CONNECT)",
        );
        let websocket_handshakes = ["1.1", "2"].map(|v| handshakes.get_or_create(&[("http", v)]).clone());
        let auth_failures = counters(
            &mut registry,
            "auth_failures",
            "Tokens refused, by reason (invalid, expired), and server API calls without the right key (api_key)",
        );
        let engine_errors = counters(
            &mut registry,
            "engine_errors",
            "History or fan-out engine failures, by kind (unavailable, busy, ...)",
        );
        let token_expiries = Counter::default();
        registry.register("token_expiries", "Sessions ended because their token expired", token_expiries.clone());
        let ack_family = Family::<Labels, Histogram>::new_with_constructor(latency as fn() -> Histogram);
        registry.register(
            "publish_ack_seconds",
            "From a publish received to its ack sent (the history's write), by transport",
            ack_family.clone(),
        );
        let publish_ack_seconds = Transport::ALL.map(|t| ack_family.get_or_create(&[("transport", t.label())]).clone());
        let publish_delivery_seconds = latency();
        registry.register(
            "publish_delivery_seconds",
            "From a message's publish to its fan-out on this node (wall clock, across nodes too)",
            publish_delivery_seconds.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let connections = gauge(&mut registry, "connections", "Open TCP connections admitted by the listeners");
        let sessions = gauge(&mut registry, "sessions", "Chat sessions on this node (WebSocket, SSE, long poll)");
        let rooms = gauge(&mut registry, "rooms", "Rooms with members on this node");
        let tasks = gauge(&mut registry, "tasks", "Tokio tasks alive");
        precreate(&connections_refused, "reason", &Refusal::ALL.map(Refusal::label));
        precreate(&messages_refused, "reason", &MESSAGE_REFUSALS);
        precreate(&auth_failures, "reason", &["invalid", "expired", "api_key"]);
        precreate(&engine_errors, "kind", &ENGINE_ERRORS);
        Self {
            registry,
            connections_opened: ByTransport::new(&opened),
            connections_refused,
            messages_published: ByTransport::new(&published),
            messages_delivered: ByTransport::new(&delivered),
            messages_refused,
            slow_consumer_cuts: ByTransport::new(&cuts),
            websocket_handshakes,
            auth_failures,
            token_expiries,
            engine_errors,
            publish_ack_seconds,
            publish_delivery_seconds,
            connections,
            sessions,
            rooms,
            tasks,
        }
    }

    pub fn refused(&self, reason: Refusal) {
        self.connections_refused.get_or_create(&[("reason", reason.label())]).inc();
    }

    /// A WebSocket handshake accepted, over HTTP/2 or HTTP/1.1.
    pub fn websocket_handshake(&self, http2: bool) {
        self.websocket_handshakes[usize::from(http2)].inc();
    }

    /// A publish answered with an error; `reason` is its error code.
    pub fn message_refused(&self, reason: &'static str) {
        self.messages_refused.get_or_create(&[("reason", reason)]).inc();
    }

    /// A token refused (`invalid`, `expired`), or a server API call without the right key (`api_key`).
    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&[("reason", reason)]).inc();
    }

    /// The engine failed a publish or a read; `kind` names how (its error code).
    pub fn engine_error(&self, kind: &'static str) {
        self.engine_errors.get_or_create(&[("kind", kind)]).inc();
    }

    pub fn publish_acked(&self, transport: Transport, took: Duration) {
        self.publish_ack_seconds[transport as usize].observe(took.as_secs_f64());
    }

    /// The exposition text, with the gauges set to what the caller read just now.
    pub fn render(&self, connections: usize, sessions: usize, rooms: usize, tasks: usize) -> String {
        let set = |gauge: &Gauge, value: usize| gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        set(&self.connections, connections);
        set(&self.sessions, sessions);
        set(&self.rooms, rooms);
        set(&self.tasks, tasks);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_under_their_names_and_labels() {
        let metrics = Metrics::new();
        metrics.messages_delivered.by(Transport::Sse, 3);
        metrics.refused(Refusal::Origin);
        metrics.publish_acked(Transport::WebSocket, Duration::from_millis(3));
        let text = metrics.render(1, 2, 3, 4);
        assert!(text.contains(r#"switchboard_messages_delivered_total{transport="sse"} 3"#), "{text}");
        assert!(text.contains(r#"switchboard_connections_refused_total{reason="origin"} 1"#), "{text}");
        assert!(text.contains(r#"switchboard_publish_ack_seconds_count{transport="websocket"} 1"#), "{text}");
        assert!(text.contains("switchboard_rooms 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "OpenMetrics text");
        assert!(text.contains(r#"switchboard_engine_errors_total{kind="busy"} 0"#), "series exist at zero: {text}");
    }

    #[test]
    fn the_precreated_labels_are_the_ones_the_code_uses() {
        use crate::chat::wire::ErrorCode::*;
        let codes = [BadJson, BadRequest, UnknownRoom, TooLong, NotAllowed, BadToken, TooMany, Unavailable];
        for code in codes {
            assert!(MESSAGE_REFUSALS.contains(&code.label()), "{code:?}");
        }
        use crate::engine::EngineError;
        let errors = [
            EngineError::Open { path: String::new(), reason: String::new() },
            EngineError::Misconfigured { path: String::new(), reason: String::new() },
            EngineError::Write(String::new()),
            EngineError::Read(String::new()),
            EngineError::Busy,
            EngineError::Unavailable(String::new()),
            EngineError::Unanswered(String::new()),
            EngineError::Closed,
        ];
        for error in errors {
            assert!(ENGINE_ERRORS.contains(&error.kind()), "{error:?}");
        }
    }
}
