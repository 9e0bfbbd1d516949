//! Switchboard's server side: the programs behind the `switchboard` command.
//!
//! - [`echo`]: the plain echo server (`switchboard echo`), the Autobahn testee and simplest demo.

pub mod echo;
