//! Real `redis-server` processes for the cluster tests: each on its own free port and directory,
//! killed when the test ends.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, temp_dir};

/// Whether `redis-server` can be run here. Without it the cluster tests are skipped, except in CI
/// (`CI` set), where `.ci/run` installs it and a missing server is a failure.
pub fn available() -> bool {
    let found = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok();
    if !found {
        assert!(std::env::var_os("CI").is_none(), "redis-server is not installed (.ci/run installs it)");
        eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
    }
    found
}

/// A running `redis-server`; killed (SIGKILL) on drop.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
}

impl Redis {
    /// A server with no persistence.
    pub fn start() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// A server that writes every command to its append-only file before answering.
    pub fn durable() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
    }

    /// A server started with `args`. A port picked ahead can be taken before the server binds it
    /// (the tests' own clients use the same range), so a server that exits at once is started again
    /// on other ports. A cluster node's bus gets a free port of its own, not port + 10000 (past
    /// 65535 for a third of the range).
    pub fn start_with(args: &[&str]) -> Self {
        let mut last_failure = String::new();
        for _ in 0..5 {
            let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            if args.iter().any(|a| a == "--cluster-enabled") {
                args.extend(["--cluster-port".to_owned(), free_port().to_string()]);
            }
            let mut redis = Self { child: None, port: free_port(), dir: temp_dir("redis"), args };
            match redis.try_start() {
                Ok(()) => return redis,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("redis-server did not start in five tries: {last_failure}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts it again, on the same port and directory.
    pub fn restart(&mut self) {
        if let Err(failure) = self.try_start() {
            panic!("{failure}");
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let started = Instant::now();
        while self.cli(&["PING"]) != "PONG" {
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("redis-server on {} exited: {status}", self.port));
            }
            if started.elapsed() > Duration::from_secs(10) {
                self.kill();
                return Err(format!("redis-server did not answer on {}", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One `redis-cli` command's output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
