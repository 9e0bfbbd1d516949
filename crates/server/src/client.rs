//! A chat client for Rust programs: the `switchboard.v1` protocol with what the browser module does
//! for a page, so that a server restart or a node's death costs a reconnect and nothing else.
//!
//! - It reconnects with exponential backoff and full jitter; given several URLs (nodes of one
//!   cluster), each attempt goes to the next one.
//! - It rejoins every room `since` the last offset it saw, with that offset's epoch, and drops
//!   anything at or below it: every message once, in order. A history that could not be recovered
//!   (a new epoch, or past retention) is reported as [`ChatEvent::Gap`].
//! - Each publish carries a random id and is sent again after a reconnect (or after `unavailable`)
//!   until it is acknowledged; the server stores each id once.
//!
//! ```no_run
//! # async fn demo() {
//! use switchboard::client::{ChatClient, ChatEvent, ClientOptions};
//! let options = ClientOptions::new(["ws://node1:8000/ws", "ws://node2:8000/ws"]).name("ann").room("lobby");
//! let mut client = ChatClient::connect(options);
//! let ack = client.publish("lobby", "hello").await.unwrap();
//! while let Some(event) = client.next_event().await {
//!     if let ChatEvent::Message(m) = event {
//!         println!("{} #{} {}: {}", m.room, m.offset, m.name, m.message);
//!     }
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_ws::{ClientBuilder, ClientStream, Message, WebSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Events queued for the program before the client stops reading from the server.
const EVENT_QUEUE: usize = 4096;

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `ws://` or `wss://` URLs of `/ws`, tried in turn.
    pub urls: Vec<String>,
    /// Display name.
    pub name: String,
    /// Rooms to join (and keep across reconnects).
    pub rooms: Vec<String>,
    /// First backoff ceiling; it doubles per failed attempt.
    pub min_backoff: Duration,
    /// Largest backoff ceiling.
    pub max_backoff: Duration,
    /// How long a publish waits after `unavailable` before it is sent again.
    pub retry_after: Duration,
}

impl ClientOptions {
    /// Options for these URLs, as "Anonymous", in no room.
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            name: "Anonymous".into(),
            rooms: Vec::new(),
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            retry_after: Duration::from_millis(500),
        }
    }

    /// Sets the display name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds a room to join.
    pub fn room(mut self, room: impl Into<String>) -> Self {
        self.rooms.push(room.into());
        self
    }
}

/// A chat message as the client shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Its room.
    pub room: String,
    /// Its offset in the room.
    pub offset: u64,
    /// The publisher's idempotency key.
    pub id: Option<String>,
    /// The sender's display name.
    pub name: String,
    /// The text.
    pub message: String,
    /// The server's `HH:MM:SS`.
    pub time: String,
}

/// What the client tells the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    /// A chat message, once, in offset order per room.
    Message(ChatMessage),
    /// Someone joined (`"join"`), was renamed (`"update"`) or left (`"leave"`).
    Presence {
        /// The room.
        room: String,
        /// `join`, `update` or `leave`.
        event: String,
        /// The member's id.
        id: String,
        /// The member's name.
        name: String,
    },
    /// Connected to this URL (after a reconnect too).
    Connected(String),
    /// The connection ended; the client reconnects.
    Disconnected,
    /// Messages after `since` in `room` could not be recovered (new epoch, or past retention).
    Gap {
        /// The room.
        room: String,
        /// The last offset the client had seen.
        since: u64,
    },
}

/// A publish's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The room.
    pub room: String,
    /// The offset the message was stored at.
    pub offset: u64,
    /// True when the server had it already (a retry): the offset is the original one.
    pub duplicate: bool,
}

/// Why a publish was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The server refused it (`code` as in the protocol: `too_long`, `not_allowed`, ...).
    #[error("refused ({code}): {message}")]
    Refused {
        /// The protocol's error code.
        code: String,
        /// The server's words.
        message: String,
    },
    /// The client was closed before the publish was acknowledged.
    #[error("the client is closed")]
    Closed,
}

enum Command {
    Publish { room: String, message: String, reply: oneshot::Sender<Result<Ack, ClientError>> },
    Close,
}

/// A connected (or reconnecting) chat client; its work runs on a task of its own.
pub struct ChatClient {
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::Receiver<ChatEvent>,
}

