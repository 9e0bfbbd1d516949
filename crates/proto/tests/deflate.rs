//! permessage-deflate through the engine: a client and a server engine with the extension on, and
//! hand-built frames for what a misbehaving peer might send.

mod support;

use support::{feed, frame};
use switchboard_proto::deflate::{accept_response, client_offer, negotiate_server, DeflateConfig, DeflateParams};
use switchboard_proto::frame::{mask_payload, FrameHeader, OpCode};
use switchboard_proto::{Config, Connection, Message, ProtocolError, Role};

fn negotiated(client: &DeflateConfig, server: &DeflateConfig) -> DeflateParams {
    let offer = client_offer(client);
    let (server_params, response) = negotiate_server(&[offer], server).expect("offer accepted");
    let client_params = accept_response(&response, client).expect("response accepted");
    assert_eq!(client_params, server_params);
    server_params
}

fn pair(client: &DeflateConfig, server: &DeflateConfig, config: Config) -> (Connection, Connection) {
    let params = negotiated(client, server);
    let mut c = Connection::new(Role::Client, config.clone());
    c.enable_deflate(params, client);
    let mut s = Connection::new(Role::Server, config);
    s.enable_deflate(params, server);
    (c, s)
}

fn first_header(bytes: &[u8]) -> FrameHeader {
    FrameHeader::decode(bytes).unwrap().unwrap().0
}

#[test]
fn compressed_round_trip_both_directions_with_context_takeover() {
    let config = DeflateConfig::default();
    let (mut client, mut server) = pair(&config, &config, Config::default());
    let json = r#"{"name":"alice","message":"the same words again and again","time":"12:00:00"}"#.repeat(200);
    for round in 0..3 {
        client.send_text(&json).unwrap();
        let wire = client.take_output();
        assert_eq!(first_header(&wire).rsv, 0b100, "RSV1 set on a compressed message");
        assert!(wire.len() < json.len() / 10, "round {round}: {} bytes on the wire for {}", wire.len(), json.len());
        assert_eq!(feed(&mut server, &wire), vec![Ok(Message::text(json.clone()))]);
        server.send_binary(json.as_bytes()).unwrap();
        let wire = server.take_output();
        assert_eq!(first_header(&wire).rsv, 0b100);
        assert_eq!(feed(&mut client, &wire), vec![Ok(Message::binary(json.clone().into_bytes()))]);
    }
}

#[test]
fn every_window_and_context_combination_round_trips() {
    let messages: Vec<String> = (0..20).map(|i| format!("message {i}: {}", "abcdefgh".repeat(i * 40))).collect();
    for bits in 8..=15u8 {
        for no_context in [false, true] {
            let client = DeflateConfig {
                client_max_window_bits: bits,
                client_no_context_takeover: no_context,
                threshold: 0,
                ..DeflateConfig::default()
            };
            let server = DeflateConfig {
                server_max_window_bits: bits,
                server_no_context_takeover: no_context,
                threshold: 0,
                ..DeflateConfig::default()
            };
            let (mut c, mut s) = pair(&client, &server, Config::default());
            for m in &messages {
                c.send_text(m).unwrap();
                assert_eq!(feed(&mut s, &c.take_output()), vec![Ok(Message::text(m.as_str()))], "bits {bits}");
                s.send_text(m).unwrap();
                assert_eq!(feed(&mut c, &s.take_output()), vec![Ok(Message::text(m.as_str()))], "bits {bits}");
            }
        }
    }
}

#[test]
fn small_messages_and_control_frames_are_not_compressed() {
    let config = DeflateConfig { threshold: 100, ..DeflateConfig::default() };
    let (mut client, mut server) = pair(&config, &config, Config::default());
    client.send_text("short").unwrap();
    let wire = client.take_output();
    assert_eq!(first_header(&wire).rsv, 0);
    assert_eq!(feed(&mut server, &wire), vec![Ok(Message::text("short"))]);
    client.send(Message::Ping(vec![b'p'; 120].into())).unwrap();
    assert_eq!(first_header(&client.take_output()).rsv, 0);
}

/// Splits a compressed message (as the client engine produced it) into `parts` frames by hand.
fn fragment(wire: &[u8], parts: usize) -> Vec<u8> {
    let (header, n) = FrameHeader::decode(wire).unwrap().unwrap();
    let mut payload = wire[n..].to_vec();
    mask_payload(&mut payload, header.mask.unwrap());
    let size = payload.len().div_ceil(parts);
    let mut out = Vec::new();
    for (i, piece) in payload.chunks(size).enumerate() {
        let last = (i + 1) * size >= payload.len();
        let opcode = if i == 0 { header.opcode } else { OpCode::Continuation };
        let rsv = if i == 0 { 0b100 } else { 0 };
        out.extend(encode(opcode, last, rsv, piece));
        if i == 0 {
            out.extend(encode(OpCode::Ping, true, 0, b"between"));
        }
    }
    out
}

