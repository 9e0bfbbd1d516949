//! The server API under `/api`, for backends and operators: publish (to one room or many), rooms,
//! presence, history (paged, and removed), per-user commands (disconnect, subscribe, unsubscribe)
//! and server info. Every call takes the API key (`Authorization: Bearer KEY` or `X-API-Key`), and
//! every answer is JSON, errors included (`{"type": "error", "code", "message"}`).
//!
//! The OpenAPI 3.1 document at `/api/openapi.json` is generated from these handlers and types
//! (`utoipa`), so it cannot drift from them; CI runs schemathesis against it.
//!
//! In cluster mode, rooms and presence counts cover every node where the engine knows it (presence,
//! history), rooms listed are this node's, and the per-user commands reach every node through the
//! engine ([`crate::engine::Engine::broadcast`]).

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::http::{bearer, AppState};
use super::sse::query_pairs;
use crate::chat::message::{check_room, MAX_ROOM_CHARS};
use crate::chat::publish::{self, validate_publish, PublishRequest};
use crate::chat::wire::ErrorCode;
use crate::chat::Core;
use crate::engine::{Deliver, Published, StoredMessage, UserCommand};
use crate::metrics::{metrics, Transport};

/// Most messages one history page holds.
const MAX_PAGE: u64 = 1000;
/// Close code of a session ended by `POST /api/users/{sub}/disconnect` without one.
pub const DISCONNECT_CODE: u16 = 4002;

/// Why a call failed: every non-2xx answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// Always `error`.
    #[serde(rename = "type")]
    #[schema(example = "error")]
    pub kind: &'static str,
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
}

type Answer<T> = Result<Json<T>, Failure>;

/// A JSON answer with 200.
pub struct Json<T>(T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        json_response(StatusCode::OK, serde_json::to_string(&self.0).unwrap_or_default())
    }
}

/// A JSON error answer.
pub struct Failure(StatusCode, ErrorCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let Failure(status, code, message) = self;
        let body = serde_json::to_string(&ApiError { kind: "error", code, message }).unwrap_or_default();
        let mut response = json_response(status, body);
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        response
    }
}

pub(crate) fn fail(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Failure {
    Failure(status, code, message.into())
}

fn bad_request(message: impl Into<String>) -> Failure {
    fail(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}

fn bad_request_code(code: ErrorCode, message: impl Into<String>) -> Failure {
    fail(StatusCode::BAD_REQUEST, code, message)
}

fn unavailable(error: &crate::engine::EngineError) -> Failure {
    metrics().engine_error(error.kind());
    fail(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, error.to_string())
}

pub fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The API key check of every call.
fn authorize(core: &Core, headers: &HeaderMap) -> Result<(), Failure> {
    if core.access.api_key.is_none() {
        return Err(fail(
            StatusCode::NOT_FOUND,
            ErrorCode::NotAllowed,
            "the server API is off: start the server with --api-key",
        ));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    if presented.is_some_and(|key| core.access.api_key_matches(key)) {
        Ok(())
    } else {
        metrics().auth_failed("api_key");
        Err(fail(
            StatusCode::UNAUTHORIZED,
            ErrorCode::NotAllowed,
            "a valid API key is required (Authorization: Bearer KEY)",
        ))
    }
}

/// Reads a JSON body into `T`; a bad one is a 400 that says why.
fn body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Failure> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| fail(StatusCode::BAD_REQUEST, ErrorCode::BadJson, format!("not JSON: {e}")))?;
    // serde would also read a struct from an array of its fields.
    if !value.is_object() {
        return Err(bad_request("the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| bad_request(e.to_string()))
}

fn room_of(room: &str) -> Result<(), Failure> {
    check_room(room).map_err(|(_, message)| bad_request(message))
}

// ------------------------------------------------------------------------------------- publish

/// `POST /api/publish`: one message into one room (`room`) or several (`rooms`, a broadcast).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// One room (or `rooms`, not both).
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,64}$")]
    #[serde(default, deserialize_with = "not_null")]
    pub room: Option<String>,
    /// Several rooms at once: a broadcast (or `room`, not both).
    #[serde(default, deserialize_with = "not_null")]
    pub rooms: Option<Vec<String>>,
    /// The text (at most `--max-message-chars` characters).
    pub message: String,
    /// The sender's display name (default `Anonymous`; at most `--max-name-chars` characters).
    pub name: Option<String>,
    /// Idempotency key: the same `id` again in a room stores nothing and is answered with the first
    /// publish's offset (`duplicate: true`) for as long as that message is retained.
    #[schema(min_length = 1, max_length = 128)]
    pub id: Option<String>,
}

/// One room's acknowledgement.
#[derive(Debug, Serialize, ToSchema)]
pub struct AckItem {
    pub room: String,
    /// The message's offset in the room.
    pub offset: u64,
    /// The idempotency key given, or null.
    pub id: Option<String>,
    /// The key was seen before: this is the first publish's offset.
    pub duplicate: bool,
}

/// The acknowledgements of a publish, one per room, in the order of the request.
#[derive(Debug, Serialize, ToSchema)]
pub struct PublishAnswer {
    /// Always `ack`.
    #[serde(rename = "type")]
    #[schema(example = "ack")]
    pub kind: &'static str,
    pub acks: Vec<AckItem>,
}

#[utoipa::path(post, path = "/api/publish", tag = "publish", request_body = PublishBody, security(("api_key" = [])),
    responses(
        (status = 200, description = "Stored in every room", body = PublishAnswer),
        (status = 400, description = "Bad JSON, an invalid room, too many rooms, `room` and `rooms` both, a message or name too long (`too_long`)", body = ApiError),
        (status = 408, description = "The body did not arrive within the handshake timeout", body = ApiError),
        (status = 413, description = "The body is over the size limit (`too_long`)", body = ApiError),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "The history store could not store it; retry (the id keeps it once)", body = ApiError),
    ))]
