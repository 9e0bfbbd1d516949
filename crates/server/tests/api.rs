//! The server API against the real server: rooms, presence, paged history and its removal, the
//! per-user commands seen from the users' own WebSockets, and errors that are JSON and name the
//! problem. (In cluster mode, the commands crossing nodes: `cluster.rs`.)

mod support;

use serde_json::{json, Value};
use support::chat::{ack_and_message, next_close, next_of, quiet, send, v1_client};
use support::{http_json, start_serve};

const KEY: &str = "api-k3y";
const SECRET: &str = "api-test-secret";

fn get(addr: &str, path: &str) -> (u16, Value) {
    http_json(addr, "GET", path, Some(KEY), None)
}

fn post(addr: &str, path: &str, body: Value) -> (u16, Value) {
    http_json(addr, "POST", path, Some(KEY), Some(&body.to_string()))
}

async fn signed_in(addr: &str, sub: &str) -> support::chat::Ws {
    support::chat::signed_in(addr, &support::chat::token(SECRET, sub, 600)).await
}

fn offsets(page: &Value) -> Vec<u64> {
    page["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn rooms_presence_and_history_pages_then_the_history_removed() {
    let (server, _db) = start_serve(&["--api-key", KEY]);
    let addr = &server.addr;
    let mut ann = v1_client(addr).await;
    send(&mut ann, json!({"type": "join", "room": "lobby", "name": "Ann"})).await;
    let epoch = next_of(&mut ann, "joined").await["epoch"].as_str().unwrap().to_owned();
    for i in 1..=5 {
        let (status, ack) = post(addr, "/api/publish", json!({"room": "lobby", "message": format!("m{i}")}));
        assert_eq!((status, ack["acks"][0]["offset"].as_u64()), (200, Some(i)), "{ack}");
    }

    let (status, info) = get(addr, "/api/info");
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        (info["engine"].as_str(), info["sessions"].as_u64(), info["rooms"].as_u64()),
        (Some("sqlite"), Some(1), Some(1))
    );
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["nodes"], json!([info["node"]]), "one process, one node");
    let (_, rooms) = get(addr, "/api/rooms");
    assert_eq!(rooms["rooms"], json!([{"room": "lobby", "members_here": 1, "offset": 5, "epoch": epoch}]));
    let (_, presence) = get(addr, "/api/rooms/lobby/presence");
    assert_eq!(presence["members"].as_array().unwrap().len(), 1, "{presence}");
    assert_eq!((presence["members"][0]["name"].as_str(), presence["truncated"].as_bool()), (Some("Ann"), Some(false)));
    assert_eq!(get(addr, "/api/rooms/lobby/presence/count").1["members"], 1);

    // Pages of two, oldest first, each saying where the next starts.
    let (_, first) = get(addr, "/api/rooms/lobby/history?limit=2");
    assert_eq!((offsets(&first), first["next_since"].as_u64(), first["last"].as_u64()), (vec![1, 2], Some(2), Some(5)));
    let (_, second) = get(addr, "/api/rooms/lobby/history?since=2&limit=2");
    assert_eq!((offsets(&second), second["next_since"].as_u64()), (vec![3, 4], Some(4)));
    let (_, last) = get(addr, "/api/rooms/lobby/history?since=4&limit=2");
    assert_eq!((offsets(&last), last["next_since"].clone()), (vec![5], Value::Null));
    assert_eq!(last["messages"][0]["message"], "m5");

    // Bad input: a status and a JSON body naming it.
    for (path, status) in [
        ("/api/rooms/lobby/history?limit=0", 400),
        ("/api/rooms/lobby/history?since=-1", 400),
        ("/api/rooms/no%20spaces/presence", 400),
    ] {
        let (got, body) = get(addr, path);
        assert_eq!((got, body["type"].as_str()), (status, Some("error")), "{path}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
    let (status, body) = http_json(addr, "GET", "/api/rooms", None, None);
    assert_eq!((status, body["code"].as_str()), (401, Some("not_allowed")), "{body}");
    let (status, body) = post(addr, "/api/publish", json!({"room": "a", "rooms": ["b"], "message": "m"}));
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "{body}");

    // Removed: nothing retained, offsets go on, and a client resuming from before is told.
    let (status, removed) = post(addr, "/api/rooms/lobby/history/remove", json!({}));
    assert_eq!((status, removed["removed"].as_u64()), (200, Some(5)), "{removed}");
    let (_, empty) = get(addr, "/api/rooms/lobby/history");
    assert_eq!((offsets(&empty), empty["first"].as_u64(), empty["last"].as_u64()), (vec![], Some(6), Some(5)));
    let (_, ack) = post(addr, "/api/publish", json!({"room": "lobby", "message": "after"}));
    assert_eq!(ack["acks"][0]["offset"], 6, "offsets go on: {ack}");
    let mut back = v1_client(addr).await;
    send(&mut back, json!({"type": "join", "room": "lobby", "since": 2, "epoch": epoch})).await;
    assert_eq!(next_of(&mut back, "joined").await["recovered"], false);

    let (status, doc) = http_json(addr, "GET", "/api/openapi.json", None, None);
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")));
    let paths = doc["paths"].as_object().unwrap();
    for path in ["/api/info", "/api/rooms", "/api/rooms/{room}/history", "/api/users/{sub}/disconnect"] {
        assert!(paths.contains_key(path), "{path} documented");
    }
}

