//! `switchboard serve`: the chat server. HTTP and WebSocket on one port: the page at `/`, its client
//! module at `/switchboard.js`, the WebSocket at `/ws`, the publish API at `/api/publish`, and
//! `/healthz` and `/metrics` for operators.
//!
//! Admission happens in layers, cheapest first: connection limits at accept (before a byte is read),
//! the handshake timeout while the request head arrives, then the origin and the token before the
//! upgrade.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::proto::deflate::DeflateConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{Access, AuthError, Identity, OriginPolicy, Verifier};
use crate::config::{ServeConfig, TokenKey};
use crate::hub::{Hub, HubLimits};
use crate::limits::{ConnectionLimiter, Permit};
use crate::protocol::{self, ErrorCode};
use crate::session::{self, SessionLimits, Shared};
use crate::store::{Published, Retention, Store};

/// The chat page and the browser client module, built into the binary.
const INDEX_HTML: &str = include_str!("../../../web/index.html");
const CLIENT_JS: &str = include_str!("../../../web/switchboard.js");

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    ws_config: switchboard_ws::Config,
    connections: Arc<ConnectionLimiter>,
    shutdown: watch::Receiver<bool>,
}

/// Binds `config.listen` and serves until `stop` resolves.
pub async fn run(config: ServeConfig, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("listening on {}", config.listen))?;
    serve(listener, config, stop).await
}

/// Serves on a bound listener until `stop` resolves; then closes every WebSocket with 1001 and
/// waits (bounded) for the store to write what it holds.
pub async fn serve(listener: TcpListener, config: ServeConfig, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let access = Arc::new(Access {
        verifier: match &config.token_key {
            Some(TokenKey::Secret(secret)) => Some(Verifier::hs256(secret.as_bytes())),
            Some(TokenKey::PublicKeyFile(path)) => Some(Verifier::from_public_key_file(path)?),
            None => None,
        }
        .map(|verifier| verifier.expecting(config.jwt_audience.as_deref(), config.jwt_issuer.as_deref())),
        allow_anonymous: config.allow_anonymous,
        origins: config.allowed_origins.clone().map_or_else(OriginPolicy::any, OriginPolicy::only),
        api_key: config.api_key.clone(),
    });
    let hub = Hub::new(
        HubLimits {
            outbox_messages: config.outbox_messages,
            outbox_bytes: config.outbox_bytes,
            max_rooms_per_connection: config.max_rooms_per_connection,
            max_presence: config.max_presence,
        },
        config.default_room.clone(),
    );
    let fan_out = hub.clone();
    let retention = Retention {
        max_messages: config.history_max_messages,
        max_age: config.history_max_age,
        max_db_bytes: config.db_max_bytes,
    };
    let store = Store::open(&config.db, retention, Box::new(move |batch| fan_out.deliver(batch)))?;
    hub.set_last_offsets(store.last_offsets()?);
    let tls = match &config.tls {
        Some((cert, key)) => Some(switchboard_ws::tls::acceptor(cert, key)?),
        None => None,
    };

    let max_frame = 64 * 1024 + config.max_message_chars * 4;
    let mut ws_config = switchboard_ws::Config::default()
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .handshake_timeout(config.handshake_timeout);
    if let Some(interval) = config.keepalive {
        ws_config = ws_config.keepalive(interval, interval);
    }
    if config.compression {
        ws_config = ws_config.compression(DeflateConfig { threshold: 256, ..DeflateConfig::default() });
    }
    let (shutdown_tx, shutdown) = watch::channel(false);
    let connections = ConnectionLimiter::new(config.max_connections, config.max_connections_per_ip);
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let state = AppState {
        shared: Arc::new(Shared {
            hub: hub.clone(),
            store: store.clone(),
            access,
            limits: SessionLimits {
                max_message_chars: config.max_message_chars,
                max_name_chars: config.max_name_chars,
                join_backlog: 50,
                max_replay: 10_000,
                rate_limit: config.rate_limit,
                auth_timeout: config.handshake_timeout,
                max_publish_rooms: config.max_rooms_per_connection,
            },
            live: live.clone(),
        }),
        ws_config,
        connections: connections.clone(),
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route(
            "/switchboard.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], CLIENT_JS) }),
        )
        .route("/ws", get(websocket))
        .route("/api/publish", post(api_publish).layer(DefaultBodyLimit::max(max_frame)))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state);

    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(db = %config.db.display(), "switchboard serving {scheme}://{}/", listener.local_addr()?);
    let handshake_timeout = config.handshake_timeout;
    tokio::pin!(stop);
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match connections.try_acquire(peer.ip()) {
            Ok(permit) => permit,
            Err(refused) if tls.is_some() => {
                // An HTTP answer would be plaintext on a TLS port: just close.
                tracing::debug!(%peer, %refused, "connection refused");
                continue;
            }
            Err(refused) => {
                tracing::debug!(%peer, %refused, "connection refused");
                // Answer without parsing the request: one small write, then a short drain of what the
                // client sent, so closing does not reset the connection before it reads the answer.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        stream.write_all(refused.response()).await?;
                        stream.shutdown().await?;
                        let mut sink = [0u8; 4096];
                        while stream.read(&mut sink).await? > 0 {}
                        std::io::Result::Ok(())
                    })
                    .await;
                });
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, tls) = (app.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_http(Counted { inner: stream, _permit: permit }, app, peer, handshake_timeout).await,
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        serve_http(Counted { inner: stream, _permit: permit }, app, peer, handshake_timeout).await
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }

    tracing::info!("shutting down: closing connections with 1001");
    drop(listener);
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    // Sessions count as live until their close handshake is over (or timed out).
    while live.load(std::sync::atomic::Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The writer commits what it holds and stops; later publishes (from sessions still closing) are
    // refused. Whatever it held was never acknowledged, so a publisher retries it after the restart.
    drop(app);
    let flushed = tokio::task::spawn_blocking(move || store.shutdown());
    let left = deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_millis(500));
    if tokio::time::timeout(left, flushed).await.is_err() {
        tracing::warn!("history writer still busy at the end of the grace period; exiting anyway");
    }
    Ok(())
}