pub async fn api_publish(State(state): State<AppState>, headers: HeaderMap, bytes: Bytes) -> Response {
    let core = &state.ws.core;
    let outcome = async {
        authorize(core, &headers)?;
        // A publish refused before its fields are checked is counted here (the checks count theirs).
        let counted = |failure: Failure| {
            metrics().message_refused(failure.1.label());
            failure
        };
        let request: PublishBody = body(&bytes).map_err(counted)?;
        let rooms = match (request.room, request.rooms) {
            (Some(_), Some(_)) => return Err(counted(bad_request("give \"room\" or \"rooms\", not both"))),
            (Some(room), None) => vec![room],
            (None, Some(rooms)) if rooms.is_empty() => return Err(counted(bad_request("\"rooms\" is empty"))),
            (None, Some(rooms)) => rooms,
            (None, None) => return Err(counted(bad_request("publish needs \"room\" or \"rooms\""))),
        };
        // Counted as given, repeats included, as the document's `maxItems` counts them.
        let most = core.limits.max_publish_rooms;
        if rooms.len() > most {
            let too_many = bad_request_code(ErrorCode::TooMany, format!("a publish may name at most {most} rooms"));
            return Err(counted(too_many));
        }
        let publish = validate_publish(&core.limits, rooms, request.message, request.name, request.id)
            .map_err(|(code, message)| fail(StatusCode::BAD_REQUEST, code, message))?;
        submit(core, publish).await
    };
    match outcome.await {
        Ok(answer) => answer.into_response(),
        Err(failure) => failure.into_response(),
    }
}

