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
//! A progress line goes to stderr every second; a table (or `--json`) to stdout at the end. Each mode
//! is a file of its own; what they share (raw connections, progress, percentiles) is here.

mod churn;
mod connect;
mod echo;
mod fanout;
mod idle;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::{Buf, BytesMut};
use switchboard_ws::proto::handshake::{self, ClientRequest};
use switchboard_ws::WsUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub use crate::cli::{BenchMode, ChurnArgs, ConnectArgs, EchoArgs, FanoutArgs, IdleArgs};

pub async fn run(mode: BenchMode) -> anyhow::Result<()> {
    // Each mode's report, and the count in it of what the mode measures (a fan-out that cannot start
    // fails outright).
    let (as_json, report, measured) = match mode {
        BenchMode::Echo(args) => (args.json, echo::run(args).await?, Some("messages")),
        BenchMode::Fanout(args) => (args.json, fanout::run(args).await?, None),
        BenchMode::Connect(args) => (args.json, connect::run(args).await?, Some("handshakes")),
        BenchMode::Idle(args) => (args.json, idle::run(args).await?, Some("opened")),
        BenchMode::Churn(args) => (args.json, churn::run(args).await?, Some("sessions")),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    // A run that measured nothing but failures is a failed run (exit 1).
    let errors = report["errors"].as_u64().unwrap_or(0);
    if errors > 0 && measured.is_some_and(|count| report[count].as_u64() == Some(0)) {
        anyhow::bail!("nothing was measured: {errors} connections failed (the log says why)");
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
