//! The connection state machine end to end: frames built byte by byte (or by a client engine) go into a
//! server engine, and the messages, close codes and output bytes are checked.

mod support;

use bytes::Bytes;
use proptest::prelude::*;
use support::{feed, frame};
use switchboard_proto::frame::{mask_payload, FrameHeader, OpCode};
use switchboard_proto::{
    CloseCode, CloseFrame, CloseState, Config, Connection, Message, ProtocolError, Role, SendError,
};

const KEY: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);

fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    frame(opcode, fin, 0, payload, KEY)
}

fn server() -> Connection {
    Connection::new(Role::Server, Config::default())
}

/// Decodes the frames an engine queued (server output is unmasked) into (opcode, payload).
fn decode_output(bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (h, n) = FrameHeader::decode(rest).unwrap().unwrap();
        let len = h.payload_len as usize;
        let mut payload = rest[n..n + len].to_vec();
        if let Some(key) = h.mask {
            mask_payload(&mut payload, key);
        }
        frames.push((h.opcode, payload));
        rest = &rest[n + len..];
    }
    frames
}

fn close_code_sent(conn: &mut Connection) -> u16 {
    let frames = decode_output(&conn.take_output());
    let (op, payload) = frames.last().expect("a frame was sent");
    assert_eq!(*op, OpCode::Close);
    u16::from_be_bytes([payload[0], payload[1]])
}

#[test]
fn client_and_server_engines_talk() {
    let mut client = Connection::new(Role::Client, Config::default());
    let mut server = server();
    client.send(Message::text("hello")).unwrap();
    client.send_binary(&[1, 2, 3]).unwrap();
    let wire = client.take_output();
    // Client frames are masked: the text does not appear in clear.
    assert!(!wire.windows(5).any(|w| w == b"hello"));
    let got = feed(&mut server, &wire);
    assert_eq!(got, vec![Ok(Message::text("hello")), Ok(Message::binary(vec![1u8, 2, 3]))]);
    server.send(Message::text("world")).unwrap();
    let got = feed(&mut client, &server.take_output());
    assert_eq!(got, vec![Ok(Message::text("world"))]);
}

#[test]
fn fragmented_message_with_ping_in_between() {
    let mut s = server();
    let mut wire = client_frame(OpCode::Text, false, b"Hel");
    wire.extend(client_frame(OpCode::Ping, true, b"p"));
    wire.extend(client_frame(OpCode::Continuation, false, b"lo, "));
    wire.extend(client_frame(OpCode::Continuation, true, "wörld".as_bytes()));
    let got = feed(&mut s, &wire);
    assert_eq!(got, vec![Ok(Message::Ping(Bytes::from_static(b"p"))), Ok(Message::text("Hello, wörld"))]);
    assert_eq!(decode_output(&s.take_output()), vec![(OpCode::Pong, b"p".to_vec())]);
}

#[test]
fn server_refuses_unmasked_and_client_refuses_masked() {
    let mut s = server();
    let got = feed(&mut s, &frame(OpCode::Text, true, 0, b"hi", None));
    assert_eq!(got, vec![Err(ProtocolError::UnmaskedFrame)]);
    assert_eq!(close_code_sent(&mut s), 1002);

    let mut c = Connection::new(Role::Client, Config::default());
    let got = feed(&mut c, &frame(OpCode::Text, true, 0, b"hi", KEY));
    assert_eq!(got, vec![Err(ProtocolError::MaskedFrame)]);
    let out = c.take_output();
    let (h, _) = FrameHeader::decode(&out).unwrap().unwrap();
    assert_eq!(h.opcode, OpCode::Close);
    assert!(h.mask.is_some(), "client close frames are masked");
}

