//! Where history and cross-connection fan-out live: the contract between the chat core and a store.
//!
//! The chat core ([`crate::chat`]) talks to an [`Engine`] only through this module's traits and
//! types, so the embedded SQLite store ([`sqlite`]), the in-memory one ([`memory`]) and a clustered
//! one share one session, hub and publish path. The shape follows centrifuge's `Broker`:
//!
//! - [`Engine::publish`] is one atomic step per message: check the idempotency key, assign the room's
//!   next offset, append with retention, hand the message to fan-out. It resolves only after the
//!   message is durable, and the chat sends its acknowledgement only then.
//! - [`Engine::history`] reads a room after an offset; [`Engine::top`] gives the room's last offset and
//!   the history's epoch, which changes when the history was lost (a new database), so a client's
//!   old offsets are answered with `recovered: false` instead of being trusted.
//! - Committed messages reach the node's hub through the [`Deliver`] sink given to the engine when it
//!   opens, per room in offset order. [`Engine::subscribe`] and [`Engine::unsubscribe`] tell the engine
//!   which rooms this node has members in (the first local member joins, the last leaves), and a join
//!   waits for [`Engine::subscribed`] before it reads the room's top; a single-process engine
//!   delivers everything and answers at once.
//! - [`Presence`] is a trait of its own: which members a room has across nodes.
//!
//! **The contract a join relies on** (so that replay and live delivery meet with no gap and no
//! repeat): once [`Engine::subscribed`] has resolved for a room, every offset up to the one
//! [`Engine::top`] then returns can be read with [`Engine::history`], and every later offset reaches
//! the [`Deliver`] sink after that `top` returned.
//!
//! Errors are [`EngineError`], whatever the backend.

pub mod memory;
pub mod redis;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A future an engine returns, boxed so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the engine could not do what was asked. Every variant is a message for the client
/// (`unavailable`): none of them means the chat itself is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The store could not be opened at startup.
    #[error("history store {path}: {reason}")]
    Open {
        /// What was being opened (a file, an address).
        path: String,
        /// The backend's own words.
        reason: String,
    },
    /// The store was set up in a way this node cannot work with (waiting will not mend it).
    #[error("history store {path}: {reason}")]
    Misconfigured {
        /// What was being opened.
        path: String,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A write failed (a full disk, a size cap): nothing was stored.
    #[error("could not store the message: {0}")]
    Write(String),
    /// A read failed.
    #[error("history query failed: {0}")]
    Read(String),
    /// Too many publishes are queued; the client may retry.
    #[error("the store is overloaded; try again")]
    Busy,
    /// The store cannot be reached (Redis is down); nothing was done.
    #[error("the store cannot be reached: {0}")]
    Unavailable(String),
    /// A publish was sent to the store and its answer did not come (a timeout, a dropped
    /// connection): it may have been stored and delivered all the same. One with an idempotency id
    /// is safe to send again.
    #[error("the store did not answer ({0}): the message may have been stored; send it again with the same id")]
    Unanswered(String),
    /// The engine has shut down (the server is stopping).
    #[error("the store has shut down")]
    Closed,
}

impl EngineError {
    /// One word for how it failed: the `kind` label of `switchboard_engine_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Open { .. } | Self::Misconfigured { .. } => "open",
            Self::Write(_) => "write",
            Self::Read(_) => "read",
            Self::Busy => "busy",
            Self::Unavailable(_) | Self::Unanswered(_) => "unavailable",
            Self::Closed => "closed",
        }
    }
}

/// A command of the server API for one user's sessions, run by every node's hub (see
/// [`Engine::broadcast`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum UserCommand {
    /// Close each session with this code and reason.
    Disconnect { sub: String, code: u16, reason: String },
    /// Make each session a member of the room (it gets `joined`, then live messages).
    Subscribe { sub: String, room: String },
    /// Take each session out of the room (it gets `left`, reason `unsubscribed`).
    Unsubscribe { sub: String, room: String },
}

impl UserCommand {
    /// The user it is for.
    pub fn sub(&self) -> &str {
        match self {
            Self::Disconnect { sub, .. } | Self::Subscribe { sub, .. } | Self::Unsubscribe { sub, .. } => sub,
        }
    }
}

/// A message to publish, before it has an offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The room it goes to.
    pub room: String,
    /// The publisher's idempotency key: a second publish with the same key in the same room is
    /// answered with the first one's offset and stores nothing.
    pub id: Option<String>,
    /// Display name of the sender.
    pub name: String,
    /// The text.
    pub message: String,
    /// Server wall-clock time, `HH:MM:SS` (the seed protocol's field).
    pub time: String,
}

/// A committed chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The room it was published to.
    pub room: String,
    /// Its place in the room: per room, from 1, never reused.
    pub offset: u64,
    /// The publisher's idempotency key, if it gave one.
    pub id: Option<String>,
    /// Display name of the sender.
    pub name: String,
    /// The text.
    pub message: String,
    /// Server wall-clock time, `HH:MM:SS` (the seed protocol's field).
    pub time: String,
    /// Milliseconds since the Unix epoch, stamped at commit.
    pub ts_ms: i64,
}

/// What a publish came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Newly stored (and handed to fan-out).
    Stored(StoredMessage),
    /// The id was seen before: this is the message stored then; nothing new was stored or delivered.
    Duplicate(StoredMessage),
}

impl Published {
    /// The message stored, now or before.
    pub fn message(&self) -> &StoredMessage {
        match self {
            Published::Stored(m) | Published::Duplicate(m) => m,
        }
    }

    /// True for a repeated idempotency key.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Published::Duplicate(_))
    }
}

/// A publish queued in the engine, resolving once it is committed.
pub type PendingPublish = BoxFuture<'static, Result<Published, EngineError>>;

