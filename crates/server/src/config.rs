//! `switchboard serve` settings, by component: `[server]`, `[history]`, `[chat]`, `[limits]` and
//! `[auth]`, each a section of the TOML file. Each setting comes from, in order of precedence: its
//! command-line flag, its `SWITCHBOARD_*` environment variable, the TOML file named by `--config`, and
//! the default. Every default works offline with no setup.
//!
//! Each setting is written once, in the `settings!` block of its component: its help (the doc
//! comment), its flag and variable (`#[arg]`), its TOML key (the field name) and its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

use crate::chat::access::OriginPolicy;
use crate::chat::limits::RateLimit;

/// One component's settings: a struct whose fields are all optional (so flags, the environment and
/// the file can be layered with [`or`](ServerSettings::or)), and for each setting with a default, a
/// method of the same name that applies it.
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $field:ident : $ty:ty $(= $default:expr)?,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(clap::Args, Deserialize, Debug, Default, Clone)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: Option<$ty>,
            )*
        }

        impl $name {
            /// Each setting from `self`, else from `fallback`.
            pub fn or(self, fallback: Self) -> Self {
                Self { $( $field: self.$field.or(fallback.$field), )* }
            }

            $($(
                #[doc = concat!("`", stringify!($field), "`, or its default.")]
                pub fn $field(&self) -> $ty {
                    self.$field.clone().unwrap_or_else(|| $default)
                }
            )?)*
        }
    };
}

/// The least `max_request_head_bytes` can be.
pub const MIN_REQUEST_HEAD_BYTES: usize = 1024;
/// The most it can be.
pub const MAX_REQUEST_HEAD_BYTES: usize = 1 << 20;
/// The most worker threads `--threads` may ask for: far past any core count, short of what a
/// process can start (each thread reserves a stack).
pub const MAX_THREADS: usize = 1024;

