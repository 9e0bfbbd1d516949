//! `switchboard echo`: sends every text and binary message back to its sender. On a TLS port it
//! also takes WebSockets over HTTP/2 (RFC 8441), when ALPN chooses `h2`.
//!
//! Replies are queued with `feed` and go out when `recv` runs out of buffered input, so a burst of
//! pipelined messages is answered in one write.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{Sink, Stream};
use http_body_util::Either;
use switchboard_ws::tls::TlsAcceptor;
use switchboard_ws::upgrade::{refusal_response, Upgrade};
use switchboard_ws::{Config, Message, WebSocket};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::listen::{self, Admission, Admitted, Handler};

/// Echo server settings.
#[derive(Clone)]
pub struct EchoOptions {
    pub listen: SocketAddr,
    pub config: Config,
    /// Serve `wss://` when set.
    pub tls: Option<TlsAcceptor>,
    /// Bind with SO_REUSEPORT, so several processes can share the port (the kernel spreads new
    /// connections across them): more connections than one process may hold descriptors for.
    pub reuse_port: bool,
}

/// Binds and serves until the task is cancelled.
pub async fn run(options: EchoOptions) -> std::io::Result<()> {
    let listener = listen::bind(options.listen, options.reuse_port).await?;
    let scheme = if options.tls.is_some() { "wss" } else { "ws" };
    tracing::info!("echo server listening on {scheme}://{}", listener.local_addr()?);
    serve(listener, options.config, options.tls).await
}

/// Serves on an already bound listener (tests bind port 0 and read the address first).
pub async fn serve(listener: TcpListener, config: Config, tls: Option<TlsAcceptor>) -> std::io::Result<()> {
    let admission = Admission { limiter: None, tls, ..Admission::default() };
    listen::accept_loop(&listener, admission, EchoHandler(config), std::future::pending()).await;
    Ok(())
}

#[derive(Clone)]
struct EchoHandler(Config);

impl Handler for EchoHandler {
    fn plain(&self, stream: Admitted<TcpStream>, _peer: SocketAddr) {
        // The echo server admits without limits (no permit to keep): the bare stream keeps its task
        // as small as it was.
        let (stream, _no_permit) = stream.into_parts();
        tokio::spawn(EchoConnection::new(Box::pin(switchboard_ws::accept(stream, self.0.clone()))));
    }

    fn tls(&self, stream: Admitted<TcpStream>, peer: SocketAddr, acceptor: TlsAcceptor) {
        let config = self.0.clone();
        let (stream, _no_permit) = stream.into_parts();
        tokio::spawn(async move {
            // Logged with its cause by `tls_handshake` when it fails.
            let Some(stream) = listen::tls_handshake(&acceptor, stream, peer, config.handshake_timeout).await else {
                return;
            };
            if switchboard_ws::tls::is_http2(&stream) {
                echo_http2(stream, config, peer).await;
            } else {
                // A task of its own, the size of an echo connection, not of this one's state.
                tokio::spawn(EchoConnection::new(Box::pin(switchboard_ws::accept(stream, config))));
            }
        });
    }
}

/// Streams per HTTP/2 connection, as `serve`'s default.
const H2_MAX_STREAMS: u32 = 100;

/// HTTP/2 on a TLS connection: every extended CONNECT with `:protocol = websocket` is an echo
/// connection on its stream; anything else is refused as a bad handshake.
async fn echo_http2<S>(stream: S, config: Config, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_head = u32::try_from(config.max_head_bytes).unwrap_or(u32::MAX);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        let answer = match Upgrade::new(&mut request) {
            Ok(upgrade) => {
                let (response, websocket) = upgrade.config(config.clone()).into_response();
                tokio::spawn(EchoConnection::new(websocket));
                response.map(Either::Left)
            }
            Err(error) => refusal_response(&error).map(Either::Right),
        };
        std::future::ready(Ok::<_, std::convert::Infallible>(answer))
    });
    let connection = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(H2_MAX_STREAMS)
        // The header list is bounded as an HTTP/1.1 head is (--max-request-head-bytes).
        .max_header_list_size(max_head)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "HTTP/2 connection ended with an error");
    }
}

/// One connection's task: the handshake (`H`, boxed so its state is on the heap only while it runs),
/// then echoing until the close.
///
/// Written as a future by hand rather than as an `async fn`: every idle connection holds its task, and
/// rustc's generators keep more than the live state (the handshake's result beside the loop, the
/// `recv` result and the `feed` future beside the socket), which was over four times the size. Here
/// the state is the socket alone.
pub struct EchoConnection<S, H> {
    state: EchoState<S, H>,
}

// The open state is the connection itself and the handshake is already boxed: boxing the socket too
// would add an allocation without making the task smaller.
#[allow(clippy::large_enum_variant)]
enum EchoState<S, H> {
    Handshake(H),
    Open(WebSocket<S>),
    Done,
}

impl<S, H> EchoConnection<S, H>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Future<Output = switchboard_ws::Result<WebSocket<S>>> + Unpin,
{
    pub fn new(handshake: H) -> Self {
        Self { state: EchoState::Handshake(handshake) }
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
                    Ok(ws) => this.state = EchoState::Open(ws),
                    Err(error) => break Err(error),
                },
                EchoState::Open(ws) => break ready!(poll_echo(ws, cx)),
                EchoState::Done => return Poll::Ready(()),
            }
        };
        this.state = EchoState::Done;
        if let Err(error) = result {
            tracing::debug!(%error, "connection ended with an error");
        }
        Poll::Ready(())
    }
}

/// Echoes text and binary messages until the connection ends. Replies are queued without waiting
/// for room (`poll_ready`): the socket stops reading by itself while its unsent output is above the
/// high-water mark, so the queue grows by at most what was already read. They go out when `recv` runs
/// out of buffered input, a burst of pipelined messages in one write.
fn poll_echo<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocket<S>,
    cx: &mut Context<'_>,
) -> Poll<switchboard_ws::Result<()>> {
    loop {
        match ready!(Pin::new(&mut *ws).poll_next(cx)) {
            None => return Poll::Ready(Ok(())),
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => Pin::new(&mut *ws).start_send(message)?,
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
    async fn an_idle_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let task = EchoConnection::new(Box::pin(switchboard_ws::accept(stream, Config::default())));
        let size = std::mem::size_of_val(&task);
        assert!(size <= 384, "the echo task is {size} bytes");
    }
}
