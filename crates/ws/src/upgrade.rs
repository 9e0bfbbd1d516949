//! Upgrading a hyper 1 request, so one port serves HTTP pages and WebSockets.
//!
//! Validation is the engine's own ([`switchboard_proto::handshake::validate_request`]); hyper only
//! hands over the connection after the 101 goes out.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use http_body_util::{Empty, Full};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use switchboard_proto::handshake::{self, HandshakeError, Head, Header, UpgradeRequest};
use switchboard_proto::Role;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::socket::WebSocket;

/// A WebSocket over a hyper upgraded connection.
pub type UpgradedWebSocket = WebSocket<TokioIo<Upgraded>>;

/// Resolves to the WebSocket once hyper has sent the 101 and handed over the connection.
pub type UpgradeFuture = Pin<Box<dyn Future<Output = Result<UpgradedWebSocket>> + Send>>;

/// True when the request asks for a WebSocket (`Upgrade: websocket`), valid or not.
pub fn is_upgrade_request<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
}

/// A validated upgrade request, not yet answered.
pub struct Upgrade {
    request: UpgradeRequest,
    on_upgrade: OnUpgrade,
    config: Config,
    protocol: Option<String>,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade").field("request", &self.request).field("protocol", &self.protocol).finish()
    }
}

impl Upgrade {
    /// Validates `request` as a WebSocket handshake and takes its upgrade handle.
    pub fn new<B>(request: &mut http::Request<B>) -> Result<Self, HandshakeError> {
        let on_upgrade = hyper::upgrade::on(&mut *request);
        Self::from_parts(request.method(), request.uri(), request.version(), request.headers(), on_upgrade)
    }

    pub(crate) fn from_parts(
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
        on_upgrade: OnUpgrade,
    ) -> Result<Self, HandshakeError> {
        let head = Head {
            method: method.as_str().to_owned(),
            target: uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into()),
            status: 0,
            version: if version == Version::HTTP_10 || version == Version::HTTP_09 { 0 } else { 1 },
            headers: headers
                .iter()
                .map(|(name, value)| Header { name: name.as_str().to_owned(), value: value.as_bytes().to_vec() })
                .collect(),
        };
        let request = handshake::validate_request(head)?;
        Ok(Self { request, on_upgrade, config: Config::default(), protocol: None })
    }

    /// The request: path, query, origin, headers, offered subprotocols.
    pub fn request(&self) -> &UpgradeRequest {
        &self.request
    }

    /// Selects the first of `supported` that the client offered.
    pub fn protocols(mut self, supported: &[&str]) -> Self {
        self.protocol = handshake::negotiate_subprotocol(&self.request.protocols, supported).map(str::to_owned);
        self
    }

    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The subprotocol that will be answered.
    pub fn selected_protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The 101 response to return to hyper, and the future that yields the WebSocket.
    pub fn into_response(self) -> (http::Response<Empty<Bytes>>, UpgradeFuture) {
        let deflate = crate::accept::negotiate_deflate(&self.request, &self.config);
        let mut response = http::Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, "websocket")
            .header("Sec-WebSocket-Accept", handshake::accept_key(&self.request.key));
        if let Some(protocol) = &self.protocol {
            response = response.header("Sec-WebSocket-Protocol", protocol.as_str());
        }
        if let Some((_, header)) = &deflate {
            response = response.header("Sec-WebSocket-Extensions", header.as_str());
        }
        let response = response.body(Empty::new()).expect("static headers are valid");
        let Self { on_upgrade, config, protocol, .. } = self;
        let params = deflate.map(|(params, _)| params);
        let future = Box::pin(async move {
            let upgraded = on_upgrade.await.map_err(|e| Error::Io(std::io::Error::other(e)))?;
            let io = TokioIo::new(upgraded);
            Ok(WebSocket::from_raw_with_deflate(io, Role::Server, config, &[], params).with_protocol(protocol))
        });
        (response, future)
    }
}

/// The HTTP answer for a refused handshake: its status, the reason as the body, and the
/// `Sec-WebSocket-Version` header for version mismatches.
pub fn refusal_response(error: &HandshakeError) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::builder()
        .status(StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST))
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8");
    match error {
        HandshakeError::UnsupportedVersion(_) | HandshakeError::MissingVersion => {
            response = response.header("Sec-WebSocket-Version", handshake::WEBSOCKET_VERSION);
        }
        HandshakeError::Method(_) => response = response.header(http::header::ALLOW, "GET"),
        _ => {}
    }
    response.body(Full::new(Bytes::from(format!("{error}\n")))).expect("static headers are valid")
}
