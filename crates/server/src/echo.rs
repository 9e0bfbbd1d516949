//! `switchboard echo`: sends every text and binary message back to its sender.
//!
//! Replies are queued with `feed` and go out when `recv` runs out of buffered input, so a burst of
//! pipelined messages is answered in one write.

use std::net::SocketAddr;

use switchboard_ws::{Config, Message};
use tokio::net::{TcpListener, TcpStream};

/// Echo server settings.
#[derive(Debug, Clone)]
pub struct EchoOptions {
    pub listen: SocketAddr,
    pub config: Config,
}

/// Binds and serves until the task is cancelled.
pub async fn run(options: EchoOptions) -> std::io::Result<()> {
    let listener = TcpListener::bind(options.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "echo server listening");
    serve(listener, options.config).await
}

/// Serves on an already bound listener (tests bind port 0 and read the address first).
pub async fn serve(listener: TcpListener, config: Config) -> std::io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: keep serving those already connected.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let config = config.clone();
        tokio::spawn(async move {
            if let Err(error) = echo_connection(stream, config).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

async fn echo_connection(stream: TcpStream, config: Config) -> switchboard_ws::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut ws = switchboard_ws::accept(stream, config).await?;
    while let Some(message) = ws.recv().await {
        match message {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => ws.feed(message).await?,
            Ok(_) => {}
            // The engine has answered with the right close code; polling on completes the close.
            Err(error) => tracing::debug!(%error, "closing connection"),
        }
    }
    Ok(())
}