impl ChatClient {
    /// Starts connecting (on the current tokio runtime) and keeps the connection up until
    /// [`ChatClient::close`] or the client is dropped.
    pub fn connect(options: ClientOptions) -> Self {
        assert!(!options.urls.is_empty(), "a chat client needs at least one URL");
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
        let state = State {
            rooms: options.rooms.clone(),
            options,
            offsets: HashMap::new(),
            epochs: HashMap::new(),
            pending: Vec::new(),
            events: event_tx,
        };
        tokio::spawn(state.run(command_rx));
        Self { commands, events }
    }

    /// Publishes `message` to `room`; resolves once the server stored it (across reconnects).
    pub async fn publish(&self, room: &str, message: &str) -> Result<Ack, ClientError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Publish { room: room.to_owned(), message: message.to_owned(), reply };
        self.commands.send(command).map_err(|_| ClientError::Closed)?;
        answer.await.unwrap_or(Err(ClientError::Closed))
    }

    /// The next event; `None` once the client is closed.
    pub async fn next_event(&mut self) -> Option<ChatEvent> {
        self.events.recv().await
    }

    /// Closes the connection for good.
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }
}

struct Pending {
    id: String,
    room: String,
    message: String,
    reply: oneshot::Sender<Result<Ack, ClientError>>,
}

struct State {
    options: ClientOptions,
    rooms: Vec<String>,
    offsets: HashMap<String, u64>,
    epochs: HashMap<String, String>,
    pending: Vec<Pending>,
    events: mpsc::Sender<ChatEvent>,
}

