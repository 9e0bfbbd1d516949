//! Who may connect and what they may do: JWT verification (HS256 with a shared secret, RS256 or
//! ES256 with a public key), the permissions a token's claims grant, the origin allow-list, and the
//! API key of the HTTP publish endpoint.
//!
//! A token's claims:
//!
//! ```json
//! {"sub": "alice", "exp": 1764000000, "name": "Alice", "rooms": ["lobby", "team-*"],
//!  "join": ["announcements"], "publish": ["inbox-*"]}
//! ```
//!
//! `sub` and `exp` are required. `rooms` grants joining (reading) and publishing, `join` only
//! joining, `publish` only publishing. A pattern is a room name, or a prefix followed by `*`; `*`
//! alone is every room. A token with none of the three lists may use every room.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the public key {path}: {source}")]
    ReadKey { path: String, source: std::io::Error },
    #[error("{path} holds neither an RSA nor an EC (P-256) public key in PEM")]
    BadKey { path: String },
    /// A key to sign with that cannot sign (`switchboard token --private-key`).
    #[error("{0}")]
    BadSigningKey(String),
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("a refreshed token must be for the same subject ({expected:?}, not {got:?})")]
    OtherSubject { expected: String, got: String },
    /// A valid token that does not grant what the connection needs (a seed client's default room).
    #[error("{0}")]
    NotGranted(String),
    /// A valid token whose user has as many sessions here as one user may have.
    #[error("{0}")]
    TooManySessions(String),
}

/// The claims Switchboard reads (and `switchboard token` writes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
}

/// A connection's identity and permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `None` for an anonymous connection.
    pub subject: Option<String>,
    /// Display name: the token's `name`, else its `sub`.
    pub name: Option<String>,
    pub expires_at: Option<SystemTime>,
    join: Option<Vec<String>>,
    publish: Option<Vec<String>>,
}

impl Identity {
    /// No token: every room, any display name the client chooses.
    pub fn anonymous() -> Self {
        Self { subject: None, name: None, expires_at: None, join: None, publish: None }
    }

    fn from_claims(claims: Claims) -> Result<Self, AuthError> {
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .ok_or_else(|| AuthError::Invalid("exp is out of range".into()))?;
        let restricted = claims.rooms.is_some() || claims.join.is_some() || claims.publish.is_some();
        let both = claims.rooms.unwrap_or_default();
        let (join, publish) = if restricted {
            let join = both.iter().cloned().chain(claims.join.unwrap_or_default()).collect();
            let publish = both.into_iter().chain(claims.publish.unwrap_or_default()).collect();
            (Some(join), Some(publish))
        } else {
            (None, None)
        };
        Ok(Self {
            name: Some(claims.name.unwrap_or_else(|| claims.sub.clone())),
            subject: Some(claims.sub),
            expires_at: Some(expires_at),
            join,
            publish,
        })
    }

    pub fn may_join(&self, room: &str) -> bool {
        allowed(self.join.as_deref(), room)
    }

    pub fn may_publish(&self, room: &str) -> bool {
        allowed(self.publish.as_deref(), room)
    }
}

fn allowed(patterns: Option<&[String]>, room: &str) -> bool {
    patterns.is_none_or(|patterns| patterns.iter().any(|p| pattern_matches(p, room)))
}

/// Checks a token's room grant: a room, a prefix of rooms ending in `*`, or `*`; anything else could
/// never match a room.
pub fn check_grant(pattern: &str) -> Result<(), String> {
    let prefix = pattern.strip_suffix('*').unwrap_or(pattern);
    if prefix.is_empty() {
        return Ok(());
    }
    super::message::check_room(prefix).map_err(|(_, reason)| format!("{reason}, optionally ending in *"))
}

