//! The other commands: [`echo`] (an echo server, the Autobahn testee), [`connect`] (an interactive
//! client, like websocat) and [`bench`](mod@bench) (a load generator for any WebSocket server).

pub mod bench;
pub mod connect;
pub mod echo;
