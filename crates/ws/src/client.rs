//! Client side: `connect("ws://host:port/path")`, a builder for headers, subprotocols and limits, and
//! the handshake over any stream the caller already has.

use std::time::Duration;

use bytes::BytesMut;
use switchboard_proto::deflate;
use switchboard_proto::handshake::{self, Accepted, ClientRequest, ResponseError};
use switchboard_proto::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::socket::WebSocket;
use crate::url::WsUrl;

/// How much of a refusal's body is kept for the error message.
const BODY_PREFIX: usize = 512;

/// Connects with default settings.
pub async fn connect(url: &str) -> Result<(WebSocket<TcpStream>, Accepted)> {
    ClientBuilder::new(url).connect().await
}

/// Options for a client connection.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    protocols: Vec<String>,
    headers: Vec<(String, String)>,
    config: Config,
    connect_timeout: Duration,
}

impl ClientBuilder {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            protocols: Vec::new(),
            headers: Vec::new(),
            config: Config::default(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Offers a subprotocol (call once per protocol, in preference order).
    pub fn protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocols.push(protocol.into());
        self
    }

    /// Adds a request header (Authorization, Cookie, Origin, ...).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Resolves, connects over TCP, and performs the handshake.
    pub async fn connect(self) -> Result<(WebSocket<TcpStream>, Accepted)> {
        let url = WsUrl::parse(&self.url)?;
        if url.secure {
            return Err(Error::Unsupported("wss:// needs TLS support, which this build does not include yet"));
        }
        let stream = self.open_tcp(&url).await?;
        let _ = stream.set_nodelay(true);
        let request = self.request(&url);
        client_handshake(stream, request, self.config).await
    }

    /// The handshake request this builder would send for `url`.
    pub fn request(&self, url: &WsUrl) -> ClientRequest {
        let mut request = ClientRequest::new(url.host_header(), url.target.clone());
        request.protocols = self.protocols.clone();
        request.headers = self.headers.clone();
        request.extensions = self.config.compression.as_ref().map(deflate::client_offer);
        request
    }

    async fn open_tcp(&self, url: &WsUrl) -> Result<TcpStream> {
        let target = format!("{}:{}", url.host, url.port);
        let connect = async {
            let addrs: Vec<_> = tokio::net::lookup_host((url.host.as_str(), url.port))
                .await
                .map_err(|source| Error::Dns { host: url.host.clone(), source })?
                .collect();
            let mut last = None;
            for addr in &addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(Error::Connect { addr: addr.to_string(), source: e }),
                }
            }
            Err(last.unwrap_or_else(|| Error::Dns {
                host: url.host.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
            }))
        };
        tokio::time::timeout(self.connect_timeout, connect).await.map_err(|_| Error::ConnectTimeout(target))?
    }
}

/// Performs the client handshake over a connected stream (TCP, TLS, a proxy tunnel...).
pub async fn client_handshake<S>(mut io: S, request: ClientRequest, config: Config) -> Result<(WebSocket<S>, Accepted)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = config.handshake_timeout;
    let exchange = async {
        let bytes = request.encode().map_err(|error| Error::Response { error, body: String::new() })?;
        io.write_all(&bytes).await?;
        io.flush().await?;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            match handshake::parse_response(&buf, config.max_head_bytes) {
                Ok(Some((head, used))) => {
                    let _ = buf.split_to(used);
                    return match handshake::verify_response(&request, head) {
                        Ok(accepted) => {
                            let deflate = match (&accepted.extensions, &config.compression) {
                                (Some(response), Some(settings)) => {
                                    Some(deflate::accept_response(response, settings).map_err(|e| Error::Response {
                                        error: ResponseError::UnofferedExtension(e.0),
                                        body: String::new(),
                                    })?)
                                }
                                _ => None,
                            };
                            Ok((accepted, deflate, buf))
                        }
                        Err(error) => {
                            let body = read_body_prefix(&mut io, &mut buf, &error).await;
                            Err(Error::Response { error, body })
                        }
                    };
                }
                Ok(None) => {}
                Err(error) => return Err(Error::Response { error, body: String::new() }),
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection during the handshake",
                )));
            }
        }
    };
    let (accepted, deflate, leftover) =
        tokio::time::timeout(limit, exchange).await.map_err(|_| Error::HandshakeTimeout(limit))??;
    let protocol = accepted.protocol.clone();
    let socket = WebSocket::from_raw_with_deflate(io, Role::Client, config, &leftover, deflate);
    Ok((socket.with_protocol(protocol), accepted))
}

/// The first bytes of a refusal's body, so the error says why (bounded in size and time).
async fn read_body_prefix<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut, error: &ResponseError) -> String {
    let ResponseError::Status { head, .. } = error else {
        return String::new();
    };
    let want = head
        .header("Content-Length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(BODY_PREFIX)
        .min(BODY_PREFIX);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while buf.len() < want {
            if io.read_buf(buf).await.unwrap_or(0) == 0 {
                break;
            }
        }
    })
    .await;
    let end = buf.len().min(want);
    String::from_utf8_lossy(&buf[..end]).trim_end().to_owned()
}