fn encode(opcode: OpCode, fin: bool, rsv: u8, payload: &[u8]) -> Vec<u8> {
    frame(opcode, fin, rsv, payload, Some([9, 8, 7, 6]))
}

#[test]
fn fragmented_compressed_message_with_control_frame_between() {
    let config = DeflateConfig { threshold: 0, ..DeflateConfig::default() };
    let (mut client, mut server) = pair(&config, &config, Config::default());
    let text = "fragmented and compressed ".repeat(500);
    client.send_text(&text).unwrap();
    let wire = fragment(&client.take_output(), 4);
    let got = feed(&mut server, &wire);
    assert_eq!(got.len(), 2);
    assert!(matches!(&got[0], Ok(Message::Ping(p)) if &p[..] == b"between"));
    assert_eq!(got[1], Ok(Message::text(text)));
}

#[test]
fn rsv1_rules() {
    // Without the extension: 1002.
    let mut plain = Connection::new(Role::Server, Config::default());
    assert_eq!(feed(&mut plain, &encode(OpCode::Text, true, 0b100, b"x")), vec![Err(ProtocolError::ReservedBits)]);
    let config = DeflateConfig::default();
    // On a continuation frame, or on a control frame: 1002 even with the extension.
    let (_, mut server) = pair(&config, &config, Config::default());
    let mut wire = encode(OpCode::Text, false, 0, b"a");
    wire.extend(encode(OpCode::Continuation, true, 0b100, b"b"));
    assert_eq!(feed(&mut server, &wire), vec![Err(ProtocolError::ReservedBits)]);
    let (_, mut server) = pair(&config, &config, Config::default());
    assert_eq!(feed(&mut server, &encode(OpCode::Ping, true, 0b100, b"")), vec![Err(ProtocolError::ReservedBits)]);
    // RSV2 is never allowed.
    let (_, mut server) = pair(&config, &config, Config::default());
    assert_eq!(feed(&mut server, &encode(OpCode::Text, true, 0b010, b"x")), vec![Err(ProtocolError::ReservedBits)]);
}

#[test]
fn zip_bomb_closes_1009_without_inflating_it_all() {
    let config = DeflateConfig { threshold: 0, level: 9, ..DeflateConfig::default() };
    let limits = Config { max_message_size: 1 << 20, ..Config::default() };
    let (mut client, mut server) = pair(&config, &config, Config { max_message_size: usize::MAX, ..limits.clone() });
    let mut server_limited = Connection::new(Role::Server, limits);
    server_limited.enable_deflate(server.deflate_params().unwrap(), &config);
    client.send_binary(&vec![0u8; 64 << 20]).unwrap();
    let wire = client.take_output();
    assert!(wire.len() < 200_000, "64 MiB of zeros is {} bytes compressed", wire.len());
    let got = feed(&mut server_limited, &wire);
    assert!(matches!(got[..], [Err(ProtocolError::MessageTooLarge { .. })]), "{got:?}");
    let out = server_limited.take_output();
    assert_eq!(&out[2..4], &1009u16.to_be_bytes());
    drop(server.take_output());
}

#[test]
fn corrupt_or_non_utf8_compressed_text_closes_1007() {
    let config = DeflateConfig::default();
    let (_, mut server) = pair(&config, &config, Config::default());
    assert_eq!(
        feed(&mut server, &encode(OpCode::Text, true, 0b100, &[0xff, 0xfe, 0xfd, 0xfc])),
        vec![Err(ProtocolError::InvalidCompressedData)]
    );
    assert_eq!(&server.take_output()[2..4], &1007u16.to_be_bytes());

    // Valid deflate data that inflates to invalid UTF-8, sent as text.
    let (mut client, mut server) = pair(&config, &config, Config::default());
    client.send_binary(&[b'a', 0xff, b'b'].repeat(100)).unwrap();
    let mut wire = client.take_output();
    wire[0] = (wire[0] & 0xf0) | OpCode::Text.as_u8();
    assert_eq!(feed(&mut server, &wire), vec![Err(ProtocolError::InvalidUtf8)]);
}

#[test]
fn release_idle_buffers_frees_zlib_state_only_without_context_takeover() {
    let config = DeflateConfig {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        threshold: 0,
        ..DeflateConfig::default()
    };
    let (mut client, mut server) = pair(&config, &config, Config::default());
    for i in 0..3 {
        client.send_text(&format!("hello {i} hello hello hello")).unwrap();
        let got = feed(&mut server, &client.take_output());
        assert_eq!(got, vec![Ok(Message::text(format!("hello {i} hello hello hello")))]);
        // Freed between messages, recreated on demand.
        server.release_idle_buffers();
        client.release_idle_buffers();
        assert!(!format!("{server:?}").contains("allocated: true"), "{server:?}");
    }
}
