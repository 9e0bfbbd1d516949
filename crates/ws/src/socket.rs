//! [`WebSocket`]: one connection over any `AsyncRead + AsyncWrite`, and its split halves.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use futures_core::Stream;
use futures_sink::Sink;
use switchboard_proto::deflate::DeflateParams;
use switchboard_proto::{CloseCode, CloseFrame, CloseState, Message, Role};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::Config;
use crate::core::Core;
use crate::error::{Error, Result};

/// A WebSocket connection.
///
/// `recv` and `send` may be used from one task, or after [`WebSocket::split`] from two. Dropping a
/// pending `recv` (in `select!`, a timeout) loses nothing: the next call continues where it stopped.
pub struct WebSocket<S> {
    core: Core<S>,
    protocol: Option<String>,
}

impl<S> std::fmt::Debug for WebSocket<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("role", &self.core.conn.role())
            .field("protocol", &self.protocol)
            .field("close_state", &self.core.close_state())
            .finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Wraps a stream on which the handshake is already done. `leftover` holds bytes read past the
    /// handshake (the first frames, if the peer pipelined them).
    pub fn from_raw(io: S, role: Role, config: Config, leftover: &[u8]) -> Self {
        Self { core: Core::new(io, role, config, leftover, None), protocol: None }
    }

    /// Like [`from_raw`](Self::from_raw), with permessage-deflate negotiated as `deflate` (the local
    /// settings come from `config.compression`).
    pub fn from_raw_with_deflate(
        io: S,
        role: Role,
        config: Config,
        leftover: &[u8],
        deflate: Option<DeflateParams>,
    ) -> Self {
        Self { core: Core::new(io, role, config, leftover, deflate), protocol: None }
    }

    /// The permessage-deflate parameters in force, if the extension was negotiated.
    pub fn compression(&self) -> Option<DeflateParams> {
        self.core.conn.deflate_params()
    }

    pub(crate) fn with_protocol(mut self, protocol: Option<String>) -> Self {
        self.protocol = protocol;
        self
    }

    /// The subprotocol agreed on in the handshake.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// Which end of the connection this is.
    pub fn role(&self) -> Role {
        self.core.conn.role()
    }

    /// Where the close handshake stands: [`CloseState::Closed`] too once [`WebSocket::recv`] has
    /// reported the connection over without one (the peer hung up, or a timeout).
    pub fn close_state(&self) -> CloseState {
        self.core.close_state()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.core.io
    }

    /// The underlying stream, to set socket options say. Reading from it or writing to it directly
    /// corrupts the WebSocket's byte stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.core.io
    }

    /// The next message. Pings are answered automatically and still reported; the peer's close frame is
    /// reported as [`Message::Close`], after which `recv` returns `None` once the connection has ended.
    /// An `Err` ends the connection too: keep calling until `None`, which finishes the close. After a
    /// protocol error, our close frame (1002, 1007, 1009...) is written and the connection ends
    /// without waiting for the peer's answer. A close we started that the peer leaves unanswered
    /// reports [`Error::CloseTimeout`] before the `None`.
    pub async fn recv(&mut self) -> Option<Result<Message>> {
        poll_fn(|cx| {
            let waker = cx.waker();
            self.core.poll_recv(&mut Context::from_waker(waker), &mut Context::from_waker(waker))
        })
        .await
    }

    /// Sends a message and flushes it: waits until everything queued is written to the socket.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<()> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Queues a message without flushing, so several go out in one write; waits for room first.
    pub async fn feed(&mut self, message: impl Into<Message>) -> Result<()> {
        poll_fn(|cx| self.core.poll_ready(cx)).await?;
        self.core.start_send(message.into())
    }

    /// Writes out everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        poll_fn(|cx| self.core.poll_flush(cx)).await
    }

    /// Sends a close frame and flushes it. Keep calling [`recv`](Self::recv) until `None` to complete
    /// the handshake (it gives up after `close_timeout`). Once a close frame is queued (by an earlier
    /// `close`, or in answer to the peer's [`Message::Close`]), it only flushes: `code` and `reason`
    /// are not sent again.
    pub async fn close(&mut self, code: impl Into<CloseCode>, reason: &str) -> Result<()> {
        // Queued without waiting for room, after what is queued: the close timeout bounds the flush,
        // also when the peer reads nothing.
        self.core.start_close(CloseFrame::new(code.into(), reason))?;
        self.flush().await
    }

    /// Bytes queued but not yet written to the socket.
    pub fn pending_output(&self) -> usize {
        self.core.conn.pending_output()
    }

    /// Bytes of buffer memory held right now. Buffers go back to a per-thread pool whenever the socket
    /// has nothing more to read and nothing left to write, so this is 0 for an idle connection.
    pub fn buffer_capacity(&self) -> usize {
        self.core.conn.buffer_capacity()
    }

    /// Frees the compression state between messages when context takeover is off (so a quiet
    /// compressed connection holds no zlib memory), and any empty I/O buffer. The I/O buffers
    /// already go back to the pool by themselves whenever the socket goes quiet; the zlib state
    /// does not.
    pub fn release_idle_buffers(&mut self) {
        self.core.conn.release_idle_buffers();
    }

    /// Splits into a reader and a writer that can be used from two tasks.
    pub fn split(self) -> (WsReader<S>, WsWriter<S>) {
        let wakers = Arc::new(WriteWakers::default());
        let shared = Arc::new(Shared {
            core: Mutex::new(self.core),
            proxy: Waker::from(wakers.clone()),
            wakers,
            protocol: self.protocol,
        });
        (WsReader { shared: shared.clone() }, WsWriter { shared })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WebSocket<S> {
    type Item = Result<Message>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let waker = cx.waker();
        self.get_mut().core.poll_recv(&mut Context::from_waker(waker), &mut Context::from_waker(waker))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WebSocket<S> {
    type Error = Error;
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().core.poll_ready(cx)
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<()> {
        self.get_mut().core.start_send(item)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().core.poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().core.poll_close(cx)
    }
}

// ------------------------------------------------------------------------------------------------
// Split halves
//
// Both halves drive one engine behind a mutex that is held only for the duration of a poll, never
// across an await. The reader may write (pongs, close echoes, and whatever the writer queued), so a
// socket that becomes writable must wake both tasks: writes are polled with a proxy waker that wakes
// whichever of the two registered.

#[derive(Default)]
struct WriteWakers {
    reader: Mutex<Option<Waker>>,
    writer: Mutex<Option<Waker>>,
}

impl WriteWakers {
    fn register(slot: &Mutex<Option<Waker>>, waker: &Waker) {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

impl Wake for WriteWakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        for slot in [&self.reader, &self.writer] {
            if let Some(waker) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                waker.wake();
            }
        }
    }
}

struct Shared<S> {
    core: Mutex<Core<S>>,
    wakers: Arc<WriteWakers>,
    proxy: Waker,
    protocol: Option<String>,
}

impl<S> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, Core<S>> {
        // A panic in another half while polling cannot leave the engine half-updated in a way that
        // matters more than losing the connection; keep going rather than poisoning both halves.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receiving half of a split [`WebSocket`].
pub struct WsReader<S> {
    shared: Arc<Shared<S>>,
}

/// The sending half of a split [`WebSocket`].
pub struct WsWriter<S> {
    shared: Arc<Shared<S>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsReader<S> {
    /// The next message; see [`WebSocket::recv`].
    pub async fn recv(&mut self) -> Option<Result<Message>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Message>>> {
        WriteWakers::register(&self.shared.wakers.reader, cx.waker());
        let mut wcx = Context::from_waker(&self.shared.proxy);
        self.shared.lock().poll_recv(cx, &mut wcx)
    }

    /// The subprotocol agreed on in the handshake.
    pub fn protocol(&self) -> Option<&str> {
        self.shared.protocol.as_deref()
    }

    /// True when `writer` is the other half of the same connection.
    pub fn is_pair_of(&self, writer: &WsWriter<S>) -> bool {
        Arc::ptr_eq(&self.shared, &writer.shared)
    }

    /// Puts the two halves back together into the [`WebSocket`] they were split from, with
    /// everything queued or half-read still in it. Halves of two different connections are given
    /// back in the error.
    pub fn reunite(self, writer: WsWriter<S>) -> std::result::Result<WebSocket<S>, ReuniteError<S>> {
        if !self.is_pair_of(&writer) {
            return Err(ReuniteError(self, writer));
        }
        drop(writer);
        let Ok(shared) = Arc::try_unwrap(self.shared) else {
            unreachable!("a split makes two halves and no other owner of what they share")
        };
        let core = shared.core.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(WebSocket { core, protocol: shared.protocol })
    }
}

/// Halves of two different connections, given to [`WsReader::reunite`]: here they are back.
#[derive(thiserror::Error)]
#[error("the reader and writer are halves of two different connections")]
pub struct ReuniteError<S>(pub WsReader<S>, pub WsWriter<S>);

impl<S> std::fmt::Debug for ReuniteError<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReuniteError(..)")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsWriter<S> {
    /// The subprotocol agreed on in the handshake.
    pub fn protocol(&self) -> Option<&str> {
        self.shared.protocol.as_deref()
    }

    fn with_write_context<T>(&self, cx: &mut Context<'_>, f: impl FnOnce(&mut Core<S>, &mut Context<'_>) -> T) -> T {
        WriteWakers::register(&self.shared.wakers.writer, cx.waker());
        let mut wcx = Context::from_waker(&self.shared.proxy);
        f(&mut self.shared.lock(), &mut wcx)
    }

    /// Sends a message and flushes it: waits until everything queued is written to the socket.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<()> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Queues a message without flushing; waits for room first.
    pub async fn feed(&mut self, message: impl Into<Message>) -> Result<()> {
        poll_fn(|cx| self.with_write_context(cx, |core, wcx| core.poll_ready(wcx))).await?;
        self.shared.lock().start_send(message.into())
    }

    /// Writes out everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        poll_fn(|cx| self.with_write_context(cx, |core, wcx| core.poll_flush(wcx))).await
    }

    /// Sends a close frame (without waiting for room, as [`WebSocket::close`]); the reader then sees
    /// the peer's answer and the end of the connection.
    pub async fn close(&mut self, code: impl Into<CloseCode>, reason: &str) -> Result<()> {
        self.shared.lock().start_close(CloseFrame::new(code.into(), reason))?;
        self.flush().await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WsReader<S> {
    type Item = Result<Message>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_recv(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WsWriter<S> {
    type Error = Error;
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.with_write_context(cx, |core, wcx| core.poll_ready(wcx))
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<()> {
        self.shared.lock().start_send(item)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.with_write_context(cx, |core, wcx| core.poll_flush(wcx))
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.with_write_context(cx, |core, wcx| core.poll_close(wcx))
    }
}
