//! Engines that keep everything in this process's memory: [`MemoryEngine`] (history that lives as
//! long as the process, for tests of the chat core and for throwaway servers) and [`LocalPresence`]
//! (presence of a single node).
//!
//! Both keep the full contract of [`crate::engine`]: offsets per room from 1, idempotency while a
//! message is retained, retention by count and age, delivery in offset order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    age_cutoff_ms, new_epoch, now_ms, BoxFuture, Deliver, Engine, EngineError, History, NewMessage, PendingPublish,
    Position, Presence, PresenceEntry, Published, Retention, StoredMessage,
};

#[derive(Default)]
struct RoomLog {
    last: u64,
    messages: VecDeque<StoredMessage>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<String, RoomLog>,
    closed: bool,
}

/// History in memory: lost when the process ends (a restart is a new epoch).
pub struct MemoryEngine {
    state: Mutex<State>,
    retention: Retention,
    sink: Arc<dyn Deliver>,
    epoch: Arc<str>,
}

impl MemoryEngine {
    /// An empty history whose committed messages go to `sink`.
    pub fn new(retention: Retention, sink: Arc<dyn Deliver>) -> Arc<Self> {
        Arc::new(Self { state: Mutex::default(), retention, sink, epoch: new_epoch().into() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit(&self, new: NewMessage) -> Result<Published, EngineError> {
        let mut state = self.lock();
        if state.closed {
            return Err(EngineError::Closed);
        }
        let cutoff = age_cutoff_ms(self.retention.max_age);
        let log = state.rooms.entry(new.room.clone()).or_default();
        while log.messages.front().is_some_and(|m| m.ts_ms < cutoff) {
            log.messages.pop_front();
        }
        if let Some(id) = &new.id {
            if let Some(original) = log.messages.iter().find(|m| m.id.as_ref() == Some(id)) {
                return Ok(Published::Duplicate(original.clone()));
            }
        }
        log.last += 1;
        let stored = StoredMessage {
            room: new.room,
            offset: log.last,
            id: new.id,
            name: new.name,
            message: new.message,
            time: new.time,
            ts_ms: now_ms(),
        };
        log.messages.push_back(stored.clone());
        while log.messages.len() as u64 > self.retention.max_messages {
            log.messages.pop_front();
        }
        // Delivered under the lock: two publishers' messages reach the hub in offset order.
        self.sink.deliver(std::slice::from_ref(&stored));
        Ok(Published::Stored(stored))
    }
}

impl Engine for MemoryEngine {
    fn publish(&self, message: NewMessage) -> Result<PendingPublish, EngineError> {
        let outcome = self.commit(message)?;
        Ok(Box::pin(std::future::ready(Ok(outcome))))
    }

    fn history(&self, room: &str, after: u64, up_to: u64, limit: usize) -> BoxFuture<'_, Result<History, EngineError>> {
        let cutoff = age_cutoff_ms(self.retention.max_age);
        let state = self.lock();
        let retained: Vec<&StoredMessage> = state
            .rooms
            .get(room)
            .map(|log| log.messages.iter().filter(|m| m.ts_ms >= cutoff).collect())
            .unwrap_or_default();
        let first_retained = retained.first().map_or(up_to + 1, |m| m.offset);
        let wanted: Vec<StoredMessage> =
            retained.iter().filter(|m| m.offset > after && m.offset <= up_to).map(|m| (*m).clone()).collect();
        let skip = wanted.len().saturating_sub(limit);
        let messages = wanted.into_iter().skip(skip).collect();
        Box::pin(std::future::ready(Ok(History { messages, first_retained, last_offset: up_to })))
    }

    fn top(&self, room: &str) -> BoxFuture<'_, Result<Position, EngineError>> {
        let offset = self.lock().rooms.get(room).map_or(0, |log| log.last);
        Box::pin(std::future::ready(Ok(Position { offset, epoch: self.epoch.clone() })))
    }

    // One process sees every commit: the trait's defaults (no subscriptions to make, no other node
    // to tell) fit.

    fn remove_history(&self, room: &str) -> BoxFuture<'_, Result<u64, EngineError>> {
        let removed = self.lock().rooms.get_mut(room).map_or(0, |log| std::mem::take(&mut log.messages).len());
        Box::pin(std::future::ready(Ok(removed as u64)))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.lock().closed = true;
        Box::pin(std::future::ready(()))
    }
}