/// A connection's stream, carrying its place in the connection count for as long as it lives (through
/// the upgrade into a WebSocket session).
struct Counted<S> {
    inner: S,
    _permit: Permit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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

/// The token of a handshake: `Authorization: Bearer ...`, else the `token` query parameter.
fn handshake_token(upgrade: &WebSocketUpgrade) -> Option<String> {
    let request = upgrade.request();
    if let Some(token) = request.header("Authorization").and_then(bearer) {
        return Some(token.to_owned());
    }
    request.query()?.split('&').find_map(|pair| pair.strip_prefix("token=")).map(percent_decode)
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(|c: char| c.is_ascii_whitespace())?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Tokens are URL-safe already; decoding `%XX` lets clients that escape everything work too.
fn percent_decode(text: &str) -> String {
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

fn refuse(status: StatusCode, reason: String) -> Response {
    let mut response = (status, format!("{reason}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    response
}

async fn websocket(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    let AppState { shared, ws_config, shutdown, .. } = state;
    let access = &shared.access;
    if !access.origins.allows(upgrade.request().origin()) {
        return refuse(StatusCode::FORBIDDEN, "this origin may not open a WebSocket here".into());
    }
    // A token in the handshake is checked now, so a bad one gets a plain 401; without one, an
    // anonymous server lets the client in and a closed one waits for the token in the first message.
    // On a server without a token key everyone is anonymous; a token sent anyway is not an error.
    let token = access.verifier.as_ref().and_then(|_| handshake_token(&upgrade));
    let identity = match token {
        Some(token) => match access.verify(&token) {
            Ok(identity) => Some(identity),
            Err(error @ (AuthError::Expired | AuthError::Invalid(_))) => {
                return refuse(StatusCode::UNAUTHORIZED, error.to_string());
            }
            Err(error) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        },
        None if access.allow_anonymous => Some(Identity::anonymous()),
        None => None,
    };
    upgrade
        .protocols(&[protocol::V1])
        .config(ws_config)
        .on_upgrade(move |socket| session::run(shared, socket, identity, shutdown))
        .into_response()
}

/// `POST /api/publish` with `{"room" | "rooms", "message", "name"?, "id"?}`: stores and delivers as a
/// WebSocket publish does, and answers with the acknowledgements.
async fn api_publish(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let shared = &state.shared;
    if shared.access.api_key.is_none() {
        return refuse(StatusCode::NOT_FOUND, "the publish API is off: start the server with --api-key".into());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    if !presented.is_some_and(|key| shared.access.api_key_matches(key)) {
        return refuse(StatusCode::UNAUTHORIZED, "a valid API key is required (Authorization: Bearer KEY)".into());
    }
    let error = |status: StatusCode, code: ErrorCode, message: String| {
        json_response(status, json!({"type": "error", "code": code, "message": message}))
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
    let publish = match session::validate_publish(&shared.limits, rooms, request.message, request.name, request.id) {
        Ok(publish) => publish,
        Err((code @ ErrorCode::TooLong, message)) => return error(StatusCode::PAYLOAD_TOO_LARGE, code, message),
        Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, message),
    };
    let mut acks = Vec::new();
    for pending in session::submit(&shared.store, publish) {
        let outcome = match pending {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(Published::Stored(m)) => {
                acks.push(json!({"room": m.room, "offset": m.offset, "id": m.id, "duplicate": false}))
            }
            Ok(Published::Duplicate(m)) => {
                acks.push(json!({"room": m.room, "offset": m.offset, "id": m.id, "duplicate": true}))
            }
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string()),
        }
    }
    json_response(StatusCode::OK, json!({"type": "ack", "acks": acks}))
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Prometheus text format: what an operator (or the soak script) watches.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let hub = &state.shared.hub;
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
