//! Every limit of `switchboard serve`, each hit by a test: connections in total and per address, the
//! handshake timeout, message size, message rate, rooms per connection, presence size, and the
//! outgoing queue of a client that stops reading.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use support::chat::{next_close, next_of, send, v1_client};
use support::start_serve;
use switchboard_ws::Message;

/// The HTTP status a fresh connection gets for a plain page request.
fn status_from(addr: &str, source: &str) -> std::io::Result<(u16, TcpStream)> {
    let mut stream = connect_from(source, addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    Ok((std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap(), stream))
}

/// Connects from a chosen loopback source address (127.0.0.x), so one machine can be several clients.
fn connect_from(source: &str, addr: &str) -> std::io::Result<TcpStream> {
    let target: SocketAddr = addr.parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stream = runtime.block_on(socket.connect(target))?;
    stream.into_std().and_then(|s| {
        s.set_nonblocking(false)?;
        Ok(s)
    })
}

/// Waits until the server counts exactly `open` connections (the asking one included).
fn wait_for_open_connections(addr: &str, open: usize) {
    let started = Instant::now();
    let patience = Duration::from_secs(20);
    loop {
        let mut stream = connect_from("127.0.0.99", addr).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        if response.contains(&format!("switchboard_connections {open}\n")) {
            return;
        }
        assert!(started.elapsed() < patience, "never {open} open connections:\n{response}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_are_limited_in_total_and_per_address() {
    let (server, _) = start_serve(&["--max-connections", "4", "--max-connections-per-ip", "2"]);
    let addr = &server.addr;
    wait_for_open_connections(addr, 1);
    let (first, a1) = status_from(addr, "127.0.0.10").unwrap();
    let (second, _a2) = status_from(addr, "127.0.0.10").unwrap();
    assert_eq!((first, second), (200, 200));
    assert_eq!(status_from(addr, "127.0.0.10").unwrap().0, 429, "a third from the same address");
    let (_, _b1) = status_from(addr, "127.0.0.11").unwrap();
    let (_, _b2) = status_from(addr, "127.0.0.12").unwrap();
    assert_eq!(status_from(addr, "127.0.0.13").unwrap().0, 503, "a fifth in all");
    drop(a1);
    // The freed place is counted back once the server sees the close.
    let started = Instant::now();
    loop {
        match status_from(addr, "127.0.0.14") {
            Ok((200, _)) => break,
            _ if started.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("the place never came back: {:?}", other.map(|o| o.0)),
        }
    }
}

#[tokio::test]
async fn hundreds_of_stalled_handshakes_do_not_keep_others_out_and_are_dropped() {
    let (server, _) = start_serve(&["--handshake-timeout-secs", "1"]);
    // 300 clients that open a connection and send half a request head, then nothing.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        stream.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
        stalled.push(stream);
    }
    let started = Instant::now();
    let mut ws = v1_client(&server.addr).await;
    send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
    next_of(&mut ws, "joined").await;
    assert!(started.elapsed() < Duration::from_millis(500), "a real client waited {:?}", started.elapsed());
    // Each stalled connection is closed by the server once the timeout passes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for stream in &mut stalled {
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        match stream.read_to_end(&mut Vec::new()) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a stalled handshake is still open after the timeout: {e}"),
        }
    }
}

