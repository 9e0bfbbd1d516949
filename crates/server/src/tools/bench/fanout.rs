//! `bench fanout`: one room, many subscribers, publishers at a fixed rate; deliveries/s, latency
//! and losses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::json;
use switchboard_ws::{ClientBuilder, Message};

use super::*;

pub(super) async fn run(args: FanoutArgs) -> anyhow::Result<serde_json::Value> {
    let v1 = match args.protocol.as_str() {
        "seed" => false,
        "v1" => true,
        other => bail!("--protocol must be seed or v1, not {other:?}"),
    };
    anyhow::ensure!((0.0..100.0).contains(&args.stalled_percent), "--stalled-percent must be in [0, 100)");
    let origin = Instant::now();
    let counter = Arc::new(AtomicU64::new(0));
    let stalled_count = (args.subscribers as f64 * args.stalled_percent / 100.0).round() as usize;
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        let mut builder = ClientBuilder::new(&args.url).no_proxy();
        if v1 {
            builder = builder.protocol("switchboard.v1");
        }
        let (mut ws, _) = builder.connect().await?;
        if v1 {
            ws.send(json!({"type": "join", "room": args.room, "name": "sub"}).to_string()).await?;
        }
        subscribers.push(ws);
    }
    // Let joins settle so no subscriber misses the first publishes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = args.server_pid.map(|pid| pid.to_string());
    let server_before = server.as_deref().and_then(super::echo::cpu_seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let printer = progress("deliveries", counter.clone(), stop.clone());
    let mut receivers = Vec::new();
    // The stalled ones are held open, unread, until the end.
    let stalled: Vec<_> = subscribers.drain(..stalled_count).collect();
    let readers = subscribers.len();
    let (stop_receivers, stop_signal) = tokio::sync::watch::channel(false);
    for mut ws in subscribers {
        let counter = counter.clone();
        let mut stop_signal = stop_signal.clone();
        receivers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                // Stop first: a saturated server may still be sending long after the publishers end.
                let message = tokio::select! {
                    biased;
                    _ = stop_signal.changed() => break,
                    message = ws.recv() => message,
                };
                // Text, or binary for servers that relay the bytes they got (seed 004's Node server).
                // Only the stamp is read, not the whole JSON: the client must stay cheap at 10^5-10^6
                // deliveries per second.
                let stamp = match &message {
                    Some(Ok(Message::Text(text))) => bench_stamp(text.as_bytes()),
                    Some(Ok(Message::Binary(bytes))) => bench_stamp(bytes),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => break,
                };
                if let Some(sent_us) = stamp {
                    let now_us = origin.elapsed().as_micros() as u64;
                    latencies.push(now_us.saturating_sub(sent_us).min(u32::MAX as u64) as u32);
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let published = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let mut builder = ClientBuilder::new(&args.url).no_proxy();
        if v1 {
            builder = builder.protocol("switchboard.v1");
        }
        let (mut ws, _) = builder.connect().await?;
        let (published, room, rate, duration) = (published.clone(), args.room.clone(), args.rate, args.duration);
        let padding = " ".repeat(args.size);
        publishers.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(duration);
            let mut sent = 0u64;
            while Instant::now() < end {
                ticker.tick().await;
                // Everything due by now, not one message a turn: on a core busy with a thousand
                // subscribers' reads, a publisher waits its turn behind them, and one message per turn
                // would cap its rate (at about 900/s here) below what was asked for.
                let due = (start.elapsed().as_secs_f64() * rate) as u64 + 1;
                let before = sent;
                while sent < due {
                    let text = format!("bench:{}{padding}", origin.elapsed().as_micros());
                    let envelope = if v1 {
                        json!({"type": "publish", "room": room, "message": text, "name": format!("pub{p}")})
                    } else {
                        json!({"name": format!("pub{p}"), "message": text})
                    };
                    // The server cuts off any member that falls behind reading, a publisher reading its
                    // own copies included: say which connection ended.
                    ws.feed(envelope.to_string()).await.with_context(|| format!("publisher {p}"))?;
                    sent += 1;
                }
                ws.flush().await.with_context(|| format!("publisher {p}"))?;
                published.fetch_add(sent - before, Ordering::Relaxed);
                // Drain whatever the server sends the publisher (its own copies, acks).
                while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, ws.recv()).await {}
            }
            anyhow::Ok(())
        }));
    }
    for publisher in publishers {
        publisher.await??;
    }
    // Give the last messages time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_after = server.as_deref().and_then(super::echo::cpu_seconds);
    stop.store(true, Ordering::Relaxed);
    let _ = stop_receivers.send(true);
    let mut latencies = Vec::new();
    for receiver in receivers {
        latencies.extend(receiver.await?);
    }
    let _ = printer.await;
    drop(stalled);
    let published = published.load(Ordering::Relaxed);
    let expected = published * readers as u64;
    let delivered = latencies.len() as u64;
    let (p50, p99, p999) = percentiles(&mut latencies);
    // Everything the server spent from the first publish to the end of the drain, per delivery.
    let server_us_per_delivery = match (server_before, server_after) {
        (Some((u0, k0)), Some((u1, k1))) if delivered > 0 => json!((u1 + k1 - u0 - k0) * 1e6 / delivered as f64),
        _ => serde_json::Value::Null,
    };
    Ok(json!({
        "mode": "fanout", "url": args.url, "protocol": args.protocol, "subscribers": args.subscribers,
        "stalled": stalled_count, "publishers": args.publishers, "rate_per_publisher": args.rate,
        "size": args.size, "duration_s": args.duration,
        "published": published, "delivered": delivered, "deliveries_per_s": delivered as f64 / args.duration,
        "lost": expected.saturating_sub(delivered), "p50_us": p50, "p99_us": p99, "p999_us": p999,
        "server_cpu_us_per_delivery": server_us_per_delivery,
    }))
}

/// The publish time in a delivered message: the digits after `bench:`.
fn bench_stamp(bytes: &[u8]) -> Option<u64> {
    let at = bytes.windows(6).position(|w| w == b"bench:")? + 6;
    let digits = bytes[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&bytes[at..at + digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_is_read_from_any_envelope() {
        assert_eq!(bench_stamp(br#"{"name":"p","message":"bench:123456","time":"x"}"#), Some(123456));
        assert_eq!(bench_stamp(br#"{"type":"message","message":"bench:42    ","offset":1}"#), Some(42));
        assert_eq!(bench_stamp(br#"{"message":"hello"}"#), None);
        assert_eq!(bench_stamp(b"bench:"), None);
    }
}
