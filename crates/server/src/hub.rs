//! Rooms, their members and fan-out.
//!
//! The store's writer calls [`Hub::deliver`] with each committed batch, in offset order; the hub
//! encodes each message once per protocol and pushes the shared bytes into every member's outbox,
//! bounded in messages and in bytes. A member whose outbox is full is dropped from the hub (its
//! session then closes it): one stalled client never holds up a room.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::json;
use switchboard_ws::Utf8Bytes;
use tokio::sync::mpsc;

use crate::protocol;
use crate::store::StoredMessage;

pub type ConnId = u64;

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("already a member of {limit} rooms, the most allowed")]
    TooManyRooms { limit: usize },
    #[error("connection is gone")]
    Gone,
}

/// What a joining member needs: where live delivery starts, and who is there.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Messages up to this offset are in the store; later ones arrive through the outbox.
    pub last_offset: u64,
    pub members: Vec<(ConnId, String)>,
    pub truncated: bool,
}

#[derive(Debug, Clone)]
pub struct HubLimits {
    pub outbox_messages: usize,
    pub outbox_bytes: usize,
    pub max_rooms_per_connection: usize,
    pub max_presence: usize,
}

struct Room {
    members: BTreeMap<ConnId, String>,
    last_delivered: u64,
}

struct Conn {
    outbox: mpsc::Sender<Utf8Bytes>,
    /// Bytes in the outbox, shared with the receiving [`Outbox`].
    queued: Arc<AtomicUsize>,
    seed: bool,
    rooms: HashSet<String>,
}

