//! Faults with a real `switchboard serve` process: SIGTERM with a grace period, kill -9 in the middle
//! of a publish load, a database that fills up, and one that cannot be opened.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::chat::{next, next_close, next_of, send, v1_client, Ws};
use support::{start_serve, start_serve_at, Server};
use switchboard_ws::Message;

fn wait_exit(server: &mut Server, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < within, "serve did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn sigterm_says_1001_and_exits_within_the_grace_period_even_with_a_stuck_client() {
    let (mut server, db) = start_serve(&["--shutdown-grace-secs", "1"]);
    let mut ws = v1_client(&server.addr).await;
    send(&mut ws, json!({"type": "join", "room": "lobby"})).await;
    next_of(&mut ws, "joined").await;
    for i in 0..20 {
        send(&mut ws, json!({"type": "publish", "room": "lobby", "message": format!("m{i}"), "id": format!("id{i}")}))
            .await;
    }
    let mut acked = 0;
    while acked < 20 {
        if next(&mut ws).await["type"] == "ack" {
            acked += 1;
        }
    }
    // A client that completed the handshake and then never reads nor answers a close.
    let mut stuck = std::net::TcpStream::connect(&server.addr).unwrap();
    stuck
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = [0u8; 12];
    stuck.read_exact(&mut head).unwrap();
    assert_eq!(&head[9..12], b"101");

    let signalled = Instant::now();
    server.signal("TERM");
    assert_eq!(next_close(&mut ws).await.map(|(code, _)| code), Some(1001));
    let status = wait_exit(&mut server, Duration::from_secs(4));
    assert!(status.success(), "{status}");
    assert!(signalled.elapsed() < Duration::from_millis(2500), "took {:?} with a 1 s grace", signalled.elapsed());

    // On the next start everything acknowledged is there, and resume picks up where it stopped.
    let _server = start_serve_at(&server.addr, &db, &[]);
    let mut again = v1_client(&server.addr).await;
    send(&mut again, json!({"type": "join", "room": "lobby", "since": 15})).await;
    let joined = next_of(&mut again, "joined").await;
    assert_eq!((joined["offset"].as_u64(), joined["recovered"].as_bool()), (Some(20), Some(true)));
    for offset in 16..=20 {
        assert_eq!(next_of(&mut again, "message").await["offset"], offset);
    }
}

/// Publishes up to `MAX_PER_PUBLISHER` messages with ids `{tag}-{i}` as fast as acks allow (a window
/// of 32), recording each acknowledged offset, until the connection breaks.
async fn publish_until_broken(mut ws: Ws, tag: String, acked: std::sync::Arc<std::sync::Mutex<HashMap<String, u64>>>) {
    let mut sent = 0usize;
    let mut in_flight = 0usize;
    while sent < MAX_PER_PUBLISHER || in_flight > 0 {
        while in_flight < 32 && sent < MAX_PER_PUBLISHER {
            let frame = json!({"type": "publish", "room": "load", "message": format!("{tag} {sent}"), "id": format!("{tag}-{sent}")});
            if ws.feed(frame.to_string()).await.is_err() {
                return;
            }
            sent += 1;
            in_flight += 1;
        }
        if ws.flush().await.is_err() {
            return;
        }
        match ws.recv().await {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "ack" {
                    acked.lock().unwrap().insert(v["id"].as_str().unwrap().to_owned(), v["offset"].as_u64().unwrap());
                    in_flight -= 1;
                }
            }
            Some(Ok(_)) => {}
            _ => return,
        }
    }
}

/// Four publishers stay under the 10,000 messages one history request returns.
const MAX_PER_PUBLISHER: usize = 2400;

#[tokio::test]
async fn kill_9_under_publish_load_loses_nothing_acknowledged() {
    let history = "--history-max-messages=1000000";
    let (mut server, db) = start_serve(&[history, "--rate-limit", "0"]);
    let acked = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
    // A subscriber records every offset it is shown.
    let mut subscriber = v1_client(&server.addr).await;
    send(&mut subscriber, json!({"type": "join", "room": "load"})).await;
    next_of(&mut subscriber, "joined").await;
    let watching = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(Ok(message)) = subscriber.recv().await {
            if let Message::Text(text) = message {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "message" {
                    seen.push(v["offset"].as_u64().unwrap());
                }
            }
        }
        seen
    });
    let mut publishers = Vec::new();
    for p in 0..4 {
        let ws = v1_client(&server.addr).await;
        publishers.push(tokio::spawn(publish_until_broken(ws, format!("p{p}"), acked.clone())));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let seen = watching.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "the load ran ({} acks)", acked.len());
    assert!(acked.len() < 4 * MAX_PER_PUBLISHER, "the kill came while the publishers were still at it");
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1) && seen.first() == Some(&1), "live delivery was gap-free");

    // Room for the whole history in one answer (an answer holds at most --outbox-bytes).
    let _server = start_serve_at(&server.addr, &db, &[history, "--outbox-bytes", "16777216"]);
    let mut reader = v1_client(&server.addr).await;
    send(&mut reader, json!({"type": "history", "room": "load", "limit": 10000})).await;
    let stored = next_of(&mut reader, "history").await;
    let stored: Vec<&Value> = stored["messages"].as_array().unwrap().iter().collect();
    let offsets: Vec<u64> = stored.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (1..=offsets.len() as u64).collect::<Vec<_>>(), "offsets 1, 2, 3, ... with no gap");
    let by_id: BTreeMap<&str, u64> =
        stored.iter().map(|m| (m["id"].as_str().unwrap(), m["offset"].as_u64().unwrap())).collect();
    assert_eq!(by_id.len(), stored.len(), "no id stored twice");
    for (id, offset) in &acked {
        assert_eq!(by_id.get(id.as_str()), Some(offset), "acknowledged {id} at {offset} is in history");
    }
    assert!(seen.iter().all(|o| *o <= offsets.len() as u64), "nothing was shown that was not stored");

    // Resume from the last offset the subscriber saw: exactly the rest, once each.
    let last_seen = seen.last().copied().unwrap_or(0);
    let mut resumed = v1_client(&server.addr).await;
    send(&mut resumed, json!({"type": "join", "room": "load", "since": last_seen})).await;
    let joined = next_of(&mut resumed, "joined").await;
    assert_eq!(joined["recovered"], true);
    let last = joined["offset"].as_u64().unwrap();
    assert_eq!(last, offsets.len() as u64);
    for expected in last_seen + 1..=last {
        assert_eq!(next_of(&mut resumed, "message").await["offset"], expected);
    }
    // Publishers retry what was never acknowledged, with the same ids: nothing is stored twice.
    let mut retry = v1_client(&server.addr).await;
    let unacked: Vec<&str> = by_id.keys().filter(|id| !acked.contains_key(**id)).copied().collect();
    for id in unacked.iter().take(20) {
        send(&mut retry, json!({"type": "publish", "room": "load", "message": "retry", "id": id})).await;
        let ack = next_of(&mut retry, "ack").await;
        assert_eq!((ack["duplicate"].as_bool(), ack["offset"].as_u64()), (Some(true), by_id.get(id).copied()));
    }
}

