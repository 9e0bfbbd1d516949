//! This node's rooms, their local members, and fan-out into each member's [`Outbox`].
//!
//! The engine hands every committed batch to [`Hub::deliver`] (the hub is its [`Deliver`] sink), per
//! room in offset order. The hub encodes each message once per dialect and pushes the shared bytes
//! into every member's outbox, bounded in messages and in bytes. A member whose outbox is full is
//! dropped from the hub (its session then closes it): one stalled client never holds up a room, and a
//! member that missed a message gets nothing after it, so it is cut off, never gapped.
//!
//! Joining is in two steps so that the replay and live delivery meet without a gap or a repeat: a
//! member that [`Hub::join`]s is *held* (deliveries are kept aside for it) until its session has read
//! the room's top offset and the history up to it from the engine and calls [`Hub::start`]; then what
//! was held past that offset goes into the outbox, and anything at or below it is skipped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};

use switchboard_ws::Utf8Bytes;

use super::limits::HubLimits;
use super::message::NodeId;
use super::wire::{Dialect, Envelope, Member as WireMember, SeedOut};
use crate::engine::{BoxFuture, Deliver, Engine, EngineError, Presence, PresenceEntry, StoredMessage, UserCommand};

/// A connection's number on this node (what clients see is [`Hub::member_id`]).
pub type ConnId = u64;

/// Hashes [`ConnId`]s with one multiplication (Fibonacci hashing, which spreads sequential ids over
/// the high bits the table probes with) instead of SipHash: a delivery looks its member's
/// connection up, and SipHash cost about 90 instructions of each. Safe without a random key
/// because the hub hands the ids out; no client chooses one.
#[derive(Default, Clone, Copy)]
struct ConnIdHasher(u64);

