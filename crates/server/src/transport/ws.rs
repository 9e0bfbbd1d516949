//! The chat over a WebSocket: the upgrade at `/ws` (origin and token checked before it), then one
//! select loop per connection between the socket, the session's answers and its fan-out.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{FutureExt, Sink, Stream};

use axum::response::{IntoResponse, Response};
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::{CloseCode, Message, Utf8Bytes, WebSocket};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::http::{bearer, percent_decode, refuse, StuckStreams};
use super::wake::WakeFlag;
use crate::chat::access::{AuthError, Identity};
use crate::chat::session::{End, Session};
use crate::chat::wire::{self, Dialect};
use crate::chat::Core;
use crate::listen::Permit;
use crate::metrics::{metrics, Refusal, Transport};

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
    /// Sessions still running, their close handshake included (shutdown waits for zero).
    pub live: Arc<AtomicUsize>,
}

/// `GET /ws` (or an HTTP/2 extended CONNECT to it): checks the origin and a token in the handshake,
/// then upgrades. `place` is the session's own place in the connection limits, if it has one.
pub async fn upgrade(
    state: WsState,
    upgrade: WebSocketUpgrade,
    peer: Option<SocketAddr>,
    place: Option<Permit>,
    stuck_stream: Option<StuckStreams>,
) -> Response {
    let refuse = |status: axum::http::StatusCode, reason: String| {
        tracing::info!(peer = peer.map(tracing::field::display), status = status.as_u16(), %reason, "refused a WebSocket handshake");
        metrics().refused(if status == axum::http::StatusCode::FORBIDDEN { Refusal::Origin } else { Refusal::Auth });
        refuse(status, reason)
    };
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
    // Answered in HTTP while it can be; the session still decides when it registers its user.
    if let Some(sub) = identity.as_ref().and_then(|identity| identity.subject.as_deref()) {
        if state.core.hub.user_at_limit(sub) {
            tracing::info!(peer = peer.map(tracing::field::display), %sub, "refused a WebSocket handshake: the user's session limit");
            metrics().refused(Refusal::Limit);
            return refuse_too_many(sub);
        }
    }
    let WsState { core, config, live } = state;
    metrics().websocket_handshake(upgrade.is_http2());
    upgrade
        .protocols(&[wire::V1])
        .config(config)
        .on_upgrade(move |socket| {
            // The session is made here, outside the connection's future: what that future holds across
            // its awaits is what every idle connection costs.
            let live = LiveGuard::new(&live).holding(place, stuck_stream);
            let mut session = Session::new(core, Dialect::from_subprotocol(socket.protocol()));
            session.set_peer(peer);
            metrics().connections_opened.inc(Transport::WebSocket);
            let stop = session.start(identity).err().map(Stop::Close);
            run(session, stop, socket, live)
        })
        .into_response()
}

/// 429 (with `Retry-After`) for a user with as many sessions as it may have.
fn refuse_too_many(sub: &str) -> Response {
    let reason = format!("{sub:?} has as many sessions open here as one user may have");
    refuse(axum::http::StatusCode::TOO_MANY_REQUESTS, reason)
}

/// The token of a handshake: `Authorization: Bearer ...`, else the `token` query parameter. Not the
/// cookie `/sse` takes: a browser sends cookies with another site's WebSocket handshake too, and no
/// CORS stands between that page and the answers (cross-site WebSocket hijacking).
fn handshake_token(upgrade: &WebSocketUpgrade) -> Option<String> {
    let request = upgrade.request();
    if let Some(token) = request.header("Authorization").and_then(bearer) {
        return Some(token.to_owned());
    }
    // A token that is not UTF-8 once decoded cannot be a good one: it goes on undecoded, to be
    // refused as a bad token rather than taken for no token.
    let token = request.query()?.split('&').find_map(|pair| pair.strip_prefix("token="))?;
    Some(percent_decode(token).unwrap_or_else(|| token.to_owned()))
}

/// Counts a session as live until it is dropped, however the session ends; and holds its place in
/// the connection limits when it has one of its own (on an HTTP/2 or a proxy's connection; boxed, as
/// every idle connection carries the field).
pub(crate) struct LiveGuard(Arc<AtomicUsize>, Option<Box<Held>>);

/// What a session on a shared connection holds: its place, and on HTTP/2 the connection's word for
/// a stream left stuck.
struct Held {
    _place: Option<Permit>,
    stuck_stream: Option<StuckStreams>,
}

