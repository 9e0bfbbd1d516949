//! Seeds 000 and 003 on switchboard: a chat page at `/` and a WebSocket at `/ws`; each JSON message
//! `{name, message}` gets the server's time and goes to every client, the sender included.
//! Run: `cargo run -p switchboard-examples --example json_chat [127.0.0.1:8000]`, open the page.

use axum::{response::Html, routing::get, Router};
use serde_json::Value;
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::Message;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

const PAGE: &str = r##"<!DOCTYPE html><title>Chat</title><h1>Chat</h1>
<input id="name" value="Anonymous"><textarea id="message"></textarea><button id="button">Send</button>
<ul id="messages"></ul>
<script>
  const ws = new WebSocket(`ws://${location.host}/ws`);
  ws.onmessage = (event) => {
    const msg = JSON.parse(event.data), li = document.createElement("li");
    li.innerText = `[${msg.time}] ${msg.name}: ${msg.message}`;
    document.getElementById("messages").appendChild(li);
  };
  document.querySelector("#button").onclick = () => {
    ws.send(JSON.stringify({ name: name.value, message: message.value }));
    message.value = "";
  };
</script>"##;

pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    let (clients, _) = broadcast::channel::<String>(1024);
    let app = Router::new().route("/", get(|| async { Html(PAGE) })).route(
        "/ws",
        get(move |ws: WebSocketUpgrade| async move {
            let clients = clients.clone();
            ws.on_upgrade(move |socket| async move {
                let (mut reader, mut writer) = socket.split();
                let mut feed = clients.subscribe();
                tokio::spawn(async move {
                    while let Ok(text) = feed.recv().await {
                        if writer.send(text).await.is_err() {
                            break;
                        }
                    }
                });
                while let Some(Ok(Message::Text(text))) = reader.recv().await {
                    let Ok(Value::Object(mut message)) = serde_json::from_str(&text) else { break };
                    message.insert("time".into(), chrono::Local::now().format("%H:%M:%S").to_string().into());
                    let _ = clients.send(Value::Object(message).to_string());
                }
            })
        }),
    );
    Ok(axum::serve(listener, app).await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8000".into());
    serve(TcpListener::bind(addr).await?).await
}