fn pattern_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// Checks tokens against one key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn hs256(secret: &[u8]) -> Self {
        Self::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// Also requires the `aud` claim to hold `audience` and `iss` to be `issuer`, when given. Without
    /// an audience, `aud` is not checked (a token that has one is accepted).
    pub fn expecting(mut self, audience: Option<&str>, issuer: Option<&str>) -> Self {
        match audience {
            Some(audience) => {
                // `set_audience` alone leaves `validate_aud` as `new` set it (off): then any `aud`
                // passed, a token minted for another service on the same key among them.
                self.validation.validate_aud = true;
                self.validation.set_audience(&[audience]);
                self.validation.required_spec_claims.insert("aud".into());
            }
            None => self.validation.validate_aud = false,
        }
        if let Some(issuer) = issuer {
            self.validation.set_issuer(&[issuer]);
            self.validation.required_spec_claims.insert("iss".into());
        }
        self
    }

    /// RS256 for an RSA public key, ES256 for a P-256 one (PEM, as `openssl pkey -pubout` writes).
    pub fn from_public_key_file(path: &Path) -> Result<Self, AuthError> {
        let display = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| AuthError::ReadKey { path: display.clone(), source })?;
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Self::new(key, Algorithm::RS256));
        }
        match DecodingKey::from_ec_pem(&pem) {
            Ok(key) => Ok(Self::new(key, Algorithm::ES256)),
            Err(_) => Err(AuthError::BadKey { path: display }),
        }
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A token is valid up to its `exp`, to the second: the session ends then, too.
        validation.leeway = 0;
        validation.validate_aud = false;
        Self { key, validation }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => Identity::from_claims(data.claims),
            Err(error) if matches!(error.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                Err(AuthError::Expired)
            }
            Err(error) => Err(AuthError::Invalid(error.to_string())),
        }
    }
}

/// Access control of `switchboard serve`.
#[derive(Debug)]
pub struct Access {
    pub verifier: Option<Verifier>,
    /// Connections without a token are accepted (as [`Identity::anonymous`]).
    pub allow_anonymous: bool,
    pub origins: OriginPolicy,
    /// Key of `POST /api/publish`; the endpoint is off without one.
    pub api_key: Option<String>,
}

/// What an anonymous client's name carries on a server that signs users in (see
/// [`Access::guest_name`]).
pub const GUEST_SUFFIX: &str = " (guest)";

impl Access {
    /// The name `identity` is shown under, given the one chosen for it (its token's, else what the
    /// client asked for). Names of signed-in users are theirs: on a server with a token key, an
    /// anonymous client's name always ends in [`GUEST_SUFFIX`], so a guest asking for a signed-in
    /// user's name gets that name marked as a guest's, never the name itself. Without a token key
    /// everyone is anonymous and names are as asked.
    pub fn guest_name(&self, identity: &Identity, name: String) -> String {
        if self.verifier.is_none() || identity.subject.is_some() || name.ends_with(GUEST_SUFFIX) {
            return name;
        }
        let name = if name.trim().is_empty() { "Anonymous".to_owned() } else { name };
        name + GUEST_SUFFIX
    }

    /// What a token presented at connect time (or in a first message) is worth.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let verified = match &self.verifier {
            Some(verifier) => verifier.verify(token),
            None => Err(AuthError::Invalid("this server has no token key configured".into())),
        };
        match &verified {
            Err(AuthError::Expired) => crate::metrics::metrics().auth_failed("expired"),
            Err(AuthError::Invalid(_)) => crate::metrics::metrics().auth_failed("invalid"),
            _ => {}
        }
        verified
    }

    /// A refreshed token: valid, and for the same subject as the one it replaces.
    pub fn refresh(&self, current: &Identity, token: &str) -> Result<Identity, AuthError> {
        let fresh = self.verify(token)?;
        match (&current.subject, &fresh.subject) {
            (Some(expected), Some(got)) if expected != got => {
                Err(AuthError::OtherSubject { expected: expected.clone(), got: got.clone() })
            }
            _ => Ok(fresh),
        }
    }

    pub fn api_key_matches(&self, presented: &str) -> bool {
        self.api_key.as_deref().is_some_and(|key| constant_time_eq(&digest(key), &digest(presented)))
    }
}

