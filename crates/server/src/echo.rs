//! `switchboard echo`: sends every text and binary message back to its sender.
//!
//! Replies are queued with `feed` and go out when `recv` runs out of buffered input, so a burst of
//! pipelined messages is answered in one write.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{Sink, Stream};
use switchboard_ws::tls::TlsAcceptor;
use switchboard_ws::{Config, Message, WebSocket};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

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
        // Two task types rather than one future with both branches: a task is as large as its
        // largest state, and a plain connection should not carry room for a TLS session.
        match tls.clone() {
            None => tokio::spawn(EchoConnection::new(peer, Box::pin(switchboard_ws::accept(stream, config)))),
            Some(acceptor) => {
                tokio::spawn(EchoConnection::new(peer, Box::pin(tls_handshake(stream, acceptor, config))))
            }
        };
    }
}

/// TLS, then the WebSocket handshake.
async fn tls_handshake(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    config: Config,
) -> switchboard_ws::Result<WebSocket<switchboard_ws::tls::ServerTlsStream>> {
    match tokio::time::timeout(config.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => switchboard_ws::accept(stream, config).await,
        Ok(Err(error)) => Err(switchboard_ws::Error::Io(error)),
        Err(_) => Err(switchboard_ws::Error::HandshakeTimeout(config.handshake_timeout)),
    }
}

/// One connection's task: the handshake (`H`, boxed so its state is on the heap only while it runs),
/// then echoing until the close.
///
/// Written as a future by hand rather than as an `async fn`: every idle connection holds its task, and
/// rustc's generators keep more than the live state (the handshake's result beside the loop, the
/// `recv` result and the `feed` future beside the socket), which here is over twice the size. Here the
/// state is the socket and at most one reply waiting for room.
pub struct EchoConnection<S, H> {
    peer: SocketAddr,
    state: EchoState<S, H>,
}

// The open state is the connection itself and the handshake is already boxed: boxing the socket too
// would add an allocation without making the task smaller.
#[allow(clippy::large_enum_variant)]
enum EchoState<S, H> {
    Handshake(H),
    Open {
        ws: WebSocket<S>,
        /// A message read while the output was above its high-water mark.
        reply: Option<Message>,
    },
    Done,
}

impl<S, H> EchoConnection<S, H>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Future<Output = switchboard_ws::Result<WebSocket<S>>> + Unpin,
{
    pub fn new(peer: SocketAddr, handshake: H) -> Self {
        Self { peer, state: EchoState::Handshake(handshake) }
    }
}

impl<S, H> Future for EchoConnection<S, H>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Future<Output = switchboard_ws::Result<WebSocket<S>>> + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let result = loop {
            match &mut this.state {
                EchoState::Handshake(handshake) => match ready!(Pin::new(handshake).poll(cx)) {
                    Ok(ws) => this.state = EchoState::Open { ws, reply: None },
                    Err(error) => break Err(error),
                },
                EchoState::Open { ws, reply } => break ready!(poll_echo(ws, reply, cx)),
                EchoState::Done => return Poll::Ready(()),
            }
        };
        this.state = EchoState::Done;
        if let Err(error) = result {
            tracing::debug!(peer = %this.peer, %error, "connection ended with an error");
        }
        Poll::Ready(())
    }
}

/// Echoes text and binary messages until the connection ends. Replies are queued, not flushed: they go
/// out when `recv` runs out of buffered input.
fn poll_echo<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocket<S>,
    reply: &mut Option<Message>,
    cx: &mut Context<'_>,
) -> Poll<switchboard_ws::Result<()>> {
    loop {
        if let Some(message) = reply.take() {
            match Pin::new(&mut *ws).poll_ready(cx) {
                Poll::Pending => {
                    *reply = Some(message);
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => Pin::new(&mut *ws).start_send(message)?,
            }
        }
        match ready!(Pin::new(&mut *ws).poll_next(cx)) {
            None => return Poll::Ready(Ok(())),
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => *reply = Some(message),
            Some(Ok(_)) => {}
            // The engine has answered with the right close code; polling on completes the close.
            Some(Err(error)) => tracing::debug!(%error, "closing connection"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle connection holds its task and nothing else of ours (buffers go back to the pool),
    /// so the task's size is most of what a connection costs. A change that widens it shows up here
    /// before it shows up in `benches/run.sh idle`.
    #[tokio::test]
    async fn an_idle_connection_task_stays_under_half_a_kibibyte() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let peer = stream.local_addr().unwrap();
        let task = EchoConnection::new(peer, Box::pin(switchboard_ws::accept(stream, Config::default())));
        let size = std::mem::size_of_val(&task);
        assert!(size <= 512, "the echo task is {size} bytes");
    }
}