/// Stores a checked publish in each of its rooms; the acknowledgements, or 503 `unavailable`. The
/// tail of both HTTP publishes: this API's and the clients' `POST /publish`.
pub async fn submit(core: &Core, publish: PublishRequest) -> Answer<PublishAnswer> {
    let mut acks = Vec::new();
    for (_, queued) in publish::submit(core.engine.as_ref(), publish, core.clock.wall(), Transport::Http) {
        let outcome = match queued {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        let published = outcome.map_err(|e| {
            metrics().message_refused(ErrorCode::Unavailable.label());
            unavailable(&e)
        })?;
        acks.push(ack_item(&published));
    }
    Ok(Json(PublishAnswer { kind: "ack", acks }))
}

fn ack_item(published: &Published) -> AckItem {
    let m = published.message();
    AckItem { room: m.room.clone(), offset: m.offset, id: m.id.clone(), duplicate: published.is_duplicate() }
}

// ------------------------------------------------------------------------------------- info

/// What `GET /api/info` tells.
#[derive(Debug, Serialize, ToSchema)]
pub struct Info {
    /// The server's version.
    pub version: &'static str,
    /// This node's id (members' ids start with it).
    pub node: String,
    /// Every live node of the chat, this one included (in cluster mode, those whose lease runs).
    pub nodes: Vec<String>,
    /// Seconds since this node started.
    pub uptime_secs: u64,
    /// `sqlite` (one process), `memory`, or `redis` (cluster mode).
    pub engine: &'static str,
    /// Open TCP connections on this node.
    pub connections: usize,
    /// Chat sessions on this node (WebSocket, SSE, long poll).
    pub sessions: usize,
    /// Rooms with members on this node.
    pub rooms: usize,
}

#[utoipa::path(get, path = "/api/info", tag = "server", security(("api_key" = [])),
    responses(
        (status = 200, description = "This node", body = Info),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "Redis could not be asked for the nodes", body = ApiError),
    ))]
pub async fn info(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let core = &state.ws.core;
    if let Err(failure) = authorize(core, &headers) {
        return failure.into_response();
    }
    let node = core.hub.node().as_str().to_owned();
    let nodes = match core.engine.nodes().await {
        Ok(nodes) if nodes.is_empty() => vec![node.clone()],
        Ok(nodes) => nodes,
        Err(error) => return unavailable(&error).into_response(),
    };
    let info = Info {
        version: env!("CARGO_PKG_VERSION"),
        node,
        nodes,
        uptime_secs: state.started.elapsed().as_secs(),
        engine: state.engine_name,
        connections: state.connections.open(),
        sessions: core.hub.connection_count(),
        rooms: core.hub.room_count(),
    };
    Json(info).into_response()
}

// ------------------------------------------------------------------------------------- rooms

/// One room in `GET /api/rooms`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomSummary {
    pub room: String,
    /// Members on this node.
    pub members_here: usize,
    /// The room's last offset.
    pub offset: u64,
    /// The history its offsets belong to.
    pub epoch: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RoomList {
    /// Rooms with members on this node, by name.
    pub rooms: Vec<RoomSummary>,
}

#[utoipa::path(get, path = "/api/rooms", tag = "rooms", security(("api_key" = [])),
    responses(
        (status = 200, description = "Rooms with members on this node", body = RoomList),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "The history store could not be read", body = ApiError),
    ))]
pub async fn rooms(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let core = &state.ws.core;
    let outcome = async {
        authorize(core, &headers)?;
        let mut rooms = Vec::new();
        for (room, members_here) in core.hub.rooms() {
            let top = core.engine.top(&room).await.map_err(|e| unavailable(&e))?;
            rooms.push(RoomSummary { room, members_here, offset: top.offset, epoch: top.epoch.to_string() });
        }
        Ok::<_, Failure>(Json(RoomList { rooms }))
    };
    into_response(outcome.await)
}

/// The answer as a response: 200 with the JSON, or the error.
pub(crate) fn into_response<T: Serialize>(answer: Answer<T>) -> Response {
    match answer {
        Ok(json) => json.into_response(),
        Err(failure) => failure.into_response(),
    }
}

/// One member of a room.
#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    /// Unique across nodes.
    pub id: String,
    pub name: String,
}

/// `GET /api/rooms/{room}/presence`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Presence {
    pub room: String,
    /// Members on every node (in cluster mode), by id, up to the presence limit.
    pub members: Vec<Member>,
    /// More members than the limit: the list was cut.
    pub truncated: bool,
}

/// `GET /api/rooms/{room}/presence/count`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PresenceCount {
    pub room: String,
    /// Members listed (up to the presence limit).
    pub members: usize,
    /// More members than the limit.
    pub truncated: bool,
}

