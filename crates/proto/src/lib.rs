//! Switchboard's WebSocket protocol engine (RFC 6455), sans-I/O.
//!
//! Nothing here touches a socket, a runtime or a clock: the caller moves bytes in and out, which lets
//! the same engine run under tokio, in tests byte for byte, and under a fuzzer.
//!
//! - [`handshake`]: the opening handshake, both roles.
//! - [`frame`]: frame header coding.
//! - [`connection`]: the state machine that turns bytes into [`Message`]s and back.
//! - [`mask`], [`utf8`]: the two per-byte hot loops, exposed for benchmarks.
//! - [`close`]: close codes and frames.

pub mod close;
pub mod connection;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod message;
mod random;
pub mod utf8;

pub use close::{CloseCode, CloseFrame};
pub use connection::{CloseState, Config, Connection, ProtocolError, Role, SendError};
pub use frame::{FrameHeader, OpCode};
pub use message::{Message, Utf8Bytes};
