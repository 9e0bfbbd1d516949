//! One WebSocket connection to the chat: reads requests, answers them, and forwards what the hub
//! delivers into its outbox. Publishes are queued to the store in the order they arrive and their
//! acknowledgements go back in that order, without waiting for one commit before reading the next.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::stream::{FuturesOrdered, StreamExt};
use serde_json::{json, Value};
use switchboard_ws::upgrade::UpgradedWebSocket;
use switchboard_ws::{CloseCode, Message, Utf8Bytes};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::{Access, AuthError, Identity};
use crate::config::RateLimit;
use crate::hub::{ConnId, Hub, JoinError, Outbox};
use crate::limits::RateLimiter;
use crate::protocol::{self, error_envelope, ErrorCode, Request};
use crate::store::{History, NewMessage, Published, Store, StoreError};

/// What one connection may do.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_message_chars: usize,
    pub max_name_chars: usize,
    /// Messages sent on a join without `since`, so a new page shows recent conversation.
    pub join_backlog: usize,
    /// Most messages replayed by one join or history request.
    pub max_replay: usize,
    pub rate_limit: Option<RateLimit>,
    /// How long a connection without a token has to send one.
    pub auth_timeout: Duration,
    /// Most rooms one publish may name.
    pub max_publish_rooms: usize,
}

/// What every session of a server shares.
pub struct Shared {
    pub hub: Arc<Hub>,
    pub store: Arc<Store>,
    pub access: Arc<Access>,
    pub limits: SessionLimits,
    /// Sessions still running, their close handshake included (shutdown waits for zero).
    pub live: Arc<AtomicUsize>,
}

/// Counts a session as live until it is dropped, however the session ends.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Close code for a missing, invalid or expired token (the 4000s are the application's, RFC 6455 §7.4.2).
pub const UNAUTHORIZED: CloseCode = CloseCode(4001);
/// Close code for a seed client whose token does not grant the default room.
pub const FORBIDDEN: CloseCode = CloseCode(4003);

const MAX_ROOM_CHARS: usize = 64;
/// How long a closing session waits for the client's side of the close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Most deliveries queued into the socket between two flushes.
const DELIVERY_BATCH: usize = 64;
/// A client whose socket takes no data for this long while we have some for it is dropped: it has
/// stopped reading, and its place in every room is already gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

type Reply = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

struct Session {
    shared: Arc<Shared>,
    /// Set once the connection is registered with the hub (after authentication).
    id: Option<ConnId>,
    outbox: Option<Outbox>,
    seed: bool,
    name: Option<String>,
    /// `None` until a token arrives, on a server that refuses anonymous connections.
    identity: Option<Identity>,
    /// When the identity's token expires (set with the identity, so the timer is not reset for nothing).
    expiry: Option<Instant>,
    auth_deadline: Instant,
    rate: Option<RateLimiter>,
    replies: FuturesOrdered<Reply>,
}

