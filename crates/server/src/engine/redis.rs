//! The cluster engine: history, offsets, idempotency, fan-out and presence in Redis, so that any
//! number of `serve` nodes are one chat.
//!
//! **Keys** (per room, all with the room as hash tag, so that in a Redis Cluster they share a slot):
//! `sb:{ROOM}:m` a hash with the room's last offset (`o`), its epoch (`e`) and the run tag of the
//! Redis process it was last used under (`r`, see `room_epoch_lua`); `sb:{ROOM}:s` the stream
//! of messages, entry id `OFFSET-0`, trimmed to the retention count; `sb:{ROOM}:i` a sorted set of
//! idempotency keys scored by offset, trimmed with the stream, so a retry is recognised for as long
//! as its message is retained; `sb:{ROOM}:p` the room's presence (member id → `NODE\nNAME`);
//! `sb:{ROOM}:c` the room's pub/sub channel (sharded pub/sub in a Redis Cluster). Node leases live in
//! `sb:nodes` (a sorted set scored by lease expiry) and each node's rooms in `sb:node:{NODE}:rooms`.
//! With several Redis URLs, each room lives on one of them, chosen by a stable hash of its name
//! (FNV-1a, so every node picks the same one); node leases live on the first.
//!
//! **Publish** is one Lua script: check the idempotency key, assign the next offset, append to the
//! stream with trimming, publish on the channel. The acknowledgement waits for Redis' answer.
//!
//! **Delivery** is at-most-once in Redis' pub/sub, so each node keeps, per subscribed room, the last
//! offset it handed to its hub, and closes every gap from the stream before delivering what follows:
//! a message that skips offsets, a lost connection (after which every room is resubscribed and read
//! up to its top), a push queue that overflowed. A room whose epoch changed (Redis lost its data) or
//! whose missing messages are no longer retained is reset: its local members are let go and rejoin
//! with what they last saw, so they are told `recovered: false` instead of skipping silently.
//!
//! **Presence** is a hash per room plus a lease per node. Join, rename and leave events cross nodes on
//! the room's channel. Every node renews its lease; a node whose lease ran out is reaped by whichever
//! node sees it first: a script removes each of the dead node's members and publishes its leave, and
//! since a member is removed once, each gets exactly one leave event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, ProtocolVersion, PushInfo, PushKind, RedisFuture, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{
    age_cutoff_ms, epoch_text, new_epoch, random_u64, BoxFuture, Deliver, Engine, EngineError, History, NewMessage,
    PendingPublish, Position, Presence, PresenceEntry, Published, Retention, StoredMessage, UserCommand,
};

/// How to reach Redis and how long a node's members outlive it.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// One URL, or several (rooms are spread over them); one seed node's URL with `cluster`.
    pub urls: Vec<String>,
    /// Talk to a Redis Cluster (keys routed by slot, sharded pub/sub).
    pub cluster: bool,
    /// How long a node's presence lease lasts; it is renewed at a quarter of this.
    pub lease: Duration,
    /// How long a command may wait for Redis' answer before it fails as `unavailable`.
    pub timeout: Duration,
    /// This node's id (the hub's [`crate::chat::message::NodeId`]).
    pub node: String,
}

/// The start of every script that reads a room's epoch (KEYS: meta, stream, idempotency set;
/// ARGV[1]: a fresh epoch; ARGV[2] and ARGV[3]: the shard's [`RunTag`], its run id ('' when unknown)
/// and '1' when a restart may lose acknowledged writes). A room without an epoch (new, or its
/// history lost with a Redis that kept no data) draws ARGV[1], and anything left of its stream and
/// keys belongs to no epoch and goes. A room last used under a Redis process that could lose writes
/// (its run id in `r`) and has restarted since draws ARGV[1] too: the copy Redis came back with may
/// lack the room's last messages, and the next offsets it gives out may be ones clients have seen
/// for those. Leaves the epoch in `e`.
macro_rules! room_epoch_lua {
    () => {
        r#"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
end
if ARGV[2] ~= '' then
  local r = redis.call('HGET', KEYS[1], 'r')
  if r and r ~= ARGV[2] then
    e = ARGV[1]
    redis.call('HSET', KEYS[1], 'e', e)
  end
  if ARGV[3] == '1' then
    if r ~= ARGV[2] then redis.call('HSET', KEYS[1], 'r', ARGV[2]) end
  elseif r then
    redis.call('HDEL', KEYS[1], 'r')
  end
end
"#
    };
}

/// One atomic publish. KEYS: meta, stream, idempotency set. ARGV: a fresh epoch and the run tag's
/// two (see [`room_epoch_lua`]), the idempotency key ('' for none), the message body (JSON), the
/// count to keep, the age to keep in ms (0: no limit), the channel, and the publish command
/// (PUBLISH or SPUBLISH).
/// Sent with EVAL, not EVALSHA: after a Redis restart EVALSHA fails with NOSCRIPT, and retrying only
/// the failed calls could reorder one publisher's messages.
const PUBLISH_SCRIPT: &str = concat!(
    room_epoch_lua!(),
    r#"
if ARGV[4] ~= '' then
  local prev = redis.call('ZSCORE', KEYS[3], ARGV[4])
  if prev then
    local found = redis.call('XRANGE', KEYS[2], prev .. '-0', prev .. '-0')
    if #found > 0 then return {'dup', e, prev, found[1][2][2], found[1][2][4]} end
  end
end
local off = redis.call('HINCRBY', KEYS[1], 'o', 1)
local now = redis.call('TIME')
local ts = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], off .. '-0', 'm', ARGV[5], 't', ts)
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[3], off, ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', off - ARGV[6])
end
if tonumber(ARGV[7]) > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
redis.call(ARGV[9], ARGV[8], '{"o":' .. off .. ',"e":"' .. e .. '","t":' .. ts .. ',"m":' .. ARGV[5] .. '}')
return {'ok', e, off, '', ts}
"#
);

/// The room's top offset and epoch (ARGV: a fresh epoch and the run tag's two, see
/// [`room_epoch_lua`]).
const TOP_SCRIPT: &str = concat!(room_epoch_lua!(), "return {redis.call('HGET', KEYS[1], 'o'), e}\n");

/// A new epoch (ARGV[1]) for a room whose history went back without a restart: when its epoch is
/// still the stale one a node saw it under (ARGV[4]), so that nodes and retries change it once.
/// ARGV[2] and ARGV[3] are the run tag's (see [`room_epoch_lua`]). Returns the top and the epoch.
const NEW_EPOCH_SCRIPT: &str = concat!(
    room_epoch_lua!(),
    r#"
if e == ARGV[4] then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
end
return {redis.call('HGET', KEYS[1], 'o'), e}
"#
);

/// Adds or renames a member (KEYS[1] the presence hash; ARGV: id, node, name, channel, publish
/// command) and tells the room.
const PRESENCE_ADD_SCRIPT: &str = r#"
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\n' .. ARGV[3])
local event = 'update'
if new == 1 then event = 'join' end
redis.call(ARGV[5], ARGV[4], cjson.encode({p = event, n = ARGV[2], id = ARGV[1], name = ARGV[3]}))
return new
"#;

/// Removes a member (ARGV: id, channel, publish command) and tells the room, once.
const PRESENCE_REMOVE_SCRIPT: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local nl = string.find(v, '\n', 1, true)
redis.call(ARGV[3], ARGV[2], cjson.encode({p = 'leave', n = string.sub(v, 1, nl - 1), id = ARGV[1], name = string.sub(v, nl + 1)}))
return 1
"#;

