//! The `switchboard` command.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use switchboard::echo::{self, EchoOptions};
use switchboard_ws::proto::deflate::DeflateConfig;
use switchboard_ws::Config;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "A WebSocket stack and real-time server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SWITCHBOARD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Echo { listen, max_message_size, max_frame_size, no_compression } => {
                let mut config = Config::default().max_message_size(max_message_size).max_frame_size(max_frame_size);
                if !no_compression {
                    config = config.compression(DeflateConfig::default());
                }
                tokio::select! {
                    result = echo::run(EchoOptions { listen, config }) => result.with_context(|| format!("echo server on {listen}")),
                    _ = tokio::signal::ctrl_c() => {
                        tracing::info!("interrupted, exiting");
                        Ok(())
                    }
                }
            }
        }
    })
}
