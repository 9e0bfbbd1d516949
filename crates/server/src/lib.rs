//! Switchboard's server side: the programs behind the `switchboard` command.
//!
//! Imports run down only: [`tools`] and [`transport`] use [`chat`]; [`chat`] uses the [`engine`]
//! traits; nothing in [`chat`] knows a socket, HTTP or SQLite (see `docs/architecture.md`).
//!
//! - [`chat`]: the transport-free core: sessions as state machines, wire types, the hub, publish,
//!   access, limits.
//! - [`engine`]: history and fan-out behind traits: [`engine::sqlite`] (the embedded default),
//!   [`engine::redis`] (cluster mode) and [`engine::memory`].
//! - [`transport`]: the WebSocket at `/ws` and the HTTP routes beside it.
//! - [`serve`]: wiring for `switchboard serve`; [`listen`]: the accept loop, TLS and admission shared
//!   with `echo`; [`proxied`]: client addresses behind proxies (forwarding headers, the PROXY
//!   protocol); [`config`]: settings by component; [`cli`]: every command's arguments.
//! - [`client`]: a chat client for Rust programs, with reconnect, resume and several nodes.
//! - [`tools`]: `echo` (the Autobahn testee), `connect` (an interactive client), `bench` (a load
//!   generator).

pub mod chat;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod listen;
pub mod metrics;
pub mod proxied;
pub mod serve;
pub mod tools;
pub mod transport;
