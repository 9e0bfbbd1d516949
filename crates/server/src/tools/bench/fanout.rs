//! `bench fanout`: one room, many subscribers, publishers at a fixed rate; deliveries/s, latency
//! and losses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::json;
use switchboard_ws::{ClientBuilder, ClientStream, Message, WebSocket};

use super::*;

/// What the load speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Seed,
    V1,
    SocketIo,
    /// Subscribers on `GET /sse`, publishers on `switchboard.v1` over WebSocket.
    Sse,
    /// Subscribers long-polling `GET /poll`, publishers on `switchboard.v1` over WebSocket.
    LongPoll,
}

/// A poller's place before the load starts: the cursor of a `GET /poll` that does not wait, so
/// that every message published afterwards is after it.
async fn first_cursor(url: &str, room: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut stream, host) = http_connect(url).await?;
    stream
        .write_all(
            format!("GET /poll?room={room}&wait=0 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let at = response.windows(4).position(|w| w == b"\r\n\r\n").context("no response head")? + 4;
    let answer: serde_json::Value = serde_json::from_slice(&response[at..]).context("poll answer")?;
    Ok(answer["cursor"].as_str().context("no cursor in the poll answer")?.to_owned())
}

/// Long-polls `GET /poll?room=ROOM` on one keep-alive connection until `stop`, from the cursor of
/// each answer, recording each message's delivery latency.
async fn long_poll(
    url: String,
    room: String,
    mut cursor: String,
    origin: Instant,
    counter: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<u32> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut latencies = Vec::new();
    let Ok((stream, host)) = http_connect(&url).await else { return latencies };
    let mut stream = tokio::io::BufReader::new(stream);
    loop {
        let request = format!("GET /poll?room={room}&wait=25&cursor={cursor} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let answer = async {
            stream.get_mut().write_all(request.as_bytes()).await.ok()?;
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                stream.read_line(&mut line).await.ok().filter(|n| *n > 0)?;
                if line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().ok()?;
                }
            }
            let mut body = vec![0; length];
            stream.read_exact(&mut body).await.ok()?;
            serde_json::from_slice::<serde_json::Value>(&body).ok()
        };
        let answer = tokio::select! {
            biased;
            _ = stop.changed() => break,
            answer = answer => answer,
        };
        let Some(answer) = answer else { break };
        for message in answer["messages"].as_array().into_iter().flatten() {
            if let Some(sent_us) = message["message"].as_str().and_then(|m| bench_stamp(m.as_bytes())) {
                let now_us = origin.elapsed().as_micros() as u64;
                latencies.push(now_us.saturating_sub(sent_us).min(u32::MAX as u64) as u32);
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        match answer["cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    latencies
}

/// The server of a `ws://` URL, for subscribers that speak plain HTTP to it: a connection to its
/// host and port (the scheme's default when the URL has none), and the `Host` header naming it.
async fn http_connect(url: &str) -> anyhow::Result<(tokio::net::TcpStream, String)> {
    let url = switchboard_ws::WsUrl::parse(url)?;
    anyhow::ensure!(!url.secure, "SSE and long-poll subscribers speak plain HTTP: give a ws:// URL");
    let host = url.host_header();
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .with_context(|| format!("connecting to {host}"))?;
    stream.set_nodelay(true)?;
    Ok((stream, host))
}

/// Opens `GET /sse?room=ROOM` on the URL's server: the stream, and what came after the head.
async fn sse_subscribe(url: &str, room: &str) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut stream, host) = http_connect(url).await?;
    stream.write_all(format!("GET /sse?room={room}&name=sub HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "{host} closed the SSE request");
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            anyhow::ensure!(head.starts_with(b"HTTP/1.1 200"), "{host}: {}", String::from_utf8_lossy(&head[..end]));
            return Ok((stream, head.split_off(end + 4)));
        }
        anyhow::ensure!(head.len() < 64 * 1024, "{host}: response head too long");
    }
}

/// Reads an SSE stream until `stop`, recording each event's delivery latency.
async fn read_sse(
    mut stream: tokio::net::TcpStream,
    mut pending: Vec<u8>,
    origin: Instant,
    counter: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<u32> {
    use tokio::io::AsyncReadExt;
    let mut latencies = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Every whole stamp in what has come; a stamp cut by the read waits for the rest.
        let mut consumed = 0;
        while let Some(at) = pending[consumed..].windows(6).position(|w| w == b"bench:") {
            let start = consumed + at + 6;
            let digits = pending[start..].iter().take_while(|b| b.is_ascii_digit()).count();
            if start + digits == pending.len() {
                break;
            }
            if let Some(sent_us) =
                std::str::from_utf8(&pending[start..start + digits]).ok().and_then(|d| d.parse::<u64>().ok())
            {
                let now_us = origin.elapsed().as_micros() as u64;
                latencies.push(now_us.saturating_sub(sent_us).min(u32::MAX as u64) as u32);
                counter.fetch_add(1, Ordering::Relaxed);
            }
            consumed = start + digits;
        }
        let keep = pending.len().saturating_sub(consumed.max(pending.len().saturating_sub(32)));
        pending.drain(..pending.len() - keep);
        let n = tokio::select! {
            biased;
            _ = stop.changed() => break,
            n = stream.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        pending.extend_from_slice(&buf[..n]);
    }
    latencies
}

/// Publisher `p`'s message `text` to `room`, framed for its protocol (SSE and long-poll runs
/// publish over `switchboard.v1`).
fn publish_frame(protocol: Protocol, room: &str, text: String, p: usize) -> String {
    let name = format!("pub{p}");
    match protocol {
        Protocol::V1 | Protocol::Sse | Protocol::LongPoll => {
            json!({"type": "publish", "room": room, "message": text, "name": name}).to_string()
        }
        Protocol::Seed => json!({"name": name, "message": text}).to_string(),
        Protocol::SocketIo => format!("42{}", json!(["publish", {"room": room, "message": text, "name": name}])),
    }
}

/// Connects one client and joins the room (seed clients are in the default room already).
async fn subscribe(url: &str, protocol: Protocol, room: &str) -> anyhow::Result<WebSocket<ClientStream>> {
    let mut ws = open(url, protocol).await?;
    match protocol {
        Protocol::Seed => {}
        Protocol::V1 | Protocol::Sse | Protocol::LongPoll => {
            ws.send(json!({"type": "join", "room": room, "name": "sub"}).to_string()).await?
        }
        Protocol::SocketIo => ws.send(format!("42{}", json!(["join", room]))).await?,
    }
    Ok(ws)
}

async fn open(url: &str, protocol: Protocol) -> anyhow::Result<WebSocket<ClientStream>> {
    let mut builder = match protocol {
        // Engine.IO 4 straight to its WebSocket transport, as `io(url, {transports: ["websocket"]})`.
        Protocol::SocketIo => {
            let base = url.trim_end_matches('/');
            ClientBuilder::new(format!("{base}/socket.io/?EIO=4&transport=websocket"))
        }
        _ => ClientBuilder::new(url),
    }
    .no_proxy();
    if protocol == Protocol::V1 {
        builder = builder.protocol("switchboard.v1");
    }
    let (mut ws, _) = builder.connect().await.with_context(|| format!("connecting to {url}"))?;
    if protocol == Protocol::SocketIo {
        // The server opens (`0{...}`); the client connects to the main namespace (`40`) and waits for
        // the namespace's answer (`40{...}`).
        ws.send("40").await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
                Ok(Some(Ok(Message::Text(text)))) if text.starts_with("40") => break,
                Ok(Some(Ok(_))) => continue,
                _ => bail!("{url}: no Socket.IO namespace connect"),
            }
        }
    }
    Ok(ws)
}

