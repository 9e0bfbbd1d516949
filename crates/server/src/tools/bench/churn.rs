//! `bench churn`: clients that connect, join, publish, read their acks and leave, in a loop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use switchboard_ws::{ClientBuilder, Message};

use super::*;

pub(super) async fn run(args: ChurnArgs) -> anyhow::Result<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let printer = progress("sessions", counter.clone(), stop.clone());
    let mut workers = Vec::with_capacity(args.connections);
    for w in 0..args.connections {
        let (url, counter) = (args.url.clone(), counter.clone());
        let (messages, rooms, pause) = (args.messages, args.rooms.max(1), Duration::from_millis(args.pause_ms));
        workers.push(tokio::spawn(async move {
            let (mut sessions, mut acked, mut errors) = (0u64, 0u64, 0u64);
            let mut round = 0usize;
            while Instant::now() < end {
                round += 1;
                let room = format!("churn-{}", (w + round) % rooms);
                match churn_session(&url, &room, messages, pause).await {
                    Ok(acks) => {
                        sessions += 1;
                        acked += acks;
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        errors += 1;
                        if errors == 1 {
                            tracing::warn!(%error, "a churn session failed");
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            (sessions, acked, errors)
        }));
    }
    let (mut sessions, mut acked, mut errors) = (0, 0, 0);
    for worker in workers {
        let (s, a, e) = worker.await?;
        sessions += s;
        acked += a;
        errors += e;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = printer.await;
    Ok(json!({
        "mode": "churn", "url": args.url, "concurrency": args.connections, "duration_s": args.duration,
        "sessions": sessions, "sessions_per_s": sessions as f64 / args.duration, "acked": acked, "errors": errors,
    }))
}

/// One client's life: connect, join, publish and wait for each ack, close.
async fn churn_session(url: &str, room: &str, messages: usize, pause: Duration) -> anyhow::Result<u64> {
    let (mut ws, _) = ClientBuilder::new(url).no_proxy().protocol("switchboard.v1").connect().await?;
    ws.send(json!({"type": "join", "room": room, "name": "churn"}).to_string()).await?;
    let mut acked = 0;
    for i in 0..messages {
        ws.send(json!({"type": "publish", "room": room, "message": format!("churn {i}"), "req": i}).to_string())
            .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    if text.contains("\"type\":\"ack\"") {
                        acked += 1;
                        break;
                    }
                    if text.contains("\"type\":\"error\"") {
                        bail!("server error: {text}");
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(error))) => return Err(error.into()),
                Ok(None) => bail!("server closed the connection"),
                Err(_) => bail!("no ack within 10 s"),
            }
        }
        tokio::time::sleep(pause).await;
    }
    ws.close(switchboard_ws::CloseCode::NORMAL, "").await?;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), ws.recv()).await {}
    Ok(acked)
}
