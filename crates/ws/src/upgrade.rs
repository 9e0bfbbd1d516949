//! Upgrading a hyper 1 request, so one port serves HTTP pages and WebSockets: an HTTP/1.1
//! `GET` with `Upgrade: websocket` (answered 101), or an HTTP/2 extended CONNECT with
//! `:protocol = websocket` (RFC 8441, answered 200; the server's HTTP/2 connection must enable it,
//! `hyper::server::conn::http2::Builder::enable_connect_protocol`). Either way the WebSocket runs on
//! what hyper hands over: the connection, or the HTTP/2 stream.
//!
//! Validation, negotiation and the answer are the engine's own
//! ([`switchboard_proto::handshake::validate_request`], [`switchboard_proto::handshake::negotiate`],
//! [`switchboard_proto::handshake::HandshakeResponse`]); this module only converts the answer into an
//! `http::Response`. hyper hands over the connection after the 101 goes out.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use http_body_util::{Empty, Full};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use switchboard_proto::handshake::{
    self, HandshakeError, HandshakeResponse, Head, Header, Offer, ServerSettings, UpgradeRequest,
};
use switchboard_proto::Role;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::socket::WebSocket;

/// A WebSocket over a hyper upgraded connection.
pub type UpgradedWebSocket = WebSocket<TokioIo<Upgraded>>;

/// Resolves to the WebSocket once hyper has sent the 101 and handed over the connection.
pub type UpgradeFuture = Pin<Box<dyn Future<Output = Result<UpgradedWebSocket>> + Send>>;

/// The `:protocol` of an HTTP/2 extended CONNECT that opens a WebSocket.
const WEBSOCKET_PROTOCOL: &str = "websocket";

/// True when the request asks for a WebSocket (`Upgrade: websocket`, or an HTTP/2 CONNECT naming
/// a `:protocol`), valid or not.
pub fn is_upgrade_request<B>(request: &http::Request<B>) -> bool {
    if request.method() == Method::CONNECT && request.extensions().get::<hyper::ext::Protocol>().is_some() {
        return true;
    }
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
    http2: bool,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade")
            .field("request", &self.request)
            .field("protocol", &self.protocol)
            .field("http2", &self.http2)
            .finish()
    }
}

impl Upgrade {
    /// Validates `request` as a WebSocket handshake and takes its upgrade handle.
    pub fn new<B>(request: &mut http::Request<B>) -> Result<Self, HandshakeError> {
        let on_upgrade = hyper::upgrade::on(&mut *request);
        let protocol = request.extensions().get::<hyper::ext::Protocol>();
        Self::from_parts(request.method(), request.uri(), request.version(), request.headers(), protocol, on_upgrade)
    }

    pub(crate) fn from_parts(
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
        connect_protocol: Option<&hyper::ext::Protocol>,
        on_upgrade: OnUpgrade,
    ) -> Result<Self, HandshakeError> {
        let mut head = Head {
            method: method.as_str().to_owned(),
            target: uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into()),
            status: 0,
            version: if version == Version::HTTP_10 || version == Version::HTTP_09 { 0 } else { 1 },
            headers: engine_headers(headers),
        };
        let upgrade = |request, http2| Self { request, on_upgrade, config: Config::default(), protocol: None, http2 };
        if method != Method::CONNECT {
            return Ok(upgrade(handshake::validate_request(head)?, false));
        }
        // RFC 8441 §4: the HTTP/2 layer has checked the pseudo-headers; the protocol is ours to check.
        match connect_protocol.map(hyper::ext::Protocol::as_str) {
            Some(WEBSOCKET_PROTOCOL) => {}
            Some(other) => return Err(crate::reject(501, format!("unknown :protocol {other:?}"))),
            None => return Err(crate::reject(405, "CONNECT without :protocol")),
        }
        // `:authority` stands for `Host` (RFC 9113 §8.3.1), so the request reads the same either way.
        if let Some(authority) = uri.authority().filter(|_| !headers.contains_key(http::header::HOST)) {
            head.headers.push(Header { name: "host".into(), value: authority.as_str().as_bytes().to_vec() });
        }
        // There is no key over HTTP/2; one sent anyway is ignored, as RFC 8441 §5 has no use for it.
        let offer = Offer { key: None, ..Offer::from_head(&head) };
        offer.validate()?;
        Ok(upgrade(UpgradeRequest { head, offer }, true))
    }

    /// True for an HTTP/2 extended CONNECT (answered 200 on its stream), false for an HTTP/1.1
    /// upgrade (answered 101).
    pub fn is_http2(&self) -> bool {
        self.http2
    }

    /// The request: path, query, origin, headers, offered subprotocols.
    pub fn request(&self) -> &UpgradeRequest {
        &self.request
    }

    /// Selects the first of `supported` that the client offered.
    pub fn protocols(mut self, supported: &[&str]) -> Self {
        self.protocol = handshake::negotiate_subprotocol(self.request.protocols(), supported).map(str::to_owned);
        self
    }

    /// The connection's settings (limits, keepalive, compression).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The subprotocol that will be answered.
    pub fn selected_protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The response to return to hyper (101, or 200 over HTTP/2), and the future that yields the
    /// WebSocket.
    pub fn into_response(self) -> (http::Response<Empty<Bytes>>, UpgradeFuture) {
        let Self { request, on_upgrade, config, protocol, http2 } = self;
        let protocols: Vec<&str> = protocol.as_deref().into_iter().collect();
        let settings = ServerSettings { protocols: &protocols, compression: config.compression.as_ref() };
        let negotiated =
            handshake::negotiate(&request.offer, &settings).expect("the offer was validated by validate_request");
        let model = if http2 { negotiated.http2_response() } else { negotiated.http1_response() };
        let response = http_response(&model).map(|()| Empty::new());
        let (protocol, params) = (negotiated.protocol, negotiated.deflate);
        let future = Box::pin(async move {
            let upgraded = on_upgrade.await.map_err(|e| Error::Io(std::io::Error::other(e)))?;
            let io = TokioIo::new(upgraded);
            Ok(WebSocket::from_raw_with_deflate(io, Role::Server, config, &[], params).with_protocol(protocol))
        });
        (response, future)
    }
}

