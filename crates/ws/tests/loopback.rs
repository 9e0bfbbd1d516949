//! The tokio layer over real loopback sockets: handshakes and refusals, echo of every message kind,
//! split halves, cancel safety, keepalive, close handshake and timeouts, backpressure, hyper and axum.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use switchboard_ws::proto::frame::{FrameHeader, OpCode};
use switchboard_ws::{
    accept, accept_with, reject, Accept, ClientBuilder, CloseCode, CloseFrame, Config, Error, Message, ReuniteError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECOND: Duration = Duration::from_secs(1);

/// An echo server on a free port, with the given config; returns its ws:// URL.
async fn echo_server(config: Config) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let config = config.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = accept(stream, config).await else {
                    return;
                };
                while let Some(message) = ws.recv().await {
                    if let Ok(m @ (Message::Text(_) | Message::Binary(_))) = message {
                        if ws.feed(m).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    format!("ws://{addr}")
}

/// Sends raw bytes and reads the whole answer until the server closes (bounded by a timeout).
async fn raw_exchange(addr: &str, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(5 * SECOND, stream.read_to_end(&mut answer)).await;
    answer
}

/// A server for one connection on a free port: accepted with `config`, then handed to `serve` on a
/// task of its own. Returns the port's address and that task.
async fn serve_one<T, F>(
    config: Config,
    serve: impl FnOnce(switchboard_ws::WebSocket<TcpStream>) -> F + Send + 'static,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<T>)
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve(accept(stream, config).await.unwrap()).await
    });
    (addr, task)
}

const HANDSHAKE: &str = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

#[tokio::test]
async fn echo_round_trip_of_every_kind() {
    let url = echo_server(Config::default()).await;
    let (mut ws, accepted) = switchboard_ws::connect(&url).await.unwrap();
    assert_eq!(accepted.head.status, 101);
    ws.send("héllo").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("héllo"));
    ws.send(vec![0u8, 1, 2, 255]).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    // 3 MiB: 64-bit length, vectored zero-copy write on the server side, many reads.
    let big: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    ws.send(big.clone()).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::binary(big));
    ws.send(Message::Ping(Bytes::from_static(b"are you there"))).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::Pong(Bytes::from_static(b"are you there")));
    // Many messages fed before one flush arrive in order.
    for i in 0..500 {
        ws.feed(format!("m{i}")).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..500 {
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(format!("m{i}")));
    }
}

#[tokio::test]
async fn an_idle_connection_holds_no_buffers() {
    let url = echo_server(Config::default()).await;
    let (mut ws, _) = switchboard_ws::connect(&url).await.unwrap();
    let big = vec![7u8; 100_000];
    ws.send(big.clone()).await.unwrap();
    ws.feed("a").await.unwrap();
    assert!(ws.buffer_capacity() > 0, "a queued message is in a buffer");
    ws.flush().await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::binary(big));
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("a"));
    // Nothing more arrives: the read goes pending (the dropped `recv` loses nothing).
    assert!(tokio::time::timeout(SECOND / 10, ws.recv()).await.is_err());
    assert_eq!(ws.buffer_capacity(), 0, "buffers went back to the pool");
    // And the connection still works.
    ws.send("again").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("again"));
    // A reply sent right after a read, with no read after it: the buffer the read left (lent to
    // the reply) goes back to the pool once the reply is written.
    ws.send("reply").await.unwrap();
    assert_eq!(ws.buffer_capacity(), 0, "nothing kept after a send with no read to follow");
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("reply"));
    assert!(tokio::time::timeout(SECOND / 10, ws.recv()).await.is_err());
    assert_eq!(ws.buffer_capacity(), 0);
    // Queued without a flush, then written by `recv` before it reads: the written buffer is what
    // that read uses, and it goes back to the pool when the read finds nothing more.
    ws.feed("fed").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("fed"));
    assert!(tokio::time::timeout(SECOND / 10, ws.recv()).await.is_err());
    assert_eq!(ws.buffer_capacity(), 0, "the buffer the reply was written in went back too");
}

