//! `switchboard serve` end to end: the real binary, real sockets, our client speaking both protocols.

mod support;

use std::time::Duration;

use serde_json::json;
use support::chat::{next, next_close, next_of, quiet, seed_client, send, v1_client};
use support::{start_serve, start_serve_at};
use switchboard_ws::Message;

fn is_hms(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 8 && b[2] == b':' && b[5] == b':' && s.chars().filter(char::is_ascii_digit).count() == 6
}

#[tokio::test]
async fn seed_protocol_broadcasts_to_everyone_with_the_servers_time() {
    let (server, _) = start_serve(&[]);
    let mut a = seed_client(&server.addr).await;
    let mut b = seed_client(&server.addr).await;
    send(&mut a, json!({"name": "Ann", "message": "hello <b>world</b>", "extra": 1})).await;
    for ws in [&mut a, &mut b] {
        let m = next(ws).await;
        let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "message", "time"]);
        assert_eq!((m["name"].as_str(), m["message"].as_str()), (Some("Ann"), Some("hello <b>world</b>")));
        assert!(is_hms(m["time"].as_str().unwrap()), "{m}");
    }
    // A full-protocol client joining the room sends presence to full-protocol clients only.
    let mut c = v1_client(&server.addr).await;
    send(&mut c, json!({"type": "join", "room": "lobby", "name": "Cy"})).await;
    let joined = next_of(&mut c, "joined").await;
    assert_eq!(joined["offset"], 1);
    let history = next_of(&mut c, "message").await;
    assert_eq!((history["offset"].as_u64(), history["name"].as_str()), (Some(1), Some("Ann")));
    quiet(&mut a, 300).await;
    // And its messages reach seed clients in the seed format.
    send(&mut c, json!({"type": "publish", "room": "lobby", "message": "from v1"})).await;
    let m = next(&mut b).await;
    assert_eq!((m["name"].as_str(), m["message"].as_str()), (Some("Cy"), Some("from v1")));
    assert!(m.get("type").is_none() && m.get("offset").is_none());
}

#[tokio::test]
async fn seed_clients_that_break_the_protocol_are_closed_with_a_reason() {
    let (server, _) = start_serve(&["--max-message-chars", "10"]);
    let mut a = seed_client(&server.addr).await;
    let mut other = seed_client(&server.addr).await;
    a.send("not json").await.unwrap();
    match next_close(&mut a).await {
        Some((code, reason)) => assert_eq!((code, reason.contains("JSON")), (1007, true)),
        None => panic!("expected a close frame"),
    }
    let mut b = seed_client(&server.addr).await;
    send(&mut b, json!({"name": "B", "message": "far too long for ten"})).await;
    assert_eq!(next_close(&mut b).await.map(|c| c.0), Some(1009));
    // Others are unaffected.
    send(&mut other, json!({"name": "O", "message": "fine"})).await;
    assert_eq!(next(&mut other).await["message"], "fine");
}