/// Keys are compared as fixed-length digests, so neither the length of the key nor how much of a
/// guess was right shows in the time an answer takes.
fn digest(key: &str) -> [u8; 20] {
    sha1_smol::Sha1::from(key.as_bytes()).digest().bytes()
}

fn constant_time_eq(a: &[u8; 20], b: &[u8; 20]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Which `Origin`s may open a WebSocket. Requests without an `Origin` header do not come from a
/// browser page and are let through (a non-browser client can claim any origin anyway).
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// `None`: any origin. Otherwise exact origins (`https://chat.example.com`) or wildcards
    /// (`https://*.example.com`, `*`).
    allowed: Option<Vec<String>>,
}

impl OriginPolicy {
    pub fn any() -> Self {
        Self { allowed: None }
    }

    pub fn only(patterns: Vec<String>) -> Self {
        Self { allowed: Some(patterns.iter().map(|p| normalized(p)).collect()) }
    }

    /// Checks one pattern as [`OriginPolicy::only`] takes it: an origin as a browser sends it (scheme
    /// and host), a wildcard, or `*`. An empty one (a trailing comma) matches nothing and passes.
    pub fn check_pattern(pattern: &str) -> Result<(), String> {
        let pattern = normalized(pattern);
        if pattern.is_empty() || pattern == "*" || pattern.starts_with("https://") || pattern.starts_with("http://") {
            return Ok(());
        }
        Err(format!(
            "{pattern:?} is not an origin: scheme and host, as a browser sends it (https://chat.example.com, \
             https://*.example.com), or *"
        ))
    }

    pub fn allows(&self, origin: Option<&str>) -> bool {
        let (Some(_), Some(origin)) = (&self.allowed, origin) else { return true };
        self.lists(origin, true)
    }

    /// Whether a credential the browser attaches by itself (a cookie) may be used for this request.
    /// `fetch_site` is the browser's `Sec-Fetch-Site`: a page of another site can make the browser
    /// send the cookie (a form's POST, an `EventSource`), and acting on it would be cross-site request
    /// forgery. Such a request is taken only from an origin this policy lists by name; without
    /// `Sec-Fetch-Site` (not a browser, or one too old to say) the origin check is all there is.
    pub fn allows_ambient_credentials(&self, origin: Option<&str>, fetch_site: Option<&str>) -> bool {
        if !fetch_site.is_some_and(|site| site.trim().eq_ignore_ascii_case("cross-site")) {
            return true;
        }
        origin.is_some_and(|origin| self.names(origin))
    }

    /// Whether the list names `origin`, exactly or by a subdomain pattern: `*` names no one, and
    /// neither does the default (any origin). Such an origin's pages may use credentials the
    /// browser attaches by itself, across sites.
    pub fn names(&self, origin: &str) -> bool {
        self.lists(origin, false)
    }

    /// Whether a pattern of the list matches `origin` (`*` counting only with `star`).
    fn lists(&self, origin: &str, star: bool) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        let patterns = self.allowed.iter().flatten();
        patterns.filter(|pattern| star || *pattern != "*").any(|pattern| origin_matches(pattern, &origin))
    }
}

/// An origin pattern as it is compared: trimmed, without a trailing `/`, in lower case.
fn normalized(pattern: &str) -> String {
    pattern.trim().trim_end_matches('/').to_ascii_lowercase()
}

fn origin_matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.split_once("*.") {
        // `https://*.example.com` matches subdomains at any depth, not the bare domain.
        Some((scheme, domain)) => origin
            .strip_prefix(scheme)
            .and_then(|host| host.strip_suffix(domain))
            .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1 && !sub.contains('/')),
        None => pattern == origin,
    }
}

/// Mints an HS256 token (`switchboard token`).
pub fn mint(secret: &[u8], claims: &Claims) -> Result<String, AuthError> {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret))
        .map_err(|e| AuthError::Invalid(e.to_string()))
}

