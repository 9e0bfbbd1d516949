//! Switchboard's server side: the programs behind the `switchboard` command.
//!
//! - [`echo`]: the plain echo server (`switchboard echo`), the Autobahn testee and simplest demo.
//! - [`connect`]: the interactive client (`switchboard connect URL`).
//! - [`bench`]: the load generator (`switchboard bench MODE URL`).
//! - [`serve`]: the chat server (`switchboard serve`): [`config`], the [`store`] of history, the [`hub`]
//!   of rooms and fan-out, one [`session`] per connection, and the wire [`protocol`]s.

pub mod auth;
pub mod bench;
pub mod config;
pub mod connect;
pub mod echo;
pub mod hub;
pub mod limits;
pub mod protocol;
pub mod serve;
pub mod session;
pub mod store;