#[tokio::test]
async fn a_users_sessions_are_subscribed_unsubscribed_and_disconnected_and_no_one_elses() {
    let (server, _db) = start_serve(&["--api-key", KEY, "--jwt-secret", SECRET]);
    let addr = &server.addr;
    let (mut ann1, mut ann2, mut bob) =
        (signed_in(addr, "ann").await, signed_in(addr, "ann").await, signed_in(addr, "bob").await);
    for ws in [&mut ann1, &mut ann2, &mut bob] {
        send(ws, json!({"type": "join", "room": "lobby"})).await;
        next_of(ws, "joined").await;
    }
    // And an SSE stream of ann's.
    let token = support::chat::token(SECRET, "ann", 600);
    let mut stream = support::sse::Stream::open(addr, &format!("room=lobby&token={token}"), "");
    stream.next_of("joined");

    let (status, answer) = post(addr, "/api/users/ann/subscribe", json!({"room": "news"}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["sessions_here"].as_u64(), answer["all_nodes"].as_bool()), (Some(3), Some(false)));
    assert_eq!(stream.next_of("joined").json()["room"], "news");
    for ann in [&mut ann1, &mut ann2] {
        let joined = next_of(ann, "joined").await;
        assert_eq!(joined["room"], "news");
        assert!(joined["members"].as_array().unwrap().iter().any(|m| m["name"] == "ann"), "{joined}");
    }
    post(addr, "/api/publish", json!({"room": "news", "message": "extra"}));
    for ann in [&mut ann1, &mut ann2] {
        let message = next_of(ann, "message").await;
        assert_eq!((message["room"].as_str(), message["message"].as_str()), (Some("news"), Some("extra")));
    }

    assert_eq!(stream.next_of("message").json()["message"], "extra");
    let (_, answer) = post(addr, "/api/users/ann/unsubscribe", json!({"room": "news"}));
    assert_eq!(answer["sessions_here"], 3);
    assert_eq!(stream.next_of("left").json()["reason"], "unsubscribed", "the stream is told too");
    for ann in [&mut ann1, &mut ann2] {
        assert_eq!(
            next_of(ann, "left").await,
            json!({"type": "left", "room": "news", "reason": "unsubscribed", "req": null})
        );
    }

    let (status, answer) = post(addr, "/api/users/ann/disconnect", json!({"code": 4100, "reason": "account closed"}));
    assert_eq!((status, answer["sessions_here"].as_u64()), (200, Some(3)), "{answer}");
    for ann in [&mut ann1, &mut ann2] {
        assert_eq!(next_close(ann).await, Some((4100, "account closed".to_owned())));
    }
    let last = stream.next_of("error").json();
    assert_eq!((last["close"].as_u64(), last["message"].as_str()), (Some(4100), Some("account closed")), "{last}");
    // Bob saw none of it, and is still there.
    send(&mut bob, json!({"type": "publish", "room": "lobby", "message": "still here"})).await;
    // Its ack and its own message, in either order; ann's sessions leaving are presence events.
    let (ack, message) = ack_and_message(&mut bob).await;
    assert_eq!(message["message"], "still here", "{ack}");
    quiet(&mut bob, 100).await;
    let (status, _) = http_json(addr, "POST", "/api/users/bob/disconnect", Some(KEY), Some("\u{c}"));
    assert_eq!(status, 400, "a form feed is not JSON whitespace");
    let (status, _) = http_json(addr, "POST", "/api/users/bob/disconnect", Some(KEY), Some("\n"));
    assert_eq!(status, 400, "whitespace alone is not a JSON body");
    let (status, bad) = post(addr, "/api/users/bob/disconnect", json!({"code": 1006}));
    assert_eq!((status, bad["code"].as_str()), (400, Some("bad_request")), "{bad}");
    // The reason's limit counts characters, as the document's maxLength does: 120 two-byte ones
    // pass (a close frame carries what fits its 123 bytes), 121 do not.
    let (status, answer) = post(addr, "/api/users/carol/disconnect", json!({"reason": "é".repeat(120)}));
    assert_eq!(status, 200, "{answer}");
    let (status, bad) = post(addr, "/api/users/carol/disconnect", json!({"reason": "é".repeat(121)}));
    assert_eq!((status, bad["code"].as_str()), (400, Some("bad_request")), "{bad}");
    // A user is named: an empty sub is refused, not taken as a user with no name.
    for (path, body) in [
        ("/api/users//disconnect", json!({})),
        ("/api/users//subscribe", json!({"room": "lobby"})),
        ("/api/users//unsubscribe", json!({"room": "lobby"})),
    ] {
        let (status, bad) = post(addr, path, body);
        assert_eq!((status, bad["message"].as_str()), (400, Some("the user's sub is empty")), "{path}: {bad}");
    }
}