#[utoipa::path(get, path = "/api/rooms/{room}/presence", tag = "rooms", security(("api_key" = [])),
    params(("room" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,64}$", description = "A room name")),
    responses(
        (status = 200, description = "Who is in the room", body = Presence),
        (status = 400, description = "An invalid room name", body = ApiError),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "Presence could not be read", body = ApiError),
    ))]
pub async fn presence(State(state): State<AppState>, headers: HeaderMap, Path(room): Path<String>) -> Response {
    let core = &state.ws.core;
    let outcome = async {
        authorize(core, &headers)?;
        room_of(&room)?;
        let (entries, truncated) = core.hub.presence(&room).await.map_err(|e| unavailable(&e))?;
        let members = entries.into_iter().map(|e| Member { id: e.id, name: e.name }).collect();
        Ok::<_, Failure>(Json(Presence { room, members, truncated }))
    };
    into_response(outcome.await)
}

#[utoipa::path(get, path = "/api/rooms/{room}/presence/count", tag = "rooms", security(("api_key" = [])),
    params(("room" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,64}$", description = "A room name")),
    responses(
        (status = 200, description = "How many are in the room", body = PresenceCount),
        (status = 400, description = "An invalid room name", body = ApiError),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "Presence could not be read", body = ApiError),
    ))]
pub async fn presence_count(State(state): State<AppState>, headers: HeaderMap, Path(room): Path<String>) -> Response {
    let core = &state.ws.core;
    let outcome = async {
        authorize(core, &headers)?;
        room_of(&room)?;
        let (entries, truncated) = core.hub.presence(&room).await.map_err(|e| unavailable(&e))?;
        Ok::<_, Failure>(Json(PresenceCount { room, members: entries.len(), truncated }))
    };
    into_response(outcome.await)
}

// ------------------------------------------------------------------------------------- history

/// A stored chat message, as clients receive it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    /// Always `message`.
    #[serde(rename = "type")]
    #[schema(example = "message")]
    pub kind: &'static str,
    pub room: String,
    pub offset: u64,
    pub id: Option<String>,
    pub name: String,
    pub message: String,
    /// The server's local time, HH:MM:SS.
    pub time: String,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
}

impl From<StoredMessage> for Message {
    fn from(m: StoredMessage) -> Self {
        Self {
            kind: "message",
            room: m.room,
            offset: m.offset,
            id: m.id,
            name: m.name,
            message: m.message,
            time: m.time,
            ts: m.ts_ms,
        }
    }
}

/// One page of a room's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    pub room: String,
    /// The history the offsets belong to.
    pub epoch: String,
    /// Oldest first: the retained messages after `since`, at most `limit`.
    pub messages: Vec<Message>,
    /// The oldest offset still retained (`last + 1` when none is).
    pub first: u64,
    /// The room's last offset.
    pub last: u64,
    /// Where the next page starts (its `since`), or null when this page reaches the end.
    pub next_since: Option<u64>,
}

/// `POST /api/rooms/{room}/history/remove`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryRemoved {
    pub room: String,
    /// Messages removed.
    pub removed: u64,
}

#[utoipa::path(get, path = "/api/rooms/{room}/history", tag = "rooms", security(("api_key" = [])),
    params(
        ("room" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,64}$", description = "A room name"),
        ("since" = Option<u64>, Query, minimum = 0, description = "Messages after this offset (default 0: from the oldest retained)"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "Messages per page (default 100, at most 1000)"),
    ),
    responses(
        (status = 200, description = "A page of history", body = HistoryPage),
        (status = 400, description = "An invalid room, since or limit", body = ApiError),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "The history could not be read", body = ApiError),
    ))]