/// An `http` header map as the engine's header lines, in order.
pub(crate) fn engine_headers(headers: &HeaderMap) -> Vec<Header> {
    headers
        .iter()
        .map(|(name, value)| Header { name: name.as_str().to_owned(), value: value.as_bytes().to_vec() })
        .collect()
}

/// The engine's response model as an `http::Response`: same status, same headers in order. The model
/// only holds valid names and values, so nothing is lost; the body is the caller's to attach.
fn http_response(model: &HandshakeResponse) -> http::Response<()> {
    let mut response = http::Response::new(());
    *response.status_mut() = StatusCode::from_u16(model.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in model.headers() {
        match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value.as_bytes())) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::debug!(name, "dropping a response header http cannot carry"),
        }
    }
    response
}

/// The HTTP answer for a refused handshake ([`HandshakeError::response`]): its status, the reason as
/// the body, and the `Sec-WebSocket-Version` header for version mismatches.
pub fn refusal_response(error: &HandshakeError) -> http::Response<Full<Bytes>> {
    let model = error.response();
    http_response(&model).map(|()| Full::new(Bytes::from(model.body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::deflate::DeflateConfig;

    fn request(version: &str) -> http::Request<()> {
        http::Request::builder()
            .uri("/chat?room=1")
            .header("Host", "example.com")
            .header("Upgrade", "websocket")
            .header("Connection", "Upgrade")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("Sec-WebSocket-Version", version)
            .header("Sec-WebSocket-Protocol", "chat, superchat")
            .header("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")
            .body(())
            .unwrap()
    }

    #[test]
    fn the_101_is_the_engines_response_model() {
        let mut req = request("13");
        let upgrade = Upgrade::new(&mut req).unwrap().protocols(&["superchat"]);
        let compression = DeflateConfig { server_max_window_bits: 10, ..DeflateConfig::default() };
        let (response, _future) = upgrade.config(Config::default().compression(compression.clone())).into_response();
        // The same negotiation, straight from the engine.
        let offer = handshake::validate_request(Head {
            method: "GET".into(),
            target: "/chat".into(),
            version: 1,
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| Header { name: n.as_str().into(), value: v.as_bytes().to_vec() })
                .collect(),
            ..Head::default()
        })
        .unwrap()
        .offer;
        let settings = ServerSettings { protocols: &["superchat"], compression: Some(&compression) };
        let model = handshake::negotiate(&offer, &settings).unwrap().http1_response();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let got: Vec<(String, String)> =
            response.headers().iter().map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned())).collect();
        let expected: Vec<(String, String)> =
            model.headers().iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
        assert_eq!(got, expected);
        assert_eq!(response.headers()["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(response.headers()["sec-websocket-protocol"], "superchat");
        assert_eq!(response.headers()["sec-websocket-extensions"], "permessage-deflate; server_max_window_bits=10");
    }

    #[test]
    fn refusals_keep_status_headers_and_reason() {
        let error = Upgrade::new(&mut request("8")).unwrap_err();
        let response = refusal_response(&error);
        assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(response.headers()["sec-websocket-version"], "13");
        assert_eq!(response.headers()[http::header::UPGRADE], "websocket");
        assert_eq!(response.headers()[http::header::CONTENT_TYPE], "text/plain; charset=utf-8");
        let body = response.into_body();
        let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body)).unwrap().unwrap();
        assert_eq!(bytes.to_bytes(), format!("{error}\n"));
    }
}
