//! Messages as the engine hands them out and takes them in.

use bytes::Bytes;

use crate::close::CloseFrame;
pub use crate::utf8::InvalidUtf8;

/// Bytes known to be valid UTF-8: text payloads are validated once, on arrival, and then shared
/// without copying or checking again.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Utf8Bytes(Bytes);

impl Utf8Bytes {
    /// Wraps bytes after checking them.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Self, InvalidUtf8> {
        crate::utf8::validate(&bytes)?;
        Ok(Self(bytes))
    }

    /// Wraps bytes the engine has already validated.
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        Self(bytes)
    }

    /// Text from a string constant, without copying or checking.
    pub const fn from_static(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor either validates the bytes (`try_from_bytes`, the engine's
        // incremental validator before `from_validated`) or takes them from a `str`/`String`, and the
        // inner `Bytes` is never exposed mutably. Tested by `utf8_bytes_only_from_valid_text` and the
        // engine's 1007 tests.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// The underlying bytes, owned.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for empty text.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for Utf8Bytes {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl From<&str> for Utf8Bytes {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl PartialEq<str> for Utf8Bytes {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Bytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A WebSocket message: a complete data message or a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A complete text message, UTF-8 checked.
    Text(Utf8Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping and its payload (already answered when `auto_pong` is on).
    Ping(Bytes),
    /// A pong and its payload.
    Pong(Bytes),
    /// The peer's close frame (`None` when it carried no code, reported as 1005 by RFC 6455).
    Close(Option<CloseFrame>),
}

impl Message {
    /// A text message.
    pub fn text(s: impl Into<Utf8Bytes>) -> Self {
        Self::Text(s.into())
    }

    /// A binary message.
    pub fn binary(b: impl Into<Bytes>) -> Self {
        Self::Binary(b.into())
    }

    /// True for [`Message::Text`].
    pub fn is_text(&self) -> bool {
        matches!(self, Self::Text(_))
    }

    /// True for [`Message::Binary`].
    pub fn is_binary(&self) -> bool {
        matches!(self, Self::Binary(_))
    }

    /// True for [`Message::Close`].
    pub fn is_close(&self) -> bool {
        matches!(self, Self::Close(_))
    }

    /// The payload bytes (a close frame's reason for `Close`).
    pub fn payload(&self) -> &[u8] {
        match self {
            Self::Text(t) => t.as_bytes(),
            Self::Binary(b) | Self::Ping(b) | Self::Pong(b) => b,
            Self::Close(Some(frame)) => frame.reason.as_bytes(),
            Self::Close(None) => &[],
        }
    }

    /// The text of a `Text` message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(t) => Some(t.as_str()),
            _ => None,
        }
    }

    /// The payload bytes, without a copy (a close frame's reason for `Close`).
    pub fn into_data(self) -> Bytes {
        match self {
            Self::Text(t) => t.into_bytes(),
            Self::Binary(b) | Self::Ping(b) | Self::Pong(b) => b,
            Self::Close(Some(frame)) => Bytes::from(frame.reason.into_bytes()),
            Self::Close(None) => Bytes::new(),
        }
    }

    /// The payload's length in bytes (see [`Message::payload`]).
    pub fn len(&self) -> usize {
        self.payload().len()
    }

    /// True when the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.payload().is_empty()
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Self::Text(s.into())
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Self::Text(s.into())
    }
}

impl From<Vec<u8>> for Message {
    fn from(v: Vec<u8>) -> Self {
        Self::Binary(v.into())
    }
}

impl From<&[u8]> for Message {
    fn from(b: &[u8]) -> Self {
        Self::Binary(Bytes::copy_from_slice(b))
    }
}

impl From<Bytes> for Message {
    fn from(b: Bytes) -> Self {
        Self::Binary(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_bytes_only_from_valid_text() {
        assert!(Utf8Bytes::try_from_bytes(Bytes::from_static(b"\xff")).is_err());
        let ok = Utf8Bytes::try_from_bytes(Bytes::from_static("héllo".as_bytes())).unwrap();
        assert_eq!(ok.as_str(), "héllo");
        assert_eq!(Utf8Bytes::from(String::from("x")), "x");
    }

    #[test]
    fn payloads_come_out_as_bytes() {
        assert_eq!(Message::text("héllo").into_data(), Bytes::from_static("héllo".as_bytes()));
        assert_eq!(Message::from(&b"\x00\x01"[..]).into_data(), Bytes::from_static(b"\x00\x01"));
        assert_eq!(Message::Close(Some(CloseFrame::new(1000, "bye"))).into_data(), Bytes::from_static(b"bye"));
        assert_eq!((Message::text("héllo").len(), Message::Close(None).is_empty()), (6, true));
    }
}
