//! Client side: `connect("ws://host:port/path")` or `wss://`, a builder for headers, subprotocols,
//! compression, TLS trust, proxies, timeouts and limits, and the handshake over any stream the caller
//! already has.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use switchboard_proto::deflate;
use switchboard_proto::handshake::{self, Accepted, ClientRequest, ResponseError};
use switchboard_proto::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::proxy::Proxy;
use crate::socket::WebSocket;
use crate::tls::{self, ClientStream};
use crate::url::WsUrl;

/// How much of a refusal's body is kept for the error message.
pub(crate) const BODY_PREFIX: usize = 512;

/// Connects with default settings (proxy from the environment, platform TLS roots).
pub async fn connect(url: &str) -> Result<(WebSocket<ClientStream>, Accepted)> {
    ClientBuilder::new(url).connect().await
}

#[derive(Debug, Clone)]
enum ProxyChoice {
    FromEnvironment,
    Direct,
    Explicit(String),
}

#[derive(Clone)]
enum TlsChoice {
    Default { extra_ca_file: Option<PathBuf> },
    Custom(Arc<ClientConfig>),
}

/// Options for a client connection.
#[derive(Clone)]
pub struct ClientBuilder {
    url: String,
    protocols: Vec<String>,
    headers: Vec<(String, String)>,
    config: Config,
    connect_timeout: Duration,
    proxy: ProxyChoice,
    tls: TlsChoice,
    http2: bool,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &self.url)
            .field("protocols", &self.protocols)
            .field("headers", &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A client for a `ws://` or `wss://` URL, with default settings.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            protocols: Vec::new(),
            headers: Vec::new(),
            config: Config::default(),
            connect_timeout: Duration::from_secs(10),
            proxy: ProxyChoice::FromEnvironment,
            tls: TlsChoice::Default { extra_ca_file: None },
            http2: false,
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

    /// Limits, keepalive, compression (`Config::compression` to offer permessage-deflate).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// How long resolving, TCP, TLS and any proxy may take together.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Tunnels through this `http://` proxy with CONNECT, whatever the environment says.
    pub fn proxy(mut self, url: impl Into<String>) -> Self {
        self.proxy = ProxyChoice::Explicit(url.into());
        self
    }

    /// Connects directly, ignoring `HTTP_PROXY` and friends.
    pub fn no_proxy(mut self) -> Self {
        self.proxy = ProxyChoice::Direct;
        self
    }

    /// Also trusts the CA certificates in this PEM file for `wss://`.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls = TlsChoice::Default { extra_ca_file: Some(path.into()) };
        self
    }

    /// Uses this rustls configuration for `wss://` (client certificates, custom verification...).
    pub fn tls_config(mut self, config: Arc<ClientConfig>) -> Self {
        self.tls = TlsChoice::Custom(config);
        self
    }

    /// For `wss://`: offers HTTP/2 in TLS and, when the server picks it, opens the WebSocket as an
    /// HTTP/2 extended CONNECT (RFC 8441) on a connection of its own; a server that picks
    /// HTTP/1.1 gets the usual upgrade, and so does one that picks HTTP/2 without enabling
    /// WebSockets on it (on a new connection, offering HTTP/1.1 only). See
    /// [`ClientBuilder::connect_http2`] for several WebSockets on one connection. No effect on `ws://`.
    #[cfg(feature = "hyper")]
    pub fn http2(mut self, enabled: bool) -> Self {
        self.http2 = enabled;
        self
    }

    /// Opens an HTTP/2 connection to this builder's `wss://` server (the URL's path is not used),
    /// for [`ClientBuilder::open_on`] and plain requests. Fails if the server does not pick `h2` or
    /// does not enable extended CONNECT ([`Error::Http2WebSocketsDisabled`], as soon as its SETTINGS
    /// say so).
    #[cfg(feature = "hyper")]
    pub async fn connect_http2(&self) -> Result<crate::http2::Http2Connection> {
        let url = WsUrl::parse(&self.url)?;
        if !url.secure {
            return Err(Error::InvalidUrl { url: self.url.clone(), reason: "HTTP/2 needs wss:// (TLS)" });
        }
        match self.open_stream(&url, &[tls::ALPN_H2]).await? {
            ClientStream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2) => {
                crate::http2::Http2Connection::handshake(tls, url.host_header(), &self.config).await
            }
            _ => Err(Error::Http2(format!("{} did not choose h2 in TLS", url.host_header()))),
        }
    }

    /// Opens a WebSocket for this builder's URL (path, query, subprotocols, headers, settings) as a
    /// stream of `connection`.
    #[cfg(feature = "hyper")]
    pub async fn open_on(
        &self,
        connection: &crate::http2::Http2Connection,
    ) -> Result<(WebSocket<ClientStream>, Accepted)> {
        let url = WsUrl::parse(&self.url)?;
        connection.open(&self.request(&url), self.config.clone()).await
    }

    /// Resolves, connects (through a proxy if one applies), negotiates TLS for `wss://`, and performs
    /// the WebSocket handshake (over HTTP/2 if [`ClientBuilder::http2`] is on and the server picks it).
    pub async fn connect(self) -> Result<(WebSocket<ClientStream>, Accepted)> {
        let url = WsUrl::parse(&self.url)?;
        #[cfg(feature = "hyper")]
        if self.http2 && url.secure {
            let stream = self.open_stream(&url, &[tls::ALPN_H2, tls::ALPN_HTTP1]).await?;
            let stream = match stream {
                ClientStream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2) => {
                    match crate::http2::Http2Connection::handshake(tls, url.host_header(), &self.config).await {
                        Ok(connection) => return connection.open(&self.request(&url), self.config).await,
                        // HTTP/2 without WebSockets on it (most servers and proxies that speak h2): a
                        // connection of its own, HTTP/1.1 only.
                        Err(Error::Http2WebSocketsDisabled) => self.open_stream(&url, &[tls::ALPN_HTTP1]).await?,
                        Err(error) => return Err(error),
                    }
                }
                stream => stream,
            };
            return client_handshake(stream, self.request(&url), self.config).await;
        }
        let stream = self.open_stream(&url, &[tls::ALPN_HTTP1]).await?;
        let request = self.request(&url);
        client_handshake(stream, request, self.config).await
    }

    /// TCP (through a proxy if one applies) and, for `wss://`, TLS offering `alpn`.
    async fn open_stream(&self, url: &WsUrl, alpn: &[&[u8]]) -> Result<ClientStream> {
        let proxy = match &self.proxy {
            ProxyChoice::FromEnvironment => Proxy::from_env(url)?,
            ProxyChoice::Direct => None,
            ProxyChoice::Explicit(proxy) => Some(Proxy::parse(proxy)?),
        };
        let deadline = self.connect_timeout;
        let target = format!("{}:{}", url.host, url.port);
        tokio::time::timeout(deadline, async {
            let tcp = match &proxy {
                Some(proxy) => proxy.connect(url, open_tcp(&proxy.host, proxy.port).await?).await?,
                None => open_tcp(&url.host, url.port).await?,
            };
            let _ = tcp.set_nodelay(true);
            if url.secure {
                self.start_tls(url, tcp, alpn).await
            } else {
                Ok(ClientStream::Plain(tcp))
            }
        })
        .await
        .map_err(|_| Error::ConnectTimeout(target))?
    }

    async fn start_tls(&self, url: &WsUrl, tcp: TcpStream, alpn: &[&[u8]]) -> Result<ClientStream> {
        let mut config = match &self.tls {
            TlsChoice::Custom(config) => config.clone(),
            TlsChoice::Default { extra_ca_file } => tls::client_config(extra_ca_file.as_deref())?,
        };
        let wanted: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        if config.alpn_protocols != wanted {
            Arc::make_mut(&mut config).alpn_protocols = wanted;
        }
        let server_name = ServerName::try_from(url.host.clone())
            .map_err(|_| Error::InvalidUrl { url: self.url.clone(), reason: "host is not a valid TLS server name" })?;
        let stream = TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|source| Error::Tls { host: url.host.clone(), source })?;
        Ok(ClientStream::Tls(Box::new(stream)))
    }

    /// The handshake request this builder would send for `url`.
    pub fn request(&self, url: &WsUrl) -> ClientRequest {
        let mut request = ClientRequest::new(url.host_header(), url.target.clone());
        request.protocols = self.protocols.clone();
        request.headers = self.headers.clone();
        request.extensions = self.config.compression.as_ref().map(deflate::client_offer);
        request
    }
}

/// Resolves `host` and connects to the first address that answers.
async fn open_tcp(host: &str, port: u16) -> Result<TcpStream> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| Error::Dns { host: host.to_owned(), source })?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(source) => last = Some(Error::Connect { addr: addr.to_string(), source }),
        }
    }
    Err(last.unwrap_or_else(|| Error::Dns {
        host: host.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
    }))
}

/// The permessage-deflate parameters the server's answer agreed to, if it took our offer; an
/// extension we did not offer is an error.
pub(crate) fn accepted_deflate(accepted: &Accepted, config: &Config) -> Result<Option<deflate::DeflateParams>> {
    match (&accepted.extensions, &config.compression) {
        (Some(response), Some(settings)) => deflate::accept_response(response, settings)
            .map(Some)
            .map_err(|e| Error::Response { error: ResponseError::UnofferedExtension(e.0), body: String::new() }),
        _ => Ok(None),
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
                            let deflate = accepted_deflate(&accepted, &config)?;
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
    let ResponseError::Status { head, .. } = error else { return String::new() };
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