#[tokio::test]
async fn close_handshake_both_sides_see_it_and_server_closes_tcp_first() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = accept(stream, Config::default()).await.unwrap();
        let first = ws.recv().await.unwrap().unwrap();
        let end = ws.recv().await;
        (first, end.is_none())
    });
    let (mut ws, _) = switchboard_ws::connect(&url).await.unwrap();
    ws.close(CloseCode::NORMAL, "done here").await.unwrap();
    assert!(matches!(ws.send("late").await, Err(Error::ConnectionClosed)));
    let echo = ws.recv().await.unwrap().unwrap();
    assert_eq!(echo, Message::Close(Some(CloseFrame::new(1000, ""))));
    // The client's stream ends because the server closed TCP (well before the 5 s close timeout).
    let ended = tokio::time::timeout(2 * SECOND, ws.recv()).await.expect("server closed TCP");
    assert!(ended.is_none());
    let (first, server_ended) = server.await.unwrap();
    assert_eq!(first, Message::Close(Some(CloseFrame::new(1000, "done here"))));
    assert!(server_ended);
}

#[tokio::test]
async fn refusals_are_http_answers_with_reasons() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = Config { max_head_bytes: 1024, ..Config::default() };
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let config = config.clone();
            tokio::spawn(async move {
                let _ = accept_with(stream, config, |req| {
                    if req.origin() == Some("https://evil.example") {
                        return Err(reject(403, "origin not allowed"));
                    }
                    if req.header("x-no-token").is_some() {
                        return Err(reject(401, "a token is required").with_header("WWW-Authenticate", "Bearer"));
                    }
                    Ok(Accept::negotiate(req, &["switchboard.v1"]))
                })
                .await;
            });
        }
    });
    let answer = |r: Vec<u8>| {
        let addr = addr.clone();
        async move { String::from_utf8_lossy(&raw_exchange(&addr, &r).await).into_owned() }
    };
    let v8 = answer(format!("{}\r\n", HANDSHAKE.replace("Version: 13", "Version: 8")).into_bytes()).await;
    assert!(v8.starts_with("HTTP/1.1 426 "), "{v8}");
    assert!(v8.contains("Sec-WebSocket-Version: 13\r\n"), "{v8}");
    let plain = answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
    assert!(plain.starts_with("HTTP/1.1 400 ") && plain.contains("Upgrade: websocket"), "{plain}");
    let huge = answer(format!("{HANDSHAKE}X-Pad: {}\r\n\r\n", "a".repeat(4000)).into_bytes()).await;
    assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
    let evil = answer(format!("{HANDSHAKE}Origin: https://evil.example\r\n\r\n").into_bytes()).await;
    assert!(evil.starts_with("HTTP/1.1 403 ") && evil.contains("origin not allowed"), "{evil}");
    let anonymous = answer(format!("{HANDSHAKE}X-No-Token: 1\r\n\r\n").into_bytes()).await;
    assert!(
        anonymous.starts_with("HTTP/1.1 401 ") && anonymous.contains("WWW-Authenticate: Bearer\r\n"),
        "{anonymous}"
    );

    // Our client reports the status and the body's reason.
    let err = ClientBuilder::new(format!("ws://{addr}/"))
        .header("Origin", "https://evil.example")
        .connect()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("403") && text.contains("origin not allowed"), "{text}");

    // Subprotocol negotiation.
    let (ws, accepted) = ClientBuilder::new(format!("ws://{addr}/"))
        .protocol("other")
        .protocol("switchboard.v1")
        .connect()
        .await
        .unwrap();
    assert_eq!(ws.protocol(), Some("switchboard.v1"));
    assert_eq!(accepted.protocol.as_deref(), Some("switchboard.v1"));
    let (ws, _) = ClientBuilder::new(format!("ws://{addr}/")).protocol("other").connect().await.unwrap();
    assert_eq!(ws.protocol(), None);
}

#[tokio::test]
async fn stalled_handshakes_time_out_without_blocking_others() {
    let config = Config::default().handshake_timeout(Duration::from_millis(300));
    let url = echo_server(config).await;
    let addr = url.trim_start_matches("ws://").to_owned();
    // 200 clients open TCP and never send a request.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    let (mut ws, _) = tokio::time::timeout(SECOND, switchboard_ws::connect(&url)).await.expect("not starved").unwrap();
    ws.send("still served").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("still served"));
    // Each stalled one is dropped by the server after the timeout.
    let mut buf = [0u8; 1];
    for stream in idle.iter_mut().take(20) {
        let n = tokio::time::timeout(2 * SECOND, stream.read(&mut buf)).await.expect("dropped").unwrap_or(0);
        assert_eq!(n, 0);
    }
}

