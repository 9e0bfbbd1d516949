//! Helpers shared by the engine's integration tests.

#![allow(dead_code)] // each test file uses part of this

use switchboard_proto::frame::{mask_payload, FrameHeader, OpCode, MAX_HEADER_LEN};
use switchboard_proto::{Connection, Message, ProtocolError};

/// Encodes one frame by hand, masked with `mask` when given (as a client sends it).
pub fn frame(opcode: OpCode, fin: bool, rsv: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let header = FrameHeader { fin, rsv, opcode, mask, payload_len: payload.len() as u64 };
    let mut head = [0u8; MAX_HEADER_LEN];
    let n = header.encode(&mut head);
    let mut out = head[..n].to_vec();
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        mask_payload(&mut out[start..], key);
    }
    out
}

/// Feeds bytes and drains messages until the engine wants more input or fails.
pub fn feed(conn: &mut Connection, bytes: &[u8]) -> Vec<Result<Message, ProtocolError>> {
    conn.receive_data(bytes);
    let mut out = Vec::new();
    loop {
        match conn.next_message() {
            Ok(Some(m)) => out.push(Ok(m)),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}
