//! One WebSocket connection to the chat: reads requests, answers them, and forwards what the hub
//! delivers into its outbox. Publishes are queued to the store in the order they arrive and their
//! acknowledgements go back in that order, without waiting for one commit before reading the next.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use serde_json::{json, Value};
use switchboard_ws::upgrade::UpgradedWebSocket;
use switchboard_ws::{CloseCode, Message, Utf8Bytes};
use tokio::sync::watch;

use crate::hub::{ConnId, Hub, JoinError};
use crate::protocol::{self, error_envelope, ErrorCode, Request, SeedIn};
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
}

const MAX_ROOM_CHARS: usize = 64;
/// How long a closing session waits for the client's side of the close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

type Reply = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

struct Session {
    hub: Arc<Hub>,
    store: Arc<Store>,
    id: ConnId,
    seed: bool,
    name: Option<String>,
    limits: SessionLimits,
    replies: FuturesOrdered<Reply>,
}

/// Runs a connection until it ends; `shutdown` flips to true when the server is stopping.
pub async fn run(
    hub: Arc<Hub>,
    store: Arc<Store>,
    mut ws: UpgradedWebSocket,
    limits: SessionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let seed = ws.protocol() != Some(protocol::V1);
    let (id, mut outbox) = hub.register(seed);
    let mut session = Session { hub: hub.clone(), store, id, seed, name: None, limits, replies: FuturesOrdered::new() };
    let end: Option<(CloseCode, &str)> = loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break Some((CloseCode::GOING_AWAY, "server shutting down")),
            Some(reply) = session.replies.next(), if !session.replies.is_empty() => {
                if let Some(envelope) = reply {
                    if ws.feed(Message::Text(envelope.into())).await.is_err() { break None; }
                }
            }
            item = outbox.recv() => match item {
                Some(bytes) => if ws.feed(Message::Text(bytes)).await.is_err() { break None },
                None => break Some((CloseCode::POLICY_VIOLATION, "too slow: messages were not read in time")),
            },
            incoming = ws.recv() => match incoming {
                None => break None,
                Some(Err(error)) => tracing::debug!(conn = id, %error, "protocol error"),
                Some(Ok(Message::Text(text))) => match session.on_text(&text) {
                    Ok(envelopes) => {
                        for envelope in envelopes {
                            if ws.feed(Message::Text(envelope.into())).await.is_err() { break; }
                        }
                    }
                    Err((code, reason)) => break Some((code, reason)),
                },
                Some(Ok(Message::Binary(_))) => {
                    if seed {
                        break Some((CloseCode::UNSUPPORTED_DATA, "binary messages are not supported"));
                    }
                    let error = error_envelope(ErrorCode::BadRequest, "binary messages are not supported; send JSON text", None);
                    if ws.feed(Message::Text(error.into())).await.is_err() { break None; }
                }
                Some(Ok(_)) => {}
            },
        }
    };
    hub.unregister(id);
    if let Some((code, reason)) = end {
        if ws.close(code, reason).await.is_ok() {
            let _ = tokio::time::timeout(CLOSE_WAIT, async { while ws.recv().await.is_some() {} }).await;
        }
    }
}

