//! Thin adapters from a kind of connection to a chat [`crate::chat::session::Session`]: each carries
//! request text in and envelopes out, and turns the session's deadlines into timers and its
//! [`crate::chat::session::End`] into its own way of closing. Today: [`ws`], the WebSocket at `/ws`;
//! [`sse`], Server-Sent Events at `/sse` with the client publish at `/publish`; [`poll`], long
//! polling at `/poll`; [`api`], the server API under `/api`; and [`http`], the pages and routes
//! around them.

pub mod api;
pub mod http;
pub mod poll;
pub mod sse;
mod wake;
pub mod ws;
