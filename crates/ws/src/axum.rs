//! An axum extractor for WebSocket upgrades on the switchboard engine, over HTTP/1.1 (`GET`, 101) or
//! HTTP/2 (extended CONNECT, 200; route it with `get(handler).connect(handler)` or `any(handler)`).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use switchboard_ws::axum::WebSocketUpgrade;
//!
//! let app: Router = Router::new().route("/ws", get(|ws: WebSocketUpgrade| async move {
//!     ws.on_upgrade(|mut socket| async move {
//!         // Pings are answered and the close handshake is finished by `recv` itself: echo data only.
//!         while let Some(Ok(message)) = socket.recv().await {
//!             if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
//!                 break;
//!             }
//!         }
//!     })
//! }));
//! ```

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use hyper::upgrade::OnUpgrade;
use switchboard_proto::handshake::{HandshakeError, UpgradeRequest};

use crate::config::Config;
use crate::upgrade::{refusal_response, Upgrade, UpgradedWebSocket};

/// Extracts a valid WebSocket upgrade request; invalid ones are answered with the engine's refusal
/// (400, 405, 426 with `Sec-WebSocket-Version: 13`).
pub struct WebSocketUpgrade {
    inner: Upgrade,
}

/// The refusal of an invalid upgrade request.
#[derive(Debug)]
pub struct WebSocketRejection(pub HandshakeError);

impl IntoResponse for WebSocketRejection {
    fn into_response(self) -> Response {
        refusal_response(&self.0).map(axum::body::Body::new)
    }
}

impl<St: Send + Sync> FromRequestParts<St> for WebSocketUpgrade {
    type Rejection = WebSocketRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &St) -> Result<Self, Self::Rejection> {
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or_else(|| WebSocketRejection(crate::reject(426, "connection cannot be upgraded")))?;
        let protocol = parts.extensions.get::<hyper::ext::Protocol>();
        let inner = Upgrade::from_parts(&parts.method, &parts.uri, parts.version, &parts.headers, protocol, on_upgrade)
            .map_err(WebSocketRejection)?;
        Ok(Self { inner })
    }
}

impl WebSocketUpgrade {
    /// The request: path, query, origin, headers, offered subprotocols.
    pub fn request(&self) -> &UpgradeRequest {
        self.inner.request()
    }

    /// True for an HTTP/2 extended CONNECT (RFC 8441), false for an HTTP/1.1 upgrade.
    pub fn is_http2(&self) -> bool {
        self.inner.is_http2()
    }

    /// Selects the first of `supported` that the client offered.
    pub fn protocols(self, supported: &[&str]) -> Self {
        Self { inner: self.inner.protocols(supported) }
    }

    /// The connection's settings (limits, keepalive, compression).
    pub fn config(self, config: Config) -> Self {
        Self { inner: self.inner.config(config) }
    }

    /// Answers 101 and runs `callback` with the socket on a new task.
    pub fn on_upgrade<F, Fut>(self, callback: F) -> Response
    where
        F: FnOnce(UpgradedWebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (response, upgrade) = self.inner.into_response();
        // The connection runs on a task of its own, spawned once the upgrade is done: that task is
        // then the callback's future alone. Awaiting it here instead would keep the finished upgrade
        // and the spent callback in the task for the connection's whole life.
        tokio::spawn(async move {
            match upgrade.await {
                Ok(socket) => drop(tokio::spawn(callback(socket))),
                Err(error) => tracing::debug!(%error, "WebSocket upgrade failed"),
            }
        });
        response.map(axum::body::Body::new)
    }
}
