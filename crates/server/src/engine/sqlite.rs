//! Message history in SQLite: one writer thread that batches publishes into transactions, and a reader
//! connection for history queries (WAL lets them run side by side).
//!
//! A message is acknowledged, and handed to fan-out, only after its transaction committed: whatever a
//! client was told or shown survives a crash of the process. Offsets are per room, start at 1, and keep
//! increasing across restarts and trims (the last offset of each room is stored apart from the
//! messages). Publishes carrying a client-chosen id are idempotent while the first copy is retained.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    age_cutoff_ms, new_epoch, now_ms, BoxFuture, Deliver, Engine, EngineError, History, NewMessage, PendingPublish,
    Position, Published, Retention, StoredMessage,
};

/// Most publishes taken into one transaction.
const MAX_BATCH: usize = 512;
/// Bound on publishes waiting for the writer: beyond it publishers are told the store is busy.
const QUEUE_DEPTH: usize = 16_384;
/// How often retention by age runs.
const AGE_TRIM_EVERY: Duration = Duration::from_secs(10);

type Reply = tokio::sync::oneshot::Sender<Result<Published, EngineError>>;

enum Command {
    Publish(NewMessage, Reply),
    /// Delete a room's messages, after what was queued before.
    RemoveHistory(String, tokio::sync::oneshot::Sender<Result<u64, EngineError>>),
    /// Commit what is queued and stop.
    Shutdown,
}

impl Command {
    fn message(&self) -> Option<&NewMessage> {
        match self {
            Command::Publish(message, _) => Some(message),
            Command::Shutdown | Command::RemoveHistory(..) => None,
        }
    }

    fn into_reply(self) -> Option<Reply> {
        match self {
            Command::Publish(_, reply) => Some(reply),
            Command::Shutdown | Command::RemoveHistory(..) => None,
        }
    }
}

/// The embedded default engine: history in one SQLite file.
pub struct Store {
    queue: SyncSender<Command>,
    retention: Retention,
    reader: Mutex<Connection>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    /// Each room's last committed offset, updated by the writer before it delivers.
    tops: Arc<Mutex<HashMap<String, u64>>>,
    epoch: Arc<str>,
    /// Held while the store is open: see [`lock_database`].
    _lock: std::fs::File,
}

/// One server per database file: a second process would count offsets from what it read at its
/// start, and give the first one's numbers to other messages. The lock is on a file beside the
/// database (`chat.db.lock`), not on the database: a second handle on the database itself, once
/// closed, would drop SQLite's own locks. The kernel lets go of it when the process ends, however.
/// It is beside the file the path leads to, through symbolic links, so that one file under two
/// names is one lock.
fn lock_database(path: &Path) -> Result<std::fs::File, String> {
    let mut lock_path = real_path(path).into_os_string();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock_path);
    let file = file.map_err(|e| format!("{}: {e}", Path::new(&lock_path).display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err("another switchboard process has this database open \
             (one server per database file: stop the other one first; nodes of a cluster share Redis, not a file)"
            .to_owned()),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("could not lock it: {e}")),
    }
}

/// The path with symbolic links resolved; for a file not created yet (a link to one too), its
/// directory's real path with its name (as given, if even that cannot be resolved: opening it will
/// say why).
fn real_path(path: &Path) -> PathBuf {
    let mut path = path.to_owned();
    // At most as many links as Linux follows in one lookup.
    for _ in 0..40 {
        if let Ok(real) = std::fs::canonicalize(&path) {
            return real;
        }
        match std::fs::read_link(&path) {
            // A link to a file not created yet: where it leads (relative to the link's directory).
            Ok(target) => path = path.parent().unwrap_or(Path::new("")).join(target),
            Err(_) => break,
        }
    }
    let path = path.as_path();
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_owned(),
    }
}

