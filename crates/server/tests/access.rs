//! Who may connect to `switchboard serve` and what they may do: tokens (HS256, RS256, ES256) from the
//! header, the query or the first message, expiry and refresh, room permissions, origins, and the
//! HTTP publish API. The real binary on loopback, with our client.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::chat::{next, next_close, next_of, quiet, send, v1_client, Ws};
use support::{start_serve, switchboard};
use switchboard::chat::access::{mint, mint_with_key, unix_now, Claims};
use switchboard_ws::proto::handshake::ResponseError;
use switchboard_ws::{ClientBuilder, Error};

const SECRET: &str = "test-secret";

fn claims(sub: &str, ttl_secs: u64, rooms: &[&str], join: &[&str]) -> Claims {
    let list = |l: &[&str]| (!l.is_empty()).then(|| l.iter().map(|s| s.to_string()).collect());
    Claims {
        sub: sub.into(),
        exp: unix_now() + ttl_secs,
        name: None,
        rooms: list(rooms),
        join: list(join),
        publish: None,
    }
}

fn token(sub: &str, rooms: &[&str], join: &[&str]) -> String {
    mint(SECRET.as_bytes(), &claims(sub, 600, rooms, join)).unwrap()
}

async fn v1_with(addr: &str, header: Option<&str>, query: &str) -> Result<Ws, Error> {
    let mut builder = ClientBuilder::new(format!("ws://{addr}/ws{query}")).protocol("switchboard.v1");
    if let Some(token) = header {
        builder = builder.header("Authorization", format!("Bearer {token}"));
    }
    builder.connect().await.map(|(ws, _)| ws)
}

fn refused_status(result: Result<Ws, Error>) -> u16 {
    match result {
        Err(Error::Response { error: ResponseError::Status { status, .. }, .. }) => status,
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a WebSocket"),
    }
}

#[tokio::test]
async fn tokens_from_header_query_or_first_message_and_their_room_grants() {
    let (server, _) = start_serve(&["--jwt-secret", SECRET]);
    let addr = &server.addr;

    // A bad token in the handshake is refused before the upgrade, with the reason.
    let forged = mint(b"wrong", &claims("mallory", 600, &[], &[])).unwrap();
    assert_eq!(refused_status(v1_with(addr, Some(&forged), "").await), 401);
    let expired = mint(SECRET.as_bytes(), &claims("old", 0, &[], &[])).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(refused_status(v1_with(addr, None, &format!("?token={expired}")).await), 401);

    // Header token: rooms grants join and publish, join grants reading only; the name is the token's.
    let mut alice = v1_with(addr, Some(&token("alice", &["lobby"], &["news"])), "").await.unwrap();
    send(&mut alice, json!({"type": "join", "room": "lobby", "name": "not-alice"})).await;
    let joined = next_of(&mut alice, "joined").await;
    assert_eq!(joined["members"][0]["name"], "alice", "{joined}");
    send(&mut alice, json!({"type": "join", "room": "secret", "req": 1})).await;
    let refused = next_of(&mut alice, "error").await;
    assert_eq!((refused["code"].as_str(), refused["req"].as_u64()), (Some("not_allowed"), Some(1)), "{refused}");
    send(&mut alice, json!({"type": "join", "room": "news"})).await;
    next_of(&mut alice, "joined").await;
    send(&mut alice, json!({"type": "publish", "room": "news", "message": "hi", "req": 2})).await;
    assert_eq!(next_of(&mut alice, "error").await["code"], "not_allowed");
    send(&mut alice, json!({"type": "history", "room": "secret", "req": 3})).await;
    assert_eq!(next_of(&mut alice, "error").await["code"], "not_allowed");

    // Query token, a different user; a message from alice reaches bob stamped with alice's name.
    let mut bob = v1_with(addr, None, &format!("?room=x&token={}", token("bob", &["lobby"], &[]))).await.unwrap();
    send(&mut bob, json!({"type": "join", "room": "lobby"})).await;
    next_of(&mut bob, "joined").await;
    send(&mut alice, json!({"type": "publish", "room": "lobby", "message": "hello", "name": "someone else"})).await;
    let got = next_of(&mut bob, "message").await;
    assert_eq!((got["name"].as_str(), got["message"].as_str()), (Some("alice"), Some("hello")));

    // No token at the handshake: the first message must be one.
    let mut carol = v1_client(addr).await;
    send(&mut carol, json!({"type": "auth", "token": token("carol", &[], &[]), "req": "a"})).await;
    let authed = next(&mut carol).await;
    assert_eq!((authed["type"].as_str(), authed["sub"].as_str()), (Some("authed"), Some("carol")), "{authed}");
    send(&mut carol, json!({"type": "join", "room": "anything"})).await;
    next_of(&mut carol, "joined").await;

    // Anything else first ends the connection with 4001, and so does a bad first token.
    let mut dave = v1_client(addr).await;
    send(&mut dave, json!({"type": "join", "room": "lobby"})).await;
    let (code, reason) = next_close(&mut dave).await.unwrap();
    assert_eq!(code, 4001);
    assert!(reason.contains("authentication required"), "{reason}");
    let mut eve = v1_client(addr).await;
    send(&mut eve, json!({"type": "auth", "token": forged})).await;
    assert_eq!(next_close(&mut eve).await.map(|c| c.0), Some(4001));

    // Seed clients: the token's name replaces whatever the page sends.
    let (mut seed, _) =
        switchboard_ws::connect(&format!("ws://{addr}/ws?token={}", token("sam", &["lobby"], &[]))).await.unwrap();
    send(&mut seed, json!({"name": "typed name", "message": "from the seed page"})).await;
    assert_eq!(next(&mut seed).await["name"], "sam");
    let (mut outsider, _) =
        switchboard_ws::connect(&format!("ws://{addr}/ws?token={}", token("olga", &["elsewhere"], &[]))).await.unwrap();
    assert_eq!(next_close(&mut outsider).await.map(|c| c.0), Some(4003), "no grant for the default room");
    // The same refusal when the token comes as the first message.
    let (mut late, _) = switchboard_ws::connect(&format!("ws://{addr}/ws")).await.unwrap();
    send(&mut late, json!({"token": token("olga", &["elsewhere"], &[])})).await;
    assert_eq!(next_close(&mut late).await.map(|c| c.0), Some(4003));
}

