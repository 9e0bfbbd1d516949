//! The opening handshake (RFC 6455 §4): the server reads the client's request and answers it, the
//! client builds its request and verifies the answer.
//!
//! The server side has two steps, so that an HTTP/2 extended CONNECT (RFC 8441) can share the second:
//!
//! 1. Reading the request, which depends on the HTTP version. For HTTP/1.1, [`parse_request`] and
//!    [`validate_request`] check the `GET` with `Upgrade: websocket` and give an [`UpgradeRequest`]. An
//!    HTTP/2 request arrives parsed by the HTTP/2 layer, which checks `:method = CONNECT` and
//!    `:protocol = websocket` itself. Either way the WebSocket part of the request is an [`Offer`]:
//!    version, key (HTTP/1.1 only), subprotocols, extensions.
//! 2. Negotiation, which does not: [`negotiate`] checks the offer against this engine and the server's
//!    [`ServerSettings`] and gives what was agreed ([`Negotiated`]: subprotocol, permessage-deflate
//!    parameters, the response headers that state them). [`Negotiated::http1_response`] (`101`) and
//!    [`Negotiated::http2_response`] (`200`) wrap it into a [`HandshakeResponse`], the one response
//!    model: [`HandshakeResponse::to_http1`] writes it as HTTP/1.1 bytes, and a library on top of an
//!    HTTP stack converts it into that stack's response type. Refusals ([`HandshakeError::response`])
//!    use the same model.
//!
//! Everything works on byte buffers the caller fills, so any transport (a socket, hyper's upgrade, a
//! test vector) can drive it. Header size is bounded: a peer cannot make us buffer an endless request.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::deflate::{self, DeflateConfig, DeflateParams};

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
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// The field name as received (compare it case-insensitively).
    pub name: String,
    /// The field value, untrimmed.
    pub value: Vec<u8>,
}

/// `name: "value"`, the value as text (bytes that are not UTF-8 escaped), as a log line wants it
/// rather than a list of numbers.
impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: \"{}\"", self.name, self.value.escape_ascii())
    }
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
    /// The header lines in the order received.
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

/// Why the server refuses a handshake. [`status`](Self::status) and [`response`](Self::response) give
/// the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request head is larger than the configured bound (431).
    #[error("request head exceeds {limit} bytes")]
    HeadTooLarge {
        /// The bound, in bytes.
        limit: usize,
    },
    /// The bytes are not an HTTP request (400).
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// The method is not `GET` (405, with `Allow: GET`).
    #[error("method {0} not allowed; a WebSocket handshake is a GET")]
    Method(String),
    /// HTTP/1.0 or older (400).
    #[error("HTTP/1.1 or later is required")]
    HttpVersion,
    /// No `Host` header, or an empty one (400).
    #[error("missing Host header")]
    MissingHost,
    /// `Upgrade` does not list `websocket` (400).
    #[error("missing 'Upgrade: websocket'")]
    MissingUpgrade,
    /// `Connection` does not list `upgrade` (400).
    #[error("missing 'Connection: Upgrade'")]
    MissingConnectionUpgrade,
    /// An HTTP/1.1 request without a key, or any key that is not 16 bytes in base64 (400).
    #[error("missing, repeated or invalid Sec-WebSocket-Key (one, of 16 bytes in base64)")]
    BadKey,
    /// No `Sec-WebSocket-Version` (400, with `Sec-WebSocket-Version: 13`).
    #[error("missing Sec-WebSocket-Version")]
    MissingVersion,
    /// A version other than 13 (426, with `Sec-WebSocket-Version: 13`).
    #[error("unsupported Sec-WebSocket-Version {0:?}; this server speaks 13")]
    UnsupportedVersion(String),
    /// Refused by the application (origin, authentication, path...).
    #[error("{reason}")]
    Rejected {
        /// The HTTP status to answer with: an error status (400 to 599); any other is answered as
        /// 500, since a refusal that said 101 or 200 would tell the client it was accepted.
        status: u16,
        /// Why, for the response body.
        reason: String,
        /// Headers of the refusal (`WWW-Authenticate`, `Retry-After`...), added with
        /// [`HandshakeError::with_header`]; any that could split the response are dropped.
        headers: Vec<(String, String)>,
    },
}

