//! WebSockets over HTTP/2 (RFC 8441) with the real `switchboard` binary on a TLS port: several
//! WebSockets and plain requests on one connection, the same negotiation and limits as over
//! HTTP/1.1, an unknown `:protocol` refused, SIGTERM's 1001 before the GOAWAY, and the echo server.

mod support;

#[path = "../../ws/tests/support/test_ca.rs"]
mod test_ca;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::json;
use support::chat::{next_close, next_of, send, Ws};
use support::{start_echo, start_serve, Server};
use switchboard_ws::http2::Http2Connection;
use switchboard_ws::{ClientBuilder, Message};

fn ca(name: &str) -> test_ca::TestCa {
    test_ca::TestCa::generate(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), name)
}

fn serve_tls(ca: &test_ca::TestCa, extra: &[&str]) -> Server {
    let mut args = vec!["--tls-cert", ca.cert_file.to_str().unwrap(), "--tls-key", ca.key_file.to_str().unwrap()];
    args.extend_from_slice(extra);
    start_serve(&args).0
}

fn wss(server: &Server, path: &str) -> String {
    let port = server.addr.rsplit(':').next().unwrap();
    format!("wss://localhost:{port}{path}")
}

fn chat_client(server: &Server, ca: &test_ca::TestCa) -> ClientBuilder {
    ClientBuilder::new(wss(server, "/ws")).tls_ca_file(&ca.ca_file).protocol("switchboard.v1").no_proxy()
}

async fn open(connection: &Http2Connection, builder: &ClientBuilder) -> Ws {
    let (ws, accepted) = builder.open_on(connection).await.expect("a WebSocket on the HTTP/2 connection");
    assert_eq!(accepted.head.status, 200, "RFC 8441 answers 200, not 101");
    assert_eq!(ws.protocol(), Some("switchboard.v1"));
    assert!(ws.get_ref().is_http2());
    ws
}

