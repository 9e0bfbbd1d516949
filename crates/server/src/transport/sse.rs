//! Server-Sent Events at `GET /sse`, and the client publish beside it at `POST /publish`: the chat
//! for clients that cannot open a WebSocket (a proxy that strips `Upgrade`) or only listen
//! (`EventSource`, `curl -N`).
//!
//! A stream is a chat session like a WebSocket's: it joins its rooms (with what its cursor says it
//! saw), counts as present in them while it is open, and is cut off like a slow WebSocket when it
//! does not read. Each chat message is an `event: message` whose `id:` is the stream's [`Cursor`]
//! after it, so a reconnect with `Last-Event-ID` (which `EventSource` sends by itself) or `?cursor=`
//! gets exactly what it missed in every room. Nothing on the server moves when an event is sent:
//! the client's cursor is its place.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::{BufMut, BytesMut};
use hyper::body::Frame;
use serde_json::{json, Value};

use super::http::{bearer, percent_decode};
use super::wake::WakeFlag;
use super::ws::LiveGuard;
use crate::chat::access::{AuthError, Identity};
use crate::chat::limits::{RateLimit, RateLimiter};
use crate::chat::message::{check_name, check_room};
use crate::chat::publish;
use crate::chat::session::{End, Session};
use crate::chat::wire::{Dialect, ErrorCode};
use crate::chat::Core;
use crate::metrics::{metrics, Refusal, Transport};

/// Deliveries written into one chunk at most.
const DELIVERY_BATCH: usize = 64;
/// What `retry:` tells `EventSource`: milliseconds before it reconnects.
const RETRY_MS: u64 = 1000;
/// Cookie that may carry the token (`EventSource` cannot set headers).
pub const TOKEN_COOKIE: &str = "switchboard_token";

/// Where a client stands in each of its rooms: the last offset it saw there and that offset's
/// epoch. On the wire it is opaque (URL-safe base64 of `{"ROOM": ["EPOCH", OFFSET]}`): the SSE event
/// id and the long-poll cursor are the same string, so a client can change transports.
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    places: BTreeMap<String, (String, u64)>,
    /// Moves whenever anything but the last room's offset does: what the text holds before that
    /// offset is kept (in a [`Scratch`]) until it moves.
    shape: u64,
}

impl PartialEq for Cursor {
    fn eq(&self, other: &Self) -> bool {
        self.places == other.places
    }
}

impl Eq for Cursor {}