pub async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let core = &state.ws.core;
    let outcome = async {
        authorize(core, &headers)?;
        room_of(&room)?;
        let mut since = 0u64;
        let mut limit = 100u64;
        for (name, value) in query_pairs(query.as_deref())? {
            // As the document says: a non-negative 64-bit integer.
            let number = || {
                value.parse::<i64>().ok().and_then(|n| u64::try_from(n).ok()).ok_or_else(|| {
                    bad_request(format!("{name} must be a whole number from 0 to {}, not {value:?}", i64::MAX))
                })
            };
            match name.as_str() {
                "since" => since = number()?,
                "limit" => limit = number()?,
                _ => {}
            }
        }
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(bad_request(format!("limit must be 1 to {MAX_PAGE}")));
        }
        let top = core.engine.top(&room).await.map_err(|e| unavailable(&e))?;
        // Offsets are consecutive: (since, since + limit] is one page, oldest first.
        let up_to = since.saturating_add(limit).min(top.offset);
        let page = if since >= top.offset {
            crate::engine::History { messages: Vec::new(), first_retained: top.offset + 1, last_offset: top.offset }
        } else {
            core.engine.history(&room, since, up_to, limit as usize).await.map_err(|e| unavailable(&e))?
        };
        // A page below what is retained starts at the first retained message.
        let next_since = (up_to < top.offset).then_some(up_to.max(page.first_retained.saturating_sub(1)));
        Ok(Json(HistoryPage {
            room,
            epoch: top.epoch.to_string(),
            messages: page.messages.into_iter().map(Message::from).collect(),
            first: page.first_retained,
            last: top.offset,
            next_since,
        }))
    };
    into_response(outcome.await)
}

#[utoipa::path(post, path = "/api/rooms/{room}/history/remove", tag = "rooms", security(("api_key" = [])),
    params(("room" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,64}$", description = "A room name")),
    responses(
        (status = 200, description = "Removed; offsets go on from where they were", body = HistoryRemoved),
        (status = 400, description = "An invalid room name", body = ApiError),
        (status = 408, description = "The body did not arrive within the handshake timeout", body = ApiError),
        (status = 413, description = "The body is over the size limit (`too_long`)", body = ApiError),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "The history store could not do it", body = ApiError),
    ))]
pub async fn remove_history(State(state): State<AppState>, headers: HeaderMap, Path(room): Path<String>) -> Response {
    let core = &state.ws.core;
    let outcome = async {
        authorize(core, &headers)?;
        room_of(&room)?;
        let removed = core.engine.remove_history(&room).await.map_err(|e| unavailable(&e))?;
        tracing::info!(room, removed, "room history removed through the API");
        Ok::<_, Failure>(Json(HistoryRemoved { room, removed }))
    };
    into_response(outcome.await)
}

// ------------------------------------------------------------------------------------- users

/// `POST /api/users/{sub}/disconnect`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisconnectBody {
    /// The close code (3000-4999; default 4002).
    #[schema(value_type = Option<u16>, minimum = 3000, maximum = 4999)]
    #[serde(default, deserialize_with = "whole_number")]
    pub code: Option<f64>,
    /// The close reason (default "disconnected by the server"); a WebSocket's close frame carries
    /// its first 123 bytes.
    #[schema(max_length = 120)]
    pub reason: Option<String>,
}

/// A field that may be left out but, when given, is not `null`.
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

/// A JSON integer, written as `4002` or `4002.0` (JSON Schema counts both as integers).
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    let number = Option::<f64>::deserialize(deserializer)?;
    match number {
        Some(n) if n.fract() != 0.0 => Err(serde::de::Error::custom(format!("{n} is not a whole number"))),
        other => Ok(other),
    }
}

/// `POST /api/users/{sub}/subscribe` and `.../unsubscribe`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoomBody {
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,64}$")]
    pub room: String,
}

/// What a per-user command did.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserAnswer {
    pub sub: String,
    /// The command's sessions on this node.
    pub sessions_here: usize,
    /// Whether the command also went to every other node (cluster mode).
    pub all_nodes: bool,
}

const SUB_PARAM: &str = "The user: the `sub` of its tokens";
/// Longest close reason `disconnect` takes.
const MAX_REASON_CHARS: usize = 120;

async fn user_command(state: &AppState, headers: &HeaderMap, command: UserCommand) -> Response {
    let core = &state.ws.core;
    let outcome = async {
        authorize(core, headers)?;
        let sub = command.sub().to_owned();
        if sub.is_empty() {
            return Err(bad_request("the user's sub is empty"));
        }
        let sessions_here = Deliver::command(&*core.hub, &command).await;
        let all_nodes = core.engine.broadcast(&command).await.map_err(|e| unavailable(&e))?;
        Ok::<_, Failure>(Json(UserAnswer { sub, sessions_here, all_nodes }))
    };
    into_response(outcome.await)
}

