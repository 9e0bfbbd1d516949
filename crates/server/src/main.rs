//! The `switchboard` command.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

/// mimalloc rather than the system allocator: an idle connection is a handful of small allocations, two
/// of them cache-line aligned by tokio, and glibc pays up to a cache line of padding on each of those
/// (measured in BENCHMARKS.md, "Idle connections").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use switchboard::cli::{Cli, Command, LogFormat};
use switchboard::config::ServeConfig;
use switchboard::serve;
use switchboard::tools::connect::{self, ConnectOptions};
use switchboard::tools::echo::{self, EchoOptions};
use switchboard_ws::proto::deflate::DeflateConfig;
use switchboard_ws::Config;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    if let Command::Token(args) = cli.command {
        println!("{}", args.mint()?);
        return Ok(());
    }
    // `serve` reads its settings (the thread count among them) before its runtime exists.
    let serve_config = match &cli.command {
        Command::Serve(args) => Some(ServeConfig::load(*args.clone())?),
        _ => None,
    };
    let threads = match &cli.command {
        Command::Echo { threads, .. } => *threads,
        Command::Serve(_) => serve_config.as_ref().map_or(0, |config| config.server.threads()),
        _ => 0,
    };
    let runtime = runtime(threads)?;
    if let Command::Connect {
        url,
        binary,
        json,
        headers,
        protocols,
        ping_interval,
        no_compression,
        ca_file,
        proxy,
        linger,
    } = cli.command
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
            linger: linger.map(Duration::from_secs_f64),
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
                if error.to_string().contains("CaUsedAsEndEntity") {
                    eprintln!(
                        "  the server presents a CA certificate as its own (what `openssl req -x509` makes by \
                         default): give the server a certificate that CA issued, or one made with \
                         -addext basicConstraints=critical,CA:FALSE -addext subjectAltName=DNS:HOST"
                    );
                }
                2
            }
        };
        // Not `return`: a pending read of stdin would keep the runtime from shutting down.
        std::process::exit(code);
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Connect { .. } | Command::Token(_) => unreachable!("handled above"),
            Command::Bench { mode } => switchboard::tools::bench::run(mode).await,
            Command::Serve(_) => {
                let config = serve_config.expect("loaded above");
                serve::run(config, stop_signal()?).await
            }
            Command::Echo {
                listen,
                max_message_size,
                max_frame_size,
                no_compression,
                deflate_window_bits,
                deflate_mem_level,
                reuse_port,
                threads: _,
                max_request_head_bytes,
                tls,
            } => {
                let mut config = Config::default().max_message_size(max_message_size).max_frame_size(max_frame_size);
                config.max_head_bytes = max_request_head_bytes;
                if !no_compression {
                    config = config.compression(DeflateConfig {
                        server_max_window_bits: deflate_window_bits,
                        mem_level: deflate_mem_level,
                        ..DeflateConfig::default()
                    });
                }
                let stop = stop_signal()?;
                tokio::select! {
                    result = echo::run(EchoOptions { listen, config, tls: tls.acceptor()?, reuse_port }) => result.with_context(|| format!("echo server on {listen}")),
                    () = stop => Ok(()),
                }
            }
        }
    });
    // Tasks still running (a client that never finished closing) must not hold the exit: the grace
    // period is over by now.
    runtime.shutdown_timeout(serve::RUNTIME_END);
    result
}

/// The runtime for `threads` workers: 0 is tokio's multi-threaded default (one per core), 1 a
/// current-thread runtime (no worker threads, no cross-thread scheduling), N that many workers.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    // `serve` checks its setting with the rest; this is `echo`'s check.
    anyhow::ensure!(
        threads <= switchboard::config::MAX_THREADS,
        "--threads must be 0 (one per core) to {}",
        switchboard::config::MAX_THREADS
    );
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build().context("starting the runtime")
}

/// Listens for Ctrl-C (SIGINT) and SIGTERM, the signal service managers stop a server with, and
/// resolves on the first. The handlers are in place when this returns, before the server binds: a
/// signal that comes as soon as the server says it listens still stops it cleanly.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("interrupted (SIGINT)"),
                _ = terminate.recv() => tracing::info!("terminated (SIGTERM)"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// Logs go to stderr, filtered by `SWITCHBOARD_LOG` (default `info`): as text, with colour only
/// when stderr is a terminal (a file or journald would get escape codes), or as JSON lines.
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = match std::env::var("SWITCHBOARD_LOG") {
        Ok(directives) => tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|error| {
            // Said before the logs start, so a typo is not mistaken for a quiet server.
            eprintln!("switchboard: SWITCHBOARD_LOG={directives:?} is not a log filter ({error}); logging at info");
            "info".into()
        }),
        Err(_) => "info".into(),
    };
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
}
