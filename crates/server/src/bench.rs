//! `switchboard bench`: a load generator for any WebSocket server.
//!
//! - `echo`: C connections in a closed loop, each sending its next S-byte message when the echo of
//!   the last arrives. The frame is built and masked once; each round trip is a write of those bytes
//!   and a header parse of the reply, so the client costs little next to the server it measures.
//! - `fanout`: N subscribers in a room, publishers at a fixed rate; delivery latency (publish to
//!   receive, one clock since everything runs here) and losses.
//! - `connect`: handshakes per second.
//! - `idle`: opens N connections (spread over several 127.0.0.x source addresses, past the
//!   ephemeral-port limit of one) and holds them; reports the server's RSS per connection when given
//!   its pid.
//! - `churn`: `switchboard.v1` clients that connect, join, publish, read their acks and leave, over
//!   and over (the soak test's load).
//!
//! A progress line goes to stderr every second; a table (or `--json`) to stdout at the end.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::{Buf, BytesMut};
use serde_json::json;
use switchboard_ws::proto::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};
use switchboard_ws::proto::handshake::{self, ClientRequest};
use switchboard_ws::proto::mask::apply_mask;
use switchboard_ws::{ClientBuilder, Message, WsUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(clap::Subcommand, Debug)]
pub enum BenchMode {
    /// Closed-loop echo: messages/s and round-trip latency.
    Echo(EchoArgs),
    /// One room, many subscribers, publishers at a fixed rate: deliveries/s, latency, losses.
    Fanout(FanoutArgs),
    /// Handshakes per second.
    Connect(ConnectArgs),
    /// Open connections and hold them.
    Idle(IdleArgs),
    /// Clients that connect, chat and disconnect in a loop (switchboard.v1).
    Churn(ChurnArgs),
}

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    pub url: String,
    #[arg(long, short = 'c', default_value_t = 100)]
    pub connections: usize,
    /// Payload bytes per message.
    #[arg(long, short = 's', default_value_t = 20)]
    pub size: usize,
    /// Send binary frames instead of text.
    #[arg(long)]
    pub binary: bool,
    /// Seconds measured, after the warm-up.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Send exactly this many messages in all (spread over the connections), with no warm-up and no
    /// time limit: for instruction counts under callgrind, which must not depend on time.
    #[arg(long)]
    pub count: Option<u64>,
    /// The server's pid, to report how busy its core was, and with what (user or kernel time).
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    pub url: String,
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Messages per second, per publisher.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// `seed` ({name, message} JSON, no subprotocol) or `v1` (switchboard.v1 join and publish).
    #[arg(long, default_value = "seed")]
    pub protocol: String,
    /// Room for `v1` (seed clients are in the server's default room).
    #[arg(long, default_value = "lobby")]
    pub room: String,
    /// Bytes of padding added to each message.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Percent of the subscribers that join and then never read (slow consumers); latency and losses
    /// are counted over the others.
    #[arg(long, default_value_t = 0.0)]
    pub stalled_percent: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ChurnArgs {
    pub url: String,
    /// Clients connected at once.
    #[arg(long, short = 'c', default_value_t = 500)]
    pub connections: usize,
    /// Messages each client publishes (and waits acks for) before it leaves.
    #[arg(long, default_value_t = 5)]
    pub messages: usize,
    /// Rooms the clients spread over.
    #[arg(long, default_value_t = 50)]
    pub rooms: usize,
    /// Milliseconds a client waits between its messages.
    #[arg(long, default_value_t = 200)]
    pub pause_ms: u64,
    #[arg(long, short = 'd', default_value_t = 60.0)]
    pub duration: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ConnectArgs {
    pub url: String,
    /// Handshakes in flight at once.
    #[arg(long, short = 'c', default_value_t = 50)]
    pub connections: usize,
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    pub url: String,
    #[arg(long, short = 'c', default_value_t = 10_000)]
    pub connections: usize,
    /// Seconds to hold them once open.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Local addresses to connect from, round robin (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// The server's pid, to report its RSS per connection.
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(mode: BenchMode) -> anyhow::Result<()> {
    let (as_json, report) = match mode {
        BenchMode::Echo(args) => (args.json, echo(args).await?),
        BenchMode::Fanout(args) => (args.json, fanout(args).await?),
        BenchMode::Connect(args) => (args.json, connect(args).await?),
        BenchMode::Idle(args) => (args.json, idle(args).await?),
        BenchMode::Churn(args) => (args.json, churn(args).await?),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &serde_json::Value) {
    let width = report.as_object().map_or(0, |o| o.keys().map(String::len).max().unwrap_or(0));
    for (key, value) in report.as_object().into_iter().flatten() {
        let shown = match value {
            serde_json::Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
            other => other.to_string().trim_matches('"').to_owned(),
        };
        println!("{key:<width$}  {shown}");
    }
}

/// Latency percentiles in microseconds from unsorted samples.
fn percentiles(samples: &mut [u32]) -> (u32, u32, u32) {
    if samples.is_empty() {
        return (0, 0, 0);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99), at(0.999))
}

/// Prints how many events happened in each second until `stop` is set.
fn progress(label: &'static str, counter: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        while !stop.load(Ordering::Relaxed) {
            ticker.tick().await;
            let now = counter.load(Ordering::Relaxed);
            eprint!("\r{label}: {:>10}/s   ", now - last);
            last = now;
        }
        eprintln!();
    })
}

