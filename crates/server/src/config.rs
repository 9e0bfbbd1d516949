//! `switchboard serve` settings. Each comes from, in order of precedence: its command-line flag, its
//! `SWITCHBOARD_*` environment variable, the TOML file named by `--config`, and the default. Every
//! default works offline with no setup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

/// The command line (and environment) of `switchboard serve`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flag names with underscores).
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8000].
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// SQLite file that keeps the history (created if missing) [default: switchboard.db].
    #[arg(long, env = "SWITCHBOARD_DB")]
    pub db: Option<PathBuf>,
    /// Room of clients that speak the seed protocol (no subprotocol) [default: lobby].
    #[arg(long, env = "SWITCHBOARD_DEFAULT_ROOM")]
    pub default_room: Option<String>,
    /// Messages kept per room [default: 1000].
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_MESSAGES")]
    pub history_max_messages: Option<u64>,
    /// Seconds a message is kept; 0 keeps messages until the count limit drops them [default: 604800, a week].
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_AGE_SECS")]
    pub history_max_age_secs: Option<u64>,
    /// Seconds of silence before the server pings a client; one more such period without an answer
    /// drops it. 0 turns keepalive off [default: 25].
    #[arg(long, env = "SWITCHBOARD_KEEPALIVE_SECS")]
    pub keepalive_secs: Option<u64>,
    /// Longest chat message, in characters [default: 4096].
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_CHARS")]
    pub max_message_chars: Option<usize>,
    /// Longest name, in characters [default: 64].
    #[arg(long, env = "SWITCHBOARD_MAX_NAME_CHARS")]
    pub max_name_chars: Option<usize>,
    /// Messages queued for one client before it counts as too slow and is disconnected [default: 1024].
    #[arg(long, env = "SWITCHBOARD_OUTBOX_MESSAGES")]
    pub outbox_messages: Option<usize>,
    /// Rooms one connection may be in at once [default: 64].
    #[arg(long, env = "SWITCHBOARD_MAX_ROOMS_PER_CONNECTION")]
    pub max_rooms_per_connection: Option<usize>,
    /// Offer permessage-deflate to clients [default: true].
    #[arg(long, env = "SWITCHBOARD_COMPRESSION")]
    pub compression: Option<bool>,
    /// PEM certificate chain: serve https:// and wss:// (with --tls-key).
    #[arg(long, env = "SWITCHBOARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Shared secret of HS256 tokens (JWT); turns authentication on.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA for RS256, P-256 for ES256) of tokens; turns authentication on.
    #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
    pub jwt_public_key: Option<PathBuf>,
    /// Required `aud` claim of tokens (not checked when unset).
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim of tokens (not checked when unset).
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Accept connections without a token [default: true without a token key, false with one].
    #[arg(long, env = "SWITCHBOARD_ALLOW_ANONYMOUS")]
    pub allow_anonymous: Option<bool>,
    /// Origins allowed to open a WebSocket, comma-separated: exact (https://chat.example.com) or
    /// wildcard (https://*.example.com); others get 403 [default: any].
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Key for POST /api/publish (header "Authorization: Bearer KEY"); the endpoint is off without it.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Open connections (HTTP and WebSocket) at once; more get 503 [default: 100000].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections from one IP address (IPv6: one /64); more get 429 [default: 10000].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Seconds a client has to send its request head (and finish TLS) [default: 10].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: Option<u64>,
    /// Messages per second one connection may send on average; faster ones are closed with 1008.
    /// 0 turns the limit off [default: 200].
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT")]
    pub rate_limit: Option<f64>,
    /// Messages a connection may send in a burst above --rate-limit [default: 400].
    #[arg(long, env = "SWITCHBOARD_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Most members listed in one presence answer (the answer says when it was cut) [default: 1000].
    #[arg(long, env = "SWITCHBOARD_MAX_PRESENCE")]
    pub max_presence: Option<usize>,
    /// Bytes queued for one client before it counts as too slow and is disconnected (1008)
    /// [default: 1048576].
    #[arg(long, env = "SWITCHBOARD_OUTBOX_BYTES")]
    pub outbox_bytes: Option<usize>,
    /// Seconds to wait, after SIGTERM or Ctrl-C, for clients to close and history to be written
    /// [default: 5].
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Largest size of the history database in bytes; publishes past it are refused with
    /// `unavailable`, as on a full disk [default: no limit but the disk's].
    #[arg(long, env = "SWITCHBOARD_DB_MAX_BYTES")]
    pub db_max_bytes: Option<u64>,
}

/// The TOML file: the same settings, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    db: Option<PathBuf>,
    default_room: Option<String>,
    history_max_messages: Option<u64>,
    history_max_age_secs: Option<u64>,
    keepalive_secs: Option<u64>,
    max_message_chars: Option<usize>,
    max_name_chars: Option<usize>,
    outbox_messages: Option<usize>,
    max_rooms_per_connection: Option<usize>,
    compression: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<PathBuf>,
    jwt_audience: Option<String>,
    jwt_issuer: Option<String>,
    allow_anonymous: Option<bool>,
    allowed_origins: Option<Vec<String>>,
    api_key: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    handshake_timeout_secs: Option<u64>,
    rate_limit: Option<f64>,
    rate_burst: Option<u32>,
    max_presence: Option<usize>,
    outbox_bytes: Option<usize>,
    shutdown_grace_secs: Option<u64>,
    db_max_bytes: Option<u64>,
}

/// Where tokens are checked against.
#[derive(Clone)]
pub enum TokenKey {
    Secret(String),
    PublicKeyFile(PathBuf),
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret(..)"),
            Self::PublicKeyFile(path) => f.debug_tuple("PublicKeyFile").field(path).finish(),
        }
    }
}

/// A per-connection message rate: `per_sec` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: u32,
}

