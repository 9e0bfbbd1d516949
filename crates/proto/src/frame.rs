//! Frame headers (RFC 6455 §5.2): opcodes, FIN/RSV bits, 7/16/64-bit lengths and the masking key.
//!
//! Decoding checks only what the header alone can tell (reserved opcodes, non-minimal lengths are
//! accepted as the RFC allows, control frame rules, the 64-bit length's top bit). Rules that depend on
//! connection state (masking direction, RSV without an extension, fragmentation order) are the
//! connection's.

/// A frame opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// Continues a fragmented message.
    Continuation,
    /// The first frame of a text message.
    Text,
    /// The first frame of a binary message.
    Binary,
    /// Starts or answers the close handshake.
    Close,
    /// Asks the peer for a pong.
    Ping,
    /// Answers a ping, or an unsolicited heartbeat.
    Pong,
}

impl OpCode {
    /// The opcode of a header's low four bits; `None` for the reserved ones.
    pub fn from_u8(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xa => Self::Pong,
            _ => return None,
        })
    }

    /// The four-bit value on the wire.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xa,
        }
    }

    /// Close, ping and pong: at most 125 bytes and never fragmented.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// The largest payload a control frame may carry.
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// The largest header: 2 bytes, 8 bytes of length, 4 bytes of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The last frame of its message.
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits (RSV1 = 0b100).
    pub rsv: u8,
    /// What the frame carries.
    pub opcode: OpCode,
    /// The masking key; clients must mask every frame, servers none.
    pub mask: Option<[u8; 4]>,
    /// The payload length in bytes.
    pub payload_len: u64,
}

/// Why a header cannot be accepted; each maps to close code 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Opcodes 0x3-0x7 and 0xb-0xf are reserved.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame without FIN.
    #[error("control frame is fragmented")]
    FragmentedControl,
    /// A control frame announcing more than 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(u64),
    /// A 64-bit length with its top bit set.
    #[error("64-bit payload length has its most significant bit set")]
    LengthOverflow,
}

impl FrameHeader {
    /// Decodes a header from the front of `buf`: `Ok(None)` when more bytes are needed, otherwise the
    /// header and its length in bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, HeaderError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        let rsv = (b0 >> 4) & 0x7;
        let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(HeaderError::ReservedOpcode(b0 & 0x0f))?;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7f;
        if opcode.is_control() {
            if !fin {
                return Err(HeaderError::FragmentedControl);
            }
            if len7 as usize > MAX_CONTROL_PAYLOAD {
                // 126 and 127 announce extended lengths, which control frames may not have.
                return Err(HeaderError::ControlTooLong(len7 as u64));
            }
        }
        let (payload_len, mut pos) = match len7 {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(HeaderError::LengthOverflow);
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        let mask = if masked {
            if buf.len() < pos + 4 {
                return Ok(None);
            }
            let key = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
            pos += 4;
            Some(key)
        } else {
            None
        };
        Ok(Some((FrameHeader { fin, rsv, opcode, mask, payload_len }, pos)))
    }

    /// Encodes the header with the minimal length encoding; returns the bytes written into `out`.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        out[0] = (self.fin as u8) << 7 | (self.rsv & 0x7) << 4 | self.opcode.as_u8();
        let mask_bit = (self.mask.is_some() as u8) << 7;
        let mut pos = if self.payload_len < 126 {
            out[1] = mask_bit | self.payload_len as u8;
            2
        } else if self.payload_len <= u16::MAX as u64 {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(self.payload_len as u16).to_be_bytes());
            4
        } else {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&self.payload_len.to_be_bytes());
            10
        };
        if let Some(key) = self.mask {
            out[pos..pos + 4].copy_from_slice(&key);
            pos += 4;
        }
        pos
    }
}

