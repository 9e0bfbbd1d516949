//! Settings of a WebSocket connection: the engine's limits plus what needs a runtime (timers,
//! buffering, backpressure). Defaults are safe for a public server.

use std::time::Duration;

use switchboard_proto::deflate::DeflateConfig;

/// Ping the peer when it has been quiet for `interval`; give up if nothing arrives within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// How long the peer may stay quiet before a ping.
    pub interval: Duration,
    /// How long to wait for anything after the ping.
    pub timeout: Duration,
}

/// Settings of one connection.
#[derive(Debug, Clone)]
pub struct Config {
    /// Frame and message limits, automatic pongs.
    pub protocol: switchboard_proto::Config,
    /// Largest request or response head accepted during the handshake (431 beyond it).
    pub max_head_bytes: usize,
    /// The whole opening handshake must finish within this.
    pub handshake_timeout: Duration,
    /// `send` waits (backpressure) while more than this many bytes are queued unsent; reading also
    /// pauses while automatic replies (pongs) exceed it, so a peer that pings and never reads cannot
    /// grow memory. The caller's own messages never pause reading: a peer that is itself waiting to
    /// write (an echo) would otherwise wait for us forever.
    pub write_high_water: usize,
    /// How much to ask the socket for per read.
    pub read_chunk: usize,
    /// Optional ping keepalive (off by default: a library should not surprise its user with traffic).
    pub keepalive: Option<Keepalive>,
    /// How long to wait for the peer's part of the close handshake (its close frame, or, for a client,
    /// the server closing TCP), and for our close frame to be written to a peer that does not read,
    /// before dropping the connection. Past it, `close` (or a writer half's flush) reports
    /// [`Error::CloseTimeout`] when our close frame could not be written, and `recv` when the peer's
    /// close frame did not come (once; `recv` then ends). A client whose close handshake is done but
    /// whose server never closes TCP just ends (`None`).
    ///
    /// [`Error::CloseTimeout`]: crate::Error::CloseTimeout
    pub close_timeout: Duration,
    /// permessage-deflate (RFC 7692): offered by a client, accepted by a server, when set. Off by
    /// default: it costs memory per connection (see `switchboard_proto::deflate`).
    pub compression: Option<DeflateConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            protocol: switchboard_proto::Config::default(),
            max_head_bytes: switchboard_proto::handshake::DEFAULT_MAX_HEAD_BYTES,
            handshake_timeout: Duration::from_secs(10),
            write_high_water: 1 << 20,
            read_chunk: 32 * 1024,
            keepalive: None,
            close_timeout: Duration::from_secs(5),
            compression: None,
        }
    }
}

impl Config {
    /// Sets the largest message accepted (close 1009 beyond it).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.protocol.max_message_size = bytes;
        self
    }

    /// Sets the largest frame accepted (close 1009 beyond it).
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.protocol.max_frame_size = bytes;
        self
    }

    /// Pings after `interval` of silence and gives up `timeout` after that ping. Each connection's
    /// interval is shortened by up to a tenth, differently for consecutive connections, so that
    /// connections opened together do not ping together. The timer runs while the connection is
    /// read (`recv`, or the reader half): giving up, `recv` reports
    /// [`Error::KeepaliveTimeout`](crate::Error::KeepaliveTimeout), the peer is sent a 1001 close
    /// frame if its socket takes it at once, and a writer half's waiting or next send fails.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive = Some(Keepalive { interval, timeout });
        self
    }

    /// Sets the backpressure high-water mark, in bytes queued.
    pub fn write_high_water(mut self, bytes: usize) -> Self {
        self.write_high_water = bytes;
        self
    }

    /// Sets how long to wait for the peer's part of the close handshake.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Turns permessage-deflate on with these settings.
    pub fn compression(mut self, deflate: DeflateConfig) -> Self {
        self.compression = Some(deflate);
        self
    }

    /// Sets the time limit of the opening handshake.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }
}