impl Store {
    /// Opens (creating if needed) the database and starts the writer; `sink` is given every committed batch.
    pub fn open(path: &Path, retention: Retention, sink: Arc<dyn Deliver>) -> Result<Arc<Store>, EngineError> {
        let open_err = |source: rusqlite::Error| EngineError::Open {
            path: path.display().to_string(),
            reason: source.to_string(),
        };
        let lock =
            lock_database(path).map_err(|reason| EngineError::Open { path: path.display().to_string(), reason })?;
        let writer_conn = Connection::open(path).map_err(open_err)?;
        writer_conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, last_offset INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS messages (
                     room TEXT NOT NULL, offset INTEGER NOT NULL, msg_id TEXT, name TEXT NOT NULL,
                     message TEXT NOT NULL, time TEXT NOT NULL, ts_ms INTEGER NOT NULL,
                     PRIMARY KEY (room, offset));
                 CREATE UNIQUE INDEX IF NOT EXISTS messages_msg_id ON messages (room, msg_id) WHERE msg_id IS NOT NULL;
                 CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts_ms);
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
            )
            .map_err(open_err)?;
        // The epoch is born with the database: a new file (the old one lost) is a new history. Written
        // before the size cap applies, so a database already at its cap still opens.
        writer_conn
            .execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)", params![new_epoch()])
            .map_err(open_err)?;
        if let Some(bytes) = retention.max_db_bytes {
            let page_size: i64 = writer_conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(open_err)?;
            let pages = (bytes as i64 / page_size).max(1);
            // SQLite answers with the number it settled on (never below the current size).
            let _: i64 = writer_conn
                .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| r.get(0))
                .map_err(open_err)?;
        }
        let epoch: String =
            writer_conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0)).map_err(open_err)?;
        let reader = Connection::open(path).map_err(open_err)?;
        let mut last_offsets = HashMap::new();
        {
            let mut statement = writer_conn.prepare("SELECT name, last_offset FROM rooms").map_err(open_err)?;
            let rows = statement
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
                .map_err(open_err)?;
            for row in rows {
                let (room, last) = row.map_err(open_err)?;
                last_offsets.insert(room, last as u64);
            }
        }
        let (queue, commands) = mpsc::sync_channel(QUEUE_DEPTH);
        let tops = Arc::new(Mutex::new(last_offsets.clone()));
        let mut writer = Writer {
            conn: writer_conn,
            last_offsets,
            retention,
            sink,
            tops: tops.clone(),
            last_age_trim: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("switchboard-store".into())
            .spawn(move || writer.run(commands))
            .map_err(|e| EngineError::Write(e.to_string()))?;
        Ok(Arc::new(Store {
            queue,
            retention,
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(handle)),
            path: path.to_owned(),
            tops,
            epoch: epoch.into(),
            _lock: lock,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a message for storage at once (so messages from one publisher keep their order) and
    /// returns what resolves when it is committed, or found to be a duplicate.
    pub fn submit(&self, message: NewMessage) -> Result<PendingPublish, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        match self.queue.try_send(Command::Publish(message, reply)) {
            Ok(()) => Ok(Box::pin(async move { answer.await.unwrap_or(Err(EngineError::Closed)) })),
            Err(TrySendError::Full(_)) => Err(EngineError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Closed),
        }
    }

    /// [`Store::submit`] and wait.
    pub async fn publish_and_wait(&self, message: NewMessage) -> Result<Published, EngineError> {
        self.submit(message)?.await
    }

    /// Messages of `room` with offsets in `(after, up_to]`, oldest first, at most `limit` of the newest.
    /// Messages older than the retention age are never returned, even before the writer trims them.
    pub fn read_history(&self, room: &str, after: u64, up_to: u64, limit: usize) -> Result<History, EngineError> {
        let cutoff = age_cutoff_ms(self.retention.max_age);
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let first_retained: Option<i64> = reader
            .query_row("SELECT MIN(offset) FROM messages WHERE room = ?1 AND ts_ms >= ?2", params![room, cutoff], |r| {
                r.get(0)
            })
            .optional()
            .map_err(read_err)?
            .flatten();
        let mut statement = reader
            .prepare_cached(
                "SELECT offset, msg_id, name, message, time, ts_ms FROM messages
             WHERE room = ?1 AND offset > ?2 AND offset <= ?3 AND ts_ms >= ?5 ORDER BY offset DESC LIMIT ?4",
            )
            .map_err(read_err)?;
        let rows = statement
            .query_map(params![room, after as i64, up_to as i64, limit as i64, cutoff], |row| {
                Ok(StoredMessage {
                    room: room.to_owned(),
                    offset: row.get::<_, i64>(0)? as u64,
                    id: row.get(1)?,
                    name: row.get(2)?,
                    message: row.get(3)?,
                    time: row.get(4)?,
                    ts_ms: row.get(5)?,
                })
            })
            .map_err(read_err)?;
        let mut messages = rows.collect::<Result<Vec<_>, _>>().map_err(read_err)?;
        messages.reverse();
        Ok(History { messages, first_retained: first_retained.map_or(up_to + 1, |f| f as u64), last_offset: up_to })
    }
}

impl Store {
    /// Commits everything queued so far, stops the writer and waits for it; publishes after this
    /// are refused with [`EngineError::Closed`]. Blocks: call it off the async threads.
    pub fn close(&self) {
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = self.queue.send(Command::Shutdown);
            let _ = handle.join();
        }
    }
}

