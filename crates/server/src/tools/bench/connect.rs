//! `bench connect`: handshakes per second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_ws::WsUrl;
use tokio::io::AsyncWriteExt;

use super::*;

pub(super) async fn run(args: ConnectArgs) -> anyhow::Result<serde_json::Value> {
    let url = WsUrl::parse(&args.url)?;
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let printer = progress("handshakes", counter.clone(), stop.clone());
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let (url, counter) = (url.clone(), counter.clone());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < end {
                let started = Instant::now();
                match raw_connect(&url, None).await {
                    Ok((mut stream, _)) => {
                        latencies.push(started.elapsed().as_micros() as u32);
                        counter.fetch_add(1, Ordering::Relaxed);
                        // A masked close frame with code 1000, then hang up.
                        let _ = stream.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]).await;
                    }
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for worker in workers {
        let (l, e) = worker.await?;
        latencies.extend(l);
        errors += e;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = printer.await;
    let done = latencies.len();
    let (p50, p99, p999) = percentiles(&mut latencies);
    Ok(json!({
        "mode": "connect", "url": args.url, "concurrency": args.connections, "duration_s": args.duration,
        "handshakes": done, "handshakes_per_s": done as f64 / args.duration,
        "p50_us": p50, "p99_us": p99, "p999_us": p999, "errors": errors,
    }))
}
