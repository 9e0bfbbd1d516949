//! One client's conversation with the chat, as a state machine: request text in ([`Session::on_text`]),
//! envelopes out, and a deadline out ([`Session::deadline`]) that the transport turns into a timer.
//!
//! Answers that need the engine (a publish's acknowledgement after its commit, a join's replay) are
//! queued as [`Completion`]s and come back in request order through [`Completions`]; the transport
//! hands each to [`Session::complete`]. Fan-out from the hub arrives through [`Deliveries`]. Publishes
//! are queued to the engine in the order they arrive and acknowledged in that order, without waiting
//! for one commit before reading the next request.
//!
//! A session that must end returns an [`End`]: a close code (RFC 6455 §7.4, 4000s the chat's own) and
//! a reason, which a WebSocket sends as its close frame.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::{FuturesOrdered, StreamExt};
use serde_json::Value;
use switchboard_ws::Utf8Bytes;

use super::access::{AuthError, Identity};
use super::hub::{ConnId, Cut, JoinError, JoinId, Outbox, UserLimit};
use super::limits::RateLimiter;
use super::message::{check_name, check_room, now_hms, NewMessage, Refusal};
use super::publish::{self, PublishRequest};
use super::wire::{error_text, Dialect, Envelope, ErrorCode, Member, Request};
use super::Core;
use crate::engine::{EngineError, History, Position, PresenceEntry, Published, StoredMessage};
use crate::metrics::{metrics, Refusal as ConnectionRefusal, Transport};

/// The server is going away (shutdown).
pub const GOING_AWAY: u16 = 1001;
/// The client sent binary to a seed session.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// The client broke the seed protocol.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Too fast, or too slow to read.
pub const POLICY_VIOLATION: u16 = 1008;
/// A seed message over the limits.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The store refused a seed message.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// The room's history was reset under the session (a lost history, a gap past retention).
pub const SERVICE_RESTART: u16 = 1012;
/// A missing, invalid or expired token (the 4000s are the application's, RFC 6455 §7.4.2).
pub const UNAUTHORIZED: u16 = 4001;
/// A token that does not grant what the session needs.
pub const FORBIDDEN: u16 = 4003;

/// Why a session ends: a close code and a reason of at most 123 bytes (what fits in a close frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// The close code.
    pub code: u16,
    /// Words for the client.
    pub reason: String,
}

impl End {
    /// An end with `reason` cut, at a character boundary, to what fits in a close frame.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        let text = reason.into();
        if text.len() <= 123 {
            return Self { code, reason: text };
        }
        let mut end = 120;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Self { code, reason: format!("{}...", &text[..end]) }
    }

    /// The session's client stopped reading: its outbox overflowed, or a write timed out.
    pub fn too_slow(what: &str) -> Self {
        Self::new(POLICY_VIOLATION, format!("too slow: {what}"))
    }
}

/// What a step of the session sends: envelopes in order, or the end.
pub type Replies = Result<Vec<String>, End>;

/// An answer that waited for the engine, to be given to [`Session::complete`].
pub struct Completion(Done);

enum Done {
    /// A finished envelope (a publish's ack or error), or nothing (a seed publish).
    Reply(Option<String>),
    /// A join's replay was read.
    Joined(Box<JoinRead>),
    /// The session must end: a seed client's message was not stored, and the seed protocol has no
    /// other way to say so. (Boxed: a rare answer should not grow the common ones, which every
    /// connection's future holds.)
    End(Box<End>),
}

struct JoinRead {
    room: String,
    /// The hub's number for this join; `None` for a join again of a live member.
    join: Option<JoinId>,
    since: Option<u64>,
    epoch: Option<String>,
    req: Option<Value>,
    read: Result<JoinView, EngineError>,
}

/// What a join reads from the engine: where the room stands, the replay, and who is there.
struct JoinView {
    top: Position,
    history: History,
    members: Vec<PresenceEntry>,
    truncated: bool,
}

