//! The chat protocols spoken on `/ws`.
//!
//! - **Seed** (no subprotocol): the client sends `{"name": .., "message": ..}`; it receives every chat
//!   message of the default room as `{"name": .., "message": .., "time": "HH:MM:SS"}` and nothing else.
//! - **`switchboard.v1`**: typed JSON envelopes with rooms, presence, offsets, resume, idempotent
//!   publish and errors that name the request they answer. Documented in `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::StoredMessage;

/// The subprotocol name of the full protocol.
pub const V1: &str = "switchboard.v1";

/// A chat message as the seed page expects it.
#[derive(Debug, Serialize)]
pub struct SeedOut<'a> {
    pub name: &'a str,
    pub message: &'a str,
    pub time: &'a str,
}

/// A request from a `switchboard.v1` client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Join a room; with `since`, receive everything after that offset first.
    Join {
        room: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        since: Option<u64>,
        #[serde(default)]
        req: Option<Value>,
    },
    Leave {
        room: String,
        #[serde(default)]
        req: Option<Value>,
    },
    /// Publish to one room (`room`) or several (`rooms`). `id` makes a retry safe.
    Publish {
        #[serde(default)]
        room: Option<String>,
        #[serde(default)]
        rooms: Option<Vec<String>>,
        message: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        req: Option<Value>,
    },
    Presence {
        room: String,
        #[serde(default)]
        req: Option<Value>,
    },
    History {
        room: String,
        #[serde(default)]
        since: Option<u64>,
        #[serde(default)]
        limit: Option<usize>,
        #[serde(default)]
        req: Option<Value>,
    },
    /// Authenticate (when the connection had no token) or replace the token before it expires.
    Auth {
        token: String,
        #[serde(default)]
        req: Option<Value>,
    },
}

/// Error codes of `{"type": "error"}` envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    BadRequest,
    UnknownRoom,
    TooLong,
    NotAllowed,
    BadToken,
    TooMany,
    Unavailable,
}

/// A chat message as a `switchboard.v1` envelope.
pub fn message_envelope(m: &StoredMessage) -> String {
    message_value(m).to_string()
}

/// The same envelope as a JSON value, for embedding (a `history` reply holds a list of them).
pub fn message_value(m: &StoredMessage) -> Value {
    serde_json::json!({
        "type": "message",
        "room": m.room,
        "offset": m.offset,
        "id": m.id,
        "name": m.name,
        "message": m.message,
        "time": m.time,
        "ts": m.ts_ms,
    })
}

pub fn seed_message(m: &StoredMessage) -> String {
    serde_json::to_string(&SeedOut { name: &m.name, message: &m.message, time: &m.time }).expect("strings serialize")
}

pub fn error_envelope(code: ErrorCode, message: &str, req: Option<&Value>) -> String {
    serde_json::json!({ "type": "error", "code": code, "message": message, "req": req }).to_string()
}

/// The `req` field of any request, even one that failed to parse as a known request.
pub fn request_ref(raw: &Value) -> Option<&Value> {
    raw.get("req")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_fields_are_refused() {
        let r: Request = serde_json::from_str(r#"{"type":"join","room":"lobby","since":3,"req":1}"#).unwrap();
        assert!(matches!(r, Request::Join { since: Some(3), .. }));
        let r: Request =
            serde_json::from_str(r#"{"type":"publish","rooms":["a","b"],"message":"hi","id":"x"}"#).unwrap();
        assert!(matches!(r, Request::Publish { rooms: Some(_), id: Some(_), .. }));
        assert!(serde_json::from_str::<Request>(r#"{"type":"join","room":"a","colour":"red"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"dance"}"#).is_err());
    }

    #[test]
    fn seed_output_has_exactly_the_seed_fields() {
        let m = StoredMessage {
            room: "lobby".into(),
            offset: 7,
            id: None,
            name: "Ann".into(),
            message: "<b>hi</b>".into(),
            time: "12:34:56".into(),
            ts_ms: 1,
        };
        assert_eq!(seed_message(&m), r#"{"name":"Ann","message":"<b>hi</b>","time":"12:34:56"}"#);
        let v: Value = serde_json::from_str(&message_envelope(&m)).unwrap();
        assert_eq!((v["type"].as_str(), v["offset"].as_u64()), (Some("message"), Some(7)));
    }
}
