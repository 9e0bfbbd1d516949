//! HTTP proxies for clients: a tunnel through `CONNECT host:port` (RFC 9110 §9.3.6), configured
//! explicitly or from `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and `NO_PROXY` as curl reads them.
//! Loopback destinations never go through a proxy.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::BytesMut;
use switchboard_proto::handshake;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Error;
use crate::url::WsUrl;

/// A proxy's response head may not exceed this.
const MAX_PROXY_HEAD: usize = 8 * 1024;

/// An `http://[user:password@]host[:port]` proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// The proxy's host name or address.
    pub host: String,
    /// The proxy's port (80 when the URL names none).
    pub port: u16,
    /// `Proxy-Authorization` value, from the URL's user information.
    authorization: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the credentials.
        f.debug_struct("Proxy").field("host", &self.host).field("port", &self.port).finish_non_exhaustive()
    }
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port]` (or `host:port`).
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidUrl { url: url.to_owned(), reason };
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(bad("only http:// proxies (CONNECT) are supported")),
            None => url, // curl accepts "host:port"
        };
        let authority = rest.split('/').next().unwrap_or("");
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, authority),
        };
        let parsed = WsUrl::parse(&format!("ws://{hostport}")).map_err(|_| bad("invalid proxy host or port"))?;
        let port = if hostport.ends_with(']') || !hostport.contains(':') { 80 } else { parsed.port };
        let authorization = userinfo.map(|u| format!("Basic {}", BASE64.encode(u)));
        Ok(Self { host: parsed.host, port, authorization })
    }

    /// The proxy the environment names for `target`, if any.
    pub fn from_env(target: &WsUrl) -> Result<Option<Self>, Error> {
        Self::from_env_with(target, |name| std::env::var(name).ok())
    }

    /// [`Proxy::from_env`] with the variables read by `get` (tests, embedding).
    pub fn from_env_with(target: &WsUrl, get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, Error> {
        let var = |name: &str| get(name).or_else(|| get(&name.to_ascii_lowercase())).filter(|v| !v.trim().is_empty());
        if is_loopback(&target.host) || var("NO_PROXY").is_some_and(|list| bypasses(&list, &target.host)) {
            return Ok(None);
        }
        let chosen = if target.secure { var("HTTPS_PROXY") } else { var("HTTP_PROXY") }.or_else(|| var("ALL_PROXY"));
        chosen.map(|url| Self::parse(url.trim())).transpose()
    }

    /// Opens a TCP connection to the proxy and asks it for a tunnel to `target`.
    pub(crate) async fn connect(&self, target: &WsUrl, stream: TcpStream) -> Result<TcpStream, Error> {
        let mut stream = stream;
        let authority = if target.host.contains(':') {
            format!("[{}]:{}", target.host, target.port)
        } else {
            format!("{}:{}", target.host, target.port)
        };
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = &self.authorization {
            request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        request.push_str("\r\n");
        let proxy_name = format!("{}:{}", self.host, self.port);
        let failed = |reason: String| Error::Proxy { proxy: proxy_name.clone(), reason };
        stream.write_all(request.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(512);
        loop {
            match handshake::parse_response(&buf, MAX_PROXY_HEAD) {
                Ok(Some((head, _))) if (200..300).contains(&head.status) => return Ok(stream),
                Ok(Some((head, _))) => {
                    return Err(failed(format!("CONNECT {authority} answered {}", head.status)));
                }
                Ok(None) => {}
                Err(e) => return Err(failed(e.to_string())),
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(failed("closed the connection during CONNECT".into()));
            }
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// curl's NO_PROXY rules: `*` matches everything; an entry matches the host itself and, as a domain,
/// every name under it (`example.com` and `.example.com` both match `api.example.com`).
fn bypasses(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    no_proxy.split(',').map(|e| e.trim().to_ascii_lowercase()).filter(|e| !e.is_empty()).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = entry.split(':').next().unwrap_or("").trim_start_matches('.').to_owned();
        host == entry || host.ends_with(&format!(".{entry}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn parses_proxy_urls() {
        let p = Proxy::parse("http://proxy.local:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.local", 3128));
        assert_eq!(Proxy::parse("http://proxy.local").unwrap().port, 80);
        assert_eq!(Proxy::parse("proxy.local:8080").unwrap().port, 8080);
        let p = Proxy::parse("http://user:pw@[::1]:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 3128));
        assert_eq!(p.authorization.as_deref(), Some("Basic dXNlcjpwdw=="));
        assert!(!format!("{p:?}").contains("dXNlcjpwdw"), "credentials are not printed");
        assert!(Proxy::parse("socks5://h:1080").is_err());
    }

    #[test]
    fn environment_rules() {
        let ws = WsUrl::parse("ws://api.example.com/ws").unwrap();
        let wss = WsUrl::parse("wss://api.example.com/ws").unwrap();
        let vars = env(&[("HTTP_PROXY", "http://plain:1"), ("https_proxy", "http://secure:2")]);
        assert_eq!(Proxy::from_env_with(&ws, &vars).unwrap().unwrap().host, "plain");
        assert_eq!(Proxy::from_env_with(&wss, &vars).unwrap().unwrap().host, "secure");
        let all = env(&[("ALL_PROXY", "http://all:3")]);
        assert_eq!(Proxy::from_env_with(&wss, &all).unwrap().unwrap().host, "all");
        for no in ["example.com", ".example.com", "other.org, api.example.com", "*"] {
            let vars = env(&[("HTTP_PROXY", "http://plain:1"), ("NO_PROXY", no)]);
            assert_eq!(Proxy::from_env_with(&ws, &vars).unwrap(), None, "NO_PROXY={no}");
        }
        let vars = env(&[("HTTP_PROXY", "http://plain:1"), ("NO_PROXY", "ample.com")]);
        assert!(Proxy::from_env_with(&ws, &vars).unwrap().is_some(), "suffix must match at a dot");
        let local = WsUrl::parse("ws://127.0.0.1:9002/").unwrap();
        assert_eq!(Proxy::from_env_with(&local, env(&[("HTTP_PROXY", "http://p:1")])).unwrap(), None);
        assert_eq!(Proxy::from_env_with(&ws, env(&[])).unwrap(), None);
    }
}