type Pending = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// A client's conversation.
pub struct Session {
    core: Arc<Core>,
    dialect: Dialect,
    conn: ConnId,
    outbox: Outbox,
    name: Option<String>,
    /// `None` until a token arrives, on a server that refuses anonymous connections. Shared: every
    /// anonymous session holds the same one.
    identity: Option<Arc<Identity>>,
    /// When the identity's token expires (set with the identity, so the timer is not reset for nothing).
    expiry: Option<Instant>,
    auth_deadline: Instant,
    rate: Option<RateLimiter>,
    /// Answers waiting for the engine; allocated while there are some (an idle session holds none).
    pending: Option<Box<FuturesOrdered<Pending>>>,
    /// The client's address, for the log line of a forced close.
    peer: Option<std::net::SocketAddr>,
    /// How the client reaches the chat (the metrics' label).
    transport: Transport,
}

/// The session's answers waiting for the engine (see [`Session::streams`]).
pub struct Completions<'a>(&'a mut Option<Box<FuturesOrdered<Pending>>>);

impl Completions<'_> {
    /// The next answer, in request order; never resolves while none is waiting.
    pub async fn next(self) -> Completion {
        let Some(pending) = self.0 else { return std::future::pending().await };
        let done = match pending.next().await {
            Some(done) => done,
            None => return std::future::pending().await,
        };
        if pending.is_empty() {
            *self.0 = None;
        }
        done
    }
}

/// The session's fan-out (see [`Session::streams`]).
pub struct Deliveries<'a>(&'a mut Outbox);

impl Deliveries<'_> {
    /// The next message from the hub; `None` when the hub let go of the session: it was too slow, or
    /// the server is shutting down ([`Session::cut_off`] says which).
    pub async fn next(self) -> Option<Utf8Bytes> {
        self.0.recv().await
    }
}

impl Session {
    /// A session that has not authenticated yet (registered with the hub, in no room); [`Session::start`]
    /// lets it in.
    pub fn new(core: Arc<Core>, dialect: Dialect) -> Self {
        let (conn, outbox) = core.hub.register(dialect);
        Self::registered(core, dialect, conn, outbox)
    }

    /// A `switchboard.v1` session that is never in presence (see [`super::hub::Hub::register_listener`]): a long
    /// poll, which lives for one request.
    pub fn listener(core: Arc<Core>) -> Self {
        let (conn, outbox) = core.hub.register_listener();
        Self::registered(core, Dialect::V1, conn, outbox)
    }

    fn registered(core: Arc<Core>, dialect: Dialect, conn: ConnId, outbox: Outbox) -> Self {
        let now = core.clock.now();
        let rate = core.limits.rate_limit.map(|limit| RateLimiter::new(limit, now));
        let auth_deadline = now + core.limits.auth_timeout;
        Self {
            core,
            dialect,
            conn,
            outbox,
            name: None,
            identity: None,
            expiry: None,
            auth_deadline,
            rate,
            pending: None,
            peer: None,
            transport: Transport::WebSocket,
        }
    }

    /// Says how the client reaches the chat (WebSocket unless told otherwise), for the metrics.
    /// The session's connection in the hub.
    pub fn id(&self) -> ConnId {
        self.conn
    }

    pub fn set_transport(&mut self, transport: Transport) {
        self.transport = transport;
    }

    /// Records the client's address (logged with a forced close).
    pub fn set_peer(&mut self, peer: Option<std::net::SocketAddr>) {
        self.peer = peer;
    }

    /// The client's address, if the transport told it.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    /// Starts with the identity of the handshake's token (or anonymous access); `None` means the client
    /// must send a token first.
    pub fn start(&mut self, identity: Option<Identity>) -> Result<(), End> {
        match identity {
            Some(identity) => {
                self.authenticated(identity).map_err(|error| End::new(close_code(&error), error.to_string()))
            }
            None => Ok(()),
        }
    }

    /// The protocol this session speaks.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The member id clients see for this session.
    pub fn member_id(&self) -> String {
        self.core.hub.member_id(self.conn)
    }

    /// Why the hub let go of this session (its deliveries ended).
    pub fn cut_off(&self) -> End {
        match self.outbox.cut() {
            Some(Cut::Api(code, reason)) => End::new(code, reason),
            _ if self.core.hub.is_closing() => End::new(GOING_AWAY, "server shutting down"),
            Some(Cut::Reset) => End::new(SERVICE_RESTART, "room history was reset; rejoin to learn what was recovered"),
            Some(Cut::Slow) | None => End::too_slow("messages were not read in time"),
        }
    }

