//! Server side: the opening handshake over a raw stream, with an optional decision callback.

use bytes::BytesMut;
use switchboard_proto::deflate::DeflateParams;
use switchboard_proto::handshake::{self, HandshakeError, ServerSettings, UpgradeRequest};
use switchboard_proto::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::socket::WebSocket;

/// What the application answers to an acceptable request.
#[derive(Debug, Clone, Default)]
pub struct Accept {
    /// The subprotocol to select; it must be one the client offered.
    pub protocol: Option<String>,
    /// Extra response headers (Set-Cookie, ...).
    pub headers: Vec<(String, String)>,
}

impl Accept {
    /// Selects the first of `supported` (the server's preference order) that the client offered.
    pub fn negotiate(request: &UpgradeRequest, supported: &[&str]) -> Self {
        let protocol = handshake::negotiate_subprotocol(request.protocols(), supported).map(str::to_owned);
        Self { protocol, headers: Vec::new() }
    }
}

/// A refusal with an HTTP error status (400 to 599; any other is answered as 500) and a reason the
/// client will see in the body. Headers go with it through
/// [`HandshakeError::with_header`]: `reject(401, "a token is required").with_header("WWW-Authenticate", "Bearer")`.
pub fn reject(status: u16, reason: impl Into<String>) -> HandshakeError {
    HandshakeError::rejected(status, reason)
}

/// Accepts every valid WebSocket handshake on `io`.
pub async fn accept<S>(io: S, config: Config) -> Result<WebSocket<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_with(io, config, |_| Ok(Accept::default())).await
}

/// Reads and validates the handshake, lets `decide` look at the request (path, origin, headers,
/// offered subprotocols) and accept or refuse it, and answers. Invalid or refused requests get an HTTP
/// error response with the reason, and the error is returned.
pub async fn accept_with<S, F>(mut io: S, config: Config, decide: F) -> Result<WebSocket<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&UpgradeRequest) -> Result<Accept, HandshakeError>,
{
    let limit = config.handshake_timeout;
    match tokio::time::timeout(limit, handshake(&mut io, &config, decide)).await {
        Ok(Ok((protocol, deflate, leftover))) => {
            Ok(WebSocket::from_raw_with_deflate(io, Role::Server, config, &leftover, deflate).with_protocol(protocol))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::HandshakeTimeout(limit)),
    }
}

/// The subprotocol and deflate parameters agreed on, and the bytes read past the request head.
type Handshaken = (Option<String>, Option<DeflateParams>, BytesMut);

async fn handshake<S, F>(io: &mut S, config: &Config, decide: F) -> Result<Handshaken>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&UpgradeRequest) -> Result<Accept, HandshakeError>,
{
    let mut buf = BytesMut::with_capacity(1024);
    let (head, used) = loop {
        match handshake::parse_request(&buf, config.max_head_bytes) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) => {}
            Err(e) => return refuse(io, e).await,
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    };
    let request = match handshake::validate_request(head) {
        Ok(request) => request,
        Err(e) => return refuse(io, e).await,
    };
    let accepted = match decide(&request) {
        Ok(accepted) => accepted,
        Err(e) => return refuse(io, e).await,
    };
    if let Some(p) = &accepted.protocol {
        if !request.protocols().iter().any(|o| o == p) {
            return refuse(io, reject(500, format!("server selected unoffered subprotocol {p:?}"))).await;
        }
    }
    let protocols: Vec<&str> = accepted.protocol.as_deref().into_iter().collect();
    let settings = ServerSettings { protocols: &protocols, compression: config.compression.as_ref() };
    let negotiated = match handshake::negotiate(&request.offer, &settings) {
        Ok(negotiated) => negotiated,
        Err(e) => return refuse(io, e).await,
    };
    let mut response = negotiated.http1_response();
    for (name, value) in &accepted.headers {
        if !response.push_header(name.as_str(), value.as_str()) {
            tracing::debug!(name, "dropping an invalid response header");
        }
    }
    io.write_all(&response.to_http1()).await?;
    io.flush().await?;
    let _ = buf.split_to(used);
    Ok((negotiated.protocol, negotiated.deflate, buf))
}

async fn refuse<S: AsyncWrite + Unpin, T>(io: &mut S, error: HandshakeError) -> Result<T> {
    tracing::debug!(status = error.status(), %error, "refusing WebSocket handshake");
    // The client may already be gone; the refusal is what matters to the caller.
    let _ = io.write_all(&error.to_response()).await;
    let _ = io.shutdown().await;
    Err(Error::Handshake(error))
}