/// Masks a whole payload with `key` (RFC 6455 §5.3), as a client does before sending it, or unmasks
/// one: the XOR is its own inverse. For a tool that writes frames itself, after
/// [`FrameHeader::encode`] with `mask: Some(key)`; a [`Connection`](crate::Connection) masks and
/// unmasks its own frames.
pub fn mask_payload(payload: &mut [u8], key: [u8; 4]) {
    crate::mask::apply_mask(payload, key, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_examples_decode() {
        // §5.7: unmasked "Hello", masked "Hello", 256-byte and 64 KiB binary lengths.
        let (h, n) = FrameHeader::decode(&[0x81, 0x05]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.mask, h.payload_len, n), (true, OpCode::Text, None, 5, 2));
        let (h, n) = FrameHeader::decode(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d]).unwrap().unwrap();
        assert_eq!((h.mask, h.payload_len, n), (Some([0x37, 0xfa, 0x21, 0x3d]), 5, 6));
        let (h, n) = FrameHeader::decode(&[0x82, 0x7e, 0x01, 0x00]).unwrap().unwrap();
        assert_eq!((h.opcode, h.payload_len, n), (OpCode::Binary, 256, 4));
        let (h, n) = FrameHeader::decode(&[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]).unwrap().unwrap();
        assert_eq!((h.payload_len, n), (65536, 10));
        // Fragments: "Hel" then "lo".
        let (h, _) = FrameHeader::decode(&[0x01, 0x03]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode), (false, OpCode::Text));
        let (h, _) = FrameHeader::decode(&[0x80, 0x02]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode), (true, OpCode::Continuation));
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        for bytes in [&[][..], &[0x82], &[0x82, 0x7e, 0x01], &[0x82, 0x7f, 0, 0, 0], &[0x81, 0x85, 1, 2, 3]] {
            assert_eq!(FrameHeader::decode(bytes), Ok(None), "{bytes:?}");
        }
    }

    #[test]
    fn header_errors() {
        assert_eq!(FrameHeader::decode(&[0x83, 0x00]), Err(HeaderError::ReservedOpcode(3)));
        assert_eq!(FrameHeader::decode(&[0x8b, 0x00]), Err(HeaderError::ReservedOpcode(0xb)));
        assert_eq!(FrameHeader::decode(&[0x09, 0x00]), Err(HeaderError::FragmentedControl));
        assert_eq!(FrameHeader::decode(&[0x89, 0x7e, 0, 126]), Err(HeaderError::ControlTooLong(126)));
        assert_eq!(FrameHeader::decode(&[0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0]), Err(HeaderError::LengthOverflow));
    }

    #[test]
    fn minimal_length_encoding() {
        let mut out = [0u8; MAX_HEADER_LEN];
        for (len, header_len) in [(0u64, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (1 << 40, 10)] {
            let h = FrameHeader { fin: true, rsv: 0, opcode: OpCode::Binary, mask: None, payload_len: len };
            assert_eq!(h.encode(&mut out), header_len, "len {len}");
        }
    }

    #[test]
    fn mask_payload_masks_and_unmasks() {
        // RFC 6455 §5.7: a masked "Hello" with key 37 fa 21 3d.
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut payload = *b"Hello";
        mask_payload(&mut payload, key);
        assert_eq!(payload, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        mask_payload(&mut payload, key);
        assert_eq!(&payload, b"Hello");
        // Longer than the word-at-a-time loop's stride, with a tail.
        let mut long: Vec<u8> = (0..77).collect();
        mask_payload(&mut long, key);
        assert!(long.iter().enumerate().all(|(i, &b)| b == i as u8 ^ key[i % 4]));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(fin: bool, rsv in 0u8..8, op in 0usize..6, masked: bool, key: [u8; 4],
                                    len in prop_oneof![0u64..200, 60000u64..70000, (1u64 << 32)..(1u64 << 33)]) {
            let ops = [OpCode::Continuation, OpCode::Text, OpCode::Binary, OpCode::Close, OpCode::Ping, OpCode::Pong];
            let opcode = ops[op];
            let (fin, len) = if opcode.is_control() { (true, len % 126) } else { (fin, len) };
            let h = FrameHeader { fin, rsv, opcode, mask: masked.then_some(key), payload_len: len };
            let mut out = [0u8; MAX_HEADER_LEN];
            let n = h.encode(&mut out);
            prop_assert_eq!(FrameHeader::decode(&out[..n]), Ok(Some((h, n))));
            for cut in 0..n {
                prop_assert_eq!(FrameHeader::decode(&out[..cut]), Ok(None));
            }
        }
    }
}
