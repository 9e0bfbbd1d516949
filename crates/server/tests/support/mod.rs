//! Starting the real `switchboard` binary for tests, and stopping it when the test ends.

#![allow(dead_code)] // each test file uses part of this

pub mod chat;
pub mod metrics;
pub mod redis;
pub mod sse;

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `switchboard` process; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// Sends the process a signal (`TERM`, `INT`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-s", name, &pid]).status().unwrap();
        assert!(status.success(), "kill -s {name} {pid}");
    }
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

/// Spawns `command`, a `switchboard` listening on port 0, with its log at info on a pipe, and reads
/// the log up to the line that names its address (`marker`, then a URL; in text or JSON): a port
/// picked ahead and bound later could be taken meanwhile by another test's server. The child, its
/// address, and the rest of its log, which the caller must keep reading (a full pipe blocks it).
pub fn spawn_listening(mut command: Command, marker: &str) -> (Child, String, Lines<BufReader<ChildStderr>>) {
    let mut child = command
        .env("SWITCHBOARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchboard");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let addr = loop {
        let line = lines.next().and_then(Result::ok);
        let line = line.unwrap_or_else(|| panic!("switchboard exited before it logged {marker:?}"));
        if let Some((_, url)) = line.split_once(marker).and_then(|(_, rest)| rest.split_once("://")) {
            break url.split(['/', '"', ' ']).next().unwrap_or_default().to_owned();
        }
        eprintln!("{line}");
    };
    wait_listening(&addr);
    (child, addr, lines)
}

/// Starts `switchboard echo` with extra arguments (see [`spawn_listening`]).
pub fn start_echo(extra: &[&str]) -> Server {
    let mut command = switchboard();
    command.args(["echo", "--listen", "127.0.0.1:0"]).args(extra);
    let (child, addr, lines) = spawn_listening(command, "listening on ");
    std::thread::spawn(move || lines.for_each(drop));
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

/// Starts `switchboard serve` with a fresh database on a port of its own choosing (port 0), read
/// from its log: a port picked ahead and bound later can be taken meanwhile by another test's
/// server (or Redis).
pub fn start_serve(extra: &[&str]) -> (Server, std::path::PathBuf) {
    let db = temp_dir("serve").join("chat.db");
    (start_serve_with_db(&db, extra), db)
}

/// [`start_serve`] with the database at `db`.
pub fn start_serve_with_db(db: &std::path::Path, extra: &[&str]) -> Server {
    let mut command = switchboard();
    command.args(["serve", "--listen", "127.0.0.1:0", "--db"]).arg(db).args(extra);
    let (child, addr, lines) = spawn_listening(command, "switchboard serving ");
    // Drain the log, passing warnings and errors on.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("{line}");
            }
        }
    });
    Server { child, addr }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), with `key` as a Bearer token;
/// the status and the body, as JSON when it is JSON (else as a JSON string).
pub fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_owned())))
}