#[utoipa::path(post, path = "/api/users/{sub}/disconnect", tag = "users", security(("api_key" = [])),
    params(("sub" = String, Path, min_length = 1, description = SUB_PARAM)), request_body = Option<DisconnectBody>,
    responses(
        (status = 200, description = "The user's sessions were closed (with the code and reason), on every node", body = UserAnswer),
        (status = 400, description = "Bad JSON, a close code outside 3000-4999, a reason over 120 characters, or an empty sub", body = ApiError),
        (status = 408, description = "The body did not arrive within the handshake timeout", body = ApiError),
        (status = 413, description = "The body is over the size limit (`too_long`)", body = ApiError),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "The command could not reach the other nodes", body = ApiError),
    ))]
pub async fn disconnect(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(sub): Path<String>,
    bytes: Bytes,
) -> Response {
    // JSON whitespace is space, tab, CR and LF (a form feed is not).
    let json_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = bytes.iter().position(|b| !json_space(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !json_space(b)).map_or(start, |last| last + 1);
    let trimmed = &bytes[start..end.max(start)];
    // Whitespace alone is not JSON: only a missing body or `null` means "no body".
    let empty = bytes.is_empty() || trimmed == b"null";
    let request: DisconnectBody = if empty {
        DisconnectBody::default()
    } else {
        match body(&bytes) {
            Ok(request) => request,
            Err(failure) => return authorized_or(&state, &headers, failure),
        }
    };
    let code = match request.code {
        None => DISCONNECT_CODE,
        Some(code) if (3000.0..=4999.0).contains(&code) => code as u16,
        Some(code) => {
            return authorized_or(&state, &headers, bad_request(format!("close code {code} is not 3000-4999")))
        }
    };
    let reason = request.reason.unwrap_or_else(|| "disconnected by the server".into());
    // Characters, as the document's `maxLength` counts; a close frame cuts it to its 123 bytes.
    if reason.chars().count() > MAX_REASON_CHARS {
        let message = format!("the reason is longer than {MAX_REASON_CHARS} characters");
        return authorized_or(&state, &headers, bad_request(message));
    }
    user_command(&state, &headers, UserCommand::Disconnect { sub, code, reason }).await
}

/// A bad request from a caller without the key is answered 401 (or 404), never with details.
fn key_first(state: &AppState, headers: &HeaderMap, failure: Failure) -> Failure {
    authorize(&state.ws.core, headers).err().unwrap_or(failure)
}

fn authorized_or(state: &AppState, headers: &HeaderMap, failure: Failure) -> Response {
    key_first(state, headers, failure).into_response()
}

fn room_command(state: &AppState, headers: &HeaderMap, bytes: &[u8]) -> Result<String, Failure> {
    let request: RoomBody = body(bytes).map_err(|failure| key_first(state, headers, failure))?;
    room_of(&request.room).map_err(|failure| key_first(state, headers, failure))?;
    Ok(request.room)
}

#[utoipa::path(post, path = "/api/users/{sub}/subscribe", tag = "users", security(("api_key" = [])),
    params(("sub" = String, Path, min_length = 1, description = SUB_PARAM)), request_body = RoomBody,
    responses(
        (status = 200, description = "The user's sessions joined the room (each gets `joined`, then live messages), on every node", body = UserAnswer),
        (status = 400, description = "Bad JSON, an invalid room, or an empty sub", body = ApiError),
        (status = 408, description = "The body did not arrive within the handshake timeout", body = ApiError),
        (status = 413, description = "The body is over the size limit (`too_long`)", body = ApiError),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "The command could not reach the other nodes", body = ApiError),
    ))]
pub async fn subscribe(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(sub): Path<String>,
    bytes: Bytes,
) -> Response {
    match room_command(&state, &headers, &bytes) {
        Ok(room) => user_command(&state, &headers, UserCommand::Subscribe { sub, room }).await,
        Err(failure) => failure.into_response(),
    }
}

