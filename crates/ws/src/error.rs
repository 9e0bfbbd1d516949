//! The one error type of the tokio layer: every way a connection can fail, with the facts a user needs.

use std::io;

use switchboard_proto::handshake::{HandshakeError, ResponseError};
use switchboard_proto::{CloseCode, ProtocolError, SendError};

/// Everything that can go wrong with a WebSocket connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol; we sent it a close frame with [`ProtocolError::close_code`].
    #[error("protocol error: {0} (closed with {code})", code = .0.close_code())]
    Protocol(#[from] ProtocolError),
    /// The server refused a client's handshake (an HTTP error response was sent).
    #[error("handshake refused: {0}")]
    Handshake(#[from] HandshakeError),
    /// The server's answer to our handshake was not an acceptable 101.
    #[error("handshake failed: {error}{}", body_hint(.body))]
    Response {
        /// What was wrong with the answer.
        error: ResponseError,
        /// The start of the response body, if any (a refusal's reason).
        body: String,
    },
    /// A message could not be queued (see [`SendError`]).
    #[error("could not send: {0}")]
    Send(#[from] SendError),
    /// The connection is closed; nothing more can be sent or received.
    #[error("connection closed")]
    ConnectionClosed,
    /// The peer went away without a close handshake (reported to applications as 1006).
    #[error("connection closed abnormally, without a close handshake ({code})", code = CloseCode::ABNORMAL)]
    AbnormalClosure,
    /// Keepalive: the peer did not answer a ping in time.
    #[error("no answer to keepalive ping within {0:?}")]
    KeepaliveTimeout(std::time::Duration),
    /// The close handshake did not finish within [`Config::close_timeout`](crate::Config): the peer
    /// did not answer our close frame, or did not read it.
    #[error("close handshake did not finish within {0:?}")]
    CloseTimeout(std::time::Duration),
    /// The opening handshake took longer than [`Config::handshake_timeout`](crate::Config).
    #[error("opening handshake did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// A `ws://`, `wss://` or proxy URL that cannot be used.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The host name did not resolve.
    #[error("could not resolve {host:?}: {source}")]
    Dns {
        /// The host name.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// TCP could not connect.
    #[error("could not connect to {addr}: {source}")]
    Connect {
        /// The address tried last.
        addr: String,
        /// The socket error.
        source: io::Error,
    },
    /// Connecting (DNS, TCP, TLS, proxy) took longer than the connect timeout.
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    /// The TLS handshake with the server failed (certificate, protocol).
    #[error("TLS with {host} failed: {source}")]
    Tls {
        /// The server name.
        host: String,
        /// The TLS error.
        source: io::Error,
    },
    /// A certificate or key file could not be used.
    #[error("TLS setup from {path}: {reason}")]
    TlsConfig {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP/2 connection failed.
    #[error("HTTP/2: {0}")]
    Http2(String),
    /// The server speaks HTTP/2 but its SETTINGS did not enable extended CONNECT (RFC 8441), so it
    /// takes no WebSocket over HTTP/2. [`ClientBuilder::http2`](crate::ClientBuilder::http2) falls
    /// back to HTTP/1.1 on this.
    #[error("HTTP/2: the server did not enable WebSockets over HTTP/2 (no SETTINGS_ENABLE_CONNECT_PROTOCOL)")]
    Http2WebSocketsDisabled,
    /// The HTTP proxy refused or broke the CONNECT tunnel.
    #[error("proxy {proxy}: {reason}")]
    Proxy {
        /// The proxy, as `host:port`.
        proxy: String,
        /// What went wrong.
        reason: String,
    },
}

fn body_hint(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!("; body starts: {body:?}")
    }
}

/// This crate's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