#[test]
fn the_routers_own_refusals_are_json_errors_too() {
    let (server, _db) = start_serve(&["--api-key", KEY, "--max-message-chars", "100"]);
    let addr = &server.addr;
    let (status, body) = get(addr, "/api/nothing");
    assert_eq!((status, body["code"].as_str()), (404, Some("bad_request")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("/api/nothing"), "{body}");
    let (status, body) = get(addr, "/api/rooms/lobby/history/remove");
    assert_eq!((status, body["code"].as_str()), (405, Some("bad_request")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("does not take GET"), "{body}");
    // Past the body limit (64 KiB and four bytes a character).
    let big = json!({"room": "lobby", "message": "x".repeat(70_000)});
    for path in ["/api/publish", "/publish"] {
        let (status, body) = post(addr, path, big.clone());
        assert_eq!((status, body["code"].as_str()), (413, Some("too_long")), "{path}: {body}");
    }
    // A declared length past the limit is refused at once, before any of the body (none comes).
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    let head =
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{";
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "within 3 s, without waiting for the body: {answer}");
    // RFC 9112 §3.2: no Host in an HTTP/1.1 request is a 400 (in JSON on the API's paths).
    for path in ["/healthz", "/api/info"] {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
        stream.write_all(format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("Host"), "{path}: {answer}");
    }
}

#[test]
fn a_request_body_sent_a_byte_at_a_time_is_cut_off_at_the_handshake_timeout() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let (server, _db) = start_serve(&["--api-key", KEY, "--handshake-timeout-secs", "1"]);
    for path in ["/publish", "/api/publish"] {
        let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let started = Instant::now();
        let mut response = Vec::new();
        // A byte of whitespace every 200 ms: never a pause the head's timeout would see.
        while started.elapsed() < Duration::from_secs(10) {
            if stream.write_all(b" ").is_err() {
                break;
            }
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        let took = started.elapsed();
        let response = String::from_utf8_lossy(&response).into_owned();
        assert!(response.starts_with("HTTP/1.1 408 "), "{path}: {response:?} after {took:?}");
        assert!(took < Duration::from_secs(5), "{path}: answered after {took:?}");
        let body: Value = serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["code"], "bad_request", "{body}");
        assert!(body["message"].as_str().unwrap().contains("did not arrive within 1 s"), "{body}");
        assert!(response.to_ascii_lowercase().contains("connection: close"), "{response}");
    }
    // A body that comes at once is unaffected.
    let (status, answer) = post(&server.addr, "/api/publish", json!({"room": "lobby", "message": "on time"}));
    assert_eq!(status, 200, "{answer}");
}
