//! `serve` behind Debian's HAProxy, started here with short timeouts: a quiet WebSocket outlives
//! `timeout tunnel` because the server pings, and is dropped without keepalive; HTTP/1.1 and HTTP/2
//! (`ws h2`) to the backend; client addresses from `X-Forwarded-For` of a trusted proxy and from
//! the PROXY protocol (`send-proxy-v2`), so the per-address limit counts each client behind one
//! proxy, and a spoofed header from an untrusted peer changes nothing.
//!
//! The clients bind 127.0.0.2 and 127.0.0.3 (all of 127/8 is loopback on Linux), so that two
//! clients behind one proxy have two addresses.

mod support;

#[path = "../../ws/tests/support/test_ca.rs"]
mod test_ca;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::chat::{next_of, send, Ws};
use support::{free_port, start_serve, wait_listening};
use switchboard_ws::{ClientBuilder, Config, Message, WsUrl};
use tokio::net::TcpSocket;

/// Whether `haproxy` can be run here. Without it these tests are skipped, except in CI, where
/// `.ci/run` installs it.
fn haproxy_available() -> bool {
    let found = Command::new("haproxy").arg("-v").stdout(Stdio::null()).status().is_ok();
    if !found {
        assert!(std::env::var_os("CI").is_none(), "haproxy is not installed (.ci/run installs it)");
        eprintln!("skipped: haproxy is not installed (apt-get install haproxy)");
    }
    found
}

/// A running HAProxy; stopped on drop.
struct Haproxy {
    child: Child,
    port: u16,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy in HTTP mode on a free port, in front of `backend`, with `server_options` on its server
/// line (`ssl verify none alpn h2 ws h2`, `send-proxy-v2`...) and a 3 s `timeout tunnel`.
fn start_haproxy(backend: &str, server_options: &str) -> Haproxy {
    // A port picked ahead can be bound by another test's server (port 0) before HAProxy binds it;
    // HAProxy then exits, and this test's clients would reach that server. Tried again elsewhere.
    for _ in 0..5 {
        let mut proxy = try_start_haproxy(backend, server_options);
        std::thread::sleep(std::time::Duration::from_millis(200));
        if proxy.child.try_wait().unwrap().is_none() {
            return proxy;
        }
    }
    panic!("haproxy did not stay up on five ports");
}

fn try_start_haproxy(backend: &str, server_options: &str) -> Haproxy {
    let port = free_port();
    let dir = support::temp_dir("haproxy");
    let config = format!(
        "global\n  maxconn 256\n\
         defaults\n  mode http\n  option forwardfor\n  timeout connect 2s\n  timeout client 3s\n  \
         timeout server 3s\n  timeout tunnel 3s\n\
         frontend in\n  bind 127.0.0.1:{port}\n  default_backend chat\n\
         backend chat\n  server switchboard {backend} {server_options}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start haproxy");
    wait_listening(&format!("127.0.0.1:{port}"));
    Haproxy { child, port }
}

/// A chat WebSocket to `addr` from the local address `from`; the handshake's status when refused.
async fn chat_from(from: &str, addr: &str, headers: &[(&str, &str)]) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0)).unwrap();
    let stream = socket.connect(addr.parse().unwrap()).await.map_err(|e| e.to_string())?;
    let url = format!("ws://{addr}/ws");
    let mut builder = ClientBuilder::new(url.clone()).protocol("switchboard.v1");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.request(&WsUrl::parse(&url).unwrap());
    let stream = switchboard_ws::ClientStream::Plain(stream);
    match switchboard_ws::client_handshake(stream, request, Config::default()).await {
        Ok((ws, _)) => Ok(ws),
        Err(error) => Err(error.to_string()),
    }
}

async fn joined(mut ws: Ws, name: &str) -> Ws {
    send(&mut ws, json!({"type": "join", "room": "lobby", "name": name})).await;
    next_of(&mut ws, "joined").await;
    ws
}

/// Reads for `how_long`, answering pings; false if the connection ended meanwhile.
async fn stays_open(ws: &mut Ws, how_long: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + how_long;
    loop {
        match tokio::time::timeout_at(deadline, ws.recv()).await {
            Err(_) => return true,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_)))) => {}
            Ok(_) => return false,
        }
    }
}