impl HandshakeError {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge { .. } => 431,
            Self::Method(_) => 405,
            Self::UnsupportedVersion(_) => 426,
            Self::Rejected { status, .. } if (400..=599).contains(status) => *status,
            Self::Rejected { .. } => 500,
            _ => 400,
        }
    }

    /// An application's refusal: `status` (an error status, see [`HandshakeError::Rejected`]) and
    /// the reason for the body, with no headers yet ([`HandshakeError::with_header`] adds them).
    pub fn rejected(status: u16, reason: impl Into<String>) -> Self {
        Self::Rejected { status, reason: reason.into(), headers: Vec::new() }
    }

    /// An application's refusal ([`HandshakeError::Rejected`]) with a header more; other errors are
    /// returned as they are.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        if let Self::Rejected { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    /// The refusal as a response: its status, the reason as a plain-text body, and the headers the
    /// RFCs ask for (`Sec-WebSocket-Version: 13` on version errors, `Allow: GET` on a wrong method)
    /// or the application added.
    pub fn response(&self) -> HandshakeResponse {
        let mut response = HandshakeResponse::new(self.status());
        response.push_header("Content-Type", "text/plain; charset=utf-8");
        match self {
            Self::UnsupportedVersion(_) | Self::MissingVersion => {
                response.push_header("Sec-WebSocket-Version", WEBSOCKET_VERSION);
            }
            Self::Method(_) => {
                response.push_header("Allow", "GET");
            }
            Self::Rejected { headers, .. } => {
                for (name, value) in headers {
                    response.push_header(name.as_str(), value.as_str());
                }
            }
            _ => {}
        }
        if response.status == 426 {
            // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to.
            response.push_header("Upgrade", "websocket");
        }
        response.body = format!("{self}\n");
        response
    }

    /// The complete HTTP/1.1 response that refuses the handshake, for a connection that is closed
    /// afterwards (`Connection: close`).
    pub fn to_response(&self) -> Vec<u8> {
        let mut response = self.response();
        // RFC 9110 §7.8: a message that carries `Upgrade` lists it in `Connection` too.
        let connection = if response.status == 426 { "upgrade, close" } else { "close" };
        response.push_header("Connection", connection);
        response.to_http1()
    }
}