settings! {
    /// `[server]`: the listening socket, TLS, the life of a connection.
    pub struct ServerSettings {
        /// Address to listen on [default: 127.0.0.1:8000].
        #[arg(long, env = "SWITCHBOARD_LISTEN")]
        listen: SocketAddr = "127.0.0.1:8000".parse().expect("valid address"),
        /// PEM certificate chain: serve https:// and wss:// (with --tls-key).
        #[arg(long, env = "SWITCHBOARD_TLS_CERT", requires = "tls_key")]
        tls_cert: PathBuf,
        /// PEM private key for --tls-cert.
        #[arg(long, env = "SWITCHBOARD_TLS_KEY", requires = "tls_cert")]
        tls_key: PathBuf,
        /// Seconds a client has to send its request head (and finish TLS), and a POST its body
        /// [default: 10].
        #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_SECS")]
        handshake_timeout_secs: u64 = 10,
        /// Seconds a connection may go without taking a byte of what the server has to send before
        /// it is closed: a client that stopped reading (an SSE stream or a long poll's answer, also
        /// when its session was let go for not keeping up) [default: 20].
        #[arg(long, env = "SWITCHBOARD_SEND_TIMEOUT_SECS")]
        send_timeout_secs: u64 = 20,
        /// Largest request head (request line and headers) of any request, the WebSocket handshake
        /// included, in bytes; a longer one gets 431. Over HTTP/2, the largest header list.
        /// 1024 to 1048576 [default: 8192].
        #[arg(long, env = "SWITCHBOARD_MAX_REQUEST_HEAD_BYTES")]
        max_request_head_bytes: usize = switchboard_ws::proto::handshake::DEFAULT_MAX_HEAD_BYTES,
        /// Proxies whose X-Forwarded-For / Forwarded headers name the client, comma-separated
        /// addresses or CIDR networks (10.0.0.0/8,192.0.2.7): the rightmost address that is not one
        /// of them is the client, for limits, logs and metrics. The headers of other peers are
        /// ignored [default: none].
        #[arg(long, env = "SWITCHBOARD_TRUSTED_PROXIES", value_delimiter = ',')]
        trusted_proxies: Vec<String>,
        /// The header --trusted-proxies append the client's address to: x-forwarded-for or
        /// forwarded (RFC 7239). Only that one is read: a proxy passes the other through as the
        /// client sent it [default: x-forwarded-for].
        #[arg(long, env = "SWITCHBOARD_FORWARDED_HEADER")]
        forwarded_header: crate::proxied::ForwardedHeader = crate::proxied::ForwardedHeader::XForwardedFor,
        /// Every connection starts with a PROXY protocol header (v1 or v2, HAProxy's send-proxy /
        /// send-proxy-v2) naming the client; connections without one are closed. With
        /// --trusted-proxies, headers are taken only from those peers [default: false].
        #[arg(long, env = "SWITCHBOARD_PROXY_PROTOCOL")]
        proxy_protocol: bool = false,
        /// Concurrent streams of one HTTP/2 connection (HTTP/2 is offered on TLS ports; each
        /// WebSocket over it is a stream). 1 to 1000 [default: 100].
        #[arg(long, env = "SWITCHBOARD_H2_MAX_STREAMS")]
        h2_max_streams: u32 = 100,
        /// Seconds of silence before the server pings a client; one more such period without an answer
        /// drops it. 0 turns keepalive off [default: 25].
        #[arg(long, env = "SWITCHBOARD_KEEPALIVE_SECS")]
        keepalive_secs: u64 = 25,
        /// Seconds between the comments an idle Server-Sent Events stream sends, so proxies keep it
        /// open [default: 15].
        #[arg(long, env = "SWITCHBOARD_SSE_HEARTBEAT_SECS")]
        sse_heartbeat_secs: u64 = 15,
        /// Seconds a long-polling client that names itself (`client=`) stays present after its last
        /// poll [default: 35].
        #[arg(long, env = "SWITCHBOARD_POLL_GRACE_SECS")]
        poll_grace_secs: u64 = 35,
        /// Offer permessage-deflate to clients [default: true].
        #[arg(long, env = "SWITCHBOARD_COMPRESSION")]
        compression: bool = true,
        /// Open connections (HTTP and WebSocket) at once; more get 503 [default: 100000].
        #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
        max_connections: usize = 100_000,
        /// Open connections from one IP address (IPv6: one /64); more get 429 [default: 10000].
        #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP")]
        max_connections_per_ip: usize = 10_000,
        /// Sessions (WebSocket, SSE, long poll) one signed-in user, by its token's `sub`, may have
        /// open on this node at once, whatever connections carry them; more get 429 or close 1008.
        /// 0 turns the limit off [default: 100].
        #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_USER")]
        max_connections_per_user: usize = 100,
        /// Seconds to wait, after SIGTERM or Ctrl-C, for clients to close and history to be written
        /// [default: 5].
        #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_SECS")]
        shutdown_grace_secs: u64 = 5,
        /// Worker threads: 0 is one per core (tokio's multi-threaded runtime), 1 a current-thread
        /// runtime, N a multi-threaded runtime of N workers (at most 1024) [default: 0].
        #[arg(long, env = "SWITCHBOARD_THREADS")]
        threads: usize = 0,
    }
}

settings! {
    /// `[history]`: where messages are kept, and for how long.
    pub struct HistorySettings {
        /// SQLite file that keeps the history (created if missing) [default: switchboard.db].
        #[arg(long = "db", env = "SWITCHBOARD_DB")]
        db: PathBuf = PathBuf::from("switchboard.db"),
        /// Messages kept per room [default: 1000].
        #[arg(long = "history-max-messages", env = "SWITCHBOARD_HISTORY_MAX_MESSAGES")]
        max_messages: u64 = 1000,
        /// Seconds a message is kept; 0 keeps messages until the count limit drops them [default: 604800, a week].
        #[arg(long = "history-max-age-secs", env = "SWITCHBOARD_HISTORY_MAX_AGE_SECS")]
        max_age_secs: u64 = 7 * 24 * 3600,
        /// Largest size of the history database in bytes; publishes past it are refused with
        /// `unavailable`, as on a full disk. SQLite's write-ahead log (up to about 4 MiB between
        /// checkpoints) comes on top [default: no limit but the disk's].
        #[arg(long = "db-max-bytes", env = "SWITCHBOARD_DB_MAX_BYTES")]
        db_max_bytes: u64,
    }
}

