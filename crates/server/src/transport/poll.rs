//! Long polling at `GET /poll`: every message after a cursor, at once if there are any, else as soon
//! as one comes (or an empty list when the wait is over). The cursor is the one SSE events carry, so
//! a client can move between the two; the client publishes with `POST /publish` (see [`super::sse`]).
//!
//! Each request is a short chat session that joins its rooms from the cursor, as a listener: it is
//! not announced or listed in presence (a presence event per poll would be noise). A client that
//! names itself with `client=ID` counts as present instead through [`PollPresence`], from its first
//! poll until it stops polling for the grace period. Nothing on the
//! server advances when a response is sent: a response lost on the way is simply asked for again
//! with the old cursor, and gets the same messages.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use tokio::sync::watch;

use super::sse::{self, Cursor};
use crate::chat::access::Identity;
use crate::chat::hub::ConnId;
use crate::chat::session::{End, Session};
use crate::chat::wire::{Dialect, ErrorCode};
use crate::chat::Core;
use crate::listen::{ConnectionLimiter, Permit, Refused};
use crate::metrics::{metrics, Refusal, Transport};

/// How long a poll waits by default, and at most.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(25);
/// The longest `wait` a client may ask for.
pub const MAX_WAIT_SECS: u64 = 60;
/// Messages one answer carries at most; the cursor says where the next poll goes on.
const MAX_MESSAGES: usize = 1000;

/// Long-polling clients counted as present: a client that names itself (`client=ID`) is a member of
/// its rooms, under its `name`, from its first poll until it has not polled for the grace period.
/// Each such client is a session of its own, kept by a small task, apart from the polls (which come
/// and go as listeners).
pub struct PollPresence {
    clients: Mutex<HashMap<String, Kept>>,
    grace: Duration,
    /// Each kept client holds a place in the connection limits, as a WebSocket does: so one address
    /// cannot fill rooms with as many present "clients" as it can make up ids.
    connections: Arc<ConnectionLimiter>,
}

struct Kept {
    rooms: Vec<String>,
    name: Option<String>,
    /// Pushed forward by every poll; the keeping task ends when it passes.
    until: watch::Sender<Instant>,
    /// The kept session, whose place among its user's sessions is given back at once when it is
    /// replaced (its task ends it later).
    conn: ConnId,
    /// Set while one poll of the client is answered in the kept session's place (see [`Polling`]).
    polling: Arc<AtomicBool>,
    /// Its place in the connection limits, given back when it is no longer kept.
    _place: Permit,
}

/// Why a poll's client could not be kept present.
enum NotKept {
    /// Its session could not start (its user's session limit, say).
    Refused(End),
    /// Over the connection limits (per address, or in all).
    Limit(Refused),
}

/// One poll of a kept client, standing in the kept session's place among the user's sessions, so
/// that polling does not count the client twice. Only one at a time: further polls of the same
/// client at once count as sessions of their own, so a client id does not let a user past its limit.
struct Polling(Arc<AtomicBool>);

