//! The HTTP side of `serve`: HTTP/1.1 on each admitted connection, and HTTP/2 where TLS chose it
//! ([`HttpHandler`]), and the routes:
//! the page at `/`, its client module at `/switchboard.js`, the WebSocket
//! route at `/ws` (see [`super::ws`]), Server-Sent Events at `/sse` and the client publish at
//! `/publish` (see [`super::sse`]), long polling at `/poll` (see [`super::poll`]), the publish API at `/api/publish`, and `/healthz` and
//! `/metrics` for operators. HTTP API errors are JSON bodies with the chat's error codes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::tls::TlsAcceptor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::wake::Gated;
use super::ws::{self, WsState};
use super::{api, poll, sse};
use crate::chat::wire::ErrorCode;
use crate::listen::{self, Admitted, ConnectionLimiter, Handler, Permit, Refused};
use crate::metrics::{metrics, Refusal};
use crate::proxied::TrustedProxies;

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
    /// How often an idle SSE stream sends a comment, so proxies keep it open.
    pub sse_heartbeat: Duration,
    /// Long-polling clients counted as present.
    pub poll_presence: Arc<poll::PollPresence>,
    /// The message rate of `POST /publish` per client address.
    pub publish_rate: Arc<sse::AddressRate>,
    /// When the server started (for `/api/info`).
    pub started: std::time::Instant,
    /// Which engine keeps the history: `sqlite`, `memory` or `redis`.
    pub engine_name: &'static str,
    /// Time a request body has to arrive once its head is in (the handshake timeout): the head's
    /// own timeout does not bound a body sent a byte at a time.
    pub body_timeout: Duration,
}