/// An HTTP/1.1 error response with a plain-text body, for a connection that is closed afterwards.
/// Extra headers that could split the response are dropped.
pub fn error_response(status: u16, body: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut response = HandshakeResponse::new(status);
    response.push_header("Content-Type", "text/plain; charset=utf-8");
    response.push_header("Connection", "close");
    for (name, value) in extra_headers {
        response.push_header(*name, *value);
    }
    response.body = format!("{body}\n");
    response.to_http1()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
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

/// A field name must be an RFC 9110 token: no separators, spaces or controls.
fn is_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A field value may hold visible characters, spaces, tabs and obs-text, but no other control
/// characters: in particular no CR, LF or NUL (response splitting).
fn is_field_value(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

fn is_safe_header(name: &str, value: &[u8]) -> bool {
    is_token(name) && is_field_value(value)
}

/// A server's answer to an opening request, before it goes on the wire: status, headers and body.
///
/// Every handshake answer is built as one of these (the `101`, the HTTP/2 `200`, refusals), so the
/// headers are decided in one place whatever writes them. Headers are checked as they are added, so
/// what it holds is always valid HTTP and converts to any HTTP library's response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// The HTTP status code.
    pub status: u16,
    headers: Vec<(String, String)>,
    /// The body (a refusal's reason); empty for `101` and `200`.
    pub body: String,
}

impl HandshakeResponse {
    /// A response with this status, no headers and no body.
    pub fn new(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: String::new() }
    }

    /// Appends a header. One whose name is not an HTTP token or whose value holds a control
    /// character (CR, LF, NUL...) is dropped and `false` returned, so caller-supplied headers cannot
    /// split the response.
    pub fn push_header(&mut self, name: impl Into<String>, value: impl Into<String>) -> bool {
        let (name, value) = (name.into(), value.into());
        let safe = is_safe_header(&name, value.as_bytes());
        if safe {
            self.headers.push((name, value));
        }
        safe
    }

    /// The headers, in order, as `(name, value)`.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The response in HTTP/1.1 form: status line, headers, then, unless the status is `1xx`, a
    /// `Content-Length` and the body.
    pub fn to_http1(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.body.len());
        out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", self.status, reason_phrase(self.status)).as_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let informational = (100..200).contains(&self.status);
        if !informational {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if !informational {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
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

/// The WebSocket part of an opening request, whichever HTTP version carried it: what [`negotiate`]
/// decides on.
///
/// HTTP/1.1 gets it from [`validate_request`]. For an HTTP/2 extended CONNECT (RFC 8441 §5) the
/// HTTP/2 layer fills it from the request's `sec-websocket-*` fields and leaves `key` at `None`: that
/// protocol has no `Sec-WebSocket-Key` and no `Sec-WebSocket-Accept`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Offer {
    /// `Sec-WebSocket-Version`, trimmed; `None` when absent (refused: it is required in both HTTP
    /// versions).
    pub version: Option<String>,
    /// `Sec-WebSocket-Key`, trimmed. Required over HTTP/1.1; `None` over HTTP/2.
    pub key: Option<String>,
    /// Offered subprotocols, in the client's order.
    pub protocols: Vec<String>,
    /// Raw `Sec-WebSocket-Extensions` offers, one entry per comma-separated offer.
    pub extensions: Vec<String>,
}

impl Offer {
    /// Reads the offer from a request's `Sec-WebSocket-*` header lines (any number of lines each, for
    /// the list-valued ones). An HTTP/2 caller sets `key` back to `None` if the client sent one anyway.
    pub fn from_head(head: &Head) -> Self {
        Self {
            version: head.header("Sec-WebSocket-Version").map(|v| v.trim().to_owned()),
            // RFC 6455 §11.3.1: it must not appear more than once. Two are taken as a bad key.
            key: match head.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Key")).count() {
                0 | 1 => head.header("Sec-WebSocket-Key").map(|k| k.trim().to_owned()),
                _ => Some(String::new()),
            },
            protocols: head.header_tokens("Sec-WebSocket-Protocol").map(str::to_owned).collect(),
            extensions: head.header_tokens("Sec-WebSocket-Extensions").map(str::to_owned).collect(),
        }
    }

    /// Checks what holds whatever the HTTP version: the version is 13, and a key, when there is one,
    /// is 16 bytes in base64.
    pub fn validate(&self) -> Result<(), HandshakeError> {
        match self.version.as_deref().map(str::trim) {
            None => return Err(HandshakeError::MissingVersion),
            Some(WEBSOCKET_VERSION) => {}
            Some(other) => return Err(HandshakeError::UnsupportedVersion(other.to_owned())),
        }
        match &self.key {
            Some(key) if !is_valid_key(key) => Err(HandshakeError::BadKey),
            _ => Ok(()),
        }
    }
}

fn is_valid_key(key: &str) -> bool {
    key.len() == 24 && BASE64.decode(key).map(|k| k.len()) == Ok(16)
}

/// What the server agrees to, for [`negotiate`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerSettings<'a> {
    /// Supported subprotocols in the server's order of preference; the first one the client offered
    /// is chosen. Empty: no subprotocol.
    pub protocols: &'a [&'a str],
    /// permessage-deflate settings; `None` declines every compression offer.
    pub compression: Option<&'a DeflateConfig>,
}

