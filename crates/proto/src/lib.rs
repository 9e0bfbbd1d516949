//! Switchboard's WebSocket protocol engine (RFC 6455), sans-I/O.
//!
//! Nothing here touches a socket, a runtime or a clock: the caller moves bytes in and out, which lets
//! the same engine run under tokio, in tests byte for byte, and under a fuzzer.
//!
//! - [`handshake`]: the opening handshake, both roles.
//! - [`frame`]: frame header coding.
//! - [`connection`]: the state machine that turns bytes into [`Message`]s and back.
//! - [`deflate`]: permessage-deflate (RFC 7692), negotiation and compression.
//! - [`close`]: close codes and frames.
//!
//! The two per-byte hot loops, masking and UTF-8 validation, are internal. The cargo feature
//! `internals` makes their modules (`mask`, `utf8`) public for the benchmarks and fuzz targets, with
//! no stability promise; [`frame::mask_payload`] is the supported way to mask a payload.

#![warn(missing_docs)]

pub mod close;
pub mod connection;
pub mod deflate;
pub mod frame;
pub mod handshake;
#[cfg(feature = "internals")]
pub mod mask;
#[cfg(not(feature = "internals"))]
mod mask;
pub mod message;
mod random;
#[cfg(feature = "internals")]
pub mod utf8;
#[cfg(not(feature = "internals"))]
mod utf8;

pub use close::{CloseCode, CloseFrame};
pub use connection::{CloseState, Config, Connection, ProtocolError, Role, SendError};
pub use frame::{FrameHeader, OpCode};
pub use message::{InvalidUtf8, Message, Utf8Bytes};
