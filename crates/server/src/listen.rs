//! Accepting connections, shared by `serve` and `echo`: binding (optionally with SO_REUSEPORT),
//! the accept loop, admission limits (connections in total and per client address: an IPv4 address
//! or an IPv6 /64) checked before a byte is read, and TLS with a bounded handshake.
//!
//! Behind a proxy ([`crate::proxied`]): with the PROXY protocol the header is read first and the
//! limits apply to the client it names; a connection from a trusted proxy that forwards HTTP
//! counts in the total only, and each session on it takes its client's place (see
//! `transport::http`).
//!
//! What runs on an admitted connection is the caller's [`Handler`]; the loop only decides whether the
//! connection gets one.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use switchboard_ws::tls::TlsAcceptor;

use crate::proxied::TrustedProxies;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Binds `addr`; with `reuse_port`, several processes can share the port (the kernel spreads new
/// connections across them): more connections than one process may hold descriptors for.
pub async fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    if !reuse_port {
        return TcpListener::bind(addr).await;
    }
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// What runs on each admitted connection. Two methods rather than one stream type: a task is as
/// large as its largest state, and a plain connection should not carry room for a TLS session.
pub trait Handler: Clone + Send + 'static {
    /// A plain TCP connection.
    fn plain(&self, stream: Admitted<TcpStream>, peer: SocketAddr);
    /// A TCP connection on a TLS port, before the TLS handshake (see [`tls_handshake`]).
    fn tls(&self, stream: Admitted<TcpStream>, peer: SocketAddr, acceptor: TlsAcceptor);
}

/// How the accept loop admits connections.
#[derive(Clone, Default)]
pub struct Admission {
    /// Connection limits; none admits everyone.
    pub limiter: Option<Arc<ConnectionLimiter>>,
    /// Serve TLS on every connection.
    pub tls: Option<TlsAcceptor>,
    /// Every connection starts with a PROXY protocol header, read within this time.
    pub proxy_protocol: Option<Duration>,
    /// Peers that forward for clients (PROXY headers are taken only from them when the list is not
    /// empty; their HTTP connections count in the total only).
    pub trusted: Arc<TrustedProxies>,
    /// A connection that takes no byte of what is written to it for this long fails its writes
    /// (see [`Admitted`]); none waits as long as the peer likes.
    pub send_timeout: Option<Duration>,
}

/// Accepts until `stop` resolves, admitting each connection or refusing it before reading a byte.
pub async fn accept_loop(
    listener: &TcpListener,
    admission: Admission,
    handler: impl Handler,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: keep serving those already connected.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(timeout) = admission.proxy_protocol else {
            let shared = admission.trusted.contains(peer.ip());
            admit(&admission, &handler, stream, peer, shared);
            continue;
        };
        if !admission.trusted.is_empty() && !admission.trusted.contains(peer.ip()) {
            tracing::info!(%peer, reason = "PROXY protocol from a peer not in --trusted-proxies", "refused a connection");
            crate::metrics::metrics().refused(crate::metrics::Refusal::BadHandshake);
            continue;
        }
        // The client's address is in the first bytes: read them on the connection's own task.
        let (admission, handler) = (admission.clone(), handler.clone());
        // While its header is read the connection holds a place in the total, so unfinished headers
        // cannot pile up past the limit.
        let reading = match admission.limiter.as_ref().map(|limiter| limiter.try_acquire_shared()) {
            Some(Err(refused)) => {
                tracing::info!(%peer, reason = %refused, "refused a connection");
                crate::metrics::metrics().refused(crate::metrics::Refusal::Limit);
                continue;
            }
            Some(Ok(place)) => Some(place),
            None => None,
        };
        tokio::spawn(async move {
            let mut stream = stream;
            let header = crate::proxied::read_proxy_header(&mut stream, timeout).await;
            drop(reading);
            match header {
                Ok(client) => admit(&admission, &handler, stream, client.unwrap_or(peer), false),
                // A port probe, or a client that gave up: nothing was refused.
                Err(crate::proxied::ProxyHeaderError::Closed) => {
                    tracing::debug!(%peer, "closed before its PROXY header")
                }
                Err(error) => {
                    tracing::info!(%peer, reason = %error, "refused a connection");
                    crate::metrics::metrics().refused(crate::metrics::Refusal::BadHandshake);
                }
            }
        });
    }
}