/// Runs a connection until it ends. `identity` comes from a token in the handshake (or anonymous
/// access); `None` means the client must send a token first. `shutdown` flips when the server stops.
pub async fn run(
    shared: Arc<Shared>,
    mut ws: UpgradedWebSocket,
    identity: Option<Identity>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _live = LiveGuard::new(&shared.live);
    let seed = ws.protocol() != Some(protocol::V1);
    let rate = shared.limits.rate_limit.map(|limit| RateLimiter::new(limit, std::time::Instant::now()));
    let auth_deadline = Instant::now() + shared.limits.auth_timeout;
    let mut session = Session {
        shared,
        id: None,
        outbox: None,
        seed,
        name: None,
        identity: None,
        expiry: None,
        auth_deadline,
        rate,
        replies: FuturesOrdered::new(),
    };
    let mut end: Option<End> = match identity {
        Some(identity) => session.authenticated(identity).err().map(|(code, reason)| End::Close(code, reason)),
        None => None,
    };
    let mut deadline = session.deadline();
    let timer = tokio::time::sleep_until(deadline.map_or(far_future(), |(at, _)| at));
    tokio::pin!(timer);
    while end.is_none() {
        end = tokio::select! {
            biased;
            _ = shutdown.changed() => Some(End::Close(CloseCode::GOING_AWAY, "server shutting down".into())),
            () = &mut timer, if deadline.is_some() => {
                Some(End::Close(UNAUTHORIZED, deadline.map_or("", |(_, why)| why).into()))
            }
            Some(reply) = session.replies.next(), if !session.replies.is_empty() => match reply {
                Some(envelope) => send(&mut ws, envelope.into()).await.err(),
                None => None,
            },
            // Reading comes before deliveries, so a busy room cannot starve a member's own requests
            // (and the rate limit bounds how much reading there is).
            incoming = ws.recv() => match incoming {
                None => Some(End::Dropped),
                Some(Err(error)) => {
                    tracing::debug!(conn = session.id, %error, "protocol error");
                    None
                }
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    if !session.charge(1) {
                        Some(rate_exceeded())
                    } else {
                        session.on_message(message, &mut ws).await.err()
                    }
                }
                Some(Ok(_)) => None,
            },
            item = next_delivery(&mut session.outbox) => match item {
                Some(bytes) => {
                    // Take what else is queued, up to a batch: `recv` flushes before it reads, so one
                    // write then carries the batch instead of one write per message.
                    let mut ended = send(&mut ws, bytes).await.err();
                    let mut taken = 1;
                    while ended.is_none() && taken < DELIVERY_BATCH {
                        let Some(bytes) = session.outbox.as_mut().and_then(Outbox::try_recv) else { break };
                        ended = send(&mut ws, bytes).await.err();
                        taken += 1;
                    }
                    ended
                }
                None => Some(End::Close(CloseCode::POLICY_VIOLATION, "too slow: messages were not read in time".into())),
            },
        };
        let next = session.deadline();
        if next != deadline {
            deadline = next;
            timer.as_mut().reset(deadline.map_or(far_future(), |(at, _)| at));
        }
    }
    if let Some(id) = session.id {
        session.shared.hub.unregister(id);
    }
    if let Some(End::Close(code, reason)) = end {
        tracing::debug!(conn = session.id, code = code.0, %reason, "closing");
        // Bounded as a whole: a peer that stopped reading never takes the close frame either.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            if ws.close(code, &reason).await.is_ok() {
                while ws.recv().await.is_some() {}
            }
        })
        .await;
    }
}

fn rate_exceeded() -> End {
    End::Close(CloseCode::POLICY_VIOLATION, "message rate limit exceeded".into())
}

/// Why a session should end: a close code and a reason (cut to 123 bytes before it is sent).
type Closing = (CloseCode, String);

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

/// The next message the hub has for this connection; never resolves before registration.
async fn next_delivery(outbox: &mut Option<Outbox>) -> Option<Utf8Bytes> {
    match outbox {
        Some(outbox) => outbox.recv().await,
        None => std::future::pending().await,
    }
}

/// Queues one message, waiting (bounded) while the socket's buffer is full.
async fn send(ws: &mut UpgradedWebSocket, text: Utf8Bytes) -> Result<(), End> {
    match tokio::time::timeout(SEND_TIMEOUT, ws.feed(Message::Text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Dropped),
        Err(_) => Err(End::Close(CloseCode::POLICY_VIOLATION, "too slow: the connection stopped reading".into())),
    }
}

