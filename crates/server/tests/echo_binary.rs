//! `switchboard echo` as a user runs it: the real binary on a loopback port, driven by our client.

use std::time::{Duration, Instant};

use switchboard_ws::{CloseCode, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod support;

use support::start_echo;

#[tokio::test]
async fn echoes_text_and_binary_and_closes_cleanly() {
    let server = start_echo(&[]);
    let (mut ws, _) = switchboard_ws::connect(&format!("ws://{}/", server.addr)).await.unwrap();
    ws.send("hello, switchboard").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("hello, switchboard"));
    let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31) as u8).collect();
    ws.send(blob.clone()).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(CloseCode::NORMAL, "bye").await.unwrap();
    match ws.recv().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::NORMAL),
        other => panic!("expected the close echo, got {other:?}"),
    }
    assert!(ws.recv().await.is_none());
}

#[tokio::test]
async fn message_size_flag_is_enforced_with_1009() {
    let server = start_echo(&["--max-message-size", "1000"]);
    let (mut ws, _) = switchboard_ws::connect(&format!("ws://{}/", server.addr)).await.unwrap();
    ws.send(vec![0u8; 1001]).await.unwrap();
    match ws.recv().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::MESSAGE_TOO_BIG),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn plain_http_gets_a_reason_not_a_hang() {
    let server = start_echo(&[]);
    let mut stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
    assert!(answer.contains("missing 'Upgrade: websocket'"), "{answer}");
}

#[test]
fn ctrl_c_exits_cleanly() {
    let mut server = start_echo(&[]);
    server.signal("INT");
    let started = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "did not exit on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The process's thread count, from /proc.
fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn threads_1_is_a_current_thread_runtime_and_still_echoes() {
    let one = start_echo(&["--threads", "1"]);
    let (mut ws, _) = switchboard_ws::connect(&format!("ws://{}/", one.addr)).await.unwrap();
    ws.send("on one thread").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("on one thread"));
    assert_eq!(threads_of(one.child.id()), 1, "no worker threads beside the main one");
    let two = start_echo(&["--threads", "2"]);
    let (mut ws, _) = switchboard_ws::connect(&format!("ws://{}/", two.addr)).await.unwrap();
    ws.send("on two").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("on two"));
    assert_eq!(threads_of(two.child.id()), 3, "the main thread and two workers");
}
