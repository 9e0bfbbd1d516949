//! The permessage-deflate receive path: arbitrary compressed payloads, in one frame or several, under
//! every negotiated window size and takeover mode. It must never panic and never hand out a message
//! larger than the configured limit (a deflate bomb is 1009, not an allocation).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_proto::deflate::{DeflateConfig, DeflateParams};
use switchboard_proto::frame::{mask_payload, FrameHeader, OpCode, MAX_HEADER_LEN};
use switchboard_proto::{Config, Connection, Message, Role};

const MAX_MESSAGE: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let &[settings, fragments, ref body @ ..] = data else { return };
    let params = DeflateParams {
        server_no_context_takeover: settings & 0x10 != 0,
        client_no_context_takeover: settings & 0x20 != 0,
        server_max_window_bits: 8 + (settings & 0x07),
        client_max_window_bits: 8 + ((settings >> 1) & 0x07),
    };
    let config = Config { max_message_size: MAX_MESSAGE, max_frame_size: MAX_MESSAGE, ..Config::default() };
    let mut conn = Connection::new(Role::Server, config);
    conn.enable_deflate(params, &DeflateConfig::default());

    // Two messages from the same bytes, so context takeover carries state from the first.
    let pieces = usize::from(fragments % 4) + 1;
    let text = fragments & 0x80 != 0;
    for _ in 0..2 {
        let chunk = body.len().div_ceil(pieces).max(1);
        let parts: Vec<&[u8]> = if body.is_empty() { vec![&[][..]] } else { body.chunks(chunk).collect() };
        for (i, part) in parts.iter().enumerate() {
            let opcode = match (i, text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            let rsv = if i == 0 { 0b100 } else { 0 };
            let key = [settings, fragments, 0x5a, 0xa5];
            let header =
                FrameHeader { fin: i + 1 == parts.len(), rsv, opcode, mask: Some(key), payload_len: part.len() as u64 };
            let mut head = [0u8; MAX_HEADER_LEN];
            let n = header.encode(&mut head);
            let mut frame = head[..n].to_vec();
            frame.extend_from_slice(part);
            mask_payload(&mut frame[n..], key);
            conn.receive_data(&frame);
        }
        loop {
            match conn.next_message() {
                Ok(Some(Message::Text(t))) => assert!(t.len() <= MAX_MESSAGE),
                Ok(Some(Message::Binary(b))) => assert!(b.len() <= MAX_MESSAGE),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
