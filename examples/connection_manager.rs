//! Seed 002's FastAPI connection manager on switchboard: clients connect to `/ws/{client_id}`; each
//! message is answered "You wrote: ..." and broadcast as "Client #id says: ..."; when a client goes,
//! the others read "Client #id left the chat".
//! Run: `cargo run -p switchboard-examples --example connection_manager [127.0.0.1:8000]`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::{extract::Path, response::Html, routing::get, Router};
use switchboard_ws::axum::WebSocketUpgrade;
use switchboard_ws::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const PAGE: &str = r##"<!DOCTYPE html><title>Chat</title><h1>WebSocket Chat</h1><h2>Your ID: <span id="ws-id"></span></h2>
<form onsubmit="send(event)"><input id="text" autocomplete="off"><button>Send</button></form><ul id="messages"></ul>
<script>
  const id = Date.now(); document.querySelector("#ws-id").textContent = id;
  const ws = new WebSocket(`ws://${location.host}/ws/${id}`);
  ws.onmessage = (e) => { const li = document.createElement("li"); li.textContent = e.data; messages.appendChild(li); };
  function send(e) { ws.send(text.value); text.value = ""; e.preventDefault(); }
</script>"##;

/// Every connection's queue, by a connection number (client ids need not be unique).
type Manager = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<String>>>>;

fn broadcast(manager: &Manager, text: &str) {
    manager.lock().unwrap().values().for_each(|tx| drop(tx.send(text.to_owned())));
}

pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    let manager = Manager::default();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let endpoint = move |Path(client_id): Path<i64>, ws: WebSocketUpgrade| async move {
        ws.on_upgrade(move |socket| async move {
            let (mut reader, mut writer) = socket.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let key = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            manager.lock().unwrap().insert(key, tx.clone());
            tokio::spawn(async move {
                while let Some(text) = rx.recv().await {
                    if writer.send(text).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(Message::Text(data))) = reader.recv().await {
                let _ = tx.send(format!("You wrote: {data}"));
                broadcast(&manager, &format!("Client #{client_id} says: {data}"));
            }
            manager.lock().unwrap().remove(&key);
            broadcast(&manager, &format!("Client #{client_id} left the chat"));
        })
    };
    let app = Router::new().route("/", get(|| async { Html(PAGE) })).route("/ws/{client_id}", get(endpoint));
    Ok(axum::serve(listener, app).await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8000".into());
    serve(TcpListener::bind(addr).await?).await
}