#[test]
fn protocol_violations_close_1002() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (frame(OpCode::Text, true, 0b100, b"x", KEY), "rsv1"),
        (frame(OpCode::Binary, true, 0b001, b"x", KEY), "rsv3"),
        (vec![0x83, 0x80, 1, 2, 3, 4], "reserved opcode 3"),
        (vec![0x8f, 0x80, 1, 2, 3, 4], "reserved opcode 0xf"),
        (client_frame(OpCode::Continuation, true, b"x"), "continuation without start"),
        ([client_frame(OpCode::Text, false, b"a"), client_frame(OpCode::Text, true, b"b")].concat(), "text in text"),
        (frame(OpCode::Ping, false, 0, b"", KEY), "fragmented ping"),
        (client_frame(OpCode::Close, true, &[0x03]), "one-byte close"),
        (client_frame(OpCode::Close, true, &1005u16.to_be_bytes()), "close 1005 on the wire"),
        (client_frame(OpCode::Close, true, &999u16.to_be_bytes()), "close 999"),
        (client_frame(OpCode::Close, true, &5000u16.to_be_bytes()), "close 5000"),
    ];
    for (wire, what) in cases {
        let mut s = server();
        let got = feed(&mut s, &wire);
        assert!(matches!(got.last(), Some(Err(_))), "{what}: {got:?}");
        assert_eq!(close_code_sent(&mut s), 1002, "{what}");
        assert_eq!(s.close_state(), CloseState::Closed, "{what}");
        assert!(s.should_close_transport(), "{what}");
    }
    // A ping payload over 125 bytes cannot even be encoded in a 7-bit length.
    let mut s = server();
    let got = feed(&mut s, &[0x89, 0xfe, 0x00, 0x7e, 1, 2, 3, 4]);
    assert!(matches!(got[..], [Err(ProtocolError::Header(_))]));
}

#[test]
fn invalid_utf8_fails_fast_mid_frame() {
    let mut s = server();
    // A 1000-byte text frame whose third byte is invalid: only the first 10 bytes arrive.
    let mut payload = vec![b'a'; 1000];
    payload[2] = 0xff;
    let wire = client_frame(OpCode::Text, true, &payload);
    // Header (2 + 2 + 4 mask bytes), then "aa": still valid, the engine waits.
    assert!(feed(&mut s, &wire[..10]).is_empty());
    // The invalid byte arrives with 989 payload bytes still missing: failure now.
    assert_eq!(feed(&mut s, &wire[10..11]), vec![Err(ProtocolError::InvalidUtf8)]);
    assert_eq!(close_code_sent(&mut s), 1007);
    // The rest of the frame is ignored.
    assert!(feed(&mut s, &wire[11..]).is_empty());
}

#[test]
fn invalid_utf8_in_a_later_fragment_and_truncated_at_end() {
    let mut s = server();
    let mut wire = client_frame(OpCode::Text, false, "κό".as_bytes());
    wire.extend(client_frame(OpCode::Continuation, true, &[0xce])); // message ends inside a code point
    assert_eq!(feed(&mut s, &wire), vec![Err(ProtocolError::InvalidUtf8)]);
    assert_eq!(close_code_sent(&mut s), 1007);

    let mut s = server();
    let got = feed(&mut s, &client_frame(OpCode::Close, true, b"\x03\xe8\xff\xfe"));
    assert_eq!(got, vec![Err(ProtocolError::InvalidCloseReason)]);
    assert_eq!(close_code_sent(&mut s), 1007);
}

#[test]
fn size_limits_are_checked_at_the_header() {
    let config = Config { max_frame_size: 100, max_message_size: 150, ..Config::default() };
    let mut s = Connection::new(Role::Server, config.clone());
    // Only the header of a 1 MiB frame arrives: refused before any payload.
    let wire = client_frame(OpCode::Binary, true, &vec![0u8; 1 << 20]);
    let got = feed(&mut s, &wire[..14]);
    assert!(matches!(got[..], [Err(ProtocolError::FrameTooLarge { size: 1048576, limit: 100 })]), "{got:?}");
    assert_eq!(close_code_sent(&mut s), 1009);

    let mut s = Connection::new(Role::Server, config);
    let mut wire = client_frame(OpCode::Binary, false, &[0u8; 100]);
    wire.extend(client_frame(OpCode::Continuation, true, &[0u8; 51]));
    let got = feed(&mut s, &wire);
    assert!(matches!(got[..], [Err(ProtocolError::MessageTooLarge { size: 151, limit: 150 })]), "{got:?}");
    assert_eq!(close_code_sent(&mut s), 1009);
}

#[test]
fn close_handshake_initiated_by_client() {
    let mut client = Connection::new(Role::Client, Config::default());
    let mut server = server();
    client.close(Some(CloseFrame::new(1000, "bye"))).unwrap();
    assert_eq!(client.close_state(), CloseState::CloseSent);
    assert_eq!(client.send_text("late"), Err(SendError::Closed));

    let got = feed(&mut server, &client.take_output());
    assert_eq!(got, vec![Ok(Message::Close(Some(CloseFrame::new(1000, "bye"))))]);
    assert_eq!(server.close_state(), CloseState::Closed);
    let echo = server.take_output();
    assert_eq!(decode_output(&echo), vec![(OpCode::Close, 1000u16.to_be_bytes().to_vec())]);
    assert!(server.should_close_transport(), "the server closes TCP first");

    let got = feed(&mut client, &echo);
    assert_eq!(got, vec![Ok(Message::Close(Some(CloseFrame::new(1000, ""))))]);
    assert_eq!(client.close_state(), CloseState::Closed);
    assert!(!client.should_close_transport(), "the client waits for the server to close TCP");
}

