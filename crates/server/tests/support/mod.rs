//! Starting the real `switchboard` binary for tests, and stopping it when the test ends.

#![allow(dead_code)] // each test file uses part of this

pub mod chat;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `switchboard` process; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn switchboard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
}

/// Starts `switchboard echo` with extra arguments on a port of its own choosing (port 0), and reads
/// the address it took from its log: a port picked ahead and bound later can be taken meanwhile by
/// another test's server.
pub fn start_echo(extra: &[&str]) -> Server {
    use std::io::{BufRead, BufReader};
    let mut child = switchboard()
        .args(["echo", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("SWITCHBOARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchboard echo");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let addr = loop {
        let line = lines.next().and_then(Result::ok).expect("switchboard echo exited before it listened");
        if let Some((_, url)) = line.split_once("listening on ") {
            let url = url.split_whitespace().next().unwrap_or_default();
            break url.split_once("://").map_or(url, |(_, addr)| addr).trim_end_matches('/').to_owned();
        }
    };
    // Drain the log, so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    wait_listening(&addr);
    Server { child, addr }
}

pub fn wait_listening(addr: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh directory under the test target dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `switchboard serve` on `addr` with its database at `db`.
pub fn start_serve_at(addr: &str, db: &std::path::Path, extra: &[&str]) -> Server {
    let child = switchboard()
        .args(["serve", "--listen", addr, "--db"])
        .arg(db)
        .args(extra)
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start switchboard serve");
    wait_listening(addr);
    Server { child, addr: addr.to_owned() }
}

/// Starts `switchboard serve` on a free port with a fresh database.
pub fn start_serve(extra: &[&str]) -> (Server, std::path::PathBuf) {
    let db = temp_dir("serve").join("chat.db");
    let addr = format!("127.0.0.1:{}", free_port());
    (start_serve_at(&addr, &db, extra), db)
}
