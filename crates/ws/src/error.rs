//! The one error type of the tokio layer: every way a connection can fail, with the facts a user needs.

use std::io;

use switchboard_proto::handshake::{HandshakeError, ResponseError};
use switchboard_proto::{CloseCode, ProtocolError, SendError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    Response { error: ResponseError, body: String },
    #[error("could not send: {0}")]
    Send(#[from] SendError),
    /// The connection is closed; nothing more can be sent or received.
    #[error("connection closed")]
    ConnectionClosed,
    /// The peer went away without a close handshake (reported to applications as 1006).
    #[error("connection closed abnormally, without a close handshake ({code})", code = CloseCode::ABNORMAL)]
    AbnormalClosure,
    #[error("no answer to keepalive ping within {0:?}")]
    KeepaliveTimeout(std::time::Duration),
    #[error("opening handshake did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("could not resolve {host:?}: {source}")]
    Dns { host: String, source: io::Error },
    #[error("could not connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("TLS with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    #[error("TLS setup from {path}: {reason}")]
    TlsConfig { path: String, reason: String },
    #[error("proxy {proxy}: {reason}")]
    Proxy { proxy: String, reason: String },
}

fn body_hint(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!("; body starts: {body:?}")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