pub(super) async fn run(args: FanoutArgs) -> anyhow::Result<serde_json::Value> {
    let protocol = match args.protocol.as_str() {
        "seed" => Protocol::Seed,
        "v1" => Protocol::V1,
        "socketio" => Protocol::SocketIo,
        "sse" => Protocol::Sse,
        "longpoll" => Protocol::LongPoll,
        other => bail!("--protocol must be seed, v1, socketio, sse or longpoll, not {other:?}"),
    };
    let urls: Vec<&str> = args.url.split(',').filter(|u| !u.is_empty()).collect();
    anyhow::ensure!(!urls.is_empty(), "no server URL");
    anyhow::ensure!((0.0..100.0).contains(&args.stalled_percent), "--stalled-percent must be in [0, 100)");
    anyhow::ensure!(
        args.count.is_none() || (args.publishers == 1 && args.stalled_percent == 0.0),
        "--count takes one publisher and no stalled subscribers"
    );
    let origin = Instant::now();
    let counter = Arc::new(AtomicU64::new(0));
    let stalled_count = (args.subscribers as f64 * args.stalled_percent / 100.0).round() as usize;
    let mut subscribers = Vec::with_capacity(args.subscribers);
    let mut sse_subscribers = Vec::new();
    for i in 0..args.subscribers {
        if protocol == Protocol::LongPoll {
            continue; // each poller opens its own connection when the readers start
        }
        if protocol == Protocol::Sse {
            sse_subscribers.push(sse_subscribe(urls[i % urls.len()], &args.room).await?);
        } else {
            subscribers.push(subscribe(urls[i % urls.len()], protocol, &args.room).await?);
        }
    }
    anyhow::ensure!(
        protocol != Protocol::Sse || args.stalled_percent == 0.0,
        "--stalled-percent is for WebSocket subscribers"
    );
    // Let joins settle so no subscriber misses the first publishes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids: Vec<String> = args.server_pid.iter().map(u32::to_string).collect();
    let cpu = move || -> Option<(f64, f64)> {
        let mut total = (0.0, 0.0);
        for pid in &pids {
            let (user, kernel) = super::echo::cpu_seconds(pid)?;
            total = (total.0 + user, total.1 + kernel);
        }
        (!pids.is_empty()).then_some(total)
    };
    // Each join tells every member of the room, so N joins are N² presence events: the CPU counted
    // per delivery starts once the servers have written them all out.
    let quiet_since = Instant::now();
    while let Some(before) = cpu() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(after) = cpu() else { break };
        let busy = (after.0 + after.1) - (before.0 + before.1);
        if busy < 0.01 || quiet_since.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let server_before = cpu();
    let stop = Arc::new(AtomicBool::new(false));
    let printer = progress("deliveries", counter.clone(), stop.clone());
    let mut receivers = Vec::new();
    // The stalled ones are held open, unread, until the end.
    let stalled: Vec<_> = subscribers.drain(..stalled_count).collect();
    let readers = subscribers.len() + sse_subscribers.len();
    let (stop_receivers, stop_signal) = tokio::sync::watch::channel(false);
    for (stream, pending) in sse_subscribers {
        receivers.push(tokio::spawn(read_sse(stream, pending, origin, counter.clone(), stop_signal.clone())));
    }
    let readers = if protocol == Protocol::LongPoll {
        for i in 0..args.subscribers {
            let (url, room) = (urls[i % urls.len()].to_owned(), args.room.clone());
            let cursor = first_cursor(&url, &room).await?;
            receivers.push(tokio::spawn(long_poll(url, room, cursor, origin, counter.clone(), stop_signal.clone())));
        }
        args.subscribers
    } else {
        readers
    };
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
                    // Engine.IO's ping: a client that does not answer is dropped.
                    Some(Ok(Message::Text(text))) if protocol == Protocol::SocketIo && text.as_str() == "2" => {
                        if ws.send("3").await.is_err() {
                            break;
                        }
                        continue;
                    }
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
        // SSE subscribers hear what WebSocket publishers send.
        let publisher_protocol =
            if matches!(protocol, Protocol::Sse | Protocol::LongPoll) { Protocol::V1 } else { protocol };
        let mut ws = open(urls[0], publisher_protocol).await?;
        let (published, room, rate, duration) = (published.clone(), args.room.clone(), args.rate, args.duration);
        let padding = " ".repeat(args.size);
        let (closed_loop, delivered) = (args.count, counter.clone());
        publishers.push(tokio::spawn(async move {
            if let Some(count) = closed_loop {
                for k in 1..=count {
                    let text = format!("bench:{}{padding}", origin.elapsed().as_micros());
                    ws.send(publish_frame(publisher_protocol, &room, text, p))
                        .await
                        .with_context(|| format!("publisher {p}"))?;
                    published.fetch_add(1, Ordering::Relaxed);
                    let waited = Instant::now();
                    while delivered.load(Ordering::Relaxed) < k * readers as u64 {
                        anyhow::ensure!(
                            waited.elapsed() < Duration::from_secs(30),
                            "message {k} not delivered to every reader"
                        );
                        // The publisher's own copies and acks, read as they come.
                        let _ = tokio::time::timeout(Duration::from_millis(1), ws.recv()).await;
                    }
                }
                return anyhow::Ok(());
            }
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
                    let frame = publish_frame(publisher_protocol, &room, text, p);
                    // The server cuts off any member that falls behind reading, a publisher reading its
                    // own copies included: say which connection ended.
                    ws.feed(frame).await.with_context(|| format!("publisher {p}"))?;
                    sent += 1;
                }
                ws.flush().await.with_context(|| format!("publisher {p}"))?;
                published.fetch_add(sent - before, Ordering::Relaxed);
                // Drain whatever the server sends the publisher (its own copies, acks, pings).
                while let Ok(Some(message)) = tokio::time::timeout(Duration::ZERO, ws.recv()).await {
                    if let Ok(Message::Text(text)) = &message {
                        if protocol == Protocol::SocketIo && text.as_str() == "2" {
                            ws.send("3").await.with_context(|| format!("publisher {p}"))?;
                        }
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for publisher in publishers {
        publisher.await??;
    }
    // Give the last messages time to arrive (in a closed loop they all have).
    if args.count.is_none() {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let server_after = cpu();
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