impl Cursor {
    /// Reads a cursor; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid cursor: {why}");
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| bad("not base64url"))?;
        let map: BTreeMap<String, (String, u64)> = serde_json::from_slice(&bytes).map_err(|_| bad("not a cursor"))?;
        if let Some(room) = map.keys().find(|room| check_room(room).is_err()) {
            return Err(bad(&format!("names an invalid room {room:?}")));
        }
        if map.values().any(|(epoch, _)| epoch.len() > 64 || !epoch.bytes().all(|b| b.is_ascii_alphanumeric())) {
            return Err(bad("an epoch is letters and digits"));
        }
        Ok(Self { places: map, shape: 0 })
    }

    /// The opaque text.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        self.encode_into(&mut out, &mut Scratch::default());
        out.into_iter().map(char::from).collect()
    }

    /// Appends the opaque text to `out`, with buffers kept between calls (this runs for every
    /// event of every stream).
    ///
    /// Between two events of a stream usually only the last room's offset moves, so the JSON is
    /// written in two parts: everything before that offset, padded with spaces (JSON allows them)
    /// to a multiple of 3 bytes so that its base64 stands alone and is kept until the cursor's
    /// shape moves, then the offset and the closing brackets, encoded afresh.
    pub(crate) fn encode_into(&self, out: &mut impl BufMut, scratch: &mut Scratch) {
        let Some((_, &(_, last_offset))) = self.places.last_key_value() else {
            out.put_slice(b"e30"); // `{}`
            return;
        };
        let json = &mut scratch.json;
        if scratch.prefix_shape != Some(self.shape) {
            // Written by hand: rooms (checked on the way in) and epochs (letters and digits, checked
            // in `parse`) need no escaping.
            json.clear();
            json.push(b'{');
            let last = self.places.len() - 1;
            for (i, (room, (epoch, offset))) in self.places.iter().enumerate() {
                if i > 0 {
                    json.push(b',');
                }
                json.push(b'"');
                json.put_slice(room.as_bytes());
                json.put_slice(b"\":[\"");
                json.put_slice(epoch.as_bytes());
                json.put_slice(b"\",");
                if i == last {
                    break;
                }
                push_decimal(json, *offset);
                json.push(b']');
            }
            while !json.len().is_multiple_of(3) {
                json.push(b' ');
            }
            scratch.prefix_base64.clear();
            push_base64url(&mut scratch.prefix_base64, json);
            scratch.prefix_shape = Some(self.shape);
        }
        out.put_slice(&scratch.prefix_base64);
        // The tail (at most 20 digits and `]}`, so at most 32 characters of base64) is put at once.
        json.clear();
        push_decimal(json, last_offset);
        json.put_slice(b"]}");
        let mut tail = [0u8; 32];
        let written = URL_SAFE_NO_PAD.encode_slice(&json[..], &mut tail).expect("32 bytes hold the tail");
        out.put_slice(&tail[..written]);
    }

    /// The offset and epoch it holds for `room`.
    pub fn get(&self, room: &str) -> Option<(&str, u64)> {
        self.places.get(room).map(|(epoch, offset)| (epoch.as_str(), *offset))
    }

    /// After a `joined` envelope (`value`, of room `room`): its epoch and last offset, and where
    /// the replay that follows it starts (`replay_from`, the offset of the next envelope when that
    /// is a message of the room).
    pub(crate) fn joined_envelope(&mut self, room: &str, value: &Value, replay_from: Option<u64>) {
        let (epoch, last) = (value["epoch"].as_str().unwrap_or_default(), value["offset"].as_u64().unwrap_or(0));
        self.joined(room, epoch, last, replay_from);
    }

    /// After a `joined`: the room's epoch is `epoch` and its last offset `last`. A place this
    /// history cannot continue from (none yet, another epoch's, or past `last`: one from a backup,
    /// or `u64::MAX`, "from now on") becomes the place just before the replay that follows, or
    /// `last` when none does: a stream cut right after its `joined` resumes with the same replay,
    /// not with the room's whole history.
    pub(crate) fn joined(&mut self, room: &str, epoch: &str, last: u64, replay_from: Option<u64>) {
        let start = replay_from.map_or(last, |first| first.saturating_sub(1).min(last));
        match self.places.get_mut(room) {
            Some(entry) if entry.0 == epoch && entry.1 > last => entry.1 = start,
            Some(entry) if entry.0 == epoch => return,
            Some(entry) => *entry = (epoch.to_owned(), start),
            None => {
                self.places.insert(room.to_owned(), (epoch.to_owned(), start));
            }
        }
        self.shape += 1;
    }

    /// After a message: true when it is new for this cursor (replay and live delivery can overlap).
    pub(crate) fn advance(&mut self, room: &str, offset: u64) -> bool {
        let moved: *const (String, u64) = match self.places.get_mut(room) {
            Some(entry) if offset > entry.1 => {
                entry.1 = offset;
                entry
            }
            Some(_) => return false,
            None => {
                self.places.insert(room.to_owned(), (String::new(), offset));
                self.shape += 1;
                return true;
            }
        };
        // Only the last room's offset sits after the kept part of the text. (The entry is told by
        // its address: comparing the names would compare the strings again.)
        if self.places.last_key_value().is_none_or(|(_, last)| !std::ptr::eq(last, moved)) {
            self.shape += 1;
        }
        true
    }
}

/// Buffers a stream keeps for writing its cursor (one cursor: what it keeps is told apart by the
/// cursor's shape alone).
#[derive(Default)]
pub(crate) struct Scratch {
    json: Vec<u8>,
    /// The base64 of the JSON before the last offset, and the cursor's shape it was written for.
    prefix_base64: Vec<u8>,
    prefix_shape: Option<u64>,
}

/// Appends `n` in decimal (without the formatting machinery: this runs for every event).
fn push_decimal(out: &mut impl BufMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

/// Appends `input` as unpadded URL-safe base64 (RFC 4648 §5), written straight into `out` (the
/// `base64` crate's string path zeroes a 1 KiB block and checks UTF-8 on each call, which cost more
/// than the encoding itself for an event's cursor).
fn push_base64url(out: &mut Vec<u8>, input: &[u8]) {
    let start = out.len();
    out.resize(start + input.len().div_ceil(3) * 4, 0);
    let written = URL_SAFE_NO_PAD.encode_slice(input, &mut out[start..]).expect("room for the base64");
    out.truncate(start + written);
}

/// A request refused: its status, and the JSON body naming the problem (the server API's error).
pub use super::api::Failure as Refused;

pub(crate) fn refused(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Refused {
    super::api::fail(status, code, message)
}

/// The answer to a session that could not start with its token: 429 for a user at its session
/// limit (`--max-connections-per-user`), 403 for a token that does not grant what it needs.
pub(crate) fn start_refused(end: End) -> Refused {
    if end.code == crate::chat::session::POLICY_VIOLATION {
        // Counted by the session as it refused the user.
        return refused(StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooMany, end.reason);
    }
    refused(StatusCode::FORBIDDEN, ErrorCode::NotAllowed, end.reason)
}

/// A JSON error answer naming the problem.
fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    refused(status, code, message).into_response()
}

/// The query's `name=value` pairs, decoded, in order (a name may repeat); a 400 for one that does
/// not decode to UTF-8.
pub fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, Refused> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            percent_decode(name).zip(percent_decode(value)).ok_or_else(|| {
                let shown: String = name.chars().take(64).collect();
                let message = format!("the query parameter {shown:?} is not UTF-8 once its %XX escapes are decoded");
                refused(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
            })
        })
        .collect()
}

