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

/// Starts `switchboard echo` on a free port with extra arguments and waits until it listens.
pub fn start_echo(extra: &[&str]) -> Server {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = switchboard()
        .args(["echo", "--listen", &addr])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start switchboard echo");
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
