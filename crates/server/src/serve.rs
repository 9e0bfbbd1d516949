//! `switchboard serve`: wiring only. Settings become the access rules, the hub, the engine (whose
//! fan-out goes to the hub), the chat [`Core`], the HTTP routes and the accept loop; on stop, every
//! WebSocket closes with 1001 and the engine writes what it holds.
//!
//! Admission happens in layers, cheapest first: connection limits at accept (before a byte is read,
//! [`crate::listen`]), the handshake timeout while the request head arrives, then the origin and the
//! token before the upgrade ([`crate::transport::ws`]).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use switchboard_ws::proto::deflate::DeflateConfig;
use tokio::net::TcpListener;

use crate::chat::access::{Access, OriginPolicy, Verifier};
use crate::chat::hub::Hub;
use crate::chat::limits::{HubLimits, SessionLimits};
use crate::chat::message::{NodeId, SystemClock};
use crate::chat::Core;
use crate::config::{ServeConfig, TokenKey};
use crate::engine::memory::LocalPresence;
use crate::engine::redis::{RedisConnector, RedisSettings};
use crate::engine::sqlite::Store;
use crate::engine::{Engine, EngineError, Retention};
use crate::listen::{self, Admission, ConnectionLimiter};
use crate::proxied::TrustedProxies;
use crate::transport::http::{self, AppState, HttpHandler, HttpSettings};
use crate::transport::poll::PollPresence;
use crate::transport::sse::AddressRate;
use crate::transport::ws::WsState;

/// Binds the configured address and serves until `stop` resolves.
pub async fn run(config: ServeConfig, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let addr = config.server.listen();
    let listener = TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    serve(listener, config, stop).await
}

/// Serves on a bound listener until `stop` resolves; then closes every WebSocket with 1001 and
/// waits (bounded) for the engine to write what it holds.
pub async fn serve(listener: TcpListener, config: ServeConfig, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut stop = std::pin::pin!(stop);
    let access = Arc::new(access(&config)?);
    let chat = &config.chat;
    let limits = HubLimits {
        outbox_messages: config.limits.outbox_messages(),
        outbox_bytes: config.limits.outbox_bytes(),
        max_rooms_per_connection: chat.max_rooms_per_connection(),
        max_presence: chat.max_presence(),
        max_sessions_per_user: config.server.max_connections_per_user(),
    };
    let retention = Retention {
        max_messages: config.history.max_messages(),
        max_age: config.history_max_age(),
        max_db_bytes: config.history.db_max_bytes,
    };
    let node = NodeId::random();
    let cluster = &config.cluster;
    let (hub, engine, store) = if cluster.redis().is_empty() {
        let hub = Hub::new(limits, chat.default_room(), node, Arc::new(LocalPresence::default()));
        let db = config.history.db();
        let engine: Arc<dyn Engine> = Store::open(&db, retention, hub.clone())?;
        (hub, engine, db.display().to_string())
    } else {
        let settings = RedisSettings {
            urls: cluster.redis(),
            cluster: cluster.redis_cluster(),
            lease: Duration::from_secs(cluster.presence_lease_secs()),
            timeout: Duration::from_millis(cluster.redis_timeout_ms()),
            node: node.as_str().to_owned(),
        };
        let connector = tokio::select! {
            connector = connect_redis(settings, retention) => connector?,
            // SIGTERM while waiting for Redis: nothing was served yet, nothing to close.
            () = stop.as_mut() => return Ok(()),
        };
        let hub = Hub::new(limits, chat.default_room(), node, connector.presence());
        let engine: Arc<dyn Engine> = connector.start(hub.clone());
        (hub, engine, cluster.redis().join(","))
    };
    hub.attach(&engine);
    let tls = match config.tls() {
        // HTTP/2 is offered because its one WebSocket route, /ws, takes the extended CONNECT too.
        Some((cert, key)) => Some(switchboard_ws::tls::acceptor_h2(&cert, &key)?),
        None => None,
    };

    let max_frame = 64 * 1024 + chat.max_message_chars() * 4;
    let mut ws_config = switchboard_ws::Config::default()
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .handshake_timeout(config.handshake_timeout());
    if let Some(interval) = config.keepalive() {
        ws_config = ws_config.keepalive(interval, interval);
    }
    if config.server.compression() {
        ws_config = ws_config.compression(DeflateConfig { threshold: 256, ..DeflateConfig::default() });
    }
    let core = Arc::new(Core {
        hub: hub.clone(),
        engine: engine.clone(),
        access,
        limits: SessionLimits {
            max_message_chars: chat.max_message_chars(),
            max_name_chars: chat.max_name_chars(),
            join_backlog: 50,
            max_replay: 10_000,
            rate_limit: config.rate_limit(),
            auth_timeout: config.handshake_timeout(),
            max_publish_rooms: chat.max_rooms_per_connection(),
            max_replay_bytes: config.limits.outbox_bytes(),
        },
        clock: Arc::new(SystemClock),
    });
    let connections = ConnectionLimiter::new(config.server.max_connections(), config.server.max_connections_per_ip());
    let live = Arc::new(AtomicUsize::new(0));
    let state = AppState {
        ws: WsState { core, config: ws_config, live: live.clone() },
        connections: connections.clone(),
        sse_heartbeat: Duration::from_secs(config.server.sse_heartbeat_secs()),
        poll_presence: PollPresence::new(Duration::from_secs(config.server.poll_grace_secs()), connections.clone()),
        publish_rate: AddressRate::new(config.rate_limit()),
        started: std::time::Instant::now(),
        engine_name: if cluster.redis().is_empty() { "sqlite" } else { "redis" },
        body_timeout: config.handshake_timeout(),
    };
    let app = http::router(state, max_frame);

    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(history = %store, "switchboard serving {scheme}://{}/", listener.local_addr()?);
    let trusted = Arc::new(
        TrustedProxies::parse(
            config.server.trusted_proxies.as_deref().unwrap_or_default(),
            config.server.forwarded_header(),
        )
        .map_err(anyhow::Error::msg)?,
    );
    let settings = HttpSettings {
        handshake_timeout: config.handshake_timeout(),
        max_head: config.server.max_request_head_bytes(),
        max_streams: config.server.h2_max_streams(),
        trusted: trusted.clone(),
        send_timeout: config.send_timeout(),
    };
    let (closing, closed) = tokio::sync::watch::channel(false);
    let handler = HttpHandler::new(app, settings, closed);
    let admission = Admission {
        limiter: Some(connections),
        tls,
        proxy_protocol: config.server.proxy_protocol().then(|| config.handshake_timeout()),
        trusted,
        send_timeout: Some(config.send_timeout()),
    };
    listen::accept_loop(&listener, admission, handler, stop).await;

    tracing::info!("shutting down: closing connections with 1001");
    drop(listener);
    hub.shut_down();
    let grace = config.shutdown_grace();
    let deadline = tokio::time::Instant::now() + grace;
    // The end of the grace period is kept for what follows the sessions: the engine's last commit,
    // and the runtime's own end (`main`'s 200 ms), so the process is gone within the grace period.
    let sessions_until = deadline - (grace / 2).min(RUNTIME_END + Duration::from_millis(500));
    // Sessions count as live until their close handshake is over (or timed out).
    while live.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < sessions_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only now, with every WebSocket closed with 1001, do idle HTTP/1.1 connections close and HTTP/2
    // connections get their GOAWAY.
    let _ = closing.send(true);
    // The engine commits what it holds and stops; later publishes (from sessions still closing) are
    // refused. Whatever it held was never acknowledged, so a publisher retries it after the restart.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now()).saturating_sub(RUNTIME_END);
    if tokio::time::timeout(left, engine.shutdown()).await.is_err() {
        tracing::warn!("history writer still busy at the end of the grace period; exiting anyway");
    }
    Ok(())
}