#[test]
fn empty_close_is_answered_empty_and_reported_without_code() {
    let mut s = server();
    assert_eq!(feed(&mut s, &client_frame(OpCode::Close, true, b"")), vec![Ok(Message::Close(None))]);
    assert_eq!(decode_output(&s.take_output()), vec![(OpCode::Close, vec![])]);
}

#[test]
fn nothing_after_the_peers_close_is_processed() {
    let mut s = server();
    let mut wire = client_frame(OpCode::Close, true, &1000u16.to_be_bytes());
    wire.extend(client_frame(OpCode::Text, true, b"after"));
    let got = feed(&mut s, &wire);
    assert_eq!(got.len(), 1);
    assert!(feed(&mut s, &client_frame(OpCode::Ping, true, b"")).is_empty());
}

#[test]
fn no_pong_after_close_sent_and_sends_refused() {
    let mut s = server();
    s.close(Some(CloseFrame::new(1001, "going away"))).unwrap();
    s.take_output();
    let got = feed(&mut s, &client_frame(OpCode::Ping, true, b"x"));
    assert_eq!(got, vec![Ok(Message::Ping(Bytes::from_static(b"x")))]);
    assert_eq!(s.pending_output(), 0);
    assert_eq!(s.send(Message::Ping(Bytes::new())), Err(SendError::Closed));
    assert_eq!(s.close(None), Err(SendError::Closed));
}

#[test]
fn pending_replies_counts_the_engines_own_frames_and_not_the_callers() {
    let mut s = server();
    s.send(Message::binary(vec![7u8; 1000])).unwrap();
    assert_eq!((s.pending_output(), s.pending_replies()), (1004, 0), "a message of ours is not a reply");
    feed(&mut s, &client_frame(OpCode::Ping, true, b"abc"));
    assert_eq!((s.pending_output(), s.pending_replies()), (1009, 5), "the pong is");
    s.send_text("after").unwrap();
    assert_eq!(s.pending_replies(), 5);
    // Counted until the last reply is written, though the caller's output goes on after it.
    s.consume_output(1008);
    assert_eq!(s.pending_replies(), 5);
    s.consume_output(1);
    assert_eq!((s.pending_output(), s.pending_replies()), (7, 0), "what is left is ours");
    s.consume_output(7);
    assert_eq!((s.pending_output(), s.pending_replies()), (0, 0));
    feed(&mut s, &client_frame(OpCode::Close, true, &1000u16.to_be_bytes()));
    assert_eq!(s.pending_replies(), 4, "the close reply");
    s.take_output();
    assert_eq!((s.pending_output(), s.pending_replies()), (0, 0));
}

#[test]
fn send_errors() {
    let mut s = server();
    assert_eq!(s.send(Message::Ping(vec![0u8; 126].into())), Err(SendError::ControlTooLong(126)));
    assert_eq!(s.close(Some(CloseFrame::new(1006, ""))), Err(SendError::InvalidCloseCode(1006)));
    assert_eq!(s.send_fragment(OpCode::Continuation, b"x", true), Err(SendError::NoFragmentInProgress));
    s.send_fragment(OpCode::Text, b"a", false).unwrap();
    assert_eq!(s.send_text("b"), Err(SendError::FragmentInProgress));
    s.send_fragment(OpCode::Ping, b"", true).unwrap();
    s.send_fragment(OpCode::Continuation, b"b", true).unwrap();
    let frames = decode_output(&s.take_output());
    let ops: Vec<OpCode> = frames.iter().map(|f| f.0).collect();
    assert_eq!(ops, vec![OpCode::Text, OpCode::Ping, OpCode::Continuation]);
}

#[test]
fn large_server_payloads_are_not_copied() {
    let mut s = server();
    let big = Bytes::from(vec![7u8; 100_000]);
    s.send(Message::Binary(big.clone())).unwrap();
    s.send_text("small").unwrap();
    let mut slices = [std::io::IoSlice::new(&[]); 8];
    let n = s.output_slices(&mut slices);
    assert_eq!(n, 3, "header, shared payload, small frame");
    assert_eq!(slices[1].as_ptr(), big.as_ptr(), "payload is the caller's buffer");
    // 100,000 needs the 64-bit length: a 10-byte header.
    assert_eq!(s.pending_output(), 10 + 100_000 + 7);
    s.consume_output(50_000);
    assert_eq!(s.pending_output(), 10 + 50_000 + 7);
    let rest = s.take_output();
    assert_eq!(rest.len(), 10 + 50_000 + 7);
    assert_eq!(&rest[rest.len() - 7..], b"\x81\x05small");
    assert!(s.output_front().is_empty());
}