#[tokio::test]
async fn behind_haproxy_keepalive_outlives_timeout_tunnel_and_without_it_the_connection_drops() {
    if !haproxy_available() {
        return;
    }
    let (pinging, _db) = start_serve(&["--keepalive-secs", "1"]);
    let proxy = start_haproxy(&pinging.addr, "");
    let through = format!("127.0.0.1:{}", proxy.port);
    let mut ws = joined(chat_from("127.0.0.1", &through, &[]).await.unwrap(), "Quiet").await;
    assert!(stays_open(&mut ws, Duration::from_secs(7)).await, "pings keep the tunnel open past its 3 s timeout");
    send(&mut ws, json!({"type": "publish", "room": "lobby", "message": "still here", "id": "k1"})).await;
    next_of(&mut ws, "ack").await;

    let (silent, _db) = start_serve(&["--keepalive-secs", "0"]);
    let proxy = start_haproxy(&silent.addr, "");
    let through = format!("127.0.0.1:{}", proxy.port);
    let mut ws = joined(chat_from("127.0.0.1", &through, &[]).await.unwrap(), "Quiet").await;
    let started = Instant::now();
    assert!(!stays_open(&mut ws, Duration::from_secs(8)).await, "without keepalive HAProxy drops the idle tunnel");
    let after = started.elapsed();
    assert!(after >= Duration::from_secs(2), "dropped by the 3 s tunnel timeout, not at once: {after:?}");
}

