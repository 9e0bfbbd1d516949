//! WebSockets over HTTP/2 for clients (RFC 8441): one TLS connection with `h2` chosen by ALPN, each
//! WebSocket an extended CONNECT stream on it, beside ordinary requests.
//!
//! [`ClientBuilder::http2`](crate::ClientBuilder::http2) makes `connect` use it (one connection per
//! WebSocket, falling back to HTTP/1.1 when the server does not pick `h2`);
//! [`ClientBuilder::connect_http2`](crate::ClientBuilder::connect_http2) opens an [`Http2Connection`]
//! that carries any number of WebSockets and requests at once.
//!
//! A client may only send `:protocol` once the server has said `SETTINGS_ENABLE_CONNECT_PROTOCOL`
//! (RFC 8441 §3). The server's SETTINGS is the first thing it sends, so opening a connection waits
//! for it, bounded by the handshake timeout; a server whose first SETTINGS does not enable it is
//! told at once ([`Error::Http2WebSocketsDisabled`]), and `http2(true)` then uses HTTP/1.1.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchboard_proto::handshake::{self, Accepted, ClientRequest, Head, ResponseError};
use switchboard_proto::Role;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::socket::WebSocket;
use crate::tls::ClientStream;

/// An HTTP/2 connection to a server that accepts WebSockets on it. Cheap to clone: clones share the
/// connection, which closes when the last clone and the last WebSocket on it are gone.
#[derive(Clone)]
pub struct Http2Connection {
    send: SendRequest<Empty<Bytes>>,
    /// `host[:port]`, the `:authority` of every request.
    authority: String,
}

impl std::fmt::Debug for Http2Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Connection").field("authority", &self.authority).finish_non_exhaustive()
    }
}

impl Http2Connection {
    /// Runs HTTP/2 over `io`, a stream that speaks it (TLS that chose `h2`, or cleartext to a
    /// server known to take HTTP/2 at once), with `authority` (`host[:port]`) as every request's
    /// `:authority`; waits up to `config`'s handshake timeout for the server to enable extended
    /// CONNECT. [`ClientBuilder::connect_http2`](crate::ClientBuilder::connect_http2) does all of
    /// it for a `wss://` URL.
    pub async fn handshake<S>(io: S, authority: String, config: &Config) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let preface = Arc::new(AtomicU8::new(PREFACE_UNSEEN));
        let io = SettingsWatch { io, preface: preface.clone(), parser: Some(Box::default()) };
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_head_bytes).unwrap_or(u32::MAX))
            .handshake(TokioIo::new(io))
            .await
            .map_err(http2_error)?;
        // hyper runs the HTTP/2 frames on a task of its own, and nothing tells this one when the
        // server's SETTINGS has been applied: the flag is looked at every millisecond (only while
        // connecting), with the connection polled here meanwhile, then it runs on a task of its own.
        let mut connection = Box::pin(connection);
        let limit = config.handshake_timeout;
        let settled = tokio::time::timeout(limit, async {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut without_since = None;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        let reason = result.err().map_or_else(|| "closed".to_owned(), |e| e.to_string());
                        return Err(Error::Http2(format!("the connection ended at once: {reason}")));
                    }
                    _ = tick.tick() => {
                        if connection.is_extended_connect_protocol_enabled() {
                            return Ok(());
                        }
                        // Seen enabled: hyper applies it in a moment. Seen without it: servers say it in
                        // their first SETTINGS; one more moment for a second SETTINGS that would (RFC
                        // 8441 allows it), then it will not come.
                        if preface.load(Ordering::Acquire) == PREFACE_WITHOUT {
                            let since = *without_since.get_or_insert_with(tokio::time::Instant::now);
                            if since.elapsed() >= SECOND_SETTINGS_GRACE {
                                return Err(Error::Http2WebSocketsDisabled);
                            }
                        }
                    }
                }
            }
        });
        match settled.await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Http2(format!(
                "the server did not enable WebSockets over HTTP/2 (SETTINGS_ENABLE_CONNECT_PROTOCOL) within {limit:?}"
            )))
            }
        }
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP/2 connection ended with an error");
            }
        });
        Ok(Self { send, authority })
    }

    /// Sends an ordinary request on the connection (its URI's path is used; scheme and authority are
    /// the connection's when absent).
    pub async fn request(
        &self,
        mut request: http::Request<Empty<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>> {
        if request.uri().authority().is_none() {
            *request.uri_mut() = self.uri(request.uri().path_and_query().map_or("/", |p| p.as_str()))?;
        }
        let mut send = self.send.clone();
        send.ready().await.map_err(http2_error)?;
        send.send_request(request).await.map_err(http2_error)
    }

    /// Opens a WebSocket on a new stream: an extended CONNECT for `request` (its target, offers and
    /// headers; its key and `Host` are not used), answered 200.
    pub async fn open(&self, request: &ClientRequest, config: Config) -> Result<(WebSocket<ClientStream>, Accepted)> {
        let target = if request.target.is_empty() { "/" } else { &request.target };
        let invalid = |error| Error::Response { error, body: String::new() };
        let mut builder = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(self.uri(target)?)
            .extension(hyper::ext::Protocol::from_static("websocket"));
        for (name, value) in request.http2_fields().map_err(invalid)? {
            builder = builder.header(name, value);
        }
        let connect = builder.body(Empty::new()).map_err(|e| invalid(ResponseError::InvalidHeader(e.to_string())))?;
        let limit = config.handshake_timeout;
        let exchange = async {
            let mut response = self.request(connect).await?;
            let head = response_head(&response);
            let accepted = match handshake::verify_http2_response(request, head) {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Only a refusal's body says why; any other answer's is not worth waiting for.
                    let body = match error {
                        ResponseError::Status { .. } => body_prefix(response.into_body()).await,
                        _ => String::new(),
                    };
                    return Err(Error::Response { error, body });
                }
            };
            let upgraded = hyper::upgrade::on(&mut response).await.map_err(http2_error)?;
            Ok((accepted, upgraded))
        };
        let (accepted, upgraded) =
            tokio::time::timeout(limit, exchange).await.map_err(|_| Error::HandshakeTimeout(limit))??;
        let deflate = crate::client::accepted_deflate(&accepted, &config)?;
        let protocol = accepted.protocol.clone();
        let stream = ClientStream::Http2(Box::new(TokioIo::new(upgraded)));
        let socket = WebSocket::from_raw_with_deflate(stream, Role::Client, config, &[], deflate);
        Ok((socket.with_protocol(protocol), accepted))
    }

    fn uri(&self, target: &str) -> Result<http::Uri> {
        format!("https://{}{target}", self.authority).parse().map_err(|_| Error::InvalidUrl {
            url: format!("https://{}{target}", self.authority),
            reason: "not a valid request target",
        })
    }
}