async fn get(connection: &Http2Connection, path: &str) -> (u16, String) {
    let request = axum::http::Request::get(path).body(Empty::<Bytes>::new()).unwrap();
    let response = connection.request(request).await.unwrap();
    assert_eq!(response.version(), axum::http::Version::HTTP_2);
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn two_websockets_and_a_request_share_one_http2_connection() {
    let ca = ca("h2-serve");
    let server = serve_tls(&ca, &["--api-key", "h2-api-key"]);
    let builder = chat_client(&server, &ca);
    let connection = builder.connect_http2().await.expect("the server takes h2 and extended CONNECT");
    let mut ann = open(&connection, &builder).await;
    let mut bob = open(&connection, &builder).await;
    assert_eq!(get(&connection, "/healthz").await, (200, "ok\n".to_owned()));

    send(&mut ann, json!({"type": "join", "room": "lobby", "name": "Ann"})).await;
    next_of(&mut ann, "joined").await;
    send(&mut bob, json!({"type": "join", "room": "lobby", "name": "Bob"})).await;
    next_of(&mut bob, "joined").await;
    // A message larger than a frame of HTTP/2 and than the compression threshold.
    let long = "x".repeat(3000);
    send(&mut ann, json!({"type": "publish", "room": "lobby", "message": long, "id": "h2-1"})).await;
    let got = next_of(&mut bob, "message").await;
    assert_eq!((got["message"].as_str(), got["name"].as_str()), (Some(long.as_str()), Some("Ann")));

    let (_, metrics) = get(&connection, "/metrics").await;
    assert_eq!(
        support::metrics::sample(&metrics, r#"switchboard_websocket_handshakes_total{http="2"}"#),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        support::metrics::sample(&metrics, r#"switchboard_websocket_handshakes_total{http="1.1"}"#),
        Some(0.0),
        "{metrics}"
    );

    // Server-Sent Events on a stream of the same connection: the history, as events.
    let sse = axum::http::Request::get("/sse?room=lobby&cursor=").body(Empty::<Bytes>::new()).unwrap();
    let mut events = connection.request(sse).await.unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    while !seen.contains("h2-1") {
        let frame = tokio::time::timeout(Duration::from_secs(5), events.frame()).await.unwrap().unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(frame.data_ref().unwrap()));
    }
    assert!(seen.contains("event: message"), "{seen}");
    let info = axum::http::Request::get("/api/info")
        .header("authorization", "Bearer h2-api-key")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let info = connection.request(info).await.unwrap();
    assert_eq!(info.status(), 200);
    let info: serde_json::Value =
        serde_json::from_slice(&info.into_body().collect().await.unwrap().to_bytes()).unwrap();
    // Two WebSockets and the SSE stream; in the connection count, the HTTP/2 connection and a place
    // for each of the three.
    assert_eq!((info["sessions"].as_u64(), info["connections"].as_u64()), (Some(3), Some(4)), "{info}");
    // The header list is bounded as an HTTP/1.1 head is (--max-request-head-bytes, 8 KiB).
    let big = axum::http::Request::get("/healthz")
        .header("x-padding", "p".repeat(10_000))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(connection.request(big).await.unwrap().status(), 431);
    assert_eq!(get(&connection, "/healthz").await.0, 200, "the connection survives a refused header list");

    // The same server still takes the HTTP/1.1 upgrade on the same port.
    let (mut old, accepted) = chat_client(&server, &ca).connect().await.unwrap();
    assert_eq!(accepted.head.status, 101);
    assert!(!old.get_ref().is_http2());
    send(&mut old, json!({"type": "join", "room": "lobby", "name": "Cy"})).await;
    next_of(&mut old, "joined").await;
}

#[tokio::test]
async fn http2_negotiates_compression_and_checks_origin_and_token_as_http1_does() {
    let ca = ca("h2-checks");
    let server = serve_tls(&ca, &["--jwt-secret", "h2-test-secret", "--allowed-origins", "https://good.example"]);
    let connection = chat_client(&server, &ca).connect_http2().await.unwrap();

    let bad_origin = chat_client(&server, &ca).header("Origin", "https://evil.example");
    match bad_origin.open_on(&connection).await {
        Err(switchboard_ws::Error::Response { error, body }) => {
            assert!(error.to_string().contains("403"), "{error}");
            assert!(body.contains("origin"), "{body}");
        }
        other => panic!("expected a 403, got {:?}", other.map(|(_, a)| a.head.status)),
    }
    let bad_token =
        chat_client(&server, &ca).header("Origin", "https://good.example").header("Authorization", "Bearer nope");
    match bad_token.open_on(&connection).await {
        Err(switchboard_ws::Error::Response { error, .. }) => assert!(error.to_string().contains("401"), "{error}"),
        other => panic!("expected a 401, got {:?}", other.map(|(_, a)| a.head.status)),
    }

    // permessage-deflate is offered by the client's config and agreed on the stream.
    let compressed = chat_client(&server, &ca)
        .header("Origin", "https://good.example")
        .config(switchboard_ws::Config::default().compression(Default::default()));
    let (mut ws, accepted) = compressed.open_on(&connection).await.unwrap();
    assert!(accepted.extensions.as_deref().is_some_and(|e| e.starts_with("permessage-deflate")), "{accepted:?}");
    // No token on a server with a key: the first message must be the token, as over HTTP/1.1.
    send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
    assert_eq!(next_close(&mut ws).await.map(|(code, _)| code), Some(4001));

    // An extended CONNECT for a protocol the server does not speak: 501.
    let mut other = axum::http::Request::connect("/ws").body(Empty::<Bytes>::new()).unwrap();
    other.extensions_mut().insert(hyper::ext::Protocol::from_static("not-websocket"));
    other.headers_mut().insert("sec-websocket-version", "13".parse().unwrap());
    let response = connection.request(other).await.unwrap();
    assert_eq!(response.status(), 501);
}

#[tokio::test]
async fn each_websocket_on_an_http2_connection_counts_against_the_per_address_limit() {
    let ca = ca("h2-limit");
    // The connection takes one place, each WebSocket on it one more.
    let server = serve_tls(&ca, &["--max-connections-per-ip", "3"]);
    let builder = chat_client(&server, &ca);
    let connection = builder.connect_http2().await.unwrap();
    let first = open(&connection, &builder).await;
    let _second = open(&connection, &builder).await;
    match builder.open_on(&connection).await {
        Err(switchboard_ws::Error::Response { error, .. }) => assert!(error.to_string().contains("429"), "{error}"),
        other => panic!("expected a 429, got {:?}", other.map(|(_, a)| a.head.status)),
    }
    // A session that ends gives its place back.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match builder.open_on(&connection).await {
            Ok(_) => break,
            Err(error) if tokio::time::Instant::now() < deadline => {
                assert!(error.to_string().contains("429"), "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the place was not given back: {error}"),
        }
    }
}

