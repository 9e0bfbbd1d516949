//! The chat protocols spoken on `/ws`, as types: what clients send ([`Request`]; a seed client's
//! `{"name", "message"}` is read as a JSON map) and what they receive ([`Envelope`], [`SeedOut`]).
//!
//! - **Seed** ([`Dialect::Seed`], no subprotocol): the client sends `{"name": .., "message": ..}`; it
//!   receives every chat message of the default room as `{"name": .., "message": .., "time": "HH:MM:SS"}`
//!   and nothing else.
//! - **`switchboard.v1`** ([`Dialect::V1`]): typed JSON envelopes with rooms, presence, offsets, resume,
//!   idempotent publish and errors that name the request they answer. Documented in `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{PresenceEntry, StoredMessage};

/// The subprotocol name of the full protocol.
pub const V1: &str = "switchboard.v1";

/// Which protocol a connection speaks, chosen once, at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The seeds' JSON chat: no subprotocol, no envelopes, one room.
    Seed,
    /// `switchboard.v1`.
    V1,
}

impl Dialect {
    /// The dialect of a connection that negotiated `subprotocol` (none means the seed protocol).
    pub fn from_subprotocol(subprotocol: Option<&str>) -> Self {
        if subprotocol == Some(V1) {
            Dialect::V1
        } else {
            Dialect::Seed
        }
    }
}

/// A chat message as the seed page expects it.
#[derive(Debug, Serialize)]
pub struct SeedOut<'a> {
    /// Sender's display name.
    pub name: &'a str,
    /// The text.
    pub message: &'a str,
    /// `HH:MM:SS`, server time.
    pub time: &'a str,
}

impl<'a> SeedOut<'a> {
    /// The seed form of a stored message.
    pub fn of(m: &'a StoredMessage) -> Self {
        Self { name: &m.name, message: &m.message, time: &m.time }
    }

    /// As JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("strings serialize")
    }
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
        /// The epoch `since` belongs to (from an earlier `joined`); another epoch means the offsets
        /// are void.
        #[serde(default)]
        epoch: Option<String>,
        #[serde(default)]
        req: Option<Value>,
    },
    /// Leave a room.
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
    /// Who is in a room.
    Presence {
        room: String,
        #[serde(default)]
        req: Option<Value>,
    },
    /// Messages of a room after an offset.
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
    /// Are you there? Answered with `pong`: a browser cannot see the WebSocket's own pings, and
    /// finds out this way that a connection went quiet for good (a laptop that slept, a NAT that
    /// forgot it).
    Ping {
        #[serde(default)]
        req: Option<Value>,
    },
}

/// Error codes of `{"type": "error"}` envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text was not JSON.
    BadJson,
    /// JSON, but not a valid request.
    BadRequest,
    /// Not a member of the room named.
    UnknownRoom,
    /// A message or name over its limit.
    TooLong,
    /// The token does not allow it.
    NotAllowed,
    /// A token that does not verify.
    BadToken,
    /// Over a count limit (rooms).
    TooMany,
    /// The history store could not do it; retry.
    Unavailable,
}

impl ErrorCode {
    /// The code as it is on the wire (and as a metric's `reason` label).
    pub fn label(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::BadRequest => "bad_request",
            Self::UnknownRoom => "unknown_room",
            Self::TooLong => "too_long",
            Self::NotAllowed => "not_allowed",
            Self::BadToken => "bad_token",
            Self::TooMany => "too_many",
            Self::Unavailable => "unavailable",
        }
    }
}

/// One member in a presence list or event.
#[derive(Debug, Clone, Serialize)]
pub struct Member<'a> {
    /// Unique across nodes.
    pub id: &'a str,
    /// Display name.
    pub name: &'a str,
}

impl<'a> From<&'a PresenceEntry> for Member<'a> {
    fn from(entry: &'a PresenceEntry) -> Self {
        Self { id: &entry.id, name: &entry.name }
    }
}

