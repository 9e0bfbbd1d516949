//! Measures permessage-deflate against a running echo server (`benches/compression.sh` drives it):
//!
//! - `throughput URL SECONDS CONNECTIONS`: closed-loop echo of a 16 KiB JSON-like text message, once
//!   with compression offered and once without; prints messages/s and payload MB/s for both, and the
//!   bytes one message takes on the wire with and without compression.
//! - `idle URL COUNT SERVER_PID [plain]`: opens COUNT connections with compression negotiated (or,
//!   with `plain`, without), exchanges one message on each (so both sides' zlib state is allocated),
//!   and reports the server's RSS growth per connection.

use std::time::{Duration, Instant};

use switchboard_ws::proto::deflate::{accept_response, client_offer, negotiate_server, DeflateConfig};
use switchboard_ws::proto::{Connection, Role};
use switchboard_ws::{ClientBuilder, Config, Message};

/// A chat-like JSON document of about 16 KiB: realistic repetition, not a run of one byte.
fn json_message() -> String {
    let mut out = String::from("[");
    let names = ["alice", "bob", "carol", "dave", "erin", "frank"];
    let mut i = 0usize;
    while out.len() < 16 * 1024 - 120 {
        let name = names[i % names.len()];
        out.push_str(&format!(
            r#"{{"id":{},"room":"lobby","name":"{}","message":"message number {} from {} about item {}","time":"12:{:02}:{:02}"}},"#,
            1000 + i * 7,
            name,
            i,
            name,
            (i * 2654435761) % 9973,
            i % 60,
            (i * 7) % 60
        ));
        i += 1;
    }
    out.pop();
    out.push(']');
    out
}

fn wire_size(message: &str, compress: bool) -> usize {
    let config = DeflateConfig::default();
    let mut conn = Connection::new(Role::Server, Default::default());
    if compress {
        let (params, response) = negotiate_server(&[client_offer(&config)], &config).unwrap();
        assert_eq!(accept_response(&response, &config).unwrap(), params);
        conn.enable_deflate(params, &config);
    }
    conn.send_text(message).unwrap();
    conn.take_output().len()
}

async fn throughput(url: &str, seconds: u64, connections: usize, compress: bool) -> anyhow::Result<(f64, usize)> {
    let message = json_message();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut config = Config::default();
        if compress {
            config = config.compression(DeflateConfig::default());
        }
        let (mut ws, accepted) = ClientBuilder::new(url).config(config).connect().await?;
        anyhow::ensure!(
            accepted.extensions.is_some() == compress,
            "compression negotiation: {:?}",
            accepted.extensions
        );
        let message = message.clone();
        tasks.push(tokio::spawn(async move {
            let mut count = 0u64;
            while Instant::now() < deadline {
                ws.send(message.as_str()).await?;
                match ws.recv().await {
                    Some(Ok(Message::Text(t))) if t.len() == message.len() => count += 1,
                    other => anyhow::bail!("unexpected reply {other:?}"),
                }
            }
            ws.close(1000, "").await?;
            Ok::<_, anyhow::Error>(count)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok((total as f64 / seconds as f64, message.len()))
}

fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("throughput") => {
            let (url, seconds, connections) = (&args[2], args[3].parse()?, args[4].parse()?);
            let plain = throughput(url, seconds, connections, false).await?;
            let compressed = throughput(url, seconds, connections, true).await?;
            let message = json_message();
            let (raw_wire, deflate_wire) = (wire_size(&message, false), wire_size(&message, true));
            println!("message_bytes={} wire_plain={} wire_deflate={}", plain.1, raw_wire, deflate_wire);
            println!("plain_msgs_per_s={:.0} plain_payload_MBps={:.1}", plain.0, plain.0 * plain.1 as f64 / 1e6);
            println!(
                "deflate_msgs_per_s={:.0} deflate_payload_MBps={:.1} ratio_deflate_to_plain={:.3}",
                compressed.0,
                compressed.0 * compressed.1 as f64 / 1e6,
                compressed.0 / plain.0
            );
        }
        Some("idle") => {
            let (url, count, pid): (&str, usize, &str) = (&args[2], args[3].parse()?, &args[4]);
            // A fifth argument "plain" measures the same without compression, as the baseline.
            let compress = args.get(5).map(String::as_str) != Some("plain");
            let before = rss_kib(pid)?;
            let mut sockets = Vec::with_capacity(count);
            for _ in 0..count {
                let mut config = Config::default();
                if compress {
                    config = config.compression(DeflateConfig::default());
                }
                let (mut ws, accepted) = ClientBuilder::new(url).config(config).connect().await?;
                anyhow::ensure!(accepted.extensions.is_some() == compress, "compression negotiation");
                ws.send(r#"{"name":"idle","message":"one message so both zlib states exist"}"#.repeat(4)).await?;
                ws.recv().await;
                sockets.push(ws);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = rss_kib(pid)?;
            println!(
                "connections={count} server_rss_before_kib={before} server_rss_after_kib={after} per_connection_kib={:.1}",
                (after - before) as f64 / count as f64
            );
        }
        _ => anyhow::bail!("usage: deflate_bench throughput URL SECONDS CONNECTIONS | idle URL COUNT SERVER_PID"),
    }
    Ok(())
}
