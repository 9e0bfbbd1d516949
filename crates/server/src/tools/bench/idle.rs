//! `bench idle`: opens connections and holds them; the server's RSS per connection given its pid.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde_json::json;
use switchboard_ws::proto::frame::mask_payload;
use switchboard_ws::proto::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};
use switchboard_ws::WsUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

pub(super) async fn run(args: IdleArgs) -> anyhow::Result<serde_json::Value> {
    let url = WsUrl::parse(&args.url)?;
    let before = args.server_pid.and_then(rss_kib);
    let sources: Vec<Option<IpAddr>> =
        if args.source_ips.is_empty() { vec![None] } else { args.source_ips.iter().copied().map(Some).collect() };
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let printer = progress("opened", counter.clone(), stop.clone());
    let started = Instant::now();
    let mut held = Vec::with_capacity(args.connections);
    let mut errors = 0u64;
    // Open in batches so the listen backlog is not overrun.
    for batch in (0..args.connections).collect::<Vec<_>>().chunks(256) {
        let mut opening = Vec::with_capacity(batch.len());
        for &i in batch {
            let (url, source) = (url.clone(), sources[i % sources.len()]);
            opening.push(tokio::spawn(async move { raw_connect(&url, source).await }));
        }
        for task in opening {
            match task.await? {
                Ok(connection) => {
                    held.push(connection);
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    errors += 1;
                    if errors == 1 {
                        tracing::warn!(%error, "opening a connection failed");
                    }
                }
            }
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    let opened = held.len();
    // Idle, not dead: each connection answers the server's keepalive pings, as a browser would.
    let hold_until = Instant::now() + Duration::from_secs_f64(args.hold);
    let dropped = Arc::new(AtomicU64::new(0));
    let holders: Vec<_> = held
        .into_iter()
        .map(|(stream, buf)| {
            let dropped = dropped.clone();
            tokio::spawn(async move {
                if tokio::time::timeout_at(hold_until.into(), answer_pings(stream, buf)).await.is_ok() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for holder in holders {
        holder.await?;
    }
    let after = args.server_pid.and_then(rss_kib);
    stop.store(true, Ordering::Relaxed);
    let _ = printer.await;
    let per_connection = match (before, after) {
        (Some(b), Some(a)) if opened > 0 => json!((a.saturating_sub(b)) as f64 / opened as f64),
        _ => serde_json::Value::Null,
    };
    Ok(json!({
        "mode": "idle", "url": args.url, "requested": args.connections, "opened": opened, "errors": errors,
        "dropped_by_server": dropped.load(Ordering::Relaxed),
        "open_s": open_secs, "held_s": args.hold, "server_rss_before_kib": before, "server_rss_after_kib": after,
        "server_kib_per_connection": per_connection,
    }))
}

/// Reads until the server closes, answering each ping with its pong; returns when the connection ends.
async fn answer_pings(mut stream: TcpStream, mut buf: BytesMut) {
    let key = [0x3c, 0x96, 0x1e, 0x87];
    loop {
        while let Ok(Some((header, header_len))) = FrameHeader::decode(&buf) {
            let total = header_len + header.payload_len as usize;
            if buf.len() < total {
                break;
            }
            let payload = buf[header_len..total].to_vec();
            buf.advance(total);
            match header.opcode {
                OpCode::Ping => {
                    let pong = FrameHeader {
                        fin: true,
                        rsv: 0,
                        opcode: OpCode::Pong,
                        mask: Some(key),
                        payload_len: payload.len() as u64,
                    };
                    let mut head = [0u8; MAX_HEADER_LEN];
                    let n = pong.encode(&mut head);
                    let mut frame = head[..n].to_vec();
                    frame.extend_from_slice(&payload);
                    mask_payload(&mut frame[n..], key);
                    if stream.write_all(&frame).await.is_err() {
                        return;
                    }
                }
                OpCode::Close => return,
                _ => {}
            }
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