#[tokio::test]
async fn silence_without_a_token_is_dropped_after_the_handshake_timeout() {
    let (server, _) = start_serve(&["--jwt-secret", SECRET, "--handshake-timeout-secs", "1"]);
    let mut quiet_client = v1_client(&server.addr).await;
    let started = Instant::now();
    let (code, reason) = next_close(&mut quiet_client).await.unwrap();
    assert_eq!(code, 4001);
    assert!(reason.contains("no token arrived in time"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_expiring_token_ends_the_session_unless_refreshed() {
    let (server, _) = start_serve(&["--jwt-secret", SECRET]);
    let short = |sub: &str| mint(SECRET.as_bytes(), &claims(sub, 2, &["lobby", "team-*"], &[])).unwrap();
    let mut lapsing = v1_with(&server.addr, Some(&short("ann")), "").await.unwrap();
    let mut renewing = v1_with(&server.addr, Some(&short("ben")), "").await.unwrap();
    for ws in [&mut lapsing, &mut renewing] {
        send(ws, json!({"type": "join", "room": "team-a"})).await;
        next_of(ws, "joined").await;
    }
    // Ben refreshes with a token for the same subject that no longer grants team-a: he leaves it.
    let fresh = mint(SECRET.as_bytes(), &claims("ben", 60, &["lobby"], &[])).unwrap();
    send(&mut renewing, json!({"type": "auth", "token": fresh, "req": 9})).await;
    assert_eq!(next_of(&mut renewing, "authed").await["req"], 9);
    let left = next_of(&mut renewing, "left").await;
    assert_eq!((left["room"].as_str(), left["reason"].as_str()), (Some("team-a"), Some("not_allowed")));
    // A token for someone else is refused, and the session keeps the one it has.
    let other = mint(SECRET.as_bytes(), &claims("eve", 60, &[], &[])).unwrap();
    send(&mut renewing, json!({"type": "auth", "token": other})).await;
    assert_eq!(next_of(&mut renewing, "error").await["code"], "bad_token");

    let started = Instant::now();
    let (code, reason) = next_close(&mut lapsing).await.unwrap();
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    assert!(started.elapsed() < Duration::from_secs(4));
    // Ben's session outlives the first token.
    send(&mut renewing, json!({"type": "join", "room": "lobby", "req": "still here"})).await;
    assert_eq!(next_of(&mut renewing, "joined").await["req"], "still here");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_with_a_public_key_file() {
    for alg in ["rs256", "es256"] {
        let public = fixture(&format!("{alg}-public.pem"));
        let (server, _) = start_serve(&["--jwt-public-key", public.to_str().unwrap()]);
        let private = std::fs::read(fixture(&format!("{alg}-private.pem"))).unwrap();
        let good = mint_with_key(&private, &claims("kim", 600, &[], &[])).unwrap();
        let header: Value = {
            use base64::Engine as _;
            let head = good.split('.').next().unwrap();
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head).unwrap()).unwrap()
        };
        assert_eq!(header["alg"].as_str().unwrap(), alg.to_uppercase());
        let mut ws = v1_with(&server.addr, Some(&good), "").await.unwrap();
        send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
        next_of(&mut ws, "joined").await;
        // An HS256 token signed with the public key's bytes (the classic confusion attack) is refused.
        let pem = std::fs::read(&public).unwrap();
        let confused = mint(&pem, &claims("kim", 600, &[], &[])).unwrap();
        assert_eq!(refused_status(v1_with(&server.addr, Some(&confused), "").await), 401, "{alg}");
    }
}

#[tokio::test]
async fn switchboard_token_mints_what_serve_accepts() {
    let (server, _) = start_serve(&["--jwt-secret", SECRET]);
    let output = switchboard()
        .args(["token", "--sub", "alice", "--room", "lobby", "--secret", SECRET, "--ttl-secs", "60"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let mut ws = v1_with(&server.addr, Some(&token), "").await.unwrap();
    send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
    assert_eq!(next_of(&mut ws, "joined").await["members"][0]["name"], "alice");
    send(&mut ws, json!({"type": "join", "room": "other"})).await;
    assert_eq!(next_of(&mut ws, "error").await["code"], "not_allowed", "--room limits the token to lobby");
    // Without a token, a server with a secret does not let anonymous clients chat.
    let (mut seed, _) = switchboard_ws::connect(&format!("ws://{}/ws", server.addr)).await.unwrap();
    send(&mut seed, json!({"name": "anon", "message": "hi"})).await;
    assert_eq!(next_close(&mut seed).await.map(|c| c.0), Some(4001));
}

/// The status line of a raw HTTP exchange.
fn raw_status(addr: &str, request: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

fn upgrade_request(origin: Option<&str>) -> String {
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
    )
}

#[test]
fn cross_site_handshakes_get_403_before_any_upgrade() {
    let (server, _) = start_serve(&["--allowed-origins", "https://chat.example.com,https://*.example.org"]);
    let status = |origin| raw_status(&server.addr, &upgrade_request(origin));
    assert_eq!(status(Some("https://chat.example.com")), 101);
    assert_eq!(status(Some("https://eu.example.org")), 101);
    assert_eq!(status(None), 101, "no Origin: not a browser");
    assert_eq!(status(Some("https://evil.example.net")), 403);
    assert_eq!(status(Some("https://example.org")), 403);
    assert_eq!(status(Some("http://chat.example.com")), 403);
    assert_eq!(status(Some("null")), 403);
    // Without a list every origin may connect.
    let (open, _) = start_serve(&[]);
    assert_eq!(raw_status(&open.addr, &upgrade_request(Some("https://evil.example.net"))), 101);
}

fn post(addr: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    support::http_json(addr, "POST", "/api/publish", key, Some(body))
}

#[tokio::test]
async fn the_publish_api_needs_its_key_and_delivers_like_a_client() {
    let (off, _) = start_serve(&[]);
    assert_eq!(post(&off.addr, Some("x"), r#"{"room":"lobby","message":"m"}"#).0, 404, "off without --api-key");
    // A server without a token key ignores tokens: everyone is anonymous there.
    let mut anyone = v1_with(&off.addr, Some("not-even-a-jwt"), "").await.unwrap();
    send(&mut anyone, json!({"type": "join", "room": "lobby"})).await;
    next_of(&mut anyone, "joined").await;

    let (server, _) = start_serve(&["--api-key", "k3y", "--max-message-chars", "10"]);
    let mut listener = v1_client(&server.addr).await;
    send(&mut listener, json!({"type": "join", "room": "alerts"})).await;
    next_of(&mut listener, "joined").await;

    let body = r#"{"rooms":["alerts","audit"],"message":"deploy","name":"ci","id":"run-1"}"#;
    assert_eq!(post(&server.addr, None, body).0, 401);
    assert_eq!(post(&server.addr, Some("wrong"), body).0, 401);
    let (status, reply) = post(&server.addr, Some("k3y"), body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["acks"][0], json!({"room": "alerts", "offset": 1, "id": "run-1", "duplicate": false}));
    assert_eq!(reply["acks"][1]["room"], "audit");
    let got = next_of(&mut listener, "message").await;
    assert_eq!((got["name"].as_str(), got["message"].as_str()), (Some("ci"), Some("deploy")));
    // The same id again is acknowledged as a duplicate and delivered to no one.
    let (status, again) = post(&server.addr, Some("k3y"), body);
    assert_eq!((status, again["acks"][0]["duplicate"].as_bool()), (200, Some(true)));
    quiet(&mut listener, 300).await;

    assert_eq!(post(&server.addr, Some("k3y"), "{oops").0, 400);
    let (status, bad) = post(&server.addr, Some("k3y"), r#"{"room":"bad room","message":"m"}"#);
    assert_eq!((status, bad["code"].as_str()), (400, Some("bad_request")));
    let (status, long) = post(&server.addr, Some("k3y"), r#"{"room":"alerts","message":"far too long for ten"}"#);
    assert_eq!((status, long["code"].as_str()), (400, Some("too_long")));
}