/// The response's status and fields as the engine's [`Head`].
fn response_head<B>(response: &http::Response<B>) -> Head {
    Head {
        status: response.status().as_u16(),
        headers: crate::upgrade::engine_headers(response.headers()),
        ..Head::default()
    }
}

/// The first bytes of a refusal's body, so the error says why: as over HTTP/1.1, up to
/// [`crate::client::BODY_PREFIX`] bytes, read for at most a second.
async fn body_prefix(mut body: hyper::body::Incoming) -> String {
    use http_body_util::BodyExt;
    let mut prefix = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while prefix.len() < crate::client::BODY_PREFIX {
            match body.frame().await {
                Some(Ok(frame)) => prefix.extend_from_slice(frame.data_ref().map_or(&[][..], |data| &data[..])),
                _ => break,
            }
        }
    })
    .await;
    prefix.truncate(crate::client::BODY_PREFIX);
    String::from_utf8_lossy(&prefix).trim_end().to_owned()
}

/// How long, after a first SETTINGS without extended CONNECT, a client waits for a later one to
/// enable it before it falls back.
const SECOND_SETTINGS_GRACE: Duration = Duration::from_millis(50);

/// What the server's first SETTINGS frame said of extended CONNECT.
const PREFACE_UNSEEN: u8 = 0;
const PREFACE_WITH: u8 = 1;
const PREFACE_WITHOUT: u8 = 2;
/// The first frame was not a SETTINGS: not an HTTP/2 server as RFC 9113 §3.4 has it (hyper fails
/// the connection; this is no reason to fall back).
const PREFACE_BROKEN: u8 = 3;

/// The connection's stream, reading the server's first frame (its SETTINGS: RFC 9113 §3.4) as hyper
/// reads it, for whether it enables extended CONNECT: hyper applies it without a word, so this is
/// how a client learns at once that a server will not take WebSockets, instead of waiting out the
/// handshake timeout. After that frame it only passes bytes through.
struct SettingsWatch<S> {
    io: S,
    preface: Arc<AtomicU8>,
    /// Until the first frame is whole.
    parser: Option<Box<PrefaceParser>>,
}

/// Reads a SETTINGS frame that arrives in pieces of any size.
#[derive(Default)]
struct PrefaceParser {
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes still to come.
    remaining: usize,
    entry: [u8; 6],
    entry_len: usize,
    enabled: bool,
}

