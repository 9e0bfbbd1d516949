//! Switchboard's tokio WebSocket library, on the sans-I/O engine of `switchboard-proto`.
//!
//! - Server: [`accept`] / [`accept_with`] on any `AsyncRead + AsyncWrite` stream; [`upgrade`] for
//!   hyper 1 and (feature `axum`) an axum extractor, so pages and WebSockets share a port, over
//!   HTTP/1.1 or HTTP/2 (RFC 8441).
//! - Client: [`connect`] and [`ClientBuilder`] (`ws://` and `wss://`, HTTP proxies via CONNECT,
//!   WebSockets over HTTP/2 with [`ClientBuilder::http2`] and [`http2::Http2Connection`]), or
//!   [`client_handshake`] over a stream you opened.
//! - [`WebSocket`]: `recv`/`send`/`close`, `split` into halves for two tasks (`reunite` puts them
//!   back), `Stream`/`Sink`.
//! - [`Config`]: limits, keepalive, backpressure high-water mark, close and handshake timeouts.
//!
//! ```no_run
//! # async fn run() -> Result<(), switchboard_ws::Error> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9002").await?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     tokio::spawn(async move {
//!         let Ok(mut ws) = switchboard_ws::accept(stream, Default::default()).await else { return };
//!         while let Some(Ok(message)) = ws.recv().await {
//!             if message.is_text() || message.is_binary() {
//!                 if ws.send(message).await.is_err() { break; }
//!             }
//!         }
//!     });
//! }
//! # }
//! ```

#![warn(missing_docs)]

mod accept;
#[cfg(feature = "axum")]
pub mod axum;
mod buffers;
mod client;
mod config;
mod core;
mod error;
#[cfg(feature = "hyper")]
pub mod http2;
pub mod proxy;
mod socket;
pub mod tls;
#[cfg(feature = "hyper")]
pub mod upgrade;
mod url;

pub use accept::{accept, accept_with, reject, Accept};
pub use client::{client_handshake, connect, ClientBuilder};
pub use config::{Config, Keepalive};
pub use error::{Error, Result};
pub use proxy::Proxy;
pub use socket::{ReuniteError, WebSocket, WsReader, WsWriter};
pub use tls::ClientStream;
pub use url::WsUrl;

pub use bytes::Bytes;
pub use switchboard_proto as proto;
pub use switchboard_proto::deflate::DeflateConfig;
pub use switchboard_proto::handshake::{Accepted, UpgradeRequest};
pub use switchboard_proto::{CloseCode, CloseFrame, CloseState, Message, ProtocolError, Role, Utf8Bytes};