type Closing = (CloseCode, &'static str);

impl Session {
    /// Handles one text message; returns envelopes to send now, or a reason to close.
    fn on_text(&mut self, text: &Utf8Bytes) -> Result<Vec<String>, Closing> {
        if self.seed {
            self.on_seed(text).map(|()| Vec::new())
        } else {
            Ok(self.on_request(text))
        }
    }

    /// The seed protocol has no error messages: a client that breaks it is closed with the reason.
    fn on_seed(&mut self, text: &str) -> Result<(), Closing> {
        let parsed: SeedIn = serde_json::from_str(text)
            .map_err(|_| (CloseCode::INVALID_PAYLOAD, "expected JSON {\"name\": ..., \"message\": ...}"))?;
        let name = plain_string(parsed.name);
        let message = plain_string(parsed.message);
        if name.chars().count() > self.limits.max_name_chars || message.chars().count() > self.limits.max_message_chars
        {
            return Err((CloseCode::MESSAGE_TOO_BIG, "name or message too long"));
        }
        let new = NewMessage { room: self.hub.default_room.clone(), id: None, name, message, time: now_hms() };
        match self.store.submit(new) {
            Ok(pending) => {
                self.replies.push_back(Box::pin(async move {
                    if let Err(error) = pending.await {
                        tracing::warn!(%error, "a seed client's message was not stored");
                    }
                    None
                }));
                Ok(())
            }
            Err(_) => Err((CloseCode::TRY_AGAIN_LATER, "message could not be stored; try again later")),
        }
    }

    fn on_request(&mut self, text: &str) -> Vec<String> {
        let raw: Value = match serde_json::from_str(text) {
            Ok(raw) => raw,
            Err(error) => return vec![error_envelope(ErrorCode::BadJson, &format!("not JSON: {error}"), None)],
        };
        let req = protocol::request_ref(&raw).cloned();
        let request: Request = match serde_json::from_value(raw) {
            Ok(request) => request,
            Err(error) => return vec![error_envelope(ErrorCode::BadRequest, &error.to_string(), req.as_ref())],
        };
        match request {
            Request::Join { room, name, since, req } => self.join(room, name, since, req),
            Request::Leave { room, req } => {
                if self.hub.leave(self.id, &room) {
                    vec![json!({"type": "left", "room": room, "req": req}).to_string()]
                } else {
                    vec![error_envelope(ErrorCode::UnknownRoom, &format!("not a member of {room:?}"), req.as_ref())]
                }
            }
            Request::Publish { room, rooms, message, name, id, req } => {
                self.publish(room.into_iter().chain(rooms.unwrap_or_default()).collect(), message, name, id, req)
            }
            Request::Presence { room, req } => {
                if !self.hub.is_member(self.id, &room) {
                    return vec![error_envelope(
                        ErrorCode::UnknownRoom,
                        &format!("not a member of {room:?}"),
                        req.as_ref(),
                    )];
                }
                let (members, truncated) = self.hub.presence(&room);
                vec![json!({"type": "presence", "room": room, "members": members_json(&members), "truncated": truncated, "req": req})
                    .to_string()]
            }
            Request::History { room, since, limit, req } => {
                if let Err(e) = self.check_room(&room, req.as_ref()) {
                    return vec![e];
                }
                let last = self.hub.last_offset(&room);
                let limit = limit.unwrap_or(self.limits.max_replay).min(self.limits.max_replay);
                match self.store.history(&room, since.unwrap_or(0), last, limit) {
                    Ok(history) => {
                        let messages: Vec<Value> = history.messages.iter().map(protocol::message_value).collect();
                        vec![json!({"type": "history", "room": room, "messages": messages, "first": history.first_retained,
                                    "last": history.last_offset, "req": req})
                        .to_string()]
                    }
                    Err(error) => vec![unavailable(&error, req.as_ref())],
                }
            }
        }
    }

    fn check_room(&self, room: &str, req: Option<&Value>) -> Result<(), String> {
        let valid = !room.is_empty()
            && room.chars().count() <= MAX_ROOM_CHARS
            && room.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
        if valid {
            Ok(())
        } else {
            Err(error_envelope(
                ErrorCode::BadRequest,
                &format!("invalid room name {room:?}: 1-{MAX_ROOM_CHARS} of A-Z a-z 0-9 _ - . :"),
                req,
            ))
        }
    }

    fn check_name(&self, name: &str, req: Option<&Value>) -> Result<(), String> {
        if name.chars().count() > self.limits.max_name_chars {
            return Err(error_envelope(
                ErrorCode::TooLong,
                &format!("name longer than {} characters", self.limits.max_name_chars),
                req,
            ));
        }
        Ok(())
    }

    fn join(&mut self, room: String, name: Option<String>, since: Option<u64>, req: Option<Value>) -> Vec<String> {
        if let Err(e) = self.check_room(&room, req.as_ref()).and_then(|()| match &name {
            Some(n) => self.check_name(n, req.as_ref()),
            None => Ok(()),
        }) {
            return vec![e];
        }
        if name.is_some() {
            self.name = name;
        }
        let display = self.name.clone().unwrap_or_else(|| "Anonymous".into());
        let joined = match self.hub.join(self.id, &room, &display) {
            Ok(joined) => joined,
            Err(error @ JoinError::TooManyRooms { .. }) => {
                return vec![error_envelope(ErrorCode::TooMany, &error.to_string(), req.as_ref())]
            }
            Err(JoinError::Gone) => return Vec::new(),
        };
        let last = joined.last_offset;
        let store = &self.store;
        let (history, recovered) = match since {
            None => (
                store.history(
                    &room,
                    last.saturating_sub(self.limits.join_backlog as u64),
                    last,
                    self.limits.join_backlog,
                ),
                None,
            ),
            Some(since) if since >= last => {
                (Ok(History { first_retained: last + 1, last_offset: last, ..History::default() }), Some(since == last))
            }
            Some(since) => {
                let history = store.history(&room, since, last, self.limits.max_replay);
                let complete = history
                    .as_ref()
                    .is_ok_and(|h| h.first_retained <= since + 1 && (last - since) as usize <= self.limits.max_replay);
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

    fn publish(
        &mut self,
        mut rooms: Vec<String>,
        message: String,
        name: Option<String>,
        id: Option<String>,
        req: Option<Value>,
    ) -> Vec<String> {
        rooms.dedup();
        if rooms.is_empty() {
            return vec![error_envelope(ErrorCode::BadRequest, "publish needs \"room\" or \"rooms\"", req.as_ref())];
        }
        for room in &rooms {
            if let Err(e) = self.check_room(room, req.as_ref()) {
                return vec![e];
            }
        }
        if message.chars().count() > self.limits.max_message_chars {
            let text = format!("message longer than {} characters", self.limits.max_message_chars);
            return vec![error_envelope(ErrorCode::TooLong, &text, req.as_ref())];
        }
        if let Some(Err(e)) = name.as_deref().map(|n| self.check_name(n, req.as_ref())) {
            return vec![e];
        }
        if id.as_ref().is_some_and(|id| id.is_empty() || id.len() > 128) {
            return vec![error_envelope(ErrorCode::BadRequest, "id must be 1-128 bytes", req.as_ref())];
        }
        let name = name.or_else(|| self.name.clone()).unwrap_or_else(|| "Anonymous".into());
        let time = now_hms();
        let mut immediate = Vec::new();
        for room in rooms {
            let new = NewMessage {
                room: room.clone(),
                id: id.clone(),
                name: name.clone(),
                message: message.clone(),
                time: time.clone(),
            };
            let req = req.clone();
            match self.store.submit(new) {
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