impl LiveGuard {
    pub(crate) fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self(live.clone(), None)
    }

    pub(crate) fn holding(mut self, place: Option<Permit>, stuck_stream: Option<StuckStreams>) -> Self {
        if place.is_some() || stuck_stream.is_some() {
            self.1 = Some(Box::new(Held { _place: place, stuck_stream }));
        }
        self
    }

    /// On HTTP/2, as the session's stream is let go with output its client has not taken: the
    /// stream gets `--send-timeout-secs` more to hand it over (a slow client that still reads is
    /// fine), on a task of its own. A flush that fails is a stream the client reset, gone already;
    /// one that still waits then is stuck, and the connection is told: nothing else would free it.
    fn check_stream<S: Socket>(&self, mut ws: WebSocket<S>) {
        let Some(stuck) = self.1.as_ref().and_then(|held| held.stuck_stream.clone()) else { return };
        if ws.pending_output() == 0 {
            return;
        }
        tokio::spawn(async move {
            let flushed = tokio::time::timeout(stuck.after, tokio::io::AsyncWriteExt::flush(ws.get_mut())).await;
            if flushed.is_err() {
                stuck.notify.notify_one();
            }
        });
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

/// Runs a connection until it ends (at once, given a `stop`). The server's shutdown reaches it as the
/// end of its deliveries (the hub closes every outbox).
///
/// Every idle connection holds this future, so it is kept small: the timer is boxed and exists only
/// while the session has a deadline, and whatever waits only now and then (a full socket buffer, the
/// close handshake) is boxed when it happens instead of being laid out in the future.
// Not an `async fn`: see the comment on the block below.
#[allow(clippy::manual_async_fn)]
fn run<S: Socket>(
    mut session: Session,
    mut stop: Option<Stop>,
    mut ws: WebSocket<S>,
    live: LiveGuard,
) -> impl std::future::Future<Output = ()> + Send {
    // An `async move` block rather than an `async fn`: an `async fn` moves its arguments into locals
    // and its future keeps room for both (rust-lang/rust#62958); the block uses its captures in place.
    async move {
        let mut gate = ReadGate::new();
        let mut deadline = session.deadline();
        let mut timer = deadline.map(|at| Box::pin(tokio::time::sleep_until(to_tokio(&session, at))));
        while stop.is_none() {
            let (completions, deliveries) = session.streams();
            // Each branch only decides what to send; the sending happens below, without waiting unless
            // the socket is full. So the only thing this future holds while idle is this select.
            let out: Result<Outgoing, Stop> = tokio::select! {
                biased;
                    () = fire(&mut timer) => {
                // A spent timer stays ready: drop it, and set a new one below if the deadline holds.
                timer = None;
                deadline = None;
                session.check_deadline().map(|()| Outgoing::Nothing).map_err(Stop::Close)
            }
                done = completions.next() => session.complete(done).map(Outgoing::Envelopes).map_err(Stop::Close),
                // Reading comes before deliveries, so a busy room cannot starve a member's own requests
                // (and the rate limit bounds how much reading there is).
                incoming = poll_fn(|cx| gate.poll_recv(&mut ws, cx)) => match incoming {
                    None => Err(Stop::Dropped),
                    Some(Err(switchboard_ws::Error::KeepaliveTimeout(_))) => {
                        // The only word of it: the client is not reading, so it is told with a
                        // 1001 close frame at best.
                        tracing::info!(member = session.member_id(), "keepalive: no answer to a ping, closing");
                        Ok(Outgoing::Nothing)
                    }
                    Some(Err(error)) => {
                        tracing::debug!(member = session.member_id(), %error, "protocol error");
                        Ok(Outgoing::Nothing)
                    }
                    Some(Ok(Message::Text(text))) => session.on_text(&text).map(Outgoing::Envelopes).map_err(Stop::Close),
                    Some(Ok(Message::Binary(_))) => session.on_binary().map(Outgoing::Envelopes).map_err(Stop::Close),
                    Some(Ok(_)) => Ok(Outgoing::Nothing),
                },
                delivery = deliveries.next() => match delivery {
                    Some(bytes) => Ok(Outgoing::Delivery(bytes)),
                    None => Err(Stop::Close(session.cut_off())),
                },
            };
            stop = match out {
                Err(stop) => Some(stop),
                Ok(out) => match send_now(&mut ws, &mut session, out) {
                    Ok(()) => {
                        gate.flush(&mut ws);
                        None
                    }
                    Err(Blocked::Stop(stop)) => Some(stop),
                    Err(Blocked::Full(rest)) => {
                        // That wait polled the socket on this task's waker: look at it next turn.
                        gate.open();
                        Box::pin(send_when_ready(&mut ws, rest)).await.err()
                    }
                },
            };
            let next = session.deadline();
            if next != deadline {
                deadline = next;
                timer = deadline.map(|at| Box::pin(tokio::time::sleep_until(to_tokio(&session, at))));
            }
        }
        let peer = session.peer();
        // Leaving the hub now, not after the close handshake: the others hear of it at once.
        drop(session);
        if let Some(Stop::Close(end)) = stop {
            // Shutting down closes every connection with 1001: one line each would bury the rest.
            if end.code == 1001 {
                tracing::debug!(peer = peer.map(tracing::field::display), code = end.code, reason = %end.reason, "closing a WebSocket");
            } else {
                tracing::info!(peer = peer.map(tracing::field::display), code = end.code, reason = %end.reason, "closing a WebSocket");
            }
            Box::pin(close(&mut ws, end)).await;
        }
        live.check_stream(ws);
        drop(live);
    }
}

/// Polls the socket's read side only when it can have something: when a waker it registered has
/// fired, or when it was ready last time (more may be buffered). A delivery wakes the connection's
/// task too, and without the gate every delivery would also try a read, which finds nothing and
/// costs more than writing the delivery. The read side gets a waker of its own (which marks the gate
/// and wakes the task), so the task can tell the two apart.
struct ReadGate {
    flag: WakeFlag,
}

impl ReadGate {
    fn new() -> Self {
        Self { flag: WakeFlag::new() }
    }

    /// Poll the read side at the next turn whatever happened.
    fn open(&self) {
        self.flag.mark();
    }

    /// The socket's next message, polled with the gate's waker; `Pending` at once while nothing the
    /// read side waits on has happened.
    fn poll_recv<S: Socket>(
        &mut self,
        ws: &mut WebSocket<S>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<switchboard_ws::Result<Message>>> {
        if !self.flag.take(cx) {
            return Poll::Pending;
        }
        let polled = Pin::new(ws).poll_next(&mut Context::from_waker(self.flag.waker()));
        if polled.is_ready() {
            // More may be buffered.
            self.open();
        }
        polled
    }

    /// Writes what was queued now (`recv` would, but it is not polled for a delivery). A full socket
    /// wakes the gate when it drains; a failure is left for `recv` to report.
    fn flush<S: Socket>(&mut self, ws: &mut WebSocket<S>) {
        match Pin::new(ws).poll_flush(&mut Context::from_waker(self.flag.waker())) {
            Poll::Ready(Ok(())) | Poll::Pending => {}
            Poll::Ready(Err(_)) => self.open(),
        }
    }
}

/// The session's deadline (on its clock) as a tokio instant.
fn to_tokio(session: &Session, at: std::time::Instant) -> Instant {
    Instant::now() + at.saturating_duration_since(session.now())
}

/// Resolves when the timer fires; never without one.
async fn fire(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.await,
        None => std::future::pending().await,
    }
}

/// The close handshake, bounded as a whole: a peer that stopped reading never takes the close frame
/// either.
async fn close<S: Socket>(ws: &mut WebSocket<S>, End { code, reason }: End) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if ws.close(CloseCode(code), &reason).await.is_ok() {
            while ws.recv().await.is_some() {}
        }
    })
    .await;
}

