//! Publishing, shared by WebSocket clients and the HTTP publish API: validation against the limits,
//! and one queued engine publish per room, in order.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Instant, SystemTime};

use super::access::Identity;
use super::limits::SessionLimits;
use super::message::{check_name, check_room, now_hms, NewMessage, Refusal};
use super::wire::ErrorCode;
use super::Core;
use crate::engine::{Engine, EngineError, PendingPublish, Published};
use crate::metrics::{metrics, Transport};

/// A publish that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest {
    /// The rooms, each named once, in the order given.
    pub rooms: Vec<String>,
    /// The text.
    pub message: String,
    /// Display name of the sender.
    pub name: String,
    /// Idempotency key.
    pub id: Option<String>,
}

/// Longest idempotency key.
pub const MAX_ID_CHARS: usize = 128;

/// Checks a publish against the limits; the error names what is wrong (and is counted in
/// `messages_refused`, as every refused publish is).
pub fn validate_publish(
    limits: &SessionLimits,
    rooms: Vec<String>,
    message: String,
    name: Option<String>,
    id: Option<String>,
) -> Result<PublishRequest, Refusal> {
    validate(limits, rooms, message, name, id).inspect_err(|(code, _)| metrics().message_refused(code.label()))
}

/// A client's publish (over WebSocket or `POST /publish`) checked against the limits, under the name
/// it is shown with: a signed-in user's token's, else the one asked for; a guest asking for a
/// user's name gets it marked. The transport then applies its rate limit and [`check_grants`].
pub fn prepare_client_publish(
    core: &Core,
    identity: &Identity,
    rooms: Vec<String>,
    message: String,
    name: Option<String>,
    id: Option<String>,
) -> Result<PublishRequest, Refusal> {
    let name = identity.name.clone().or(name);
    let mut publish = validate_publish(&core.limits, rooms, message, name, id)?;
    // Each room counts against the client's message rate: more than a burst holds could never pass,
    // and "slow down" would be the wrong advice.
    if let Some(rate) = core.limits.rate_limit.filter(|rate| publish.rooms.len() > rate.burst as usize) {
        metrics().message_refused(ErrorCode::TooMany.label());
        let burst = rate.burst;
        let message = format!("a publish may name at most {burst} rooms here (each counts against --rate-burst)");
        return Err((ErrorCode::TooMany, message));
    }
    publish.name = core.access.guest_name(identity, publish.name);
    Ok(publish)
}

/// Refuses (and counts) a publish to a room the token does not allow.
pub fn check_grants(identity: &Identity, publish: &PublishRequest) -> Result<(), Refusal> {
    match publish.rooms.iter().find(|room| !identity.may_publish(room)) {
        Some(room) => {
            metrics().message_refused(ErrorCode::NotAllowed.label());
            Err((ErrorCode::NotAllowed, format!("this token does not allow publishing to {room:?}")))
        }
        None => Ok(()),
    }
}

fn validate(
    limits: &SessionLimits,
    rooms: Vec<String>,
    message: String,
    name: Option<String>,
    id: Option<String>,
) -> Result<PublishRequest, Refusal> {
    let mut seen = HashSet::new();
    let rooms: Vec<String> = rooms.into_iter().filter(|room| seen.insert(room.clone())).collect();
    if rooms.is_empty() {
        return Err((ErrorCode::BadRequest, "publish needs \"room\" or \"rooms\"".into()));
    }
    if rooms.len() > limits.max_publish_rooms {
        return Err((ErrorCode::TooMany, format!("a publish may name at most {} rooms", limits.max_publish_rooms)));
    }
    for room in &rooms {
        check_room(room)?;
    }
    if message.chars().count() > limits.max_message_chars {
        return Err((ErrorCode::TooLong, format!("message longer than {} characters", limits.max_message_chars)));
    }
    if let Some(name) = &name {
        check_name(name, limits.max_name_chars)?;
    }
    if id.as_ref().is_some_and(|id| id.is_empty() || id.chars().count() > MAX_ID_CHARS) {
        return Err((ErrorCode::BadRequest, format!("id must be 1-{MAX_ID_CHARS} characters")));
    }
    Ok(PublishRequest { rooms, message, name: name.unwrap_or_else(|| "Anonymous".into()), id })
}

/// Queues one message per room, in order, stamped with `now`; each resolves once committed.
pub fn submit(
    engine: &dyn Engine,
    publish: PublishRequest,
    now: SystemTime,
    transport: Transport,
) -> Vec<(String, Result<Counted, EngineError>)> {
    let started = Instant::now();
    let time = now_hms(now);
    publish
        .rooms
        .into_iter()
        .map(|room| {
            let queued = engine.publish(NewMessage {
                room: room.clone(),
                id: publish.id.clone(),
                name: publish.name.clone(),
                message: publish.message.clone(),
                time: time.clone(),
            });
            (room, queued.map(|pending| Counted { pending: Some(pending), transport, started }))
        })
        .collect()
}

/// A publish given to the engine, counted in the metrics once stored, whether or not anyone still
/// waits for its answer: a session that ends (cut for its rate, closed by its client) or an HTTP
/// client that goes with publishes in flight does not take them back.
pub struct Counted {
    /// Until the engine has answered.
    pending: Option<PendingPublish>,
    transport: Transport,
    started: Instant,
}

impl Future for Counted {
    type Output = Result<Published, EngineError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let pending = this.pending.as_mut().expect("a publish is not polled after its answer");
        let result = ready!(pending.as_mut().poll(cx));
        this.pending = None;
        if let Ok(published) = &result {
            count_stored(published, this.transport);
            metrics().publish_acked(this.transport, this.started.elapsed());
        }
        Poll::Ready(result)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else { return };
        // Rare (a publish in flight when its session ends), so a task of its own is no burden.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let transport = self.transport;
            runtime.spawn(async move {
                if let Ok(published) = pending.await {
                    count_stored(&published, transport);
                }
            });
        }
    }
}

fn count_stored(published: &Published, transport: Transport) {
    if !published.is_duplicate() {
        metrics().messages_published.inc(transport);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            max_message_chars: 5,
            max_name_chars: 3,
            join_backlog: 1,
            max_replay: 1,
            rate_limit: None,
            auth_timeout: std::time::Duration::from_secs(1),
            max_publish_rooms: 2,
            max_replay_bytes: 1 << 20,
        }
    }

    #[test]
    fn publishes_are_checked_and_rooms_named_once() {
        let ok = validate_publish(&limits(), vec!["a".into(), "a".into(), "b".into()], "hi".into(), None, None);
        assert_eq!(ok.unwrap().rooms, vec!["a", "b"]);
        let code = |r: Result<PublishRequest, Refusal>| r.unwrap_err().0;
        assert_eq!(code(validate_publish(&limits(), vec![], "hi".into(), None, None)), ErrorCode::BadRequest);
        let three = vec!["a".into(), "b".into(), "c".into()];
        assert_eq!(code(validate_publish(&limits(), three, "hi".into(), None, None)), ErrorCode::TooMany);
        assert_eq!(
            code(validate_publish(&limits(), vec!["a".into()], "toolong".into(), None, None)),
            ErrorCode::TooLong
        );
        let long_name = Some("Robert".into());
        assert_eq!(
            code(validate_publish(&limits(), vec!["a".into()], "hi".into(), long_name, None)),
            ErrorCode::TooLong
        );
        let empty_id = Some(String::new());
        assert_eq!(
            code(validate_publish(&limits(), vec!["a".into()], "hi".into(), None, empty_id)),
            ErrorCode::BadRequest
        );
    }
}