/// Presence of one node: members in the order they joined.
#[derive(Default)]
pub struct LocalPresence {
    rooms: Mutex<HashMap<String, RoomPresence>>,
    next: AtomicU64,
}

#[derive(Default)]
struct RoomPresence {
    by_order: BTreeMap<u64, PresenceEntry>,
    order_of: HashMap<String, u64>,
}

impl Presence for LocalPresence {
    fn add(&self, room: &str, member: PresenceEntry) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let entry = rooms.entry(room.to_owned()).or_default();
        let order = match entry.order_of.get(&member.id) {
            Some(order) => *order,
            None => {
                let order = self.next.fetch_add(1, Ordering::Relaxed);
                entry.order_of.insert(member.id.clone(), order);
                order
            }
        };
        entry.by_order.insert(order, member);
    }

    fn remove(&self, room: &str, id: &str) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = rooms.get_mut(room) else { return };
        if let Some(order) = entry.order_of.remove(id) {
            entry.by_order.remove(&order);
        }
        if entry.order_of.is_empty() {
            rooms.remove(room);
        }
    }

    fn list(&self, room: &str, limit: usize) -> BoxFuture<'_, Result<(Vec<PresenceEntry>, bool), EngineError>> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let listed = match rooms.get(room) {
            Some(entry) => (entry.by_order.values().take(limit).cloned().collect(), entry.by_order.len() > limit),
            None => (Vec::new(), false),
        };
        Box::pin(std::future::ready(Ok(listed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Mutex<Vec<u64>>);

    impl Deliver for Collect {
        fn deliver(&self, batch: &[StoredMessage]) {
            self.0.lock().unwrap().extend(batch.iter().map(|m| m.offset));
        }
    }

    fn new(room: &str, id: Option<&str>) -> NewMessage {
        NewMessage {
            room: room.into(),
            id: id.map(Into::into),
            name: "n".into(),
            message: "m".into(),
            time: "t".into(),
        }
    }

    #[tokio::test]
    async fn offsets_idempotency_and_retention_by_count() {
        let sink = Arc::new(Collect(Mutex::default()));
        let engine = MemoryEngine::new(Retention { max_messages: 2, max_age: None, max_db_bytes: None }, sink.clone());
        for _ in 0..3 {
            engine.publish(new("r", None)).unwrap().await.unwrap();
        }
        let first = engine.publish(new("r", Some("k"))).unwrap().await.unwrap();
        let again = engine.publish(new("r", Some("k"))).unwrap().await.unwrap();
        assert_eq!((first.message().offset, again.is_duplicate(), again.message().offset), (4, true, 4));
        assert_eq!(*sink.0.lock().unwrap(), vec![1, 2, 3, 4], "a duplicate is not delivered");
        let history = engine.history("r", 0, 4, 10).await.unwrap();
        assert_eq!(history.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(history.first_retained, 3);
        assert_eq!(engine.top("r").await.unwrap().offset, 4);
        engine.shutdown().await;
        assert_eq!(engine.publish(new("r", None)).err(), Some(EngineError::Closed));
    }

    #[tokio::test]
    async fn presence_keeps_join_order_and_renames_in_place() {
        let presence = LocalPresence::default();
        for id in ["n-9", "n-10", "n-11"] {
            presence.add("r", PresenceEntry { id: id.into(), name: id.into() });
        }
        presence.add("r", PresenceEntry { id: "n-9".into(), name: "renamed".into() });
        let (members, truncated) = presence.list("r", 2).await.unwrap();
        assert_eq!(members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["renamed", "n-10"]);
        assert!(truncated);
        for id in ["n-9", "n-10", "n-11"] {
            presence.remove("r", id);
        }
        assert_eq!(presence.list("r", 2).await.unwrap(), (Vec::new(), false));
        assert!(presence.rooms.lock().unwrap().is_empty(), "an empty room is forgotten");
    }
}