#[tokio::test]
async fn rooms_presence_acks_and_idempotent_publish() {
    let (server, _) = start_serve(&[]);
    let mut ann = v1_client(&server.addr).await;
    let mut bob = v1_client(&server.addr).await;
    send(&mut ann, json!({"type": "join", "room": "dev", "name": "Ann", "req": "j1"})).await;
    let joined = next_of(&mut ann, "joined").await;
    assert_eq!((joined["req"].as_str(), joined["offset"].as_u64()), (Some("j1"), Some(0)));
    send(&mut bob, json!({"type": "join", "room": "dev", "name": "Bob"})).await;
    let joined = next_of(&mut bob, "joined").await;
    let names: Vec<&str> = joined["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Ann", "Bob"]);
    let event = next_of(&mut ann, "presence").await;
    assert_eq!((event["event"].as_str(), event["member"]["name"].as_str()), (Some("join"), Some("Bob")));
    // Joining again renames.
    send(&mut bob, json!({"type": "join", "room": "dev", "name": "Robert", "since": 0})).await;
    assert_eq!(next_of(&mut bob, "joined").await["members"][1]["name"], "Robert");
    let event = next_of(&mut ann, "presence").await;
    assert_eq!((event["event"].as_str(), event["member"]["name"].as_str()), (Some("update"), Some("Robert")));

    send(&mut ann, json!({"type": "publish", "room": "dev", "message": "hi", "id": "m-1", "req": 5})).await;
    let ack = next_of(&mut ann, "ack").await;
    assert_eq!(
        (ack["offset"].as_u64(), ack["duplicate"].as_bool(), ack["req"].as_u64()),
        (Some(1), Some(false), Some(5))
    );
    let got = next_of(&mut bob, "message").await;
    assert_eq!(
        (got["offset"].as_u64(), got["message"].as_str(), got["name"].as_str()),
        (Some(1), Some("hi"), Some("Ann"))
    );
    // The same id again: acknowledged with the original offset, not stored or delivered again.
    send(&mut ann, json!({"type": "publish", "room": "dev", "message": "hi", "id": "m-1"})).await;
    let ack = next_of(&mut ann, "ack").await;
    assert_eq!((ack["offset"].as_u64(), ack["duplicate"].as_bool()), (Some(1), Some(true)));
    send(&mut ann, json!({"type": "publish", "room": "dev", "message": "second"})).await;
    assert_eq!(next_of(&mut bob, "message").await["offset"], 2, "the duplicate was not delivered");
    assert_eq!(next_of(&mut ann, "ack").await["offset"], 2);

    // Several rooms at once: one ack per room.
    send(&mut ann, json!({"type": "publish", "rooms": ["dev", "ops"], "message": "both"})).await;
    let mut acked = Vec::new();
    for _ in 0..2 {
        let ack = next_of(&mut ann, "ack").await;
        acked.push((ack["room"].as_str().unwrap().to_owned(), ack["offset"].as_u64().unwrap()));
    }
    acked.sort();
    assert_eq!(acked, [("dev".to_owned(), 3), ("ops".to_owned(), 1)], "each room numbers its own messages");

    // Leave: Bob is told, presence shrinks.
    send(&mut ann, json!({"type": "leave", "room": "dev", "req": "bye"})).await;
    assert_eq!(next_of(&mut ann, "left").await["req"], "bye");
    let event = next_of(&mut bob, "presence").await;
    assert_eq!((event["event"].as_str(), event["member"]["name"].as_str()), (Some("leave"), Some("Ann")));
    send(&mut bob, json!({"type": "presence", "room": "dev", "req": 1})).await;
    let presence = next_of(&mut bob, "presence").await;
    assert_eq!(presence["members"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_requests_get_errors_naming_them_and_the_connection_stays() {
    let (server, _) = start_serve(&["--max-message-chars", "20", "--max-rooms-per-connection", "3"]);
    let mut ws = v1_client(&server.addr).await;
    ws.send("{nope").await.unwrap();
    assert_eq!(next(&mut ws).await["code"], "bad_json");
    send(&mut ws, json!({"type": "dance", "req": 1})).await;
    let e = next(&mut ws).await;
    assert_eq!((e["code"].as_str(), e["req"].as_u64()), (Some("bad_request"), Some(1)));
    send(&mut ws, json!({"type": "join", "room": "a", "colour": "red", "req": 2})).await;
    let e = next(&mut ws).await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("colour"), "{e}");
    send(&mut ws, json!({"type": "join", "room": "no spaces!", "req": 3})).await;
    assert_eq!(next(&mut ws).await["code"], "bad_request");
    send(&mut ws, json!({"type": "publish", "room": "a", "message": "x".repeat(21), "req": 4})).await;
    let e = next(&mut ws).await;
    assert_eq!((e["code"].as_str(), e["req"].as_u64()), (Some("too_long"), Some(4)));
    send(&mut ws, json!({"type": "leave", "room": "never-joined", "req": 5})).await;
    assert_eq!(next(&mut ws).await["code"], "unknown_room");
    for room in ["r1", "r2", "r3", "r4"] {
        send(&mut ws, json!({"type": "join", "room": room, "req": room})).await;
    }
    let mut outcome = Vec::new();
    while outcome.len() < 4 {
        let v = next(&mut ws).await;
        if v["type"] == "joined" || v["type"] == "error" {
            outcome.push(format!("{}:{}", v["req"].as_str().unwrap(), v["type"].as_str().unwrap()));
        }
    }
    assert_eq!(outcome, ["r1:joined", "r2:joined", "r3:joined", "r4:error"]);
    ws.send(vec![1u8, 2, 3]).await.unwrap();
    assert_eq!(next(&mut ws).await["code"], "bad_request");
    // Still served.
    send(&mut ws, json!({"type": "publish", "room": "r1", "message": "ok", "req": 9})).await;
    assert_eq!(next_of(&mut ws, "ack").await["req"], 9);
}

#[tokio::test]
async fn history_survives_a_restart_and_resume_is_exact() {
    let (server, db) = start_serve(&[]);
    let addr = server.addr.clone();
    let mut ws = v1_client(&addr).await;
    for i in 1..=5 {
        send(&mut ws, json!({"type": "publish", "room": "log", "message": format!("m{i}")})).await;
        assert_eq!(next_of(&mut ws, "ack").await["offset"], i);
    }
    drop(ws);
    drop(server); // kill -9
    let server = start_serve_at(&addr, &db, &[]);
    let mut ws = v1_client(&server.addr).await;
    send(&mut ws, json!({"type": "join", "room": "log", "since": 2})).await;
    let joined = next_of(&mut ws, "joined").await;
    assert_eq!((joined["offset"].as_u64(), joined["recovered"].as_bool()), (Some(5), Some(true)));
    for expected in 3..=5 {
        assert_eq!(next_of(&mut ws, "message").await["offset"], expected);
    }
    send(&mut ws, json!({"type": "publish", "room": "log", "message": "after restart"})).await;
    assert_eq!(next_of(&mut ws, "message").await["offset"], 6, "offsets keep increasing");
    send(&mut ws, json!({"type": "history", "room": "log", "since": 4, "req": "h"})).await;
    let history = next_of(&mut ws, "history").await;
    let offsets: Vec<u64> =
        history["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, [5, 6]);
}

#[tokio::test]
async fn resume_past_retention_says_it_cannot_recover() {
    let (server, _) = start_serve(&["--history-max-messages", "3"]);
    let mut ws = v1_client(&server.addr).await;
    for i in 1..=10 {
        send(&mut ws, json!({"type": "publish", "room": "short", "message": format!("m{i}")})).await;
        assert_eq!(next_of(&mut ws, "ack").await["offset"], i);
    }
    let mut late = v1_client(&server.addr).await;
    send(&mut late, json!({"type": "join", "room": "short", "since": 2})).await;
    let joined = next_of(&mut late, "joined").await;
    assert_eq!((joined["recovered"].as_bool(), joined["first"].as_u64()), (Some(false), Some(8)));
    for expected in 8..=10 {
        assert_eq!(next_of(&mut late, "message").await["offset"], expected);
    }
    // Still recoverable from within the retained range.
    let mut fine = v1_client(&server.addr).await;
    send(&mut fine, json!({"type": "join", "room": "short", "since": 8})).await;
    assert_eq!(next_of(&mut fine, "joined").await["recovered"], true);
}

#[tokio::test]
async fn page_and_module_are_served() {
    let (server, _) = start_serve(&[]);
    let get = |path: &str| {
        let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
        use std::io::{Read, Write};
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    };
    let page = get("/");
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("text/html") && page.contains("/switchboard.js"),
        "{page}"
    );
    let module = get("/switchboard.js");
    assert!(module.contains("text/javascript") && module.contains("export class SwitchboardClient"));
    assert!(get("/healthz").ends_with("ok\n"));
}

#[tokio::test]
async fn keepalive_drops_silent_clients_and_keeps_answering_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, _) = start_serve(&["--keepalive-secs", "1"]);
    // A client that completes the handshake and then never reads or answers anything.
    let mut mute = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    mute.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut alive = v1_client(&server.addr).await;
    send(&mut alive, json!({"type": "join", "room": "k"})).await;
    next_of(&mut alive, "joined").await;
    // Our client answers pings while it reads; after three intervals it is still served.
    let started = tokio::time::Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        if let Ok(Some(Ok(Message::Ping(_)))) = tokio::time::timeout(Duration::from_millis(200), alive.recv()).await {
            pings += 1;
        }
    }
    assert!(pings >= 2, "the server pinged the idle client ({pings})");
    send(&mut alive, json!({"type": "publish", "room": "k", "message": "still here"})).await;
    assert_eq!(next_of(&mut alive, "message").await["message"], "still here");
    // The mute one was dropped: its socket reaches end of stream.
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), mute.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the server closed the silent connection");
}