#[tokio::test]
async fn protocol_errors_reach_the_peer_as_close_codes() {
    let url = echo_server(Config::default().max_message_size(1000)).await;
    let addr = url.trim_start_matches("ws://").to_owned();
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (vec![0x81, 0x02, b'h', b'i'], 1002),             // unmasked
        (vec![0x81, 0x82, 0, 0, 0, 0, 0xc3, 0x28], 1007), // invalid UTF-8
        (vec![0x82, 0xfe, 0x07, 0xd0, 0, 0, 0, 0], 1009), // 2000 bytes > 1000
        (vec![0x83, 0x80, 0, 0, 0, 0], 1002),             // reserved opcode
    ];
    for (frame, code) in cases {
        let mut request = format!("{HANDSHAKE}\r\n").into_bytes();
        request.extend_from_slice(&frame);
        let answer = raw_exchange(&addr, &request).await;
        let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let (header, n) = FrameHeader::decode(&answer[head_end..]).unwrap().unwrap();
        assert_eq!(header.opcode, OpCode::Close);
        let payload = &answer[head_end + n..];
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code, "frame {frame:?}");
    }
}

#[tokio::test]
async fn split_halves_work_from_two_tasks() {
    let url = echo_server(Config::default()).await;
    let (ws, _) = switchboard_ws::connect(&url).await.unwrap();
    let (mut reader, mut writer) = ws.split();
    assert!(reader.is_pair_of(&writer));
    let sender = tokio::spawn(async move {
        for i in 0..2000 {
            writer.send(format!("{i}")).await.unwrap();
        }
        writer
    });
    for i in 0..2000 {
        let message = tokio::time::timeout(5 * SECOND, reader.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(message, Message::text(format!("{i}")));
    }
    let mut writer = sender.await.unwrap();
    writer.close(1000, "bye").await.unwrap();
    assert!(matches!(reader.recv().await, Some(Ok(Message::Close(_)))));
    assert!(tokio::time::timeout(2 * SECOND, reader.recv()).await.unwrap().is_none());
}

#[tokio::test]
async fn split_halves_reunite_into_their_connection_and_halves_of_two_are_given_back() {
    let url = echo_server(Config::default()).await;
    let (first, _) = switchboard_ws::connect(&url).await.unwrap();
    let (second, _) = switchboard_ws::connect(&url).await.unwrap();
    let (reader, mut writer) = first.split();
    let (other_reader, other_writer) = second.split();
    // Queued by the writer half, not flushed: it must travel with the reunited connection.
    writer.feed("queued").await.unwrap();
    let Err(ReuniteError(reader, other_writer)) = reader.reunite(other_writer) else {
        panic!("halves of two connections were put together");
    };
    let mut ws = reader.reunite(writer).expect("the halves of one connection");
    ws.send("after").await.unwrap();
    for expected in ["queued", "after"] {
        let message = tokio::time::timeout(5 * SECOND, ws.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(message, Message::text(expected));
    }
    let mut other = other_reader.reunite(other_writer).expect("the halves given back still fit");
    other.send("other").await.unwrap();
    let message = tokio::time::timeout(5 * SECOND, other.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(message, Message::text("other"));
    ws.close(1000, "bye").await.unwrap();
    assert!(matches!(ws.recv().await, Some(Ok(Message::Close(_)))));
    assert!(tokio::time::timeout(2 * SECOND, ws.recv()).await.unwrap().is_none());
}

#[tokio::test]
async fn reader_answers_pings_while_writer_is_idle() {
    // The server pings every 50 ms and drops clients that do not answer within 100 ms.
    let config = Config::default().keepalive(Duration::from_millis(50), Duration::from_millis(100));
    let url = echo_server(config).await;
    let (ws, _) = switchboard_ws::connect(&url).await.unwrap();
    let (mut reader, mut writer) = ws.split();
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, reader.recv()).await {
        if matches!(message.unwrap(), Message::Ping(_)) {
            pings += 1;
        }
    }
    assert!(pings >= 4, "expected several keepalive pings, got {pings}");
    // Still connected: an echo comes back.
    writer.send("alive").await.unwrap();
    loop {
        match reader.recv().await.unwrap().unwrap() {
            Message::Ping(_) => continue,
            other => {
                assert_eq!(other, Message::text("alive"));
                break;
            }
        }
    }
}

#[tokio::test]
async fn keepalive_drops_a_peer_that_never_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let config = Config::default().keepalive(Duration::from_millis(100), Duration::from_millis(150));
        let mut ws = accept(stream, config).await.unwrap();
        let started = tokio::time::Instant::now();
        let outcome = ws.recv().await;
        (outcome, started.elapsed())
    });
    // A raw client: completes the handshake, then reads nothing and answers nothing.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("{HANDSHAKE}\r\n").as_bytes()).await.unwrap();
    let (outcome, elapsed) = tokio::time::timeout(3 * SECOND, server).await.unwrap().unwrap();
    assert!(matches!(outcome, Some(Err(Error::KeepaliveTimeout(_)))), "{outcome:?}");
    assert!(elapsed >= Duration::from_millis(240) && elapsed < 2 * SECOND, "{elapsed:?}");
}