/// Takes the connection's place in the limits (only in the total when it is `shared` by the
/// clients of a proxy) and hands it to the handler, or refuses it.
fn admit(admission: &Admission, handler: &impl Handler, stream: TcpStream, peer: SocketAddr, shared: bool) {
    let permit = match &admission.limiter {
        None => None,
        Some(limiter) => {
            let permit = if shared { limiter.try_acquire_shared() } else { limiter.try_acquire(peer.ip()) };
            match permit {
                Ok(permit) => Some(permit),
                Err(refused) => {
                    tracing::info!(%peer, reason = %refused, "refused a connection");
                    crate::metrics::metrics().refused(crate::metrics::Refusal::Limit);
                    // An HTTP answer would be plaintext on a TLS port: there, just close.
                    if admission.tls.is_none() {
                        tokio::spawn(answer_refusal(stream, refused));
                    }
                    return;
                }
            }
        }
    };
    let stream = Admitted::new(stream, permit, admission.send_timeout, peer);
    match &admission.tls {
        None => handler.plain(stream, peer),
        Some(acceptor) => handler.tls(stream, peer, acceptor.clone()),
    }
}

/// Answers without parsing the request: one small write, then a short drain of what the client sent,
/// so closing does not reset the connection before it reads the answer.
async fn answer_refusal(mut stream: TcpStream, refused: Refused) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(refused.response()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

/// The TLS handshake, bounded by `timeout`; `None` (logged) when it fails or takes too long.
pub async fn tls_handshake<S>(
    acceptor: &TlsAcceptor,
    stream: S,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<switchboard_ws::tls::ServerTls<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// A connection's stream, carrying its place in the connection count for as long as it lives (through
/// the upgrade into a WebSocket session). With a send timeout, a write that finds no room for that
/// long fails (`TimedOut`), and the connection with it: hyper polls a response body only when it
/// can write, so an SSE stream to a client that stopped reading would otherwise hold its socket and
/// its places in the limits for as long as the client keeps the connection open, its session long
/// since let go.
pub struct Admitted<S> {
    inner: S,
    _permit: Option<Permit>,
    /// With a send timeout: one pointer here, so a stream without one (`echo`) is no larger.
    stall: Option<Box<Stall>>,
}

struct Stall {
    limit: Duration,
    /// For the log line when it gives up (the connection's address: behind a proxy, the proxy's).
    peer: SocketAddr,
    /// Made when a write first finds no room, and kept: armed (at the time the connection gives
    /// up) while writes wait, disarmed by the next write that goes through.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    logged: bool,
}

impl<S> Admitted<S> {
    fn new(inner: S, permit: Option<Permit>, send_timeout: Option<Duration>, peer: SocketAddr) -> Self {
        let stall = send_timeout.map(|limit| Box::new(Stall { limit, peer, timer: None, armed: false, logged: false }));
        Self { inner, _permit: permit, stall }
    }

    /// What a write's poll means for the stall timer: a write that went through (or failed) disarms
    /// it, one that waits for room arms it (if not already) and fails once it fires. Inlined for the
    /// write that goes through (every write of a busy connection); the rest is out of line.
    #[inline]
    fn watch_stall<T>(&mut self, cx: &mut Context<'_>, write: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match self.stall.as_deref_mut() {
            None => write,
            Some(stall) if write.is_ready() => {
                stall.armed = false;
                write
            }
            Some(stall) => stall.wait_for_room(cx),
        }
    }
}

impl Stall {
    /// A write found no room: arms the timer (if not already) and fails once it fires.
    #[cold]
    fn wait_for_room<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let limit = self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if !self.armed {
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if !self.logged {
                    // Once: the writes that follow fail at once, without another line.
                    self.logged = true;
                    tracing::info!(peer = %self.peer, "send timeout: the client took nothing for {} s, closing", limit.as_secs());
                }
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer took nothing of what was sent for {} s", limit.as_secs()),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S> Admitted<S> {
    /// The stream and its place in the count (`None` when the loop runs without limits). A caller
    /// that takes the stream apart keeps the place for as long as it holds the permit.
    pub fn into_parts(self) -> (S, Option<Permit>) {
        (self.inner, self._permit)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let write = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch_stall(cx, write)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let write = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch_stall(cx, write)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server holds its maximum of {0} connections")]
    Full(usize),
    #[error("{0} connections from this address already")]
    PerIp(usize),
}

impl Refused {
    /// The status of [`Refused::response`], for an answer written through an HTTP stack.
    pub fn status(&self) -> axum::http::StatusCode {
        match self {
            Refused::Full(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Refused::PerIp(_) => axum::http::StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The HTTP answer, written before the request is even read.
    pub fn response(&self) -> &'static [u8] {
        match self {
            Refused::Full(_) => {
                b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\nContent-Type: text/plain\r\nContent-Length: 31\r\n\r\nserver at its connection limit\n"
            }
            Refused::PerIp(_) => {
                b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nRetry-After: 5\r\nContent-Type: text/plain\r\nContent-Length: 39\r\n\r\ntoo many connections from your address\n"
            }
        }
    }
}

/// Counts open connections; a [`Permit`] stands for one and gives it back when dropped.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub struct Permit {
    limiter: Arc<ConnectionLimiter>,
    /// The address it counts against; `None` for a place in the total only.
    ip: Option<IpAddr>,
    /// False for a place per address only (see [`ConnectionLimiter::try_acquire_address`]).
    in_total: bool,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self { max_total, max_per_ip, state: Mutex::new(Counts::default()) })
    }

    /// A place in the total and for `ip`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        self.acquire(Some(ip), true)
    }

    /// A place for `ip` that does not count in the total: the session of a proxy's client on an
    /// HTTP/1.1 connection, which the connection's own place already counts there (that connection
    /// carries this one session and nothing else until it ends).
    pub fn try_acquire_address(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        self.acquire(Some(ip), false)
    }

    /// A place in the total only: a connection from a proxy, whose clients are counted each by
    /// their own address as their sessions open.
    pub fn try_acquire_shared(self: &Arc<Self>) -> Result<Permit, Refused> {
        self.acquire(None, true)
    }

    fn acquire(self: &Arc<Self>, ip: Option<IpAddr>, in_total: bool) -> Result<Permit, Refused> {
        let ip = ip.map(client_address);
        let mut counts = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if in_total && counts.total >= self.max_total {
            return Err(Refused::Full(self.max_total));
        }
        if let Some(ip) = ip {
            let from_ip = counts.per_ip.entry(ip).or_insert(0);
            if *from_ip >= self.max_per_ip {
                return Err(Refused::PerIp(self.max_per_ip));
            }
            *from_ip += 1;
        }
        if in_total {
            counts.total += 1;
        }
        Ok(Permit { limiter: self.clone(), ip, in_total })
    }

    pub fn open(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// What the per-address limit counts: an IPv4 address, or an IPv6 /64. One host is usually given a
/// whole /64 and may connect from any address in it, so counting single IPv6 addresses would let it
/// take any number of places.
fn client_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limiter.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.in_total {
            counts.total -= 1;
        }
        let Some(ip) = self.ip else { return };
        if let Some(n) = counts.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_places_count_per_address_and_not_in_the_total() {
        let limiter = ConnectionLimiter::new(2, 1);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        // A proxy's two connections fill the total; each carries one client's session.
        let _proxy_1 = limiter.try_acquire_shared().unwrap();
        let _proxy_2 = limiter.try_acquire_shared().unwrap();
        let session_a = limiter.try_acquire_address(a).expect("the connection holds the total's place");
        let _session_b = limiter.try_acquire_address(b).unwrap();
        assert_eq!(limiter.open(), 2);
        assert_eq!(limiter.try_acquire_address(a).unwrap_err(), Refused::PerIp(1), "a's one place is taken");
        assert_eq!(limiter.try_acquire_shared().unwrap_err(), Refused::Full(2));
        drop(session_a);
        assert_eq!(limiter.open(), 2, "a session's end leaves its connection's place");
        let _again = limiter.try_acquire_address(a).expect("a's place is free again");
    }

    #[test]
    fn permits_count_in_total_and_per_address() {
        let limiter = ConnectionLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limiter.try_acquire(a).unwrap();
        let _a2 = limiter.try_acquire(a).unwrap();
        assert_eq!(limiter.try_acquire(a).unwrap_err(), Refused::PerIp(2));
        let _b1 = limiter.try_acquire(b).unwrap();
        assert_eq!(limiter.try_acquire(b).unwrap_err(), Refused::Full(3));
        drop(a1);
        assert_eq!(limiter.open(), 2);
        let _a3 = limiter.try_acquire(a).expect("a closed connection frees its place");
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let limiter = ConnectionLimiter::new(100, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _one = limiter.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _two = limiter.try_acquire(ip("2001:db8:1:2:ffff:aaaa:bbbb:cccc")).unwrap();
        assert_eq!(limiter.try_acquire(ip("2001:db8:1:2::99")).unwrap_err(), Refused::PerIp(2), "same /64");
        let _other = limiter.try_acquire(ip("2001:db8:1:3::1")).expect("another /64 is another client");
        let _v4 = limiter.try_acquire(ip("192.0.2.7")).unwrap();
        let _mapped = limiter.try_acquire(ip("::ffff:192.0.2.7")).unwrap();
        assert_eq!(limiter.try_acquire(ip("192.0.2.7")).unwrap_err(), Refused::PerIp(2), "mapped is the same IPv4");
        drop(_one);
        let _again = limiter.try_acquire(ip("2001:db8:1:2::5")).expect("a closed connection frees the /64's place");
    }

    #[test]
    fn refusals_are_complete_http_responses() {
        for refusal in [Refused::Full(1), Refused::PerIp(1)] {
            let text = std::str::from_utf8(refusal.response()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize =
                head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|n| n.parse().ok()).unwrap();
            assert_eq!(length, body.len(), "{text}");
        }
    }
}