/// What a session's WebSocket runs over: a TCP or TLS stream, upgraded from HTTP.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Socket for S {}

/// What one turn of the loop sends.
enum Outgoing {
    Nothing,
    /// Answers, in order.
    Envelopes(Vec<String>),
    /// A delivery from the hub; whatever else is queued goes with it, up to a batch.
    Delivery(Utf8Bytes),
}

/// Why sending stopped before the end.
enum Blocked {
    Stop(Stop),
    /// The socket's buffer is full: these are still to go.
    Full(Vec<Utf8Bytes>),
}

/// Queues what can go without waiting. Deliveries are taken up to a batch: `recv` flushes before it
/// reads, so one write then carries the batch instead of one write per message.
fn send_now<S: Socket>(ws: &mut WebSocket<S>, session: &mut Session, out: Outgoing) -> Result<(), Blocked> {
    match out {
        Outgoing::Nothing => Ok(()),
        Outgoing::Envelopes(envelopes) => {
            let mut envelopes = envelopes.into_iter().map(Utf8Bytes::from);
            while let Some(text) = envelopes.next() {
                if !try_send(ws, &text)? {
                    return Err(Blocked::Full(std::iter::once(text).chain(envelopes).collect()));
                }
            }
            Ok(())
        }
        Outgoing::Delivery(first) => {
            let mut next = Some(first);
            let mut taken: u64 = 0;
            while let Some(bytes) = next.take() {
                if !try_send(ws, &bytes)? {
                    // It goes once the socket drains; what else waits stays in the outbox, where the
                    // hub counts it against the bounds.
                    metrics().messages_delivered.by(Transport::WebSocket, taken + 1);
                    return Err(Blocked::Full(vec![bytes]));
                }
                taken += 1;
                if taken < DELIVERY_BATCH as u64 {
                    next = session.try_delivery();
                }
            }
            metrics().messages_delivered.by(Transport::WebSocket, taken);
            Ok(())
        }
    }
}