impl Engine for Store {
    fn publish(&self, message: NewMessage) -> Result<PendingPublish, EngineError> {
        self.submit(message)
    }

    fn history(&self, room: &str, after: u64, up_to: u64, limit: usize) -> BoxFuture<'_, Result<History, EngineError>> {
        // A local read of an indexed range: quick enough to answer in place.
        Box::pin(std::future::ready(self.read_history(room, after, up_to, limit)))
    }

    fn top(&self, room: &str) -> BoxFuture<'_, Result<Position, EngineError>> {
        let offset = self.tops.lock().unwrap_or_else(|p| p.into_inner()).get(room).copied().unwrap_or(0);
        Box::pin(std::future::ready(Ok(Position { offset, epoch: self.epoch.clone() })))
    }

    // One process sees every commit: the trait's defaults (no subscriptions to make, no other node
    // to tell) fit.

    fn remove_history(&self, room: &str) -> BoxFuture<'_, Result<u64, EngineError>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = self.queue.try_send(Command::RemoveHistory(room.to_owned(), reply));
        Box::pin(async move {
            match queued {
                Ok(()) => answer.await.unwrap_or(Err(EngineError::Closed)),
                Err(TrySendError::Full(_)) => Err(EngineError::Busy),
                Err(TrySendError::Disconnected(_)) => Err(EngineError::Closed),
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(handle) = handle {
                let _ = self.queue.send(Command::Shutdown);
                // Joining blocks: off the async threads.
                let _ = tokio::task::spawn_blocking(move || handle.join()).await;
            }
        })
    }
}

fn read_err(error: rusqlite::Error) -> EngineError {
    EngineError::Read(error.to_string())
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    conn: Connection,
    last_offsets: HashMap<String, u64>,
    retention: Retention,
    sink: Arc<dyn Deliver>,
    tops: Arc<Mutex<HashMap<String, u64>>>,
    last_age_trim: Instant,
}

