//! What rooms, members and messages are in the chat: the rules for room and display names, member
//! ids that stay unique across nodes, the seed protocol's time stamp, and the clock sessions read.
//! The records the engine stores ([`StoredMessage`] and friends) are re-exported from it.

use std::time::{Instant, SystemTime};

pub use crate::engine::{NewMessage, Published, StoredMessage};

use super::wire::ErrorCode;

/// Longest room name, in characters.
pub const MAX_ROOM_CHARS: usize = 64;

/// A request's failure: the code and the words for the client.
pub type Refusal = (ErrorCode, String);

/// Checks a room name: 1-64 of `A-Z a-z 0-9 _ - . :`.
pub fn check_room(room: &str) -> Result<(), Refusal> {
    let valid = !room.is_empty()
        && room.chars().count() <= MAX_ROOM_CHARS
        && room.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if valid {
        Ok(())
    } else {
        Err((ErrorCode::BadRequest, format!("invalid room name {room:?}: 1-{MAX_ROOM_CHARS} of A-Z a-z 0-9 _ - . :")))
    }
}

/// Checks a display name's length.
pub fn check_name(name: &str, max_chars: usize) -> Result<(), Refusal> {
    if name.chars().count() > max_chars {
        return Err((ErrorCode::TooLong, format!("name longer than {max_chars} characters")));
    }
    Ok(())
}

/// Names this server process among the nodes of a chat: random, so member ids from two nodes (or two
/// runs of one) never collide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId(String);

impl NodeId {
    /// A fresh random node id (16 hex digits).
    pub fn random() -> Self {
        let mut bytes = [0u8; 8];
        if getrandom::fill(&mut bytes).is_err() {
            // No system randomness: the pid and the time to the nanosecond still differ between nodes.
            let nanos = SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos() as u64);
            bytes = (nanos ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
        }
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A given node id (tests; a configured cluster name).
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The node's id itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of this node's `n`th connection, as clients see it: `NODE-n`.
    pub fn member_id(&self, n: u64) -> String {
        format!("{}-{n}", self.0)
    }
}

/// Where a session reads the time: the system's clock in a server, a hand-driven one in tests.
pub trait Clock: Send + Sync {
    /// Monotonic time, for deadlines and rate limits.
    fn now(&self) -> Instant;
    /// Wall-clock time, for token expiry.
    fn wall(&self) -> SystemTime;
}

/// The system's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// `now` in the server's local time, `HH:MM:SS`, as the seed server stamped messages.
pub fn now_hms(now: SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(now).format("%H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_checked() {
        assert!(check_room("team-1.general:x_y").is_ok());
        for bad in ["", "a b", "é", &"x".repeat(65)] {
            assert_eq!(check_room(bad).unwrap_err().0, ErrorCode::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn member_ids_name_their_node() {
        let (a, b) = (NodeId::random(), NodeId::random());
        assert_ne!(a, b, "two nodes draw different ids");
        assert_eq!(NodeId::new("abc").member_id(7), "abc-7");
        assert_eq!(a.member_id(1).len(), 18);
    }
}