#[tokio::test]
async fn an_abusive_client_costs_the_others_nothing() {
    let (server, _) = start_serve(&["--max-rooms-per-connection", "8"]);
    let mut ann = v1_client(&server.addr).await;
    let mut bob = v1_client(&server.addr).await;
    for ws in [&mut ann, &mut bob] {
        send(ws, json!({"type": "join", "room": "calm"})).await;
        next_of(ws, "joined").await;
    }
    // The abuser floods junk, over-long messages and joins to made-up rooms, and never reads.
    let addr = server.addr.clone();
    let abuser = tokio::spawn(async move {
        let mut ws = v1_client(&addr).await;
        for i in 0..3000 {
            let frame = match i % 4 {
                0 => "{not json".to_owned(),
                1 => json!({"type": "join", "room": format!("junk-{i}"), "unknown": true}).to_string(),
                2 => json!({"type": "join", "room": format!("junk-{i}")}).to_string(),
                _ => json!({"type": "publish", "room": "calm", "message": "x".repeat(10_000)}).to_string(),
            };
            if ws.feed(frame).await.is_err() {
                break;
            }
        }
        let _ = ws.flush().await;
        ws
    });
    let mut worst = Duration::ZERO;
    for i in 0..200 {
        let sent = tokio::time::Instant::now();
        send(&mut ann, json!({"type": "publish", "room": "calm", "message": format!("m{i}")})).await;
        let got = next_of(&mut bob, "message").await;
        worst = worst.max(sent.elapsed());
        assert_eq!(got["message"], format!("m{i}"), "complete and in order");
    }
    assert!(worst < Duration::from_secs(1), "worst delivery took {worst:?}");
    let _abuser = abuser.await.unwrap();
    // The over-long publishes were refused, so the room holds exactly the 200 real messages.
    send(&mut bob, json!({"type": "history", "room": "calm", "limit": 1000})).await;
    let history = next_of(&mut bob, "history").await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 200);
}

