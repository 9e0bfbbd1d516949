//! Each seed program of `examples/`, served on a loopback port and driven by our client.

#![allow(dead_code)] // each example's `main` is compiled in but not called

#[path = "../broadcast.rs"]
mod broadcast;
#[path = "../connection_manager.rs"]
mod connection_manager;
#[path = "../echo_http.rs"]
mod echo_http;
#[path = "../json_chat.rs"]
mod json_chat;

use std::future::Future;
use std::time::Duration;

use switchboard_ws::{ClientStream, Message, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn spawn_server<F: Future<Output = anyhow::Result<()>> + Send + 'static>(
    serve: impl FnOnce(TcpListener) -> F,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(serve(listener));
    addr
}

async fn client(url: String) -> WebSocket<ClientStream> {
    switchboard_ws::connect(&url).await.unwrap().0
}

async fn text(ws: &mut WebSocket<ClientStream>) -> String {
    match tokio::time::timeout(Duration::from_secs(5), ws.recv()).await.expect("a message in time") {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

async fn silent(ws: &mut WebSocket<ClientStream>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), ws.recv()).await {
        panic!("expected nothing, got {m:?}");
    }
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn seed_001_echo_with_plain_http_on_the_same_port() {
    let addr = spawn_server(echo_http::serve).await;
    let page = http_get(&addr, "/").await;
    assert!(page.starts_with("HTTP/1.1 200") && page.ends_with("WebSocket Server\n"), "{page}");
    let mut ws = client(format!("ws://{addr}/chat")).await;
    ws.send("Hello, world!").await.unwrap();
    assert_eq!(text(&mut ws).await, "You sent: Hello, world!");
}

#[tokio::test]
async fn seed_004_broadcast_reaches_every_other_client() {
    let addr = spawn_server(broadcast::serve).await;
    let mut a = client(format!("ws://{addr}")).await;
    let mut b = client(format!("ws://{addr}")).await;
    let mut c = client(format!("ws://{addr}")).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // all three registered
    a.send("from a").await.unwrap();
    assert_eq!(text(&mut b).await, "from a");
    assert_eq!(text(&mut c).await, "from a");
    silent(&mut a).await;
}

#[tokio::test]
async fn seeds_000_003_json_chat_with_page_and_time() {
    let addr = spawn_server(json_chat::serve).await;
    assert!(http_get(&addr, "/").await.contains("new WebSocket"));
    let mut a = client(format!("ws://{addr}/ws")).await;
    let mut b = client(format!("ws://{addr}/ws")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.send(r#"{"name":"Ann","message":"hi all"}"#).await.unwrap();
    for ws in [&mut a, &mut b] {
        let m: serde_json::Value = serde_json::from_str(&text(ws).await).unwrap();
        assert_eq!((m["name"].as_str(), m["message"].as_str()), (Some("Ann"), Some("hi all")));
        let time = m["time"].as_str().unwrap();
        assert!(time.len() == 8 && time.as_bytes()[2] == b':' && time.as_bytes()[5] == b':', "{time}");
    }
}

#[tokio::test]
async fn seed_002_connection_manager() {
    let addr = spawn_server(connection_manager::serve).await;
    assert!(http_get(&addr, "/").await.contains("Your ID"));
    let mut one = client(format!("ws://{addr}/ws/1")).await;
    let mut two = client(format!("ws://{addr}/ws/2")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    one.send("hello").await.unwrap();
    let mut got = vec![text(&mut one).await, text(&mut one).await];
    got.sort();
    assert_eq!(got, ["Client #1 says: hello", "You wrote: hello"]);
    assert_eq!(text(&mut two).await, "Client #1 says: hello");
    one.close(1000, "").await.unwrap();
    assert_eq!(text(&mut two).await, "Client #1 left the chat");
}
