//! The command line: every command's argument types (`serve`'s settings live in [`crate::config`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::chat::access::{self, Claims};
use crate::config::ServeArgs;
use switchboard_ws::tls::TlsAcceptor;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "A WebSocket stack and real-time server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How log lines on stderr are written: `text` for people (coloured only on a terminal), `json`
    /// (one object per line) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SWITCHBOARD_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// See [`Cli::log_format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the chat server: the page at /, the WebSocket at /ws (seed protocol, or switchboard.v1).
    Serve(Box<ServeArgs>),
    /// Load generator for any WebSocket server: echo, fanout, connect, idle and churn modes.
    Bench {
        #[command(subcommand)]
        mode: BenchMode,
    },
    /// Echo every text and binary message back to its sender (the Autobahn testee).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9002", env = "SWITCHBOARD_LISTEN")]
        listen: SocketAddr,
        /// Largest message accepted, in bytes (Autobahn sends up to 16 MiB).
        #[arg(long, default_value_t = 64 << 20)]
        max_message_size: usize,
        /// Largest frame accepted, in bytes.
        #[arg(long, default_value_t = 64 << 20)]
        max_frame_size: usize,
        /// Do not accept permessage-deflate (compression is on by default).
        #[arg(long)]
        no_compression: bool,
        /// Largest deflate window the server compresses with, 8-15 (memory: 2^(bits+2) bytes).
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u8).range(8..=15))]
        deflate_window_bits: u8,
        /// zlib memory level of the compressor, 1-9 (memory: 2^(level+9) bytes).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=9))]
        deflate_mem_level: u8,
        /// Share the port with other processes (SO_REUSEPORT): run several to hold more connections
        /// than one process may open files for, or one per core with --threads 1.
        #[arg(long)]
        reuse_port: bool,
        /// Worker threads: 0 is one per core (tokio's multi-threaded runtime), 1 a current-thread
        /// runtime (with --reuse-port, the way to run one process per core), N a multi-threaded
        /// runtime of N workers (at most 1024).
        #[arg(long, default_value_t = 0, env = "SWITCHBOARD_THREADS")]
        threads: usize,
        /// Largest handshake request head, in bytes; a longer one gets 431 (as `serve`'s setting).
        #[arg(long, default_value_t = switchboard_ws::proto::handshake::DEFAULT_MAX_HEAD_BYTES,
              value_parser = head_bytes,
              env = "SWITCHBOARD_MAX_REQUEST_HEAD_BYTES")]
        max_request_head_bytes: usize,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Mint a JWT for trying out a server started with --jwt-secret (or --jwt-public-key).
    Token(TokenArgs),
    /// Connect to a WebSocket server: stdin lines are sent, received messages printed.
    ///
    /// Exits 0 after a normal close, 1 when the server closes with another code, 2 on errors.
    Connect {
        /// ws:// or wss:// URL.
        url: String,
        /// Send each line as a binary message.
        #[arg(long)]
        binary: bool,
        /// Pretty-print received JSON.
        #[arg(long)]
        json: bool,
        /// Extra request header, "Name: value" (repeatable).
        #[arg(long = "header", short = 'H', value_parser = crate::tools::connect::parse_header)]
        headers: Vec<(String, String)>,
        /// Offer a subprotocol (repeatable, in preference order).
        #[arg(long = "subprotocol")]
        protocols: Vec<String>,
        /// Ping when the server has been quiet this many seconds; give up if it does not answer.
        #[arg(long, value_name = "SECONDS")]
        ping_interval: Option<f64>,
        /// Do not offer permessage-deflate.
        #[arg(long)]
        no_compression: bool,
        /// Also trust the CA certificates in this PEM file (for wss://).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Use this http:// proxy (default: HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment).
        #[arg(long)]
        proxy: Option<String>,
        /// After the end of input, keep reading this many seconds before closing (replies to piped
        /// lines are still on their way when the pipe ends).
        #[arg(long, value_name = "SECONDS")]
        linger: Option<f64>,
    },
}