/// Every route of `serve`; request bodies are capped at `max_body` bytes.
pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route(
            "/switchboard.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], CLIENT_JS) }),
        )
        // HTTP/1.1 upgrades with GET, HTTP/2 (RFC 8441) with an extended CONNECT.
        .route("/ws", get(websocket).connect(websocket))
        .route("/api/publish", post(api::api_publish))
        .route("/api/openapi.json", get(api::openapi))
        .route("/api/info", get(api::info))
        .route("/api/rooms", get(api::rooms))
        .route("/api/rooms/{room}/presence", get(api::presence))
        .route("/api/rooms/{room}/presence/count", get(api::presence_count))
        .route("/api/rooms/{room}/history", get(api::history))
        .route("/api/rooms/{room}/history/remove", post(api::remove_history))
        .route("/api/users/{sub}/disconnect", post(api::disconnect))
        .route("/api/users/{sub}/subscribe", post(api::subscribe))
        .route("/api/users/{sub}/unsubscribe", post(api::unsubscribe))
        .route("/sse", get(sse_stream))
        .route("/poll", get(long_poll))
        .route("/publish", post(sse_publish))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_page))
        // `body_in_time` reads every POST body, within `max_body`: the handlers' extractors need no
        // limit of their own.
        .layer(axum::middleware::from_fn_with_state((state.body_timeout, max_body), body_in_time))
        .layer(axum::middleware::from_fn(host_required))
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(json_errors))
        // Outermost, so that every answer on those paths carries it, the body reader's 408 and 413
        // and the JSON refusals included.
        .layer(axum::middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

/// Reads a POST's body (at most `max_body` bytes) before its handler runs, within `deadline` of the
/// head: a client that trickles its body, or stops sending it, would otherwise hold its connection
/// and its place in the connection limits for as long as it likes. Late: 408, and the connection is
/// closed. Only POST routes take bodies; the others (the upgrade, streams, polls) pass untouched.
async fn body_in_time(
    State((deadline, max_body)): State<(Duration, usize)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use http_body_util::BodyExt;
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let too_large = || {
        let message = format!("the request body is over the size limit ({max_body} bytes)");
        let mut answer = api::fail(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLong, message).into_response();
        // What is left of the body is not read: the connection cannot carry another request.
        answer.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        answer
    };
    // A declared length over the limit is refused at once, not after waiting for the body.
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max_body as u64) {
        return too_large();
    }
    let body = http_body_util::Limited::new(body, max_body);
    let Ok(read) = tokio::time::timeout(deadline, body.collect()).await else {
        tracing::debug!(path = parts.uri.path(), "a request body did not arrive in time");
        let message = format!("the request body did not arrive within {} s", deadline.as_secs());
        let mut answer = api::fail(StatusCode::REQUEST_TIMEOUT, ErrorCode::BadRequest, message).into_response();
        answer.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        return answer;
    };
    match read {
        Ok(collected) => {
            next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(collected.to_bytes()))).await
        }
        Err(error) if error.is::<http_body_util::LengthLimitError>() => too_large(),
        Err(error) => {
            let message = format!("the request body could not be read: {error}");
            api::fail(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message).into_response()
        }
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host` is a 400 (hyper serves it otherwise). HTTP/2
/// has `:authority` instead, and HTTP/1.0 no such rule.
async fn host_required(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if request.version() == axum::http::Version::HTTP_11 && !request.headers().contains_key(header::HOST) {
        return (StatusCode::BAD_REQUEST, "an HTTP/1.1 request needs a Host header\n").into_response();
    }
    next.run(request).await
}

/// Paths whose answers are JSON, errors included.
fn answers_in_json(path: &str) -> bool {
    path.starts_with("/api/") || matches!(path, "/api" | "/publish" | "/poll" | "/sse")
}

/// CORS for `/sse`, `/poll` and `/publish`, so pages of the origins `--allowed-origins` lets in may
/// use them from their own origin (`EventSource`, `fetch`): the answer names the page's origin. Only
/// an origin the list names (exactly or by a subdomain pattern, not by `*` and not by default) may
/// send credentials (`withCredentials`, the `switchboard_token` cookie), as the cookie rule has it.
/// A preflight from an origin not let in is a 403. Same-origin requests (and those of non-browser
/// clients) carry no `Origin` to answer. Other paths pass untouched.
async fn cors(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !matches!(request.uri().path(), "/sse" | "/poll" | "/publish") {
        return next.run(request).await;
    }
    let origin = request.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let policy = &state.ws.core.access.origins;
    let allowed = origin.as_deref().filter(|origin| policy.allows(Some(origin)));
    let mut response = if request.method() == axum::http::Method::OPTIONS {
        match (&origin, allowed) {
            (Some(_), None) => {
                return api::fail(StatusCode::FORBIDDEN, ErrorCode::NotAllowed, "this origin is not allowed")
                    .into_response()
            }
            _ => {
                let mut answer = StatusCode::NO_CONTENT.into_response();
                let headers = answer.headers_mut();
                headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, header::HeaderValue::from_static("GET, POST"));
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    header::HeaderValue::from_static("authorization, content-type, last-event-id"),
                );
                headers.insert(header::ACCESS_CONTROL_MAX_AGE, header::HeaderValue::from_static("600"));
                answer
            }
        }
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.append(header::VARY, header::HeaderValue::from_static("origin"));
    if let Some(value) = allowed.and_then(|origin| header::HeaderValue::from_str(origin).ok()) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        // A page of another origin may read how long a 429 or 503 asks it to wait.
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, header::HeaderValue::from_static("retry-after"));
        if allowed.is_some_and(|origin| policy.names(origin)) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, header::HeaderValue::from_static("true"));
        }
    }
    response
}

/// Gives the router's own refusals on the JSON paths (no such path, a method the path does not take,
/// a connection limit's 429 and 503: answered with an empty or a plain-text body) the JSON error body
/// the handlers' refusals have.
async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if !answers_in_json(request.uri().path()) {
        return next.run(request).await;
    }
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    let status = response.status();
    let is_json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // A refusal's words (a connection limit's, say) are short; past this, they are not kept.
    let said = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let said = String::from_utf8_lossy(&said).trim().to_owned();
    let (code, message) = match status {
        StatusCode::NOT_FOUND => (ErrorCode::BadRequest, format!("no such endpoint: {path}")),
        StatusCode::METHOD_NOT_ALLOWED => (ErrorCode::BadRequest, format!("{path} does not take {method}")),
        StatusCode::TOO_MANY_REQUESTS => (ErrorCode::TooMany, said),
        StatusCode::SERVICE_UNAVAILABLE => (ErrorCode::Unavailable, said),
        other => (ErrorCode::BadRequest, if said.is_empty() { other.to_string() } else { said }),
    };
    let mut answer = api::fail(status, code, message).into_response();
    // What the router said stays: a 405's `Allow`, a 429's `Retry-After`.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
}

async fn websocket(
    State(state): State<AppState>,
    peer: Option<axum::Extension<Peer>>,
    shared: Option<axum::Extension<SharedConnection>>,
    upgrade: Result<WebSocketUpgrade, switchboard_ws::axum::WebSocketRejection>,
) -> Response {
    let peer = peer.map(|axum::Extension(Peer(address))| address);
    match upgrade {
        Ok(upgrade) => {
            let stuck_stream = shared.as_ref().and_then(|axum::Extension(shared)| shared.stuck_stream.clone());
            let place = match own_place(&state, peer, shared, "refused a WebSocket handshake") {
                Ok(place) => place,
                Err(refused) => return limit_response(refused),
            };
            ws::upgrade(state.ws, upgrade, peer, place, stuck_stream).await
        }
        Err(rejection) => {
            metrics().refused(Refusal::BadHandshake);
            let response = rejection.into_response();
            tracing::info!(
                peer = peer.map(tracing::field::display),
                status = response.status().as_u16(),
                "refused a bad WebSocket handshake"
            );
            response
        }
    }
}

/// A session's own place in the connection limits, when its connection's place does not stand for
/// its client ([`SharedConnection`]); refused (logged and counted) when there is none left.
fn own_place(
    state: &AppState,
    peer: Option<SocketAddr>,
    shared: Option<axum::Extension<SharedConnection>>,
    log: &'static str,
) -> Result<Option<Permit>, Refused> {
    let (Some(address), Some(axum::Extension(shared))) = (peer, shared) else { return Ok(None) };
    let place = if shared.http2 {
        state.connections.try_acquire(address.ip())
    } else {
        state.connections.try_acquire_address(address.ip())
    };
    place.map(Some).inspect_err(|refused| {
        tracing::info!(peer = %address, reason = %refused, "{log}");
        metrics().refused(Refusal::Limit);
    })
}

/// The answer when [`own_place`] found none: 429 (503 at the total), with `Retry-After`.
fn limit_response(refused: Refused) -> Response {
    refuse(refused.status(), refused.to_string())
}

async fn sse_stream(
    State(state): State<AppState>,
    peer: Option<axum::Extension<Peer>>,
    shared: Option<axum::Extension<SharedConnection>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let peer = peer.map(|axum::Extension(Peer(address))| address);
    let place = match own_place(&state, peer, shared, "refused an SSE stream") {
        Ok(place) => place,
        Err(refused) => return limit_response(refused),
    };
    let (core, live, heartbeat) = (state.ws.core.clone(), &state.ws.live, state.sse_heartbeat);
    count_bad_request(sse::stream(core, live, peer, place, headers, query, heartbeat).await)
}

async fn long_poll(
    State(state): State<AppState>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let peer = peer.map(|axum::Extension(Peer(address))| address.ip());
    count_bad_request(poll::poll(state.ws.core.clone(), &state.poll_presence, peer, headers, query).await)
}

/// A stream or poll refused for its request (no room, a bad cursor): counted as a bad handshake.
/// (Origin and token refusals are counted where they are decided.)
fn count_bad_request(response: Response) -> Response {
    if response.status() == StatusCode::BAD_REQUEST {
        metrics().refused(Refusal::BadHandshake);
    }
    response
}

async fn sse_publish(
    State(state): State<AppState>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let peer = peer.map(|axum::Extension(Peer(address))| address.ip());
    sse::client_publish(state.ws.core.clone(), &state.publish_rate, peer, headers, query, body).await
}

/// A plain-text refusal; a 401 names the scheme it wants.
pub fn refuse(status: StatusCode, reason: String) -> Response {
    let mut response = (status, format!("{reason}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    // A limit (429) or a server at its total (503): worth another try, later.
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    }
    response
}

/// The token of an `Authorization: Bearer TOKEN` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(|c: char| c.is_ascii_whitespace())?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Decodes `%XX` and `+` in a query's name or value (tokens are URL-safe already; decoding lets
/// clients that escape everything work too). `None` when the decoded bytes are not UTF-8: a name
/// or a room quietly turned into U+FFFD would be another name or room than the client meant.
pub fn percent_decode(text: &str) -> Option<String> {
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
    String::from_utf8(out).ok()
}

/// `GET /metrics`: OpenMetrics text (see [`crate::metrics`] and `docs/operations.md`).
async fn metrics_page(State(state): State<AppState>) -> impl IntoResponse {
    let hub = &state.ws.core.hub;
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let body = metrics().render(state.connections.open(), hub.connection_count(), hub.room_count(), tasks);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}

/// An HTTP/2 stream's receive window: what one stream (one WebSocket) may send ahead of our reading.
/// The connection's window is this times the streams allowed, so streams that stop reading (a
/// session waiting on its full outbox) can never use up the window the others need: on a proxy's
/// shared connection, those are other clients.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// How often a quiet HTTP/2 connection is pinged, and how long the answer may take: a dead peer is
/// dropped with its places in the limits.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);
/// What an HTTP/2 stream may hold of ours before its writes wait (the WebSocket's own outbox bound
/// comes first; this keeps the HTTP/2 layer from buffering more behind it).
const H2_SEND_BUFFER: usize = 64 * 1024;

/// How connections are served.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Time to finish TLS and send a request head (HTTP/2: the first request).
    pub handshake_timeout: Duration,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), in bytes: 431 past it.
    pub max_head: usize,
    /// Concurrent streams per HTTP/2 connection (each WebSocket is one).
    pub max_streams: u32,
    /// Peers whose `X-Forwarded-For` / `Forwarded` name the client.
    pub trusted: Arc<TrustedProxies>,
    /// `--send-timeout-secs`: also how long an HTTP/2 WebSocket stream whose session is over may
    /// take to hand over what it still holds before it counts as stuck (see [`StuckStreams`]).
    pub send_timeout: Duration,
}

/// An HTTP/2 connection's word to its task that one of its WebSocket streams is stuck: its session
/// is over, yet what it holds has not gone for `after`. hyper's task for such a stream waits for
/// flow-control window forever and nothing resets the stream; only ending the connection frees it.
#[derive(Debug, Clone)]
pub struct StuckStreams {
    pub notify: Arc<tokio::sync::Notify>,
    pub after: Duration,
}

/// Runs HTTP/1.1 (with upgrades) on each admitted connection, or HTTP/2 where TLS chose it (ALPN
/// `h2`, with extended CONNECT enabled, since `/ws` takes both). When `closing` turns true, idle
/// HTTP/1.1 connections close and HTTP/2 connections get a GOAWAY.
#[derive(Clone)]
pub struct HttpHandler {
    app: Router,
    settings: HttpSettings,
    closing: watch::Receiver<bool>,
}

impl HttpHandler {
    pub fn new(app: Router, settings: HttpSettings, closing: watch::Receiver<bool>) -> Self {
        Self { app, settings, closing }
    }
}

impl Handler for HttpHandler {
    fn plain(&self, stream: Admitted<TcpStream>, peer: SocketAddr) {
        tokio::spawn(serve_http1(stream, self.app.clone(), peer, self.settings.clone(), self.closing.clone()));
    }

    fn tls(&self, stream: Admitted<TcpStream>, peer: SocketAddr, acceptor: TlsAcceptor) {
        let (app, settings, closing) = (self.app.clone(), self.settings.clone(), self.closing.clone());
        tokio::spawn(async move {
            let Some(stream) = listen::tls_handshake(&acceptor, stream, peer, settings.handshake_timeout).await else {
                return;
            };
            if switchboard_ws::tls::is_http2(&stream) {
                serve_http2(stream, app, peer, settings, closing).await;
            } else {
                serve_http1(stream, app, peer, settings, closing).await;
            }
        });
    }
}

/// The address of the client a request came from, in each request's extensions: the TCP peer, or the
/// client a trusted proxy forwarded for ([`crate::proxied`]).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// In a request's extensions when its connection's place in the limits does not stand for its
/// client alone: an HTTP/2 connection (many sessions), or a connection from a trusted proxy (many
/// clients). A WebSocket or SSE session on it takes a place of its own, for its client's address:
/// in the total too on HTTP/2, where one connection carries many sessions; per address only on a
/// proxy's HTTP/1.1 connection, whose own place in the total stands for the one session it carries.
#[derive(Debug, Clone)]
pub struct SharedConnection {
    pub http2: bool,
    /// On HTTP/2: told when a WebSocket stream is stuck, so the connection is ended (see
    /// [`serve_http2`]).
    pub stuck_stream: Option<StuckStreams>,
}

/// The router as a hyper service: each request learns the client's address (for per-address limits
/// of the HTTP routes) and whether its connection is shared, and `on_request` hears of it. The
/// router is always ready, so it is called without waiting for readiness.
fn service(
    app: Router,
    peer: SocketAddr,
    settings: &HttpSettings,
    stuck_stream: Option<StuckStreams>,
    on_request: impl Fn() + Clone + Send + 'static,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send + 'static,
> + Clone {
    let trusted = settings.trusted.clone();
    let http2 = stuck_stream.is_some();
    let shared = http2 || trusted.contains(peer.ip());
    hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        on_request();
        let client = trusted.client(peer, request.headers()).unwrap_or(peer);
        request.extensions_mut().insert(Peer(client));
        if shared {
            request.extensions_mut().insert(SharedConnection { http2, stuck_stream: stuck_stream.clone() });
        }
        let mut app = app.clone();
        tower_service::Service::call(&mut app, request)
    })
}

async fn serve_http1<S>(
    stream: S,
    app: Router,
    peer: SocketAddr,
    settings: HttpSettings,
    closing: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut closing = closing_signal(closing);
    // The header timeout also bounds a client that connects and sends nothing (or a byte at a time).
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
        // The request head's bound, as the engine's own handshake has it (without it, only hyper's
        // 400 KiB read buffer bounds a head).
        .max_header_size(settings.max_head)
        .writev(false)
        .serve_connection(TokioIo::new(stream), service(app, peer, &settings, None, || {}))
        .with_upgrades();
    tokio::pin!(connection);
    let mut told = false;
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "HTTP connection ended with an error");
                }
                return;
            }
            () = &mut closing, if !told => {
                connection.as_mut().graceful_shutdown();
                told = true;
            }
        }
    }
}

/// Ready once `closing` turns true (or the server that sends it is gone). Gated: a connection's
/// task is woken for every chunk it writes, and a watch polled each time would re-register with
/// the watch's waiter list every time.
fn closing_signal(mut closing: watch::Receiver<bool>) -> Gated<impl Future<Output = ()>> {
    Gated::new(async move {
        let _ = closing.wait_for(|closing| *closing).await;
    })
}

/// HTTP/2 on a TLS connection that chose it. The header list is bounded as an HTTP/1.1 head is,
/// streams and flow-control windows as [`HttpSettings`] and the constants above say; a client that
/// How long an HTTP/2 connection with a stuck WebSocket stream has, after its GOAWAY, for the
/// requests in flight on it before it is closed.
const STUCK_CONNECTION_GRACE: Duration = Duration::from_secs(2);

/// sends no request within the handshake timeout is dropped, as over HTTP/1.1.
async fn serve_http2<S>(
    stream: S,
    app: Router,
    peer: SocketAddr,
    settings: HttpSettings,
    closing: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut closing = closing_signal(closing);
    let requested = Arc::new(AtomicBool::new(false));
    let seen = requested.clone();
    let stuck = StuckStreams { notify: Arc::new(tokio::sync::Notify::new()), after: settings.send_timeout };
    let stuck_stream = stuck.notify.clone();
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(settings.max_streams)
        .max_header_list_size(u32::try_from(settings.max_head).unwrap_or(u32::MAX))
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_STREAM_WINDOW.saturating_mul(settings.max_streams))
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE)
        .max_send_buf_size(H2_SEND_BUFFER)
        .serve_connection(
            TokioIo::new(stream),
            service(app, peer, &settings, Some(stuck), move || seen.store(true, Ordering::Relaxed)),
        );
    tokio::pin!(connection);
    let first_request = tokio::time::sleep(settings.handshake_timeout);
    tokio::pin!(first_request);
    let (mut waiting, mut told) = (true, false);
    // Set once a stuck stream was reported: the GOAWAY went out, and this ends the connection.
    let mut hard_stop: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "HTTP/2 connection ended with an error");
                }
                return;
            }
            // A WebSocket stream whose client stopped taking its data (a zero window) outlives its
            // session: hyper's task for it waits for window that never comes, and nothing resets
            // the stream, which keeps its buffers and its place among the connection's streams.
            // Only ending the connection frees them (its streams then fail; their clients reconnect).
            () = stuck_stream.notified(), if hard_stop.is_none() => {
                tracing::info!(%peer, "closing an HTTP/2 connection: a WebSocket stream on it stopped taking data");
                // A GOAWAY first, so requests in flight on it finish; the stuck stream never will, so
                // the connection ends for good a moment later.
                connection.as_mut().graceful_shutdown();
                told = true;
                hard_stop = Some(Box::pin(tokio::time::sleep(STUCK_CONNECTION_GRACE)));
            }
            () = async { hard_stop.as_mut().expect("guarded").await }, if hard_stop.is_some() => return,
            _ = &mut first_request, if waiting => {
                if !requested.load(Ordering::Relaxed) {
                    tracing::debug!(%peer, "HTTP/2 connection sent no request in time");
                    return;
                }
                waiting = false;
            }
            () = &mut closing, if !told => {
                connection.as_mut().graceful_shutdown();
                told = true;
            }
        }
    }
}
