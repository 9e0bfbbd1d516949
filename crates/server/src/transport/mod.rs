//! Thin adapters from a kind of connection to a chat [`crate::chat::session::Session`]: each carries
//! request text in and envelopes out, and turns the session's deadlines into timers and its
//! [`crate::chat::session::End`] into its own way of closing. Today: [`ws`], the WebSocket at `/ws`,
//! and [`http`], the pages and HTTP APIs beside it.

pub mod http;
pub mod ws;