#[tokio::test]
async fn unanswered_close_gives_up_after_close_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A server that completes the handshake and then ignores everything.
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        raw_server_handshake(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    });
    let config = Config::default().close_timeout(Duration::from_millis(200));
    let (mut ws, _) = ClientBuilder::new(format!("ws://{addr}")).config(config).connect().await.unwrap();
    ws.close(1000, "").await.unwrap();
    let started = tokio::time::Instant::now();
    // Told apart from a clean close: an error, then the end.
    let outcome = tokio::time::timeout(2 * SECOND, ws.recv()).await.unwrap();
    assert!(matches!(outcome, Some(Err(Error::CloseTimeout(_)))), "{outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(190));
    assert!(ws.recv().await.is_none());
}

/// A raw client that completes the handshake and then neither reads nor answers.
async fn silent_client(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("{HANDSHAKE}\r\n").as_bytes()).await.unwrap();
    stream
}

/// A writer half sending 64 KiB messages until a send fails (to a peer that reads nothing, once the
/// socket is full it waits for room); that failure.
fn write_until_it_fails(mut writer: switchboard_ws::WsWriter<TcpStream>) -> tokio::task::JoinHandle<Error> {
    tokio::spawn(async move {
        let big = Bytes::from(vec![1u8; 64 * 1024]);
        loop {
            if let Err(error) = writer.send(Message::Binary(big.clone())).await {
                return error;
            }
        }
    })
}

/// A close frame with code 1000 and `reason`, as a client sends it.
fn client_close_frame(reason: &str) -> Vec<u8> {
    let mut conn = switchboard_ws::proto::Connection::new(switchboard_ws::Role::Client, Default::default());
    conn.close(Some(CloseFrame::new(CloseCode::NORMAL, reason))).unwrap();
    conn.take_output().to_vec()
}

/// The messages a raw client received after the server's handshake response.
fn messages_after_the_response(received: &[u8]) -> Vec<Message> {
    let response_end = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut conn = switchboard_ws::proto::Connection::new(switchboard_ws::Role::Client, Default::default());
    conn.receive_data(&received[response_end..]);
    std::iter::from_fn(|| conn.next_message().ok().flatten()).collect()
}

#[tokio::test]
async fn a_keepalive_timeout_ends_the_writer_half_too() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let config = Config::default().keepalive(Duration::from_millis(200), Duration::from_millis(200));
        let (mut reader, writer) = accept(stream, config).await.unwrap().split();
        // The writer fills the socket of a peer that reads nothing, and waits for room.
        let writing = write_until_it_fails(writer);
        let read = reader.recv().await;
        let written = tokio::time::timeout(2 * SECOND, writing).await;
        (read, written)
    });
    let _peer = silent_client(addr).await;
    let (read, written) = tokio::time::timeout(5 * SECOND, server).await.unwrap().unwrap();
    assert!(matches!(read, Some(Err(Error::KeepaliveTimeout(_)))), "{read:?}");
    let error = written.expect("the waiting writer is woken, not left waiting").unwrap();
    assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
}

