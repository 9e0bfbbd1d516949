//! The chat: the product's core, free of any transport and any store.
//!
//! A [`session::Session`] is one client's conversation as a state machine: request text in,
//! envelopes out, deadlines out. It reads the time from a [`message::Clock`], publishes and reads
//! history through the [`crate::engine::Engine`] traits, and receives fan-out through its
//! [`hub::Outbox`]. Nothing here names a socket, HTTP, axum or SQLite: a transport
//! ([`crate::transport`]) carries text to and from a session, and the tests drive sessions with no
//! transport at all. The one type from below is `Utf8Bytes`, the protocol crate's validated text
//! buffer: fan-out encodes a message once and shares those bytes into every member's frames.

pub mod access;
pub mod hub;
pub mod limits;
pub mod message;
pub mod publish;
pub mod session;
pub mod wire;

use std::sync::Arc;

use access::Access;
use hub::Hub;
use limits::SessionLimits;
use message::Clock;

use crate::engine::Engine;

/// What every session of a server shares.
pub struct Core {
    /// This node's rooms and fan-out.
    pub hub: Arc<Hub>,
    /// History, offsets and publish.
    pub engine: Arc<dyn Engine>,
    /// Tokens, grants, origins, the API key.
    pub access: Arc<Access>,
    /// What one session may do.
    pub limits: SessionLimits,
    /// Where sessions read the time.
    pub clock: Arc<dyn Clock>,
}