/// Who the request is: a token from `Authorization: Bearer`, the `token` parameter or the
/// `switchboard_token` cookie, checked as `/ws` checks one; anonymous where the server allows it.
/// The cookie is not taken from another site's page unless its origin is listed by name (see
/// [`OriginPolicy::allows_ambient_credentials`](crate::chat::access::OriginPolicy::allows_ambient_credentials)).
pub fn identify(core: &Core, headers: &HeaderMap, params: &[(String, String)]) -> Result<Identity, Refused> {
    let access = &core.access;
    if !access.origins.allows(headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())) {
        metrics().refused(Refusal::Origin);
        return Err(refused(StatusCode::FORBIDDEN, ErrorCode::NotAllowed, "this origin may not connect here"));
    }
    let header_token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    let param_token = params.iter().find(|(name, _)| name == "token").map(|(_, value)| value.as_str());
    let cookie_token =
        headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|cookies| {
            cookies.split(';').find_map(|c| c.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='))
        });
    // The browser sends the cookie by itself, also for another site's page; a header or `?token=`
    // is only there if the page put it there.
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let cookie_refused = cookie_token.is_some()
        && !access
            .origins
            .allows_ambient_credentials(headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()), fetch_site);
    let token = header_token.or(param_token).or(cookie_token.filter(|_| !cookie_refused));
    let identity = match (access.verifier.as_ref(), token) {
        (Some(_), Some(token)) => access.verify(token).map_err(|e| match e {
            AuthError::Expired | AuthError::Invalid(_) => {
                refused(StatusCode::UNAUTHORIZED, ErrorCode::BadToken, e.to_string())
            }
            other => refused(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unavailable, other.to_string()),
        }),
        _ if access.allow_anonymous => Ok(Identity::anonymous()),
        _ if cookie_refused => Err(refused(
            StatusCode::UNAUTHORIZED,
            ErrorCode::BadToken,
            "the switchboard_token cookie is not taken from another site's page (Sec-Fetch-Site: \
             cross-site) unless --allowed-origins names its origin; send the token as Authorization: \
             Bearer or ?token=",
        )),
        _ => Err(refused(
            StatusCode::UNAUTHORIZED,
            ErrorCode::BadToken,
            "a token is required (Authorization: Bearer, ?token= or the switchboard_token cookie)",
        )),
    };
    if identity.is_err() {
        metrics().refused(Refusal::Auth);
    }
    identity
}

/// The rooms of `room=` parameters, each checked; at least one.
pub(crate) fn rooms(params: &[(String, String)]) -> Result<Vec<String>, Refused> {
    let mut rooms: Vec<String> = Vec::new();
    for (_, room) in params.iter().filter(|(name, _)| name == "room") {
        check_room(room).map_err(|(code, message)| refused(StatusCode::BAD_REQUEST, code, message))?;
        if !rooms.contains(room) {
            rooms.push(room.clone());
        }
    }
    if rooms.is_empty() {
        return Err(refused(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "name at least one room: ?room=R"));
    }
    Ok(rooms)
}

/// What a stream or a poll asks for, checked before anything is joined, so that a request that
/// cannot be served whole is a 400 rather than a stream or a presence that is silently short: its
/// rooms fit one connection, its name the name limit.
pub(crate) fn check_request(core: &Core, rooms: &[String], name: Option<&str>) -> Result<(), Refused> {
    let max_rooms = core.hub.max_rooms_per_connection();
    if rooms.len() > max_rooms {
        let message = format!("{} rooms asked for; one stream or poll may be in {max_rooms}", rooms.len());
        return Err(refused(StatusCode::BAD_REQUEST, ErrorCode::TooMany, message));
    }
    if let Some(name) = name {
        check_name(name, core.limits.max_name_chars)
            .map_err(|(code, message)| refused(StatusCode::BAD_REQUEST, code, message))?;
    }
    Ok(())
}

/// The cursor of `?cursor=`; none is a first visit.
pub(crate) fn query_cursor(params: &[(String, String)]) -> Result<Cursor, Refused> {
    cursor(&HeaderMap::new(), params)
}