#[tokio::test]
async fn a_writer_half_waiting_for_room_ends_when_the_close_gives_up() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let config = Config::default().close_timeout(Duration::from_millis(300));
        let (mut reader, writer) = accept(stream, config).await.unwrap().split();
        // The writer fills the socket of a peer that reads nothing, and waits for room.
        let writing = write_until_it_fails(writer);
        // The peer's close frame; our answer cannot be written, and the reader gives up at the
        // close deadline.
        let close = reader.recv().await;
        let end = reader.recv().await;
        let written = tokio::time::timeout(3 * SECOND, writing).await;
        (close, end, written)
    });
    let mut peer = silent_client(addr).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    peer.write_all(&client_close_frame("bye")).await.unwrap();
    let (close, end, written) = tokio::time::timeout(10 * SECOND, server).await.unwrap().unwrap();
    assert!(matches!(close, Some(Ok(Message::Close(_)))), "{close:?}");
    assert!(end.is_none(), "{end:?}");
    let error = written.expect("the waiting writer is woken, not left waiting").unwrap();
    assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
}

#[tokio::test]
async fn a_keepalive_timeout_tells_the_peer_why_when_its_socket_has_room() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let config = Config::default().keepalive(Duration::from_millis(100), Duration::from_millis(100));
        let mut ws = accept(stream, config).await.unwrap();
        while ws.recv().await.is_some() {}
    });
    // Reads everything, answers no ping.
    let mut peer = silent_client(addr).await;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(3 * SECOND, peer.read(&mut chunk)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    let messages = messages_after_the_response(&received);
    assert_eq!(
        messages.last(),
        Some(&Message::Close(Some(CloseFrame::new(CloseCode::GOING_AWAY, "keepalive timeout")))),
        "{messages:?}"
    );
}

#[tokio::test]
async fn close_gives_up_at_the_close_timeout_when_the_peer_does_not_read() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        // A small high-water mark: the queue is over it once the socket is full.
        let config = Config::default().close_timeout(Duration::from_millis(300)).write_high_water(1024);
        let mut ws = accept(stream, config).await.unwrap();
        // Fill the socket of a peer that reads nothing, and the queue past its mark.
        let big = Bytes::from(vec![1u8; 64 * 1024]);
        while tokio::time::timeout(Duration::from_millis(300), ws.feed(Message::Binary(big.clone()))).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(50), ws.flush()).await;
        }
        assert!(ws.pending_output() > 1024, "the queue is past its high-water mark");
        let started = tokio::time::Instant::now();
        let closed = tokio::time::timeout(5 * SECOND, ws.close(CloseCode::POLICY_VIOLATION, "too slow")).await;
        (closed, started.elapsed())
    });
    let _peer = silent_client(addr).await;
    let (closed, took) = tokio::time::timeout(30 * SECOND, server).await.unwrap().unwrap();
    let outcome = closed.expect("close() ends at the close timeout");
    assert!(matches!(outcome, Err(Error::CloseTimeout(_))), "{outcome:?}");
    assert!(took >= Duration::from_millis(250) && took < 2 * SECOND, "{took:?}");
}

#[tokio::test]
async fn a_server_is_done_once_the_close_handshake_is_over_though_the_client_keeps_its_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = accept(stream, Config::default()).await.unwrap();
        let close = ws.recv().await;
        let started = tokio::time::Instant::now();
        let end = ws.recv().await;
        (close, end, started.elapsed())
    });
    let mut peer = silent_client(addr).await;
    peer.write_all(&client_close_frame("bye")).await.unwrap();
    let (close, end, took) = tokio::time::timeout(3 * SECOND, server).await.unwrap().unwrap();
    assert!(matches!(close, Some(Ok(Message::Close(_)))), "{close:?}");
    assert!(end.is_none());
    // Not the 5 s close timeout: the server closed its side and has nothing to wait for.
    assert!(took < SECOND, "{took:?}");
    // The peer gets the server's close frame and its FIN.
    let mut received = Vec::new();
    tokio::time::timeout(2 * SECOND, peer.read_to_end(&mut received)).await.unwrap().unwrap();
    assert_eq!(messages_after_the_response(&received), vec![Message::Close(Some(CloseFrame::new(1000, "")))]);
}