impl std::hash::Hasher for ConnIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `u64` keys; correct for anything else all the same.
        for &byte in bytes {
            self.write_u64(self.0 ^ u64::from(byte));
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ConnMap<V> = HashMap<ConnId, V, std::hash::BuildHasherDefault<ConnIdHasher>>;
type ConnSet = std::collections::HashSet<ConnId, std::hash::BuildHasherDefault<ConnIdHasher>>;

/// Session `id` of `sub` has ended or signed in as someone else; a user with none is forgotten.
fn forget_user_session(users: &mut HashMap<String, ConnSet>, sub: &str, id: ConnId) {
    if let Some(sessions) = users.get_mut(sub) {
        sessions.remove(&id);
        if sessions.is_empty() {
            users.remove(sub);
        }
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The connection is in as many rooms as it may be.
    #[error("already a member of {limit} rooms, the most allowed")]
    TooManyRooms {
        /// The limit.
        limit: usize,
    },
    /// The connection was dropped (too slow) meanwhile.
    #[error("connection is gone")]
    Gone,
}

/// Where a member's live delivery stands in one room.
enum Delivery {
    /// Deliveries are kept aside until the session has its replay ([`Hub::start`] with this join's
    /// number).
    Held { join: JoinId, held: Vec<(u64, Utf8Bytes)>, bytes: usize },
    /// Messages after this offset go to the outbox.
    After(u64),
}

/// Names one join of one member, so that a replay read for an earlier join (the member left and
/// joined again meanwhile) cannot start or end the later one.
pub type JoinId = u64;

struct Member {
    delivery: Delivery,
    /// Display name (empty for seed clients, who are not listed).
    name: String,
}

struct Room {
    members: BTreeMap<ConnId, Member>,
}

struct Conn {
    outbox: Arc<OutboxShared>,
    dialect: Dialect,
    rooms: Vec<String>,
    /// The signed-in user (`sub`) and its display name, for the server API's per-user commands.
    user: Option<Arc<(String, String)>>,
    /// A listener that is neither listed nor announced (a long poll): it comes and goes with each
    /// request, and a presence event per poll would be noise.
    silent: bool,
}

/// The receiving end of a connection's outbox. It ends (`None`) when the hub drops the connection.
pub struct Outbox {
    shared: Arc<OutboxShared>,
}

/// An outbox queue that allocates nothing until something is queued: an idle member costs the struct.
#[derive(Default)]
struct OutboxShared {
    state: Mutex<OutboxState>,
}

#[derive(Default)]
struct OutboxState {
    items: VecDeque<Utf8Bytes>,
    bytes: usize,
    closed: bool,
    /// Why the hub let go of the connection, when it did (not for a shutdown: see [`Hub::is_closing`]).
    cut: Option<Cut>,
    waiting: Option<Waker>,
}

/// Why the hub let go of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// The client did not keep up: its outbox was full.
    Slow,
    /// A room's history was reset ([`Deliver::reset`]): the client rejoins to learn what it missed.
    Reset,
    /// The server API disconnected it, with this close code and reason.
    Api(u16, String),
}

/// Capacity an emptied queue keeps; more is given back, so a burst does not stay in memory.
const KEEP_CAPACITY: usize = 64;

impl OutboxShared {
    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues bytes unless that would pass a bound; false means this client is not keeping up. One
    /// message larger than the byte bound still goes into an empty outbox.
    fn offer(&self, bytes: Utf8Bytes, limits: &HubLimits) -> bool {
        let mut state = self.lock();
        let len = bytes.len();
        if state.closed
            || state.items.len() >= limits.outbox_messages
            || (state.bytes > 0 && state.bytes + len > limits.outbox_bytes)
        {
            return false;
        }
        state.items.push_back(bytes);
        state.bytes += len;
        let waiting = state.waiting.take();
        drop(state);
        if let Some(waker) = waiting {
            waker.wake();
        }
        true
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let waiting = state.waiting.take();
        drop(state);
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

impl Outbox {
    /// The next delivery, or `None` once the hub has dropped this connection and the queue is empty.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Utf8Bytes>> {
        let mut state = self.shared.lock();
        if let Some(bytes) = pop(&mut state) {
            return Poll::Ready(Some(bytes));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        if !state.waiting.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            state.waiting = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// [`Outbox::poll_recv`] as a future.
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next delivery if one is queued.
    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        pop(&mut self.shared.lock())
    }

    /// Bytes waiting in the outbox.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// Why the hub let go of this connection, if it did (and not for a shutdown).
    pub fn cut(&self) -> Option<Cut> {
        self.shared.lock().cut.clone()
    }
}

fn pop(state: &mut OutboxState) -> Option<Utf8Bytes> {
    let bytes = state.items.pop_front()?;
    state.bytes -= bytes.len();
    if state.items.is_empty() && state.items.capacity() > KEEP_CAPACITY {
        state.items = VecDeque::new();
    }
    Some(bytes)
}

#[derive(Default)]
struct Inner {
    rooms: HashMap<String, Room>,
    conns: ConnMap<Conn>,
    /// The sessions signed in as each user (by token subject): how many, for
    /// `max_sessions_per_user`, and which, so a server-API command for one user does not scan every
    /// connection while holding the hub.
    users: HashMap<String, ConnSet>,
    /// Sessions standing in for one their user already has here (a poll in a kept long-polling
    /// client's place, see [`Hub::set_stand_in`]): ended with the user's others, counted nowhere.
    stand_ins: HashMap<String, ConnSet>,
}

/// A session refused because its user has as many on this node as `max_sessions_per_user` allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{sub:?} has {limit} sessions open here already, the most one user may have")]
pub struct UserLimit {
    pub sub: String,
    pub limit: usize,
}

/// Rooms and fan-out of one node.
pub struct Hub {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    limits: HubLimits,
    default_room: String,
    node: NodeId,
    presence: Arc<dyn Presence>,
    /// Told which rooms have local members. Weak: the engine holds the hub (as its sink).
    engine: OnceLock<Weak<dyn Engine>>,
    /// Set by [`Hub::shut_down`]: every outbox is closed, and new ones are born closed.
    closing: AtomicBool,
    next_join: AtomicU64,
}

impl Hub {
    /// A hub with no rooms; `presence` keeps who is where.
    pub fn new(limits: HubLimits, default_room: String, node: NodeId, presence: Arc<dyn Presence>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            limits,
            default_room,
            node,
            presence,
            engine: OnceLock::new(),
            closing: AtomicBool::new(false),
            next_join: AtomicU64::new(1),
        })
    }

    /// Connects the engine that rooms are subscribed to (once, after it opened with this hub as sink).
    pub fn attach(&self, engine: &Arc<dyn Engine>) {
        let _ = self.engine.set(Arc::downgrade(engine));
    }

    fn engine(&self) -> Option<Arc<dyn Engine>> {
        self.engine.get().and_then(Weak::upgrade)
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Runs a server-API command for one user's sessions on this node; how many it applied to.
    async fn run_command(&self, command: &UserCommand) -> usize {
        match command {
            UserCommand::Disconnect { sub, code, reason } => self.disconnect_user(sub, *code, reason),
            UserCommand::Unsubscribe { sub, room } => self.unsubscribe_user(sub, room),
            UserCommand::Subscribe { sub, room } => {
                // As a session's join does: held first, then (once the engine delivers the room
                // here) where the room stands and who is there, then live from that offset. Read
                // before the subscription is confirmed, the top could miss what is published in
                // between: the engine would start the room after it.
                let joins = self.subscribe_user(sub, room);
                if joins.is_empty() {
                    return 0;
                }
                let top = match self.engine() {
                    Some(engine) => match engine.subscribed(room).await {
                        Ok(()) => engine.top(room).await,
                        Err(error) => Err(error),
                    },
                    None => Err(EngineError::Closed),
                };
                let Ok(top) = top else {
                    // Only the memberships held for this command: a session may have joined the
                    // room itself meanwhile.
                    for (id, join) in &joins {
                        self.abandon(*id, room, *join);
                    }
                    return 0;
                };
                let (members, truncated) = self.presence(room).await.unwrap_or_default();
                let text = Envelope::Joined {
                    room,
                    offset: top.offset,
                    epoch: &top.epoch,
                    first: top.offset + 1,
                    recovered: None,
                    members: members.iter().map(WireMember::from).collect(),
                    truncated,
                    req: None,
                }
                .encode();
                self.start_subscribed(room, &joins, &text, top.offset);
                joins.len()
            }
        }
    }

    /// How many rooms one connection may be in at once.
    pub fn max_rooms_per_connection(&self) -> usize {
        self.limits.max_rooms_per_connection
    }

    /// The room of seed-protocol connections.
    pub fn default_room(&self) -> &str {
        &self.default_room
    }

    /// The id clients see for connection `id`: unique across nodes.
    pub fn member_id(&self, id: ConnId) -> String {
        self.node.member_id(id)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection, in no room yet. Its outbox is how the hub reaches it: closed, it ends the
    /// session (see [`Hub::is_closing`] for why).
    pub fn register(&self, dialect: Dialect) -> (ConnId, Outbox) {
        self.register_as(dialect, false)
    }

    /// A connection like [`Hub::register`]'s that receives `switchboard.v1` envelopes but is never
    /// in presence: no join or leave event, not listed.
    pub fn register_listener(&self) -> (ConnId, Outbox) {
        self.register_as(Dialect::V1, true)
    }

    fn register_as(&self, dialect: Dialect, silent: bool) -> (ConnId, Outbox) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(OutboxShared::default());
        let mut inner = self.lock();
        // Checked under the lock that `shut_down` takes: a connection is either closed by it or sees it.
        if self.closing.load(Ordering::Relaxed) {
            shared.close();
        }
        inner.conns.insert(id, Conn { outbox: shared.clone(), dialect, rooms: Vec::new(), silent, user: None });
        (id, Outbox { shared })
    }

    /// Makes a seed-protocol connection a live member of the default room (it gets no replay).
    pub fn enter_default_room(&self, id: ConnId) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(conn) = inner.conns.get_mut(&id) else { return };
        if conn.rooms.is_empty() {
            // Exactly one room, ever: no room to spare in the list.
            conn.rooms = vec![self.default_room.clone()];
            let member = Member { delivery: Delivery::After(0), name: String::new() };
            self.room_entry(&mut inner.rooms, &self.default_room).members.insert(id, member);
        }
    }

    /// Closes every connection's outbox, for shutdown: each session ends (with 1001).
    pub fn shut_down(&self) {
        let inner = self.lock();
        self.closing.store(true, Ordering::Relaxed);
        for conn in inner.conns.values() {
            conn.outbox.close();
        }
    }

    /// Whether the hub is closing (so a closed outbox means shutdown, not a client too slow).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Records who a connection is signed in as (`None`: anonymous), for the per-user commands and
    /// the per-user limit; refused when that user has `max_sessions_per_user` sessions here already.
    pub fn set_user(&self, id: ConnId, user: Option<(String, String)>) -> Result<(), UserLimit> {
        let mut guard = self.lock();
        let Inner { conns, users, .. } = &mut *guard;
        let Some(conn) = conns.get_mut(&id) else { return Ok(()) };
        let old = conn.user.as_ref().map(|user| user.0.as_str());
        let new = user.as_ref().map(|user| user.0.as_str());
        if old != new {
            if let Some(sub) = new {
                let limit = self.limits.max_sessions_per_user;
                if limit > 0 && users.get(sub).map_or(0, ConnSet::len) >= limit {
                    return Err(UserLimit { sub: sub.to_owned(), limit });
                }
                users.entry(sub.to_owned()).or_default().insert(id);
            }
            if let Some(sub) = old {
                forget_user_session(users, sub, id);
            }
        }
        conn.user = user.map(Arc::new);
        Ok(())
    }

    /// Records `id` as signed in as `sub` in the place of a session of that user that is counted
    /// already (a long poll standing in for its client's kept presence): `max_sessions_per_user` does
    /// not count it a second time, and [`Hub::disconnect_user`] still ends it.
    pub fn set_stand_in(&self, id: ConnId, user: (String, String)) {
        let mut guard = self.lock();
        let Inner { conns, stand_ins, .. } = &mut *guard;
        let Some(conn) = conns.get_mut(&id) else { return };
        if conn.user.is_none() {
            stand_ins.entry(user.0.clone()).or_default().insert(id);
            conn.user = Some(Arc::new(user));
        }
    }

    /// True when user `sub` may not open another session here (a check before a WebSocket
    /// handshake is answered; [`Hub::set_user`] decides).
    pub fn user_at_limit(&self, sub: &str) -> bool {
        let limit = self.limits.max_sessions_per_user;
        limit > 0 && self.lock().users.get(sub).map_or(0, ConnSet::len) >= limit
    }

    /// The sessions of user `sub` on this node.
    fn user_sessions<'a>(inner: &'a Inner, sub: &str) -> impl Iterator<Item = ConnId> + 'a {
        inner.users.get(sub).into_iter().flatten().copied()
    }

    /// The connections of user `sub` that take commands (`switchboard.v1`, not a long poll's).
    fn user_conns(inner: &Inner, sub: &str) -> Vec<(ConnId, Arc<(String, String)>)> {
        let conns = Self::user_sessions(inner, sub).filter_map(|id| inner.conns.get(&id).map(|conn| (id, conn)));
        let commanded = conns.filter(|(_, conn)| conn.dialect == Dialect::V1 && !conn.silent);
        commanded.filter_map(|(id, conn)| conn.user.clone().map(|user| (id, user))).collect()
    }

    /// Ends every session of user `sub` on this node with `code` and `reason`; how many.
    pub fn disconnect_user(&self, sub: &str, code: u16, reason: &str) -> usize {
        let mut guard = self.lock();
        let inner = &mut *guard;
        // Collected first: each cut takes the session out of its set.
        let stand_ins = inner.stand_ins.get(sub).into_iter().flatten().copied();
        let ids: Vec<ConnId> = Self::user_sessions(inner, sub).chain(stand_ins).collect();
        for id in &ids {
            self.cut_conn(inner, *id, Cut::Api(code, reason.to_owned()));
        }
        ids.len()
    }

    /// Takes user `sub`'s sessions on this node out of `room`, each told with a `left` (reason
    /// `unsubscribed`); how many were in it.
    pub fn unsubscribe_user(&self, sub: &str, room: &str) -> usize {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let left = Self::user_conns(inner, sub).into_iter().filter(|(id, _)| self.leave_room(inner, *id, room));
        let ids: Vec<ConnId> = left.map(|(id, _)| id).collect();
        let text = Utf8Bytes::from(Envelope::Left { room, reason: Some("unsubscribed"), req: None }.encode());
        for id in &ids {
            if let Some(conn) = inner.conns.get(id) {
                conn.outbox.offer(text.clone(), &self.limits);
            }
        }
        ids.len()
    }

    /// Makes user `sub`'s sessions on this node members of `room` (under the user's name), held
    /// until [`Hub::start_subscribed`]; the connections and their joins (already members are left out).
    pub fn subscribe_user(&self, sub: &str, room: &str) -> Vec<(ConnId, JoinId)> {
        let users = Self::user_conns(&self.lock(), sub);
        users.into_iter().filter_map(|(id, user)| Some((id, self.join(id, room, &user.1).ok()??))).collect()
    }

    /// Sends each subscribed session its `joined` (`text`) and starts live delivery after `top`.
    pub fn start_subscribed(&self, room: &str, joins: &[(ConnId, JoinId)], text: &str, top: u64) {
        let bytes = Utf8Bytes::from(text.to_owned());
        let mut guard = self.lock();
        for (id, join) in joins {
            if let Some(conn) = guard.conns.get(id) {
                conn.outbox.offer(bytes.clone(), &self.limits);
            }
            self.start_locked(&mut guard, *id, room, *join, top);
        }
    }

    /// Rooms with members on this node, each with how many.
    pub fn rooms(&self) -> Vec<(String, usize)> {
        let inner = self.lock();
        let mut rooms: Vec<(String, usize)> =
            inner.rooms.iter().map(|(name, r)| (name.clone(), r.members.len())).collect();
        rooms.sort();
        rooms
    }

    /// Removes a connection from every room (telling the others it left).
    pub fn unregister(&self, id: ConnId) {
        let mut inner = self.lock();
        self.remove_conn(&mut inner, id);
        drop(inner);
    }

    /// Makes `id` a member of `room` under `name`, held until [`Hub::start`]; joining again keeps its
    /// place and renames it. The room hears of the new member or the new name. The answer is this
    /// join's number, for [`Hub::start`] and [`Hub::abandon`]; `None` when the connection was a member
    /// already (a join again, to rename or replay): there is nothing to start.
    pub fn join(&self, id: ConnId, room: &str, name: &str) -> Result<Option<JoinId>, JoinError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let conn = inner.conns.get_mut(&id).ok_or(JoinError::Gone)?;
        let new_member = !conn.rooms.iter().any(|r| r == room);
        if new_member && conn.rooms.len() >= self.limits.max_rooms_per_connection {
            return Err(JoinError::TooManyRooms { limit: self.limits.max_rooms_per_connection });
        }
        let announced = conn.dialect == Dialect::V1 && !conn.silent;
        let (join, previous) = if new_member {
            conn.rooms.push(room.to_owned());
            let join = self.next_join.fetch_add(1, Ordering::Relaxed);
            let member =
                Member { delivery: Delivery::Held { join, held: Vec::new(), bytes: 0 }, name: name.to_owned() };
            self.room_entry(&mut inner.rooms, room).members.insert(id, member);
            (Some(join), None)
        } else {
            // Already a member (live, or held for an earlier join that answers first): this join has
            // nothing to start, only a rename and a replay.
            let member = inner.rooms.get_mut(room).and_then(|r| r.members.get_mut(&id)).ok_or(JoinError::Gone)?;
            (None, Some(std::mem::replace(&mut member.name, name.to_owned())))
        };
        if announced {
            let member_id = self.member_id(id);
            let event = match previous {
                None => Some("join"),
                Some(old) if old != name => Some("update"),
                Some(_) => None,
            };
            if let Some(event) = event {
                self.presence.add(room, PresenceEntry { id: member_id.clone(), name: name.to_owned() });
                let member = WireMember { id: &member_id, name };
                let text = Envelope::PresenceEvent { room, event, member }.encode();
                self.broadcast_presence(inner, room, id, text);
            }
        }
        Ok(join)
    }

    /// The session has replayed `room` up to `top` for `join`: what was held after it goes out, and
    /// live delivery goes on from there. False when that join is no longer pending (the member left,
    /// or joined again and this is the earlier join's replay) or the member was dropped.
    pub fn start(&self, id: ConnId, room: &str, join: JoinId, top: u64) -> bool {
        let mut guard = self.lock();
        let started = self.start_locked(&mut guard, id, room, join, top);
        drop(guard);
        started
    }

    fn start_locked(&self, inner: &mut Inner, id: ConnId, room: &str, join: JoinId, top: u64) -> bool {
        let Some(member) = inner.rooms.get_mut(room).and_then(|r| r.members.get_mut(&id)) else { return false };
        if !matches!(member.delivery, Delivery::Held { join: pending, .. } if pending == join) {
            return false;
        }
        let Delivery::Held { held, .. } = std::mem::replace(&mut member.delivery, Delivery::After(top)) else {
            unreachable!("matched above")
        };
        let Some(conn) = inner.conns.get(&id) else { return false };
        let fits = held
            .into_iter()
            .filter(|(offset, _)| *offset > top)
            .all(|(_, bytes)| conn.outbox.offer(bytes, &self.limits));
        if !fits {
            tracing::info!(conn = id, "outbox full while joining: dropping a client that does not keep up");
            self.cut_conn(inner, id, Cut::Slow);
            return false;
        }
        true
    }

    /// A join whose replay could not be read: the member leaves again, unless it has left or joined
    /// anew meanwhile. True when it left.
    pub fn abandon(&self, id: ConnId, room: &str, join: JoinId) -> bool {
        let mut guard = self.lock();
        let pending = guard
            .rooms
            .get(room)
            .and_then(|r| r.members.get(&id))
            .is_some_and(|m| matches!(m.delivery, Delivery::Held { join: pending, .. } if pending == join));
        let left = pending && self.leave_room(&mut guard, id, room);
        drop(guard);
        left
    }

    /// Leaves a room; false if the connection was not in it.
    pub fn leave(&self, id: ConnId, room: &str) -> bool {
        let mut inner = self.lock();
        let left = self.leave_room(&mut inner, id, room);
        drop(inner);
        left
    }

    /// The rooms a connection is in.
    pub fn rooms_of(&self, id: ConnId) -> Vec<String> {
        self.lock().conns.get(&id).map(|c| c.rooms.clone()).unwrap_or_default()
    }

    /// Whether `id` is in `room`.
    pub fn is_member(&self, id: ConnId, room: &str) -> bool {
        self.lock().conns.get(&id).is_some_and(|c| c.rooms.iter().any(|r| r == room))
    }

    /// Up to the presence limit of `room`'s full-protocol members (on every node), and whether the
    /// list was cut.
    pub fn presence(&self, room: &str) -> BoxFuture<'_, Result<(Vec<PresenceEntry>, bool), EngineError>> {
        self.presence.list(room, self.limits.max_presence)
    }

    /// Connections on this node.
    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Rooms with members on this node.
    pub fn room_count(&self) -> usize {
        self.lock().rooms.len()
    }

    fn room_entry<'a>(&self, rooms: &'a mut HashMap<String, Room>, room: &str) -> &'a mut Room {
        if !rooms.contains_key(room) {
            rooms.insert(room.to_owned(), Room { members: BTreeMap::new() });
            if let Some(engine) = self.engine() {
                engine.subscribe(room);
            }
        }
        rooms.get_mut(room).expect("inserted")
    }

    fn leave_room(&self, inner: &mut Inner, id: ConnId, room: &str) -> bool {
        let Some(conn) = inner.conns.get_mut(&id) else { return false };
        let Some(at) = conn.rooms.iter().position(|r| r == room) else { return false };
        conn.rooms.swap_remove(at);
        let announced = conn.dialect == Dialect::V1 && !conn.silent;
        let mut name = String::new();
        let emptied = inner.rooms.get_mut(room).is_some_and(|r| {
            name = r.members.remove(&id).map(|m| m.name).unwrap_or_default();
            r.members.is_empty()
        });
        // An empty room leaves nothing to remember: a flood of joins to made-up rooms costs no memory
        // once its connections are gone.
        if emptied {
            inner.rooms.remove(room);
            // Under the lock, like `subscribe`: the engine hears of a room's first and last member in
            // the order they happened.
            if let Some(engine) = self.engine() {
                engine.unsubscribe(room);
            }
        }
        if announced {
            let member_id = self.member_id(id);
            self.presence.remove(room, &member_id);
            let text =
                Envelope::PresenceEvent { room, event: "leave", member: WireMember { id: &member_id, name: &name } }
                    .encode();
            self.broadcast_presence(inner, room, id, text);
        }
        true
    }

    /// [`Hub::remove_conn`], telling the connection why (its session reads it from the outbox).
    fn cut_conn(&self, inner: &mut Inner, id: ConnId, why: Cut) {
        if let Some(conn) = inner.conns.get(&id) {
            conn.outbox.lock().cut = Some(why);
        }
        self.remove_conn(inner, id);
    }

    fn remove_conn(&self, inner: &mut Inner, id: ConnId) {
        let rooms = inner.conns.get(&id).map(|c| c.rooms.clone()).unwrap_or_default();
        for room in rooms {
            self.leave_room(inner, id, &room);
        }
        // Closing ends the session's outbox once it is read: the session then closes the socket.
        if let Some(conn) = inner.conns.remove(&id) {
            conn.outbox.close();
            if let Some(user) = &conn.user {
                forget_user_session(&mut inner.users, &user.0, id);
                forget_user_session(&mut inner.stand_ins, &user.0, id);
            }
        }
    }

    /// Presence events go to the room's full-protocol members other than the subject; seed clients
    /// never receive anything but chat messages.
    fn broadcast_presence(&self, inner: &Inner, room: &str, subject: ConnId, text: String) {
        let Some(room) = inner.rooms.get(room) else { return };
        let bytes = Utf8Bytes::from(text);
        // Members still held hear nothing before their `joined` (which lists who is there then).
        let live = room.members.iter().filter(|(id, m)| **id != subject && matches!(m.delivery, Delivery::After(_)));
        for (id, _) in live {
            if let Some(conn) = inner.conns.get(id).filter(|c| c.dialect == Dialect::V1 && !c.silent) {
                // Presence is best effort: an event that does not fit is lost for that member, whose
                // list can be refreshed with a presence request; a member that far behind is about to
                // be dropped by the next chat message anyway.
                conn.outbox.offer(bytes.clone(), &self.limits);
            }
        }
    }
}