/// What `main` gives the runtime to end once `run` returns (tasks still running are dropped).
pub const RUNTIME_END: Duration = Duration::from_millis(200);

/// How long a node waits at start for Redis to answer: long enough for a Redis started beside it
/// (a compose file, a pod) to come up. Past it the node exits with the error, for its supervisor to
/// start it again.
const REDIS_STARTUP_WAIT: Duration = Duration::from_secs(30);

/// [`RedisConnector::connect`], tried again (logging why) until it works or the startup wait is over.
async fn connect_redis(settings: RedisSettings, retention: Retention) -> anyhow::Result<RedisConnector> {
    // What waiting cannot mend is said at once: a URL that does not parse, a refused password.
    for url in &settings.urls {
        redis::Client::open(url.as_str()).map_err(|e| anyhow::anyhow!("--redis {url}: {e}"))?;
    }
    let deadline = tokio::time::Instant::now() + REDIS_STARTUP_WAIT;
    let mut pause = Duration::from_millis(250);
    loop {
        match RedisConnector::connect(settings.clone(), retention).await {
            Ok(connector) => return Ok(connector),
            Err(error) if is_refused_auth(&error.to_string()) => return Err(error.into()),
            Err(error @ EngineError::Misconfigured { .. }) => return Err(error.into()),
            Err(error) if tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(%error, "Redis does not answer yet; trying again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(4));
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("Redis did not answer within {}s of starting", REDIS_STARTUP_WAIT.as_secs())))
            }
        }
    }
}

/// Whether Redis refused our credentials (no waiting mends that).
fn is_refused_auth(error: &str) -> bool {
    ["NOAUTH", "WRONGPASS", "AuthenticationFailed", "invalid password", "invalid username-password"]
        .iter()
        .any(|marker| error.contains(marker))
}

fn access(config: &ServeConfig) -> anyhow::Result<Access> {
    let verifier = match config.token_key() {
        Some(TokenKey::Secret(secret)) => Some(Verifier::hs256(secret.as_bytes())),
        Some(TokenKey::PublicKeyFile(path)) => Some(Verifier::from_public_key_file(&path)?),
        None => None,
    };
    let auth = &config.auth;
    Ok(Access {
        verifier: verifier.map(|verifier| verifier.expecting(auth.jwt_audience.as_deref(), auth.jwt_issuer.as_deref())),
        allow_anonymous: config.allow_anonymous(),
        origins: auth.allowed_origins.clone().map_or_else(OriginPolicy::any, OriginPolicy::only),
        api_key: auth.api_key.clone(),
    })
}