    /// The answers and the fan-out the transport waits on, borrowed apart so it can wait on both.
    pub fn streams(&mut self) -> (Completions<'_>, Deliveries<'_>) {
        (Completions(&mut self.pending), Deliveries(&mut self.outbox))
    }

    /// The next answer that waited for the engine, for a transport that polls (an HTTP body);
    /// pending while none is waiting. The same as [`Completions::next`].
    pub fn poll_completion(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Completion> {
        use futures_util::Stream as _;
        let Some(pending) = self.pending.as_mut() else { return std::task::Poll::Pending };
        match Pin::new(&mut **pending).poll_next(cx) {
            std::task::Poll::Ready(Some(done)) => {
                if pending.is_empty() {
                    self.pending = None;
                }
                std::task::Poll::Ready(done)
            }
            std::task::Poll::Ready(None) | std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// The next message from the hub, for a transport that polls; `Ready(None)` as for
    /// [`Deliveries::next`].
    pub fn poll_delivery(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Utf8Bytes>> {
        self.outbox.poll_recv(cx)
    }

    /// The next delivery if one is queued (to batch deliveries into one write).
    pub fn try_delivery(&mut self) -> Option<Utf8Bytes> {
        self.outbox.try_recv()
    }

    /// The session's clock.
    pub fn now(&self) -> Instant {
        self.core.clock.now()
    }

    /// Queues an answer that waits for the engine.
    fn push_pending(&mut self, pending: Pending) {
        self.pending.get_or_insert_with(Default::default).push_back(pending);
    }

    /// When the session must end unless something changes: the end of the time allowed to
    /// authenticate, or the token's expiry.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.identity {
            None => Some(self.auth_deadline),
            Some(_) => self.expiry,
        }
    }

    /// Ends the session if its deadline has passed.
    pub fn check_deadline(&mut self) -> Result<(), End> {
        let now = self.core.clock.now();
        match (&self.identity, self.deadline()) {
            (None, Some(at)) if at <= now => {
                Err(End::new(UNAUTHORIZED, "authentication required: no token arrived in time"))
            }
            (Some(_), Some(at)) if at <= now => {
                metrics().token_expiries.inc();
                Err(End::new(UNAUTHORIZED, "token expired"))
            }
            _ => Ok(()),
        }
    }

    /// A text message from the client.
    pub fn on_text(&mut self, text: &str) -> Replies {
        if !self.charge(1) {
            return Err(rate_exceeded());
        }
        let replies = match self.dialect {
            Dialect::Seed => self.on_seed(text).map(|()| Vec::new()),
            Dialect::V1 => self.on_request(text),
        };
        replies.map_err(|(code, reason)| End::new(code, reason))
    }

    /// A binary message from the client: the chat is JSON text.
    pub fn on_binary(&mut self) -> Replies {
        if !self.charge(1) {
            return Err(rate_exceeded());
        }
        match self.dialect {
            Dialect::Seed => Err(End::new(UNSUPPORTED_DATA, "binary messages are not supported")),
            Dialect::V1 => {
                Ok(vec![error_text(ErrorCode::BadRequest, "binary messages are not supported; send JSON text", None)])
            }
        }
    }

    /// Takes an answer that waited for the engine; what to send now.
    pub fn complete(&mut self, completion: Completion) -> Replies {
        match completion.0 {
            Done::Reply(reply) => Ok(reply.into_iter().collect()),
            Done::Joined(read) => Ok(self.joined(*read)),
            Done::End(end) => Err(*end),
        }
    }

    /// Waits for every answer still pending and returns what each sends.
    #[cfg(test)]
    pub async fn settle(&mut self) -> Vec<Replies> {
        let mut out = Vec::new();
        while let Some(mut pending) = self.pending.take() {
            while let Some(done) = pending.next().await {
                out.push(self.complete(done));
            }
        }
        out
    }

    /// The connection has an identity now (from its handshake or its first message): join the hub.
    fn authenticated(&mut self, identity: Identity) -> Result<(), AuthError> {
        let default_room = self.core.hub.default_room();
        if self.dialect == Dialect::Seed && !identity.may_join(default_room) {
            return Err(AuthError::NotGranted(format!("this token does not grant the room {default_room:?}")));
        }
        self.set_identity(identity).map_err(|limit| {
            // Counted here for every transport: a token in the first message is refused nowhere else
            // (a handshake's token over the limit is refused, and counted, before a session exists).
            metrics().refused(ConnectionRefusal::Limit);
            AuthError::TooManySessions(limit.to_string())
        })?;
        if self.dialect == Dialect::Seed {
            self.core.hub.enter_default_room(self.conn);
        }
        Ok(())
    }

    /// Like [`Session::start`] with an identity, for a session that stands for a client another
    /// session already counts (one poll of a long-polling client whose presence session is kept): the
    /// user's session limit is not applied twice. The server API's `disconnect` of the user ends it
    /// with the others.
    pub fn start_counted_elsewhere(&mut self, identity: Identity) {
        if let Some(user) = user_of(&identity) {
            self.core.hub.set_stand_in(self.conn, user);
        }
        self.keep_identity(identity);
    }

    fn set_identity(&mut self, identity: Identity) -> Result<(), UserLimit> {
        self.core.hub.set_user(self.conn, user_of(&identity))?;
        self.keep_identity(identity);
        Ok(())
    }

    fn keep_identity(&mut self, identity: Identity) {
        let clock = &self.core.clock;
        self.expiry =
            identity.expires_at.map(|at| clock.now() + at.duration_since(clock.wall()).unwrap_or(Duration::ZERO));
        self.identity = Some(if identity == Identity::anonymous() { anonymous() } else { Arc::new(identity) });
    }

    /// Takes `messages` from the rate limit; false when the connection is over it.
    fn charge(&mut self, messages: usize) -> bool {
        let now = self.core.clock.now();
        match &mut self.rate {
            Some(rate) => (0..messages).all(|_| rate.allow(now)),
            None => true,
        }
    }

    /// The seed protocol has no error messages: a client that breaks it is closed with the reason.
    /// A message with a `token` field authenticates (or refreshes the token) instead of chatting.
    fn on_seed(&mut self, text: &str) -> Result<(), (u16, String)> {
        let bad = || (INVALID_PAYLOAD, "expected JSON {\"name\": ..., \"message\": ...}".to_owned());
        let mut parsed: serde_json::Map<String, Value> = serde_json::from_str(text).map_err(|_| bad())?;
        if let Some(token) = parsed.remove("token") {
            let token = token.as_str().ok_or((UNAUTHORIZED, "the token must be a string".to_owned()))?;
            return self.authenticate(token).map(|_| ()).map_err(|error| (close_code(&error), error.to_string()));
        }
        let Some(identity) = &self.identity else {
            return Err((UNAUTHORIZED, "authentication required: send {\"token\": \"...\"} first".into()));
        };
        let room = self.core.hub.default_room().to_owned();
        if !identity.may_publish(&room) {
            return Err((FORBIDDEN, format!("this token does not allow publishing to {room:?}")));
        }
        // Missing fields are empty strings, as the seed server had it.
        let name = parsed.remove("name").unwrap_or(Value::Null);
        let message = plain_string(parsed.remove("message").unwrap_or(Value::Null));
        let name = identity.name.clone().unwrap_or_else(|| plain_string(name));
        let limits = &self.core.limits;
        if name.chars().count() > limits.max_name_chars || message.chars().count() > limits.max_message_chars {
            return Err((MESSAGE_TOO_BIG, "name or message too long".into()));
        }
        let name = self.core.access.guest_name(identity, name);
        let new = NewMessage { room, id: None, name, message, time: now_hms(self.core.clock.wall()) };
        match self.core.engine.publish(new) {
            Ok(pending) => {
                self.push_pending(Box::pin(async move {
                    match pending.await {
                        Ok(_) => Completion(Done::Reply(None)),
                        Err(error) => {
                            // Closed with 1013 as when the engine refuses it at once: never a silent loss.
                            tracing::warn!(%error, "a seed client's message was not stored");
                            let reason = match error {
                                // The seed protocol has no ids to send it again safely with.
                                EngineError::Unanswered(_) => {
                                    "the store did not answer; the message may have been stored"
                                }
                                _ => "message could not be stored; try again later",
                            };
                            Completion(Done::End(Box::new(End::new(TRY_AGAIN_LATER, reason))))
                        }
                    }
                }));
                Ok(())
            }
            Err(_) => Err((TRY_AGAIN_LATER, "message could not be stored; try again later".into())),
        }
    }

    /// Takes a token: the first one registers the connection, later ones replace it (same subject).
    /// Rooms the new token no longer grants are left.
    fn authenticate(&mut self, token: &str) -> Result<Vec<String>, AuthError> {
        let access = &self.core.access;
        let Some(current) = &self.identity else {
            let identity = access.verify(token)?;
            return self.authenticated(identity).map(|()| Vec::new());
        };
        let fresh = access.refresh(current, token)?;
        let mut left = Vec::new();
        for room in self.core.hub.rooms_of(self.conn) {
            if !fresh.may_join(&room) && self.core.hub.leave(self.conn, &room) {
                left.push(room);
            }
        }
        // A refresh keeps its subject, or gives an anonymous session one (`refresh` checks); only the
        // second moves the user's count, and may find it full.
        self.set_identity(fresh).map_err(|limit| AuthError::TooManySessions(limit.to_string()))?;
        Ok(left)
    }

    fn on_request(&mut self, text: &str) -> Result<Vec<String>, (u16, String)> {
        let raw: Value = match serde_json::from_str(text) {
            Ok(raw) => raw,
            Err(error) => return Ok(vec![error_text(ErrorCode::BadJson, &format!("not JSON: {error}"), None)]),
        };
        let req = raw.get("req").cloned();
        let request: Request = match serde_json::from_value(raw) {
            Ok(request) => request,
            Err(error) => return Ok(vec![error_text(ErrorCode::BadRequest, &error.to_string(), req.as_ref())]),
        };
        if let Request::Auth { token, req } = request {
            return self.on_auth(&token, req);
        }
        let id = self.conn;
        let Some(identity) = self.identity.clone() else {
            return Err((
                UNAUTHORIZED,
                "authentication required: send {\"type\": \"auth\", \"token\": ...} first".into(),
            ));
        };
        let refused = |(code, text): Refusal, req: &Option<Value>| Ok(vec![error_text(code, &text, req.as_ref())]);
        match request {
            Request::Auth { .. } => unreachable!("handled above"),
            Request::Join { room, name, since, epoch, req } => {
                if let Err(e) = check_room(&room).and_then(|()| may(identity.may_join(&room), "join", &room)) {
                    return refused(e, &req);
                }
                Ok(self.join(id, &identity, room, name, since, epoch, req))
            }
            Request::Ping { req } => Ok(vec![Envelope::Pong { req: req.as_ref() }.encode()]),
            Request::Leave { room, req } => {
                if self.core.hub.leave(id, &room) {
                    Ok(vec![Envelope::Left { room: &room, reason: None, req: req.as_ref() }.encode()])
                } else {
                    refused((ErrorCode::UnknownRoom, format!("not a member of {room:?}")), &req)
                }
            }
            Request::Publish { room, rooms, message, name, id: message_id, req } => {
                let rooms: Vec<String> = room.into_iter().chain(rooms.unwrap_or_default()).collect();
                let name = name.or_else(|| self.name.clone());
                match publish::prepare_client_publish(&self.core, &identity, rooms, message, name, message_id) {
                    // Each room beyond the first is one more message against the rate limit.
                    Ok(publish) if !self.charge(publish.rooms.len() - 1) => {
                        let end = rate_exceeded();
                        Err((end.code, end.reason))
                    }
                    Ok(publish) => match publish::check_grants(&identity, &publish) {
                        Ok(()) => Ok(self.publish(publish, req)),
                        Err(e) => refused(e, &req),
                    },
                    Err(e) => refused(e, &req),
                }
            }
            Request::Presence { room, req } => {
                if !self.core.hub.is_member(id, &room) {
                    return refused((ErrorCode::UnknownRoom, format!("not a member of {room:?}")), &req);
                }
                let hub = self.core.hub.clone();
                self.push_pending(Box::pin(async move {
                    let text = match hub.presence(&room).await {
                        Ok((members, truncated)) => {
                            let members = members.iter().map(Member::from).collect();
                            Envelope::PresenceList { room: &room, members, truncated, req: req.as_ref() }.encode()
                        }
                        Err(error) => unavailable(&error, req.as_ref()),
                    };
                    Completion(Done::Reply(Some(text)))
                }));
                Ok(Vec::new())
            }
            Request::History { room, since, limit, req } => {
                if let Err(e) = check_room(&room).and_then(|()| may(identity.may_join(&room), "read", &room)) {
                    return refused(e, &req);
                }
                let max_replay = self.core.limits.max_replay;
                if limit.is_some_and(|limit| limit == 0 || limit > max_replay) {
                    return refused((ErrorCode::BadRequest, format!("limit must be 1 to {max_replay}")), &req);
                }
                let limit = limit.unwrap_or(max_replay);
                let budget = self.core.limits.max_replay_bytes;
                let engine = self.core.engine.clone();
                self.push_pending(Box::pin(async move {
                    let read = async {
                        let top = engine.top(&room).await?;
                        // After the last offset there is nothing (an offset past it is no wrap-around).
                        let after = since.unwrap_or(0).min(top.offset);
                        let history = engine.history(&room, after, top.offset, limit).await?;
                        Ok::<_, EngineError>((top, history))
                    };
                    let text = match read.await {
                        Ok((top, history)) => Envelope::History {
                            room: &room,
                            epoch: &top.epoch,
                            // The newest that fit in the outbox's bytes (one at least), as a smaller
                            // `limit` would give: a client that reads slowly holds no more.
                            messages: newest_fitting(&history.messages, budget).iter().map(Envelope::message).collect(),
                            first: history.first_retained,
                            last: history.last_offset,
                            req: req.as_ref(),
                        }
                        .encode(),
                        Err(error) => unavailable(&error, req.as_ref()),
                    };
                    Completion(Done::Reply(Some(text)))
                }));
                Ok(Vec::new())
            }
        }
    }

    fn on_auth(&mut self, token: &str, req: Option<Value>) -> Result<Vec<String>, (u16, String)> {
        let first = self.identity.is_none();
        match self.authenticate(token) {
            Ok(left) => {
                let identity = self.identity.as_ref().expect("authenticated");
                let exp = identity.expires_at.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
                let mut out =
                    vec![Envelope::Authed { sub: &identity.subject, exp: exp.map(|d| d.as_secs()), req: req.as_ref() }
                        .encode()];
                out.extend(
                    left.iter().map(|room| Envelope::Left { room, reason: Some("not_allowed"), req: None }.encode()),
                );
                Ok(out)
            }
            Err(error @ (AuthError::NotGranted(_) | AuthError::TooManySessions(_))) => {
                Err((close_code(&error), error.to_string()))
            }
            Err(error) if first => Err((UNAUTHORIZED, error.to_string())),
            Err(error) => Ok(vec![error_text(ErrorCode::BadToken, &error.to_string(), req.as_ref())]),
        }
    }

    /// Joins the hub at once (held there) and reads the replay from the engine; [`Session::joined`]
    /// answers when it is read.
    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        id: ConnId,
        identity: &Identity,
        room: String,
        name: Option<String>,
        since: Option<u64>,
        epoch: Option<String>,
        req: Option<Value>,
    ) -> Vec<String> {
        if let Some(name) = &name {
            if let Err((code, text)) = check_name(name, self.core.limits.max_name_chars) {
                return vec![error_text(code, &text, req.as_ref())];
            }
        }
        if name.is_some() {
            self.name = name;
        }
        // An authenticated member is shown under its token's name, whatever it asks for.
        let display = identity.name.clone().or_else(|| self.name.clone()).unwrap_or_else(|| "Anonymous".into());
        let display = self.core.access.guest_name(identity, display);
        let join = match self.core.hub.join(id, &room, &display) {
            Ok(join) => join,
            Err(error @ JoinError::TooManyRooms { .. }) => {
                return vec![error_text(ErrorCode::TooMany, &error.to_string(), req.as_ref())]
            }
            Err(JoinError::Gone) => return Vec::new(),
        };
        let engine = self.core.engine.clone();
        let hub = self.core.hub.clone();
        let limits = self.core.limits.clone();
        self.push_pending(Box::pin(async move {
            let read = async {
                engine.subscribed(&room).await?;
                let top = engine.top(&room).await?;
                let last = top.offset;
                let same_epoch = epoch.as_deref().is_none_or(|e| e == &*top.epoch);
                let history = match since {
                    // Up to date, or `u64::MAX`, past any offset a room gives out: a member from
                    // now on (a long-polling client's kept presence), with nothing to read.
                    Some(since) if (since == last && same_epoch) || since == u64::MAX => {
                        History { first_retained: last + 1, last_offset: last, ..History::default() }
                    }
                    Some(since) if since < last && same_epoch => {
                        engine.history(&room, since, last, limits.max_replay).await?
                    }
                    // A new page, offsets of a history that is gone, or offsets past the room's last
                    // (a history restored from a backup): the recent conversation.
                    _ => {
                        let backlog = limits.join_backlog;
                        engine.history(&room, last.saturating_sub(backlog as u64), last, backlog).await?
                    }
                };
                let (members, truncated) = hub.presence(&room).await?;
                Ok(JoinView { top, history, members, truncated })
            };
            let read = read.await;
            Completion(Done::Joined(Box::new(JoinRead { room, join, since, epoch, req, read })))
        }));
        Vec::new()
    }

    /// The replay of a join is read: the `joined` answer and the replay, and live delivery from there.
    fn joined(&mut self, join: JoinRead) -> Vec<String> {
        let JoinRead { room, join, since, epoch, req, read } = join;
        let JoinView { top, history, members, truncated } = match read {
            Ok(read) => read,
            Err(error) => {
                // A member that was held for this join leaves again; one that was live stays.
                if let Some(join) = join {
                    self.core.hub.abandon(self.conn, &room, join);
                }
                return vec![unavailable(&error, req.as_ref())];
            }
        };
        if let Some(join) = join {
            if !self.core.hub.start(self.conn, &room, join, top.offset) {
                // Left meanwhile (the client has its `left`), joined again (that join answers), or
                // dropped for being too slow (the session is ending).
                return Vec::new();
            }
        }
        let last = top.offset;
        let same_epoch = epoch.as_deref().is_none_or(|e| e == &*top.epoch);
        let recovered = since.map(|since| {
            if !same_epoch {
                false
            } else if since >= last {
                since == last
            } else {
                history.first_retained <= since + 1 && (last - since) as usize <= self.core.limits.max_replay
            }
        });
        // The replay is at most the outbox's bytes, as what it holds for live delivery. A long poll
        // answers with the oldest that fit, and its cursor goes on from the last of them: nothing is
        // skipped. A stream (WebSocket, SSE) goes on live after the replay, so it gets the newest that
        // fit, and a client further behind is told so, as one past `max_replay` is.
        // Only what is sent is encoded.
        let budget = self.core.limits.max_replay_bytes;
        let (replay, cut) = if self.transport == Transport::LongPoll {
            (encode_within(history.messages.iter(), budget), 0)
        } else {
            let mut newest = encode_within(history.messages.iter().rev(), budget);
            newest.reverse();
            let cut = history.messages.len() - newest.len();
            (newest, cut)
        };
        let recovered = recovered.map(|recovered| recovered && cut == 0);
        // Where a resume that could not be served whole starts again (retention, `max_replay`, the
        // bytes): the oldest message sent. Otherwise where the room's history starts.
        let first = match (since, history.messages.get(cut)) {
            (Some(since), Some(sent)) if sent.offset > since.saturating_add(1) => sent.offset,
            _ => history.first_retained,
        };
        let mut out = Vec::with_capacity(replay.len() + 1);
        out.push(
            Envelope::Joined {
                room: &room,
                offset: last,
                epoch: &top.epoch,
                first,
                recovered,
                members: members.iter().map(Member::from).collect(),
                truncated,
                req: req.as_ref(),
            }
            .encode(),
        );
        out.extend(replay);
        out
    }

    fn publish(&mut self, publish: PublishRequest, req: Option<Value>) -> Vec<String> {
        let mut immediate = Vec::new();
        let transport = self.transport;
        for (_, queued) in publish::submit(self.core.engine.as_ref(), publish, self.core.clock.wall(), transport) {
            let req = req.clone();
            match queued {
                Ok(pending) => self.push_pending(Box::pin(async move {
                    let text = match pending.await {
                        Ok(published) => ack(&published, req.as_ref()),
                        Err(error) => unavailable(&error, req.as_ref()),
                    };
                    Completion(Done::Reply(Some(text)))
                })),
                Err(error) => immediate.push(unavailable(&error, req.as_ref())),
            }
        }
        immediate
    }
}

/// The envelopes of `messages`, in the order given, as long as together they fit in `budget` bytes;
/// the first one whatever its size.
fn encode_within<'m>(messages: impl Iterator<Item = &'m StoredMessage>, budget: usize) -> Vec<String> {
    let mut total = 0usize;
    let mut encoded = Vec::new();
    for message in messages {
        let text = Envelope::message(message).encode();
        total += text.len();
        if total > budget && !encoded.is_empty() {
            break;
        }
        encoded.push(text);
    }
    encoded
}