/// Settings in force.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub db: PathBuf,
    pub default_room: String,
    pub history_max_messages: u64,
    pub history_max_age: Option<Duration>,
    pub keepalive: Option<Duration>,
    pub max_message_chars: usize,
    pub max_name_chars: usize,
    pub outbox_messages: usize,
    pub max_rooms_per_connection: usize,
    pub compression: bool,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub token_key: Option<TokenKey>,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    pub allow_anonymous: bool,
    pub allowed_origins: Option<Vec<String>>,
    pub api_key: Option<String>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub handshake_timeout: Duration,
    pub rate_limit: Option<RateLimit>,
    pub max_presence: usize,
    pub outbox_bytes: usize,
    pub shutdown_grace: Duration,
    pub db_max_bytes: Option<u64>,
}

impl ServeConfig {
    pub fn load(args: ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let age = args.history_max_age_secs.or(file.history_max_age_secs).unwrap_or(7 * 24 * 3600);
        let keepalive = args.keepalive_secs.or(file.keepalive_secs).unwrap_or(25);
        let tls = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => anyhow::bail!("tls_cert and tls_key go together"),
        };
        let token_key = match (args.jwt_secret.or(file.jwt_secret), args.jwt_public_key.or(file.jwt_public_key)) {
            (Some(_), Some(_)) => anyhow::bail!("jwt_secret and jwt_public_key exclude each other"),
            (Some(secret), None) => Some(TokenKey::Secret(secret)),
            (None, Some(path)) => Some(TokenKey::PublicKeyFile(path)),
            (None, None) => None,
        };
        let rate = args.rate_limit.or(file.rate_limit).unwrap_or(200.0);
        let burst = args.rate_burst.or(file.rate_burst).unwrap_or(400);
        let config = Self {
            listen: args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:8000".parse().expect("valid address")),
            db: args.db.or(file.db).unwrap_or_else(|| "switchboard.db".into()),
            default_room: args.default_room.or(file.default_room).unwrap_or_else(|| "lobby".into()),
            history_max_messages: args.history_max_messages.or(file.history_max_messages).unwrap_or(1000),
            history_max_age: (age > 0).then(|| Duration::from_secs(age)),
            keepalive: (keepalive > 0).then(|| Duration::from_secs(keepalive)),
            max_message_chars: args.max_message_chars.or(file.max_message_chars).unwrap_or(4096),
            max_name_chars: args.max_name_chars.or(file.max_name_chars).unwrap_or(64),
            outbox_messages: args.outbox_messages.or(file.outbox_messages).unwrap_or(1024),
            max_rooms_per_connection: args.max_rooms_per_connection.or(file.max_rooms_per_connection).unwrap_or(64),
            compression: args.compression.or(file.compression).unwrap_or(true),
            tls,
            allow_anonymous: args.allow_anonymous.or(file.allow_anonymous).unwrap_or(token_key.is_none()),
            token_key,
            jwt_audience: args.jwt_audience.or(file.jwt_audience),
            jwt_issuer: args.jwt_issuer.or(file.jwt_issuer),
            allowed_origins: args.allowed_origins.or(file.allowed_origins),
            api_key: args.api_key.or(file.api_key),
            max_connections: args.max_connections.or(file.max_connections).unwrap_or(100_000),
            max_connections_per_ip: args.max_connections_per_ip.or(file.max_connections_per_ip).unwrap_or(10_000),
            handshake_timeout: Duration::from_secs(
                args.handshake_timeout_secs.or(file.handshake_timeout_secs).unwrap_or(10),
            ),
            rate_limit: (rate > 0.0).then_some(RateLimit { per_sec: rate, burst: burst.max(1) }),
            max_presence: args.max_presence.or(file.max_presence).unwrap_or(1000),
            outbox_bytes: args.outbox_bytes.or(file.outbox_bytes).unwrap_or(1 << 20),
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs.or(file.shutdown_grace_secs).unwrap_or(5)),
            db_max_bytes: args.db_max_bytes.or(file.db_max_bytes),
        };
        anyhow::ensure!(config.history_max_messages > 0, "history_max_messages must be at least 1");
        anyhow::ensure!(config.outbox_messages > 0, "outbox_messages must be at least 1");
        anyhow::ensure!(config.outbox_bytes > 0, "outbox_bytes must be at least 1");
        anyhow::ensure!(
            config.max_connections > 0 && config.max_connections_per_ip > 0,
            "connection limits must be at least 1"
        );
        anyhow::ensure!(config.handshake_timeout > Duration::ZERO, "handshake_timeout_secs must be at least 1");
        anyhow::ensure!(rate.is_finite() && rate >= 0.0, "rate_limit must be a number of messages per second");
        anyhow::ensure!(
            config.allow_anonymous || config.token_key.is_some(),
            "allow_anonymous = false needs jwt_secret or jwt_public_key, or nobody could connect"
        );
        Ok(config)
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_with_nothing_given() {
        let config = ServeConfig::load(ServeArgs::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(config.db, PathBuf::from("switchboard.db"));
        assert_eq!(config.keepalive, Some(Duration::from_secs(25)));
        assert!(config.compression && config.tls.is_none());
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("sb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("switchboard.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9999\"\nhistory_max_messages = 5\nkeepalive_secs = 0\n").unwrap();
        let args = ServeArgs { config: Some(file.clone()), history_max_messages: Some(7), ..ServeArgs::default() };
        let config = ServeConfig::load(args).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(config.history_max_messages, 7);
        assert_eq!(config.keepalive, None);
        std::fs::write(&file, "listne = \"typo\"\n").unwrap();
        let err = ServeConfig::load(ServeArgs { config: Some(file), ..ServeArgs::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field `listne`"), "{err:#}");
    }
}