#[tokio::test]
async fn oversized_messages_close_with_1009_and_fast_senders_with_1008() {
    let (server, _) = start_serve(&["--max-message-chars", "100", "--rate-limit", "20", "--rate-burst", "10"]);
    // The WebSocket frame limit is 64 KiB plus 4 bytes per allowed character.
    let mut big = v1_client(&server.addr).await;
    big.send("x".repeat(70_000)).await.unwrap();
    assert_eq!(next_close(&mut big).await.map(|c| c.0), Some(1009));

    // Ten at once are fine (the burst); the bucket then refills at 20 per second.
    let mut steady = v1_client(&server.addr).await;
    for i in 0..20 {
        send(&mut steady, json!({"type": "history", "room": "lobby", "req": i})).await;
        assert_eq!(next_of(&mut steady, "history").await["req"], i);
        if i >= 9 {
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    let mut flood = v1_client(&server.addr).await;
    for i in 0..40 {
        if flood.send(json!({"type": "presence", "room": "lobby", "req": i}).to_string()).await.is_err() {
            break;
        }
    }
    let (code, reason) = next_close(&mut flood).await.unwrap();
    assert_eq!((code, reason.as_str()), (1008, "message rate limit exceeded"));
    // The steady client was never cut off.
    send(&mut steady, json!({"type": "history", "room": "lobby", "req": "last"})).await;
    assert_eq!(next_of(&mut steady, "history").await["req"], "last");
}

#[tokio::test]
async fn a_publish_names_a_bounded_number_of_rooms_and_each_counts_against_the_rate() {
    let (server, _) = start_serve(&["--max-rooms-per-connection", "4", "--rate-limit", "1", "--rate-burst", "6"]);
    let mut ws = v1_client(&server.addr).await;
    let rooms: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
    send(&mut ws, json!({"type": "publish", "rooms": rooms, "message": "m", "req": "five"})).await;
    assert_eq!(next_of(&mut ws, "error").await["code"], "too_many");
    // Repeats count once: four distinct rooms of a list of eight.
    let repeated = ["a", "b", "a", "b", "c", "d", "c", "d"];
    send(&mut ws, json!({"type": "publish", "rooms": repeated, "message": "m", "req": "four"})).await;
    for _ in 0..4 {
        assert_eq!(next_of(&mut ws, "ack").await["req"], "four");
    }
    // Two frames and 4 + 3 rooms: the burst of 6 is spent on rooms, not frames.
    send(&mut ws, json!({"type": "publish", "rooms": ["x", "y", "z"], "message": "m"})).await;
    let (code, reason) = next_close(&mut ws).await.unwrap();
    assert_eq!((code, reason.as_str()), (1008, "message rate limit exceeded"));
}

#[tokio::test]
async fn rooms_per_connection_and_presence_size_are_capped() {
    let (server, _) = start_serve(&["--max-rooms-per-connection", "2", "--max-presence", "3"]);
    let mut ws = v1_client(&server.addr).await;
    for room in ["a", "b"] {
        send(&mut ws, json!({"type": "join", "room": room})).await;
        next_of(&mut ws, "joined").await;
    }
    send(&mut ws, json!({"type": "join", "room": "c", "req": "third"})).await;
    let error = next_of(&mut ws, "error").await;
    assert_eq!((error["code"].as_str(), error["req"].as_str()), (Some("too_many"), Some("third")));
    let mut others = Vec::new();
    for i in 0..4 {
        let mut other = v1_client(&server.addr).await;
        send(&mut other, json!({"type": "join", "room": "a", "name": format!("m{i}")})).await;
        next_of(&mut other, "joined").await;
        others.push(other);
    }
    send(&mut ws, json!({"type": "presence", "room": "a"})).await;
    // Skip the join events of the others; the answer is the presence envelope with a member list.
    let presence = loop {
        let presence = next_of(&mut ws, "presence").await;
        if presence.get("members").is_some() {
            break presence;
        }
    };
    assert_eq!(presence["members"].as_array().unwrap().len(), 3, "{presence}");
    assert_eq!(presence["truncated"], true);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_room_goes_on() {
    let (server, _) = start_serve(&["--outbox-bytes", "65536", "--rate-limit", "0", "--max-message-chars", "8000"]);
    let mut stalled = v1_client(&server.addr).await;
    let mut frozen = v1_client(&server.addr).await;
    let mut reader = v1_client(&server.addr).await;
    let mut publisher = v1_client(&server.addr).await;
    for ws in [&mut stalled, &mut frozen, &mut reader] {
        send(ws, json!({"type": "join", "room": "busy"})).await;
        next_of(ws, "joined").await;
    }
    // 24 MB in all: more than the kernel's socket buffers, the socket's write buffer and the outbox.
    // The publisher waits for the reading member to receive each message, so that one never lags.
    let text = "y".repeat(8000);
    let total = 3000;
    for expected in 1..=total {
        send(&mut publisher, json!({"type": "publish", "room": "busy", "message": text})).await;
        let message = next_of(&mut reader, "message").await;
        assert_eq!(message["offset"], expected, "the reading member gets everything, in order");
    }
    // The server lets go of both stalled members: their sessions end (the close frame cannot reach a
    // peer that does not read, so the close is given a bounded time) and their places are freed.
    // Only the reader, the publisher and the request asking remain.
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || wait_for_open_connections(&addr, 3)).await.unwrap();
    // Reading now, a stalled member finds what was already on its way, then the end: the close frame
    // with its reason when it still fit in the socket, or the connection closed under it.
    let mut received = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), stalled.recv()).await.expect("ends in time") {
            Some(Ok(Message::Text(_))) => received += 1,
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.expect("a close code");
                assert_eq!(frame.code.0, 1008, "{frame:?}");
                assert!(frame.reason.contains("too slow"), "{}", frame.reason);
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert!(received < total, "it was cut off before the end ({received} of {total})");
    drop(frozen);
}

/// The status of a request with an extra header of `pad` bytes (a WebSocket upgrade when `upgrade`).
fn status_with_header_of(addr: &str, path: &str, pad: usize, upgrade: bool) -> u16 {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let upgrade = if upgrade {
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    } else {
        ""
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{upgrade}X-Pad: {}\r\n\r\n", "a".repeat(pad));
    // The server may answer and close before it has read everything: a failed write is fine.
    let _ = stream.write_all(request.as_bytes());
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[test]
fn request_heads_are_bounded_alike_on_serve_and_echo_and_the_bound_is_one_setting() {
    let (serve, _) = start_serve(&[]);
    assert_eq!(status_with_header_of(&serve.addr, "/healthz", 7_000, false), 200);
    assert_eq!(status_with_header_of(&serve.addr, "/healthz", 9_000, false), 431);
    assert_eq!(status_with_header_of(&serve.addr, "/ws", 9_000, true), 431, "no upgrade past the bound");
    assert_eq!(status_with_header_of(&serve.addr, "/healthz", 300_000, false), 431, "hyper alone took 300 KB");
    let echo = support::start_echo(&["--no-compression"]);
    assert_eq!(status_with_header_of(&echo.addr, "/", 7_000, true), 101);
    assert_eq!(status_with_header_of(&echo.addr, "/", 9_000, true), 431);

    let (wide, _) = start_serve(&["--max-request-head-bytes", "65536"]);
    assert_eq!(status_with_header_of(&wide.addr, "/ws", 20_000, true), 101);
    assert_eq!(status_with_header_of(&wide.addr, "/healthz", 70_000, false), 431);
    let wide_echo = support::start_echo(&["--max-request-head-bytes", "65536"]);
    assert_eq!(status_with_header_of(&wide_echo.addr, "/", 20_000, true), 101);
}