/// `SETTINGS_ENABLE_CONNECT_PROTOCOL` (RFC 8441 §3).
const SETTINGS_ENABLE_CONNECT_PROTOCOL: u16 = 0x8;
/// The SETTINGS frame type.
const FRAME_SETTINGS: u8 = 0x4;

impl PrefaceParser {
    /// Takes the next bytes; once the frame is whole, what it says (a `PREFACE_*`).
    fn feed(&mut self, bytes: &[u8]) -> Option<u8> {
        for &byte in bytes {
            if self.header_len < self.header.len() {
                self.header[self.header_len] = byte;
                self.header_len += 1;
                if self.header_len == self.header.len() {
                    // A SETTINGS, and not an acknowledgement (flag 0x1): the server's own.
                    if self.header[3] != FRAME_SETTINGS || self.header[4] & 0x1 != 0 {
                        return Some(PREFACE_BROKEN);
                    }
                    self.remaining = usize::from(self.header[0]) << 16
                        | usize::from(self.header[1]) << 8
                        | usize::from(self.header[2]);
                    if self.remaining == 0 {
                        return Some(PREFACE_WITHOUT);
                    }
                }
                continue;
            }
            self.entry[self.entry_len] = byte;
            self.entry_len += 1;
            self.remaining -= 1;
            if self.entry_len == self.entry.len() {
                let id = u16::from_be_bytes([self.entry[0], self.entry[1]]);
                let value = u32::from_be_bytes([self.entry[2], self.entry[3], self.entry[4], self.entry[5]]);
                if id == SETTINGS_ENABLE_CONNECT_PROTOCOL {
                    self.enabled = value == 1;
                }
                self.entry_len = 0;
            }
            if self.remaining == 0 {
                return Some(if self.enabled { PREFACE_WITH } else { PREFACE_WITHOUT });
            }
        }
        None
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SettingsWatch<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Some(parser), Poll::Ready(Ok(()))) = (this.parser.as_mut(), &polled) {
            if let Some(said) = parser.feed(&buf.filled()[before..]) {
                this.preface.store(said, Ordering::Release);
                this.parser = None;
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SettingsWatch<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn http2_error(error: hyper::Error) -> Error {
    Error::Http2(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
        let len = entries.len() * 6;
        let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, FRAME_SETTINGS, 0, 0, 0, 0, 0];
        for (id, value) in entries {
            frame.extend_from_slice(&id.to_be_bytes());
            frame.extend_from_slice(&value.to_be_bytes());
        }
        frame
    }

    /// Fed in pieces of every size, a frame gives the same answer as whole.
    fn read_in_pieces(frame: &[u8]) -> Option<u8> {
        let mut answers = Vec::new();
        for piece in 1..=frame.len() {
            let mut parser = PrefaceParser::default();
            let answer = frame.chunks(piece).find_map(|chunk| parser.feed(chunk));
            answers.push(answer);
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
        answers[0]
    }

    #[test]
    fn the_first_settings_frame_says_whether_websockets_are_enabled() {
        let with = [(0x3, 100), (SETTINGS_ENABLE_CONNECT_PROTOCOL, 1), (0x4, 65535)];
        assert_eq!(read_in_pieces(&settings(&with)), Some(PREFACE_WITH));
        assert_eq!(read_in_pieces(&settings(&[(0x3, 100), (0x4, 65535)])), Some(PREFACE_WITHOUT));
        assert_eq!(read_in_pieces(&settings(&[(SETTINGS_ENABLE_CONNECT_PROTOCOL, 0)])), Some(PREFACE_WITHOUT));
        assert_eq!(read_in_pieces(&settings(&[])), Some(PREFACE_WITHOUT), "an empty SETTINGS enables nothing");
        let mut not_settings = settings(&[(SETTINGS_ENABLE_CONNECT_PROTOCOL, 1)]);
        not_settings[3] = 0x6; // PING
        assert_eq!(read_in_pieces(&not_settings), Some(PREFACE_BROKEN), "not a server preface");
        let mut ack = settings(&[]);
        ack[4] = 0x1;
        assert_eq!(read_in_pieces(&ack), Some(PREFACE_BROKEN), "an acknowledgement is not the server's SETTINGS");
        // Half a frame: no answer yet.
        let whole = settings(&[(SETTINGS_ENABLE_CONNECT_PROTOCOL, 1)]);
        assert_eq!(PrefaceParser::default().feed(&whole[..whole.len() - 1]), None);
    }
}