/// Where a room's history stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The room's last offset (0 when it never had a message).
    pub offset: u64,
    /// Names the history the offsets belong to; a different epoch means offsets from before are void.
    pub epoch: Arc<str>,
}

/// A slice of a room's history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Oldest first.
    pub messages: Vec<StoredMessage>,
    /// The oldest offset still retained (`last_offset + 1` when the room holds nothing).
    pub first_retained: u64,
    /// The upper bound the slice was read to.
    pub last_offset: u64,
}

/// What an engine keeps: per room, and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept per room.
    pub max_messages: u64,
    /// Age after which a message is no longer served.
    pub max_age: Option<Duration>,
    /// Largest size of the store; past it writes fail as on a full disk.
    pub max_db_bytes: Option<u64>,
}

/// The sink that committed messages are handed to: the node's hub.
pub trait Deliver: Send + Sync {
    /// Called with each committed batch, per room in offset order, never with a duplicate.
    fn deliver(&self, batch: &[StoredMessage]);

    /// A member of `room` on another node joined (`"join"`), was renamed (`"update"`) or left
    /// (`"leave"`). Only a clustered engine calls it; this node's own members are announced by the hub.
    fn presence(&self, _room: &str, _event: &str, _member: &PresenceEntry) {}

    /// `room`'s delivery cannot go on where it stood: its history was lost (a new epoch) or the
    /// messages that would close a gap are no longer retained. The hub lets go of the room's members,
    /// which rejoin with what they last saw and are told what was recovered.
    fn reset(&self, _room: &str) {}

    /// Runs a server-API command for one user's sessions on this node; how many it applied to.
    fn command(&self, _command: &UserCommand) -> BoxFuture<'_, usize> {
        Box::pin(std::future::ready(0))
    }
}

/// History, offsets, idempotency and fan-out of committed messages.
pub trait Engine: Send + Sync + 'static {
    /// Queues `message` at once (so messages of one publisher keep their order) and returns what
    /// resolves when it is committed, or found to be a duplicate.
    fn publish(&self, message: NewMessage) -> Result<PendingPublish, EngineError>;

    /// Messages of `room` with offsets in `(after, up_to]`, oldest first, at most `limit` of the newest.
    /// Messages past the retention age are never returned.
    fn history(&self, room: &str, after: u64, up_to: u64, limit: usize) -> BoxFuture<'_, Result<History, EngineError>>;

    /// The room's last committed offset and the history's epoch.
    fn top(&self, room: &str) -> BoxFuture<'_, Result<Position, EngineError>>;

    /// This node has a member in `room` now (its first local member joined). Called under the hub's
    /// lock, in the order rooms fill and empty: it must not block, and must not call into the hub or
    /// take a lock the engine holds while it delivers (a networked engine queues the change). The
    /// default is for an engine in one process, which delivers every commit anyway.
    fn subscribe(&self, _room: &str) {}

    /// This node's last member of `room` left; called as [`Engine::subscribe`] is.
    fn unsubscribe(&self, _room: &str) {}

    /// Resolves once `room`'s committed messages are being delivered to this node (after
    /// [`Engine::subscribe`]); a join waits for it before it reads [`Engine::top`]. At once by default.
    fn subscribed(&self, _room: &str) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Sends a server-API `command` (already run by this node's hub) to every other node's hub;
    /// whether there are other nodes to send to. One process: nothing to send, by default.
    fn broadcast(&self, _command: &UserCommand) -> BoxFuture<'_, Result<bool, EngineError>> {
        Box::pin(std::future::ready(Ok(false)))
    }

    /// The nodes of the chat that are alive (their ids), this one's included; empty when the engine
    /// serves one process only.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<String>, EngineError>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// Removes every retained message of `room` (and with them their idempotency keys); returns how
    /// many. Offsets go on from where they were, so a client resuming from before the removal is
    /// told `recovered: false`, as when retention trimmed its messages.
    fn remove_history(&self, room: &str) -> BoxFuture<'_, Result<u64, EngineError>>;

    /// Commits what is queued and stops; publishes after this fail with [`EngineError::Closed`].
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// One member of a room, as presence lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEntry {
    /// Unique across nodes (the node's id and a number).
    pub id: String,
    /// Display name.
    pub name: String,
}

/// Which members a room has, across every node that serves it. The hub keeps its own members' names
/// (for presence events); this is the list a `presence` request and a `joined` answer show.
pub trait Presence: Send + Sync + 'static {
    /// Records `member` in `room` (again, to change its name). Called under the hub's lock, as
    /// [`Engine::subscribe`] is: it must not block (a networked presence queues the change).
    fn add(&self, room: &str, member: PresenceEntry);
    /// Removes a member from `room`; called as [`Presence::add`] is.
    fn remove(&self, room: &str, id: &str);
    /// Up to `limit` members of `room`, and whether there were more.
    fn list(&self, room: &str, limit: usize) -> BoxFuture<'_, Result<(Vec<PresenceEntry>, bool), EngineError>>;
}

/// Milliseconds since the Unix epoch now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Messages stamped before this (ms since the epoch) are past retention; 0 when age is unlimited.
pub(crate) fn age_cutoff_ms(max_age: Option<Duration>) -> i64 {
    max_age
        .and_then(|age| SystemTime::now().checked_sub(age))
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// A fresh epoch: random, so two histories never share one.
pub(crate) fn new_epoch() -> String {
    epoch_text(random_u64())
}

/// 64 random bits (the clock's milliseconds if the system has no randomness to give).
pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap_or_else(|_| bytes = now_ms().to_le_bytes());
    u64::from_le_bytes(bytes)
}

/// An epoch as clients see it: 16 hex digits.
pub(crate) fn epoch_text(bits: u64) -> String {
    format!("{bits:016x}")
}