/// What a `switchboard.v1` client receives.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Envelope<'a> {
    /// A chat message.
    Message {
        room: &'a str,
        offset: u64,
        id: &'a Option<String>,
        name: &'a str,
        message: &'a str,
        time: &'a str,
        ts: i64,
    },
    /// The answer to a join: where the room stands and who is there; the replay follows.
    Joined {
        room: &'a str,
        offset: u64,
        epoch: &'a str,
        first: u64,
        recovered: Option<bool>,
        members: Vec<Member<'a>>,
        truncated: bool,
        req: Option<&'a Value>,
    },
    /// The connection is no longer in a room (a leave, or a refreshed token that does not grant it).
    Left {
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        req: Option<&'a Value>,
    },
    /// A publish is stored (or was before, with `duplicate`).
    Ack { room: &'a str, offset: u64, id: &'a Option<String>, duplicate: bool, req: Option<&'a Value> },
    /// The answer to a presence request.
    #[serde(rename = "presence")]
    PresenceList { room: &'a str, members: Vec<Member<'a>>, truncated: bool, req: Option<&'a Value> },
    /// Someone joined, changed name or left.
    #[serde(rename = "presence")]
    PresenceEvent { room: &'a str, event: &'a str, member: Member<'a> },
    /// The answer to a history request.
    History {
        room: &'a str,
        epoch: &'a str,
        messages: Vec<Envelope<'a>>,
        first: u64,
        last: u64,
        req: Option<&'a Value>,
    },
    /// A token was accepted.
    Authed { sub: &'a Option<String>, exp: Option<u64>, req: Option<&'a Value> },
    /// The answer to a ping.
    Pong { req: Option<&'a Value> },
    /// A request failed; `req` names it.
    Error { code: ErrorCode, message: &'a str, req: Option<&'a Value> },
}

impl<'a> Envelope<'a> {
    /// The envelope of a stored message.
    pub fn message(m: &'a StoredMessage) -> Self {
        Envelope::Message {
            room: &m.room,
            offset: m.offset,
            id: &m.id,
            name: &m.name,
            message: &m.message,
            time: &m.time,
            ts: m.ts_ms,
        }
    }

    /// An error answering `req`.
    pub fn error(code: ErrorCode, message: &'a str, req: Option<&'a Value>) -> Self {
        Envelope::Error { code, message, req }
    }

    /// As JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("envelopes serialize")
    }
}

/// An error envelope as text (the common case of a request that failed).
pub fn error_text(code: ErrorCode, message: &str, req: Option<&Value>) -> String {
    Envelope::error(code, message, req).encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> StoredMessage {
        StoredMessage {
            room: "lobby".into(),
            offset: 7,
            id: None,
            name: "Ann".into(),
            message: "<b>hi</b>".into(),
            time: "12:34:56".into(),
            ts_ms: 1,
        }
    }

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
        let m = stored();
        assert_eq!(SeedOut::of(&m).encode(), r#"{"name":"Ann","message":"<b>hi</b>","time":"12:34:56"}"#);
    }

    #[test]
    fn envelopes_carry_their_type_and_every_field() {
        let m = stored();
        assert_eq!(
            Envelope::message(&m).encode(),
            r#"{"type":"message","room":"lobby","offset":7,"id":null,"name":"Ann","message":"<b>hi</b>","time":"12:34:56","ts":1}"#
        );
        let req = Value::from(5);
        let left = Envelope::Left { room: "r", reason: None, req: Some(&req) }.encode();
        assert_eq!(left, r#"{"type":"left","room":"r","req":5}"#);
        let event = Envelope::PresenceEvent { room: "r", event: "join", member: Member { id: "n-1", name: "Bo" } };
        assert_eq!(
            event.encode(),
            r#"{"type":"presence","room":"r","event":"join","member":{"id":"n-1","name":"Bo"}}"#
        );
        let error = error_text(ErrorCode::UnknownRoom, "not a member", None);
        assert_eq!(error, r#"{"type":"error","code":"unknown_room","message":"not a member","req":null}"#);
    }

    #[test]
    fn no_subprotocol_is_the_seed_dialect() {
        assert_eq!(Dialect::from_subprotocol(None), Dialect::Seed);
        assert_eq!(Dialect::from_subprotocol(Some("chat")), Dialect::Seed);
        assert_eq!(Dialect::from_subprotocol(Some(V1)), Dialect::V1);
    }
}
