//! `switchboard bench` against our own servers: each mode reports numbers that add up.

mod support;

use serde_json::Value;
use support::{start_echo, start_serve, switchboard};

fn bench(args: &[&str]) -> Value {
    let out: std::process::Output =
        switchboard().arg("bench").args(args).arg("--json").env("SWITCHBOARD_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn echo_mode_counts_round_trips_and_latencies() {
    let server = start_echo(&[]);
    let url = format!("ws://{}/", server.addr);
    let pid = server.child.id().to_string();
    let r = bench(&["echo", &url, "-c", "4", "-s", "64", "-d", "1", "--warmup", "0.2", "--server-pid", &pid]);
    let messages = r["messages"].as_u64().unwrap();
    assert!(messages > 100, "{r}");
    assert_eq!(r["errors"], 0);
    assert!((r["msgs_per_s"].as_f64().unwrap() - messages as f64).abs() < 1.0, "1 s run: rate equals count");
    let (p50, p99) = (r["p50_us"].as_u64().unwrap(), r["p99_us"].as_u64().unwrap());
    assert!(p50 > 0 && p50 <= p99, "{r}");
    // Both ends echoed for a second at full speed: each used CPU, user plus kernel time, within the
    // machine's cores.
    for side in ["server_cpu", "client_cpu"] {
        let (busy, user, kernel) = (r[side]["busy"].as_f64(), r[side]["user"].as_f64(), r[side]["kernel"].as_f64());
        let (busy, user, kernel) = (busy.unwrap(), user.unwrap(), kernel.unwrap());
        assert!(busy > 0.0 && (user + kernel - busy).abs() < 1e-9, "{side}: {r}");
        let cores = std::thread::available_parallelism().unwrap().get() as f64;
        assert!(busy <= cores + 0.1, "{side}: {r}");
    }
    let binary = bench(&["echo", &url, "-c", "2", "-s", "2000", "--binary", "-d", "0.5", "--warmup", "0"]);
    assert_eq!((binary["frame"].as_str(), binary["errors"].as_u64()), (Some("binary"), Some(0)));
    // Nothing listening: every connection fails, and so does the run.
    let closed = format!("ws://127.0.0.1:{}/", support::free_port());
    let out = switchboard().args(["bench", "echo", &closed, "-c", "2", "-d", "0.2", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["messages"].as_u64(), report["errors"].as_u64()), (Some(0), Some(2)), "{report}");
}

#[test]
fn fanout_mode_delivers_every_message_to_every_subscriber() {
    for protocol in ["seed", "v1", "sse", "longpoll"] {
        let (server, _) = start_serve(&[]);
        let url = format!("ws://{}/ws", server.addr);
        let r = bench(&["fanout", &url, "--subscribers", "20", "--rate", "50", "-d", "1", "--protocol", protocol]);
        let published = r["published"].as_u64().unwrap();
        assert!(published >= 40, "{r}");
        assert_eq!(r["delivered"].as_u64().unwrap(), published * 20, "{protocol}: {r}");
        assert_eq!(r["lost"], 0);
    }
}

#[test]
fn fanout_counts_only_the_subscribers_that_read() {
    let (server, _) = start_serve(&[]);
    let url = format!("ws://{}/ws", server.addr);
    let r = bench(&["fanout", &url, "--subscribers", "10", "--stalled-percent", "20", "--rate", "50", "-d", "1"]);
    let published = r["published"].as_u64().unwrap();
    assert_eq!(r["stalled"], 2, "{r}");
    assert_eq!(r["delivered"].as_u64().unwrap(), published * 8, "{r}");
}

#[test]
fn idle_connections_answer_keepalive_pings_and_stay() {
    let (server, _) = start_serve(&["--keepalive-secs", "1"]);
    let url = format!("ws://{}/ws", server.addr);
    // Unanswered, the server's pings would drop every connection after 2 s.
    let r = bench(&["idle", &url, "-c", "20", "--hold", "3.5"]);
    assert_eq!((r["opened"].as_u64(), r["dropped_by_server"].as_u64()), (Some(20), Some(0)), "{r}");
    let (gone, _) = start_serve(&[]);
    let url = format!("ws://{}/ws", gone.addr);
    let holder = std::thread::spawn(move || bench(&["idle", &url, "-c", "5", "--hold", "5"]));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    drop(gone);
    let r = holder.join().unwrap();
    assert_eq!(r["dropped_by_server"], 5, "{r}");
}

#[test]
fn churn_mode_connects_chats_and_leaves_in_a_loop() {
    let (server, _) = start_serve(&[]);
    let url = format!("ws://{}/ws", server.addr);
    let r = bench(&["churn", &url, "-c", "4", "--messages", "3", "--pause-ms", "10", "-d", "1.5"]);
    let sessions = r["sessions"].as_u64().unwrap();
    assert!(sessions >= 8, "{r}");
    assert_eq!(r["acked"].as_u64().unwrap(), sessions * 3, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
}

#[test]
fn connect_and_idle_modes() {
    let server = start_echo(&[]);
    let url = format!("ws://{}/", server.addr);
    let r = bench(&["connect", &url, "-c", "4", "-d", "0.5"]);
    assert!(r["handshakes"].as_u64().unwrap() > 10, "{r}");
    assert_eq!(r["errors"], 0);
    let pid = server.child.id().to_string();
    let r = bench(&[
        "idle",
        &url,
        "-c",
        "300",
        "--hold",
        "0.2",
        "--server-pid",
        &pid,
        "--source-ips",
        "127.0.0.1,127.0.0.2",
    ]);
    assert_eq!((r["opened"].as_u64(), r["errors"].as_u64()), (Some(300), Some(0)), "{r}");
    // The server's RSS was read before and after (300 connections may fit in memory the allocator
    // already had, so the growth itself can be 0).
    assert!(r["server_rss_before_kib"].as_u64().unwrap() > 0, "{r}");
    assert!(r["server_rss_after_kib"].as_u64().unwrap() > 0, "{r}");
    assert!(r["server_kib_per_connection"].as_f64().is_some(), "{r}");
}
