//! The HTTP side of `serve`: HTTP/1.1 on each admitted connection ([`HttpHandler`]), and the routes:
//! the page at `/`, its client module at `/switchboard.js`, the WebSocket
//! route at `/ws` (see [`super::ws`]), the publish API at `/api/publish`, and `/healthz` and
//! `/metrics` for operators. HTTP API errors are JSON bodies with the chat's error codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::tls::TlsAcceptor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::ws::{self, WsState};
use crate::chat::publish::{self, validate_publish};
use crate::chat::wire::{ApiAck, ApiAnswer, ErrorCode};
use crate::listen::{self, Admitted, ConnectionLimiter, Handler};

/// The chat page and the browser client module, built into the binary.
const INDEX_HTML: &str = include_str!("../../../../web/index.html");
const CLIENT_JS: &str = include_str!("../../../../web/switchboard.js");

/// What the routes share.
#[derive(Clone)]
pub struct AppState {
    /// The WebSocket route's state (and through it, the chat).
    pub ws: WsState,
    /// Open connections, for `/metrics`.
    pub connections: Arc<ConnectionLimiter>,
}

/// Every route of `serve`; request bodies are capped at `max_body` bytes.
pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route(
            "/switchboard.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], CLIENT_JS) }),
        )
        .route("/ws", get(websocket))
        .route("/api/publish", post(api_publish).layer(DefaultBodyLimit::max(max_body)))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn websocket(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    ws::upgrade(state.ws, upgrade).await
}

/// A plain-text refusal; a 401 names the scheme it wants.
pub fn refuse(status: StatusCode, reason: String) -> Response {
    let mut response = (status, format!("{reason}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    response
}

/// The token of an `Authorization: Bearer TOKEN` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(|c: char| c.is_ascii_whitespace())?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Tokens are URL-safe already; decoding `%XX` lets clients that escape everything work too.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `POST /api/publish` with `{"room" | "rooms", "message", "name"?, "id"?}`: stores and delivers as a
/// WebSocket publish does, and answers with the acknowledgements.
async fn api_publish(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let core = &state.ws.core;
    if core.access.api_key.is_none() {
        return refuse(StatusCode::NOT_FOUND, "the publish API is off: start the server with --api-key".into());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    if !presented.is_some_and(|key| core.access.api_key_matches(key)) {
        return refuse(StatusCode::UNAUTHORIZED, "a valid API key is required (Authorization: Bearer KEY)".into());
    }
    let error = |status: StatusCode, code: ErrorCode, message: String| {
        json_response(status, ApiAnswer::Error { code, message: &message }.encode())
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, ErrorCode::BadJson, format!("not JSON: {e}")),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ApiPublish {
        #[serde(default)]
        room: Option<String>,
        #[serde(default)]
        rooms: Option<Vec<String>>,
        message: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        id: Option<String>,
    }
    let request: ApiPublish = match serde_json::from_value(request) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string()),
    };
    let rooms = request.room.into_iter().chain(request.rooms.unwrap_or_default()).collect();
    let publish = match validate_publish(&core.limits, rooms, request.message, request.name, request.id) {
        Ok(publish) => publish,
        Err((code @ ErrorCode::TooLong, message)) => return error(StatusCode::PAYLOAD_TOO_LARGE, code, message),
        Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, message),
    };
    let mut published = Vec::new();
    for (_, queued) in publish::submit(core.engine.as_ref(), publish, core.clock.wall()) {
        let outcome = match queued {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(outcome) => published.push(outcome),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string()),
        }
    }
    let acks = published
        .iter()
        .map(|p| {
            let m = p.message();
            ApiAck { room: &m.room, offset: m.offset, id: &m.id, duplicate: p.is_duplicate() }
        })
        .collect();
    json_response(StatusCode::OK, ApiAnswer::Ack { acks }.encode())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Prometheus text format: what an operator (or the soak script) watches.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let hub = &state.ws.core.hub;
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let body = format!(
        "# TYPE switchboard_connections gauge\nswitchboard_connections {}\n\
         # TYPE switchboard_websockets gauge\nswitchboard_websockets {}\n\
         # TYPE switchboard_rooms gauge\nswitchboard_rooms {}\n\
         # TYPE switchboard_tasks gauge\nswitchboard_tasks {}\n",
        state.connections.open(),
        hub.connection_count(),
        hub.room_count(),
        tasks,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Runs HTTP/1.1 (with upgrades) on each admitted connection.
#[derive(Clone)]
pub struct HttpHandler {
    app: Router,
    handshake_timeout: Duration,
}

impl HttpHandler {
    /// Serves `app`; a client has `handshake_timeout` to finish TLS and send its request head.
    pub fn new(app: Router, handshake_timeout: Duration) -> Self {
        Self { app, handshake_timeout }
    }
}

impl Handler for HttpHandler {
    fn plain(&self, stream: Admitted<TcpStream>, peer: SocketAddr) {
        tokio::spawn(serve_http(stream, self.app.clone(), peer, self.handshake_timeout));
    }

    fn tls(&self, stream: Admitted<TcpStream>, peer: SocketAddr, acceptor: TlsAcceptor) {
        let (app, timeout) = (self.app.clone(), self.handshake_timeout);
        tokio::spawn(async move {
            if let Some(stream) = listen::tls_handshake(&acceptor, stream, peer, timeout).await {
                serve_http(stream, app, peer, timeout).await;
            }
        });
    }
}

async fn serve_http<S>(stream: S, app: Router, peer: SocketAddr, handshake_timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    // The header timeout also bounds a client that connects and sends nothing (or a byte at a time).
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "HTTP connection ended with an error");
    }
}
