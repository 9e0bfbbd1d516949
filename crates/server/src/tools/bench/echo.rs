//! `bench echo`: closed-loop echo over pre-masked frames; messages/s, round trips and, given the
//! server's pid, how busy each side was.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Buf;
use serde_json::json;
use switchboard_ws::proto::frame::mask_payload;
use switchboard_ws::proto::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};
use switchboard_ws::WsUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

struct EchoStats {
    messages: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

pub(super) async fn run(args: EchoArgs) -> anyhow::Result<serde_json::Value> {
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
pub(super) fn cpu_seconds(pid: &str) -> Option<(f64, f64)> {
    cpu_seconds_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub(super) fn cpu_seconds_in(stat: &str) -> Option<(f64, f64)> {
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
    mask_payload(&mut frame[n..], key);
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
}