// ------------------------------------------------------------------------------------------------
// echo

struct EchoStats {
    messages: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

async fn echo(args: EchoArgs) -> anyhow::Result<serde_json::Value> {
    let url = WsUrl::parse(&args.url)?;
    anyhow::ensure!(!url.secure, "bench echo speaks ws:// only");
    let start = Instant::now();
    let (measure_from, end) = match args.count {
        Some(_) => (start, start + Duration::from_secs(86400)),
        None => {
            let measure_from = start + Duration::from_secs_f64(args.warmup);
            (measure_from, measure_from + Duration::from_secs_f64(args.duration))
        }
    };
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let printer = progress("echo", counter.clone(), stop.clone());
    // CPU use over the measured window: who was saturated (the server, or this load generator) and
    // how much of the server's time was its own code rather than the kernel's.
    let cpu_sampler = args.count.is_none().then(|| {
        let server = args.server_pid.map(|pid| pid.to_string());
        tokio::spawn(async move {
            let sample = || (server.as_deref().and_then(cpu_seconds), cpu_seconds("self"));
            tokio::time::sleep_until(measure_from.into()).await;
            let before = sample();
            tokio::time::sleep_until(end.into()).await;
            (before, sample())
        })
    });
    let mut workers = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let (url, counter) = (url.clone(), counter.clone());
        let (size, binary) = (args.size, args.binary);
        let connections = args.connections as u64;
        let quota = args.count.map(|n| n / connections + u64::from((i as u64) < n % connections));
        workers
            .push(tokio::spawn(async move { echo_worker(url, size, binary, measure_from, end, quota, counter).await }));
    }
    let (mut messages, mut errors, mut latencies) = (0u64, 0u64, Vec::new());
    for worker in workers {
        match worker.await? {
            Ok(stats) => {
                messages += stats.messages;
                errors += stats.errors;
                latencies.extend(stats.latencies_us);
            }
            Err(error) => {
                errors += 1;
                tracing::warn!(%error, "echo connection failed");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = printer.await;
    let (p50, p99, p999) = percentiles(&mut latencies);
    let elapsed = start.elapsed().as_secs_f64();
    let rate = messages as f64 / if args.count.is_some() { elapsed } else { args.duration };
    let (mut server_cpu, mut client_cpu) = (serde_json::Value::Null, serde_json::Value::Null);
    if let Some(sampler) = cpu_sampler {
        let ((server_before, client_before), (server_after, client_after)) = sampler.await?;
        server_cpu = cpu_use(server_before, server_after, args.duration);
        client_cpu = cpu_use(client_before, client_after, args.duration);
    }
    Ok(json!({
        "mode": "echo", "url": args.url, "connections": args.connections, "size": args.size,
        "frame": if args.binary { "binary" } else { "text" }, "duration_s": args.duration,
        "messages": messages, "msgs_per_s": rate, "bytes_per_s": rate * args.size as f64 * 2.0,
        "p50_us": p50, "p99_us": p99, "p999_us": p999, "errors": errors,
        "server_cpu": server_cpu, "client_cpu": client_cpu,
    }))
}

/// CPU seconds a process has used so far, (user, kernel), from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> Option<(f64, f64)> {
    cpu_seconds_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn cpu_seconds_in(stat: &str) -> Option<(f64, f64)> {
    /// /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    const TICKS_PER_SECOND: f64 = 100.0;
    // The fields after the command name, which is in parentheses and may itself contain spaces.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    let seconds = |index: usize| Some(fields.get(index)?.parse::<f64>().ok()? / TICKS_PER_SECOND);
    // utime and stime are the 14th and 15th fields; `fields` starts at the 3rd.
    Some((seconds(11)?, seconds(12)?))
}

/// Share of one core used between two samples, in all and as user and kernel time.
fn cpu_use(before: Option<(f64, f64)>, after: Option<(f64, f64)>, seconds: f64) -> serde_json::Value {
    let (Some((user0, kernel0)), Some((user1, kernel1))) = (before, after) else {
        return serde_json::Value::Null;
    };
    let (user, kernel) = ((user1 - user0) / seconds, (kernel1 - kernel0) / seconds);
    json!({ "busy": user + kernel, "user": user, "kernel": kernel })
}

/// Opens a raw connection and completes the client handshake by hand.
async fn raw_connect(url: &WsUrl, source: Option<IpAddr>) -> anyhow::Result<(TcpStream, BytesMut)> {
    let addr: SocketAddr =
        tokio::net::lookup_host((url.host.as_str(), url.port)).await?.next().context("no address for host")?;
    let stream = match source {
        Some(ip) => {
            let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    let mut stream = stream;
    let request = ClientRequest::new(url.host_header(), url.target.clone());
    stream.write_all(&request.encode()?).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if let Some((head, used)) = handshake::parse_response(&buf, 8192)? {
            handshake::verify_response(&request, head)?;
            buf.advance(used);
            return Ok((stream, buf));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("server closed during the handshake");
        }
    }
}

async fn echo_worker(
    url: WsUrl,
    size: usize,
    binary: bool,
    measure_from: Instant,
    end: Instant,
    quota: Option<u64>,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<EchoStats> {
    let (mut stream, mut buf) = raw_connect(&url, None).await?;
    // One frame, masked once with a fixed key, written as is for every message.
    let opcode = if binary { OpCode::Binary } else { OpCode::Text };
    let key = [0x5a, 0x17, 0xc3, 0x9e];
    let header = FrameHeader { fin: true, rsv: 0, opcode, mask: Some(key), payload_len: size as u64 };
    let mut head = [0u8; MAX_HEADER_LEN];
    let n = header.encode(&mut head);
    let mut frame = head[..n].to_vec();
    frame.extend(std::iter::repeat_n(b'x', size));
    apply_mask(&mut frame[n..], key, 0);
    let mut stats = EchoStats { messages: 0, errors: 0, latencies_us: Vec::with_capacity(1 << 16) };
    let mut sent_count = 0u64;
    while Instant::now() < end && quota.is_none_or(|quota| sent_count < quota) {
        sent_count += 1;
        let sent = Instant::now();
        stream.write_all(&frame).await?;
        // Read until one data frame of our size has come back; control frames are skipped.
        loop {
            if let Some((header, header_len)) = FrameHeader::decode(&buf)? {
                let total = header_len + header.payload_len as usize;
                if buf.len() >= total {
                    buf.advance(total);
                    if header.opcode == OpCode::Close {
                        bail!("server closed the connection");
                    }
                    if !header.opcode.is_control() {
                        if header.payload_len as usize != size {
                            stats.errors += 1;
                        }
                        break;
                    }
                    continue;
                }
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("server closed the connection");
            }
        }
        if sent >= measure_from {
            stats.messages += 1;
            stats.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(stats)
}

// ------------------------------------------------------------------------------------------------
// fanout

async fn fanout(args: FanoutArgs) -> anyhow::Result<serde_json::Value> {
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
    Ok(json!({
        "mode": "fanout", "url": args.url, "protocol": args.protocol, "subscribers": args.subscribers,
        "stalled": stalled_count, "publishers": args.publishers, "rate_per_publisher": args.rate,
        "size": args.size, "duration_s": args.duration,
        "published": published, "delivered": delivered, "deliveries_per_s": delivered as f64 / args.duration,
        "lost": expected.saturating_sub(delivered), "p50_us": p50, "p99_us": p99, "p999_us": p999,
    }))
}

/// The publish time in a delivered message: the digits after `bench:`.
fn bench_stamp(bytes: &[u8]) -> Option<u64> {
    let at = bytes.windows(6).position(|w| w == b"bench:")? + 6;
    let digits = bytes[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&bytes[at..at + digits]).ok()?.parse().ok()
}

// ------------------------------------------------------------------------------------------------
// connect

async fn connect(args: ConnectArgs) -> anyhow::Result<serde_json::Value> {
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

// ------------------------------------------------------------------------------------------------
// idle

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

async fn idle(args: IdleArgs) -> anyhow::Result<serde_json::Value> {
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
                    apply_mask(&mut frame[n..], key, 0);
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

// ------------------------------------------------------------------------------------------------
// churn

async fn churn(args: ChurnArgs) -> anyhow::Result<serde_json::Value> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_times_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (echo (a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(super::cpu_seconds_in(stat), Some((2.5, 0.75)));
        assert_eq!(super::cpu_seconds_in("4242 (cut short) S 1"), None);
        let own = super::cpu_seconds("self").expect("this process's own times");
        assert!(own.0 >= 0.0 && own.1 >= 0.0);
    }

    use super::*;

    #[test]
    fn the_stamp_is_read_from_any_envelope() {
        assert_eq!(bench_stamp(br#"{"name":"p","message":"bench:123456","time":"x"}"#), Some(123456));
        assert_eq!(bench_stamp(br#"{"type":"message","message":"bench:42    ","offset":1}"#), Some(42));
        assert_eq!(bench_stamp(br#"{"message":"hello"}"#), None);
        assert_eq!(bench_stamp(b"bench:"), None);
    }
}
