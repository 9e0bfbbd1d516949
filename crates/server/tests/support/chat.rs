//! A chat client for tests: connect with either protocol, send JSON, wait for envelopes.

use std::time::Duration;

use serde_json::Value;
use switchboard_ws::{ClientBuilder, ClientStream, Message, WebSocket};

pub type Ws = WebSocket<ClientStream>;

pub async fn seed_client(addr: &str) -> Ws {
    let (ws, accepted) = switchboard_ws::connect(&format!("ws://{addr}/ws")).await.unwrap();
    assert_eq!(accepted.protocol, None);
    ws
}

/// A token for `sub` signed with `secret` (HS256), valid for `ttl_secs`, with no room grants.
pub fn token(secret: &str, sub: &str, ttl_secs: u64) -> String {
    use switchboard::chat::access::{mint, unix_now, Claims};
    let claims =
        Claims { sub: sub.into(), exp: unix_now() + ttl_secs, name: None, rooms: None, join: None, publish: None };
    mint(secret.as_bytes(), &claims).unwrap()
}

/// A `switchboard.v1` client whose handshake carries `token`.
pub async fn signed_in(addr: &str, token: &str) -> Ws {
    let (ws, _) = ClientBuilder::new(format!("ws://{addr}/ws"))
        .protocol("switchboard.v1")
        .header("Authorization", format!("Bearer {token}"))
        .connect()
        .await
        .unwrap();
    ws
}

pub async fn v1_client(addr: &str) -> Ws {
    let (ws, accepted) =
        ClientBuilder::new(format!("ws://{addr}/ws")).protocol("switchboard.v1").connect().await.unwrap();
    assert_eq!(accepted.protocol.as_deref(), Some("switchboard.v1"));
    ws
}

pub async fn send(ws: &mut Ws, value: Value) {
    ws.send(value.to_string()).await.unwrap();
}

/// The next JSON text message (within 5 s).
pub async fn next(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.recv()).await.expect("a message within 5 s") {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// The next envelope of the given type, skipping others (presence events and the like).
pub async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = next(ws).await;
        if v["type"] == kind {
            return v;
        }
    }
}

/// A publisher's own ack and its own copy of the message, which may arrive in either order (the
/// ack comes from the publish, the copy from the room's fan-out); presence events are skipped.
pub async fn ack_and_message(ws: &mut Ws) -> (Value, Value) {
    let (mut ack, mut message) = (None, None);
    while ack.is_none() || message.is_none() {
        let envelope = next(ws).await;
        match envelope["type"].as_str() {
            Some("ack") if ack.is_none() => ack = Some(envelope),
            Some("message") if message.is_none() => message = Some(envelope),
            Some("presence") => {}
            _ => panic!("expected an ack and a message, got {envelope}"),
        }
    }
    (ack.unwrap(), message.unwrap())
}

/// Asserts nothing arrives for a while.
pub async fn quiet(ws: &mut Ws, ms: u64) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(ms), ws.recv()).await {
        panic!("expected silence, got {m:?}");
    }
}

/// The close frame's code and reason (skipping other messages), or `None` if the connection ended
/// without one.
pub async fn next_close(ws: &mut Ws) -> Option<(u16, String)> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.recv()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| (f.code.0, f.reason)),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}
