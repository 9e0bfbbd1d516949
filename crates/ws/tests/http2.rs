//! The library over HTTP/2 (RFC 8441): a hyper HTTP/2 server upgrading extended CONNECTs through the
//! axum extractor and through `upgrade::Upgrade`, and the client's `Http2Connection`. The Autobahn
//! harness speaks HTTP/1.1 only, so the frame-level cases that matter on a stream (fragments,
//! control frames, bad UTF-8, oversized control frames, the close handshake) are sent here as raw
//! bytes on an HTTP/2 stream.

#[path = "support/test_ca.rs"]
mod test_ca;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::http2::Http2Connection;
use switchboard_ws::proto::handshake::ClientRequest;
use switchboard_ws::upgrade::{refusal_response, Upgrade};
use switchboard_ws::{ClientBuilder, Config, Error, Message, WebSocket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocket<S>) {
    while let Some(Ok(message)) = ws.recv().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            break;
        }
    }
}

/// An HTTP/2 (cleartext, prior knowledge) server: `/axum` upgrades through the axum extractor,
/// `/hyper` through `Upgrade` on a bare hyper service; both echo. Returns its address.
async fn h2_echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route(
        "/axum",
        any(|ws: WebSocketUpgrade| async move {
            assert!(ws.is_http2());
            ws.protocols(&["echo"]).on_upgrade(echo)
        }),
    );
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let router = router.clone();
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                let router = router.clone();
                async move {
                    if request.uri().path() != "/hyper" {
                        let response = tower_call(router, request).await;
                        return Ok::<_, Infallible>(response.map(Either::Right));
                    }
                    let answer = match Upgrade::new(&mut request) {
                        Ok(upgrade) => {
                            let (response, socket) = upgrade.config(Config::default()).into_response();
                            tokio::spawn(async move { echo(socket.await.unwrap()).await });
                            response.map(|body| Either::Left(Either::Left(body)))
                        }
                        Err(error) => refusal_response(&error).map(|body| Either::Left(Either::Right(body))),
                    };
                    Ok(answer)
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .enable_connect_protocol()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr.to_string()
}

async fn tower_call(router: Router, request: hyper::Request<hyper::body::Incoming>) -> axum::response::Response {
    use tower_service::Service;
    let mut router = router;
    router.call(request.map(axum::body::Body::new)).await.unwrap()
}

async fn connection(addr: &str) -> Http2Connection {
    let tcp = TcpStream::connect(addr).await.unwrap();
    Http2Connection::handshake(tcp, addr.to_owned(), &Config::default()).await.unwrap()
}

#[tokio::test]
async fn both_server_paths_echo_on_streams_of_one_connection() {
    let addr = h2_echo_server().await;
    let connection = connection(&addr).await;
    let mut offer = ClientRequest::new(&addr, "/axum");
    offer.protocols = vec!["other".into(), "echo".into()];
    let (mut via_axum, accepted) = connection.open(&offer, Config::default()).await.unwrap();
    assert_eq!((accepted.head.status, accepted.protocol.as_deref()), (200, Some("echo")));
    let (mut via_hyper, accepted) =
        connection.open(&ClientRequest::new(&addr, "/hyper"), Config::default()).await.unwrap();
    assert_eq!((accepted.head.status, accepted.protocol), (200, None));
    for ws in [&mut via_axum, &mut via_hyper] {
        ws.send("héllo").await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("héllo"));
        let big = Bytes::from(vec![5u8; 300_000]);
        ws.send(Message::Binary(big.clone())).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::Binary(big));
    }
    via_axum.close(1000u16, "bye").await.unwrap();
    // The other stream is not affected by one closing.
    via_hyper.send("still here").await.unwrap();
    assert_eq!(via_hyper.recv().await.unwrap().unwrap(), Message::text("still here"));
}

/// A masked client frame.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![first];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Opens a raw stream with an extended CONNECT to `/hyper`: bytes in, bytes out, no client engine.
async fn raw_stream(connection: &Http2Connection) -> TokioIo<hyper::upgrade::Upgraded> {
    let mut request = hyper::Request::connect("/hyper").body(Empty::<Bytes>::new()).unwrap();
    request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    request.headers_mut().insert("sec-websocket-version", "13".parse().unwrap());
    let mut response = connection.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap())
}