impl Polling {
    fn claim(flag: &Arc<AtomicBool>) -> Option<Self> {
        (!flag.swap(true, Ordering::AcqRel)).then(|| Self(flag.clone()))
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl PollPresence {
    /// Clients stay present `grace` after their last poll, each holding a place in `connections`.
    pub fn new(grace: Duration, connections: Arc<ConnectionLimiter>) -> Arc<Self> {
        Arc::new(Self { clients: Mutex::default(), grace, connections })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A poll from `client`: present from now until the grace period after it.
    fn seen(
        self: &Arc<Self>,
        core: &Arc<Core>,
        client: String,
        identity: Identity,
        rooms: &[String],
        name: Option<String>,
        address: Option<IpAddr>,
    ) -> Result<Arc<AtomicBool>, NotKept> {
        let until = Instant::now() + self.grace;
        let mut clients = self.lock();
        if let Some(kept) = clients.get(&client) {
            if kept.rooms == rooms && kept.name == name && !kept.until.is_closed() {
                kept.until.send_replace(until);
                return Ok(kept.polling.clone());
            }
        }
        // New, or its rooms or name changed: its old session ends as its task sees the sender go,
        // and gives its user's place back now, for the session that replaces it.
        if let Some(old) = clients.remove(&client) {
            let _ = core.hub.set_user(old.conn, None);
        }
        let place = match address {
            Some(address) => self.connections.try_acquire(address),
            None => self.connections.try_acquire_shared(),
        };
        let place = place.map_err(NotKept::Limit)?;
        let mut session = Session::new(core.clone(), Dialect::V1);
        session.set_transport(Transport::LongPoll);
        session.start(Some(identity)).map_err(NotKept::Refused)?;
        // A long-polling client is "connected" while it polls within the grace period: one opening
        // per client (and per change of its rooms or name), not one per poll.
        metrics().connections_opened.inc(Transport::LongPoll);
        for room in rooms {
            let mut join = json!({"type": "join", "room": room});
            if let Some(name) = &name {
                join["name"] = json!(name);
            }
            // Past every offset: a member from now on, with nothing read (the polls carry messages).
            join["since"] = json!(u64::MAX);
            let _ = session.on_text(&join.to_string());
        }
        let (until_tx, until_rx) = watch::channel(until);
        let polling = Arc::new(AtomicBool::new(false));
        let kept = Kept {
            rooms: rooms.to_vec(),
            name,
            until: until_tx,
            conn: session.id(),
            polling: polling.clone(),
            _place: place,
        };
        clients.insert(client.clone(), kept);
        drop(clients);
        tokio::spawn(keep(self.clone(), client, session, until_rx));
        Ok(polling)
    }
}

/// Keeps a polling client's session: completes its joins, discards its deliveries (its polls carry
/// the messages), and ends it when the grace period after its last poll is over.
async fn keep(registry: Arc<PollPresence>, client: String, mut session: Session, mut until: watch::Receiver<Instant>) {
    loop {
        let deadline = *until.borrow();
        let (completions, deliveries) = session.streams();
        tokio::select! {
            done = completions.next() => {
                let _ = session.complete(done);
            }
            delivery = deliveries.next() => {
                if delivery.is_none() {
                    break;
                }
                while session.try_delivery().is_some() {}
            }
            changed = until.changed() => {
                if changed.is_err() {
                    break; // replaced by a session for its new rooms or name
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if *until.borrow() <= Instant::now() {
                    break;
                }
            }
        }
    }
    let mut clients = registry.lock();
    if clients.get(&client).is_some_and(|kept| until.same_channel(&kept.until.subscribe())) {
        clients.remove(&client);
    }
}

/// `GET /poll?room=R[&room=S][&cursor=C][&wait=SECONDS][&client=ID&name=NAME]`.
pub async fn poll(
    core: Arc<Core>,
    presence: &Arc<PollPresence>,
    peer: Option<IpAddr>,
    headers: HeaderMap,
    query: Option<String>,
) -> Response {
    let params = match sse::query_pairs(query.as_deref()) {
        Ok(params) => params,
        Err(refusal) => return refusal.into_response(),
    };
    let (rooms, cursor) = match (sse::rooms(&params), sse::query_cursor(&params)) {
        (Ok(rooms), Ok(cursor)) => (rooms, cursor),
        (Err(refusal), _) | (_, Err(refusal)) => return refusal.into_response(),
    };
    let wait = match params.iter().find(|(name, _)| name == "wait").map(|(_, v)| v.parse::<u64>()) {
        None => DEFAULT_WAIT,
        Some(Ok(secs)) if secs <= MAX_WAIT_SECS => Duration::from_secs(secs),
        Some(_) => {
            let message = format!("wait must be a number of seconds from 0 to {MAX_WAIT_SECS}");
            return sse::refused(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message).into_response();
        }
    };
    let identity = match sse::identify(&core, &headers, &params) {
        Ok(identity) => identity,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(room) = rooms.iter().find(|room| !identity.may_join(room)) {
        let message = format!("this token does not allow joining {room:?}");
        return sse::refused(StatusCode::FORBIDDEN, ErrorCode::NotAllowed, message).into_response();
    }
    let name = params.iter().find(|(n, _)| n == "name").map(|(_, v)| v.clone());
    if let Err(refusal) = sse::check_request(&core, &rooms, name.as_deref()) {
        return refusal.into_response();
    }
    let client = params.iter().find(|(n, _)| n == "client").map(|(_, v)| v.clone()).filter(|c| !c.is_empty());
    // Held until the poll is answered (the end of this function).
    let mut in_kept_place = None;
    if let Some(client) = client {
        if client.len() > 128 {
            let message = "client must be at most 128 bytes";
            return sse::refused(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message).into_response();
        }
        // Keyed by the token's subject too: one user cannot end or rename another's presence.
        let key = format!("{}\n{client}", identity.subject.as_deref().unwrap_or_default());
        in_kept_place = match presence.seen(&core, key, identity.clone(), &rooms, name, peer) {
            Ok(kept) => Polling::claim(&kept),
            Err(NotKept::Refused(end)) => return sse::start_refused(end).into_response(),
            Err(NotKept::Limit(refused)) => {
                tracing::info!(peer = peer.map(tracing::field::display), reason = %refused, "refused a long-polling client");
                metrics().refused(Refusal::Limit);
                return super::http::refuse(refused.status(), refused.to_string());
            }
        };
    }
    let mut session = Session::listener(core);
    session.set_transport(Transport::LongPoll);
    if in_kept_place.is_some() {
        // The client's kept session is its place among the user's sessions; this poll takes none.
        session.start_counted_elsewhere(identity);
    } else if let Err(end) = session.start(Some(identity)) {
        return sse::start_refused(end).into_response();
    }
    match answer(&mut session, &rooms, cursor, wait).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(end) => {
            let message = format!("the poll could not be answered: {}", end.reason);
            sse::refused(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, message).into_response()
        }
    }
}

/// What one poll collects.
struct Collected {
    cursor: Cursor,
    /// The hub's envelopes of new messages, as they are: the answer carries them unparsed.
    messages: Vec<Box<RawValue>>,
    /// `joined` envelopes of rooms whose history could not be recovered from the cursor.
    notices: Vec<Value>,
    joined: usize,
    failed: Option<String>,
}

impl Collected {
    /// A batch of replies, each `joined` placed before the replay that follows it.
    fn take_all(&mut self, replies: &[String]) {
        for (i, reply) in replies.iter().enumerate() {
            self.take(reply, replies.get(i + 1).map(String::as_str));
        }
    }

    /// One envelope; `next` is the one after it in the same batch.
    fn take(&mut self, envelope: &str, next: Option<&str>) {
        // A message (most of what a poll carries) is placed by its first fields, as SSE places it,
        // and passed on without being parsed into a tree and written out again.
        if let Some((room, offset)) = sse::message_place(envelope) {
            if self.messages.len() < MAX_MESSAGES && self.cursor.advance(room, offset) {
                if let Ok(raw) = RawValue::from_string(envelope.to_owned()) {
                    self.messages.push(raw);
                }
            }
            return;
        }
        let Ok(value) = serde_json::from_str::<Value>(envelope) else { return };
        let room = value["room"].as_str().unwrap_or_default().to_owned();
        match value["type"].as_str() {
            Some("joined") => {
                self.joined += 1;
                self.cursor.joined_envelope(&room, &value, sse::replay_from(&room, next));
                if value["recovered"] == false {
                    self.notices.push(value);
                }
            }
            Some("error") => {
                self.joined += 1;
                self.failed = Some(value["message"].as_str().unwrap_or("join failed").to_owned());
            }
            _ => {}
        }
    }
}

/// A poll's answer.
#[derive(serde::Serialize)]
struct Answer {
    messages: Vec<Box<RawValue>>,
    cursor: String,
    epochs: serde_json::Map<String, Value>,
    notices: Vec<Value>,
}

async fn answer(session: &mut Session, rooms: &[String], cursor: Cursor, wait: Duration) -> Result<String, End> {
    let mut collected = Collected { cursor, messages: Vec::new(), notices: Vec::new(), joined: 0, failed: None };
    for room in rooms {
        let replies = session.on_text(&sse::join_request(room, &collected.cursor, None))?;
        collected.take_all(&replies);
    }
    // Every room's `joined` and replay first; the wait starts after them.
    let deadline = tokio::time::Instant::now() + wait.max(Duration::from_secs(1)) + Duration::from_secs(5);
    while collected.joined < rooms.len() {
        let (completions, _) = session.streams();
        match tokio::time::timeout_at(deadline, completions.next()).await {
            Ok(done) => collected.take_all(&session.complete(done)?),
            Err(_) => return Err(End::new(1013, "the history did not answer in time")),
        }
    }
    if let Some(failed) = collected.failed {
        return Err(End::new(1013, failed));
    }
    let until = tokio::time::Instant::now() + wait;
    while collected.messages.is_empty() && collected.notices.is_empty() {
        let (_, deliveries) = session.streams();
        match tokio::time::timeout_at(until, deliveries.next()).await {
            Ok(Some(bytes)) => {
                collected.take(&bytes, None);
                while let Some(bytes) = session.try_delivery() {
                    collected.take(&bytes, None);
                }
            }
            Ok(None) => return Err(session.cut_off()),
            Err(_) => break,
        }
    }
    let epochs: serde_json::Map<String, Value> =
        rooms.iter().filter_map(|room| Some((room.clone(), json!(collected.cursor.get(room)?.0)))).collect();
    metrics().messages_delivered.by(Transport::LongPoll, collected.messages.len() as u64);
    let answer =
        Answer { messages: collected.messages, cursor: collected.cursor.encode(), epochs, notices: collected.notices };
    Ok(serde_json::to_string(&answer).expect("strings and JSON values serialize"))
}