/// Mints an RS256 or ES256 token with a PEM private key.
pub fn mint_with_key(pem: &[u8], claims: &Claims) -> Result<String, AuthError> {
    let (key, algorithm) = match EncodingKey::from_rsa_pem(pem) {
        Ok(key) => (key, Algorithm::RS256),
        Err(_) => (
            EncodingKey::from_ec_pem(pem)
                .map_err(|_| AuthError::BadSigningKey("the private key is neither RSA nor EC (P-256) PEM".into()))?,
            Algorithm::ES256,
        ),
    };
    jsonwebtoken::encode(&Header::new(algorithm), claims, &key).map_err(|e| AuthError::Invalid(e.to_string()))
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(rooms: Option<Vec<&str>>, join: Option<Vec<&str>>, publish: Option<Vec<&str>>) -> Claims {
        let list = |l: Option<Vec<&str>>| l.map(|l| l.into_iter().map(String::from).collect());
        Claims {
            sub: "alice".into(),
            exp: unix_now() + 60,
            name: None,
            rooms: list(rooms),
            join: list(join),
            publish: list(publish),
        }
    }

    #[test]
    fn claims_grant_rooms_by_name_and_prefix() {
        let verifier = Verifier::hs256(b"secret");
        let token = mint(b"secret", &claims(Some(vec!["lobby", "team-*"]), Some(vec!["news"]), None)).unwrap();
        let id = verifier.verify(&token).unwrap();
        assert_eq!((id.subject.as_deref(), id.name.as_deref()), (Some("alice"), Some("alice")));
        assert!(id.may_join("lobby") && id.may_publish("lobby"));
        assert!(id.may_join("team-red") && id.may_publish("team-red"));
        assert!(id.may_join("news") && !id.may_publish("news"), "join grants reading only");
        assert!(!id.may_join("teamx") && !id.may_join("other"));
        let open = verifier.verify(&mint(b"secret", &claims(None, None, None)).unwrap()).unwrap();
        assert!(open.may_join("anything") && open.may_publish("anything"));
    }

    #[test]
    fn an_expected_audience_and_issuer_are_checked_by_value() {
        let sign = |claims: serde_json::Value| {
            let key = jsonwebtoken::EncodingKey::from_secret(b"secret");
            jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
        };
        let verifier = Verifier::hs256(b"secret").expecting(Some("chat"), Some("issuer"));
        let exp = unix_now() + 60;
        for aud in [serde_json::json!("chat"), serde_json::json!(["other", "chat"])] {
            let token = sign(serde_json::json!({"sub": "a", "exp": exp, "aud": aud, "iss": "issuer"}));
            assert!(verifier.verify(&token).is_ok(), "aud {aud}");
        }
        let refused = [
            serde_json::json!({"sub": "a", "exp": exp, "aud": "another-service", "iss": "issuer"}),
            serde_json::json!({"sub": "a", "exp": exp, "aud": ["another-service"], "iss": "issuer"}),
            serde_json::json!({"sub": "a", "exp": exp, "iss": "issuer"}),
            serde_json::json!({"sub": "a", "exp": exp, "aud": "chat", "iss": "someone-else"}),
            serde_json::json!({"sub": "a", "exp": exp, "aud": "chat"}),
        ];
        for claims in refused {
            assert!(matches!(verifier.verify(&sign(claims.clone())), Err(AuthError::Invalid(_))), "{claims}");
        }
        // Without an expected audience, a token's `aud` is not looked at.
        let any = Verifier::hs256(b"secret");
        assert!(any.verify(&sign(serde_json::json!({"sub": "a", "exp": exp, "aud": "whatever"}))).is_ok());
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let verifier = Verifier::hs256(b"secret");
        let forged = mint(b"other secret", &claims(None, None, None)).unwrap();
        assert!(matches!(verifier.verify(&forged), Err(AuthError::Invalid(_))));
        let mut old = claims(None, None, None);
        old.exp = unix_now() - 1;
        assert!(matches!(verifier.verify(&mint(b"secret", &old).unwrap()), Err(AuthError::Expired)));
        assert!(matches!(verifier.verify("not.a.token"), Err(AuthError::Invalid(_))));
        // A token signed for another algorithm is not accepted by an HS256 verifier.
        let unsigned = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(r#"{"sub":"x","exp":9999999999}"#));
        assert!(matches!(verifier.verify(&unsigned), Err(AuthError::Invalid(_))));
    }

    fn b64(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn refresh_must_keep_the_subject() {
        let access = Access {
            verifier: Some(Verifier::hs256(b"k")),
            allow_anonymous: false,
            origins: OriginPolicy::any(),
            api_key: None,
        };
        let alice = access.verify(&mint(b"k", &claims(None, None, None)).unwrap()).unwrap();
        let mut bob = claims(None, None, None);
        bob.sub = "bob".into();
        let err = access.refresh(&alice, &mint(b"k", &bob).unwrap()).unwrap_err();
        assert!(matches!(err, AuthError::OtherSubject { .. }), "{err}");
        assert!(access.refresh(&alice, &mint(b"k", &claims(None, None, None)).unwrap()).is_ok());
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain_wildcard() {
        let policy = OriginPolicy::only(vec!["https://chat.example.com".into(), "https://*.example.org/".into()]);
        assert!(policy.allows(Some("https://chat.example.com")));
        assert!(policy.allows(Some("HTTPS://Chat.Example.com")));
        assert!(policy.allows(Some("https://a.example.org")) && policy.allows(Some("https://a.b.example.org")));
        assert!(!policy.allows(Some("https://example.org")), "the wildcard needs a subdomain");
        assert!(!policy.allows(Some("https://evil-example.org")));
        assert!(!policy.allows(Some("http://chat.example.com")), "scheme matters");
        assert!(!policy.allows(Some("https://chat.example.com.evil.net")));
        assert!(!policy.allows(Some("null")));
        assert!(policy.allows(None), "no Origin: not a browser page");
        assert!(OriginPolicy::any().allows(Some("https://anything")));
    }

    #[test]
    fn grants_are_rooms_prefixes_or_everything() {
        for good in ["lobby", "team-*", "*"] {
            assert_eq!(check_grant(good), Ok(()), "{good}");
        }
        for bad in ["bad room", "a b*", "**"] {
            assert!(check_grant(bad).unwrap_err().contains("invalid room name"), "{bad}");
        }
        assert_eq!(OriginPolicy::check_pattern(" HTTPS://Chat.example.com/ "), Ok(()));
        assert!(OriginPolicy::check_pattern("chat.example.com").unwrap_err().contains("not an origin"));
    }

    #[test]
    fn cookies_count_from_other_sites_only_for_origins_listed_by_name() {
        let listed = OriginPolicy::only(vec!["https://app.example.com".into(), "https://*.example.org".into()]);
        let cross = Some("cross-site");
        for site in [None, Some("same-origin"), Some("same-site"), Some("none")] {
            assert!(OriginPolicy::any().allows_ambient_credentials(Some("https://evil.example"), site), "{site:?}");
        }
        assert!(!OriginPolicy::any().allows_ambient_credentials(Some("https://evil.example"), cross));
        assert!(!OriginPolicy::any().allows_ambient_credentials(None, Some(" Cross-Site ")));
        assert!(listed.allows_ambient_credentials(Some("https://app.example.com"), cross));
        assert!(listed.allows_ambient_credentials(Some("https://a.example.org"), cross));
        assert!(!listed.allows_ambient_credentials(Some("https://evil.example"), cross));
        let everyone = OriginPolicy::only(vec!["*".into()]);
        assert!(!everyone.allows_ambient_credentials(Some("https://evil.example"), cross), "`*` names no one");
    }

    #[test]
    fn api_key_comparison() {
        let access = Access {
            verifier: None,
            allow_anonymous: true,
            origins: OriginPolicy::any(),
            api_key: Some("s3cret".into()),
        };
        assert!(access.api_key_matches("s3cret"));
        assert!(!access.api_key_matches("s3cre") && !access.api_key_matches("s3cret!") && !access.api_key_matches(""));
        let off = Access { api_key: None, ..access };
        assert!(!off.api_key_matches(""));
    }
}
