//! The poll-level driver shared by [`WebSocket`](crate::WebSocket) and its split halves: moves bytes
//! between a socket and one protocol engine, runs the keepalive and close timers, applies backpressure.
//!
//! Every method takes the task context(s) to register with and keeps all progress in `self`, so any
//! future built on it can be dropped at an await point without losing a byte (cancel safety).
//! Writes take their own context because, once split, the reader may flush on the writer's behalf and
//! both tasks must be woken when the socket becomes writable (see `split`).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use switchboard_proto::deflate::DeflateParams;
use switchboard_proto::{CloseCode, CloseFrame, CloseState, Connection, Message, Role, SendError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use crate::buffers;
use crate::config::{Config, Keepalive};
use crate::error::{Error, Result};

/// How many output chunks one vectored write may carry.
const MAX_IO_SLICES: usize = 64;

/// The most a read reserves ahead for a frame's announced payload: enough that common large messages
/// arrive in one read, small enough that a header announcing 16 MiB, then silence, costs no more.
const MAX_READ_AHEAD: usize = 256 * 1024;

struct KeepaliveTimer {
    /// The settings, with this connection's interval already shortened by its jitter.
    settings: Keepalive,
    timer: Pin<Box<Sleep>>,
    last_activity: Instant,
    /// When our unanswered ping went out.
    ping_sent: Option<Instant>,
}

/// Steps of keepalive jitter: each connection's interval is shortened by 0 to 63 of them.
const JITTER_STEPS: u32 = 64;

/// `interval`, shortened by up to a tenth, differently for consecutive connections: connections
/// opened together (a reconnect storm after a restart) would otherwise ping together forever.
/// Spread by a counter rather than randomness: it needs no source of entropy and covers the range
/// evenly.
fn jittered(interval: Duration) -> Duration {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let step = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % JITTER_STEPS;
    interval - interval / 10 * step / JITTER_STEPS
}

/// Reads into `buf`'s spare capacity; how many bytes arrived. `tokio_util::io::poll_read_buf`
/// written out for `BytesMut`: the compiler kept that call out of line, and every message goes
/// through here twice (the read that brings it and the one that finds nothing).
#[inline(always)]
fn poll_read_spare<S: AsyncRead>(io: Pin<&mut S>, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
    if buf.len() == buf.capacity() {
        // A full buffer would make an empty read, taken for the end of the stream (a `read_chunk`
        // of 0 or 1 allows it). `poll_read_buf` made room the same way (`BytesMut::chunk_mut`).
        buf.reserve(64);
    }
    let mut read = tokio::io::ReadBuf::uninit(buf.spare_capacity_mut());
    let start = read.filled().as_ptr();
    ready!(io.poll_read(cx, &mut read))?;
    // A reader may swap in a buffer of its own; then the count says nothing about ours.
    assert_eq!(start, read.filled().as_ptr(), "the reader replaced the read buffer");
    let n = read.filled().len();
    // SAFETY: `ReadBuf` counts as filled only bytes that were written, and these are the first `n`
    // bytes of `buf`'s spare capacity (the assertion above rules out a swapped buffer).
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

pub(crate) struct Core<S> {
    pub(crate) io: S,
    pub(crate) conn: Connection,
    // Only the settings used after the handshake are kept, not the whole `Config`: every byte here
    // is held by every idle connection.
    write_high_water: usize,
    read_chunk: usize,
    close_timeout: std::time::Duration,
    /// Boxed: most connections have none, and idle connections hold every inline byte.
    keepalive: Option<Box<KeepaliveTimer>>,
    close_deadline: Option<Pin<Box<Sleep>>>,
    write_shut: bool,
    /// `recv` has reported the end; nothing more will come.
    finished: bool,
    /// Writing failed or the stream ended: nothing more can be sent.
    write_failed: bool,
}

impl<S> Core<S> {
    /// [`Connection::close_state`], and `Closed` once the end has been reported however it came.
    pub(crate) fn close_state(&self) -> CloseState {
        if self.finished {
            CloseState::Closed
        } else {
            self.conn.close_state()
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Core<S> {
    pub(crate) fn new(io: S, role: Role, config: Config, leftover: &[u8], deflate: Option<DeflateParams>) -> Self {
        let mut conn = Connection::new(role, config.protocol.clone());
        if let (Some(params), Some(settings)) = (deflate, &config.compression) {
            conn.enable_deflate(params, settings);
        }
        conn.receive_data(leftover);
        let keepalive = config.keepalive.map(|settings| {
            let settings = Keepalive { interval: jittered(settings.interval), ..settings };
            Box::new(KeepaliveTimer {
                settings,
                timer: Box::pin(tokio::time::sleep(settings.interval)),
                last_activity: Instant::now(),
                ping_sent: None,
            })
        });
        Self {
            io,
            conn,
            write_high_water: config.write_high_water,
            read_chunk: config.read_chunk,
            close_timeout: config.close_timeout,
            keepalive,
            close_deadline: None,
            write_shut: false,
            finished: false,
            write_failed: false,
        }
    }

    /// The next message; `None` once the connection is over (after the close handshake, or after an
    /// error was reported).
    #[inline]
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>, wcx: &mut Context<'_>) -> Poll<Option<Result<Message>>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            match self.conn.next_message() {
                Ok(Some(message)) => {
                    if message.is_close() {
                        self.arm_close_deadline();
                    }
                    return Poll::Ready(Some(Ok(message)));
                }
                Ok(None) => {}
                Err(error) => {
                    self.arm_close_deadline();
                    // Replies queued before the bad frame and our close frame should reach the peer
                    // even if the caller stops here; later calls finish the close (bounded by the deadline).
                    if !self.write_failed {
                        if let Poll::Ready(Err(_)) = self.poll_write_output(wcx) {
                            self.fail_writes(wcx);
                        }
                    }
                    return Poll::Ready(Some(Err(Error::Protocol(error))));
                }
            }
            if self.conn.pending_output() > 0 && !self.write_failed {
                // Everything buffered has been handed out: before waiting for input, send what was queued
                // meanwhile (replies `feed`-ed by the caller, pongs, close echoes) in one batch, without
                // blocking the reader if the socket is full. A read follows at once, so the output
                // buffer, once written, becomes the receive buffer instead of going back to the pool.
                if let Poll::Ready(Err(e)) = self.write_output(wcx, true) {
                    self.fail_writes(wcx);
                    if self.conn.close_state() == CloseState::Open {
                        self.finished = true;
                        return Poll::Ready(Some(Err(Error::Io(e))));
                    }
                }
            }
            match self.conn.close_state() {
                CloseState::Closed => return self.poll_finish(cx, wcx).map(|()| None),
                CloseState::CloseSent => {
                    if self.close_deadline_passed(wcx) {
                        self.finished = true;
                        self.fail_writes(wcx);
                        return Poll::Ready(Some(Err(Error::CloseTimeout(self.close_timeout))));
                    }
                }
                CloseState::Open => {
                    let queued = self.conn.pending_output();
                    // Checked here, so the keepalive's body stays out of this hot loop when it is off.
                    let expired = if self.keepalive.is_some() { self.poll_keepalive(cx) } else { None };
                    if let Some(error) = expired {
                        // The peer is probably gone, but is told why if its socket takes the close
                        // frame now; nothing waits for it. A writer half waiting for room is woken
                        // to learn that the connection is over.
                        if !self.write_failed {
                            let _ = self.poll_write_output(wcx);
                        }
                        self.finished = true;
                        self.fail_writes(wcx);
                        return Poll::Ready(Some(Err(error)));
                    }
                    if self.conn.pending_output() > queued {
                        continue; // a keepalive ping was queued: send it now, not after the next read
                    }
                }
            }
            if self.conn.pending_replies() > self.write_high_water && !self.write_failed {
                // Our automatic replies (pongs) are piling up unread by the peer: stop reading until
                // they drain. Not for the caller's own messages: `send` waits for those, and a peer
                // that is itself blocked writing to us (an echo) would wait for our read forever.
                return Poll::Pending;
            }
            match self.poll_read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    self.finished = true;
                    if self.conn.close_state() == CloseState::Open {
                        // The connection is over without a close handshake: a send now would go
                        // into a socket the peer has given up on.
                        self.fail_writes(wcx);
                    }
                    return match self.conn.close_state() {
                        CloseState::Open => Poll::Ready(Some(Err(Error::AbnormalClosure))),
                        // We started closing and the peer just hung up: done, if not graciously.
                        _ => Poll::Ready(None),
                    };
                }
                Poll::Ready(Ok(_)) => {
                    if let Some(keepalive) = &mut self.keepalive {
                        keepalive.last_activity = Instant::now();
                    }
                }
                Poll::Ready(Err(e)) => {
                    self.finished = true;
                    self.fail_writes(wcx);
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let chunk = self.read_chunk;
        let buf = self.conn.receive_buffer();
        if buf.capacity() == 0 {
            *buf = buffers::take();
        }
        // Room for the rest of a frame whose header has arrived (up to a cap, see `MAX_READ_AHEAD`),
        // else for one more chunk.
        let wanted = self.conn.frame_bytes_missing().min(MAX_READ_AHEAD).max(chunk / 2);
        let buf = self.conn.receive_buffer();
        if buf.capacity() - buf.len() < wanted {
            buf.reserve(wanted.max(chunk));
        }
        let result = poll_read_spare(Pin::new(&mut self.io), cx, buf);
        if result.is_pending() {
            // Quiet until the next readiness: keep no buffer meanwhile unless a frame is half read.
            if let Some(buffer) = self.conn.take_idle_receive_buffer() {
                buffers::give(buffer);
            }
        }
        result
    }

    /// After both close frames: flush, let the side that should close TCP first do so, wait (bounded)
    /// for the peer's end of stream, then report the end.
    fn poll_finish(&mut self, cx: &mut Context<'_>, wcx: &mut Context<'_>) -> Poll<()> {
        if !self.write_failed {
            match self.poll_write_output(wcx) {
                Poll::Pending if !self.close_deadline_passed(wcx) => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                _ => self.fail_writes(wcx),
            }
        }
        if !self.write_shut && (self.conn.should_close_transport() || self.write_failed) {
            let shutdown_pending = !self.write_failed && Pin::new(&mut self.io).poll_shutdown(wcx).is_pending();
            if shutdown_pending && !self.close_deadline_passed(wcx) {
                return Poll::Pending;
            }
            self.write_shut = true;
        }
        // Read past what the peer sent after its close frame: closing a socket with unread bytes
        // resets the connection, and a reset can cost the peer our close frame. A client waits
        // (bounded) for the server to close TCP first, as RFC 6455 §7.1.1 asks; a server, which has
        // closed its side, is done once nothing more is there: waiting for the client's FIN would
        // hold the connection for a client that keeps its socket.
        loop {
            if self.close_deadline_passed(wcx) {
                break;
            }
            let buf = self.conn.receive_buffer();
            buf.clear();
            match self.poll_read(cx) {
                Poll::Pending if self.write_shut && self.conn.should_close_transport() => break,
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                Poll::Ready(Ok(_)) => {}
            }
        }
        if !self.write_shut && !self.write_failed {
            // The server has closed TCP: close ours too rather than when the socket is dropped (one
            // try; the connection is over either way).
            let _ = Pin::new(&mut self.io).poll_shutdown(wcx);
            self.write_shut = true;
        }
        self.conn.receive_buffer().clear();
        self.finished = true;
        Poll::Ready(())
    }

    /// Nothing more can be written: a writer half waiting for room (or for the close deadline) is
    /// woken to find out. `wcx` wakes the writer (in split mode, both halves).
    fn fail_writes(&mut self, wcx: &mut Context<'_>) {
        self.write_failed = true;
        wcx.waker().wake_by_ref();
    }

    fn arm_close_deadline(&mut self) {
        if self.close_deadline.is_none() {
            self.close_deadline = Some(Box::pin(tokio::time::sleep(self.close_timeout)));
        }
    }

    /// Polled with the writer's context (`wcx`): in split mode that wakes both halves, and the
    /// deadline's timer keeps only the last waker it was polled with.
    fn close_deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        self.arm_close_deadline();
        let deadline = self.close_deadline.as_mut().expect("armed");
        deadline.as_mut().poll(cx).is_ready()
    }

    /// Runs the keepalive timer; returns an error when the peer stopped answering.
    #[inline(never)]
    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> Option<Error> {
        loop {
            let keepalive = self.keepalive.as_mut()?;
            if keepalive.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            let settings = keepalive.settings;
            match keepalive.ping_sent {
                Some(sent) if keepalive.last_activity <= sent => {
                    tracing::debug!(timeout = ?settings.timeout, "keepalive: no answer, dropping connection");
                    let _ = self.conn.close(Some(CloseFrame::new(CloseCode::GOING_AWAY, "keepalive timeout")));
                    return Some(Error::KeepaliveTimeout(settings.timeout));
                }
                Some(_) => {
                    keepalive.ping_sent = None;
                    let next = keepalive.last_activity + settings.interval;
                    keepalive.timer.as_mut().reset(next);
                }
                None if now >= keepalive.last_activity + settings.interval => {
                    keepalive.ping_sent = Some(now);
                    keepalive.timer.as_mut().reset(now + settings.timeout);
                    if self.conn.send(Message::Ping(bytes::Bytes::new())).is_err() {
                        return None;
                    }
                }
                None => {
                    let next = keepalive.last_activity + settings.interval;
                    keepalive.timer.as_mut().reset(next);
                }
            }
        }
    }

    /// Writes queued output until none is left, batching frames into vectored writes.
    pub(crate) fn poll_write_output(&mut self, wcx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write_output(wcx, false)
    }

    /// [`Core::poll_write_output`]; with `reading_next`, a read follows at once, and the output buffer,
    /// once all is written, is kept as the receive buffer if there is none (the read would take one
    /// from the pool, and the pool would take this one back). Only then: a buffer kept without a read
    /// to follow would stay with an idle connection.
    fn write_output(&mut self, wcx: &mut Context<'_>, reading_next: bool) -> Poll<io::Result<()>> {
        while self.conn.pending_output() > 0 {
            let front = self.conn.output_front();
            let written = if front.len() == self.conn.pending_output() || !self.io.is_write_vectored() {
                // One contiguous run (the usual case for small frames): a plain write, without building
                // a slice array.
                ready!(Pin::new(&mut self.io).poll_write(wcx, front))?
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IO_SLICES];
                let count = self.conn.output_slices(&mut slices);
                ready!(Pin::new(&mut self.io).poll_write_vectored(wcx, &slices[..count]))?
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.conn.consume_output(written);
        }
        if let Some(buffer) = self.conn.take_idle_output_buffer() {
            let receive = self.conn.receive_buffer();
            if reading_next && receive.capacity() == 0 {
                *receive = buffer;
            } else {
                buffers::give(buffer);
            }
        }
        Pin::new(&mut self.io).poll_flush(wcx)
    }

    /// Ready to queue another message: waits while the unsent bytes exceed the high-water mark.
    pub(crate) fn poll_ready(&mut self, wcx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.write_failed {
            return Poll::Ready(Err(Error::ConnectionClosed));
        }
        while self.conn.pending_output() > self.write_high_water {
            if let Err(e) = ready!(self.poll_write_output(wcx)) {
                self.write_failed = true;
                return Poll::Ready(Err(Error::Io(e)));
            }
        }
        Poll::Ready(Ok(()))
    }

    #[inline]
    pub(crate) fn start_send(&mut self, message: Message) -> Result<()> {
        if self.write_failed {
            return Err(Error::ConnectionClosed);
        }
        let closing = message.is_close();
        if self.conn.output_capacity() == 0 {
            // The receive buffer, when it holds nothing unparsed (a reply to what was just read), or
            // one from the pool. Either way it goes back to the pool once written and read past.
            let buffer = self.conn.take_idle_receive_buffer().unwrap_or_else(buffers::take);
            if let Some(unneeded) = self.conn.provide_output_buffer(buffer) {
                buffers::give(unneeded);
            }
        }
        self.conn.send(message).map_err(|e| match e {
            SendError::Closed => Error::ConnectionClosed,
            other => Error::Send(other),
        })?;
        if closing {
            self.arm_close_deadline();
        }
        Ok(())
    }

    pub(crate) fn poll_flush(&mut self, wcx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.write_failed {
            return Poll::Ready(if self.conn.pending_output() == 0 { Ok(()) } else { Err(Error::ConnectionClosed) });
        }
        match self.poll_write_output(wcx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.write_failed = true;
                Poll::Ready(Err(Error::Io(e)))
            }
            // Closing, and the peer does not read what we send, our close frame included: give up
            // at the close deadline rather than wait for room that may never come.
            Poll::Pending if self.close_deadline.is_some() && self.close_deadline_passed(wcx) => {
                self.write_failed = true;
                Poll::Ready(Err(Error::CloseTimeout(self.close_timeout)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Starts the close handshake if not started, and flushes.
    /// Queues our close frame, unless one is queued already (ours, or the answer to the peer's): then
    /// the flush that follows finishes the close, as a second `close` or a `close` on receiving the
    /// peer's [`Message::Close`] expects.
    pub(crate) fn start_close(&mut self, frame: CloseFrame) -> Result<()> {
        if self.conn.close_sent() {
            return Ok(());
        }
        self.start_send(Message::Close(Some(frame)))
    }

    pub(crate) fn poll_close(&mut self, wcx: &mut Context<'_>) -> Poll<Result<()>> {
        if !self.conn.close_sent() && !self.write_failed {
            self.start_send(Message::Close(Some(CloseFrame::new(CloseCode::NORMAL, ""))))?;
        }
        self.poll_flush(wcx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_intervals_are_spread_over_the_last_tenth() {
        let interval = Duration::from_secs(25);
        let spread: std::collections::BTreeSet<Duration> = (0..JITTER_STEPS).map(|_| jittered(interval)).collect();
        assert!(spread.iter().all(|d| *d <= interval && *d >= interval - interval / 10), "{spread:?}");
        // Other tests open connections meanwhile, taking steps too; most steps are still seen.
        assert!(spread.len() >= 8, "consecutive connections get different intervals: {spread:?}");
    }

    /// Answers reads from a buffer of its own; with `swap`, by putting that buffer in place of the
    /// caller's, which `ReadBuf` allows and which must not be taken for bytes read into ours.
    struct Reader {
        swap: bool,
    }

    impl AsyncRead for Reader {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.swap {
                *buf = tokio::io::ReadBuf::new(Box::leak(Box::new([7u8; 16])));
            }
            buf.put_slice(b"abc");
            Poll::Ready(Ok(()))
        }
    }

    fn read_spare(swap: bool, capacity: usize) -> (usize, BytesMut) {
        let mut buf = BytesMut::with_capacity(capacity);
        buf.extend_from_slice(b"x");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Ok(n)) = poll_read_spare(Pin::new(&mut Reader { swap }), &mut cx, &mut buf) else {
            panic!("the reader is always ready")
        };
        (n, buf)
    }

    #[test]
    fn reads_land_after_what_the_buffer_held() {
        let (n, buf) = read_spare(false, 64);
        assert_eq!((n, &buf[..]), (3, &b"xabc"[..]));
    }

    #[test]
    fn a_full_buffer_grows_rather_than_reading_nothing() {
        let (n, buf) = read_spare(false, 1);
        assert_eq!((n, &buf[..]), (3, &b"xabc"[..]));
    }

    #[test]
    #[should_panic(expected = "the reader replaced the read buffer")]
    fn a_reader_that_swaps_the_buffer_is_not_believed() {
        read_spare(true, 64);
    }
}