#[test]
fn server_frames_of_every_header_size_are_encoded_as_the_general_encoder_does() {
    // The send path writes short server headers itself: 2 bytes below 126, 4 up to 65,535.
    // Copied, not sent by reference: the one path under test.
    let config = Config { zero_copy_threshold: usize::MAX, ..Config::default() };
    for len in [0, 1, 125, 126, 127, 1000, 65_534, 65_535, 65_536, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        for (message, opcode) in
            [(Message::binary(payload.clone()), OpCode::Binary), (Message::text("é".repeat(len / 2)), OpCode::Text)]
        {
            let body = match &message {
                Message::Binary(bytes) => bytes.to_vec(),
                Message::Text(text) => text.as_bytes().to_vec(),
                _ => unreachable!(),
            };
            let mut s = Connection::new(Role::Server, config.clone());
            s.send(message).unwrap();
            let header = FrameHeader { fin: true, rsv: 0, opcode, mask: None, payload_len: body.len() as u64 };
            let mut expected = [0u8; switchboard_proto::frame::MAX_HEADER_LEN];
            let n = header.encode(&mut expected);
            let mut want = expected[..n].to_vec();
            want.extend_from_slice(&body);
            assert_eq!(s.take_output(), want, "{opcode:?} of {} bytes", body.len());
        }
    }
}

#[test]
fn release_idle_buffers_keeps_state() {
    let mut s = server();
    feed(&mut s, &client_frame(OpCode::Text, true, &[b'x'; 5000]));
    s.release_idle_buffers();
    assert_eq!(s.receive_buffer().capacity(), 0);
    assert_eq!(feed(&mut s, &client_frame(OpCode::Text, true, b"again")), vec![Ok(Message::text("again"))]);
}

/// A conversation of varied frames (fragments, controls, large lengths) as a client sends it.
fn conversation() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        "\\PC{0,20}".prop_map(|s| client_frame(OpCode::Text, true, s.as_bytes())),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| client_frame(OpCode::Binary, true, &b)),
        proptest::collection::vec(any::<u8>(), 0..125).prop_map(|b| client_frame(OpCode::Ping, true, &b)),
        ("\\PC{1,10}", "\\PC{1,10}").prop_map(|(a, b)| {
            let mut f = client_frame(OpCode::Text, false, a.as_bytes());
            f.extend(client_frame(OpCode::Pong, true, b"x"));
            f.extend(client_frame(OpCode::Continuation, true, b.as_bytes()));
            f
        }),
        Just(client_frame(OpCode::Binary, true, &[9u8; 70_000])),
    ];
    (proptest::collection::vec(piece, 0..8), any::<bool>()).prop_map(|(pieces, close)| {
        let mut all = pieces.concat();
        if close {
            all.extend(client_frame(OpCode::Close, true, b"\x03\xe8done"));
        }
        all
    })
}

/// Runs `bytes` through a fresh engine in the given chunks; returns every message and the output.
fn run_split(role: Role, bytes: &[u8], cuts: &[usize]) -> Run {
    run_split_limited(role, bytes, cuts, 100_000, 100_000)
}

type Run = (Vec<Result<Message, ProtocolError>>, Vec<u8>, CloseState);

