//! Close codes and close frame payloads (RFC 6455 §5.5.1, §7.4).

use bytes::{BufMut, Bytes, BytesMut};

/// A close status code. Known codes have names; any other value is kept as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Normal closure: the purpose of the connection was fulfilled.
    pub const NORMAL: Self = Self(1000);
    /// The endpoint is going away (server shutdown, page navigation).
    pub const GOING_AWAY: Self = Self(1001);
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// A data type the endpoint cannot accept (text to a binary-only endpoint, say).
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// Reported when a close frame carried no code; never sent.
    pub const NO_STATUS: Self = Self(1005);
    /// Reported when the connection ended without a close frame; never sent.
    pub const ABNORMAL: Self = Self(1006);
    /// A message's data did not match its type (invalid UTF-8 in text, bad compressed data).
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// A message broke the endpoint's policy; the generic refusal.
    pub const POLICY_VIOLATION: Self = Self(1008);
    /// A message too large to process.
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    /// The client expected an extension the server did not agree to (sent by clients only).
    pub const MANDATORY_EXTENSION: Self = Self(1010);
    /// The server met an unexpected condition.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// The server is restarting; reconnect later.
    pub const SERVICE_RESTART: Self = Self(1012);
    /// The server is overloaded; try again later.
    pub const TRY_AGAIN_LATER: Self = Self(1013);
    /// A gateway or proxy got an invalid answer from upstream.
    pub const BAD_GATEWAY: Self = Self(1014);
    /// TLS handshake failure; never sent.
    pub const TLS_HANDSHAKE: Self = Self(1015);

    /// Whether this code may appear in a close frame on the wire.
    ///
    /// 1000-1003 and 1007-1014 are defined (1012-1014 by IANA after the RFC); 3000-4999 belong to
    /// libraries and applications. 1004-1006, 1015 and everything else unassigned are refused.
    pub fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        Self(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.0
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A close frame's content: a code and a UTF-8 reason of at most 123 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code.
    pub code: CloseCode,
    /// Why, for humans; at most 123 bytes on the wire (longer reasons are cut).
    pub reason: String,
}

impl CloseFrame {
    /// A close frame with this code and reason.
    pub fn new(code: impl Into<CloseCode>, reason: impl Into<String>) -> Self {
        Self { code: code.into(), reason: reason.into() }
    }

    /// Encodes the payload, cutting the reason on a character boundary to fit a control frame.
    pub(crate) fn encode(&self) -> Bytes {
        let reason = truncate_utf8(&self.reason, 123);
        let mut out = BytesMut::with_capacity(2 + reason.len());
        out.put_u16(self.code.0);
        out.put_slice(reason.as_bytes());
        out.freeze()
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why a received close payload is refused, and the code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClosePayloadError {
    /// One byte, or a code that may not be sent: 1002.
    Malformed,
    /// The reason is not UTF-8: 1007.
    InvalidReason,
}

/// Parses a received close payload; `Ok(None)` is a close without a code (reported as 1005).
pub(crate) fn parse_close_payload(payload: &[u8]) -> Result<Option<CloseFrame>, ClosePayloadError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ClosePayloadError::Malformed),
        _ => {
            let code = CloseCode(u16::from_be_bytes([payload[0], payload[1]]));
            if !code.is_sendable() {
                return Err(ClosePayloadError::Malformed);
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| ClosePayloadError::InvalidReason)?;
            Ok(Some(CloseFrame { code, reason: reason.to_owned() }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendable_codes() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999] {
            assert!(CloseCode(ok).is_sendable(), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert!(!CloseCode(bad).is_sendable(), "{bad}");
        }
    }

    #[test]
    fn parse_payloads() {
        assert_eq!(parse_close_payload(&[]), Ok(None));
        assert_eq!(parse_close_payload(&[3]), Err(ClosePayloadError::Malformed));
        assert_eq!(parse_close_payload(&[0x03, 0xed]), Err(ClosePayloadError::Malformed)); // 1005
        assert_eq!(parse_close_payload(&[0x03, 0xe8, 0xff]), Err(ClosePayloadError::InvalidReason));
        assert_eq!(parse_close_payload(b"\x03\xe8bye"), Ok(Some(CloseFrame::new(1000, "bye"))));
    }

    #[test]
    fn long_reason_is_cut_on_char_boundary() {
        let frame = CloseFrame::new(1000, "é".repeat(100));
        let bytes = frame.encode();
        assert!(bytes.len() <= 125);
        assert!(std::str::from_utf8(&bytes[2..]).is_ok());
    }
}