impl Conn {
    /// Queues bytes unless that would pass a bound; false means this client is not keeping up. One
    /// message larger than the byte bound still goes into an empty outbox.
    fn offer(&self, bytes: Utf8Bytes, max_bytes: usize) -> bool {
        let len = bytes.len();
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > max_bytes {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        if self.outbox.try_send(bytes).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// The receiving end of a connection's outbox. It ends (`None`) when the hub drops the connection.
pub struct Outbox {
    receiver: mpsc::Receiver<Utf8Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Outbox {
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        let bytes = self.receiver.recv().await?;
        self.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
        Some(bytes)
    }

    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        let bytes = self.receiver.try_recv().ok()?;
        self.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
        Some(bytes)
    }

    /// Bytes waiting in the outbox.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Inner {
    rooms: HashMap<String, Room>,
    conns: HashMap<ConnId, Conn>,
}

pub struct Hub {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    pub limits: HubLimits,
    pub default_room: String,
}

impl Hub {
    pub fn new(limits: HubLimits, default_room: String) -> Arc<Self> {
        Arc::new(Self { inner: Mutex::new(Inner::default()), next_id: AtomicU64::new(1), limits, default_room })
    }

    /// Seeds each room's delivery position from the store (at startup, before serving).
    pub fn set_last_offsets(&self, last_offsets: HashMap<String, u64>) {
        let mut inner = self.lock();
        for (room, last) in last_offsets {
            inner
                .rooms
                .entry(room)
                .or_insert_with(|| Room { members: BTreeMap::new(), last_delivered: 0 })
                .last_delivered = last;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection; seed-protocol connections are members of the default room from the start.
    pub fn register(&self, seed: bool) -> (ConnId, Outbox) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (outbox, receiver) = mpsc::channel(self.limits.outbox_messages);
        let queued = Arc::new(AtomicUsize::new(0));
        let mut inner = self.lock();
        let mut rooms = HashSet::new();
        if seed {
            rooms.insert(self.default_room.clone());
            room_entry(&mut inner.rooms, &self.default_room).members.insert(id, String::new());
        }
        inner.conns.insert(id, Conn { outbox, queued: queued.clone(), seed, rooms });
        (id, Outbox { receiver, queued })
    }

    /// Removes a connection from every room (telling the others it left).
    pub fn unregister(&self, id: ConnId) {
        let mut inner = self.lock();
        remove_conn(&mut inner, id, self.limits.outbox_bytes);
    }

    pub fn join(&self, id: ConnId, room: &str, name: &str) -> Result<Joined, JoinError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let conn = inner.conns.get_mut(&id).ok_or(JoinError::Gone)?;
        let already = conn.rooms.contains(room);
        if !already && conn.rooms.len() >= self.limits.max_rooms_per_connection {
            return Err(JoinError::TooManyRooms { limit: self.limits.max_rooms_per_connection });
        }
        conn.rooms.insert(room.to_owned());
        let entry = room_entry(&mut inner.rooms, room);
        let previous = entry.members.insert(id, name.to_owned());
        let last_offset = entry.last_delivered;
        // Joining again is how a member changes its name: the room hears about the change.
        let event = match previous {
            None => Some("join"),
            Some(old) if old != name => Some("update"),
            Some(_) => None,
        };
        if let Some(event) = event {
            let event = json!({"type": "presence", "room": room, "event": event, "member": {"id": id, "name": name}});
            broadcast_presence(inner, room, id, event.to_string(), self.limits.outbox_bytes);
        }
        let (members, truncated) = self.members_of(&guard, room);
        Ok(Joined { last_offset, members, truncated })
    }

    /// Leaves a room; false if the connection was not in it.
    pub fn leave(&self, id: ConnId, room: &str) -> bool {
        let mut inner = self.lock();
        leave_room(&mut inner, id, room, self.limits.outbox_bytes)
    }

    /// The rooms a connection is in.
    pub fn rooms_of(&self, id: ConnId) -> Vec<String> {
        self.lock().conns.get(&id).map(|c| c.rooms.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn is_member(&self, id: ConnId, room: &str) -> bool {
        self.lock().conns.get(&id).is_some_and(|c| c.rooms.contains(room))
    }

    pub fn presence(&self, room: &str) -> (Vec<(ConnId, String)>, bool) {
        let inner = self.lock();
        self.members_of(&inner, room)
    }

    pub fn last_offset(&self, room: &str) -> u64 {
        self.lock().rooms.get(room).map_or(0, |r| r.last_delivered)
    }

    fn members_of(&self, inner: &Inner, room: &str) -> (Vec<(ConnId, String)>, bool) {
        let Some(room) = inner.rooms.get(room) else { return (Vec::new(), false) };
        let visible = room.members.iter().filter(|(id, _)| inner.conns.get(id).is_some_and(|c| !c.seed));
        let members: Vec<_> = visible.clone().take(self.limits.max_presence).map(|(id, n)| (*id, n.clone())).collect();
        let truncated = visible.count() > members.len();
        (members, truncated)
    }

    /// Fans a committed batch out to the members of its rooms (called by the store's writer).
    pub fn deliver(&self, batch: &[StoredMessage]) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut stalled = Vec::new();
        for message in batch {
            let room = room_entry(&mut inner.rooms, &message.room);
            room.last_delivered = room.last_delivered.max(message.offset);
            if room.members.is_empty() {
                continue;
            }
            let v1 = Utf8Bytes::from(protocol::message_envelope(message));
            let mut seed = None;
            for id in room.members.keys() {
                // A member that missed a message gets nothing after it: it is cut off, never gapped.
                if stalled.contains(id) {
                    continue;
                }
                let Some(conn) = inner.conns.get(id) else { continue };
                let bytes = if conn.seed {
                    seed.get_or_insert_with(|| Utf8Bytes::from(protocol::seed_message(message))).clone()
                } else {
                    v1.clone()
                };
                if !conn.offer(bytes, self.limits.outbox_bytes) {
                    stalled.push(*id);
                }
            }
        }
        for id in stalled {
            tracing::info!(conn = id, "outbox full: dropping a client that does not keep up");
            remove_conn(inner, id, self.limits.outbox_bytes);
        }
    }

    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Rooms the hub keeps state for (members, or a delivery position).
    pub fn room_count(&self) -> usize {
        self.lock().rooms.len()
    }
}

fn room_entry<'a>(rooms: &'a mut HashMap<String, Room>, room: &str) -> &'a mut Room {
    if !rooms.contains_key(room) {
        rooms.insert(room.to_owned(), Room { members: BTreeMap::new(), last_delivered: 0 });
    }
    rooms.get_mut(room).expect("inserted")
}

fn leave_room(inner: &mut Inner, id: ConnId, room: &str, outbox_bytes: usize) -> bool {
    let Some(conn) = inner.conns.get_mut(&id) else { return false };
    if !conn.rooms.remove(room) {
        return false;
    }
    let seed = conn.seed;
    let name = inner.rooms.get_mut(room).and_then(|r| r.members.remove(&id)).unwrap_or_default();
    // A room that is empty and never held a message leaves nothing to remember: forget it, so a flood
    // of joins to made-up rooms costs no memory once its connections are gone.
    if inner.rooms.get(room).is_some_and(|r| r.members.is_empty() && r.last_delivered == 0) {
        inner.rooms.remove(room);
    }
    if !seed {
        let event = json!({"type": "presence", "room": room, "event": "leave", "member": {"id": id, "name": name}});
        broadcast_presence(inner, room, id, event.to_string(), outbox_bytes);
    }
    true
}

fn remove_conn(inner: &mut Inner, id: ConnId, outbox_bytes: usize) {
    let rooms: Vec<String> = inner.conns.get(&id).map(|c| c.rooms.iter().cloned().collect()).unwrap_or_default();
    for room in rooms {
        leave_room(inner, id, &room, outbox_bytes);
    }
    // Dropping the sender ends the session's outbox: it closes the socket.
    inner.conns.remove(&id);
}

/// Presence events go to the room's full-protocol members other than the subject; seed clients never
/// receive anything but chat messages.
fn broadcast_presence(inner: &Inner, room: &str, subject: ConnId, event: String, outbox_bytes: usize) {
    let Some(room) = inner.rooms.get(room) else { return };
    let bytes = Utf8Bytes::from(event);
    for id in room.members.keys().filter(|id| **id != subject) {
        if let Some(conn) = inner.conns.get(id).filter(|c| !c.seed) {
            // Presence is best effort: an event that does not fit is lost for that member, whose
            // list can be refreshed with a presence request; a member that far behind is about to be
            // dropped by the next chat message anyway.
            conn.offer(bytes.clone(), outbox_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Arc<Hub> {
        let limits = HubLimits { outbox_messages: 4, outbox_bytes: 1000, max_rooms_per_connection: 3, max_presence: 2 };
        Hub::new(limits, "lobby".into())
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

    #[test]
    fn rooms_without_members_or_messages_are_forgotten() {
        let hub = hub();
        let (id, _rx) = hub.register(false);
        for room in ["a", "b", "c"] {
            hub.join(id, room, "x").unwrap();
        }
        assert_eq!(hub.join(id, "d", "x").unwrap_err(), JoinError::TooManyRooms { limit: 3 });
        hub.deliver(&[message("a", 1)]);
        hub.unregister(id);
        assert_eq!(hub.room_count(), 1, "only the room with history is remembered");
        assert_eq!(hub.last_offset("a"), 1);
    }

    #[test]
    fn a_full_outbox_drops_that_member_only() {
        let hub = hub();
        let (slow, _slow_rx) = hub.register(false);
        let (fast, mut fast_rx) = hub.register(false);
        hub.join(slow, "r", "slow").unwrap();
        hub.join(fast, "r", "fast").unwrap();
        for offset in 1..=10 {
            hub.deliver(&[message("r", offset)]);
            while fast_rx.try_recv().is_some() {}
        }
        assert!(!hub.is_member(slow, "r"), "the member that never read was dropped");
        assert!(hub.is_member(fast, "r"));
        assert_eq!(hub.connection_count(), 1);
    }

    #[test]
    fn the_outbox_is_bounded_in_bytes_too() {
        let hub = hub();
        let (slow, slow_rx) = hub.register(false);
        let (fast, mut fast_rx) = hub.register(false);
        hub.join(slow, "r", "slow").unwrap();
        hub.join(fast, "r", "fast").unwrap();
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
        let (slow, mut slow_rx) = hub.register(false);
        hub.join(slow, "r", "slow").unwrap();
        let mut batch: Vec<_> = (1..=5).map(|offset| message("r", offset)).collect();
        batch[1].message = "x".repeat(2000); // offset 2 passes the byte bound after offset 1
        hub.deliver(&batch);
        assert_eq!(slow_rx.try_recv().map(|b| b.contains("\"offset\":1")), Some(true));
        assert_eq!(slow_rx.try_recv(), None, "offsets 3-5 would have fitted, but after a gap");
        assert!(!hub.is_member(slow, "r"));
    }

    #[test]
    fn presence_is_capped_and_says_so() {
        let hub = hub();
        let ids: Vec<_> = (0..3).map(|_| hub.register(false)).collect();
        for (id, _) in &ids {
            hub.join(*id, "big", "member").unwrap();
        }
        let (members, truncated) = hub.presence("big");
        assert_eq!((members.len(), truncated), (2, true));
    }
}
