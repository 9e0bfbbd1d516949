//! The opening handshake (RFC 6455 §4): the server parses and validates the client's GET and answers
//! 101 or an HTTP error with a reason; the client builds its request and verifies the answer.
//!
//! Everything works on byte buffers the caller fills, so any transport (a socket, hyper's upgrade, a
//! test vector) can drive it. Header size is bounded: a peer cannot make us buffer an endless request.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// The GUID of RFC 6455 §1.3 appended to the key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The protocol version this engine speaks.
pub const WEBSOCKET_VERSION: &str = "13";
/// Default bound on the size of a request or response head.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
/// The most header lines a head may have.
const MAX_HEADERS: usize = 64;

/// Computes `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha.digest().bytes())
}

/// A fresh random `Sec-WebSocket-Key` (16 random bytes, base64).
pub fn generate_key() -> String {
    let mut nonce = [0u8; 16];
    crate::random::fill(&mut nonce);
    BASE64.encode(nonce)
}

/// One header line; values are kept as bytes since HTTP allows non-UTF-8 (obs-text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// A parsed HTTP head (request or response), before any WebSocket validation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Head {
    /// `GET` for a request; empty for a response.
    pub method: String,
    /// Request target (path and query) for a request; empty for a response.
    pub target: String,
    /// Status code for a response; 0 for a request.
    pub status: u16,
    /// Minor HTTP version (1 for HTTP/1.1).
    pub version: u8,
    pub headers: Vec<Header>,
}

impl Head {
    /// The first value of a header, if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(&h.value).ok())
    }

    /// Every comma-separated token of every line of a header, trimmed (RFC 9110 list syntax).
    pub fn header_tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(&h.value).ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim_matches(|c| c == ' ' || c == '\t'))
            .filter(|t| !t.is_empty())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_tokens(name).any(|t| t.eq_ignore_ascii_case(token))
    }
}

/// Why the server refuses a handshake. `status()` and `to_response()` give the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("request head exceeds {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("method {0} not allowed; a WebSocket handshake is a GET")]
    Method(String),
    #[error("HTTP/1.1 or later is required")]
    HttpVersion,
    #[error("missing Host header")]
    MissingHost,
    #[error("missing 'Upgrade: websocket'")]
    MissingUpgrade,
    #[error("missing 'Connection: Upgrade'")]
    MissingConnectionUpgrade,
    #[error("missing or invalid Sec-WebSocket-Key (must be 16 bytes, base64)")]
    BadKey,
    #[error("missing Sec-WebSocket-Version")]
    MissingVersion,
    #[error("unsupported Sec-WebSocket-Version {0:?}; this server speaks 13")]
    UnsupportedVersion(String),
    /// Refused by the application (origin, authentication, path...).
    #[error("{reason}")]
    Rejected { status: u16, reason: String },
}

impl HandshakeError {
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge { .. } => 431,
            Self::Method(_) => 405,
            Self::UnsupportedVersion(_) => 426,
            Self::Rejected { status, .. } => *status,
            _ => 400,
        }
    }

    /// The complete HTTP response that refuses the handshake, reason in the body.
    pub fn to_response(&self) -> Vec<u8> {
        let mut extra: Vec<(&str, &str)> = Vec::new();
        match self {
            Self::UnsupportedVersion(_) | Self::MissingVersion => {
                extra.push(("Sec-WebSocket-Version", WEBSOCKET_VERSION))
            }
            Self::Method(_) => extra.push(("Allow", "GET")),
            _ => {}
        }
        error_response(self.status(), &self.to_string(), &extra)
    }
}