/// Queues one message if the socket has room now; false when it has none.
fn try_send<S: Socket>(ws: &mut WebSocket<S>, text: &Utf8Bytes) -> Result<bool, Blocked> {
    match poll_fn(|cx| Pin::new(&mut *ws).poll_ready(cx)).now_or_never() {
        Some(Ok(())) => Pin::new(&mut *ws)
            .start_send(Message::Text(text.clone()))
            .map(|()| true)
            .map_err(|_| Blocked::Stop(Stop::Dropped)),
        Some(Err(_)) => Err(Blocked::Stop(Stop::Dropped)),
        None => Ok(false),
    }
}

/// Waits (bounded) for room in the socket and queues the rest.
async fn send_when_ready<S: Socket>(ws: &mut WebSocket<S>, rest: Vec<Utf8Bytes>) -> Result<(), Stop> {
    for text in rest {
        match tokio::time::timeout(SEND_TIMEOUT, ws.feed(Message::Text(text))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Stop::Dropped),
            Err(_) => return Err(Stop::Close(End::too_slow("the connection stopped reading"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::access::{Access, OriginPolicy};
    use crate::chat::hub::Hub;
    use crate::chat::limits::{HubLimits, SessionLimits};
    use crate::chat::message::{NodeId, SystemClock};
    use crate::engine::memory::{LocalPresence, MemoryEngine};
    use crate::engine::{Engine, Retention};

    /// Every idle chat connection holds this future (and its session, inside it): a change that
    /// widens it shows up here before it shows up in `bench idle` against `serve`.
    #[tokio::test]
    async fn an_idle_chat_connection_future_stays_small() {
        let limits = HubLimits {
            outbox_messages: 8,
            outbox_bytes: 1024,
            max_rooms_per_connection: 1,
            max_presence: 1,
            max_sessions_per_user: 1,
        };
        let hub = Hub::new(limits, "lobby".into(), NodeId::new("t"), Arc::new(LocalPresence::default()));
        let retention = Retention { max_messages: 1, max_age: None, max_db_bytes: None };
        let engine: Arc<dyn Engine> = MemoryEngine::new(retention, hub.clone());
        let access = Access { verifier: None, allow_anonymous: true, origins: OriginPolicy::any(), api_key: None };
        let core = Arc::new(Core {
            hub,
            engine,
            access: Arc::new(access),
            limits: SessionLimits {
                max_message_chars: 1,
                max_name_chars: 1,
                join_backlog: 1,
                max_replay: 1,
                rate_limit: None,
                auth_timeout: Duration::from_secs(1),
                max_publish_rooms: 1,
                max_replay_bytes: 1024,
            },
            clock: Arc::new(SystemClock),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let ws = WebSocket::from_raw(stream, switchboard_ws::Role::Server, switchboard_ws::Config::default(), &[]);
        let live = Arc::new(AtomicUsize::new(0));
        let connection = run(Session::new(core, Dialect::Seed), None, ws, LiveGuard::new(&live));
        let size = std::mem::size_of_val(&connection);
        // 808 since the engine counts its own unsent replies apart from the caller's output (two
        // u32s, one of them beyond the padding it had), so that reading never waits on our own
        // large messages.
        assert!(size <= 808, "the chat connection's future is {size} bytes");
    }
}
