//! TLS on rustls (ring provider): `wss://` for clients, and TLS for listening sockets.
//!
//! Client trust: the platform's certificate store (falling back to the Mozilla roots of
//! `webpki-roots` when the platform has none), plus any extra CA file the caller names, which is how a
//! test or a private deployment trusts its own certificate authority.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use tokio_rustls::{rustls, TlsAcceptor, TlsConnector};

/// What a [`TlsAcceptor`] yields for an accepted TCP connection.
pub type ServerTlsStream = tokio_rustls::server::TlsStream<TcpStream>;

use crate::error::Error;

/// HTTP/1.1 is what the WebSocket handshake speaks; say so, so an h2-capable server does not pick h2.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A client TLS configuration trusting the platform's roots (or webpki's) and, optionally, the
/// certificates in `extra_ca_file` (PEM).
pub fn client_config(extra_ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A platform store can hold certificates rustls does not accept; skip them, keep the rest.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = extra_ca_file {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| tls_config_error(path, e))?;
        }
    }
    let mut config = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
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

/// An acceptor for [`server_config`].
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, Error> {
    Ok(TlsAcceptor::from(server_config(cert_file, key_file)?))
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

/// What a client connection runs over: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum ClientStream {
    /// Plain TCP (`ws://`).
    Plain(TcpStream),
    /// TLS over TCP (`wss://`).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// True for `wss://`.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