/// An HTTP error response with a plain-text body; the connection is not kept.
pub fn error_response(status: u16, body: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", status, reason_phrase(status)).as_bytes());
    out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n");
    for (name, value) in extra_headers {
        if is_safe_header(name, value.as_bytes()) {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n{}\n", body.len() + 1, body).as_bytes());
    out
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// No CR, LF or NUL may reach the wire from caller-supplied headers (response splitting).
fn is_safe_header(name: &str, value: &[u8]) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && value.iter().all(|&b| b != b'\r' && b != b'\n' && b != 0)
}

/// Parses a request head from the front of `buf`: `Ok(None)` while incomplete, else the head and the
/// number of bytes it used (bytes after it already belong to the WebSocket stream).
pub fn parse_request(buf: &[u8], max_head_bytes: usize) -> Result<Option<(Head, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head_bytes => {
            let head = Head {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                status: 0,
                version: req.version.unwrap_or(0),
                headers: copy_headers(req.headers),
            };
            Ok(Some((head, n)))
        }
        Ok(httparse::Status::Complete(_)) => Err(HandshakeError::HeadTooLarge { limit: max_head_bytes }),
        Ok(httparse::Status::Partial) if buf.len() >= max_head_bytes => {
            Err(HandshakeError::HeadTooLarge { limit: max_head_bytes })
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HandshakeError::HeadTooLarge { limit: max_head_bytes }),
        Err(e) => Err(HandshakeError::Malformed(e.to_string())),
    }
}

fn copy_headers(headers: &[httparse::Header<'_>]) -> Vec<Header> {
    headers.iter().map(|h| Header { name: h.name.to_owned(), value: h.value.to_vec() }).collect()
}

/// A request that passed WebSocket validation: what an application needs to decide on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    pub head: Head,
    pub key: String,
    /// Offered subprotocols, in the client's order.
    pub protocols: Vec<String>,
    /// Raw `Sec-WebSocket-Extensions` offers, one entry per comma-separated offer.
    pub extensions: Vec<String>,
}

impl UpgradeRequest {
    pub fn path(&self) -> &str {
        self.head.target.split('?').next().unwrap_or("")
    }
    pub fn query(&self) -> Option<&str> {
        self.head.target.split_once('?').map(|(_, q)| q)
    }
    pub fn origin(&self) -> Option<&str> {
        self.head.header("Origin")
    }
    pub fn host(&self) -> Option<&str> {
        self.head.header("Host")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
}

/// Validates a parsed request as a WebSocket opening handshake (RFC 6455 §4.2.1).
pub fn validate_request(head: Head) -> Result<UpgradeRequest, HandshakeError> {
    if head.method != "GET" {
        return Err(HandshakeError::Method(head.method));
    }
    if head.version < 1 {
        return Err(HandshakeError::HttpVersion);
    }
    if head.header("Host").is_none_or(|h| h.trim().is_empty()) {
        return Err(HandshakeError::MissingHost);
    }
    if !head.has_token("Upgrade", "websocket") {
        return Err(HandshakeError::MissingUpgrade);
    }
    if !head.has_token("Connection", "upgrade") {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    match head.header("Sec-WebSocket-Version").map(str::trim) {
        None => return Err(HandshakeError::MissingVersion),
        Some(WEBSOCKET_VERSION) => {}
        Some(other) => return Err(HandshakeError::UnsupportedVersion(other.to_owned())),
    }
    let key = head.header("Sec-WebSocket-Key").map(str::trim).unwrap_or_default();
    if key.len() != 24 || BASE64.decode(key).map(|k| k.len()) != Ok(16) {
        return Err(HandshakeError::BadKey);
    }
    let key = key.to_owned();
    let protocols = head.header_tokens("Sec-WebSocket-Protocol").map(str::to_owned).collect();
    let extensions = head.header_tokens("Sec-WebSocket-Extensions").map(str::to_owned).collect();
    Ok(UpgradeRequest { head, key, protocols, extensions })
}

/// Picks the subprotocol: the first of the server's `supported` list (its preference order) that the
/// client offered.
pub fn negotiate_subprotocol<'a>(offered: &[String], supported: &[&'a str]) -> Option<&'a str> {
    supported.iter().copied().find(|s| offered.iter().any(|o| o == s))
}