settings! {
    /// `[chat]`: rooms, names and messages.
    pub struct ChatSettings {
        /// Room of clients that speak the seed protocol (no subprotocol) [default: lobby].
        #[arg(long, env = "SWITCHBOARD_DEFAULT_ROOM")]
        default_room: String = "lobby".into(),
        /// Longest chat message, in characters [default: 4096].
        #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_CHARS")]
        max_message_chars: usize = 4096,
        /// Longest name, in characters [default: 64].
        #[arg(long, env = "SWITCHBOARD_MAX_NAME_CHARS")]
        max_name_chars: usize = 64,
        /// Rooms one connection may be in at once [default: 64].
        #[arg(long, env = "SWITCHBOARD_MAX_ROOMS_PER_CONNECTION")]
        max_rooms_per_connection: usize = 64,
        /// Most members listed in one presence answer (the answer says when it was cut) [default: 1000].
        #[arg(long, env = "SWITCHBOARD_MAX_PRESENCE")]
        max_presence: usize = 1000,
    }
}

settings! {
    /// `[limits]`: how fast a client may send, and how far behind it may fall.
    pub struct LimitSettings {
        /// Messages per second one connection may send on average; faster ones are closed with 1008.
        /// 0 turns the limit off [default: 200].
        #[arg(long, env = "SWITCHBOARD_RATE_LIMIT")]
        rate_limit: f64 = 200.0,
        /// Messages a connection may send in a burst above --rate-limit [default: 400].
        #[arg(long, env = "SWITCHBOARD_RATE_BURST")]
        rate_burst: u32 = 400,
        /// Messages queued for one client before it counts as too slow and is disconnected [default: 1024].
        #[arg(long, env = "SWITCHBOARD_OUTBOX_MESSAGES")]
        outbox_messages: usize = 1024,
        /// Bytes queued for one client before it counts as too slow and is disconnected (1008)
        /// [default: 1048576].
        #[arg(long, env = "SWITCHBOARD_OUTBOX_BYTES")]
        outbox_bytes: usize = 1 << 20,
    }
}

settings! {
    /// `[auth]`: tokens, origins and the publish API's key.
    pub struct AuthSettings {
        /// Shared secret of HS256 tokens (JWT); turns authentication on.
        #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
        /// PEM public key (RSA for RS256, P-256 for ES256) of tokens; turns authentication on.
        #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
        jwt_public_key: PathBuf,
        /// Required `aud` claim of tokens (not checked when unset).
        #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
        jwt_audience: String,
        /// Required `iss` claim of tokens (not checked when unset).
        #[arg(long, env = "SWITCHBOARD_JWT_ISSUER")]
        jwt_issuer: String,
        /// Accept connections without a token [default: true without a token key, false with one].
        #[arg(long, env = "SWITCHBOARD_ALLOW_ANONYMOUS")]
        allow_anonymous: bool,
        /// Origins allowed to open a WebSocket, comma-separated: exact (https://chat.example.com) or
        /// wildcard (https://*.example.com); others get 403 [default: any].
        #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
        allowed_origins: Vec<String>,
        /// Key of the server API under /api (publish, history, users, nodes), sent as
        /// "Authorization: Bearer KEY" or "X-Api-Key: KEY"; the API is off without it.
        #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
        api_key: String,
    }
}

settings! {
    /// `[cluster]`: several nodes serving one chat, through Redis.
    pub struct ClusterSettings {
        /// Redis URL (redis://HOST:PORT/): history, fan-out and presence go through Redis, and every
        /// node given the same Redis serves the same chat. Several comma-separated URLs spread rooms
        /// over independent servers by a stable hash of the room (every node lists them in the same
        /// order) [default: none: SQLite, one node].
        #[arg(long, env = "SWITCHBOARD_REDIS", value_delimiter = ',')]
        redis: Vec<String> = Vec::new(),
        /// The --redis URLs are nodes of a Redis Cluster (keys by slot, sharded pub/sub) [default: false].
        #[arg(long, env = "SWITCHBOARD_REDIS_CLUSTER", num_args = 0..=1, default_missing_value = "true")]
        redis_cluster: bool = false,
        /// Milliseconds a Redis command may take before it fails as `unavailable` [default: 2000].
        #[arg(long, env = "SWITCHBOARD_REDIS_TIMEOUT_MS")]
        redis_timeout_ms: u64 = 2000,
        /// Seconds a node's presence lease lasts: members of a node that died leave for everyone
        /// within about this long [default: 10].
        #[arg(long, env = "SWITCHBOARD_PRESENCE_LEASE_SECS")]
        presence_lease_secs: u64 = 10,
    }
}