/// Makes a node's members of a room exactly the given ones (ARGV: node, channel, publish command,
/// then id and name pairs): the node's others leave, missing or renamed ones join or update. With
/// no pairs it removes every member of a dead node, one leave each. Returns how many left.
const SYNC_SCRIPT: &str = r#"
local prefix = ARGV[1] .. '\n'
local left = 0
local keep = {}
for i = 4, #ARGV, 2 do keep[ARGV[i]] = ARGV[i + 1] end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local id, v = all[i], all[i + 1]
  if string.sub(v, 1, #prefix) == prefix and keep[id] == nil then
    redis.call('HDEL', KEYS[1], id)
    redis.call(ARGV[3], ARGV[2], cjson.encode({p = 'leave', n = ARGV[1], id = id, name = string.sub(v, #prefix + 1)}))
    left = left + 1
  end
end
for i = 4, #ARGV, 2 do
  local id, name = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[1], id) ~= prefix .. name then
    local event = 'update'
    if redis.call('HSET', KEYS[1], id, prefix .. name) == 1 then event = 'join' end
    redis.call(ARGV[3], ARGV[2], cjson.encode({p = event, n = ARGV[1], id = id, name = name}))
  end
end
return left
"#;

/// Removes a room's messages and idempotency keys (KEYS: stream, idempotency set); the offset in
/// the meta hash stays, so offsets go on. Returns how many messages there were.
const REMOVE_HISTORY_SCRIPT: &str = r#"
local n = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
return n
"#;

/// Publishes queued per shard before new ones are refused as busy.
const PUBLISH_QUEUE: usize = 16 * 1024;
/// Publishes sent to Redis at once (pipelined) by a shard's writer.
const PUBLISH_BATCH: usize = 256;
/// Pushes (pub/sub messages) queued per shard; past it they are dropped and the rooms are read back
/// from their streams, so a burst costs a catch-up, not a message.
const PUSH_QUEUE: usize = 64 * 1024;
/// Presence changes queued; past it the node re-announces its members from its own list.
const PRESENCE_QUEUE: usize = 64 * 1024;
/// Messages read from a stream at once when closing a gap.
const FILL_PAGE: usize = 500;

fn meta_key(room: &str) -> String {
    format!("sb:{{{room}}}:m")
}
fn stream_key(room: &str) -> String {
    format!("sb:{{{room}}}:s")
}
fn idem_key(room: &str) -> String {
    format!("sb:{{{room}}}:i")
}
fn presence_key(room: &str) -> String {
    format!("sb:{{{room}}}:p")
}
fn channel(room: &str) -> String {
    format!("sb:{{{room}}}:c")
}
fn room_of_channel(channel: &[u8]) -> Option<&str> {
    std::str::from_utf8(channel).ok()?.strip_prefix("sb:{")?.strip_suffix("}:c")
}
/// Where the server API's per-user commands go to every node (its own slot in a Redis Cluster; not
/// a room's channel, which ends in `:c`).
const CONTROL_CHANNEL: &str = "sb:{sb.control}:ctl";
const NODES_KEY: &str = "sb:nodes";
/// Where a Redis stands in the nodes' `--redis` list (see `check_shard_place`).
const SHARD_KEY: &str = "sb:shard";
fn node_rooms_key(node: &str) -> String {
    format!("sb:node:{{{node}}}:rooms")
}

/// FNV-1a: stable across processes and versions (unlike std's hasher), so every node puts a room on
/// the same shard.
fn shard_hash(room: &str) -> u64 {
    room.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A connection to one Redis server (reconnecting by itself) or to a Redis Cluster.
#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

impl Link {
    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, EngineError> {
        cmd.query_async(self).await.map_err(unavailable)
    }

    async fn subscribe(&mut self, channel: &str) -> Result<(), EngineError> {
        match self {
            Link::Single(c) => c.subscribe(channel).await,
            Link::Cluster(c) => c.ssubscribe(channel).await,
        }
        .map_err(unavailable)
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<(), EngineError> {
        match self {
            Link::Single(c) => c.unsubscribe(channel).await,
            Link::Cluster(c) => c.sunsubscribe(channel).await,
        }
        .map_err(unavailable)
    }

    fn publish_command(&self) -> &'static str {
        match self {
            Link::Single(_) => "PUBLISH",
            Link::Cluster(_) => "SPUBLISH",
        }
    }
}

fn unavailable(error: redis::RedisError) -> EngineError {
    EngineError::Unavailable(format!("redis: {error}"))
}

fn script(source: &str, keys: &[&str], args: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(source).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

/// The JSON body of a message in the stream and on the channel (the room and offset are in the key).
#[derive(Serialize, Deserialize)]
struct Body {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    name: String,
    message: String,
    time: String,
}

impl Body {
    fn of(message: &NewMessage) -> Self {
        Self {
            id: message.id.clone(),
            name: message.name.clone(),
            message: message.message.clone(),
            time: message.time.clone(),
        }
    }

    fn into_stored(self, room: String, offset: u64, ts_ms: i64) -> StoredMessage {
        StoredMessage { room, offset, id: self.id, name: self.name, message: self.message, time: self.time, ts_ms }
    }
}

/// What arrives on a room's channel: a message (`o`, `e`, `t`, `m`) or a presence event (`p`, `n`,
/// `id`, `name`).
#[derive(Deserialize)]
struct ChannelEvent {
    o: Option<u64>,
    e: Option<String>,
    t: Option<i64>,
    m: Option<Body>,
    p: Option<String>,
    n: Option<String>,
    id: Option<String>,
    name: Option<String>,
}

enum Control {
    Subscribe(String),
    Unsubscribe(String),
}

type Job = (NewMessage, tokio::sync::oneshot::Sender<Result<Published, EngineError>>);

/// One Redis server (or the whole cluster) and what this node does with it.
struct Shard {
    link: Link,
    jobs: mpsc::Sender<Job>,
    control: mpsc::UnboundedSender<Control>,
    /// Rooms this node wants delivered, each with whether its delivery is caught up (a join waits
    /// for it before reading the top).
    wanted: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Set by the push sender when its queue was full: some message was dropped.
    overflowed: Arc<AtomicBool>,
    /// How often the link lost its connection (Disconnection pushes, counted by the push sender):
    /// past one, the Redis on the other side may be another process.
    disconnects: Arc<AtomicU64>,
    /// The run tag as last read, with the count of disconnections it was read after.
    run_tag: Mutex<Option<(u64, RunTag)>>,
}

/// What the scripts that read a room's epoch are given to find rooms last used before a restart of
/// Redis that may have lost their last messages (see [`room_epoch_lua`]).
#[derive(Clone, PartialEq)]
struct RunTag {
    /// The Redis process's `run_id`; '' when unknown (INFO refused, or a Redis Cluster, where no one
    /// process answers): no check then.
    run: Arc<str>,
    /// Whether a restart of this process may lose acknowledged writes (anything but `appendfsync
    /// always`, or settings it would not tell).
    lossy: bool,
}

impl RunTag {
    fn lossy_arg(&self) -> &'static str {
        if self.lossy {
            "1"
        } else {
            ""
        }
    }
}

impl Shard {
    fn wanted(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shard's [`RunTag`], read again after every lost connection (the Redis that answers next
    /// may be another process), with the count of disconnections it was read after, for
    /// [`Shard::restarted_since`].
    async fn run_tag(&self) -> Result<(RunTag, u64), EngineError> {
        let seen = self.disconnects.load(Ordering::SeqCst);
        if let Some((at, tag)) = &*self.run_tag.lock().unwrap_or_else(|p| p.into_inner()) {
            if *at == seen {
                return Ok((tag.clone(), seen));
            }
        }
        let mut link = self.link.clone();
        let tag = match run_id(&mut link).await? {
            Some(run) => {
                let lossy = !matches!(Durability::of(&mut link).await?, Durability::EveryWrite);
                RunTag { run: run.into(), lossy }
            }
            None => RunTag { run: "".into(), lossy: true },
        };
        *self.run_tag.lock().unwrap_or_else(|p| p.into_inner()) = Some((seen, tag.clone()));
        Ok((tag, seen))
    }

    /// Whether a command sent with `tag`, read after `seen` disconnections, may have reached a Redis
    /// that has restarted since (and so was not checked against its new run id).
    async fn restarted_since(&self, tag: &RunTag, seen: u64) -> bool {
        if self.disconnects.load(Ordering::SeqCst) == seen {
            return false;
        }
        !matches!(self.run_tag().await, Ok((now, _)) if now == *tag)
    }
}

enum PresenceOp {
    Add(String, PresenceEntry),
    Remove(String, String),
    /// This node has members in the room now (true) or no more (false): its list of rooms, for
    /// whoever reaps it, kept on the first shard with the leases. In the queue, so that a quick
    /// leave and join again keep their order.
    Track(String, bool),
}

struct Shared {
    shards: Vec<Shard>,
    settings: RedisSettings,
    retention: Retention,
    closed: AtomicBool,
    presence_tx: mpsc::Sender<PresenceOp>,
    presence_overflowed: AtomicBool,
    /// This node's members by room (id → name): re-announced when the node's lease was lost.
    mirror: Mutex<HashMap<String, HashMap<String, String>>>,
}

impl Shared {
    fn shard(&self, room: &str) -> &Shard {
        &self.shards[(shard_hash(room) % self.shards.len() as u64) as usize]
    }

    fn mirror(&self) -> MutexGuard<'_, HashMap<String, HashMap<String, String>>> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn top(&self, room: &str) -> Result<Position, EngineError> {
        let shard = self.shard(room);
        // A few tries, not a loop without end on a connection that keeps failing.
        for _ in 0..3 {
            let (tag, seen) = shard.run_tag().await?;
            let keys = [meta_key(room), stream_key(room), idem_key(room)];
            let cmd =
                script(TOP_SCRIPT, &keys.each_ref().map(String::as_str), &[&new_epoch(), &tag.run, tag.lossy_arg()]);
            let (offset, epoch): (u64, String) = shard.link.clone().query(&cmd).await?;
            // Read from a Redis that restarted after the tag was: read again with its own.
            if !shard.restarted_since(&tag, seen).await {
                return Ok(Position { offset, epoch: epoch.into() });
            }
        }
        Err(EngineError::Unavailable("redis: the connection kept failing while reading a room".into()))
    }

    /// Messages with offsets from `from` up to `to`, oldest first, at most `count`.
    async fn range(&self, room: &str, from: u64, to: u64, count: usize) -> Result<Vec<StoredMessage>, EngineError> {
        let mut link = self.shard(room).link.clone();
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(stream_key(room)).arg(format!("{from}-0")).arg(format!("{to}-0")).arg("COUNT").arg(count);
        let entries: Vec<(String, Vec<(String, String)>)> = link.query(&cmd).await?;
        entries.into_iter().map(|entry| stored(room, entry)).collect()
    }
}

/// A stream entry as a message.
fn stored(room: &str, (id, fields): (String, Vec<(String, String)>)) -> Result<StoredMessage, EngineError> {
    let bad = || EngineError::Read(format!("malformed stream entry {id} in room {room}"));
    let offset = id.split('-').next().and_then(|o| o.parse().ok()).ok_or_else(bad)?;
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let body: Body = serde_json::from_str(field("m").ok_or_else(bad)?).map_err(|_| bad())?;
    let ts_ms = field("t").and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok(body.into_stored(room.to_owned(), offset, ts_ms))
}

/// Connected to Redis, not yet delivering: [`RedisConnector::presence`] is for the hub, which is then
/// given to [`RedisConnector::start`] as the sink.
pub struct RedisConnector {
    shared: Arc<Shared>,
    pushes: Vec<mpsc::Receiver<PushInfo>>,
    jobs: Vec<mpsc::Receiver<Job>>,
    controls: Vec<mpsc::UnboundedReceiver<Control>>,
    presence_rx: mpsc::Receiver<PresenceOp>,
}

/// One setting of the Redis server (`CONFIG GET`); `None` when refused (managed services refuse it).
async fn config_value(link: &mut Link, name: &str) -> Result<Option<String>, EngineError> {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg(name);
    // A map in RESP3 (what the links speak), pairs in RESP2: a map reads both.
    let answer: Option<HashMap<String, String>> = refusable(cmd.query_async(link).await, "CONFIG GET")?;
    Ok(answer.map(|answer| answer.get(name).cloned().unwrap_or_default()))
}

/// A command's answer; `None` when Redis refused the command itself (renamed away, or not allowed
/// to this user, as managed services and ACLs do), which is logged; other failures are errors.
fn refusable<T>(answer: redis::RedisResult<T>, what: &str) -> Result<Option<T>, EngineError> {
    match answer {
        Ok(value) => Ok(Some(value)),
        Err(error) if matches!(error.code(), Some("NOPERM" | "ERR")) => {
            tracing::warn!(%error, "redis refused {what}");
            Ok(None)
        }
        Err(error) => Err(unavailable(error)),
    }
}

/// What a Redis server keeps through a restart, from its settings.
enum Durability {
    /// `appendonly yes`, `appendfsync always`: every acknowledged write.
    EveryWrite,
    /// `appendonly yes` with another `appendfsync`: all but the last second or so.
    Log(String),
    /// `appendonly no`, snapshots (`save`): what the last snapshot had.
    Snapshots(String),
    /// Neither: nothing.
    Nothing,
    /// `CONFIG GET` refused (managed services refuse it).
    Unknown,
}

impl Durability {
    async fn of(link: &mut Link) -> Result<Self, EngineError> {
        Ok(match (config_value(link, "appendonly").await?.as_deref(), config_value(link, "appendfsync").await?) {
            (Some("yes"), Some(fsync)) if fsync == "always" => Self::EveryWrite,
            (Some("yes"), Some(fsync)) => Self::Log(fsync),
            (Some(_), Some(_)) => match config_value(link, "save").await?.filter(|save| !save.is_empty()) {
                Some(save) => Self::Snapshots(save),
                None => Self::Nothing,
            },
            _ => Self::Unknown,
        })
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EveryWrite => {
                f.write_str("appendonly yes, appendfsync always: every acknowledged message survives a crash of Redis")
            }
            Self::Log(fsync) => {
                write!(f, "appendonly yes, appendfsync {fsync}: a crash of Redis can lose the last second of messages")
            }
            Self::Snapshots(save) => write!(
                f,
                "appendonly no, snapshots (save {save}): a restart of Redis goes back to the last snapshot \
                 (rooms get a new epoch)"
            ),
            Self::Nothing => f.write_str("appendonly no: a restart of Redis loses history (rooms get a new epoch)"),
            Self::Unknown => f.write_str("unknown (CONFIG GET refused)"),
        }
    }
}

/// Each room lives on the shard its name hashes to among the `--redis` URLs in their order, so every
/// node must list the same servers in the same order: a node that listed them otherwise would read
/// and write rooms where the others do not look. The first node to use a Redis records its place
/// there (`sb:shard`, `index/count`); a node that would use it at another place is refused.
async fn check_shard_place(link: &mut Link, name: &str, index: usize, count: usize) -> Result<(), EngineError> {
    let place = format!("{index}/{count}");
    // SET NX, then GET (not SET NX GET, which Redis 6 does not take). A Redis that does not answer
    // is an `Open` error, which a node started before its Redis waits out.
    let failed = |e: EngineError| EngineError::Open { path: name.to_owned(), reason: e.to_string() };
    let mut set = redis::cmd("SET");
    set.arg(SHARD_KEY).arg(&place).arg("NX");
    let _: Option<String> = link.query(&set).await.map_err(failed)?;
    let recorded: Option<String> = link.query(redis::cmd("GET").arg(SHARD_KEY)).await.map_err(failed)?;
    match recorded {
        Some(recorded) if recorded != place => Err(EngineError::Misconfigured {
            path: name.to_owned(),
            reason: format!(
                "other nodes use this Redis as shard {recorded} (index/count) of their --redis list, this node \
                 as {place}: give every node the same --redis URLs in the same order (after moving rooms to \
                 other shards on purpose, `DEL {SHARD_KEY}` on each)"
            ),
        }),
        _ => Ok(()),
    }
}

/// The Redis server's `run_id`: new at every start of the process. `None` from a Redis Cluster
/// (which node would answer is the client's choice) or when INFO is refused or has none.
async fn run_id(link: &mut Link) -> Result<Option<String>, EngineError> {
    if matches!(link, Link::Cluster(_)) {
        return Ok(None);
    }
    let mut cmd = redis::cmd("INFO");
    cmd.arg("server");
    let info: Option<String> = refusable(cmd.query_async(link).await, "INFO: restarts that lose writes go unseen")?;
    Ok(info.and_then(|info| info.lines().find_map(|line| line.strip_prefix("run_id:")).map(|id| id.trim().to_owned())))
}

impl RedisConnector {
    /// Connects to every URL (failing if one cannot be reached) and logs what durability each offers.
    pub async fn connect(settings: RedisSettings, retention: Retention) -> Result<Self, EngineError> {
        let open = |url: &str, reason: String| EngineError::Open { path: url.to_owned(), reason };
        let mut shards = Vec::new();
        let mut pushes = Vec::new();
        let mut jobs = Vec::new();
        let mut controls = Vec::new();
        let groups: Vec<Vec<String>> = if settings.cluster {
            vec![settings.urls.clone()]
        } else {
            settings.urls.iter().map(|u| vec![u.clone()]).collect()
        };
        for urls in groups {
            let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
            let overflowed = Arc::new(AtomicBool::new(false));
            let flag = overflowed.clone();
            let disconnects = Arc::new(AtomicU64::new(0));
            let counter = disconnects.clone();
            let sender = move |info: PushInfo| {
                if info.kind == PushKind::Disconnection {
                    // Counted here, not when the subscriber gets to it: the link is reconnecting
                    // already, and the writer should learn of it before it sends again.
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                if push_tx.try_send(info).is_err() {
                    flag.store(true, Ordering::Relaxed);
                }
                Ok::<(), redis::aio::SendError>(())
            };
            let name = urls.join(",");
            let mut link = if settings.cluster {
                let client = redis::cluster::ClusterClient::builder(urls.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(sender)
                    .connection_timeout(settings.timeout)
                    .response_timeout(settings.timeout)
                    .retries(2)
                    .build()
                    .map_err(|e| open(&name, e.to_string()))?;
                Link::Cluster(client.get_async_connection().await.map_err(|e| open(&name, e.to_string()))?)
            } else {
                let info = redis::IntoConnectionInfo::into_connection_info(urls[0].as_str())
                    .map_err(|e| open(&name, e.to_string()))?;
                let redis_settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                let info = info.set_redis_settings(redis_settings);
                let client = redis::Client::open(info).map_err(|e| open(&name, e.to_string()))?;
                let config = ConnectionManagerConfig::new()
                    .set_push_sender(sender)
                    .set_connection_timeout(Some(settings.timeout))
                    .set_response_timeout(Some(settings.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let manager =
                    client.get_connection_manager_with_config(config).await.map_err(|e| open(&name, e.to_string()))?;
                Link::Single(manager)
            };
            let durability = Durability::of(&mut link).await.map_err(|e| open(&name, e.to_string()))?;
            tracing::info!(redis = %name, %durability, "connected to redis");
            if !settings.cluster {
                check_shard_place(&mut link, &name, shards.len(), settings.urls.len()).await?;
            }
            let (job_tx, job_rx) = mpsc::channel(PUBLISH_QUEUE);
            let (control_tx, control_rx) = mpsc::unbounded_channel();
            shards.push(Shard {
                link,
                jobs: job_tx,
                control: control_tx,
                wanted: Mutex::default(),
                overflowed,
                disconnects,
                run_tag: Mutex::default(),
            });
            pushes.push(push_rx);
            jobs.push(job_rx);
            controls.push(control_rx);
        }
        let (presence_tx, presence_rx) = mpsc::channel(PRESENCE_QUEUE);
        let shared = Arc::new(Shared {
            shards,
            settings,
            retention,
            closed: AtomicBool::new(false),
            presence_tx,
            presence_overflowed: AtomicBool::new(false),
            mirror: Mutex::default(),
        });
        Ok(Self { shared, pushes, jobs, controls, presence_rx })
    }

    /// Cluster-wide presence, for the hub.
    pub fn presence(&self) -> Arc<dyn Presence> {
        Arc::new(RedisPresence(self.shared.clone()))
    }

    /// Starts delivering into `sink` (the hub), renewing this node's lease and reaping dead nodes.
    pub fn start(self, sink: Arc<dyn Deliver>) -> Arc<RedisEngine> {
        let Self { shared, pushes, jobs, controls, presence_rx } = self;
        let mut tasks = Vec::new();
        for (index, ((pushes, jobs), controls)) in pushes.into_iter().zip(jobs).zip(controls).enumerate() {
            tasks.push(tokio::spawn(write(shared.clone(), index, jobs)));
            let subscriber = Subscriber { shared: shared.clone(), index, sink: sink.clone(), tracked: HashMap::new() };
            tasks.push(tokio::spawn(subscriber.run(pushes, controls)));
        }
        tasks.push(tokio::spawn(presence(Arc::downgrade(&shared), presence_rx)));
        tasks.push(tokio::spawn(leases(Arc::downgrade(&shared))));
        Arc::new(RedisEngine { shared, tasks: Mutex::new(tasks) })
    }
}

/// The engine of a cluster node (see the module's docs).
pub struct RedisEngine {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A per-user command on [`CONTROL_CHANNEL`], with the node it came from (which ran it already).
#[derive(serde::Serialize, serde::Deserialize)]
struct ControlMessage {
    from: String,
    command: UserCommand,
}

/// A shard's writer: sends queued publishes in order, pipelined, and answers each.
async fn write(shared: Arc<Shared>, index: usize, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while jobs.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let shard = &shared.shards[index];
        let tag = match shard.run_tag().await {
            Ok((tag, _)) => tag,
            Err(error) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(error.clone()));
                }
                continue;
            }
        };
        let link = shard.link.clone();
        let publish = link.publish_command();
        let keep = shared.retention.max_messages.to_string();
        let age_ms = shared.retention.max_age.map_or(0, |age| age.as_millis() as u64).to_string();
        // One random draw per batch, and a different epoch for each publish from it: two publishes
        // of one batch to the same room may both find it without one (Redis restarted between them,
        // its history lost), and must not both give it the same.
        let epochs = random_u64();
        let calls = batch.iter().enumerate().map(|(i, (message, _))| {
            let mut link = link.clone();
            let body = serde_json::to_string(&Body::of(message)).expect("strings serialize");
            let room = &message.room;
            let cmd = script(
                PUBLISH_SCRIPT,
                &[&meta_key(room), &stream_key(room), &idem_key(room)],
                &[
                    &epoch_text(epochs.wrapping_add(i as u64)),
                    &tag.run,
                    tag.lossy_arg(),
                    message.id.as_deref().unwrap_or(""),
                    &body,
                    &keep,
                    &age_ms,
                    &channel(room),
                    publish,
                ],
            );
            // Each call is queued on the connection when first polled, and `join_all` polls them in
            // order: they reach Redis in the order they were published.
            async move { cmd.query_async::<(String, String, u64, String, i64)>(&mut link).await }
        });
        let answers = join_all(calls).await;
        for ((message, reply), answer) in batch.drain(..).zip(answers) {
            let answer = answer.map_err(|error| {
                if error.is_timeout() || error.is_connection_dropped() {
                    // Sent, and perhaps run: only the answer is missing.
                    EngineError::Unanswered(format!("redis: {error}"))
                } else {
                    unavailable(error)
                }
            });
            let result = answer.and_then(|(kind, _epoch, offset, stored_body, ts_ms)| {
                if kind == "dup" {
                    let body: Body = serde_json::from_str(&stored_body)
                        .map_err(|e| EngineError::Read(format!("malformed stored message: {e}")))?;
                    Ok(Published::Duplicate(body.into_stored(message.room, offset, ts_ms)))
                } else {
                    let NewMessage { room, id, name, message, time } = message;
                    Ok(Published::Stored(StoredMessage { room, offset, id, name, message, time, ts_ms }))
                }
            });
            let _ = reply.send(result);
        }
    }
}

/// Where a subscribed room's delivery stands on this node.
struct Tracked {
    epoch: String,
    /// The last offset handed to the hub.
    last: u64,
    /// The last offset the room's channel brought. Pub/sub brings a room's messages in offset order
    /// (the publish script numbers and publishes at once), so one not above it means Redis went
    /// back to an older copy of the room and gives offsets out again.
    channel_last: u64,
}

/// A shard's pub/sub side: subscriptions, delivery in offset order, gap closing.
struct Subscriber {
    shared: Arc<Shared>,
    index: usize,
    sink: Arc<dyn Deliver>,
    tracked: HashMap<String, Tracked>,
}

impl Subscriber {
    fn shard(&self) -> &Shard {
        &self.shared.shards[self.index]
    }

    async fn run(mut self, mut pushes: mpsc::Receiver<PushInfo>, mut controls: mpsc::UnboundedReceiver<Control>) {
        let mut health = tokio::time::interval(Duration::from_millis(250));
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first shard's subscriber also takes the per-user commands of other nodes.
        let mut down = self.index == 0 && self.shard().link.clone().subscribe(CONTROL_CHANNEL).await.is_err();
        loop {
            tokio::select! {
                biased;
                push = pushes.recv() => match push {
                    Some(push) => {
                        if push.kind == PushKind::Disconnection {
                            tracing::warn!("lost the redis connection: delivery waits until it is back");
                            down = true;
                            self.set_all_ready(false);
                        } else if let Err(error) = self.on_push(push).await {
                            tracing::warn!(%error, "redis read failed while delivering");
                            down = true;
                            self.set_all_ready(false);
                        }
                    }
                    None => return,
                },
                control = controls.recv() => match control {
                    Some(control) => self.on_control(control).await,
                    None => return,
                },
                _ = health.tick() => {
                    if self.shared.closed.load(Ordering::Relaxed) {
                        return;
                    }
                    // A cheap probe every tick: the connection manager backs off its own reconnects,
                    // and a probe that waited longer would find its last failed attempt and wait again.
                    if down {
                        down = !self.recover().await;
                    }
                }
            }
            if self.shard().overflowed.swap(false, Ordering::Relaxed) {
                // Whatever was dropped (messages, a subscription's confirmation), resubscribing
                // every room reads each one back up to its top.
                tracing::warn!("pub/sub messages arrived faster than they were handled: reading the rooms back");
                down = true;
                self.set_all_ready(false);
            }
        }
    }

    fn set_all_ready(&self, ready: bool) {
        for watch in self.shard().wanted().values() {
            watch.send_replace(ready);
        }
    }

    /// After a lost connection: once Redis answers again, subscribes every wanted room again (each
    /// confirmation catches its room up). True once that is done.
    async fn recover(&mut self) -> bool {
        let mut link = self.shard().link.clone();
        if link.query::<String>(&redis::cmd("PING")).await.is_err() {
            return false;
        }
        if self.index == 0 && link.subscribe(CONTROL_CHANNEL).await.is_err() {
            return false;
        }
        // A Redis that restarted without keeping every write (snapshots, `appendfsync everysec`) may
        // have gone back to an older copy. Each room's confirmation reads its top with the new run
        // tag, which gives it a new epoch (see `room_epoch_lua`), and catching up resets it.
        let rooms: Vec<String> = self.shard().wanted().keys().cloned().collect();
        for room in &rooms {
            if let Err(error) = link.subscribe(&channel(room)).await {
                tracing::warn!(%error, "resubscribing after a lost redis connection");
                return false;
            }
        }
        tracing::info!(rooms = rooms.len(), "redis is back: rooms resubscribed and caught up");
        true
    }

    async fn on_control(&mut self, control: Control) {
        let mut link = self.shard().link.clone();
        match control {
            Control::Subscribe(room) => {
                if self.shard().wanted().contains_key(&room) {
                    if let Err(error) = link.subscribe(&channel(&room)).await {
                        // The health check subscribes it again once Redis answers.
                        tracing::warn!(%error, room, "subscribing a room");
                    }
                }
            }
            Control::Unsubscribe(room) => {
                // Wanted again meanwhile: the subscription stays.
                if !self.shard().wanted().contains_key(&room) {
                    self.tracked.remove(&room);
                    if let Err(error) = link.unsubscribe(&channel(&room)).await {
                        tracing::debug!(%error, room, "unsubscribing a room");
                    }
                }
            }
        }
    }

    async fn on_push(&mut self, push: PushInfo) -> Result<(), EngineError> {
        let channel_name = match push.data.first() {
            Some(Value::BulkString(name)) => name.clone(),
            _ => return Ok(()),
        };
        if channel_name == CONTROL_CHANNEL.as_bytes() {
            if let (PushKind::Message | PushKind::SMessage, Some(Value::BulkString(payload))) =
                (&push.kind, push.data.get(1))
            {
                match serde_json::from_slice::<ControlMessage>(payload) {
                    Ok(message) if message.from != self.shared.settings.node => {
                        // Off the delivery path: a subscribe reads the room's top first.
                        let sink = self.sink.clone();
                        tokio::spawn(async move {
                            sink.command(&message.command).await;
                        });
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "unreadable command on the control channel"),
                }
            }
            return Ok(());
        }
        let Some(room) = room_of_channel(&channel_name).map(str::to_owned) else { return Ok(()) };
        match push.kind {
            PushKind::Subscribe | PushKind::SSubscribe => {
                let watch = self.shard().wanted().get(&room).cloned();
                if let Some(watch) = watch {
                    self.catch_up(&room).await?;
                    watch.send_replace(true);
                }
            }
            PushKind::Message | PushKind::SMessage => {
                let Some(Value::BulkString(payload)) = push.data.get(1) else { return Ok(()) };
                let Ok(event) = serde_json::from_slice::<ChannelEvent>(payload) else {
                    tracing::warn!(room, "unreadable message on a room's channel");
                    return Ok(());
                };
                self.on_event(&room, event).await?;
            }
            // Not asked for when the room is still wanted: Redis Cluster takes a shard channel's
            // subscribers off when its slot moves to another master (a failover, a reshard).
            // Subscribing again reaches the new owner, and its confirmation catches the room up.
            PushKind::Unsubscribe | PushKind::SUnsubscribe if self.shard().wanted().contains_key(&room) => {
                tracing::info!(room, "redis ended a room's subscription (its slot moved): subscribing again");
                self.shard().link.clone().subscribe(&channel(&room)).await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn on_event(&mut self, room: &str, event: ChannelEvent) -> Result<(), EngineError> {
        if let Some(kind) = event.p {
            // Presence of other nodes' members; this node announced its own.
            let node = event.n.unwrap_or_default();
            if node != self.shared.settings.node && self.tracked.contains_key(room) {
                let member = PresenceEntry { id: event.id.unwrap_or_default(), name: event.name.unwrap_or_default() };
                self.sink.presence(room, &kind, &member);
            }
            return Ok(());
        }
        let (Some(offset), Some(epoch), Some(body)) = (event.o, event.e, event.m) else { return Ok(()) };
        let Some(tracked) = self.tracked.get_mut(room) else { return Ok(()) };
        if tracked.epoch != epoch {
            return self.catch_up(room).await;
        }
        if offset <= tracked.channel_last {
            // Redis went back to an older copy of the room without a restart this node saw.
            return self.went_back(room).await;
        }
        tracked.channel_last = offset;
        if offset <= tracked.last {
            return Ok(()); // delivered by a fill already
        }
        if offset > tracked.last + 1 {
            self.fill(room, offset - 1).await?;
        }
        let Some(tracked) = self.tracked.get_mut(room) else { return Ok(()) };
        if tracked.last + 1 == offset {
            tracked.last = offset;
            let message = body.into_stored(room.to_owned(), offset, event.t.unwrap_or(0));
            self.sink.deliver(std::slice::from_ref(&message));
        }
        Ok(())
    }

    /// Reads the room's top: the first time, delivery starts there; later, everything missed up to
    /// it is delivered, or the room is reset if its epoch changed.
    async fn catch_up(&mut self, room: &str) -> Result<(), EngineError> {
        let top = self.shared.top(room).await?;
        match self.tracked.get_mut(room) {
            None => {
                let tracked = Tracked { epoch: top.epoch.to_string(), last: top.offset, channel_last: 0 };
                self.tracked.insert(room.to_owned(), tracked);
            }
            Some(tracked) if *tracked.epoch != *top.epoch => {
                tracing::warn!(
                    room,
                    "room has a new epoch in redis (its history was lost, or redis restarted): its members rejoin"
                );
                tracked.epoch = top.epoch.to_string();
                tracked.last = top.offset;
                // A lost room numbers from 1 again.
                tracked.channel_last = 0;
                self.sink.reset(room);
            }
            Some(tracked) if top.offset < tracked.last => {
                // Delivered offsets that Redis no longer has, under the same epoch: it went back to
                // an older copy of the room, and the next messages would reuse those offsets.
                self.went_back(room).await?;
            }
            Some(_) => self.fill(room, top.offset).await?,
        }
        Ok(())
    }

    /// Redis went back to an older copy of `room` (this node saw offsets it no longer has, or gives
    /// out again) without a restart its run tag shows: a new epoch, unless another node changed it
    /// already; delivery goes on from the top and the room's members are let go, to resume with
    /// `recovered: false`.
    async fn went_back(&mut self, room: &str) -> Result<(), EngineError> {
        let Some(stale) = self.tracked.get(room).map(|tracked| tracked.epoch.clone()) else { return Ok(()) };
        let (tag, _) = self.shard().run_tag().await?;
        let mut link = self.shard().link.clone();
        let keys = [meta_key(room), stream_key(room), idem_key(room)];
        let cmd = script(
            NEW_EPOCH_SCRIPT,
            &keys.each_ref().map(String::as_str),
            &[&new_epoch(), &tag.run, tag.lossy_arg(), &stale],
        );
        let (offset, epoch): (u64, String) = link.query(&cmd).await?;
        tracing::warn!(
            room,
            "room history went back in redis (an older copy was loaded): new epoch, its members rejoin"
        );
        if let Some(tracked) = self.tracked.get_mut(room) {
            tracked.epoch = epoch;
            tracked.last = offset;
            tracked.channel_last = offset;
        }
        self.sink.reset(room);
        Ok(())
    }

    /// Delivers the room's messages after its last delivered offset up to `to`, from the stream; if
    /// they are no longer all there, resets the room.
    async fn fill(&mut self, room: &str, to: u64) -> Result<(), EngineError> {
        loop {
            let Some(last) = self.tracked.get(room).map(|t| t.last) else { return Ok(()) };
            if last >= to {
                return Ok(());
            }
            let messages = self.shared.range(room, last + 1, to, FILL_PAGE).await?;
            if messages.first().map(|m| m.offset) != Some(last + 1) {
                tracing::warn!(
                    room,
                    missing = last + 1,
                    "messages to close a gap are no longer retained: members rejoin"
                );
                if let Some(tracked) = self.tracked.get_mut(room) {
                    tracked.last = to;
                }
                self.sink.reset(room);
                return Ok(());
            }
            // The stream holds consecutive offsets, so the page ends where it should.
            let end = messages.last().map_or(last, |m| m.offset);
            self.sink.deliver(&messages);
            if let Some(tracked) = self.tracked.get_mut(room) {
                tracked.last = end;
            }
        }
    }
}

/// Applies presence changes in order, pipelined.
async fn presence(shared: Weak<Shared>, mut ops: mpsc::Receiver<PresenceOp>) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while ops.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let Some(shared) = shared.upgrade() else { return };
        let node = shared.settings.node.clone();
        let calls = batch.drain(..).map(|op| {
            let shared = shared.clone();
            let node = node.clone();
            async move {
                let (mut link, room, cmd) = match &op {
                    PresenceOp::Add(room, member) => {
                        let shard = shared.shard(room);
                        let cmd = script(
                            PRESENCE_ADD_SCRIPT,
                            &[&presence_key(room)],
                            &[&member.id, &node, &member.name, &channel(room), shard.link.publish_command()],
                        );
                        (shard.link.clone(), room, cmd)
                    }
                    PresenceOp::Remove(room, id) => {
                        let shard = shared.shard(room);
                        let cmd = script(
                            PRESENCE_REMOVE_SCRIPT,
                            &[&presence_key(room)],
                            &[id.as_str(), &channel(room), shard.link.publish_command()],
                        );
                        (shard.link.clone(), room, cmd)
                    }
                    PresenceOp::Track(room, add) => {
                        let mut cmd = redis::cmd(if *add { "SADD" } else { "SREM" });
                        cmd.arg(node_rooms_key(&node)).arg(room);
                        (shared.shards[0].link.clone(), room, cmd)
                    }
                };
                if let Err(error) = link.query::<i64>(&cmd).await {
                    // Redis is down: once it is back, the lease task re-announces this node's members.
                    tracing::debug!(%error, room, "presence change not recorded");
                    shared.presence_overflowed.store(true, Ordering::Relaxed);
                }
            }
        });
        join_all(calls).await;
    }
}

/// Renews this node's lease, re-announces its members when needed, and reaps nodes whose lease ran out.
async fn leases(shared: Weak<Shared>) {
    let period = shared.upgrade().map_or(Duration::from_secs(1), |s| s.settings.lease / 4);
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    // Warned once per outage, not at every tick of it.
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        if shared.closed.load(Ordering::Relaxed) {
            return;
        }
        match renew(&shared).await {
            Ok(lost) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("presence lease renewed again");
                }
                // A lease that had to be created anew after the first means other nodes reaped this
                // one (it stalled, or Redis lost it): say again who is here.
                if (lost && !first) || shared.presence_overflowed.swap(false, Ordering::Relaxed) {
                    reannounce(&shared).await;
                }
                first = false;
            }
            Err(error) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(%error, "could not renew this node's presence lease; retrying");
                }
                shared.presence_overflowed.store(true, Ordering::Relaxed);
                continue;
            }
        }
        if let Err(error) = reap(&shared).await {
            tracing::warn!(%error, "could not check other nodes' leases");
        }
    }
}

/// Milliseconds on Redis' clock (the leases' clock, the same for every node).
async fn redis_ms(link: &mut Link) -> Result<u64, EngineError> {
    let (secs, micros): (u64, u64) = link.query(&redis::cmd("TIME")).await?;
    Ok(secs * 1000 + micros / 1000)
}

/// True when the lease did not exist (a new node, or one that was reaped).
async fn renew(shared: &Shared) -> Result<bool, EngineError> {
    let mut link = shared.shards[0].link.clone();
    let now = redis_ms(&mut link).await?;
    let expires = now + shared.settings.lease.as_millis() as u64;
    let mut cmd = redis::cmd("ZADD");
    cmd.arg(NODES_KEY).arg(expires).arg(&shared.settings.node);
    let added: i64 = link.query(&cmd).await?;
    Ok(added == 1)
}

/// Makes Redis' presence of this node's members what the node has (after changes were lost, or the
/// node was reaped while alive): in every room it has or had members in, its stale entries leave
/// and its missing ones join, each with its event.
async fn reannounce(shared: &Shared) {
    if let Err(error) = sync_presence(shared).await {
        tracing::warn!(%error, "could not announce this node's members again; retrying");
        shared.presence_overflowed.store(true, Ordering::Relaxed);
    }
}

async fn sync_presence(shared: &Shared) -> Result<(), EngineError> {
    let node = &shared.settings.node;
    let mirror: HashMap<String, HashMap<String, String>> = shared.mirror().clone();
    let mut link = shared.shards[0].link.clone();
    let listed: Vec<String> = link.query(redis::cmd("SMEMBERS").arg(node_rooms_key(node))).await?;
    let mut rooms: Vec<&str> = mirror.keys().map(String::as_str).chain(listed.iter().map(String::as_str)).collect();
    rooms.sort_unstable();
    rooms.dedup();
    tracing::info!(rooms = rooms.len(), "announcing this node's members again");
    for room in rooms {
        if mirror.contains_key(room) {
            link.query::<i64>(redis::cmd("SADD").arg(node_rooms_key(node)).arg(room)).await?;
        }
        let shard = shared.shard(room);
        let channel = channel(room);
        let mut args: Vec<&str> = vec![node, &channel, shard.link.publish_command()];
        for (id, name) in mirror.get(room).into_iter().flatten() {
            args.extend([id.as_str(), name.as_str()]);
        }
        shard.link.clone().query::<i64>(&script(SYNC_SCRIPT, &[&presence_key(room)], &args)).await?;
        if !mirror.contains_key(room) {
            link.query::<i64>(redis::cmd("SREM").arg(node_rooms_key(node)).arg(room)).await?;
        }
    }
    Ok(())
}

async fn reap(shared: &Shared) -> Result<(), EngineError> {
    let mut link = shared.shards[0].link.clone();
    let now = redis_ms(&mut link).await?;
    let mut cmd = redis::cmd("ZRANGEBYSCORE");
    cmd.arg(NODES_KEY).arg("-inf").arg(now);
    let dead: Vec<String> = link.query(&cmd).await?;
    for node in dead.into_iter().filter(|n| *n != shared.settings.node) {
        let mut members = redis::cmd("SMEMBERS");
        members.arg(node_rooms_key(&node));
        let rooms: Vec<String> = link.query(&members).await?;
        let mut left = 0;
        for room in &rooms {
            let shard = shared.shard(room);
            let cmd =
                script(SYNC_SCRIPT, &[&presence_key(room)], &[&node, &channel(room), shard.link.publish_command()]);
            left += shard.link.clone().query::<i64>(&cmd).await?;
        }
        // Only after every room is done: a reaper that dies halfway leaves the rest to the next one.
        link.query::<i64>(redis::cmd("DEL").arg(node_rooms_key(&node))).await?;
        link.query::<i64>(redis::cmd("ZREM").arg(NODES_KEY).arg(&node)).await?;
        tracing::info!(node, rooms = rooms.len(), members = left, "a node's lease ran out: its members left");
    }
    Ok(())
}

/// Cluster-wide presence (see the module's docs).
struct RedisPresence(Arc<Shared>);

impl RedisPresence {
    fn queue(&self, op: PresenceOp) {
        if self.0.presence_tx.try_send(op).is_err() {
            self.0.presence_overflowed.store(true, Ordering::Relaxed);
        }
    }
}

impl Presence for RedisPresence {
    fn add(&self, room: &str, member: PresenceEntry) {
        let first_in_room = {
            let mut mirror = self.0.mirror();
            let members = mirror.entry(room.to_owned()).or_default();
            let first = members.is_empty();
            members.insert(member.id.clone(), member.name.clone());
            first
        };
        if first_in_room {
            self.queue(PresenceOp::Track(room.to_owned(), true));
        }
        self.queue(PresenceOp::Add(room.to_owned(), member));
    }

    fn remove(&self, room: &str, id: &str) {
        let last_in_room = {
            let mut mirror = self.0.mirror();
            let emptied = mirror.get_mut(room).is_some_and(|members| {
                members.remove(id);
                members.is_empty()
            });
            if emptied {
                mirror.remove(room);
            }
            emptied
        };
        self.queue(PresenceOp::Remove(room.to_owned(), id.to_owned()));
        if last_in_room {
            // After the removal: a reaper that reads the list meanwhile still finds the room.
            self.queue(PresenceOp::Track(room.to_owned(), false));
        }
    }

    fn list(&self, room: &str, limit: usize) -> BoxFuture<'_, Result<(Vec<PresenceEntry>, bool), EngineError>> {
        let room = room.to_owned();
        Box::pin(async move {
            let mut link = self.0.shard(&room).link.clone();
            let mut members = Vec::new();
            let mut cursor = 0u64;
            loop {
                let mut cmd = redis::cmd("HSCAN");
                cmd.arg(presence_key(&room)).arg(cursor).arg("COUNT").arg(limit.max(10));
                let (next, fields): (u64, Vec<(String, String)>) = link.query(&cmd).await?;
                for (id, value) in fields {
                    let (node, name) = value.split_once('\n').unwrap_or(("", ""));
                    // This node's own members come from its mirror below: their writes to Redis are
                    // queued, so the hash may not have a join (or may still have a leave) yet.
                    if node != self.0.settings.node {
                        members.push(PresenceEntry { id, name: name.to_owned() });
                    }
                }
                cursor = next;
                if cursor == 0 || members.len() > limit {
                    break;
                }
            }
            if let Some(own) = self.0.mirror().get(&room) {
                members.extend(own.iter().map(|(id, name)| PresenceEntry { id: id.clone(), name: name.clone() }));
            }
            members.sort_by(|a, b| a.id.cmp(&b.id));
            let truncated = members.len() > limit;
            members.truncate(limit);
            Ok((members, truncated))
        })
    }
}

