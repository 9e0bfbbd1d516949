//! `GET /metrics` against the real server: what a client does shows up in the counters and
//! histograms, and the Grafana dashboard in docs/ uses only metrics the server exports.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};

use serde_json::{json, Value};
use support::chat::{ack_and_message, next_of, send, v1_client};
use support::metrics::{sample, wait_for};
use support::start_serve;

fn metrics_text(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{response}");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// Every sample name the exposition can have, from its `# TYPE` lines.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
    }
    names
}

#[tokio::test]
async fn a_publish_and_its_delivery_a_bad_handshake_and_a_bad_token_are_counted() {
    let (server, _db) = start_serve(&[]);
    let addr = &server.addr;
    let mut ann = v1_client(addr).await;
    send(&mut ann, json!({"type": "join", "room": "lobby", "name": "Ann"})).await;
    next_of(&mut ann, "joined").await;
    send(&mut ann, json!({"type": "publish", "room": "lobby", "message": "hi", "id": "m1"})).await;
    ack_and_message(&mut ann).await;
    // The same id again: acknowledged as a duplicate, not counted as a second message.
    send(&mut ann, json!({"type": "publish", "room": "lobby", "message": "hi", "id": "m1"})).await;
    assert_eq!(next_of(&mut ann, "ack").await["duplicate"], true);
    let too_long = "x".repeat(5000);
    send(&mut ann, json!({"type": "publish", "room": "lobby", "message": too_long})).await;
    next_of(&mut ann, "error").await;

    // Not an upgrade: refused with 400, counted as a bad handshake.
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    raw.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    raw.read_exact(&mut head).unwrap();
    assert!(head.ends_with(b"400"), "{}", String::from_utf8_lossy(&head));

    let text = wait_for(addr, r#"switchboard_connections_refused_total{reason="bad_handshake"}"#, 1.0);
    let ws = |name: &str| sample(&text, &format!(r#"{name}{{transport="websocket"}}"#));
    assert_eq!(ws("switchboard_connections_opened_total"), Some(1.0), "{text}");
    assert_eq!(ws("switchboard_messages_published_total"), Some(1.0), "the duplicate is not counted:\n{text}");
    assert!(ws("switchboard_messages_delivered_total").is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(ws("switchboard_publish_ack_seconds_count"), Some(2.0), "both acks are timed:\n{text}");
    assert_eq!(sample(&text, r#"switchboard_messages_refused_total{reason="too_long"}"#), Some(1.0), "{text}");
    assert!(sample(&text, "switchboard_publish_delivery_seconds_count").is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(sample(&text, "switchboard_sessions"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "switchboard_rooms"), Some(1.0), "{text}");
}

/// A session ended by the rate limit while publishes it sent were still being stored: every
/// message stored counts as published, and the end as one refusal for the rate.
#[tokio::test]
async fn publishes_stored_after_their_session_ended_count_and_so_does_the_rate_cut() {
    let (server, _db) = start_serve(&["--rate-limit", "1", "--rate-burst", "200", "--api-key", "k"]);
    let addr = &server.addr;
    let mut ws = v1_client(addr).await;
    // Back to back, no waiting for acks: the 201st message ends the session.
    for i in 0..400 {
        let publish = json!({"type": "publish", "room": "burst", "message": format!("m{i}")});
        if ws.feed(publish.to_string()).await.is_err() {
            break;
        }
    }
    let _ = ws.flush().await;
    assert_eq!(support::chat::next_close(&mut ws).await.map(|(code, _)| code), Some(1008));
    let text = wait_for(addr, r#"switchboard_messages_refused_total{reason="rate_limit"}"#, 1.0);
    assert_eq!(sample(&text, r#"switchboard_messages_refused_total{reason="rate_limit"}"#), Some(1.0), "{text}");
    // What was stored, once the engine has stored all it was given (the room's last offset has not
    // moved for a second), against what was counted.
    let series = r#"switchboard_messages_published_total{transport="websocket"}"#;
    let last = || {
        let page = support::http_json(addr, "GET", "/api/rooms/burst/history?limit=1", Some("k"), None).1;
        page["last"].as_f64().unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (mut stored, mut still) = (last(), 0);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let now = last();
        still = if now == stored { still + 1 } else { 0 };
        stored = now;
        let counted = sample(&support::metrics::text(addr), series);
        if still >= 4 && counted == Some(stored) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stored} stored, {counted:?} counted as published");
    }
    assert!(stored >= 1.0);
}

/// The client publish over HTTP (`POST /publish`, for SSE and long polling) and the server API's
/// publish count their refusals as the WebSocket's do.
#[tokio::test]
async fn publishes_refused_over_http_are_counted() {
    let (server, _db) = start_serve(&["--api-key", "k"]);
    let addr = &server.addr;
    let too_long = json!({"room": "lobby", "message": "x".repeat(5000)}).to_string();
    let (status, answer) = support::http_json(addr, "POST", "/publish", None, Some(&too_long));
    assert_eq!((status, answer["code"].as_str()), (400, Some("too_long")), "{answer}");
    let bad_room = json!({"room": "a b", "message": "hi"}).to_string();
    let (status, answer) = support::http_json(addr, "POST", "/api/publish", Some("k"), Some(&bad_room));
    assert_eq!(status, 400, "{answer}");
    let text = wait_for(addr, r#"switchboard_messages_refused_total{reason="too_long"}"#, 1.0);
    assert_eq!(sample(&text, r#"switchboard_messages_refused_total{reason="too_long"}"#), Some(1.0), "{text}");
    let code = answer["code"].as_str().unwrap();
    assert_eq!(
        sample(&text, &format!(r#"switchboard_messages_refused_total{{reason="{code}"}}"#)),
        Some(1.0),
        "{text}"
    );
    // Server API calls with a wrong key, or none, are auth failures of their own.
    assert_eq!(support::http_json(addr, "GET", "/api/info", Some("wrong"), None).0, 401);
    assert_eq!(support::http_json(addr, "GET", "/api/info", None, None).0, 401);
    let series = r#"switchboard_auth_failures_total{reason="api_key"}"#;
    assert_eq!(sample(&wait_for(addr, series, 2.0), series), Some(2.0));
}

#[tokio::test]
async fn a_refused_token_is_an_auth_failure_and_an_auth_refusal() {
    let (server, _db) = start_serve(&["--jwt-secret", "metrics-test-secret"]);
    let addr = &server.addr;
    let url = format!("ws://{addr}/ws?token=not-a-jwt");
    let refused = switchboard_ws::ClientBuilder::new(url).protocol("switchboard.v1").connect().await;
    assert!(refused.is_err(), "a bad token in the handshake is refused");
    let text = wait_for(addr, r#"switchboard_auth_failures_total{reason="invalid"}"#, 1.0);
    assert_eq!(sample(&text, r#"switchboard_connections_refused_total{reason="auth"}"#), Some(1.0), "{text}");
}

#[test]
fn the_grafana_dashboard_is_valid_and_uses_only_exported_metrics() {
    let (server, _db) = start_serve(&[]);
    let exported = exported_names(&metrics_text(&server.addr));
    assert!(exported.contains("switchboard_messages_delivered_total"), "{exported:?}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    assert!(dashboard["title"].is_string() && dashboard["schemaVersion"].is_u64(), "a Grafana dashboard");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {panel}"));
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let mut rest = expr;
            while let Some(at) = rest.find("switchboard_") {
                let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
    }
    let unknown: Vec<&String> = used.iter().filter(|name| !exported.contains(*name)).collect();
    assert!(unknown.is_empty(), "the dashboard uses metrics the server does not export: {unknown:?}");
    assert!(used.len() >= 10, "the dashboard covers the metrics: {used:?}");
}