/// The command line (and environment) of `switchboard serve`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of these settings, in sections named server, history, chat, limits, auth and cluster
    /// (keys are the settings' names with underscores, without the section's prefix).
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerSettings,
    #[command(flatten)]
    pub history: HistorySettings,
    #[command(flatten)]
    pub chat: ChatSettings,
    #[command(flatten)]
    pub limits: LimitSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[command(flatten)]
    pub cluster: ClusterSettings,
}

/// The TOML file: the same sections, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    server: ServerSettings,
    history: HistorySettings,
    chat: ChatSettings,
    limits: LimitSettings,
    auth: AuthSettings,
    cluster: ClusterSettings,
}

/// Where tokens are checked against.
#[derive(Clone)]
pub enum TokenKey {
    /// HS256 shared secret.
    Secret(String),
    /// PEM public key file (RS256 or ES256).
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

/// Settings in force: every layer merged and checked.
#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    /// `[server]`.
    pub server: ServerSettings,
    /// `[history]`.
    pub history: HistorySettings,
    /// `[chat]`.
    pub chat: ChatSettings,
    /// `[limits]`.
    pub limits: LimitSettings,
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[cluster]`.
    pub cluster: ClusterSettings,
}

impl ServeConfig {
    /// Flags and environment over the file over the defaults; refuses settings that cannot work.
    pub fn load(args: ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let config = Self {
            server: args.server.or(file.server),
            history: args.history.or(file.history),
            chat: args.chat.or(file.chat),
            limits: args.limits.or(file.limits),
            auth: args.auth.or(file.auth),
            cluster: args.cluster.or(file.cluster),
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        let (server, limits) = (&self.server, &self.limits);
        anyhow::ensure!(self.history.max_messages() > 0, "history max_messages must be at least 1");
        anyhow::ensure!(limits.outbox_messages() > 0, "outbox_messages must be at least 1");
        anyhow::ensure!(limits.outbox_bytes() > 0, "outbox_bytes must be at least 1");
        anyhow::ensure!(
            server.max_connections() > 0 && server.max_connections_per_ip() > 0,
            "connection limits must be at least 1"
        );
        anyhow::ensure!(server.handshake_timeout_secs() > 0, "handshake_timeout_secs must be at least 1");
        anyhow::ensure!((1..=86_400).contains(&server.send_timeout_secs()), "send_timeout_secs must be 1 to 86400");
        anyhow::ensure!(server.sse_heartbeat_secs() > 0, "sse_heartbeat_secs must be at least 1");
        anyhow::ensure!(
            (MIN_REQUEST_HEAD_BYTES..=MAX_REQUEST_HEAD_BYTES).contains(&server.max_request_head_bytes()),
            "max_request_head_bytes must be {MIN_REQUEST_HEAD_BYTES} to {MAX_REQUEST_HEAD_BYTES}"
        );
        anyhow::ensure!((1..=1000).contains(&server.h2_max_streams()), "h2_max_streams must be 1 to 1000");
        if let Err(reason) = crate::proxied::TrustedProxies::parse(
            server.trusted_proxies.as_deref().unwrap_or_default(),
            server.forwarded_header(),
        ) {
            anyhow::bail!("trusted_proxies: {reason}");
        }
        let cluster = &self.cluster;
        anyhow::ensure!(
            !cluster.redis_cluster() || !cluster.redis().is_empty(),
            "redis_cluster needs the URL of at least one cluster node in redis"
        );
        anyhow::ensure!(cluster.redis_timeout_ms() > 0, "redis_timeout_ms must be at least 1");
        anyhow::ensure!(cluster.presence_lease_secs() > 0, "presence_lease_secs must be at least 1");
        let rate = limits.rate_limit();
        anyhow::ensure!(rate.is_finite() && rate >= 0.0, "rate_limit must be a number of messages per second");
        // A burst of 0 would refuse every publish the rate allows.
        anyhow::ensure!(limits.rate_burst() > 0, "rate_burst must be at least 1");
        anyhow::ensure!(server.threads() <= MAX_THREADS, "threads must be 0 (one per core) to {MAX_THREADS}");
        anyhow::ensure!(server.tls_cert.is_some() == server.tls_key.is_some(), "tls_cert and tls_key go together");
        anyhow::ensure!(
            !(self.auth.jwt_secret.is_some() && self.auth.jwt_public_key.is_some()),
            "jwt_secret and jwt_public_key exclude each other"
        );
        // An empty secret usually comes from an unset variable (`--jwt-secret "$SECRET"`): taken as
        // it is, anyone could sign tokens, or call the server API with an empty key.
        anyhow::ensure!(
            !self.auth.jwt_secret.as_ref().is_some_and(String::is_empty),
            "jwt_secret is empty: anyone could sign tokens with it (is the variable it came from set?)"
        );
        anyhow::ensure!(
            !self.auth.api_key.as_ref().is_some_and(String::is_empty),
            "api_key is empty: it would let anyone into /api (is the variable it came from set?)"
        );
        for origin in self.auth.allowed_origins.iter().flatten() {
            OriginPolicy::check_pattern(origin).map_err(|reason| anyhow::anyhow!("allowed_origins: {reason}"))?;
        }
        if let Err((_, reason)) = crate::chat::message::check_room(&self.chat.default_room()) {
            anyhow::bail!("default_room: {reason}");
        }
        anyhow::ensure!(
            self.allow_anonymous() || self.token_key().is_some(),
            "allow_anonymous = false needs jwt_secret or jwt_public_key, or nobody could connect"
        );
        Ok(())
    }

    /// Certificate and key files, when serving TLS.
    pub fn tls(&self) -> Option<(PathBuf, PathBuf)> {
        self.server.tls_cert.clone().zip(self.server.tls_key.clone())
    }

    /// The key tokens are checked against; none turns authentication off.
    pub fn token_key(&self) -> Option<TokenKey> {
        match (&self.auth.jwt_secret, &self.auth.jwt_public_key) {
            (Some(secret), _) => Some(TokenKey::Secret(secret.clone())),
            (None, Some(path)) => Some(TokenKey::PublicKeyFile(path.clone())),
            (None, None) => None,
        }
    }

    /// Whether connections without a token get in: by default, exactly when there is no token key.
    pub fn allow_anonymous(&self) -> bool {
        self.auth.allow_anonymous.unwrap_or(self.token_key().is_none())
    }

    /// The keepalive period, or none.
    pub fn keepalive(&self) -> Option<Duration> {
        Some(self.server.keepalive_secs()).filter(|s| *s > 0).map(Duration::from_secs)
    }

    /// How long a message is served, or forever (within the count limit).
    pub fn history_max_age(&self) -> Option<Duration> {
        Some(self.history.max_age_secs()).filter(|s| *s > 0).map(Duration::from_secs)
    }

    /// The per-connection message rate, or none.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        let per_sec = self.limits.rate_limit();
        (per_sec > 0.0).then(|| RateLimit { per_sec, burst: self.limits.rate_burst() })
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.server.handshake_timeout_secs())
    }

    /// How long a connection may take none of what is sent to it (see `listen::Admitted`).
    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.server.send_timeout_secs())
    }

    /// How long shutdown waits.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.server.shutdown_grace_secs())
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
        assert_eq!(config.server.listen().to_string(), "127.0.0.1:8000");
        assert_eq!(config.history.db(), PathBuf::from("switchboard.db"));
        assert_eq!(config.keepalive(), Some(Duration::from_secs(25)));
        assert!(config.server.compression() && config.tls().is_none());
        assert!(config.allow_anonymous());
        assert_eq!(config.rate_limit(), Some(RateLimit { per_sec: 200.0, burst: 400 }));
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("sb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("switchboard.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:9999\"\nkeepalive_secs = 0\n[history]\nmax_messages = 5\n[limits]\nrate_limit = 0\n",
        )
        .unwrap();
        let mut args = ServeArgs { config: Some(file.clone()), ..ServeArgs::default() };
        args.history.max_messages = Some(7);
        let config = ServeConfig::load(args).unwrap();
        assert_eq!(config.server.listen().to_string(), "127.0.0.1:9999");
        assert_eq!(config.history.max_messages(), 7);
        assert_eq!(config.keepalive(), None);
        assert_eq!(config.rate_limit(), None);
        std::fs::write(&file, "[server]\nlistne = \"typo\"\n").unwrap();
        let err = ServeConfig::load(ServeArgs { config: Some(file.clone()), ..ServeArgs::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field `listne`"), "{err:#}");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\n").unwrap();
        let err = ServeConfig::load(ServeArgs { config: Some(file), ..ServeArgs::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field `listen`"), "a setting outside its section: {err:#}");
    }

    #[test]
    fn cluster_settings_come_from_the_file_and_the_command_line() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let dir = std::env::temp_dir().join(format!("sb-cluster-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.toml");
        std::fs::write(
            &file,
            "[cluster]\nredis = [\"redis://a:6379/\", \"redis://b:6379/\"]\npresence_lease_secs = 20\n",
        )
        .unwrap();
        let config = ServeConfig::load(ServeArgs { config: Some(file), ..ServeArgs::default() }).unwrap();
        assert_eq!(config.cluster.redis(), ["redis://a:6379/", "redis://b:6379/"]);
        assert_eq!((config.cluster.presence_lease_secs(), config.cluster.redis_cluster()), (20, false));
        let cli = Cli::try_parse_from(["serve", "--redis", "redis://x/,redis://y/", "--redis-cluster"]).unwrap();
        let config = ServeConfig::load(cli.serve).unwrap();
        assert_eq!(config.cluster.redis(), ["redis://x/", "redis://y/"], "comma-separated URLs");
        assert!(config.cluster.redis_cluster(), "--redis-cluster without a value means true");
        assert!(ServeConfig::load(ServeArgs::default()).unwrap().cluster.redis().is_empty(), "SQLite by default");
    }

    #[test]
    fn a_closed_server_needs_a_key() {
        let mut args = ServeArgs::default();
        args.auth.allow_anonymous = Some(false);
        let err = ServeConfig::load(args.clone()).unwrap_err();
        assert!(err.to_string().contains("needs jwt_secret"), "{err}");
        args.auth.jwt_secret = Some("s".into());
        assert!(!ServeConfig::load(args).unwrap().allow_anonymous());
    }

    #[test]
    fn empty_secrets_and_what_cannot_match_are_refused_at_startup() {
        let refused = |change: &dyn Fn(&mut ServeArgs), words: &str| {
            let mut args = ServeArgs::default();
            change(&mut args);
            let err = format!("{:#}", ServeConfig::load(args).unwrap_err());
            assert!(err.contains(words), "{err}");
        };
        refused(&|a| a.auth.jwt_secret = Some(String::new()), "jwt_secret is empty");
        refused(&|a| a.auth.api_key = Some(String::new()), "api_key is empty");
        refused(&|a| a.auth.allowed_origins = Some(vec!["chat.example.com".into()]), "is not an origin");
        refused(&|a| a.chat.default_room = Some("bad room".into()), "default_room: invalid room name");
        refused(&|a| a.limits.rate_burst = Some(0), "rate_burst must be at least 1");
        refused(&|a| a.server.threads = Some(100_000), "threads must be 0 (one per core) to 1024");
        refused(&|a| a.server.send_timeout_secs = Some(0), "send_timeout_secs must be 1 to 86400");
        refused(&|a| a.server.send_timeout_secs = Some(u64::MAX), "send_timeout_secs must be 1 to 86400");
        let mut args = ServeArgs::default();
        args.auth.allowed_origins = Some(vec!["HTTPS://Chat.example.com".into(), "*".into(), String::new()]);
        args.auth.api_key = Some("k".into());
        assert!(ServeConfig::load(args).is_ok());
    }
}