#[derive(clap::Args)]
pub struct TokenArgs {
    /// Who the token is for (the `sub` claim; also the display name unless --name is given).
    #[arg(long)]
    sub: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// A room the holder may join and publish to; a trailing * matches a prefix (repeatable).
    /// Without --room, --join or --publish the token grants every room.
    #[arg(long = "room")]
    rooms: Vec<String>,
    /// A room the holder may join (read) but not publish to (repeatable).
    #[arg(long = "join")]
    join: Vec<String>,
    /// A room the holder may publish to without joining (repeatable).
    #[arg(long = "publish")]
    publish: Vec<String>,
    /// Seconds until the token expires (at most ten years).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=MAX_TOKEN_TTL_SECS))]
    ttl_secs: u64,
    /// HS256 shared secret (the server's --jwt-secret); or give --private-key instead.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true, required_unless_present = "private_key")]
    secret: Option<String>,
    /// PEM private key (RSA gives RS256, P-256 gives ES256) instead of a secret.
    #[arg(long, conflicts_with = "secret")]
    private_key: Option<PathBuf>,
}

/// Longest lifetime `switchboard token` gives: far past any sensible use, and well inside what a
/// server can represent as a time.
const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

impl TokenArgs {
    pub fn mint(self) -> anyhow::Result<String> {
        anyhow::ensure!(!self.sub.is_empty(), "--sub is empty: a token names its user");
        anyhow::ensure!(
            !self.secret.as_ref().is_some_and(String::is_empty),
            "--secret is empty (is the variable it came from set?)"
        );
        for grant in self.rooms.iter().chain(&self.join).chain(&self.publish) {
            access::check_grant(grant).map_err(|reason| anyhow::anyhow!("room grant {grant:?}: {reason}"))?;
        }
        let list = |l: Vec<String>| (!l.is_empty()).then_some(l);
        let claims = Claims {
            sub: self.sub,
            exp: access::unix_now() + self.ttl_secs,
            name: self.name,
            rooms: list(self.rooms),
            join: list(self.join),
            publish: list(self.publish),
        };
        Ok(match (&self.secret, &self.private_key) {
            (_, Some(path)) => {
                let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                access::mint_with_key(&pem, &claims).with_context(|| format!("signing with {}", path.display()))?
            }
            (Some(secret), None) => access::mint(secret.as_bytes(), &claims)?,
            (None, None) => anyhow::bail!("give --secret or --private-key"),
        })
    }
}

/// TLS for a listening command: both files, or neither.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain: serve wss:// (with --tls-key).
    #[arg(long, requires = "tls_key", env = "SWITCHBOARD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert", env = "SWITCHBOARD_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The echo server's TLS: ALPN offers `h2` too, since it takes WebSockets over HTTP/2.
    pub fn acceptor(&self) -> anyhow::Result<Option<TlsAcceptor>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(switchboard_ws::tls::acceptor_h2(cert, key)?)),
            _ => Ok(None),
        }
    }
}

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
    /// Server URL; several comma-separated (nodes of one cluster) spread the subscribers over them
    /// in turn, and publishers connect to the first.
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
    /// `seed` ({name, message} JSON, no subprotocol), `v1` (switchboard.v1 join and publish), or
    /// `socketio` (Socket.IO 4 over its WebSocket transport: emits `join` with the room and
    /// `publish` with {room, message}, receives `message` events; for benches/peers' Socket.IO server),
    /// `sse` (subscribers on `GET /sse?room=ROOM`, publishers on `switchboard.v1`), or `longpoll`
    /// (subscribers polling `GET /poll` from each answer's cursor).
    #[arg(long, visible_alias = "transport", default_value = "seed")]
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
    /// Publish exactly this many messages (one publisher), each once every reader has the one
    /// before (a closed loop), instead of a rate for a duration: for instruction counts under
    /// callgrind, which must not depend on time.
    #[arg(long)]
    pub count: Option<u64>,
    /// The server's pid, to report its CPU time per delivery; several comma-separated (every node
    /// of a cluster) are added up.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
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

/// A request head bound: 1 KiB to 1 MiB.
fn head_bytes(text: &str) -> Result<usize, String> {
    let bytes: usize = text.parse().map_err(|_| format!("{text:?} is not a number of bytes"))?;
    if (1024..=1 << 20).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!("{bytes} is not 1024 to 1048576"))
    }
}