impl Deliver for Hub {
    fn command(&self, command: &UserCommand) -> BoxFuture<'_, usize> {
        let command = command.clone();
        Box::pin(async move { self.run_command(&command).await })
    }

    fn presence(&self, room: &str, event: &str, member: &PresenceEntry) {
        if self.is_closing() {
            return;
        }
        let inner = self.lock();
        let wire = WireMember { id: &member.id, name: &member.name };
        let text = Envelope::PresenceEvent { room, event, member: wire }.encode();
        // No local member is the subject: the event is another node's.
        self.broadcast_presence(&inner, room, ConnId::MAX, text);
        drop(inner);
    }

    fn reset(&self, room: &str) {
        let mut guard = self.lock();
        let members: Vec<ConnId> =
            guard.rooms.get(room).map(|r| r.members.keys().copied().collect()).unwrap_or_default();
        for id in members {
            tracing::info!(conn = id, room, "room history was reset: the client rejoins to learn what it missed");
            self.cut_conn(&mut guard, id, Cut::Reset);
        }
        drop(guard);
    }

    fn deliver(&self, batch: &[StoredMessage]) {
        // Shutting down, every outbox is closed: offering would only count everyone as too slow.
        if self.is_closing() {
            return;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        for message in batch {
            // Wall clocks: across nodes, as good as their clocks agree.
            let took_ms = now_ms.saturating_sub(message.ts_ms).max(0);
            crate::metrics::metrics().publish_delivery_seconds.observe(took_ms as f64 / 1000.0);
        }
        let mut guard = self.lock();
        let Inner { rooms, conns, .. } = &mut *guard;
        let mut stalled = Vec::new();
        for message in batch {
            let Some(room) = rooms.get_mut(&message.room) else { continue };
            let mut v1 = None;
            let mut seed = None;
            for (id, member) in room.members.iter_mut() {
                if stalled.contains(id) {
                    continue;
                }
                let Some(conn) = conns.get(id) else { continue };
                if matches!(member.delivery, Delivery::After(after) if message.offset <= after) {
                    continue; // in the member's replay already
                }
                let bytes = match conn.dialect {
                    Dialect::Seed => seed.get_or_insert_with(|| Utf8Bytes::from(SeedOut::of(message).encode())),
                    Dialect::V1 => v1.get_or_insert_with(|| Utf8Bytes::from(Envelope::message(message).encode())),
                }
                .clone();
                let kept = match &mut member.delivery {
                    // Held deliveries count against the outbox's bounds, in messages and in bytes.
                    Delivery::Held { held, bytes: held_bytes, .. } => {
                        let fits = held.len() < self.limits.outbox_messages
                            && (*held_bytes == 0 || *held_bytes + bytes.len() <= self.limits.outbox_bytes);
                        if fits {
                            *held_bytes += bytes.len();
                            held.push((message.offset, bytes));
                        }
                        fits
                    }
                    Delivery::After(_) => conn.outbox.offer(bytes, &self.limits),
                };
                if !kept {
                    stalled.push(*id);
                }
            }
        }
        for id in stalled {
            // Logged with the client's address when its session ends.
            tracing::debug!(conn = id, "outbox full: dropping a client that does not keep up");
            self.cut_conn(&mut guard, id, Cut::Slow);
        }
        drop(guard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::memory::LocalPresence;

    #[test]
    fn sequential_connection_ids_spread_over_the_bits_the_table_probes_with() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let build = BuildHasherDefault::<ConnIdHasher>::default();
        // hashbrown takes its 7-bit tag from the top of the hash and the bucket from the bottom:
        // an identity hash of small ids would give every id the same tag.
        let tags: std::collections::HashSet<u64> = (1..=10_000u64).map(|id| build.hash_one(id) >> 57).collect();
        let buckets: std::collections::HashSet<u64> = (1..=1_024u64).map(|id| build.hash_one(id) & 1023).collect();
        assert_eq!(tags.len(), 128, "every tag is used");
        assert!(buckets.len() > 600, "1,024 ids fall into {} of 1,024 buckets", buckets.len());
    }

    fn hub() -> Arc<Hub> {
        let limits = HubLimits {
            outbox_messages: 4,
            outbox_bytes: 1000,
            max_rooms_per_connection: 3,
            max_presence: 2,
            max_sessions_per_user: 2,
        };
        Hub::new(limits, "lobby".into(), NodeId::new("n"), Arc::new(LocalPresence::default()))
    }

    fn message(room: &str, offset: u64) -> StoredMessage {
        StoredMessage {
            room: room.into(),
            offset,
            id: None,
            name: "n".into(),
            message: "m".into(),
            time: "00:00:00".into(),
            ts_ms: 0,
        }
    }

    fn live(hub: &Hub, room: &str) -> (ConnId, Outbox) {
        let (id, outbox) = hub.register(Dialect::V1);
        let join = hub.join(id, room, "x").unwrap().expect("a new member");
        assert!(hub.start(id, room, join, 0));
        (id, outbox)
    }

    #[tokio::test]
    async fn rooms_without_members_are_forgotten() {
        let hub = hub();
        let (id, _rx) = hub.register(Dialect::V1);
        for room in ["a", "b", "c"] {
            hub.join(id, room, "x").unwrap();
        }
        assert_eq!(hub.join(id, "d", "x").unwrap_err(), JoinError::TooManyRooms { limit: 3 });
        assert_eq!(hub.room_count(), 3);
        hub.unregister(id);
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.presence("a").await.unwrap(), (Vec::new(), false));
    }

    #[test]
    fn a_full_outbox_drops_that_member_only() {
        let hub = hub();
        let (slow, slow_rx) = live(&hub, "r");
        let (fast, mut fast_rx) = live(&hub, "r");
        for offset in 1..=10 {
            hub.deliver(&[message("r", offset)]);
            while fast_rx.try_recv().is_some() {}
        }
        assert!(!hub.is_member(slow, "r"), "the member that never read was dropped");
        assert_eq!(slow_rx.cut(), Some(Cut::Slow), "marked so, for the slow-consumer count");
        assert!(hub.is_member(fast, "r"));
        assert_eq!(fast_rx.cut(), None);
        assert_eq!(hub.connection_count(), 1);
    }

    #[test]
    fn a_join_whose_held_messages_do_not_fit_drops_the_member_as_too_slow() {
        let hub = hub();
        let (id, rx) = hub.register(Dialect::V1);
        let join = hub.join(id, "a", "x").unwrap().unwrap();
        assert!(hub.start(id, "a", join, 0));
        hub.deliver(&[message("a", 1), message("a", 2), message("a", 3)]); // not read: 3 of 4 places
        let join = hub.join(id, "r", "x").unwrap().unwrap();
        hub.deliver(&[message("r", 1), message("r", 2)]); // held for the join
        assert!(!hub.start(id, "r", join, 0), "two held messages do not fit the one place left");
        assert_eq!(hub.connection_count(), 0);
        assert_eq!(rx.cut(), Some(Cut::Slow));
    }

    #[test]
    fn the_outbox_is_bounded_in_bytes_too() {
        let hub = hub();
        let (slow, slow_rx) = live(&hub, "r");
        let (fast, mut fast_rx) = live(&hub, "r");
        while fast_rx.try_recv().is_some() {} // the slow member's arrival
        let mut big = message("r", 1);
        big.message = "x".repeat(600);
        hub.deliver(&[big.clone()]);
        assert!(slow_rx.queued_bytes() > 600, "one large message fits an empty outbox");
        big.offset = 2;
        while fast_rx.try_recv().is_some() {}
        hub.deliver(&[big]);
        assert!(!hub.is_member(slow, "r"), "two messages of 600+ bytes pass the 1000-byte bound");
        assert!(hub.is_member(fast, "r"));
        assert_eq!(fast_rx.try_recv().map(|b| b.len() > 600), Some(true));
        let leave = fast_rx.try_recv().expect("the slow member's departure");
        assert!(leave.contains("\"leave\""), "{leave}");
        assert_eq!(fast_rx.queued_bytes(), 0, "reading gives the bytes back");
    }

    #[test]
    fn a_member_that_misses_a_message_gets_none_after_it() {
        let hub = hub();
        let (slow, mut slow_rx) = live(&hub, "r");
        let mut batch: Vec<_> = (1..=5).map(|offset| message("r", offset)).collect();
        batch[1].message = "x".repeat(2000); // offset 2 passes the byte bound after offset 1
        hub.deliver(&batch);
        assert_eq!(slow_rx.try_recv().map(|b| b.contains("\"offset\":1")), Some(true));
        assert_eq!(slow_rx.try_recv(), None, "offsets 3-5 would have fitted, but after a gap");
        assert!(!hub.is_member(slow, "r"));
    }

    #[test]
    fn a_joining_member_gets_what_follows_its_replay_once() {
        let hub = hub();
        let (id, mut rx) = hub.register(Dialect::V1);
        let join = hub.join(id, "r", "x").unwrap().unwrap();
        hub.deliver(&[message("r", 5), message("r", 6)]);
        assert_eq!(rx.try_recv(), None, "held until the replay is read");
        // The session read top = 5 (so 5 is in its replay) while 6 was being committed.
        assert!(hub.start(id, "r", join, 5));
        assert_eq!(rx.try_recv().map(|b| b.contains("\"offset\":6")), Some(true));
        assert_eq!(rx.try_recv(), None, "5 came with the replay, not again");
        hub.deliver(&[message("r", 7)]);
        assert_eq!(rx.try_recv().map(|b| b.contains("\"offset\":7")), Some(true));
    }

    #[test]
    fn shutting_down_closes_every_outbox_and_new_ones_too() {
        let hub = hub();
        let (member, mut before) = live(&hub, "r");
        hub.shut_down();
        hub.deliver(&[message("r", 1)]);
        assert!(hub.is_member(member, "r"), "a commit while closing drops nobody as too slow");
        assert_eq!(before.cut(), None, "closed for the shutdown, not for being slow");
        let (_, mut after) = hub.register(Dialect::V1);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(before.poll_recv(&mut cx), Poll::Ready(None));
        assert_eq!(after.poll_recv(&mut cx), Poll::Ready(None));
        assert!(hub.is_closing());
    }

    #[test]
    fn an_earlier_join_cannot_start_or_abandon_a_later_one() {
        let hub = hub();
        let (id, mut rx) = hub.register(Dialect::V1);
        let first = hub.join(id, "r", "x").unwrap().unwrap();
        assert!(hub.leave(id, "r"));
        let second = hub.join(id, "r", "x").unwrap().unwrap();
        assert!(!hub.start(id, "r", first, 0), "the first join's replay is stale");
        assert!(!hub.abandon(id, "r", first), "nor can its failure take the member out");
        hub.deliver(&[message("r", 1)]);
        assert_eq!(rx.try_recv(), None, "still held for the second join");
        assert!(hub.start(id, "r", second, 0));
        assert_eq!(rx.try_recv().map(|b| b.contains("\"offset\":1")), Some(true));
        assert!(!hub.abandon(id, "r", second), "a started member is not abandoned");
        assert!(hub.is_member(id, "r"));
    }

    #[test]
    fn a_held_member_hears_no_presence_and_holds_within_the_byte_bound() {
        let hub = hub();
        let (held, mut ann_rx) = hub.register(Dialect::V1);
        hub.join(held, "r", "ann").unwrap();
        let (_bob, _bob_rx) = live(&hub, "r");
        assert_eq!(ann_rx.try_recv(), None, "no presence event before its joined");
        let mut big = message("r", 1);
        big.message = "x".repeat(600);
        hub.deliver(&[big.clone()]);
        big.offset = 2;
        hub.deliver(&[big]);
        assert!(!hub.is_member(held, "r"), "1,200 held bytes pass the 1,000-byte bound");
    }

    #[tokio::test]
    async fn presence_is_capped_and_says_so() {
        let hub = hub();
        let ids: Vec<_> = (0..3).map(|_| hub.register(Dialect::V1)).collect();
        for (id, _) in &ids {
            hub.join(*id, "big", "member").unwrap();
        }
        let (members, truncated) = hub.presence("big").await.unwrap();
        assert_eq!((members.len(), truncated), (2, true));
        assert_eq!(members[0].id, "n-1", "ids name the node");
    }

    #[tokio::test]
    async fn listeners_get_messages_and_are_never_announced_or_listed() {
        let hub = hub();
        let (_member, mut member_rx) = live(&hub, "r");
        let (listener, mut listener_rx) = hub.register_listener();
        let join = hub.join(listener, "r", "").unwrap().unwrap();
        assert!(hub.start(listener, "r", join, 0));
        hub.deliver(&[message("r", 1)]);
        assert_eq!(listener_rx.try_recv().map(|b| b.contains("\"offset\":1")), Some(true));
        assert!(hub.leave(listener, "r"));
        assert_eq!(member_rx.try_recv().map(|b| b.contains("\"type\":\"message\"")), Some(true));
        assert_eq!(member_rx.try_recv(), None, "no join or leave event for the listener");
        assert_eq!(hub.presence("r").await.unwrap().0.len(), 1, "only the member is listed");
    }

    #[test]
    fn per_user_commands_reach_that_users_sessions_and_no_others() {
        let hub = hub();
        let user = |sub: &str| Some((sub.to_owned(), sub.to_uppercase()));
        let (ann, mut ann_rx) = live(&hub, "r");
        let (moved, moved_rx) = live(&hub, "r");
        let (bob, bob_rx) = live(&hub, "r");
        hub.set_user(ann, user("ann")).unwrap();
        hub.set_user(moved, user("ann")).unwrap();
        hub.set_user(bob, user("bob")).unwrap();
        assert!(hub.user_at_limit("ann"));
        // Signing in as someone else moves the session from one user to the other.
        hub.set_user(moved, user("bob")).unwrap();
        assert!(!hub.user_at_limit("ann"), "ann has one session left");
        assert!(hub.user_at_limit("bob"));

        while ann_rx.try_recv().is_some() {}
        assert_eq!(hub.unsubscribe_user("ann", "r"), 1);
        assert_eq!(ann_rx.try_recv().map(|b| b.contains("\"reason\":\"unsubscribed\"")), Some(true));
        assert_eq!(hub.unsubscribe_user("ann", "r"), 0, "no longer a member");

        assert_eq!(hub.disconnect_user("bob", 4000, "bye"), 2);
        for outbox in [&moved_rx, &bob_rx] {
            assert_eq!(outbox.cut(), Some(Cut::Api(4000, "bye".into())));
        }
        assert_eq!(ann_rx.cut(), None);
        assert!(!hub.user_at_limit("bob"), "ended sessions give their places back");
        assert_eq!(hub.disconnect_user("bob", 4000, "bye"), 0);
        assert_eq!(hub.connection_count(), 1);
    }

    #[tokio::test]
    async fn seed_members_hear_messages_but_no_presence() {
        let hub = hub();
        let (seed, mut seed_rx) = hub.register(Dialect::Seed);
        hub.enter_default_room(seed);
        let (_v1, _v1_rx) = live(&hub, "lobby");
        assert_eq!(seed_rx.try_recv(), None, "no presence event for a seed client");
        hub.deliver(&[message("lobby", 1)]);
        assert_eq!(seed_rx.try_recv().as_deref(), Some(r#"{"name":"n","message":"m","time":"00:00:00"}"#));
        assert_eq!(hub.presence("lobby").await.unwrap().0.len(), 1, "seed clients are not listed");
    }
}