#[tokio::test]
async fn a_full_database_is_an_error_the_publisher_sees() {
    let (server, _) =
        start_serve(&["--db-max-bytes", "131072", "--rate-limit", "0", "--history-max-messages", "100000"]);
    let mut ws = v1_client(&server.addr).await;
    let text = "z".repeat(2000);
    let mut acked = Vec::new();
    let error = loop {
        send(&mut ws, json!({"type": "publish", "room": "full", "message": text, "id": format!("m{}", acked.len())}))
            .await;
        let reply = next(&mut ws).await;
        match reply["type"].as_str() {
            Some("ack") => acked.push(reply["offset"].as_u64().unwrap()),
            Some("error") => break reply,
            other => panic!("unexpected {other:?}: {reply}"),
        }
        assert!(acked.len() < 1000, "128 KiB cannot hold 1000 messages of 2000 bytes");
    };
    assert_eq!(error["code"], "unavailable");
    assert!(error["message"].as_str().unwrap().contains("full"), "{error}");
    assert_eq!(acked, (1..=acked.len() as u64).collect::<Vec<_>>());
    send(&mut ws, json!({"type": "history", "room": "full", "limit": 10000})).await;
    let history = next_of(&mut ws, "history").await;
    assert_eq!(history["messages"].as_array().unwrap().len(), acked.len(), "every acknowledged message is kept");
}

#[test]
fn an_unusable_database_path_stops_serve_with_the_reason() {
    let dir = support::temp_dir("baddb");
    let addr = format!("127.0.0.1:{}", support::free_port());
    let output = support::switchboard()
        .args(["serve", "--listen", &addr, "--db"])
        .arg(dir.join("no/such/dir/chat.db"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no/such/dir/chat.db"), "{stderr}");
}

/// Starts `serve` on `db` and expects it to exit, refused; its stderr.
fn refused_serve(db: &std::path::Path) -> String {
    let addr = format!("127.0.0.1:{}", support::free_port());
    let mut second = support::switchboard()
        .args(["serve", "--listen", &addr, "--db"])
        .arg(db)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a second server that started would serve on, not exit.
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(10) {
            let _ = second.kill();
            panic!("a second server on the same database started ({})", db.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}

#[test]
fn a_second_server_on_the_same_database_is_refused_and_the_first_keeps_it() {
    let (first, db) = support::start_serve(&[]);
    let stderr = refused_serve(&db);
    assert!(stderr.contains("another switchboard process has this database open"), "{stderr}");
    // The same file by another name: a symbolic link to it, and a path through a linked directory.
    let linked = db.with_file_name("linked.db");
    std::os::unix::fs::symlink(&db, &linked).unwrap();
    let stderr = refused_serve(&linked);
    assert!(stderr.contains("another switchboard process has this database open"), "{stderr}");
    let dir_link = support::temp_dir("dir-link").join("dir");
    std::os::unix::fs::symlink(db.parent().unwrap(), &dir_link).unwrap();
    let stderr = refused_serve(&dir_link.join(db.file_name().unwrap()));
    assert!(stderr.contains("another switchboard process has this database open"), "{stderr}");
    // The first one is untouched, and once it is gone the file opens again.
    assert_eq!(support::http_json(&first.addr, "GET", "/healthz", None, None).0, 200);
    drop(first);
    let _again = support::start_serve_with_db(&db, &[]);
    // A link to a database not created yet: the first server creates it through the link, and a
    // second one given the file's own path is refused.
    let dir = support::temp_dir("link-ahead");
    std::os::unix::fs::symlink("later.db", dir.join("ahead.db")).unwrap();
    let _through_link = support::start_serve_with_db(&dir.join("ahead.db"), &[]);
    assert!(dir.join("later.db").exists(), "created through the link");
    let stderr = refused_serve(&dir.join("later.db"));
    assert!(stderr.contains("another switchboard process has this database open"), "{stderr}");
}