/// The newest of `messages` (oldest first) whose envelopes fit in about `budget` bytes (their fields
/// and 100 bytes for the rest, before JSON escaping); the newest one whatever its size.
fn newest_fitting(messages: &[StoredMessage], budget: usize) -> &[StoredMessage] {
    let mut total = 0usize;
    let fitting = messages
        .iter()
        .rev()
        .take_while(|message| {
            total += message.message.len() + message.name.len() + message.id.as_deref().map_or(0, str::len) + 100;
            total <= budget
        })
        .count();
    &messages[messages.len() - fitting.max(1).min(messages.len())..]
}

impl Drop for Session {
    fn drop(&mut self) {
        // Counted here, once, whether or not the transport got to see its outbox end: a stalled
        // SSE stream's body is not polled again before its connection is dropped.
        if self.outbox.cut() == Some(Cut::Slow) {
            metrics().slow_consumer_cuts.inc(self.transport);
            tracing::info!(
                conn = self.conn,
                peer = self.peer.map(tracing::field::display),
                transport = ?self.transport,
                "let go for not reading fast enough"
            );
        }
        self.core.hub.unregister(self.conn);
    }
}

/// The close code that ends a session whose token could not be taken: 4003 for a token that does
/// not grant what the session needs, 1008 for a user at its session limit, 4001 otherwise.
fn close_code(error: &AuthError) -> u16 {
    match error {
        AuthError::NotGranted(_) => FORBIDDEN,
        AuthError::TooManySessions(_) => POLICY_VIOLATION,
        _ => UNAUTHORIZED,
    }
}