#[tokio::test]
async fn the_per_user_limit_counts_sessions_on_one_http2_connection_and_on_any_transport() {
    let ca = ca("h2-user");
    let secret = "h2-user-secret";
    let server = serve_tls(&ca, &["--jwt-secret", secret, "--max-connections-per-user", "2"]);
    let token = support::chat::token(secret, "ann", 600);
    let ann = chat_client(&server, &ca).header("Authorization", format!("Bearer {token}"));
    // One TCP connection, two of ann's sessions on it: the limit counts the sessions.
    let connection = ann.connect_http2().await.unwrap();
    let first = open(&connection, &ann).await;
    let _second = open(&connection, &ann).await;
    match ann.open_on(&connection).await {
        Err(switchboard_ws::Error::Response { error, body }) => {
            assert!(error.to_string().contains("429"), "{error}");
            assert!(body.contains("\"ann\""), "{body}");
        }
        other => panic!("expected a 429, got {:?}", other.map(|(_, a)| a.head.status)),
    }
    // Over SSE on the same connection, the same count.
    let (status, body) = get(&connection, &format!("/sse?room=lobby&token={token}")).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many"), "{body}");
    // A token in the first message is counted as it arrives: the session ends with 1008.
    let (mut late, _) = chat_client(&server, &ca).open_on(&connection).await.unwrap();
    send(&mut late, json!({"type": "auth", "token": token})).await;
    assert_eq!(next_close(&mut late).await.map(|(code, _)| code), Some(1008));
    // Another user is not held back, and a session that ends gives ann's place back.
    let bob = chat_client(&server, &ca)
        .header("Authorization", format!("Bearer {}", support::chat::token(secret, "bob", 600)));
    let _bob = open(&connection, &bob).await;
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Err(error) = ann.open_on(&connection).await {
        assert!(tokio::time::Instant::now() < deadline, "ann's place was not given back: {error}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = get(&connection, "/metrics").await;
    assert!(
        support::metrics::sample(&metrics, r#"switchboard_connections_refused_total{reason="limit"}"#).unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn sigterm_closes_http2_websockets_with_1001_then_ends_the_connection() {
    let ca = ca("h2-sigterm");
    let server = serve_tls(&ca, &["--shutdown-grace-secs", "2"]);
    let builder = chat_client(&server, &ca);
    let connection = builder.connect_http2().await.unwrap();
    let mut ws = open(&connection, &builder).await;
    send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
    next_of(&mut ws, "joined").await;
    server.signal("TERM");
    let (code, _) = next_close(&mut ws).await.expect("a close frame, on the stream, before the connection ends");
    assert_eq!(code, 1001);
    // Then the GOAWAY: the connection takes no new requests.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let request = axum::http::Request::get("/healthz").body(Empty::<Bytes>::new()).unwrap();
        if connection.request(request).await.is_err() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the HTTP/2 connection still takes requests");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_echo_server_echoes_over_http2_and_http2_true_picks_it() {
    let ca = ca("h2-echo");
    let server =
        start_echo(&["--tls-cert", ca.cert_file.to_str().unwrap(), "--tls-key", ca.key_file.to_str().unwrap()]);
    let (mut ws, accepted) =
        ClientBuilder::new(wss(&server, "/")).tls_ca_file(&ca.ca_file).no_proxy().http2(true).connect().await.unwrap();
    assert_eq!(accepted.head.status, 200);
    assert!(ws.get_ref().is_http2());
    for size in [0, 20, 70_000] {
        let text = "é".repeat(size);
        ws.send(text.clone()).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(text));
    }
    ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::binary(vec![7u8; 100_000]));
    ws.close(1000u16, "done").await.unwrap();
    // Its header lists are bounded as its HTTP/1.1 heads are (--max-request-head-bytes, 8 KiB).
    let builder = ClientBuilder::new(wss(&server, "/")).tls_ca_file(&ca.ca_file).no_proxy();
    let connection = builder.connect_http2().await.unwrap();
    let big =
        axum::http::Request::get("/").header("x-padding", "p".repeat(10_000)).body(Empty::<Bytes>::new()).unwrap();
    assert_eq!(connection.request(big).await.unwrap().status(), 431);
    // Without http2(true), the same server is spoken to over HTTP/1.1.
    let (ws, accepted) =
        ClientBuilder::new(wss(&server, "/")).tls_ca_file(&ca.ca_file).no_proxy().connect().await.unwrap();
    assert_eq!(accepted.head.status, 101);
    assert!(!ws.get_ref().is_http2());
}

#[tokio::test]
async fn http2_needs_tls_and_a_server_that_offers_it() {
    let (server, _db) = start_serve(&[]);
    let plain = ClientBuilder::new(format!("ws://{}/ws", server.addr)).no_proxy();
    let error = plain.connect_http2().await.unwrap_err();
    assert!(error.to_string().contains("wss://"), "{error}");
    // http2(true) on ws:// is ignored: the HTTP/1.1 upgrade.
    let (ws, _) =
        ClientBuilder::new(format!("ws://{}/ws", server.addr)).no_proxy().http2(true).connect().await.unwrap();
    assert!(!ws.get_ref().is_http2());
}

#[tokio::test]
async fn a_websocket_stream_that_stops_taking_data_ends_its_connection_once_its_session_is_over() {
    // hyper's task for an upgraded HTTP/2 stream waits for window that never comes, and nothing
    // resets the stream: it outlived its session with its buffers, for as long as the client kept
    // the connection. The connection is now ended, which frees it (and ends its other streams).
    let ca = ca("h2-stuck");
    let server = serve_tls(&ca, &["--keepalive-secs", "1", "--send-timeout-secs", "2"]);
    let builder = chat_client(&server, &ca);
    let connection = builder.connect_http2().await.unwrap();
    let mut stalled = open(&connection, &builder).await;
    let mut bystander = open(&connection, &builder).await;
    let long = "x".repeat(4000);
    for i in 0..300 {
        send(&mut stalled, json!({"type": "publish", "room": "big", "message": long, "id": format!("m{i}")})).await;
    }
    // Answers of up to 1 MiB each, more than the client's window for the stream (2 MiB), which it
    // never opens again: `stalled` is not read from here on.
    for _ in 0..4 {
        send(&mut stalled, json!({"type": "history", "room": "big"})).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match bystander.recv().await {
                Some(Ok(Message::Close(frame))) => return Some(frame),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await;
    let close = ended.expect("the connection of the stuck stream was ended");
    assert_eq!(close, None, "the connection ended under it, not its own session");
    drop(stalled);
}
