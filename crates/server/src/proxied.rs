//! Client addresses behind proxies. A proxy in front of `serve` makes every connection come from the
//! proxy's address; per-address limits, the publish rate, logs and metrics need the client's. Two
//! ways to learn it, each trusted only as far as it is configured:
//!
//! - `X-Forwarded-For`, or `Forwarded` (RFC 7239) with `--forwarded-header forwarded`, on requests
//!   from `--trusted-proxies` peers. Each proxy appends the address it saw, so the list is read from
//!   the right and the first address that is not itself a trusted proxy is the client. Whatever a
//!   client put to the left is its own claim and is ignored. Only the configured header is read: a
//!   proxy that appends to one passes the other through as the client sent it. From any other peer
//!   these headers mean nothing.
//! - The PROXY protocol (v1 text, v2 binary, HAProxy's `send-proxy` / `send-proxy-v2`) with
//!   `--proxy-protocol`: each connection starts with a header naming the client, before any TLS or
//!   HTTP. A connection without a valid header is closed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::http::HeaderMap;
use ipnet::IpNet;
use ppp::HeaderResult;
use tokio::net::TcpStream;

/// The longest PROXY header taken: v1 is at most 107 bytes; v2 is 16 plus its addresses and TLVs,
/// which HAProxy keeps far below this.
const MAX_PROXY_HEADER: usize = 1024;

/// Which header the trusted proxies append the client's address to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx's `$proxy_add_x_forwarded_for`, HAProxy's `option forwardfor`).
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239), its `for=` parameters.
    Forwarded,
}

impl std::str::FromStr for ForwardedHeader {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            other => Err(format!("{other:?} is neither x-forwarded-for nor forwarded")),
        }
    }
}

/// The peers whose forwarding header is believed, and which header that is.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// Parses `10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`...; a bare address is a network of one.
    pub fn parse(list: &[String], header: ForwardedHeader) -> Result<Self, String> {
        let nets = list
            .iter()
            .map(|item| {
                let item = item.trim();
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{item:?} is not an address or a CIDR network"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { nets, header })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client a request from `peer` stands for: the rightmost address of its forwarding headers
    /// that is not a trusted proxy, when `peer` is one; `None` when `peer` is not trusted, or the
    /// headers name no address to believe (then `peer` is the client).
    pub fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> Option<SocketAddr> {
        if !self.contains(peer.ip()) {
            return None;
        }
        let hops = forwarded_hops(headers, self.header);
        let mut client = None;
        for hop in hops.iter().rev() {
            match hop {
                // "unknown" or an obfuscated name: nothing to the left of it can be checked.
                None => return client,
                Some(address) if self.contains(address.ip()) => client = Some(*address),
                Some(address) => return Some(*address),
            }
        }
        client
    }
}

/// The hops of the configured header, left to right (`Forwarded`: its `for=` parameters); `None`
/// for a hop that is not an address.
fn forwarded_hops(headers: &HeaderMap, header: ForwardedHeader) -> Vec<Option<SocketAddr>> {
    if header == ForwardedHeader::Forwarded {
        return headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|line| line.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    key.trim().eq_ignore_ascii_case("for").then(|| parse_hop(value.trim().trim_matches('"')))
                })
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(','))
        .map(|hop| parse_hop(hop.trim()))
        .collect()
}

/// `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<SocketAddr> {
    if let Ok(address) = hop.parse::<SocketAddr>() {
        return Some(SocketAddr::new(address.ip().to_canonical(), address.port()));
    }
    let bare = hop.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(hop);
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip.to_canonical(), 0))
}

/// Why a connection's PROXY header was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before its PROXY protocol header")]
    Closed,
    #[error("not a PROXY protocol header")]
    Invalid,
    #[error("PROXY protocol header longer than {MAX_PROXY_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// The first 12 bytes of a v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
const MAX_V1_HEADER: usize = 107;

/// Reads the PROXY header at the start of `stream` within `timeout`, taking exactly its bytes so
/// TLS or HTTP follows untouched: the client's address, or `None` for a header that names none (v2
/// `LOCAL`, a health check; v1 `UNKNOWN`), where the TCP peer stands. v2 is read by its length; v1
/// (text, at most 107 bytes) a byte at a time up to its CRLF.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut header = vec![0u8; V2_SIGNATURE.len()];
        stream.read_exact(&mut header).await.map_err(closed)?;
        if header == V2_SIGNATURE {
            header.resize(16, 0);
            stream.read_exact(&mut header[12..]).await.map_err(closed)?;
            let total = 16 + usize::from(u16::from_be_bytes([header[14], header[15]]));
            if total > MAX_PROXY_HEADER {
                return Err(ProxyHeaderError::TooLong);
            }
            header.resize(total, 0);
            stream.read_exact(&mut header[16..]).await.map_err(closed)?;
        } else if header.starts_with(b"PROXY ") {
            while !header.ends_with(b"\r\n") {
                if header.len() >= MAX_V1_HEADER {
                    return Err(ProxyHeaderError::Invalid);
                }
                header.push(stream.read_u8().await.map_err(closed)?);
            }
        } else {
            return Err(ProxyHeaderError::Invalid);
        }
        match HeaderResult::parse(&header) {
            HeaderResult::V1(Ok(parsed)) => Ok(v1_source(&parsed.addresses)),
            HeaderResult::V2(Ok(parsed)) => Ok(v2_source(&parsed)),
            _ => Err(ProxyHeaderError::Invalid),
        }
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