/// The outcome of [`negotiate`]: what both sides will speak, and the response headers that say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The chosen subprotocol, if any.
    pub protocol: Option<String>,
    /// The agreed permessage-deflate parameters, if the connection is compressed; pass them to
    /// [`crate::Connection::enable_deflate`].
    pub deflate: Option<DeflateParams>,
    /// Headers to add to the answer, as `(name, value)`: `Sec-WebSocket-Accept` (only when the offer
    /// had a key), `Sec-WebSocket-Protocol` and `Sec-WebSocket-Extensions` (only when agreed).
    pub headers: Vec<(String, String)>,
}

impl Negotiated {
    /// The HTTP/1.1 answer: `101 Switching Protocols` with `Upgrade: websocket`,
    /// `Connection: Upgrade` and the negotiated headers. The offer must have had a key.
    pub fn http1_response(&self) -> HandshakeResponse {
        let mut response = HandshakeResponse::new(101);
        response.push_header("Upgrade", "websocket");
        response.push_header("Connection", "Upgrade");
        self.add_headers(&mut response);
        response
    }

    /// The answer to an HTTP/2 extended CONNECT (RFC 8441 §5): `200` with the negotiated headers and
    /// nothing HTTP/1.1-specific (no `Upgrade`, `Connection` or `Sec-WebSocket-Accept`).
    pub fn http2_response(&self) -> HandshakeResponse {
        let mut response = HandshakeResponse::new(200);
        self.add_headers(&mut response);
        response
    }

    fn add_headers(&self, response: &mut HandshakeResponse) {
        for (name, value) in &self.headers {
            response.push_header(name.as_str(), value.as_str());
        }
    }
}

/// Negotiates an [`Offer`] against the server's settings: checks it ([`Offer::validate`]), picks the subprotocol (server preference) and the permessage-deflate
/// parameters (the first offer that can be honoured), and computes `Sec-WebSocket-Accept` when there is
/// a key. Needs nothing of HTTP/1.1 (no key, no `Upgrade`/`Connection`), so an HTTP/2 extended CONNECT
/// uses it as is.
pub fn negotiate(offer: &Offer, settings: &ServerSettings<'_>) -> Result<Negotiated, HandshakeError> {
    offer.validate()?;
    let protocol = negotiate_subprotocol(&offer.protocols, settings.protocols).map(str::to_owned);
    let mut headers = Vec::with_capacity(3);
    if let Some(key) = &offer.key {
        headers.push(("Sec-WebSocket-Accept".to_owned(), accept_key(key)));
    }
    if let Some(protocol) = &protocol {
        headers.push(("Sec-WebSocket-Protocol".to_owned(), protocol.clone()));
    }
    let deflate = settings.compression.and_then(|config| deflate::negotiate_server(&offer.extensions, config)).map(
        |(params, value)| {
            headers.push(("Sec-WebSocket-Extensions".to_owned(), value));
            params
        },
    );
    Ok(Negotiated { protocol, deflate, headers })
}

/// A request that passed WebSocket validation: what an application needs to decide on it. From
/// [`validate_request`] for HTTP/1.1; an HTTP/2 layer builds one from an extended CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The whole request head.
    pub head: Head,
    /// Its WebSocket part, already validated; `offer.key` is present over HTTP/1.1, absent over
    /// HTTP/2.
    pub offer: Offer,
}

impl UpgradeRequest {
    /// The request path, without the query.
    pub fn path(&self) -> &str {
        self.head.target.split('?').next().unwrap_or("")
    }

    /// The query string (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.head.target.split_once('?').map(|(_, q)| q)
    }

    /// The `Origin` header (browsers send it; check it against cross-site WebSocket hijacking).
    pub fn origin(&self) -> Option<&str> {
        self.head.header("Origin")
    }

    /// The `Host` header.
    pub fn host(&self) -> Option<&str> {
        self.head.header("Host")
    }

    /// The first value of any header, if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// The offered subprotocols, in the client's order.
    pub fn protocols(&self) -> &[String] {
        &self.offer.protocols
    }
}

/// Validates a parsed HTTP/1.1 request as a WebSocket opening handshake (RFC 6455 §4.2.1): the
/// HTTP/1.1 rules here (`GET`, `Host`, `Upgrade`, `Connection`, a key), then [`Offer::validate`].
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
    let offer = Offer::from_head(&head);
    offer.validate()?;
    if offer.key.is_none() {
        return Err(HandshakeError::BadKey);
    }
    Ok(UpgradeRequest { head, offer })
}