#[tokio::test]
async fn a_client_closes_its_socket_when_the_server_has_closed_tcp() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        raw_server_handshake(&mut stream).await;
        let mut conn = switchboard_ws::proto::Connection::new(switchboard_ws::Role::Server, Default::default());
        conn.close(Some(CloseFrame::new(CloseCode::NORMAL, ""))).unwrap();
        stream.write_all(&conn.take_output()).await.unwrap();
        stream.shutdown().await.unwrap();
        // The client's close frame, then its FIN, while the client still holds its WebSocket.
        let mut rest = Vec::new();
        tokio::time::timeout(2 * SECOND, stream.read_to_end(&mut rest)).await.is_ok()
    });
    let (mut ws, _) = switchboard_ws::connect(&format!("ws://{addr}")).await.unwrap();
    assert!(matches!(ws.recv().await, Some(Ok(Message::Close(_)))));
    assert!(ws.recv().await.is_none());
    assert!(server.await.unwrap(), "the client's FIN came while it still held the socket");
    drop(ws);
}

#[tokio::test]
async fn peer_vanishing_is_an_abnormal_closure() {
    let (addr, server) = serve_one(Config::default(), |mut ws| async move { ws.recv().await }).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("{HANDSHAKE}\r\n").as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let _ = stream.read(&mut buf).await.unwrap();
    drop(stream);
    assert!(matches!(server.await.unwrap(), Some(Err(Error::AbnormalClosure))));
}

#[tokio::test]
async fn send_applies_backpressure_to_a_peer_that_never_reads() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let high_water = 64 * 1024;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = accept(stream, Config::default().write_high_water(high_water)).await.unwrap();
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        let mut sent = 0usize;
        let mut max_pending = 0usize;
        // Send until a send stays blocked for 300 ms.
        loop {
            match tokio::time::timeout(Duration::from_millis(300), ws.feed(Message::Binary(chunk.clone()))).await {
                Ok(Ok(())) => {
                    sent += chunk.len();
                    max_pending = max_pending.max(ws.pending_output());
                }
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => break,
            }
            assert!(sent < 512 << 20, "send never blocked");
        }
        (sent, max_pending)
    });
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("{HANDSHAKE}\r\n").as_bytes()).await.unwrap();
    // Never read.
    let (sent, max_pending) = tokio::time::timeout(30 * SECOND, server).await.unwrap().unwrap();
    assert!(max_pending <= high_water + 16 * 1024 + 14, "queue grew to {max_pending}");
    assert!(sent > 0);
    drop(stream);
}

#[tokio::test]
async fn dropping_a_pending_recv_loses_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let payload: Vec<u8> = (0..200_000).map(|i| (i % 253) as u8).collect();
    let expected = payload.clone();
    // A raw server trickles a 200 KB frame and a text frame in small pieces with pauses.
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        raw_server_handshake(&mut stream).await;
        let mut conn = switchboard_ws::proto::Connection::new(switchboard_ws::Role::Server, Default::default());
        conn.send(Message::binary(payload)).unwrap();
        conn.send(Message::text("after")).unwrap();
        for piece in conn.take_output().chunks(7_919) {
            stream.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let (mut ws, _) = switchboard_ws::connect(&format!("ws://{addr}")).await.unwrap();
    let mut cancelled = 0;
    let mut got = Vec::new();
    while got.len() < 2 {
        // A timeout shorter than the trickle: most recv calls are dropped while pending.
        match tokio::time::timeout(Duration::from_millis(2), ws.recv()).await {
            Ok(Some(message)) => got.push(message.unwrap()),
            Ok(None) => panic!("ended early"),
            Err(_) => cancelled += 1,
        }
    }
    assert!(cancelled > 5, "the test must actually cancel recv ({cancelled})");
    assert_eq!(got, vec![Message::binary(expected), Message::text("after")]);
}