/// A close reason cut to what fits in a close frame (123 bytes), at a character boundary.
fn close_reason(text: String) -> String {
    if text.len() <= 123 {
        return text;
    }
    let mut end = 120;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

impl Session {
    /// The connection has an identity now (from its handshake or its first message): join the hub.
    fn authenticated(&mut self, identity: Identity) -> Result<(), Closing> {
        let default_room = &self.shared.hub.default_room;
        if self.seed && !identity.may_join(default_room) {
            return Err((FORBIDDEN, format!("this token does not grant the room {default_room:?}")));
        }
        self.set_identity(identity);
        let (id, outbox) = self.shared.hub.register(self.seed);
        self.id = Some(id);
        self.outbox = Some(outbox);
        Ok(())
    }

    fn set_identity(&mut self, identity: Identity) {
        self.expiry = identity
            .expires_at
            .map(|at| Instant::now() + at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
        self.identity = Some(identity);
    }

    /// When the session must end unless something changes: the end of the time allowed to
    /// authenticate, or the token's expiry.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        match &self.identity {
            None => Some((self.auth_deadline, "authentication required: no token arrived in time")),
            Some(_) => self.expiry.map(|at| (at, "token expired")),
        }
    }

    /// Takes `messages` from the rate limit; false when the connection is over it.
    fn charge(&mut self, messages: usize) -> bool {
        let now = std::time::Instant::now();
        match &mut self.rate {
            Some(rate) => (0..messages).all(|_| rate.allow(now)),
            None => true,
        }
    }

    async fn on_message(&mut self, message: Message, ws: &mut UpgradedWebSocket) -> Result<(), End> {
        let text = match message {
            Message::Text(text) => text,
            _ if self.seed => {
                return Err(End::Close(CloseCode::UNSUPPORTED_DATA, "binary messages are not supported".into()));
            }
            _ => {
                let text = "binary messages are not supported; send JSON text";
                return send(ws, error_envelope(ErrorCode::BadRequest, text, None).into()).await;
            }
        };
        let envelopes = if self.seed { self.on_seed(&text).map(|()| Vec::new()) } else { self.on_request(&text) };
        for envelope in envelopes.map_err(|(code, reason)| End::Close(code, close_reason(reason)))? {
            send(ws, envelope.into()).await?;
        }
        Ok(())
    }

    /// The seed protocol has no error messages: a client that breaks it is closed with the reason.
    /// A message with a `token` field authenticates (or refreshes the token) instead of chatting.
    fn on_seed(&mut self, text: &str) -> Result<(), Closing> {
        let bad = || (CloseCode::INVALID_PAYLOAD, "expected JSON {\"name\": ..., \"message\": ...}".to_owned());
        let mut parsed: serde_json::Map<String, Value> = serde_json::from_str(text).map_err(|_| bad())?;
        if let Some(token) = parsed.remove("token") {
            let token = token.as_str().ok_or((UNAUTHORIZED, "the token must be a string".to_owned()))?;
            return self.authenticate(token).map(|_| ()).map_err(|error| match error {
                AuthError::NotGranted(reason) => (FORBIDDEN, reason),
                other => (UNAUTHORIZED, other.to_string()),
            });
        }
        let Some(identity) = &self.identity else {
            return Err((UNAUTHORIZED, "authentication required: send {\"token\": \"...\"} first".into()));
        };
        let room = self.shared.hub.default_room.clone();
        if !identity.may_publish(&room) {
            return Err((FORBIDDEN, format!("this token does not allow publishing to {room:?}")));
        }
        // Missing fields are empty strings, as the seed server had it.
        let name = parsed.remove("name").unwrap_or(Value::Null);
        let message = plain_string(parsed.remove("message").unwrap_or(Value::Null));
        let name = identity.name.clone().unwrap_or_else(|| plain_string(name));
        let limits = &self.shared.limits;
        if name.chars().count() > limits.max_name_chars || message.chars().count() > limits.max_message_chars {
            return Err((CloseCode::MESSAGE_TOO_BIG, "name or message too long".into()));
        }
        let new = NewMessage { room, id: None, name, message, time: now_hms() };
        match self.shared.store.submit(new) {
            Ok(pending) => {
                self.replies.push_back(Box::pin(async move {
                    if let Err(error) = pending.await {
                        tracing::warn!(%error, "a seed client's message was not stored");
                    }
                    None
                }));
                Ok(())
            }
            Err(_) => Err((CloseCode::TRY_AGAIN_LATER, "message could not be stored; try again later".into())),
        }
    }

    /// Takes a token: the first one registers the connection, later ones replace it (same subject).
    /// Rooms the new token no longer grants are left.
    fn authenticate(&mut self, token: &str) -> Result<Vec<String>, AuthError> {
        let access = &self.shared.access;
        let Some(current) = &self.identity else {
            let identity = access.verify(token)?;
            return match self.authenticated(identity) {
                Ok(()) => Ok(Vec::new()),
                Err((_, reason)) => Err(AuthError::NotGranted(reason)),
            };
        };
        let fresh = access.refresh(current, token)?;
        let mut left = Vec::new();
        if let Some(id) = self.id {
            for room in self.shared.hub.rooms_of(id) {
                if !fresh.may_join(&room) && self.shared.hub.leave(id, &room) {
                    left.push(room);
                }
            }
        }
        self.set_identity(fresh);
        Ok(left)
    }

    fn on_request(&mut self, text: &str) -> Result<Vec<String>, Closing> {
        let raw: Value = match serde_json::from_str(text) {
            Ok(raw) => raw,
            Err(error) => return Ok(vec![error_envelope(ErrorCode::BadJson, &format!("not JSON: {error}"), None)]),
        };
        let req = protocol::request_ref(&raw).cloned();
        let request: Request = match serde_json::from_value(raw) {
            Ok(request) => request,
            Err(error) => return Ok(vec![error_envelope(ErrorCode::BadRequest, &error.to_string(), req.as_ref())]),
        };
        if let Request::Auth { token, req } = request {
            let first = self.identity.is_none();
            return match self.authenticate(&token) {
                Ok(left) => {
                    let identity = self.identity.as_ref().expect("authenticated");
                    let exp = identity.expires_at.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
                    let mut out = vec![
                        json!({"type": "authed", "sub": identity.subject, "exp": exp.map(|d| d.as_secs()), "req": req})
                            .to_string(),
                    ];
                    out.extend(left.into_iter().map(|room| {
                        json!({"type": "left", "room": room, "reason": "not_allowed", "req": null}).to_string()
                    }));
                    Ok(out)
                }
                Err(AuthError::NotGranted(reason)) => Err((FORBIDDEN, reason)),
                Err(error) if first => Err((UNAUTHORIZED, error.to_string())),
                Err(error) => Ok(vec![error_envelope(ErrorCode::BadToken, &error.to_string(), req.as_ref())]),
            };
        }
        let (Some(identity), Some(id)) = (self.identity.clone(), self.id) else {
            return Err((
                UNAUTHORIZED,
                "authentication required: send {\"type\": \"auth\", \"token\": ...} first".into(),
            ));
        };
        let hub = &self.shared.hub;
        Ok(match request {
            Request::Auth { .. } => unreachable!("handled above"),
            Request::Join { room, name, since, req } => {
                if let Err(e) = check_room(&room).and_then(|()| may(identity.may_join(&room), "join", &room)) {
                    return Ok(vec![error_envelope(e.0, &e.1, req.as_ref())]);
                }
                self.join(id, &identity, room, name, since, req)
            }
            Request::Leave { room, req } => {
                if hub.leave(id, &room) {
                    vec![json!({"type": "left", "room": room, "req": req}).to_string()]
                } else {
                    vec![error_envelope(ErrorCode::UnknownRoom, &format!("not a member of {room:?}"), req.as_ref())]
                }
            }
            Request::Publish { room, rooms, message, name, id: message_id, req } => {
                let rooms: Vec<String> = room.into_iter().chain(rooms.unwrap_or_default()).collect();
                let name = identity.name.clone().or(name).or_else(|| self.name.clone());
                match validate_publish(&self.shared.limits, rooms, message, name, message_id) {
                    // Each room beyond the first is one more message against the rate limit.
                    Ok(publish) if !self.charge(publish.rooms.len() - 1) => {
                        return Err((CloseCode::POLICY_VIOLATION, "message rate limit exceeded".into()));
                    }
                    Ok(publish) => match publish.rooms.iter().find(|room| !identity.may_publish(room)) {
                        Some(room) => vec![error_envelope(
                            ErrorCode::NotAllowed,
                            &format!("this token does not allow publishing to {room:?}"),
                            req.as_ref(),
                        )],
                        None => self.publish(publish, req),
                    },
                    Err((code, text)) => vec![error_envelope(code, &text, req.as_ref())],
                }
            }
            Request::Presence { room, req } => {
                if !hub.is_member(id, &room) {
                    return Ok(vec![error_envelope(
                        ErrorCode::UnknownRoom,
                        &format!("not a member of {room:?}"),
                        req.as_ref(),
                    )]);
                }
                let (members, truncated) = hub.presence(&room);
                vec![json!({"type": "presence", "room": room, "members": members_json(&members), "truncated": truncated, "req": req})
                    .to_string()]
            }
            Request::History { room, since, limit, req } => {
                if let Err(e) = check_room(&room).and_then(|()| may(identity.may_join(&room), "read", &room)) {
                    return Ok(vec![error_envelope(e.0, &e.1, req.as_ref())]);
                }
                let last = hub.last_offset(&room);
                let max_replay = self.shared.limits.max_replay;
                let limit = limit.unwrap_or(max_replay).min(max_replay);
                match self.shared.store.history(&room, since.unwrap_or(0), last, limit) {
                    Ok(history) => {
                        let messages: Vec<Value> = history.messages.iter().map(protocol::message_value).collect();
                        vec![json!({"type": "history", "room": room, "messages": messages, "first": history.first_retained,
                                    "last": history.last_offset, "req": req})
                        .to_string()]
                    }
                    Err(error) => vec![unavailable(&error, req.as_ref())],
                }
            }
        })
    }

    fn join(
        &mut self,
        id: ConnId,
        identity: &Identity,
        room: String,
        name: Option<String>,
        since: Option<u64>,
        req: Option<Value>,
    ) -> Vec<String> {
        if let Some(name) = &name {
            if let Err((code, text)) = check_name(name, self.shared.limits.max_name_chars) {
                return vec![error_envelope(code, &text, req.as_ref())];
            }
        }
        if name.is_some() {
            self.name = name;
        }
        // An authenticated member is shown under its token's name, whatever it asks for.
        let display = identity.name.clone().or_else(|| self.name.clone()).unwrap_or_else(|| "Anonymous".into());
        let joined = match self.shared.hub.join(id, &room, &display) {
            Ok(joined) => joined,
            Err(error @ JoinError::TooManyRooms { .. }) => {
                return vec![error_envelope(ErrorCode::TooMany, &error.to_string(), req.as_ref())]
            }
            Err(JoinError::Gone) => return Vec::new(),
        };
        let last = joined.last_offset;
        let store = &self.shared.store;
        let limits = &self.shared.limits;
        let (history, recovered) = match since {
            None => {
                (store.history(&room, last.saturating_sub(limits.join_backlog as u64), last, limits.join_backlog), None)
            }
            Some(since) if since >= last => {
                (Ok(History { first_retained: last + 1, last_offset: last, ..History::default() }), Some(since == last))
            }
            Some(since) => {
                let history = store.history(&room, since, last, limits.max_replay);
                let complete = history
                    .as_ref()
                    .is_ok_and(|h| h.first_retained <= since + 1 && (last - since) as usize <= limits.max_replay);
                (history, Some(complete))
            }
        };
        let history = match history {
            Ok(history) => history,
            Err(error) => return vec![unavailable(&error, req.as_ref())],
        };
        let mut out = Vec::with_capacity(history.messages.len() + 1);
        out.push(
            json!({"type": "joined", "room": room, "offset": last, "first": history.first_retained,
                   "recovered": recovered, "members": members_json(&joined.members), "truncated": joined.truncated, "req": req})
            .to_string(),
        );
        out.extend(history.messages.iter().map(protocol::message_envelope));
        out
    }

    fn publish(&mut self, publish: PublishRequest, req: Option<Value>) -> Vec<String> {
        let mut immediate = Vec::new();
        for pending in submit(&self.shared.store, publish) {
            let req = req.clone();
            match pending {
                Ok(pending) => self.replies.push_back(Box::pin(async move {
                    Some(match pending.await {
                        Ok(Published::Stored(m)) => ack(&m.room, m.offset, &m.id, false, &req),
                        Ok(Published::Duplicate(m)) => ack(&m.room, m.offset, &m.id, true, &req),
                        Err(error) => unavailable(&error, req.as_ref()),
                    })
                })),
                Err(error) => immediate.push(unavailable(&error, req.as_ref())),
            }
        }
        immediate
    }
}