/// Who a session is signed in as, for the hub: the token's subject and its display name (the
/// subject when the token names none).
fn user_of(identity: &Identity) -> Option<(String, String)> {
    let sub = identity.subject.clone()?;
    let name = identity.name.clone().unwrap_or_else(|| sub.clone());
    Some((sub, name))
}

/// The identity of every anonymous session, shared.
fn anonymous() -> Arc<Identity> {
    static ANONYMOUS: std::sync::OnceLock<Arc<Identity>> = std::sync::OnceLock::new();
    ANONYMOUS.get_or_init(|| Arc::new(Identity::anonymous())).clone()
}

/// The end of a session over its message rate, counted as a refused message.
fn rate_exceeded() -> End {
    metrics().message_refused("rate_limit");
    End::new(POLICY_VIOLATION, "message rate limit exceeded")
}

fn may(allowed: bool, what: &str, room: &str) -> Result<(), Refusal> {
    if allowed {
        Ok(())
    } else {
        Err((ErrorCode::NotAllowed, format!("this token does not allow you to {what} {room:?}")))
    }
}

fn ack(published: &Published, req: Option<&Value>) -> String {
    let m = published.message();
    Envelope::Ack { room: &m.room, offset: m.offset, id: &m.id, duplicate: published.is_duplicate(), req }.encode()
}

fn unavailable(error: &EngineError, req: Option<&Value>) -> String {
    metrics().engine_error(error.kind());
    error_text(ErrorCode::Unavailable, &error.to_string(), req)
}

/// The seed server stored whatever JSON it got; a non-string name or message is kept as its JSON text.
fn plain_string(value: Value) -> String {
    match value {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