enum Ended {
    Lost,
    Stop,
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

impl State {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut attempt = 0u32;
        let mut index = 0;
        loop {
            let url = self.options.urls[index].clone();
            let connecting = ClientBuilder::new(url.clone()).protocol("switchboard.v1").connect();
            match tokio::time::timeout(Duration::from_secs(10), connecting).await {
                Ok(Ok((ws, _))) => {
                    attempt = 0;
                    let _ = self.events.send(ChatEvent::Connected(url)).await;
                    let ended = self.connected(ws, &mut commands).await;
                    let _ = self.events.send(ChatEvent::Disconnected).await;
                    if matches!(ended, Ended::Stop) {
                        break;
                    }
                }
                Ok(Err(error)) => tracing::debug!(%error, url, "chat client could not connect"),
                Err(_) => tracing::debug!(url, "chat client connect timed out"),
            }
            index = (index + 1) % self.options.urls.len();
            let ceiling = self.options.min_backoff.saturating_mul(1 << attempt.min(16)).min(self.options.max_backoff);
            // Full jitter: clients that lost the same node spread out over the others.
            let delay = ceiling.mul_f64((random_u64() % 1000) as f64 / 1000.0);
            attempt += 1;
            let deadline = Instant::now() + delay;
            // Publishes asked for meanwhile are queued; a close ends the wait.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    command = commands.recv() => match command {
                        Some(Command::Publish { room, message, reply }) => {
                            self.queue(room, message, reply);
                        }
                        Some(Command::Close) | None => return self.fail_pending(),
                    },
                }
            }
        }
        self.fail_pending();
    }

    fn fail_pending(&mut self) {
        for pending in self.pending.drain(..) {
            let _ = pending.reply.send(Err(ClientError::Closed));
        }
    }

    fn queue(&mut self, room: String, message: String, reply: oneshot::Sender<Result<Ack, ClientError>>) -> usize {
        let id = format!("{:016x}{:016x}", random_u64(), random_u64());
        self.pending.push(Pending { id, room, message, reply });
        self.pending.len() - 1
    }

    fn publish_frame(&self, pending: &Pending) -> String {
        let frame = json!({"type": "publish", "room": pending.room, "message": pending.message,
            "name": self.options.name, "id": pending.id, "req": pending.id});
        frame.to_string()
    }

    async fn connected(
        &mut self,
        mut ws: WebSocket<ClientStream>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Ended {
        for room in self.rooms.clone() {
            let mut join = json!({"type": "join", "room": room, "name": self.options.name});
            if let Some(since) = self.offsets.get(&room) {
                join["since"] = json!(since);
                if let Some(epoch) = self.epochs.get(&room) {
                    join["epoch"] = json!(epoch);
                }
            }
            if ws.send(join.to_string()).await.is_err() {
                return Ended::Lost;
            }
        }
        if !self.send_pending(&mut ws).await {
            return Ended::Lost;
        }
        let mut resend_at: Option<Instant> = None;
        loop {
            let resend = async {
                match resend_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                incoming = ws.recv() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(envelope) = serde_json::from_str::<Value>(&text) else { continue };
                        if let Some(at) = self.on_envelope(envelope).await {
                            resend_at = Some(resend_at.map_or(at, |old| old.min(at)));
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Ended::Lost,
                },
                command = commands.recv() => match command {
                    Some(Command::Publish { room, message, reply }) => {
                        let at = self.queue(room, message, reply);
                        let frame = self.publish_frame(&self.pending[at]);
                        if ws.send(frame).await.is_err() {
                            return Ended::Lost;
                        }
                    }
                    Some(Command::Close) | None => {
                        let _ = ws.close(switchboard_ws::CloseCode(1000), "bye").await;
                        return Ended::Stop;
                    }
                },
                _ = resend => {
                    resend_at = None;
                    if !self.send_pending(&mut ws).await {
                        return Ended::Lost;
                    }
                }
            }
        }
    }

    /// Sends every unacknowledged publish again, in order; false if the connection broke.
    async fn send_pending(&self, ws: &mut WebSocket<ClientStream>) -> bool {
        for publish in &self.pending {
            if ws.send(self.publish_frame(publish)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Handles one envelope; answers when unacknowledged publishes should be sent again.
    async fn on_envelope(&mut self, mut envelope: Value) -> Option<Instant> {
        let text = |key: &str| envelope[key].as_str().unwrap_or_default().to_owned();
        match envelope["type"].as_str().unwrap_or_default() {
            "joined" => {
                let room = text("room");
                let epoch = text("epoch");
                let since = self.offsets.get(&room).copied();
                let changed = self.epochs.get(&room).is_some_and(|old| *old != epoch);
                // An offset past the room's last is one of a history restored from a backup.
                let ahead = envelope["recovered"] == false
                    && since.zip(envelope["offset"].as_u64()).is_some_and(|(since, last)| since > last);
                if changed || ahead {
                    // Offsets of another history say nothing about this one; kept, they would hide
                    // the messages that take the same offsets now as already seen.
                    self.offsets.insert(room.clone(), 0);
                }
                self.epochs.insert(room.clone(), epoch);
                if let (Some(since), Some(false)) = (since, envelope["recovered"].as_bool()) {
                    let _ = self.events.send(ChatEvent::Gap { room, since }).await;
                }
            }
            "message" => self.on_message(&envelope).await,
            "history" => {
                if let Value::Array(messages) = envelope["messages"].take() {
                    for message in messages {
                        self.on_message(&message).await;
                    }
                }
            }
            "presence" if envelope.get("event").is_some() => {
                let member = &envelope["member"];
                let event = ChatEvent::Presence {
                    room: text("room"),
                    event: text("event"),
                    id: member["id"].as_str().unwrap_or_default().to_owned(),
                    name: member["name"].as_str().unwrap_or_default().to_owned(),
                };
                let _ = self.events.send(event).await;
            }
            "ack" => {
                let id = text("id");
                if let Some(at) = self.pending.iter().position(|p| p.id == id) {
                    let pending = self.pending.remove(at);
                    let offset = envelope["offset"].as_u64().unwrap_or(0);
                    let duplicate = envelope["duplicate"].as_bool().unwrap_or(false);
                    let _ = pending.reply.send(Ok(Ack { room: pending.room, offset, duplicate }));
                }
            }
            "error" => {
                let req = envelope["req"].as_str().unwrap_or_default();
                let at = self.pending.iter().position(|p| p.id == req)?;
                if text("code") == "unavailable" {
                    return Some(Instant::now() + self.options.retry_after);
                }
                let pending = self.pending.remove(at);
                let _ = pending.reply.send(Err(ClientError::Refused { code: text("code"), message: text("message") }));
            }
            _ => {}
        }
        None
    }

    async fn on_message(&mut self, envelope: &Value) {
        let room = envelope["room"].as_str().unwrap_or_default().to_owned();
        let Some(offset) = envelope["offset"].as_u64() else { return };
        let seen = self.offsets.entry(room.clone()).or_insert(0);
        if offset <= *seen {
            return; // had it already (a replay overlapping live delivery)
        }
        *seen = offset;
        let text = |key: &str| envelope[key].as_str().unwrap_or_default().to_owned();
        let message = ChatMessage {
            room,
            offset,
            id: envelope["id"].as_str().map(str::to_owned),
            name: text("name"),
            message: text("message"),
            time: text("time"),
        };
        let _ = self.events.send(ChatEvent::Message(message)).await;
    }
}
