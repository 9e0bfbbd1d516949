//! The chat over a WebSocket: the upgrade at `/ws` (origin and token checked before it), then one
//! select loop per connection between the socket, the session's answers and its fan-out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::upgrade::UpgradedWebSocket;
use switchboard_ws::{CloseCode, Message, Utf8Bytes};
use tokio::sync::watch;
use tokio::time::Instant;

use super::http::{bearer, percent_decode, refuse};
use crate::chat::access::{AuthError, Identity};
use crate::chat::session::{End, Session, GOING_AWAY};
use crate::chat::wire::{self, Dialect};
use crate::chat::Core;

/// How a closing session waits for the client's side of the close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Most deliveries queued into the socket between two flushes.
const DELIVERY_BATCH: usize = 64;
/// A client whose socket takes no data for this long while we have some for it is dropped: it has
/// stopped reading, and its place in every room is already gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the WebSocket route needs.
#[derive(Clone)]
pub struct WsState {
    /// The chat.
    pub core: Arc<Core>,
    /// Limits and keepalive of every socket.
    pub config: switchboard_ws::Config,
    /// Flips when the server stops.
    pub shutdown: watch::Receiver<bool>,
    /// Sessions still running, their close handshake included (shutdown waits for zero).
    pub live: Arc<AtomicUsize>,
}

/// `GET /ws`: checks the origin and a token in the handshake, then upgrades.
pub async fn upgrade(state: WsState, upgrade: WebSocketUpgrade) -> Response {
    let access = &state.core.access;
    if !access.origins.allows(upgrade.request().origin()) {
        return refuse(axum::http::StatusCode::FORBIDDEN, "this origin may not open a WebSocket here".into());
    }
    // A token in the handshake is checked now, so a bad one gets a plain 401; without one, an
    // anonymous server lets the client in and a closed one waits for the token in the first message.
    // On a server without a token key everyone is anonymous; a token sent anyway is not an error.
    let token = access.verifier.as_ref().and_then(|_| handshake_token(&upgrade));
    let identity = match token {
        Some(token) => match access.verify(&token) {
            Ok(identity) => Some(identity),
            Err(error @ (AuthError::Expired | AuthError::Invalid(_))) => {
                return refuse(axum::http::StatusCode::UNAUTHORIZED, error.to_string());
            }
            Err(error) => return refuse(axum::http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        },
        None if access.allow_anonymous => Some(Identity::anonymous()),
        None => None,
    };
    let WsState { core, config, shutdown, live } = state;
    upgrade
        .protocols(&[wire::V1])
        .config(config)
        .on_upgrade(move |socket| run(core, socket, identity, shutdown, live))
        .into_response()
}

/// The token of a handshake: `Authorization: Bearer ...`, else the `token` query parameter.
fn handshake_token(upgrade: &WebSocketUpgrade) -> Option<String> {
    let request = upgrade.request();
    if let Some(token) = request.header("Authorization").and_then(bearer) {
        return Some(token.to_owned());
    }
    request.query()?.split('&').find_map(|pair| pair.strip_prefix("token=")).map(percent_decode)
}

/// Counts a session as live until it is dropped, however the session ends.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How the loop ends.
enum Stop {
    /// With a close frame.
    Close(End),
    /// The connection failed; nothing more can be sent.
    Dropped,
}

/// Runs a connection until it ends.
pub async fn run(
    core: Arc<Core>,
    mut ws: UpgradedWebSocket,
    identity: Option<Identity>,
    mut shutdown: watch::Receiver<bool>,
    live: Arc<AtomicUsize>,
) {
    let _live = LiveGuard::new(&live);
    let clock = core.clock.clone();
    let mut session = Session::new(core, Dialect::from_subprotocol(ws.protocol()));
    let mut stop = session.start(identity).err().map(Stop::Close);
    // The session's deadline as a tokio timer (the session reads its own clock; both are monotonic).
    let to_timer = |at: Option<std::time::Instant>| {
        let now = clock.now();
        Instant::now() + at.map_or(Duration::from_secs(86400 * 365), |at| at.saturating_duration_since(now))
    };
    let mut deadline = session.deadline();
    let timer = tokio::time::sleep_until(to_timer(deadline));
    tokio::pin!(timer);
    while stop.is_none() {
        let (completions, deliveries) = session.streams();
        stop = tokio::select! {
            biased;
            _ = shutdown.changed() => Some(Stop::Close(End::new(GOING_AWAY, "server shutting down"))),
            () = &mut timer, if deadline.is_some() => session.check_deadline().err().map(Stop::Close),
            done = completions.next() => send_all(&mut ws, session.complete(done)).await,
            // Reading comes before deliveries, so a busy room cannot starve a member's own requests
            // (and the rate limit bounds how much reading there is).
            incoming = ws.recv() => match incoming {
                None => Some(Stop::Dropped),
                Some(Err(error)) => {
                    tracing::debug!(member = session.member_id(), %error, "protocol error");
                    None
                }
                Some(Ok(Message::Text(text))) => send_all(&mut ws, session.on_text(&text)).await,
                Some(Ok(Message::Binary(_))) => send_all(&mut ws, session.on_binary()).await,
                Some(Ok(_)) => None,
            },
            delivery = deliveries.next() => match delivery {
                Some(bytes) => {
                    // Take what else is queued, up to a batch: `recv` flushes before it reads, so one
                    // write then carries the batch instead of one write per message.
                    let mut ended = send(&mut ws, bytes).await.err();
                    let mut taken = 1;
                    while ended.is_none() && taken < DELIVERY_BATCH {
                        let Some(bytes) = session.try_delivery() else { break };
                        ended = send(&mut ws, bytes).await.err();
                        taken += 1;
                    }
                    ended
                }
                None => Some(Stop::Close(End::too_slow("messages were not read in time"))),
            },
        };
        let next = session.deadline();
        if next != deadline {
            deadline = next;
            timer.as_mut().reset(to_timer(deadline));
        }
    }
    // Leaving the hub now, not after the close handshake: the others hear of it at once.
    drop(session);
    if let Some(Stop::Close(End { code, reason })) = stop {
        tracing::debug!(code, %reason, "closing");
        // Bounded as a whole: a peer that stopped reading never takes the close frame either.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            if ws.close(CloseCode(code), &reason).await.is_ok() {
                while ws.recv().await.is_some() {}
            }
        })
        .await;
    }
}

/// Sends a step's envelopes, or turns its end into the loop's.
async fn send_all(ws: &mut UpgradedWebSocket, replies: Result<Vec<String>, End>) -> Option<Stop> {
    match replies {
        Ok(envelopes) => {
            for envelope in envelopes {
                if let Err(stop) = send(ws, envelope.into()).await {
                    return Some(stop);
                }
            }
            None
        }
        Err(end) => Some(Stop::Close(end)),
    }
}

/// Queues one message, waiting (bounded) while the socket's buffer is full.
async fn send(ws: &mut UpgradedWebSocket, text: Utf8Bytes) -> Result<(), Stop> {
    match tokio::time::timeout(SEND_TIMEOUT, ws.feed(Message::Text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Stop::Dropped),
        Err(_) => Err(Stop::Close(End::too_slow("the connection stopped reading"))),
    }
}