/// Picks the subprotocol: the first of the server's `supported` list (its preference order) that the
/// client offered.
pub fn negotiate_subprotocol<'a>(offered: &[String], supported: &[&'a str]) -> Option<&'a str> {
    supported.iter().copied().find(|s| offered.iter().any(|o| o == s))
}

// ------------------------------------------------------------------------------------------------
// Client side

/// Why a client handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The response head is larger than the configured bound.
    #[error("response head exceeds {limit} bytes")]
    HeadTooLarge {
        /// The bound, in bytes.
        limit: usize,
    },
    /// The bytes are not an HTTP response.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    /// The server answered something other than 101 (a refusal, a redirect...).
    #[error("server answered {status} instead of accepting the WebSocket (101, or 200 over HTTP/2)")]
    Status {
        /// The status code.
        status: u16,
        /// The whole response head, for its headers.
        head: Head,
    },
    /// The 101 does not say `Upgrade: websocket`.
    #[error("response lacks 'Upgrade: websocket'")]
    MissingUpgrade,
    /// The 101 does not say `Connection: Upgrade`.
    #[error("response lacks 'Connection: Upgrade'")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Accept` does not match the key sent.
    #[error("Sec-WebSocket-Accept is {got:?}, expected {expected:?}")]
    BadAccept {
        /// The value the key calls for.
        expected: String,
        /// The value received, if any.
        got: Option<String>,
    },
    /// The server chose a subprotocol the client did not offer.
    #[error("server chose subprotocol {0:?}, which was not offered")]
    UnofferedProtocol(String),
    /// The server answered with an extension the client did not offer.
    #[error("server chose extension {0:?}, which was not offered")]
    UnofferedExtension(String),
    /// A header or request target the client was asked to send would break the request head.
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
    /// `Sec-WebSocket-Key`; [`ClientRequest::new`] draws a fresh random one.
    pub key: String,
    /// Subprotocols to offer, in preference order.
    pub protocols: Vec<String>,
    /// `Sec-WebSocket-Extensions` offer, if any.
    pub extensions: Option<String>,
    /// More headers to send (Authorization, Origin, Cookie...).
    pub headers: Vec<(String, String)>,
}

impl ClientRequest {
    /// A request for `target` on `host`, with a fresh key and nothing else offered.
    pub fn new(host: impl Into<String>, target: impl Into<String>) -> Self {
        Self { host: host.into(), target: target.into(), key: generate_key(), ..Self::default() }
    }

