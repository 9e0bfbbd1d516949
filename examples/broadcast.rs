//! Seed 004's Node broadcast server on switchboard: every message goes to all the other connected
//! clients. Run: `cargo run -p switchboard-examples --example broadcast [127.0.0.1:8080]`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use switchboard_ws::{accept, Config, Message};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type Connections = Arc<Mutex<HashMap<u64, mpsc::Sender<Message>>>>;

pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    let connections: Connections = Arc::default();
    let next_id = AtomicU64::new(0);
    loop {
        let (stream, _) = listener.accept().await?;
        let (id, connections) = (next_id.fetch_add(1, Ordering::Relaxed), connections.clone());
        tokio::spawn(async move {
            let Ok(ws) = accept(stream, Config::default()).await else { return };
            let (mut reader, mut writer) = ws.split();
            // A bounded queue per client: one that stops reading is dropped, not buffered forever.
            let (tx, mut rx) = mpsc::channel::<Message>(256);
            connections.lock().unwrap().insert(id, tx);
            tokio::spawn(async move {
                while let Some(message) = rx.recv().await {
                    if writer.send(message).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(message)) = reader.recv().await {
                if message.is_text() || message.is_binary() {
                    let mut all = connections.lock().unwrap();
                    all.retain(|other, tx| *other == id || tx.try_send(message.clone()).is_ok());
                }
            }
            connections.lock().unwrap().remove(&id);
        });
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8080".into());
    serve(TcpListener::bind(addr).await?).await
}