/// How a session ends.
enum End {
    /// With a close frame.
    Close(CloseCode, String),
    /// The connection failed; nothing more can be sent.
    Dropped,
}

/// A publish that passed validation (from a WebSocket client or the HTTP API).
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub rooms: Vec<String>,
    pub message: String,
    pub name: String,
    pub id: Option<String>,
}

/// Checks a publish against the limits; the error names what is wrong.
pub fn validate_publish(
    limits: &SessionLimits,
    rooms: Vec<String>,
    message: String,
    name: Option<String>,
    id: Option<String>,
) -> Result<PublishRequest, (ErrorCode, String)> {
    let mut seen = HashSet::new();
    let rooms: Vec<String> = rooms.into_iter().filter(|room| seen.insert(room.clone())).collect();
    if rooms.is_empty() {
        return Err((ErrorCode::BadRequest, "publish needs \"room\" or \"rooms\"".into()));
    }
    if rooms.len() > limits.max_publish_rooms {
        return Err((ErrorCode::TooMany, format!("a publish may name at most {} rooms", limits.max_publish_rooms)));
    }
    for room in &rooms {
        check_room(room)?;
    }
    if message.chars().count() > limits.max_message_chars {
        return Err((ErrorCode::TooLong, format!("message longer than {} characters", limits.max_message_chars)));
    }
    if let Some(name) = &name {
        check_name(name, limits.max_name_chars)?;
    }
    if id.as_ref().is_some_and(|id| id.is_empty() || id.len() > 128) {
        return Err((ErrorCode::BadRequest, "id must be 1-128 bytes".into()));
    }
    Ok(PublishRequest { rooms, message, name: name.unwrap_or_else(|| "Anonymous".into()), id })
}

