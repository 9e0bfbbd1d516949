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
        };
        anyhow::ensure!(config.history_max_messages > 0, "history_max_messages must be at least 1");
        anyhow::ensure!(config.outbox_messages > 0, "outbox_messages must be at least 1");
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