/// Builds the 101 answer. Extra headers with CR/LF are dropped rather than sent.
pub fn accept_response(
    key: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
    out.extend_from_slice(b"Sec-WebSocket-Accept: ");
    out.extend_from_slice(accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n");
    let optional = [("Sec-WebSocket-Protocol", protocol), ("Sec-WebSocket-Extensions", extensions)];
    for (name, value) in
        optional.into_iter().filter_map(|(n, v)| v.map(|v| (n, v))).chain(extra_headers.iter().copied())
    {
        if is_safe_header(name, value.as_bytes()) {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

// ------------------------------------------------------------------------------------------------
// Client side

/// Why a client handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response head exceeds {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("server answered {status} instead of 101")]
    Status { status: u16, head: Head },
    #[error("response lacks 'Upgrade: websocket'")]
    MissingUpgrade,
    #[error("response lacks 'Connection: Upgrade'")]
    MissingConnectionUpgrade,
    #[error("Sec-WebSocket-Accept is {got:?}, expected {expected:?}")]
    BadAccept { expected: String, got: Option<String> },
    #[error("server chose subprotocol {0:?}, which was not offered")]
    UnofferedProtocol(String),
    #[error("server chose extension {0:?}, which was not offered")]
    UnofferedExtension(String),
    #[error("invalid request header {0:?}")]
    InvalidHeader(String),
}

/// What the client asks for in its opening request.
#[derive(Debug, Clone, Default)]
pub struct ClientRequest {
    /// `host` or `host:port` as it goes in the Host header.
    pub host: String,
    /// Path and query (`/chat?room=1`); empty means `/`.
    pub target: String,
    pub key: String,
    pub protocols: Vec<String>,
    /// `Sec-WebSocket-Extensions` offer, if any.
    pub extensions: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl ClientRequest {
    pub fn new(host: impl Into<String>, target: impl Into<String>) -> Self {
        Self { host: host.into(), target: target.into(), key: generate_key(), ..Self::default() }
    }

    /// The request bytes; refuses header names or values that would break the head.
    pub fn encode(&self) -> Result<Vec<u8>, ResponseError> {
        let target = if self.target.is_empty() { "/" } else { &self.target };
        if target.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(ResponseError::InvalidHeader(format!("request target {target:?}")));
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(format!("GET {target} HTTP/1.1\r\n").as_bytes());
        let mut push = |name: &str, value: &str| -> Result<(), ResponseError> {
            if !is_safe_header(name, value.as_bytes()) {
                return Err(ResponseError::InvalidHeader(name.to_owned()));
            }
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            Ok(())
        };
        push("Host", &self.host)?;
        push("Upgrade", "websocket")?;
        push("Connection", "Upgrade")?;
        push("Sec-WebSocket-Key", &self.key)?;
        push("Sec-WebSocket-Version", WEBSOCKET_VERSION)?;
        if !self.protocols.is_empty() {
            push("Sec-WebSocket-Protocol", &self.protocols.join(", "))?;
        }
        if let Some(ext) = &self.extensions {
            push("Sec-WebSocket-Extensions", ext)?;
        }
        for (name, value) in &self.headers {
            push(name, value)?;
        }
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }
}

/// What the server agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub head: Head,
    pub protocol: Option<String>,
    pub extensions: Option<String>,
}

/// Parses a response head from the front of `buf`: `Ok(None)` while incomplete.
pub fn parse_response(buf: &[u8], max_head_bytes: usize) -> Result<Option<(Head, usize)>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head_bytes => {
            let head = Head {
                status: resp.code.unwrap_or(0),
                version: resp.version.unwrap_or(0),
                headers: copy_headers(resp.headers),
                ..Head::default()
            };
            Ok(Some((head, n)))
        }
        Ok(httparse::Status::Complete(_)) => Err(ResponseError::HeadTooLarge { limit: max_head_bytes }),
        Ok(httparse::Status::Partial) if buf.len() >= max_head_bytes => {
            Err(ResponseError::HeadTooLarge { limit: max_head_bytes })
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(ResponseError::HeadTooLarge { limit: max_head_bytes }),
        Err(e) => Err(ResponseError::Malformed(e.to_string())),
    }
}

/// Checks the server's answer against what `request` asked for (RFC 6455 §4.1, steps 1-6).
pub fn verify_response(request: &ClientRequest, head: Head) -> Result<Accepted, ResponseError> {
    if head.status != 101 {
        return Err(ResponseError::Status { status: head.status, head });
    }
    if !head.has_token("Upgrade", "websocket") {
        return Err(ResponseError::MissingUpgrade);
    }
    if !head.has_token("Connection", "upgrade") {
        return Err(ResponseError::MissingConnectionUpgrade);
    }
    let expected = accept_key(&request.key);
    let got = head.header("Sec-WebSocket-Accept").map(str::trim);
    if got != Some(expected.as_str()) {
        return Err(ResponseError::BadAccept { expected, got: got.map(str::to_owned) });
    }
    let protocol = head.header("Sec-WebSocket-Protocol").map(|p| p.trim().to_owned());
    if let Some(p) = &protocol {
        if !request.protocols.iter().any(|o| o == p) {
            return Err(ResponseError::UnofferedProtocol(p.clone()));
        }
    }
    let extensions = head.header("Sec-WebSocket-Extensions").map(|e| e.trim().to_owned());
    if let Some(e) = &extensions {
        if request.extensions.is_none() {
            return Err(ResponseError::UnofferedExtension(e.clone()));
        }
    }
    Ok(Accepted { head, protocol, extensions })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn request_with(replace: &str, with: &str) -> Vec<u8> {
        String::from_utf8(SEED_REQUEST.to_vec()).unwrap().replace(replace, with).into_bytes()
    }

    fn validate(bytes: &[u8]) -> Result<UpgradeRequest, HandshakeError> {
        let (head, _) = parse_request(bytes, DEFAULT_MAX_HEAD_BYTES)?.expect("complete");
        validate_request(head)
    }

    #[test]
    fn accept_key_seed_004_example() {
        assert_eq!(accept_key("x3JJHMbDL1EzLkh9GBhXDw=="), "HSmrc0sMlYUkAGmm5OPpG2HaGWk=");
    }

    #[test]
    fn accept_key_rfc_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn seed_request_validates_and_response_matches_seed() {
        let req = validate(SEED_REQUEST).unwrap();
        assert_eq!(req.path(), "/chat");
        assert_eq!(req.host(), Some("server.example.com"));
        let resp = String::from_utf8(accept_response(&req.key, None, None, &[])).unwrap();
        assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(resp.contains("Sec-WebSocket-Accept: HSmrc0sMlYUkAGmm5OPpG2HaGWk=\r\n"));
        assert!(resp.ends_with("\r\n\r\n"));
    }

    #[test]
    fn token_lists_are_case_insensitive() {
        let req = request_with("Connection: Upgrade", "Connection: keep-alive, UPGRADE");
        assert!(validate(&req).is_ok());
        let req = request_with("Upgrade: websocket", "Upgrade: WebSocket");
        assert!(validate(&req).is_ok());
        let req = request_with("Connection: Upgrade", "Connection: keep-alive\r\nConnection: upgrade");
        assert!(validate(&req).is_ok());
    }

    #[test]
    fn refusals_carry_status_and_reason() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (request_with("GET", "POST"), 405),
            (request_with("HTTP/1.1", "HTTP/1.0"), 400),
            (request_with("Host: server.example.com\r\n", ""), 400),
            (request_with("Upgrade: websocket", "Upgrade: h2c"), 400),
            (request_with("Connection: Upgrade", "Connection: close"), 400),
            (request_with("x3JJHMbDL1EzLkh9GBhXDw==", "c2hvcnQ="), 400),
            (request_with("x3JJHMbDL1EzLkh9GBhXDw==", "!!!!!!!!!!!!!!!!!!!!!!=="), 400),
            (request_with("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"), 426),
            (request_with("Sec-WebSocket-Version: 13\r\n", ""), 400),
        ];
        for (bytes, status) in cases {
            let err = validate(&bytes).unwrap_err();
            assert_eq!(err.status(), status, "{err}");
            let resp = String::from_utf8(err.to_response()).unwrap();
            assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
            assert!(resp.contains(&err.to_string()), "reason in body: {resp}");
            if status == 426 {
                assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"));
            }
        }
    }

    #[test]
    fn oversized_head_is_431() {
        let mut big = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 9000));
        let err = parse_request(&big, DEFAULT_MAX_HEAD_BYTES).unwrap_err();
        assert_eq!(err.status(), 431);
        // A small but incomplete head is just incomplete.
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n", DEFAULT_MAX_HEAD_BYTES), Ok(None));
    }

    #[test]
    fn garbage_is_400() {
        let err = parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 8192).unwrap_err();
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn subprotocol_negotiation_uses_server_preference() {
        let req = validate(&request_with("Version: 13", "Version: 13\r\nSec-WebSocket-Protocol: chat, switchboard.v1"))
            .unwrap();
        assert_eq!(req.protocols, vec!["chat", "switchboard.v1"]);
        assert_eq!(negotiate_subprotocol(&req.protocols, &["switchboard.v1", "chat"]), Some("switchboard.v1"));
        assert_eq!(negotiate_subprotocol(&req.protocols, &["mqtt"]), None);
    }

    #[test]
    fn client_request_round_trips_through_server_validation() {
        let mut request = ClientRequest::new("localhost:9002", "/ws?room=a");
        request.protocols = vec!["switchboard.v1".into()];
        request.headers.push(("Authorization".into(), "Bearer t".into()));
        let bytes = request.encode().unwrap();
        let req = validate(&bytes).unwrap();
        assert_eq!(req.query(), Some("room=a"));
        assert_eq!(req.header("authorization"), Some("Bearer t"));
        let resp = accept_response(&req.key, Some("switchboard.v1"), None, &[]);
        let (head, n) = parse_response(&resp, DEFAULT_MAX_HEAD_BYTES).unwrap().unwrap();
        assert_eq!(n, resp.len());
        let accepted = verify_response(&request, head).unwrap();
        assert_eq!(accepted.protocol.as_deref(), Some("switchboard.v1"));
    }

    #[test]
    fn client_rejects_bad_answers() {
        let request = ClientRequest::new("h", "/");
        let check = |resp: &[u8]| {
            let (head, _) = parse_response(resp, DEFAULT_MAX_HEAD_BYTES).unwrap().unwrap();
            verify_response(&request, head)
        };
        let good_accept = accept_key(&request.key);
        assert!(matches!(check(b"HTTP/1.1 403 Forbidden\r\n\r\n"), Err(ResponseError::Status { status: 403, .. })));
        let wrong =
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n";
        assert!(matches!(check(wrong), Err(ResponseError::BadAccept { .. })));
        let unoffered = format!("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {good_accept}\r\nSec-WebSocket-Protocol: x\r\n\r\n");
        assert_eq!(check(unoffered.as_bytes()), Err(ResponseError::UnofferedProtocol("x".into())));
        let ext = format!("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {good_accept}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n");
        assert!(matches!(check(ext.as_bytes()), Err(ResponseError::UnofferedExtension(_))));
    }

    #[test]
    fn header_injection_is_refused() {
        let mut request = ClientRequest::new("h", "/");
        request.headers.push(("X".into(), "a\r\nEvil: 1".into()));
        assert!(matches!(request.encode(), Err(ResponseError::InvalidHeader(_))));
        let resp = String::from_utf8(accept_response("k", None, None, &[("X", "a\r\nEvil: 1")])).unwrap();
        assert!(!resp.contains("Evil"));
    }
}