impl Writer {
    fn run(&mut self, commands: Receiver<Command>) {
        loop {
            let first = match commands.recv_timeout(AGE_TRIM_EVERY) {
                Ok(command) => command,
                Err(RecvTimeoutError::Timeout) => {
                    self.trim_by_age();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let first = match first {
                Command::RemoveHistory(room, reply) => {
                    let _ = reply.send(self.remove_history(&room));
                    continue;
                }
                other => other,
            };
            let mut stopping = matches!(first, Command::Shutdown);
            let mut batch: Vec<_> = std::iter::once(first).filter(|c| matches!(c, Command::Publish(..))).collect();
            // A removal queued behind publishes runs after their batch: in the order they came.
            let mut removal = None;
            while batch.len() < MAX_BATCH && !stopping {
                match commands.try_recv() {
                    Ok(Command::Shutdown) => stopping = true,
                    Ok(Command::RemoveHistory(room, reply)) => {
                        removal = Some((room, reply));
                        break;
                    }
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.write_batch(batch);
            }
            if let Some((room, reply)) = removal {
                let _ = reply.send(self.remove_history(&room));
            }
            if stopping {
                // Whatever was queued behind the shutdown was never acknowledged: refuse it.
                return;
            }
            if self.last_age_trim.elapsed() >= AGE_TRIM_EVERY {
                self.trim_by_age();
            }
        }
    }

    fn write_batch(&mut self, batch: Vec<Command>) {
        let saved_offsets = self.last_offsets.clone();
        let mut outcomes = Vec::with_capacity(batch.len());
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            let now_ms = now_ms();
            let mut touched: Vec<String> = Vec::new();
            for new in batch.iter().filter_map(Command::message) {
                if let Some(id) = &new.id {
                    // Every statement of the write path is prepared once and kept: parsing SQL
                    // cost more than the rest of a publish did.
                    let existing = tx
                        .prepare_cached(
                            "SELECT offset, name, message, time, ts_ms FROM messages WHERE room = ?1 AND msg_id = ?2",
                        )?
                        .query_row(params![new.room, id], |row| {
                            Ok(StoredMessage {
                                room: new.room.clone(),
                                offset: row.get::<_, i64>(0)? as u64,
                                id: Some(id.clone()),
                                name: row.get(1)?,
                                message: row.get(2)?,
                                time: row.get(3)?,
                                ts_ms: row.get(4)?,
                            })
                        })
                        .optional()?;
                    if let Some(original) = existing {
                        outcomes.push(Published::Duplicate(original));
                        continue;
                    }
                }
                let offset = self.last_offsets.get(&new.room).copied().unwrap_or(0) + 1;
                tx.prepare_cached(
                    "INSERT INTO messages (room, offset, msg_id, name, message, time, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![new.room, offset as i64, new.id, new.name, new.message, new.time, now_ms])?;
                self.last_offsets.insert(new.room.clone(), offset);
                if !touched.contains(&new.room) {
                    touched.push(new.room.clone());
                }
                outcomes.push(Published::Stored(StoredMessage {
                    room: new.room.clone(),
                    offset,
                    id: new.id.clone(),
                    name: new.name.clone(),
                    message: new.message.clone(),
                    time: new.time.clone(),
                    ts_ms: now_ms,
                }));
            }
            for room in &touched {
                let last = self.last_offsets[room];
                tx.prepare_cached(
                    "INSERT INTO rooms (name, last_offset) VALUES (?1, ?2)
                     ON CONFLICT(name) DO UPDATE SET last_offset = excluded.last_offset",
                )?
                .execute(params![room, last as i64])?;
                let keep_after = last.saturating_sub(self.retention.max_messages);
                tx.prepare_cached("DELETE FROM messages WHERE room = ?1 AND offset <= ?2")?
                    .execute(params![room, keep_after as i64])?;
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                let stored: Vec<StoredMessage> = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        Published::Stored(m) => Some(m.clone()),
                        Published::Duplicate(_) => None,
                    })
                    .collect();
                if !stored.is_empty() {
                    // Offsets become visible to joins before the messages reach the hub, so a member
                    // that joins in between finds them in history and the hub skips them for it.
                    let mut tops = self.tops.lock().unwrap_or_else(|p| p.into_inner());
                    for message in &stored {
                        tops.insert(message.room.clone(), message.offset);
                    }
                    drop(tops);
                    self.sink.deliver(&stored);
                }
                for (reply, outcome) in batch.into_iter().filter_map(Command::into_reply).zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::error!(%error, "storing messages failed; publishers are told");
                self.last_offsets = saved_offsets;
                let message = error.to_string();
                for reply in batch.into_iter().filter_map(Command::into_reply) {
                    let _ = reply.send(Err(EngineError::Write(message.clone())));
                }
            }
        }
    }

    fn remove_history(&mut self, room: &str) -> Result<u64, EngineError> {
        let removed = self
            .conn
            .execute("DELETE FROM messages WHERE room = ?1", params![room])
            .map_err(|e| EngineError::Write(e.to_string()))?;
        Ok(removed as u64)
    }

    fn trim_by_age(&mut self) {
        self.last_age_trim = Instant::now();
        if self.retention.max_age.is_none() {
            return;
        }
        let cutoff = age_cutoff_ms(self.retention.max_age);
        if let Err(error) = self.conn.execute("DELETE FROM messages WHERE ts_ms < ?1", params![cutoff]) {
            tracing::warn!(%error, "trimming old history failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(name: &str, retention: Retention) -> Arc<Store> {
        let dir = std::env::temp_dir().join(format!("sb-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        struct Nowhere;
        impl Deliver for Nowhere {
            fn deliver(&self, _: &[StoredMessage]) {}
        }
        Store::open(&dir.join("h.db"), retention, Arc::new(Nowhere)).unwrap()
    }

    fn new(room: &str, id: Option<&str>, text: &str) -> NewMessage {
        NewMessage {
            room: room.into(),
            id: id.map(Into::into),
            name: "n".into(),
            message: text.into(),
            time: "00:00:00".into(),
        }
    }

    #[tokio::test]
    async fn old_messages_are_not_served_and_offsets_still_grow() {
        let store =
            open("age", Retention { max_messages: 100, max_age: Some(Duration::from_millis(300)), max_db_bytes: None });
        assert!(
            matches!(store.publish_and_wait(new("r", None, "old")).await.unwrap(), Published::Stored(m) if m.offset == 1)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let history = store.read_history("r", 0, 1, 100).unwrap();
        assert!(history.messages.is_empty(), "{history:?}");
        assert_eq!(history.first_retained, 2, "history now starts after the expired message");
        assert!(
            matches!(store.publish_and_wait(new("r", None, "fresh")).await.unwrap(), Published::Stored(m) if m.offset == 2)
        );
        assert_eq!(store.read_history("r", 0, 2, 100).unwrap().messages.len(), 1);
    }

    #[tokio::test]
    async fn a_full_database_is_an_error_the_publisher_sees_and_nothing_is_lost() {
        let store = open("full", Retention { max_messages: 1_000_000, max_age: None, max_db_bytes: Some(64 * 1024) });
        let text = "x".repeat(1000);
        let mut stored = 0u64;
        let error = loop {
            match store.publish_and_wait(new("r", None, &text)).await {
                Ok(Published::Stored(m)) => {
                    stored += 1;
                    assert_eq!(m.offset, stored, "offsets stay gap-free up to the failure");
                }
                Ok(other) => panic!("{other:?}"),
                Err(error) => break error,
            }
            assert!(stored < 1000, "64 KiB cannot hold 1000 messages of 1000 bytes");
        };
        assert!(matches!(error, EngineError::Write(ref m) if m.contains("full")), "{error}");
        assert!(stored > 0);
        // Every acknowledged message is still there; a message that fits later takes the next offset.
        assert_eq!(store.read_history("r", 0, stored, 10_000).unwrap().messages.len() as u64, stored);
        let small = store.publish_and_wait(new("r", None, "")).await;
        if let Ok(Published::Stored(m)) = small {
            assert_eq!(m.offset, stored + 1, "a failed write used no offset");
        }
    }

    #[tokio::test]
    async fn ids_are_stored_once_per_room() {
        let store = open("ids", Retention { max_messages: 100, max_age: None, max_db_bytes: None });
        let first = store.publish_and_wait(new("r", Some("x"), "one")).await.unwrap();
        let again = store.publish_and_wait(new("r", Some("x"), "one")).await.unwrap();
        let elsewhere = store.publish_and_wait(new("s", Some("x"), "one")).await.unwrap();
        assert!(matches!(first, Published::Stored(ref m) if m.offset == 1));
        assert!(matches!(again, Published::Duplicate(ref m) if m.offset == 1));
        assert!(matches!(elsewhere, Published::Stored(ref m) if m.offset == 1 && m.room == "s"));
        assert_eq!(store.read_history("r", 0, 1, 10).unwrap().messages.len(), 1);
    }

    #[tokio::test]
    async fn the_epoch_and_the_tops_outlive_a_restart_and_a_new_file_is_a_new_epoch() {
        let retention = Retention { max_messages: 100, max_age: None, max_db_bytes: None };
        let store = open("epoch", retention);
        let path = store.path().to_owned();
        store.publish_and_wait(new("r", None, "one")).await.unwrap();
        store.publish_and_wait(new("r", None, "two")).await.unwrap();
        let before = store.top("r").await.unwrap();
        assert_eq!(before.offset, 2);
        store.close();
        drop(store);
        struct Nowhere;
        impl Deliver for Nowhere {
            fn deliver(&self, _: &[StoredMessage]) {}
        }
        let reopened = Store::open(&path, retention, Arc::new(Nowhere)).unwrap();
        assert_eq!(reopened.top("r").await.unwrap(), before, "same offset, same epoch after a restart");
        let elsewhere = open("epoch-new", retention);
        assert_ne!(elsewhere.top("r").await.unwrap().epoch, before.epoch, "a new database is a new history");
    }
}