/// The cursor of `Last-Event-ID` (a reconnecting `EventSource`), else of `?cursor=`; none is a
/// first visit.
fn cursor(headers: &HeaderMap, params: &[(String, String)]) -> Result<Cursor, Refused> {
    let bad = |message: String| refused(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message);
    let header = match headers.get("last-event-id").map(|v| v.to_str()) {
        Some(Ok(text)) => Some(text.to_owned()),
        // Not ignored: a stream started afresh would skip what the client missed.
        Some(Err(_)) => return Err(bad("invalid cursor: Last-Event-ID is not text".to_owned())),
        None => None,
    };
    let text = header.or_else(|| params.iter().find(|(name, _)| name == "cursor").map(|(_, value)| value.clone()));
    match text.filter(|t| !t.trim().is_empty()) {
        Some(text) => Cursor::parse(&text).map_err(bad),
        None => Ok(Cursor::default()),
    }
}

/// The join request for `room` (under `name`), resuming from the cursor's place in it.
pub(crate) fn join_request(room: &str, cursor: &Cursor, name: Option<&str>) -> String {
    let mut join = json!({"type": "join", "room": room});
    if let Some(name) = name {
        join["name"] = json!(name);
    }
    if let Some((epoch, offset)) = cursor.get(room) {
        join["since"] = json!(offset);
        if !epoch.is_empty() {
            join["epoch"] = json!(epoch);
        }
    }
    join.to_string()
}

/// `GET /sse?room=R[&room=S][&cursor=C]`: the rooms' messages as `text/event-stream`.
pub async fn stream(
    core: Arc<Core>,
    live: &Arc<std::sync::atomic::AtomicUsize>,
    peer: Option<std::net::SocketAddr>,
    place: Option<crate::listen::Permit>,
    headers: HeaderMap,
    query: Option<String>,
    heartbeat: Duration,
) -> Response {
    let params = match query_pairs(query.as_deref()) {
        Ok(params) => params,
        Err(refusal) => return refusal.into_response(),
    };
    let (rooms, cursor) = match (rooms(&params), cursor(&headers, &params)) {
        (Ok(rooms), Ok(cursor)) => (rooms, cursor),
        (Err(refusal), _) | (_, Err(refusal)) => return refusal.into_response(),
    };
    let identity = match identify(&core, &headers, &params) {
        Ok(identity) => identity,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(room) = rooms.iter().find(|room| !identity.may_join(room)) {
        return error(
            StatusCode::FORBIDDEN,
            ErrorCode::NotAllowed,
            format!("this token does not allow joining {room:?}"),
        );
    }
    let name = params.iter().find(|(n, _)| n == "name").map(|(_, v)| v.clone());
    if let Err(refusal) = check_request(&core, &rooms, name.as_deref()) {
        return refusal.into_response();
    }
    let mut session = Session::new(core, Dialect::V1);
    session.set_peer(peer);
    session.set_transport(Transport::Sse);
    metrics().connections_opened.inc(Transport::Sse);
    if let Err(end) = session.start(Some(identity)) {
        return start_refused(end).into_response();
    }
    let mut state = Stream {
        session,
        cursor,
        heartbeat,
        beat: Box::pin(tokio::time::sleep(heartbeat)),
        timers: WakeFlag::new(),
        deadline: None,
        first: None,
        scratch: Scratch::default(),
        chunk: BytesMut::new(),
        ended: false,
        _live: LiveGuard::new(live).holding(place, None),
    };
    state.first = Some(state.open(&rooms, name.as_deref()));
    state.arm_deadline();
    let body = Body::new(state);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // nginx buffers responses unless told not to.
        .header("x-accel-buffering", "no")
        .body(body)
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unavailable, "response"))
}

/// Appends one SSE event: its lines, with `data:` on one line (envelopes are single-line JSON).
fn push_event(out: &mut impl BufMut, kind: &str, id: Option<&str>, data: &str) {
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_slice(b"\n");
    }
    out.put_slice(b"event: ");
    out.put_slice(kind.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(data.as_bytes());
    out.put_slice(b"\n\n");
}

/// One SSE event on its own.
fn event(kind: &str, id: Option<&str>, data: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 64);
    push_event(&mut out, kind, id, data);
    Bytes::from(out)
}

