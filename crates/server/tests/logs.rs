//! What `serve` writes to stderr: JSON lines with `--log-format json`, text without colour codes when
//! stderr is not a terminal, and one line for each refused handshake and each forced close, with the
//! client's address, the reason and the status or close code.

mod support;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use support::chat::{next_close, seed_client};
use switchboard_ws::Message;

/// A `serve` whose stderr lines arrive on a channel.
struct Logged {
    server: support::Server,
    lines: mpsc::Receiver<String>,
}

fn start(extra: &[&str]) -> Logged {
    let db = support::temp_dir("logs").join("chat.db");
    let mut command = support::switchboard();
    command.args(["serve", "--listen", "127.0.0.1:0", "--db"]).arg(&db).args(extra);
    let (child, addr, log) = support::spawn_listening(command, "switchboard serving ");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in log.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Logged { server: support::Server { child, addr }, lines }
}

/// Lines until one contains `needle`; every line seen on the way is returned too.
fn until(lines: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no log line with {needle:?}; saw {seen:#?}"));
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return seen;
        }
    }
}

/// Sends a WebSocket handshake without its key: refused with 400.
fn bad_handshake(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_name_each_refusal_and_forced_close() {
    let logged = start(&["--log-format", "json"]);
    assert!(bad_handshake(&logged.server.addr).contains("400"));
    let refused = until(&logged.lines, "refused a bad WebSocket handshake");

    // A seed client sends binary, which the seed protocol does not take: closed with 1003.
    let mut ws = seed_client(&logged.server.addr).await;
    ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(next_close(&mut ws).await.map(|(code, _)| code), Some(1003));
    let closed = until(&logged.lines, "closing a WebSocket");

    for line in refused.iter().chain(&closed) {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string() && value["message"].is_string(), "{line}");
    }
    let refusal: Value = serde_json::from_str(refused.last().unwrap()).unwrap();
    assert_eq!(refusal["status"], 400, "{refusal}");
    assert!(refusal["peer"].as_str().is_some_and(|peer| peer.starts_with("127.0.0.1:")), "{refusal}");
    // Once each: nothing else logs the same refusal or close (a second of quiet to be sure).
    let mut all: Vec<String> = refused.iter().chain(&closed).cloned().collect();
    while let Ok(line) = logged.lines.recv_timeout(Duration::from_secs(1)) {
        all.push(line);
    }
    let count = |needle: &str| all.iter().filter(|line| line.contains(needle)).count();
    assert_eq!(count("refused"), 1, "{all:#?}");
    assert_eq!(count("closing a WebSocket") + count("closing connection"), 1, "{all:#?}");
    let close: Value = serde_json::from_str(closed.last().unwrap()).unwrap();
    assert_eq!(close["code"], 1003, "{close}");
    assert!(close["reason"].as_str().is_some_and(|reason| reason.contains("binary")), "{close}");
    assert!(close["peer"].as_str().is_some_and(|peer| peer.starts_with("127.0.0.1:")), "{close}");
}

#[tokio::test]
async fn text_logs_into_a_pipe_carry_no_colour_codes() {
    let logged = start(&[]);
    assert!(bad_handshake(&logged.server.addr).contains("400"));
    let lines = until(&logged.lines, "refused a bad WebSocket handshake");
    assert!(lines.iter().all(|line| !line.contains('\u{1b}')), "escape codes in {lines:#?}");
    assert!(lines.last().unwrap().contains("status=400"), "{lines:#?}");
}
