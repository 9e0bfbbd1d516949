//! `ws://` and `wss://` URLs (RFC 6455 §3): scheme, host (IPv6 literals in brackets), port with the
//! scheme's default, and the resource name (path and query). A `#fragment` is refused, as the RFC says.
//! `http://` and `https://` are taken as `ws://` and `wss://`, as browsers' `WebSocket` takes them
//! (WHATWG WebSockets standard).

use crate::error::Error;

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// `wss://`: TLS.
    pub secure: bool,
    /// Host name or address, without IPv6 brackets.
    pub host: String,
    /// The port, or the scheme's default (80, 443).
    pub port: u16,
    /// Path and query, at least `/`.
    pub target: String,
}

impl WsUrl {
    /// Parses and checks a URL.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidUrl { url: url.to_owned(), reason };
        let (scheme, rest) = url.split_once("://").ok_or(bad("missing scheme (ws:// or wss://)"))?;
        let secure = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => false,
            "wss" | "https" => true,
            _ => return Err(bad("scheme must be ws or wss (or http or https, taken as those)")),
        };
        if rest.contains('#') {
            return Err(bad("WebSocket URLs cannot have a #fragment"));
        }
        let split_at = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split_at);
        if authority.contains('@') {
            return Err(bad("user information in the URL is not supported; send an Authorization header"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(bad("unclosed IPv6 bracket"))?;
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad("invalid IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(bad("junk after IPv6 address"))?),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port = match port {
            None | Some("") => {
                if secure {
                    443
                } else {
                    80
                }
            }
            Some(p) => p.parse().map_err(|_| bad("invalid port"))?,
        };
        let target = match target {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        Ok(Self { secure, host: host.to_owned(), port, target })
    }

    /// The Host header: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let default = if self.secure { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let u = WsUrl::parse("ws://example.com/chat?room=1").unwrap();
        assert_eq!((u.secure, u.host.as_str(), u.port, u.target.as_str()), (false, "example.com", 80, "/chat?room=1"));
        assert_eq!(u.host_header(), "example.com");
        let u = WsUrl::parse("wss://example.com").unwrap();
        assert_eq!((u.port, u.target.as_str()), (443, "/"));
        let u = WsUrl::parse("ws://127.0.0.1:9002?x=1").unwrap();
        assert_eq!((u.port, u.target.as_str(), u.host_header().as_str()), (9002, "/?x=1", "127.0.0.1:9002"));
        let u = WsUrl::parse("ws://[::1]:8000/ws").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.host_header().as_str()), ("::1", 8000, "[::1]:8000"));
        let u = WsUrl::parse("WSS://[2001:db8::1]/").unwrap();
        assert_eq!((u.secure, u.port, u.host_header().as_str()), (true, 443, "[2001:db8::1]"));
    }

    #[test]
    fn refuses_what_the_rfc_refuses() {
        for bad in [
            "ws://host/path#frag",
            "ftp://host/",
            "host:80",
            "ws://",
            "ws://:80/",
            "ws://h:99999/",
            "ws://[::1/",
            "ws://u:p@h/",
        ] {
            assert!(matches!(WsUrl::parse(bad), Err(Error::InvalidUrl { .. })), "{bad}");
        }
    }
}