/// The room and offset of a message envelope, read from the front of its text (the hub writes
/// `type`, `room` and `offset` first), without parsing the whole JSON for every event of every stream.
pub(crate) fn message_place(text: &str) -> Option<(&str, u64)> {
    let rest = text.strip_prefix(r#"{"type":"message","room":""#)?;
    // Room names are short: a plain scan beats the general substring search.
    let end = rest.bytes().position(|b| b == b'"')?;
    let (room, rest) = (&rest[..end], &rest[end + 1..]);
    let rest = rest.strip_prefix(r#","offset":"#)?;
    let (mut offset, mut digits) = (0u64, 0);
    for digit in rest.bytes().take_while(u8::is_ascii_digit) {
        offset = offset.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some((room, offset))
}

/// The events of a batch of replies, each `joined` placed before the replay that follows it.
fn push_replies(out: &mut impl BufMut, replies: &[String], cursor: &mut Cursor, scratch: &mut Scratch) {
    for (i, reply) in replies.iter().enumerate() {
        push_envelope_with(out, reply, replies.get(i + 1).map(String::as_str), cursor, scratch);
    }
}

/// Where the replay after a `joined` of `room` starts: the offset of `next`, when it is a message
/// of that room.
pub(crate) fn replay_from(room: &str, next: Option<&str>) -> Option<u64> {
    next.and_then(message_place).filter(|(of, _)| *of == room).map(|(_, offset)| offset)
}

/// Appends the event of one envelope of the session, keeping the cursor; nothing for what a stream
/// does not show (a repeat, an envelope of another kind). `next` is the envelope that follows in
/// the same batch, if any (see [`Cursor::joined`]); `scratch` is kept between events for the
/// cursor's JSON.
fn push_envelope_with(
    out: &mut impl BufMut,
    envelope: &str,
    next: Option<&str>,
    cursor: &mut Cursor,
    scratch: &mut Scratch,
) {
    if let Some((room, offset)) = message_place(envelope) {
        if cursor.advance(room, offset) {
            // The message event, its id written straight into the chunk.
            out.put_slice(b"id: ");
            cursor.encode_into(out, scratch);
            out.put_slice(b"\nevent: message\ndata: ");
            out.put_slice(envelope.as_bytes());
            out.put_slice(b"\n\n");
        }
        return;
    }
    // Presence comes N times per join in a room of N: written as it is, never parsed. (`left`: the
    // server API unsubscribed the user.)
    for kind in ["presence", "error", "left"] {
        if envelope
            .strip_prefix(r#"{"type":""#)
            .and_then(|rest| rest.strip_prefix(kind))
            .is_some_and(|rest| rest.starts_with('"'))
        {
            push_event(out, kind, None, envelope);
            return;
        }
    }
    let Ok(value) = serde_json::from_str::<Value>(envelope) else { return };
    let room = value["room"].as_str().unwrap_or_default();
    match value["type"].as_str() {
        Some("message") => {
            if let Some(offset) = value["offset"].as_u64() {
                if cursor.advance(room, offset) {
                    push_event(out, "message", Some(&cursor.encode()), envelope);
                }
            }
        }
        Some("joined") => {
            cursor.joined_envelope(room, &value, replay_from(room, next));
            push_event(out, "joined", Some(&cursor.encode()), envelope);
        }
        _ => {}
    }
}

/// The event of one envelope, if a stream shows it.
#[cfg(test)]
fn to_event(envelope: &str, cursor: &mut Cursor) -> Option<Bytes> {
    let mut out = Vec::new();
    push_envelope_with(&mut out, envelope, None, cursor, &mut Scratch::default());
    (!out.is_empty()).then(|| Bytes::from(out))
}

/// A stream's state: the session, the place in each room, and the heartbeat. It is the response
/// body itself: hyper's connection task polls it for the next chunk, so a delivery goes from the hub
/// to the socket on one task, as on a WebSocket, with nothing allocated or moved per poll. A client
/// that does not read stops the polling; its outbox fills and the hub lets it go, as it does a slow
/// WebSocket.
struct Stream {
    session: Session,
    cursor: Cursor,
    /// How often a heartbeat goes out, and when the next one does.
    heartbeat: Duration,
    beat: Pin<Box<tokio::time::Sleep>>,
    /// The session's deadline (its token's expiry), if it has one.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Marked when a timer fired or was set: the timers are polled (with this flag's waker) only
    /// then, not on every delivery.
    timers: WakeFlag,
    /// The opening chunk, until it is sent.
    first: Option<Bytes>,
    /// Kept between events: the buffers the cursor is written with.
    scratch: Scratch,
    /// Where the next chunk is written.
    chunk: BytesMut,
    /// Set once the stream's last event (why it ends) is out.
    ended: bool,
    _live: LiveGuard,
}

/// The event that says why a stream ends, as a WebSocket's close frame would.
fn end_event(end: &End) -> Bytes {
    let data = json!({"type": "error", "code": "closed", "close": end.code, "message": end.reason});
    event("error", None, &data.to_string())
}

impl Stream {
    /// The first chunk: `retry:`, then each room's join (its `joined` and replay follow as the
    /// engine answers).
    fn open(&mut self, rooms: &[String], name: Option<&str>) -> Bytes {
        let mut out = format!("retry: {RETRY_MS}\n\n").into_bytes();
        for room in rooms {
            match self.session.on_text(&join_request(room, &self.cursor, name)) {
                Ok(replies) => push_replies(&mut out, &replies, &mut self.cursor, &mut Scratch::default()),
                Err(end) => {
                    self.ended = true;
                    out.put_slice(&end_event(&end));
                    break;
                }
            }
        }
        Bytes::from(out)
    }

    /// Sets the deadline timer to the session's deadline.
    fn arm_deadline(&mut self) {
        let Some(at) = self.session.deadline() else {
            self.deadline = None;
            return;
        };
        let at = tokio::time::Instant::now() + at.saturating_duration_since(self.session.now());
        match self.deadline.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.timers.mark();
    }

    /// Writes into `out` whatever is ready; `Pending` when nothing is.
    fn poll_events(&mut self, cx: &mut Context<'_>, out: &mut BytesMut) -> Poll<Result<(), End>> {
        if self.timers.take(cx) {
            // Cloned (rarely: only when a timer fired or was set) to leave `self` free.
            let waker = self.timers.waker().clone();
            let mut timers = Context::from_waker(&waker);
            if let Some(sleep) = self.deadline.as_mut() {
                if sleep.as_mut().poll(&mut timers).is_ready() {
                    self.session.check_deadline()?;
                    self.arm_deadline();
                    // Polled again now, so the new deadline is registered with the flag's waker
                    // whatever the timer does with a waker on reset.
                    if let Some(sleep) = self.deadline.as_mut() {
                        if sleep.as_mut().poll(&mut timers).is_ready() {
                            waker.wake_by_ref();
                        }
                    }
                }
            }
            if self.beat.as_mut().poll(&mut timers).is_ready() {
                // A comment: proxies see traffic, EventSource ignores it.
                out.put_slice(b": keepalive\n\n");
                self.beat.as_mut().reset(tokio::time::Instant::now() + self.heartbeat);
                // Registered at once, as the deadline above is.
                if self.beat.as_mut().poll(&mut timers).is_ready() {
                    waker.wake_by_ref();
                }
                return Poll::Ready(Ok(()));
            }
        }
        if let Poll::Ready(done) = self.session.poll_completion(cx) {
            let replies = self.session.complete(done)?;
            push_replies(out, &replies, &mut self.cursor, &mut self.scratch);
            return Poll::Ready(Ok(()));
        }
        match self.session.poll_delivery(cx) {
            Poll::Ready(Some(bytes)) => {
                // Whatever is waiting goes out as one chunk: one write for a burst.
                out.reserve(bytes.len() * 2 + 128);
                push_envelope_with(out, &bytes, None, &mut self.cursor, &mut self.scratch);
                let mut taken = 1;
                while taken < DELIVERY_BATCH {
                    match self.session.try_delivery() {
                        Some(bytes) => push_envelope_with(out, &bytes, None, &mut self.cursor, &mut self.scratch),
                        None => break,
                    }
                    taken += 1;
                }
                metrics().messages_delivered.by(Transport::Sse, taken as u64);
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(None) => return Poll::Ready(Err(self.session.cut_off())),
            Poll::Pending => {}
        }
        Poll::Pending
    }
}

impl HttpBody for Stream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            // Chunks are cut from one buffer: once hyper has copied a chunk out and dropped it, the
            // next one reuses the space instead of allocating.
            let mut out = std::mem::take(&mut this.chunk);
            let step = this.poll_events(cx, &mut out);
            let chunk = if out.is_empty() { Bytes::new() } else { out.split().freeze() };
            this.chunk = out;
            match step {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(end)) => {
                    let peer = this.session.peer();
                    if end.code == 1001 {
                        tracing::debug!(peer = peer.map(tracing::field::display), code = end.code, reason = %end.reason, "ending an SSE stream");
                    } else {
                        tracing::info!(peer = peer.map(tracing::field::display), code = end.code, reason = %end.reason, "ending an SSE stream");
                    }
                    this.ended = true;
                    return Poll::Ready(Some(Ok(Frame::data(end_event(&end)))));
                }
                // Nothing to show (a repeat, an envelope a stream does not show): poll again.
                Poll::Ready(Ok(())) if chunk.is_empty() => continue,
                Poll::Ready(Ok(())) => return Poll::Ready(Some(Ok(Frame::data(chunk)))),
            }
        }
    }
}

/// The message rate of `POST /publish`, per client address: the rate and burst a WebSocket session
/// has, so moving to HTTP buys no more.
pub struct AddressRate {
    limit: Option<RateLimit>,
    buckets: std::sync::Mutex<HashMap<IpAddr, RateLimiter>>,
}

/// Addresses remembered at most; past it the table starts again (everyone gets a fresh burst), so
/// a flood of addresses costs bounded memory.
const MAX_ADDRESSES: usize = 100_000;

impl AddressRate {
    /// No limit with `None`.
    pub fn new(limit: Option<RateLimit>) -> Arc<Self> {
        Arc::new(Self { limit, buckets: std::sync::Mutex::default() })
    }

    /// Takes `messages` tokens for `address`; false when it is over its rate.
    fn allow(&self, address: IpAddr, messages: usize) -> bool {
        let Some(limit) = self.limit else { return true };
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&address) {
            buckets.clear();
        }
        let bucket = buckets.entry(address).or_insert_with(|| RateLimiter::new(limit, now));
        (0..messages.max(1)).all(|_| bucket.allow(now))
    }
}

