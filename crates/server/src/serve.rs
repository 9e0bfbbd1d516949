//! `switchboard serve`: the chat server. HTTP and WebSocket on one port: the page at `/`, its client
//! module at `/switchboard.js`, the WebSocket at `/ws`, and `/healthz`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::proto::deflate::DeflateConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ServeConfig;
use crate::hub::{Hub, HubLimits};
use crate::protocol;
use crate::session::{self, SessionLimits};
use crate::store::{Retention, Store};

/// The chat page and the browser client module, built into the binary.
const INDEX_HTML: &str = include_str!("../../../web/index.html");
const CLIENT_JS: &str = include_str!("../../../web/switchboard.js");
/// How long sessions get to close after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    hub: Arc<Hub>,
    store: Arc<Store>,
    ws_config: switchboard_ws::Config,
    limits: SessionLimits,
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
    let hub = Hub::new(
        HubLimits {
            outbox_messages: config.outbox_messages,
            max_rooms_per_connection: config.max_rooms_per_connection,
            max_presence: 1000,
        },
        config.default_room.clone(),
    );
    let fan_out = hub.clone();
    let retention = Retention { max_messages: config.history_max_messages, max_age: config.history_max_age };
    let store = Store::open(&config.db, retention, Box::new(move |batch| fan_out.deliver(batch)))?;
    hub.set_last_offsets(store.last_offsets()?);
    let tls = match &config.tls {
        Some((cert, key)) => Some(switchboard_ws::tls::acceptor(cert, key)?),
        None => None,
    };

    let mut ws_config = switchboard_ws::Config::default()
        .max_message_size(64 * 1024 + config.max_message_chars * 4)
        .max_frame_size(64 * 1024 + config.max_message_chars * 4);
    if let Some(interval) = config.keepalive {
        ws_config = ws_config.keepalive(interval, interval);
    }
    if config.compression {
        ws_config = ws_config.compression(DeflateConfig { threshold: 256, ..DeflateConfig::default() });
    }
    let (shutdown_tx, shutdown) = watch::channel(false);
    let state = AppState {
        hub: hub.clone(),
        store: store.clone(),
        ws_config,
        limits: SessionLimits {
            max_message_chars: config.max_message_chars,
            max_name_chars: config.max_name_chars,
            join_backlog: 50,
            max_replay: 10_000,
        },
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route(
            "/switchboard.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], CLIENT_JS) }),
        )
        .route("/ws", get(websocket))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);

    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(db = %config.db.display(), "switchboard serving {scheme}://{}/", listener.local_addr()?);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
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
        let _ = stream.set_nodelay(true);
        let (app, tls) = (app.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_http(stream, app, peer).await,
                Some(acceptor) => match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_http(stream, app, peer).await,
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }

    tracing::info!("shutting down: closing connections with 1001");
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The router's state holds the store too; with it and the finished sessions gone, dropping the
    // last handle lets the writer commit what it holds and exit (joined off the async threads).
    drop(app);
    tokio::task::spawn_blocking(move || drop(store)).await.ok();
    Ok(())
}

async fn serve_http<S>(stream: S, app: Router, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades();
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "HTTP connection ended with an error");
    }
}

async fn websocket(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    let AppState { hub, store, ws_config, limits, shutdown } = state;
    upgrade
        .protocols(&[protocol::V1])
        .config(ws_config)
        .on_upgrade(move |socket| session::run(hub, store, socket, limits, shutdown))
        .into_response()
}