#[tokio::test]
async fn ctrl_c_tells_clients_1001_and_exits_cleanly() {
    let (mut server, _) = start_serve(&[]);
    let mut ws = v1_client(&server.addr).await;
    send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
    next_of(&mut ws, "joined").await;
    server.signal("INT");
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.recv()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| f.code.0), Some(1001));
    let started = std::time::Instant::now();
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "serve did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit}");
}

#[tokio::test]
async fn environment_variables_configure_serve() {
    let db = support::temp_dir("env").join("chat.db");
    let addr = format!("127.0.0.1:{}", support::free_port());
    let child = support::switchboard()
        .args(["serve"])
        .env("SWITCHBOARD_LISTEN", &addr)
        .env("SWITCHBOARD_DB", &db)
        .env("SWITCHBOARD_DEFAULT_ROOM", "hall")
        .env("SWITCHBOARD_THREADS", "1")
        .env("SWITCHBOARD_LOG", "warn")
        .spawn()
        .unwrap();
    support::wait_listening(&addr);
    let server = support::Server { child, addr: addr.clone() };
    let mut seed = seed_client(&addr).await;
    send(&mut seed, json!({"name": "S", "message": "into the default room"})).await;
    next(&mut seed).await;
    let mut full = v1_client(&addr).await;
    send(&mut full, json!({"type": "history", "room": "hall"})).await;
    let history = next_of(&mut full, "history").await;
    assert_eq!(history["messages"][0]["message"], "into the default room");
    assert!(db.exists(), "the database is where SWITCHBOARD_DB said");
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let threads = status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().to_owned();
    assert_eq!(threads, "2", "a current-thread runtime: the main thread and the history writer");
}
