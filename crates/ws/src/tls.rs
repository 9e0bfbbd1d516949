//! TLS on rustls (ring provider): `wss://` for clients, and TLS for listening sockets.
//!
//! Client trust: the platform's certificate store (falling back to the Mozilla roots of
//! `webpki-roots` when the platform has none), plus any extra CA file the caller names, which is how a
//! test or a private deployment trusts its own certificate authority.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use tokio_rustls::{rustls, TlsAcceptor, TlsConnector};

/// What a [`TlsAcceptor`] yields for an accepted stream.
pub type ServerTls<S> = tokio_rustls::server::TlsStream<S>;
/// What a [`TlsAcceptor`] yields for an accepted TCP connection.
pub type ServerTlsStream = ServerTls<TcpStream>;

use crate::error::Error;

/// HTTP/1.1 is what the WebSocket handshake speaks unless HTTP/2 is asked for; say so, so an
/// h2-capable server does not pick h2.
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The ALPN name of HTTP/2 over TLS.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// A client TLS configuration trusting the platform's roots (or webpki's) and, optionally, the
/// certificates in `extra_ca_file` (PEM).
///
/// The platform's store is read once per process (it is a few hundred files, read again on every
/// `wss://` connection otherwise, and twice by an HTTP/2 connection that falls back to HTTP/1.1);
/// without `extra_ca_file` the configuration itself is shared.
pub fn client_config(extra_ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, Error> {
    static DEFAULT: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    let Some(path) = extra_ca_file else {
        return Ok(DEFAULT.get_or_init(|| config_trusting(platform_roots().clone())).clone());
    };
    let mut roots = platform_roots().clone();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| tls_config_error(path, e))?;
    }
    Ok(config_trusting(roots))
}

/// The platform's roots, or webpki's when it has none; read on first use.
fn platform_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A platform store can hold certificates rustls does not accept; skip them, keep the rest.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    })
}

fn config_trusting(roots: RootCertStore) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Arc::new(config)
}

/// A server TLS configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, Error> {
    let certs = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| tls_config_error(key_file, e))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_config_error(cert_file, e))?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// [`server_config`] that also offers HTTP/2 (`h2` first, then `http/1.1`), for a server whose every
/// WebSocket route takes an HTTP/2 extended CONNECT too. The application reads the choice from the
/// accepted stream ([`is_http2`]).
#[cfg(feature = "hyper")]
pub fn server_config_h2(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, Error> {
    let mut config = Arc::unwrap_or_clone(server_config(cert_file, key_file)?);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// True when ALPN chose HTTP/2 on this accepted TLS stream.
pub fn is_http2<S>(stream: &ServerTls<S>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(ALPN_H2)
}

/// An acceptor for [`server_config`].
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, Error> {
    Ok(TlsAcceptor::from(server_config(cert_file, key_file)?))
}

/// An acceptor for [`server_config_h2`].
#[cfg(feature = "hyper")]
pub fn acceptor_h2(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, Error> {
    Ok(TlsAcceptor::from(server_config_h2(cert_file, key_file)?))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_config_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_config_error(path, e))?;
    if certs.is_empty() {
        return Err(Error::TlsConfig { path: path.display().to_string(), reason: "no certificate in file".into() });
    }
    Ok(certs)
}

fn tls_config_error(path: &Path, error: impl std::fmt::Display) -> Error {
    Error::TlsConfig { path: path.display().to_string(), reason: error.to_string() }
}

/// What a client connection runs over: plain TCP, TLS over TCP, or a stream of an HTTP/2
/// connection (which is over TLS).
#[derive(Debug)]
pub enum ClientStream {
    /// Plain TCP (`ws://`).
    Plain(TcpStream),
    /// TLS over TCP (`wss://`).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// One stream of an HTTP/2 connection (`wss://` with HTTP/2, RFC 8441).
    #[cfg(feature = "hyper")]
    Http2(Box<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>),
}

impl ClientStream {
    /// True for `wss://`, over HTTP/1.1 or HTTP/2.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Plain(_))
    }

    /// True for a WebSocket on an HTTP/2 stream.
    pub fn is_http2(&self) -> bool {
        #[cfg(feature = "hyper")]
        if let Self::Http2(_) = self {
            return true;
        }
        false
    }
}

/// The same call on whichever stream this is.
macro_rules! each_stream {
    ($self:expr, $s:ident => $call:expr) => {
        match $self {
            ClientStream::Plain($s) => $call,
            ClientStream::Tls($s) => $call,
            #[cfg(feature = "hyper")]
            ClientStream::Http2($s) => $call,
        }
    };
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each_stream!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}