/// Answers a client's handshake by hand, leaving a bare socket.
async fn raw_server_handshake(stream: &mut TcpStream) {
    use switchboard_ws::proto::handshake::{negotiate, parse_request, validate_request};
    let mut buf = Vec::new();
    let head = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Some((head, _)) = parse_request(&buf, 8192).unwrap() {
            break head;
        }
    };
    let request = validate_request(head).unwrap();
    let negotiated = negotiate(&request.offer, &Default::default()).unwrap();
    stream.write_all(&negotiated.http1_response().to_http1()).await.unwrap();
}

#[tokio::test]
async fn stream_and_sink_for_ecosystem_code() {
    let url = echo_server(Config::default()).await;
    let (ws, _) = switchboard_ws::connect(&url).await.unwrap();
    let (mut sink, mut stream) = StreamExt::split(ws);
    sink.send(Message::text("one")).await.unwrap();
    sink.send(Message::text("two")).await.unwrap();
    let got: Vec<Message> = stream.by_ref().take(2).map(|m| m.unwrap()).collect().await;
    assert_eq!(got, vec![Message::text("one"), Message::text("two")]);
    sink.close().await.unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Message::Close(Some(f)))) if f.code == CloseCode::NORMAL));
}

#[tokio::test]
async fn hyper_serves_pages_and_websockets_on_one_port() {
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use switchboard_ws::upgrade::{is_upgrade_request, refusal_response, Upgrade};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(|mut req: hyper::Request<hyper::body::Incoming>| async move {
                if !is_upgrade_request(&req) {
                    let body = format!("You sent: {}", req.uri().path());
                    return Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        Full::new(Bytes::from(body)).boxed(),
                    ));
                }
                match Upgrade::new(&mut req) {
                    Err(e) => Ok(refusal_response(&e).map(|b| b.boxed())),
                    Ok(upgrade) => {
                        let (response, socket) = upgrade.protocols(&["echo"]).into_response();
                        tokio::spawn(async move {
                            let mut ws = socket.await.unwrap();
                            while let Some(Ok(m)) = ws.recv().await {
                                if m.is_text() && ws.send(m).await.is_err() {
                                    break;
                                }
                            }
                        });
                        Ok(response.map(|b| b.map_err(|never| match never {}).boxed()))
                    }
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    let page = String::from_utf8(
        raw_exchange(&addr.to_string(), b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await,
    )
    .unwrap();
    assert!(page.starts_with("HTTP/1.1 200") && page.ends_with("You sent: /hello"), "{page}");
    let (mut ws, _) = ClientBuilder::new(format!("ws://{addr}/ws")).protocol("echo").connect().await.unwrap();
    assert_eq!(ws.protocol(), Some("echo"));
    ws.send("through hyper").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("through hyper"));
    let v8 = String::from_utf8(
        raw_exchange(&addr.to_string(), format!("{}\r\n", HANDSHAKE.replace("Version: 13", "Version: 8")).as_bytes())
            .await,
    )
    .unwrap();
    assert!(v8.starts_with("HTTP/1.1 426") && v8.to_ascii_lowercase().contains("sec-websocket-version: 13"), "{v8}");
}

#[tokio::test]
async fn axum_extractor_upgrades_and_refuses() {
    use axum::routing::get;
    use switchboard_ws::axum::WebSocketUpgrade;

    let app = axum::Router::new().route("/", get(|| async { "a page" })).route(
        "/ws",
        get(|ws: WebSocketUpgrade| async move {
            ws.protocols(&["chat"]).on_upgrade(|mut socket| async move {
                let protocol = socket.protocol().unwrap_or("none").to_owned();
                while let Some(Ok(m)) = socket.recv().await {
                    if let Some(text) = m.as_text() {
                        let reply = format!("{protocol}:{text}");
                        if socket.send(reply).await.is_err() {
                            break;
                        }
                    }
                }
            })
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let page = String::from_utf8(
        raw_exchange(&addr.to_string(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await,
    )
    .unwrap();
    assert!(page.ends_with("a page"), "{page}");
    let (mut ws, _) = ClientBuilder::new(format!("ws://{addr}/ws")).protocol("chat").connect().await.unwrap();
    ws.send("hi").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("chat:hi"));
    let bad = String::from_utf8(
        raw_exchange(
            &addr.to_string(),
            format!("{}\r\n", HANDSHAKE.replace("GET /", "GET /ws").replace("Version: 13", "Version: 7")).as_bytes(),
        )
        .await,
    )
    .unwrap();
    assert!(bad.starts_with("HTTP/1.1 426"), "{bad}");
}

#[tokio::test]
async fn a_split_connection_keeps_reading_while_its_own_large_messages_wait_for_the_peer() {
    // The server echoes with `send`, so it stops reading while its echo waits for room; the client's
    // reader must keep reading meanwhile, though its writer's messages are over the high-water mark.
    let url = echo_server(Config::default().write_high_water(64 * 1024)).await;
    let config = Config::default().write_high_water(64 * 1024);
    let (ws, _) = ClientBuilder::new(&url).config(config).connect().await.unwrap();
    let (mut reader, mut writer) = ws.split();
    let size = 4 << 20;
    let count = 3;
    let sender = tokio::spawn(async move {
        for i in 0..count {
            writer.send(Message::binary(vec![i as u8; size])).await.unwrap();
        }
        writer
    });
    for i in 0..count {
        let echo = tokio::time::timeout(10 * SECOND, reader.recv()).await.expect("no echo: stuck").unwrap().unwrap();
        assert_eq!((echo.len(), echo.payload()[0]), (size, i as u8));
    }
    let _ = sender.await.unwrap();
}

#[tokio::test]
async fn a_peer_that_pings_and_never_reads_cannot_grow_our_pongs_past_the_high_water_mark() {
    let high_water = 64 * 1024;
    let (addr, server) = serve_one(Config::default().write_high_water(high_water), |mut ws| async move {
        // The reader stops while the pongs are unsent; give it a while to take what it can.
        let _ = tokio::time::timeout(2 * SECOND, async { while let Some(Ok(_)) = ws.recv().await {} }).await;
        ws.pending_output()
    })
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("{HANDSHAKE}\r\n").as_bytes()).await.unwrap();
    // 125-byte pings, masked, until the server stops taking them (the socket buffers fill).
    let mut ping = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
    ping.extend(std::iter::repeat_n(0u8, 125));
    let pings: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 1000).collect();
    let flood = async {
        loop {
            stream.write_all(&pings).await.unwrap();
        }
    };
    let _ = tokio::time::timeout(2 * SECOND, flood).await;
    let pending = server.await.unwrap();
    assert!(pending > 0, "the pongs stay unsent: the client reads nothing");
    // Reading stops once the unsent pongs are over the mark; the pings of the read before that are
    // still answered (a read fills at most the receive buffer's room, 64 KiB here at most).
    assert!(pending <= high_water + 64 * 1024, "pongs queued past the high-water mark: {pending}");
}

#[tokio::test]
async fn once_the_peer_hangs_up_sends_fail_and_the_state_says_closed() {
    let (addr, server) = serve_one(Config::default(), |mut ws| async move {
        assert!(matches!(ws.recv().await, Some(Err(Error::AbnormalClosure))));
        assert_eq!(ws.close_state(), switchboard_ws::proto::CloseState::Closed);
        assert!(matches!(ws.send("into the void").await, Err(Error::ConnectionClosed)));
    })
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("{HANDSHAKE}\r\n").as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let _ = stream.read(&mut buf).await.unwrap();
    drop(stream);
    server.await.unwrap();
}

#[tokio::test]
async fn close_on_the_peers_close_frame_finishes_the_handshake_without_an_error() {
    let (addr, server) = serve_one(Config::default(), |mut ws| async move {
        match ws.recv().await {
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::from(4000)));
                // The habit from tokio-tungstenite: answer a close with `close`.
                ws.close(1000, "").await.unwrap();
                ws.close(1000, "twice").await.unwrap();
            }
            other => panic!("{other:?}"),
        }
        ws.recv().await.is_none()
    })
    .await;
    let (mut ws, _) = switchboard_ws::connect(&format!("ws://{addr}")).await.unwrap();
    ws.close(4000, "done").await.unwrap();
    ws.close(4001, "a second close only flushes").await.unwrap();
    assert!(matches!(ws.recv().await, Some(Ok(Message::Close(_)))));
    assert!(tokio::time::timeout(5 * SECOND, ws.recv()).await.unwrap().is_none());
    assert!(server.await.unwrap());
}