/// `POST /publish` with the body of a `switchboard.v1` publish (`room` or `rooms`, `message`,
/// `name`, `id`) and the client's token: the publish of clients on SSE or long polling, answered as
/// `/api/publish` answers, with the same idempotency as over WebSocket.
pub async fn client_publish(
    core: Arc<Core>,
    rate: &AddressRate,
    peer: Option<IpAddr>,
    headers: HeaderMap,
    query: Option<String>,
    body: Bytes,
) -> Response {
    let params = match query_pairs(query.as_deref()) {
        Ok(params) => params,
        Err(refusal) => return refusal.into_response(),
    };
    let identity = match identify(&core, &headers, &params) {
        Ok(identity) => identity,
        Err(refusal) => return refusal.into_response(),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ClientPublish {
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        room: Option<String>,
        #[serde(default)]
        rooms: Option<Vec<String>>,
        message: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        id: Option<String>,
        /// Taken and ignored: the answer is the HTTP response itself.
        #[serde(default, rename = "req")]
        _req: Option<Value>,
    }
    // Refused before its fields are checked: counted here (the checks count theirs).
    let refused_body = |code: ErrorCode, message: String| {
        metrics().message_refused(code.label());
        error(StatusCode::BAD_REQUEST, code, message)
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return refused_body(ErrorCode::BadJson, format!("not JSON: {e}")),
    };
    if !request.is_object() {
        return refused_body(ErrorCode::BadRequest, "the body must be a JSON object".to_owned());
    }
    let request: ClientPublish = match serde_json::from_value(request) {
        Ok(request) => request,
        Err(e) => return refused_body(ErrorCode::BadRequest, e.to_string()),
    };
    if request.kind.as_deref().is_some_and(|kind| kind != "publish") {
        return refused_body(ErrorCode::BadRequest, "\"type\" may only be \"publish\" here".to_owned());
    }
    let rooms: Vec<String> = request.room.into_iter().chain(request.rooms.unwrap_or_default()).collect();
    let prepared = publish::prepare_client_publish(&core, &identity, rooms, request.message, request.name, request.id);
    let publish = match prepared {
        Ok(publish) => publish,
        Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, message),
    };
    if let Some(address) = peer {
        if !rate.allow(address, publish.rooms.len()) {
            metrics().message_refused("rate_limit");
            return error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooMany, "message rate limit exceeded; slow down");
        }
    }
    if let Err((code, message)) = publish::check_grants(&identity, &publish) {
        return error(StatusCode::FORBIDDEN, code, message);
    }
    super::api::into_response(super::api::submit(&core, publish).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_bad_ones_are_named() {
        let mut cursor = Cursor::default();
        cursor.joined("lobby", "e1", u64::MAX, Some(1));
        assert!(cursor.advance("lobby", 3));
        assert!(!cursor.advance("lobby", 2), "an older offset is a repeat");
        let text = cursor.encode();
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "URL-safe: {text}");
        assert_eq!(Cursor::parse(&text).unwrap().get("lobby"), Some(("e1", 3)));
        cursor.joined("lobby", "e2", u64::MAX, Some(1));
        assert_eq!(cursor.get("lobby"), Some(("e2", 0)), "a new epoch voids the offset");
        let extremes = Cursor {
            places: [("a".to_owned(), ("e1".to_owned(), 0)), ("b".to_owned(), ("e2".to_owned(), u64::MAX))].into(),
            shape: 0,
        };
        assert_eq!(Cursor::parse(&extremes.encode()), Ok(extremes.clone()), "offsets 0 and u64::MAX round-trip");
        assert!(Cursor::parse("%%%").unwrap_err().contains("base64"));
        let bad_room = URL_SAFE_NO_PAD.encode(r#"{"a b":["e",1]}"#);
        assert!(Cursor::parse(&bad_room).unwrap_err().contains("invalid room"));
    }

    #[test]
    fn a_cursor_written_with_kept_buffers_reads_back_after_every_kind_of_change() {
        let mut cursor = Cursor::default();
        let mut scratch = Scratch::default();
        let mut check = |cursor: &Cursor| {
            let mut kept = Vec::new();
            cursor.encode_into(&mut kept, &mut scratch);
            let kept = String::from_utf8(kept).unwrap();
            assert_eq!(kept, cursor.encode(), "kept buffers write what fresh ones do");
            assert_eq!(Cursor::parse(&kept).as_ref(), Ok(cursor), "{kept}");
        };
        check(&cursor);
        cursor.joined("b", "e1", u64::MAX, Some(1));
        check(&cursor);
        for offset in [1, 9, 10, 99, 100, 12345] {
            cursor.advance("b", offset);
            check(&cursor);
        }
        cursor.joined("a", "e2", u64::MAX, Some(1)); // a room before the last one
        check(&cursor);
        cursor.advance("a", 7);
        check(&cursor);
        cursor.joined("c", "epoch3", u64::MAX, Some(1)); // a new last room
        check(&cursor);
        cursor.advance("c", u64::MAX);
        check(&cursor);
        cursor.joined("c", "other", u64::MAX, Some(1)); // the last room's epoch changes
        check(&cursor);
        cursor.advance("b", 12346); // a room before the last one, after the last one moved
        check(&cursor);
        cursor.advance("d", 4); // a room the cursor did not know: the new last room
        check(&cursor);
        cursor.advance("d", 5);
        check(&cursor);
    }

    #[test]
    fn the_place_of_a_message_is_read_from_the_hubs_own_encoding() {
        let stored = crate::engine::StoredMessage {
            room: "a.b:c".into(),
            offset: 42,
            id: Some("x".into()),
            name: "n".into(),
            message: "\"quoted\" room\":\"evil".into(),
            time: "00:00:00".into(),
            ts_ms: 1,
        };
        let text = crate::chat::wire::Envelope::message(&stored).encode();
        assert_eq!(message_place(&text), Some(("a.b:c", 42)), "{text}");
        assert_eq!(message_place(r#"{"type":"joined","room":"r","offset":1}"#), None);
        let epoch_with_quote = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"r":["e\"",1]}"#);
        assert!(Cursor::parse(&epoch_with_quote).is_err(), "epochs are letters and digits");
    }

    #[test]
    fn envelopes_become_events_with_the_cursor_as_id() {
        let mut cursor = Cursor::default();
        let joined = to_event(r#"{"type":"joined","room":"r","epoch":"e","offset":0}"#, &mut cursor).unwrap();
        assert!(std::str::from_utf8(&joined).unwrap().contains("event: joined\n"));
        let message = r#"{"type":"message","room":"r","offset":1,"message":"hi"}"#;
        let text = String::from_utf8(to_event(message, &mut cursor).unwrap().to_vec()).unwrap();
        let id = text.lines().next().unwrap().strip_prefix("id: ").unwrap();
        assert_eq!(Cursor::parse(id).unwrap().get("r"), Some(("e", 1)));
        assert!(text.ends_with(&format!("event: message\ndata: {message}\n\n")), "{text}");
        assert!(to_event(message, &mut cursor).is_none(), "the same offset again is not shown twice");
        let presence = r#"{"type":"presence","room":"r","event":"join","member":{"id":"n-1","name":"Bo"}}"#;
        let text = String::from_utf8(to_event(presence, &mut cursor).unwrap().to_vec()).unwrap();
        assert_eq!(text, format!("event: presence\ndata: {presence}\n\n"));
        assert!(to_event(r#"{"type":"presenceless"}"#, &mut cursor).is_none(), "a kind is matched whole");
    }

    #[test]
    fn a_joined_event_is_placed_before_its_replay_so_a_cut_right_after_it_resumes_with_the_same() {
        let place = |out: &[u8], room: &str| {
            let text = std::str::from_utf8(out).unwrap();
            let id = text.lines().find_map(|line| line.strip_prefix("id: ")).unwrap();
            Cursor::parse(id).unwrap().get(room).map(|(e, o)| (e.to_owned(), o))
        };
        let message = |offset: u64| format!(r#"{{"type":"message","room":"r","offset":{offset},"message":"m"}}"#);
        // A fresh join: the last two of 1233 messages are replayed.
        let joined = r#"{"type":"joined","room":"r","epoch":"e","offset":1233,"first":234}"#.to_owned();
        let mut cursor = Cursor::default();
        let mut out = Vec::new();
        push_replies(&mut out, std::slice::from_ref(&joined), &mut cursor, &mut Scratch::default());
        assert_eq!(place(&out, "r"), Some(("e".into(), 1233)), "no replay: up to date");
        let (mut cursor, mut out) = (Cursor::default(), Vec::new());
        push_replies(&mut out, &[joined.clone(), message(1232), message(1233)], &mut cursor, &mut Scratch::default());
        assert_eq!(place(&out, "r"), Some(("e".into(), 1231)), "the joined event's own id: before the replay");
        assert_eq!(cursor.get("r"), Some(("e", 1233)), "and the replay moves it on");
        // "From now on" (u64::MAX) is the room's last offset once joined, not 0.
        let mut cursor = Cursor::default();
        cursor.places.insert("r".into(), ("e".into(), u64::MAX));
        let mut out = Vec::new();
        push_replies(&mut out, std::slice::from_ref(&joined), &mut cursor, &mut Scratch::default());
        assert_eq!(cursor.get("r"), Some(("e", 1233)));
        // A place in the same history is kept: its replay continues it.
        let mut cursor = Cursor::default();
        cursor.places.insert("r".into(), ("e".into(), 1200));
        push_replies(&mut Vec::new(), &[joined, message(1201)], &mut cursor, &mut Scratch::default());
        assert_eq!(cursor.get("r"), Some(("e", 1201)));
    }
}