impl Engine for RedisEngine {
    fn publish(&self, message: NewMessage) -> Result<PendingPublish, EngineError> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(EngineError::Closed);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.shard(&message.room).jobs.try_send((message, tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::Busy,
            mpsc::error::TrySendError::Closed(_) => EngineError::Closed,
        })?;
        Ok(Box::pin(async move { rx.await.unwrap_or(Err(EngineError::Closed)) }))
    }

    fn history(&self, room: &str, after: u64, up_to: u64, limit: usize) -> BoxFuture<'_, Result<History, EngineError>> {
        let room = room.to_owned();
        Box::pin(async move {
            let mut link = self.shared.shard(&room).link.clone();
            let mut messages = Vec::new();
            if after < up_to && limit > 0 {
                let mut cmd = redis::cmd("XREVRANGE");
                cmd.arg(stream_key(&room)).arg(format!("{up_to}-0")).arg(format!("{}-0", after + 1));
                cmd.arg("COUNT").arg(limit);
                let entries: Vec<(String, Vec<(String, String)>)> = link.query(&cmd).await?;
                messages = entries.into_iter().rev().map(|entry| stored(&room, entry)).collect::<Result<_, _>>()?;
            }
            let mut first_cmd = redis::cmd("XRANGE");
            first_cmd.arg(stream_key(&room)).arg("-").arg("+").arg("COUNT").arg(1);
            let first: Vec<(String, Vec<(String, String)>)> = link.query(&first_cmd).await?;
            let mut first_retained = match first.into_iter().next() {
                Some(entry) => stored(&room, entry)?.offset,
                None => up_to + 1,
            };
            let cutoff = age_cutoff_ms(self.shared.retention.max_age);
            let before = messages.len();
            messages.retain(|m| m.ts_ms >= cutoff);
            if messages.len() < before {
                // Some are past their age: what is retained starts after them.
                first_retained = messages.first().map_or(up_to + 1, |m| m.offset);
            }
            Ok(History { messages, first_retained, last_offset: up_to })
        })
    }

    fn top(&self, room: &str) -> BoxFuture<'_, Result<Position, EngineError>> {
        let room = room.to_owned();
        Box::pin(async move { self.shared.top(&room).await })
    }

    fn broadcast(&self, command: &UserCommand) -> BoxFuture<'_, Result<bool, EngineError>> {
        let command = command.clone();
        Box::pin(async move {
            let link = self.shared.shards[0].link.clone();
            let message = ControlMessage { from: self.shared.settings.node.clone(), command };
            let mut cmd = redis::cmd(link.publish_command());
            cmd.arg(CONTROL_CHANNEL).arg(serde_json::to_string(&message).unwrap_or_default());
            link.clone().query::<i64>(&cmd).await?;
            Ok(true)
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<String>, EngineError>> {
        Box::pin(async move {
            let mut link = self.shared.shards[0].link.clone();
            let now = redis_ms(&mut link).await?;
            // Leases still running: scored by when they run out.
            let mut cmd = redis::cmd("ZRANGEBYSCORE");
            cmd.arg(NODES_KEY).arg(now).arg("+inf");
            let mut nodes: Vec<String> = link.query(&cmd).await?;
            nodes.sort();
            Ok(nodes)
        })
    }

    fn remove_history(&self, room: &str) -> BoxFuture<'_, Result<u64, EngineError>> {
        let room = room.to_owned();
        Box::pin(async move {
            let mut link = self.shared.shard(&room).link.clone();
            let cmd = script(REMOVE_HISTORY_SCRIPT, &[&stream_key(&room), &idem_key(&room)], &[]);
            link.query::<u64>(&cmd).await
        })
    }

    fn subscribe(&self, room: &str) {
        let shard = self.shared.shard(room);
        shard.wanted().insert(room.to_owned(), watch::channel(false).0);
        let _ = shard.control.send(Control::Subscribe(room.to_owned()));
    }

    fn unsubscribe(&self, room: &str) {
        let shard = self.shared.shard(room);
        shard.wanted().remove(room);
        let _ = shard.control.send(Control::Unsubscribe(room.to_owned()));
    }

    fn subscribed(&self, room: &str) -> BoxFuture<'_, Result<(), EngineError>> {
        let watch = self.shared.shard(room).wanted().get(room).map(|w| w.subscribe());
        let timeout = self.shared.settings.timeout * 2;
        Box::pin(async move {
            let Some(mut ready) = watch else { return Ok(()) };
            let waited = tokio::time::timeout(timeout, ready.wait_for(|ready| *ready)).await.map(|r| r.is_ok());
            match waited {
                // Ready, or the room emptied meanwhile (nothing to wait for).
                Ok(_) => Ok(()),
                Err(_) => Err(EngineError::Unavailable("redis did not confirm the room's subscription in time".into())),
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.shared.closed.store(true, Ordering::Relaxed);
            // What is queued is sent (the writers and the presence task drain their queues), within
            // the caller's grace period.
            let drained = || {
                self.shared.shards.iter().all(|s| s.jobs.capacity() == s.jobs.max_capacity())
                    && self.shared.presence_tx.capacity() == self.shared.presence_tx.max_capacity()
            };
            while !drained() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Leaving cleanly: other nodes need not wait for the lease.
            let mut link = self.shared.shards[0].link.clone();
            let _ = link.query::<i64>(redis::cmd("ZREM").arg(NODES_KEY).arg(&self.shared.settings.node)).await;
            let _ = link.query::<i64>(redis::cmd("DEL").arg(node_rooms_key(&self.shared.settings.node))).await;
            for task in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
                task.abort();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_room_as_hash_tag_and_channels_name_their_room() {
        for key in [meta_key("a.b"), stream_key("a.b"), idem_key("a.b"), presence_key("a.b"), channel("a.b")] {
            assert!(key.starts_with("sb:{a.b}:"), "{key}");
        }
        assert_eq!(room_of_channel(channel("lobby:1").as_bytes()), Some("lobby:1"));
        assert_eq!(room_of_channel(b"other"), None);
    }

    #[test]
    fn the_shard_of_a_room_is_stable() {
        // FNV-1a's published test vector: every node and every version agrees on it.
        assert_eq!(shard_hash("a"), 0xaf63_dc4c_8601_ec8c);
        let on_first = (0..1000).filter(|i| shard_hash(&format!("room{i}")).is_multiple_of(2)).count();
        assert!((400..600).contains(&on_first), "rooms spread evenly over two shards: {on_first} of 1000");
    }

    #[test]
    fn stream_entries_become_messages() {
        let fields = vec![
            ("m".to_owned(), r#"{"id":"x","name":"ann","message":"hi","time":"10:00:00"}"#.to_owned()),
            ("t".to_owned(), "1700000000000".to_owned()),
        ];
        let message = stored("r", ("7-0".into(), fields)).unwrap();
        assert_eq!((message.offset, message.id.as_deref(), message.ts_ms), (7, Some("x"), 1_700_000_000_000));
        assert!(stored("r", ("7-0".into(), vec![])).is_err(), "a field missing is an error, not a panic");
    }
}