#[tokio::test]
async fn behind_haproxy_speaking_http2_to_the_backend_the_websocket_is_an_http2_stream() {
    if !haproxy_available() {
        return;
    }
    let ca = test_ca::TestCa::generate(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "haproxy-h2");
    let tls = ["--tls-cert", ca.cert_file.to_str().unwrap(), "--tls-key", ca.key_file.to_str().unwrap()];
    let (server, _db) = start_serve(&[&tls[..], &["--keepalive-secs", "1"]].concat());
    let proxy = start_haproxy(&server.addr, "ssl verify none alpn h2 ws h2");
    let through = format!("127.0.0.1:{}", proxy.port);
    let mut ann = joined(chat_from("127.0.0.1", &through, &[]).await.unwrap(), "Ann").await;
    let mut bob = joined(chat_from("127.0.0.1", &through, &[]).await.unwrap(), "Bob").await;
    send(&mut ann, json!({"type": "publish", "room": "lobby", "message": "over h2", "id": "h1"})).await;
    assert_eq!(next_of(&mut bob, "message").await["message"], "over h2");
    assert!(stays_open(&mut bob, Duration::from_secs(5)).await, "pings cross HTTP/2 too");

    // The server saw two extended CONNECTs, not upgrades.
    let ws = ClientBuilder::new(format!("wss://localhost:{}/", server.addr.rsplit(':').next().unwrap()));
    let connection = ws.tls_ca_file(&ca.ca_file).no_proxy().connect_http2().await.unwrap();
    let request = axum::http::Request::get("/metrics").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let body = http_body_util::BodyExt::collect(connection.request(request).await.unwrap().into_body()).await.unwrap();
    let metrics = String::from_utf8(body.to_bytes().to_vec()).unwrap();
    assert!(metrics.contains(r#"switchboard_websocket_handshakes_total{http="2"} 2"#), "{metrics}");
    assert!(metrics.contains(r#"switchboard_websocket_handshakes_total{http="1.1"} 0"#), "{metrics}");
}

#[tokio::test]
async fn a_trusted_proxys_x_forwarded_for_names_each_client_and_an_untrusted_peers_is_ignored() {
    if !haproxy_available() {
        return;
    }
    let (server, _db) = start_serve(&["--trusted-proxies", "127.0.0.1", "--max-connections-per-ip", "1"]);
    let proxy = start_haproxy(&server.addr, "");
    let through = format!("127.0.0.1:{}", proxy.port);
    // Two clients behind the one proxy: one place each.
    let _two = joined(chat_from("127.0.0.2", &through, &[]).await.unwrap(), "Two").await;
    let _three = joined(chat_from("127.0.0.3", &through, &[]).await.unwrap(), "Three").await;
    let again = chat_from("127.0.0.2", &through, &[]).await.map(|_| ()).unwrap_err();
    assert!(again.contains("429"), "127.0.0.2's one place is taken: {again}");
    // A client's own X-Forwarded-For is to the left of what HAProxy adds: 127.0.0.3 is still 127.0.0.3.
    let spoofed = chat_from("127.0.0.3", &through, &[("X-Forwarded-For", "10.9.9.9")]).await.map(|_| ()).unwrap_err();
    assert!(spoofed.contains("429"), "{spoofed}");
    // Straight to the server from an untrusted peer, the header means nothing: 127.0.0.2 is full.
    let direct =
        chat_from("127.0.0.2", &server.addr, &[("X-Forwarded-For", "10.8.8.8")]).await.map(|_| ()).unwrap_err();
    assert!(direct.contains("429"), "{direct}");
    let fresh = chat_from("127.0.0.4", &server.addr, &[("X-Forwarded-For", "127.0.0.2")]).await;
    assert!(fresh.is_ok(), "a new address directly, whatever its header says: {:?}", fresh.err());
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_websocket_takes_one_place_in_the_total() {
    // Straight from the trusted peer, as a proxy's HTTP/1.1 connections come: one connection each.
    let (server, _db) =
        start_serve(&["--trusted-proxies", "127.0.0.1", "--max-connections", "3", "--max-connections-per-ip", "1"]);
    let mut clients = Vec::new();
    for client in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        let ws = chat_from("127.0.0.1", &server.addr, &[("X-Forwarded-For", client)]).await;
        let ws = ws.unwrap_or_else(|e| panic!("{client} has a place of the 3: {e}"));
        clients.push(joined(ws, client).await);
    }
    let full = chat_from("127.0.0.1", &server.addr, &[("X-Forwarded-For", "10.0.0.4")]).await.map(|_| ()).unwrap_err();
    assert!(full.contains("503"), "3 WebSockets are 3 places: {full}");
    // Per address it is still one each.
    drop(clients.pop());
    let again = chat_from("127.0.0.1", &server.addr, &[("X-Forwarded-For", "10.0.0.1")]).await;
    let again = tokio::time::timeout(Duration::from_secs(5), async {
        let mut again = again;
        // The freed place may take a moment to be given back after the close.
        for _ in 0..50 {
            match again {
                Err(e) if e.contains("503") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    again = chat_from("127.0.0.1", &server.addr, &[("X-Forwarded-For", "10.0.0.1")]).await;
                }
                other => return other.map(|_| ()),
            }
        }
        again.map(|_| ())
    })
    .await
    .unwrap();
    assert!(again.unwrap_err().contains("429"), "10.0.0.1 already has its one place");
}

#[tokio::test]
async fn with_the_proxy_protocol_the_limits_see_each_client_and_a_connection_without_it_is_closed() {
    if !haproxy_available() {
        return;
    }
    let (server, _db) = start_serve(&["--proxy-protocol", "true", "--max-connections-per-ip", "1"]);
    let proxy = start_haproxy(&server.addr, "send-proxy-v2");
    let through = format!("127.0.0.1:{}", proxy.port);
    let mut two = joined(chat_from("127.0.0.2", &through, &[]).await.unwrap(), "Two").await;
    let mut three = joined(chat_from("127.0.0.3", &through, &[]).await.unwrap(), "Three").await;
    let again = chat_from("127.0.0.2", &through, &[]).await.map(|_| ()).unwrap_err();
    assert!(again.contains("429"), "127.0.0.2's one place is taken: {again}");
    send(&mut two, json!({"type": "publish", "room": "lobby", "message": "via PROXY v2", "id": "p1"})).await;
    assert_eq!(next_of(&mut three, "message").await["message"], "via PROXY v2");
    // Without a PROXY header (straight to the server), nothing is served.
    let refused = chat_from("127.0.0.5", &server.addr, &[]).await.map(|_| ()).unwrap_err();
    assert!(!refused.contains("101"), "{refused}");
    // Read through the proxy: the server takes no request without a PROXY header.
    let series = r#"switchboard_connections_refused_total{reason="bad_handshake"}"#;
    let metrics = support::metrics::wait_for(&through, series, 1.0);
    assert_eq!(support::metrics::sample(&metrics, series), Some(1.0), "{metrics}");
}

/// With `--trusted-proxies` as well, a PROXY header is taken from those peers only: another peer's
/// connection is closed unanswered, whatever header it sends, and counted as a bad handshake.
#[tokio::test]
async fn a_proxy_header_from_a_peer_not_trusted_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, _db) = start_serve(&["--proxy-protocol", "true", "--trusted-proxies", "127.0.0.2/32"]);
    let ask = |from: &'static str, path: &'static str| {
        let addr = server.addr.clone();
        async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0)).unwrap();
            let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
            let request = format!(
                "PROXY TCP4 10.1.2.3 127.0.0.1 5000 80\r\nGET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer)).await;
            answer
        }
    };
    let series = r#"switchboard_connections_refused_total{reason="bad_handshake"}"#;
    let refused = |metrics: String| support::metrics::sample(&metrics, series).unwrap_or_else(|| panic!("{metrics}"));
    // (start_serve's wait for the port is one already: it connected from 127.0.0.1, sending nothing.)
    let before = refused(ask("127.0.0.2", "/metrics").await);
    assert_eq!(ask("127.0.0.4", "/healthz").await, "", "a peer not trusted is not served");
    assert_eq!(refused(ask("127.0.0.2", "/metrics").await), before + 1.0, "and its refusal is counted");
}