/// Reads one unmasked server frame: (first byte, payload).
async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            stream.read_exact(&mut n).await.unwrap();
            u16::from_be_bytes(n) as usize
        }
        127 => panic!("unexpected 64-bit length"),
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    (head[0], payload)
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[tokio::test]
async fn the_engine_speaks_the_same_protocol_on_an_http2_stream() {
    let addr = h2_echo_server().await;
    let connection = connection(&addr).await;

    // Fragments with a ping between them: the pong first, then the whole message.
    let mut stream = raw_stream(&connection).await;
    stream.write_all(&frame(0x01, b"Hel")).await.unwrap();
    stream.write_all(&frame(0x89, b"ping!")).await.unwrap();
    stream.write_all(&frame(0x80, b"lo")).await.unwrap();
    assert_eq!(read_frame(&mut stream).await, (0x8a, b"ping!".to_vec()));
    assert_eq!(read_frame(&mut stream).await, (0x81, b"Hello".to_vec()));
    // A close is answered with the same code.
    stream.write_all(&frame(0x88, &1000u16.to_be_bytes())).await.unwrap();
    let (first, payload) = read_frame(&mut stream).await;
    assert_eq!((first, close_code(&payload)), (0x88, 1000));

    // Invalid UTF-8 in a text message: 1007.
    let mut stream = raw_stream(&connection).await;
    stream.write_all(&frame(0x81, &[0xce, 0xba, 0xff])).await.unwrap();
    let (first, payload) = read_frame(&mut stream).await;
    assert_eq!((first, close_code(&payload)), (0x88, 1007));

    // A control frame longer than 125 bytes: 1002.
    let mut stream = raw_stream(&connection).await;
    stream.write_all(&frame(0x89, &[0u8; 126])).await.unwrap();
    let (first, payload) = read_frame(&mut stream).await;
    assert_eq!((first, close_code(&payload)), (0x88, 1002));

    // An unmasked client frame: 1002.
    let mut stream = raw_stream(&connection).await;
    stream.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    let (first, payload) = read_frame(&mut stream).await;
    assert_eq!((first, close_code(&payload)), (0x88, 1002));

    // After all that, the connection itself is fine.
    let (mut ws, _) = connection.open(&ClientRequest::new(&addr, "/hyper"), Config::default()).await.unwrap();
    ws.send("ok").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("ok"));
}

#[tokio::test]
async fn unknown_protocols_and_versions_are_refused_on_either_path() {
    let addr = h2_echo_server().await;
    let connection = connection(&addr).await;
    let mut request = hyper::Request::connect("/hyper").body(Empty::<Bytes>::new()).unwrap();
    request.extensions_mut().insert(hyper::ext::Protocol::from_static("webtransport"));
    request.headers_mut().insert("sec-websocket-version", "13".parse().unwrap());
    assert_eq!(connection.request(request).await.unwrap().status(), 501, "an unknown :protocol");
    // Version 8 is refused with 426 and the version this side speaks, on either path.
    for path in ["/hyper", "/axum"] {
        let mut request = hyper::Request::connect(path).body(Empty::<Bytes>::new()).unwrap();
        request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        request.headers_mut().insert("sec-websocket-version", "8".parse().unwrap());
        let response = connection.request(request).await.unwrap();
        assert_eq!(response.status(), 426, "{path}");
        assert_eq!(response.headers()["sec-websocket-version"], "13", "{path}");
    }
}

/// Serves HTTP/2 on each connection of `listener` without enabling extended CONNECT, as most h2
/// servers and proxies do: every request gets 404.
async fn h2_without_websockets<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S) {
    let service = hyper::service::service_fn(|_request: hyper::Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(hyper::Response::builder().status(404).body(Empty::<Bytes>::new()).unwrap())
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[tokio::test]
async fn a_server_whose_http2_takes_no_websockets_is_told_at_once_not_after_the_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(h2_without_websockets(stream));
        }
    });
    let started = Instant::now();
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let config = Config::default().handshake_timeout(Duration::from_secs(10));
    let error = Http2Connection::handshake(tcp, addr.clone(), &config).await.unwrap_err();
    assert!(matches!(error, Error::Http2WebSocketsDisabled), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "told after {:?}", started.elapsed());
}

#[tokio::test]
async fn http2_true_falls_back_to_http1_when_the_servers_http2_takes_no_websockets() {
    let ca = test_ca::TestCa::generate(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "h2-fallback");
    // ALPN offers h2 and http/1.1: h2 connections get HTTP/2 without WebSockets, http/1.1 ones the
    // WebSocket upgrade and an echo.
    let acceptor = switchboard_ws::tls::acceptor_h2(&ca.cert_file, &ca.key_file).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (h2_connections, http1_connections) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counts = (h2_connections.clone(), http1_connections.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (acceptor, counts) = (acceptor.clone(), counts.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                if switchboard_ws::tls::is_http2(&stream) {
                    counts.0.fetch_add(1, Ordering::SeqCst);
                    h2_without_websockets(stream).await;
                } else {
                    counts.1.fetch_add(1, Ordering::SeqCst);
                    if let Ok(ws) = switchboard_ws::accept(stream, Config::default()).await {
                        echo(ws).await;
                    }
                }
            });
        }
    });
    let started = Instant::now();
    let (mut ws, _) = ClientBuilder::new(format!("wss://localhost:{port}/"))
        .tls_ca_file(&ca.ca_file)
        .http2(true)
        .connect()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "connected after {:?}", started.elapsed());
    assert!(!ws.get_ref().is_http2(), "the WebSocket went over HTTP/1.1");
    ws.send("over HTTP/1.1").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("over HTTP/1.1"));
    assert_eq!((h2_connections.load(Ordering::SeqCst), http1_connections.load(Ordering::SeqCst)), (1, 1));
    // Asked for an HTTP/2 connection outright, it says why it cannot have one.
    let error = ClientBuilder::new(format!("wss://localhost:{port}/"))
        .tls_ca_file(&ca.ca_file)
        .connect_http2()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Http2WebSocketsDisabled), "{error:?}");
}