#[utoipa::path(post, path = "/api/users/{sub}/unsubscribe", tag = "users", security(("api_key" = [])),
    params(("sub" = String, Path, min_length = 1, description = SUB_PARAM)), request_body = RoomBody,
    responses(
        (status = 200, description = "The user's sessions left the room (each gets `left` with reason `unsubscribed`), on every node", body = UserAnswer),
        (status = 400, description = "Bad JSON, an invalid room, or an empty sub", body = ApiError),
        (status = 408, description = "The body did not arrive within the handshake timeout", body = ApiError),
        (status = 413, description = "The body is over the size limit (`too_long`)", body = ApiError),
        (status = 401, description = "No API key, or a wrong one", body = ApiError),
        (status = 404, description = "The API is off (no --api-key)", body = ApiError),
        (status = 503, description = "The command could not reach the other nodes", body = ApiError),
    ))]
pub async fn unsubscribe(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(sub): Path<String>,
    bytes: Bytes,
) -> Response {
    match room_command(&state, &headers, &bytes) {
        Ok(room) => user_command(&state, &headers, UserCommand::Unsubscribe { sub, room }).await,
        Err(failure) => failure.into_response(),
    }
}

// ------------------------------------------------------------------------------------- the document

struct ApiKey;

impl Modify for ApiKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "The server's --api-key, as `Authorization: Bearer KEY` or in an `X-Api-Key: KEY` header",
            ))
            .build();
        components.add_security_scheme("api_key", SecurityScheme::Http(scheme));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Switchboard server API", description = "For backends and operators: publish, rooms, presence, history, users, server info."),
    paths(api_publish, info, rooms, presence, presence_count, history, remove_history, disconnect, subscribe, unsubscribe),
    components(schemas(ApiError, ErrorCode)),
    modifiers(&ApiKey),
)]
pub struct ApiDoc;

/// `GET /api/openapi.json`: the document (no key needed: it is the API's description), with this
/// server's limits written into the publish body's schema.
pub async fn openapi(State(state): State<AppState>) -> Response {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut doc = serde_json::to_value(&doc).unwrap_or_default();
    let limits = &state.ws.core.limits;
    let publish = &mut doc["components"]["schemas"]["PublishBody"];
    publish["properties"]["message"]["maxLength"] = limits.max_message_chars.into();
    publish["properties"]["name"]["maxLength"] = limits.max_name_chars.into();
    // Given, they are not null (see `not_null`).
    publish["properties"]["room"] = serde_json::json!({"type": "string", "pattern": ROOM_PATTERN});
    publish["properties"]["rooms"] = serde_json::json!({"type": "array", "items": {"type": "string"}});
    publish["properties"]["rooms"]["minItems"] = 1.into();
    publish["properties"]["rooms"]["maxItems"] = limits.max_publish_rooms.into();
    publish["properties"]["rooms"]["items"]["pattern"] = ROOM_PATTERN.into();
    // Exactly one of `room` and `rooms`.
    publish["oneOf"] = serde_json::json!([{"required": ["room"]}, {"required": ["rooms"]}]);
    json_response(StatusCode::OK, doc.to_string())
}

/// What a room name is, as a pattern.
const ROOM_PATTERN: &str = r"^[A-Za-z0-9_.:-]{1,64}$";

/// The longest room name, as the document's patterns say.
const _: () = assert!(MAX_ROOM_CHARS == 64, "update the room patterns of the API document");

#[cfg(test)]
mod tests {
    use super::*;

    /// `openapi` writes this server's limits into `PublishBody`'s fields by name: a field renamed in
    /// the type and not there would leave the document describing a field that no longer exists.
    #[test]
    fn the_publish_fields_the_document_refines_are_the_types_own() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let properties = doc["components"]["schemas"]["PublishBody"]["properties"].as_object().unwrap();
        let mut names: Vec<&str> = properties.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["id", "message", "name", "room", "rooms"]);
        assert_eq!(properties["message"]["type"], "string");
    }
}