/// Queues one message per room, in order; each resolves once committed.
pub fn submit(store: &Store, publish: PublishRequest) -> Vec<Result<crate::store::PendingPublish, StoreError>> {
    let time = now_hms();
    publish
        .rooms
        .into_iter()
        .map(|room| {
            store.submit(NewMessage {
                room,
                id: publish.id.clone(),
                name: publish.name.clone(),
                message: publish.message.clone(),
                time: time.clone(),
            })
        })
        .collect()
}

fn check_room(room: &str) -> Result<(), (ErrorCode, String)> {
    let valid = !room.is_empty()
        && room.chars().count() <= MAX_ROOM_CHARS
        && room.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if valid {
        Ok(())
    } else {
        Err((ErrorCode::BadRequest, format!("invalid room name {room:?}: 1-{MAX_ROOM_CHARS} of A-Z a-z 0-9 _ - . :")))
    }
}

fn check_name(name: &str, max_chars: usize) -> Result<(), (ErrorCode, String)> {
    if name.chars().count() > max_chars {
        return Err((ErrorCode::TooLong, format!("name longer than {max_chars} characters")));
    }
    Ok(())
}

fn may(allowed: bool, what: &str, room: &str) -> Result<(), (ErrorCode, String)> {
    if allowed {
        Ok(())
    } else {
        Err((ErrorCode::NotAllowed, format!("this token does not allow you to {what} {room:?}")))
    }
}

fn ack(room: &str, offset: u64, id: &Option<String>, duplicate: bool, req: &Option<Value>) -> String {
    json!({"type": "ack", "room": room, "offset": offset, "id": id, "duplicate": duplicate, "req": req}).to_string()
}

fn unavailable(error: &StoreError, req: Option<&Value>) -> String {
    error_envelope(ErrorCode::Unavailable, &error.to_string(), req)
}

fn members_json(members: &[(ConnId, String)]) -> Value {
    Value::Array(members.iter().map(|(id, name)| json!({"id": id, "name": name})).collect())
}

/// The seed server stored whatever JSON it got; a non-string name or message is kept as its JSON text.
fn plain_string(value: Value) -> String {
    match value {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The server's local wall-clock time, as the seed server stamped messages.
pub fn now_hms() -> String {
    chrono::Local::now().format("%H:%M:%S").to_string()
}
