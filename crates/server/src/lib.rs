//! Switchboard's server side: the programs behind the `switchboard` command.
//!
//! - [`echo`]: the plain echo server (`switchboard echo`), the Autobahn testee and simplest demo.
//! - [`connect`]: the interactive client (`switchboard connect URL`).

pub mod connect;
pub mod echo;