    /// The fields of the same request as an HTTP/2 extended CONNECT (RFC 8441 §5), beside the
    /// pseudo-headers the HTTP/2 layer writes (`:method = CONNECT`, `:protocol = websocket`,
    /// `:authority`, `:path`): the version, the offers and the extra headers; no key, no `Host`,
    /// `Upgrade` or `Connection`. Names are lower case, as HTTP/2 requires.
    pub fn http2_fields(&self) -> Result<Vec<(String, String)>, ResponseError> {
        let mut fields = vec![("sec-websocket-version".to_owned(), WEBSOCKET_VERSION.to_owned())];
        if !self.protocols.is_empty() {
            fields.push(("sec-websocket-protocol".to_owned(), self.protocols.join(", ")));
        }
        if let Some(extensions) = &self.extensions {
            fields.push(("sec-websocket-extensions".to_owned(), extensions.clone()));
        }
        for (name, value) in &self.headers {
            if !is_safe_header(name, value.as_bytes()) {
                return Err(ResponseError::InvalidHeader(name.clone()));
            }
            let name = name.to_ascii_lowercase();
            // Connection-specific fields are malformed in HTTP/2 (RFC 9113 §8.2.2).
            if !matches!(name.as_str(), "host" | "connection" | "upgrade" | "keep-alive" | "transfer-encoding") {
                fields.push((name, value.clone()));
            }
        }
        Ok(fields)
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
    /// The whole response head.
    pub head: Head,
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
    /// The server's `Sec-WebSocket-Extensions` answer, if any, for the extension to check.
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
    agreed(request, head)
}

/// Verifies the answer to an HTTP/2 extended CONNECT (RFC 8441 §5): `200`, and a subprotocol and
/// extensions only if they were offered. `head` holds the response's fields (`status` set, no
/// `version`); there is no `Sec-WebSocket-Accept` to check in this protocol.
pub fn verify_http2_response(request: &ClientRequest, head: Head) -> Result<Accepted, ResponseError> {
    if head.status != 200 {
        return Err(ResponseError::Status { status: head.status, head });
    }
    agreed(request, head)
}

/// What the server agreed to, checked against what was offered (both HTTP versions).
fn agreed(request: &ClientRequest, head: Head) -> Result<Accepted, ResponseError> {
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

    #[test]
    fn a_header_debugs_as_a_line_of_text() {
        let header = Header { name: "X-Note".into(), value: b"caf\xc3\xa9 \"ok\"".to_vec() };
        assert_eq!(format!("{header:?}"), r#"X-Note: "caf\xc3\xa9 \"ok\"""#);
    }

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
        let negotiated = negotiate(&req.offer, &ServerSettings::default()).unwrap();
        let resp = String::from_utf8(negotiated.http1_response().to_http1()).unwrap();
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
    fn an_application_refusal_carries_its_headers_and_none_that_would_split_the_response() {
        let refusal = HandshakeError::rejected(401, "no token")
            .with_header("WWW-Authenticate", "Bearer realm=\"chat\"")
            .with_header("X-Evil", "a\r\nSet-Cookie: x=1");
        let response = String::from_utf8(refusal.to_response()).unwrap();
        assert!(response.starts_with("HTTP/1.1 401 "), "{response}");
        assert!(response.contains("WWW-Authenticate: Bearer realm=\"chat\"\r\n"), "{response}");
        assert!(!response.contains("Set-Cookie"), "{response}");
        let other = HandshakeError::MissingVersion.with_header("Retry-After", "1");
        assert!(!String::from_utf8(other.to_response()).unwrap().contains("Retry-After"));
    }

    #[test]
    fn an_application_refusal_is_an_error_status_whatever_it_asked_for() {
        for (asked, answered) in [(403, 403), (599, 599), (101, 500), (200, 500), (1000, 500), (0, 500)] {
            let refusal = HandshakeError::rejected(asked, "no");
            assert_eq!(refusal.status(), answered, "{asked}");
            let response = String::from_utf8(refusal.to_response()).unwrap();
            assert!(response.starts_with(&format!("HTTP/1.1 {answered} ")), "{response}");
        }
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
            (request_with("Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n", ""), 400),
            // RFC 6455 §11.3.1: the key may not appear twice, not even twice the same.
            (
                request_with(
                    "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n",
                    "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n",
                ),
                400,
            ),
        ];
        for (bytes, status) in cases {
            let err = validate(&bytes).unwrap_err();
            assert_eq!(err.status(), status, "{err}");
            let resp = String::from_utf8(err.to_response()).unwrap();
            assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
            assert!(resp.contains(&err.to_string()), "reason in body: {resp}");
            if status == 426 {
                assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"));
                assert!(resp.contains("Upgrade: websocket\r\n"), "a 426 names what to upgrade to: {resp}");
                assert!(resp.contains("Connection: upgrade, close\r\n"), "and lists it in Connection: {resp}");
            } else {
                assert!(resp.contains("Connection: close\r\n"), "{resp}");
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
        assert_eq!(req.offer.protocols, vec!["chat", "switchboard.v1"]);
        assert_eq!(negotiate_subprotocol(&req.offer.protocols, &["switchboard.v1", "chat"]), Some("switchboard.v1"));
        assert_eq!(negotiate_subprotocol(&req.offer.protocols, &["mqtt"]), None);
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
        let settings = ServerSettings { protocols: &["switchboard.v1"], compression: None };
        let resp = negotiate(&req.offer, &settings).unwrap().http1_response().to_http1();
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
        let mut response = HandshakeResponse::new(101);
        assert!(!response.push_header("X", "a\r\nEvil: 1"));
        assert!(!response.push_header("X\r\nEvil", "1"));
        assert!(!response.push_header("Bad Name", "1"));
        assert!(!response.push_header("X", "nul\0"));
        assert!(response.push_header("X-Fine", "tab\tand obs-text é"));
        let resp = String::from_utf8(response.to_http1()).unwrap();
        assert!(!resp.contains("Evil"), "{resp}");
        assert_eq!(resp, "HTTP/1.1 101 Switching Protocols\r\nX-Fine: tab\tand obs-text é\r\n\r\n");
    }
    /// The offer of an HTTP/2 extended CONNECT (RFC 8441 §5.1's example, plus compression): no key.
    fn h2_offer() -> Offer {
        Offer {
            version: Some("13".into()),
            key: None,
            protocols: vec!["chat".into(), "superchat".into()],
            extensions: vec!["permessage-deflate; client_max_window_bits".into()],
        }
    }

    #[test]
    fn negotiation_without_a_key_serves_http2() {
        let compression = DeflateConfig { server_max_window_bits: 12, ..DeflateConfig::default() };
        let settings = ServerSettings { protocols: &["superchat", "chat"], compression: Some(&compression) };
        let negotiated = negotiate(&h2_offer(), &settings).unwrap();
        assert_eq!(negotiated.protocol.as_deref(), Some("superchat"));
        let params = negotiated.deflate.expect("the deflate offer is accepted");
        assert_eq!((params.server_max_window_bits, params.client_max_window_bits), (12, 15));
        assert_eq!(
            negotiated.headers,
            vec![
                ("Sec-WebSocket-Protocol".to_owned(), "superchat".to_owned()),
                ("Sec-WebSocket-Extensions".to_owned(), "permessage-deflate; server_max_window_bits=12".to_owned()),
            ]
        );
        let response = negotiated.http2_response();
        assert_eq!(response.status, 200);
        for absent in ["Sec-WebSocket-Accept", "Upgrade", "Connection", "Content-Length"] {
            assert_eq!(response.header(absent), None, "{absent}");
        }
        assert_eq!(response.header("sec-websocket-protocol"), Some("superchat"));
        assert!(response.body.is_empty());
    }

    #[test]
    fn an_http2_client_sends_no_key_and_accepts_only_a_200_with_what_it_offered() {
        let mut request = ClientRequest::new("h", "/chat");
        request.protocols = vec!["chat".into(), "superchat".into()];
        request.extensions = Some("permessage-deflate".into());
        request.headers = vec![("Origin".into(), "https://h".into()), ("Host".into(), "h".into())];
        let fields = request.http2_fields().unwrap();
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions", "origin"]);
        assert_eq!(fields[1].1, "chat, superchat");

        let head = |status: u16, headers: &[(&str, &str)]| Head {
            status,
            headers: headers.iter().map(|(n, v)| Header { name: (*n).into(), value: v.as_bytes().to_vec() }).collect(),
            ..Head::default()
        };
        let accepted = verify_http2_response(&request, head(200, &[("sec-websocket-protocol", "superchat")])).unwrap();
        assert_eq!(accepted.protocol.as_deref(), Some("superchat"));
        assert!(matches!(
            verify_http2_response(&request, head(101, &[])),
            Err(ResponseError::Status { status: 101, .. })
        ));
        assert!(matches!(
            verify_http2_response(&request, head(200, &[("sec-websocket-protocol", "other")])),
            Err(ResponseError::UnofferedProtocol(_))
        ));
        request.extensions = None;
        assert!(matches!(
            verify_http2_response(&request, head(200, &[("sec-websocket-extensions", "permessage-deflate")])),
            Err(ResponseError::UnofferedExtension(_))
        ));
        request.headers = vec![("X-Bad".into(), "a\r\nb".into())];
        assert!(request.http2_fields().is_err(), "a field that would break the request is refused");
    }

    #[test]
    fn negotiation_with_a_key_answers_http1_and_the_client_accepts_it() {
        let mut request = ClientRequest::new("h", "/");
        request.protocols = vec!["chat".into()];
        request.extensions = Some(crate::deflate::client_offer(&DeflateConfig::default()));
        let offer = Offer { key: Some(request.key.clone()), ..h2_offer() };
        let compression = DeflateConfig::default();
        let settings = ServerSettings { protocols: &["chat"], compression: Some(&compression) };
        let negotiated = negotiate(&offer, &settings).unwrap();
        let response = negotiated.http1_response();
        assert_eq!(response.status, 101);
        assert_eq!(response.header("Sec-WebSocket-Accept"), Some(accept_key(&request.key).as_str()));
        let bytes = response.to_http1();
        let (head, used) = parse_response(&bytes, DEFAULT_MAX_HEAD_BYTES).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "a 101 has no body and no Content-Length");
        let accepted = verify_response(&request, head).unwrap();
        assert_eq!(accepted.protocol.as_deref(), Some("chat"));
        let extensions = accepted.extensions.expect("deflate agreed");
        assert_eq!(
            crate::deflate::accept_response(&extensions, &DeflateConfig::default()),
            Ok(negotiated.deflate.unwrap())
        );
    }

    #[test]
    fn negotiation_declines_what_the_server_does_not_support() {
        let settings = ServerSettings { protocols: &["mqtt"], compression: None };
        let negotiated = negotiate(&h2_offer(), &settings).unwrap();
        assert_eq!((negotiated.protocol, negotiated.deflate), (None, None));
        assert!(negotiated.headers.is_empty(), "{:?}", negotiated.headers);
        // A deflate offer that cannot be parsed is declined, not fatal.
        let offer = Offer { extensions: vec!["permessage-deflate; bogus".into()], ..h2_offer() };
        let compression = DeflateConfig::default();
        let settings = ServerSettings { protocols: &[], compression: Some(&compression) };
        assert_eq!(negotiate(&offer, &settings).unwrap().deflate, None);
    }

    #[test]
    fn negotiation_checks_version_and_key_whatever_the_http_version() {
        let settings = ServerSettings::default();
        let missing = Offer { version: None, ..h2_offer() };
        assert_eq!(negotiate(&missing, &settings), Err(HandshakeError::MissingVersion));
        let old = Offer { version: Some("8".into()), ..h2_offer() };
        let error = negotiate(&old, &settings).unwrap_err();
        assert_eq!(error, HandshakeError::UnsupportedVersion("8".into()));
        assert_eq!(error.status(), 426);
        assert_eq!(error.response().header("Sec-WebSocket-Version"), Some("13"));
        let bad_key = Offer { key: Some("c2hvcnQ=".into()), ..h2_offer() };
        assert_eq!(negotiate(&bad_key, &settings), Err(HandshakeError::BadKey));
    }

    #[test]
    fn http1_parsing_feeds_the_same_negotiation() {
        let bytes = request_with(
            "Version: 13",
            "Version: 13\r\nSec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: superchat\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        );
        let request = validate(&bytes).unwrap();
        assert_eq!(request.offer, Offer { key: Some("x3JJHMbDL1EzLkh9GBhXDw==".into()), ..h2_offer() });
        assert_eq!(request.protocols(), ["chat", "superchat"]);
    }

    #[test]
    fn refusal_response_model_matches_its_http1_bytes() {
        let error = HandshakeError::Method("POST".into());
        let response = error.response();
        assert_eq!((response.status, response.header("Allow")), (405, Some("GET")));
        let bytes = String::from_utf8(error.to_response()).unwrap();
        let body = format!("{error}\n");
        assert!(bytes.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{bytes}");
        assert!(bytes.contains("\r\nConnection: close\r\n"), "{bytes}");
        assert!(bytes.ends_with(&format!("Content-Length: {}\r\n\r\n{body}", body.len())), "{bytes}");
    }
}
