//! `switchboard echo`: sends every text and binary message back to its sender.
//!
//! Replies are queued with `feed` and go out when `recv` runs out of buffered input, so a burst of
//! pipelined messages is answered in one write.

use std::net::SocketAddr;

use switchboard_ws::tls::TlsAcceptor;
use switchboard_ws::{Config, Message};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

/// Echo server settings.
#[derive(Clone)]
pub struct EchoOptions {
    pub listen: SocketAddr,
    pub config: Config,
    /// Serve `wss://` when set.
    pub tls: Option<TlsAcceptor>,
}

/// Binds and serves until the task is cancelled.
pub async fn run(options: EchoOptions) -> std::io::Result<()> {
    let listener = TcpListener::bind(options.listen).await?;
    let scheme = if options.tls.is_some() { "wss" } else { "ws" };
    tracing::info!("echo server listening on {scheme}://{}", listener.local_addr()?);
    serve(listener, options.config, options.tls).await
}

/// Serves on an already bound listener (tests bind port 0 and read the address first).
pub async fn serve(listener: TcpListener, config: Config, tls: Option<TlsAcceptor>) -> std::io::Result<()> {
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
        let _ = stream.set_nodelay(true);
        let config = config.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => echo_connection(stream, config).await,
                Some(acceptor) => match tokio::time::timeout(config.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => echo_connection(stream, config).await,
                    Ok(Err(error)) => Err(switchboard_ws::Error::Io(error)),
                    Err(_) => Err(switchboard_ws::Error::HandshakeTimeout(config.handshake_timeout)),
                },
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

async fn echo_connection<S>(stream: S, config: Config) -> switchboard_ws::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
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