/// An end of stream before the header is complete is the peer closing, not an I/O failure.
fn closed(error: std::io::Error) -> ProxyHeaderError {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        ProxyHeaderError::Closed
    } else {
        ProxyHeaderError::Io(error)
    }
}

fn v1_source(addresses: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        ppp::v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address).to_canonical(), a.source_port))
        }
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == ppp::v2::Command::Local {
        return None;
    }
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        ppp::v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address).to_canonical(), a.source_port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn trusted(list: &[&str]) -> TrustedProxies {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        TrustedProxies::parse(&list, ForwardedHeader::XForwardedFor).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client_and_only_trusted_peers_are_believed() {
        let proxies = trusted(&["10.0.0.0/8", "192.0.2.7"]);
        let proxy = at("10.1.2.3:5000");
        // The client claimed 6.6.6.6; the first proxy saw 203.0.113.9; a second proxy (trusted) added itself.
        let claimed = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9"), ("x-forwarded-for", "10.9.9.9")]);
        assert_eq!(proxies.client(proxy, &claimed), Some(at("203.0.113.9:0")));
        // The same headers from a peer that is not a proxy: ignored.
        assert_eq!(proxies.client(at("198.51.100.1:4000"), &claimed), None);
        // No header from a proxy: the proxy is the client.
        assert_eq!(proxies.client(proxy, &HeaderMap::new()), None);
        // Only proxies in the list: the leftmost of them.
        assert_eq!(
            proxies.client(proxy, &headers(&[("x-forwarded-for", "10.0.0.5, 10.0.0.6")])),
            Some(at("10.0.0.5:0"))
        );
        // Garbage stops the walk: nothing left of it can be checked.
        assert_eq!(proxies.client(proxy, &headers(&[("x-forwarded-for", "203.0.113.1, nonsense")])), None);
        // IPv4-mapped peers are their IPv4 address.
        assert_eq!(
            proxies.client(at("[::ffff:192.0.2.7]:1"), &headers(&[("x-forwarded-for", "203.0.113.2")])),
            Some(at("203.0.113.2:0"))
        );
    }

    #[test]
    fn only_the_configured_header_is_read_and_forwardeds_forms_are_parsed() {
        let both = headers(&[
            ("x-forwarded-for", "198.51.100.5"),
            ("forwarded", r#"for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8:cafe::17]:4711""#),
        ]);
        let proxy = at("127.0.0.1:1");
        // A proxy that appends X-Forwarded-For passes a client's own Forwarded through: not read.
        assert_eq!(trusted(&["127.0.0.1"]).client(proxy, &both), Some(at("198.51.100.5:0")));
        let proxies = TrustedProxies::parse(&["127.0.0.1".into()], "Forwarded".parse().unwrap()).unwrap();
        assert_eq!(proxies.client(proxy, &both), Some(at("[2001:db8:cafe::17]:4711")));
        assert_eq!(
            proxies.client(proxy, &headers(&[("forwarded", "For=192.0.2.43:47011")])),
            Some(at("192.0.2.43:47011"))
        );
        assert_eq!(proxies.client(proxy, &headers(&[("forwarded", "for=unknown")])), None);
        assert_eq!(
            proxies.client(proxy, &headers(&[("forwarded", "for=_hidden, for=192.0.2.1")])),
            Some(at("192.0.2.1:0"))
        );
    }

    #[test]
    fn bad_entries_are_named() {
        let xff = ForwardedHeader::XForwardedFor;
        let error = TrustedProxies::parse(&["10.0.0.0/8".into(), "ten".into()], xff).unwrap_err();
        assert!(error.contains("\"ten\""), "{error}");
        let v6 = TrustedProxies::parse(&["::1".into(), "fd00::/8".into()], xff).unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!("x-real-ip".parse::<ForwardedHeader>().is_err());
    }

    async fn header_over_loopback(bytes: Vec<u8>) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let result = read_proxy_header(&mut stream, Duration::from_millis(200)).await;
        let mut rest = vec![0u8; 4];
        let rest = match tokio::time::timeout(
            Duration::from_millis(100),
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut rest),
        )
        .await
        {
            Ok(Ok(_)) => rest,
            _ => Vec::new(),
        };
        client.abort();
        (result, rest)
    }

    #[tokio::test]
    async fn proxy_headers_v1_and_v2_are_taken_exactly_and_others_refused() {
        let (source, rest) = header_over_loopback(b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 443\r\nGET /".to_vec()).await;
        assert_eq!((source.unwrap(), rest.as_slice()), (Some(at("203.0.113.9:51000")), &b"GET "[..]));

        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 7, 10, 0, 0, 1, 0xc3, 0x50, 0x01, 0xbb]);
        v2.extend_from_slice(b"\x16\x03\x01\x00");
        let (source, rest) = header_over_loopback(v2).await;
        assert_eq!((source.unwrap(), rest.as_slice()), (Some(at("198.51.100.7:50000")), &b"\x16\x03\x01\x00"[..]));

        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(header_over_loopback(local).await.0.unwrap(), None, "LOCAL: the peer stands");

        assert!(matches!(
            header_over_loopback(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await.0,
            Err(ProxyHeaderError::Invalid)
        ));
        assert!(matches!(header_over_loopback(b"PROXY TCP4 1.2".to_vec()).await.0, Err(ProxyHeaderError::Timeout(_))));
        let long = [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat();
        assert!(matches!(header_over_loopback(long).await.0, Err(ProxyHeaderError::Invalid)), "v1 past 107 bytes");
    }
}
