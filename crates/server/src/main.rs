//! The `switchboard` command.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::time::Duration;

/// mimalloc rather than the system allocator: an idle connection is a handful of small allocations, two
/// of them cache-line aligned by tokio, and glibc pays up to a cache line of padding on each of those
/// (measured in BENCHMARKS.md, "Idle connections").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use switchboard::auth::Claims;
use switchboard::config::{ServeArgs, ServeConfig};
use switchboard::connect::{self, ConnectOptions};
use switchboard::echo::{self, EchoOptions};
use switchboard::serve;
use switchboard_ws::proto::deflate::DeflateConfig;
use switchboard_ws::tls::TlsAcceptor;
use switchboard_ws::Config;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "A WebSocket stack and real-time server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the chat server: the page at /, the WebSocket at /ws (seed protocol, or switchboard.v1).
    Serve(Box<ServeArgs>),
    /// Load generator for any WebSocket server: echo, fanout, connect and idle modes.
    Bench {
        #[command(subcommand)]
        mode: switchboard::bench::BenchMode,
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
        /// than one process may open files for.
        #[arg(long)]
        reuse_port: bool,
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
        #[arg(long = "header", short = 'H', value_parser = switchboard::connect::parse_header)]
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
    },
}

#[derive(clap::Args)]
struct TokenArgs {
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
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    ttl_secs: u64,
    /// HS256 shared secret (the server's --jwt-secret).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true, required_unless_present = "private_key")]
    secret: Option<String>,
    /// PEM private key (RSA gives RS256, P-256 gives ES256) instead of a secret.
    #[arg(long, conflicts_with = "secret")]
    private_key: Option<PathBuf>,
}

impl TokenArgs {
    fn mint(self) -> anyhow::Result<String> {
        let list = |l: Vec<String>| (!l.is_empty()).then_some(l);
        let claims = Claims {
            sub: self.sub,
            exp: switchboard::auth::unix_now() + self.ttl_secs,
            name: self.name,
            rooms: list(self.rooms),
            join: list(self.join),
            publish: list(self.publish),
        };
        Ok(match (&self.secret, &self.private_key) {
            (_, Some(path)) => {
                let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                switchboard::auth::mint_with_key(&pem, &claims)?
            }
            (Some(secret), None) => switchboard::auth::mint(secret.as_bytes(), &claims)?,
            (None, None) => anyhow::bail!("give --secret or --private-key"),
        })
    }
}

/// TLS for a listening command: both files, or neither.
#[derive(clap::Args)]
struct TlsArgs {
    /// PEM certificate chain: serve wss:// (with --tls-key).
    #[arg(long, requires = "tls_key", env = "SWITCHBOARD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert", env = "SWITCHBOARD_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    fn acceptor(&self) -> anyhow::Result<Option<TlsAcceptor>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(switchboard_ws::tls::acceptor(cert, key)?)),
            _ => Ok(None),
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SWITCHBOARD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Token(args) = cli.command {
        println!("{}", args.mint()?);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    if let Command::Connect { url, binary, json, headers, protocols, ping_interval, no_compression, ca_file, proxy } =
        cli.command
    {
        let options = ConnectOptions {
            url,
            binary,
            json,
            headers,
            protocols,
            ping_interval: ping_interval.map(Duration::from_secs_f64),
            compression: !no_compression,
            ca_file,
            proxy,
        };
        let stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let code = match runtime.block_on(connect::run(options, stdin, tokio::io::stdout())) {
            Ok(outcome) => {
                if let connect::Outcome::Closed(frame) = &outcome {
                    match frame {
                        Some(frame) => eprintln!("connection closed: {} {}", frame.code, frame.reason),
                        None => eprintln!("connection closed without a status code (1005)"),
                    }
                }
                outcome.exit_code()
            }
            Err(error) => {
                eprintln!("switchboard connect: {error}");
                2
            }
        };
        // Not `return`: a pending read of stdin would keep the runtime from shutting down.
        std::process::exit(code);
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Connect { .. } | Command::Token(_) => unreachable!("handled above"),
            Command::Bench { mode } => switchboard::bench::run(mode).await,
            Command::Serve(args) => {
                let config = ServeConfig::load(*args)?;
                serve::run(config, stop_signal()).await
            }
            Command::Echo {
                listen,
                max_message_size,
                max_frame_size,
                no_compression,
                deflate_window_bits,
                deflate_mem_level,
                reuse_port,
                tls,
            } => {
                let mut config = Config::default().max_message_size(max_message_size).max_frame_size(max_frame_size);
                if !no_compression {
                    config = config.compression(DeflateConfig {
                        server_max_window_bits: deflate_window_bits,
                        mem_level: deflate_mem_level,
                        ..DeflateConfig::default()
                    });
                }
                tokio::select! {
                    result = echo::run(EchoOptions { listen, config, tls: tls.acceptor()?, reuse_port }) => result.with_context(|| format!("echo server on {listen}")),
                    _ = tokio::signal::ctrl_c() => {
                        tracing::info!("interrupted, exiting");
                        Ok(())
                    }
                }
            }
        }
    });
    // Tasks still running (a client that never finished closing) must not hold the exit: the grace
    // period is over by now.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, the signal service managers stop a server with.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupted (SIGINT)"),
                    _ = terminate.recv() => tracing::info!("terminated (SIGTERM)"),
                }
                return;
            }
            Err(error) => tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