fn run_split_limited(role: Role, bytes: &[u8], cuts: &[usize], max_frame_size: usize, max_message_size: usize) -> Run {
    // A fixed mask key so that a client engine's output is comparable between runs.
    let config = Config { max_frame_size, max_message_size, fixed_mask_key: Some([1, 2, 3, 4]), ..Config::default() };
    let mut conn = Connection::new(role, config);
    let mut events = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let cut = cut.clamp(start, bytes.len());
        events.extend(feed(&mut conn, &bytes[start..cut]));
        start = cut;
    }
    let state = conn.close_state();
    (events, conn.take_output(), state)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_split_gives_the_same_events(bytes in conversation(),
                                       cuts in proptest::collection::vec(0usize..80_000, 0..12)) {
        let mut cuts = cuts;
        cuts.sort();
        let whole = run_split(Role::Server, &bytes, &[]);
        prop_assert!(whole.0.iter().all(|e| e.is_ok()), "valid conversation: {:?}", whole.0);
        let split = run_split(Role::Server, &bytes, &cuts);
        prop_assert_eq!(&whole, &split);
        let byte_by_byte: Vec<usize> = (0..bytes.len().min(3000)).collect();
        prop_assert_eq!(whole, run_split(Role::Server, &bytes, &byte_by_byte));
    }

    #[test]
    fn random_bytes_never_panic_and_split_consistently(bytes in proptest::collection::vec(any::<u8>(), 0..2000),
                                                        cuts in proptest::collection::vec(0usize..2000, 0..10),
                                                        client: bool) {
        let role = if client { Role::Client } else { Role::Server };
        let mut cuts = cuts;
        cuts.sort();
        prop_assert_eq!(run_split(role, &bytes, &[]), run_split(role, &bytes, &cuts));
    }

    #[test]
    fn mutated_conversations_never_panic(bytes in conversation(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                         cuts in proptest::collection::vec(0usize..80_000, 0..6)) {
        let mut bytes = bytes;
        if !bytes.is_empty() {
            for (index, value) in flips {
                let i = index.index(bytes.len());
                bytes[i] ^= value;
            }
        }
        let mut cuts = cuts;
        cuts.sort();
        let whole = run_split(Role::Server, &bytes, &[]);
        // Whatever happened, a failure always queued a close frame with a sendable code.
        if let Some(Err(e)) = whole.0.last() {
            prop_assert!(e.close_code().is_sendable());
            prop_assert_eq!(whole.2, CloseState::Closed);
        }
        prop_assert_eq!(&whole, &run_split(Role::Server, &bytes, &cuts));
        // Byte by byte, no frame is ever whole in the buffer, so none takes the engine's one-pass way.
        let byte_by_byte: Vec<usize> = (0..bytes.len().min(3000)).collect();
        if bytes.len() <= 3000 {
            prop_assert_eq!(whole, run_split(Role::Server, &bytes, &byte_by_byte));
        }
    }
}

/// Frames at the edges of the one-pass parser for whole frames give the same events and output as
/// the same bytes fed one at a time, which always takes the general parser.
#[test]
fn whole_and_byte_by_byte_frames_agree_at_the_edges() {
    let mut non_minimal_length = vec![0x81, 0x80 | 126, 0, 3, 0, 0, 0, 0];
    non_minimal_length.extend_from_slice(b"abc");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("short text", client_frame(OpCode::Text, true, b"hello")),
        ("empty binary", client_frame(OpCode::Binary, true, b"")),
        ("16-bit length", client_frame(OpCode::Binary, true, &[7; 65_535])),
        ("64-bit length", client_frame(OpCode::Binary, true, &[7; 65_536])),
        ("non-minimal length", non_minimal_length),
        ("invalid UTF-8", client_frame(OpCode::Text, true, b"ok \xff")),
        ("truncated UTF-8", client_frame(OpCode::Text, true, "é".as_bytes().split_at(1).0)),
        ("over the frame limit", client_frame(OpCode::Binary, true, &[1; 1001])),
        ("over the message limit", client_frame(OpCode::Text, true, &[b'a'; 501])),
        ("at both limits", client_frame(OpCode::Text, true, &[b'a'; 500])),
        ("unmasked", vec![0x81, 2, b'h', b'i']),
        ("reserved bit", {
            let mut f = client_frame(OpCode::Text, true, b"hi");
            f[0] |= 0x40;
            f
        }),
        ("not final", client_frame(OpCode::Text, false, b"hi")),
        ("after a close", [client_frame(OpCode::Close, true, b""), client_frame(OpCode::Text, true, b"late")].concat()),
    ];
    for (name, bytes) in cases {
        for (max_frame_size, max_message_size) in [(1000, 500), (500, 1000), (100_000, 100_000)] {
            let run = |cuts: &[usize]| run_split_limited(Role::Server, &bytes, cuts, max_frame_size, max_message_size);
            let byte_by_byte: Vec<usize> = (0..bytes.len()).collect();
            assert_eq!(run(&[]), run(&byte_by_byte), "{name} with limits {max_frame_size}/{max_message_size}");
        }
    }
}

#[test]
fn close_codes_for_errors_are_sendable() {
    for code in [CloseCode::PROTOCOL_ERROR, CloseCode::INVALID_PAYLOAD, CloseCode::MESSAGE_TOO_BIG] {
        assert!(code.is_sendable());
    }
}
