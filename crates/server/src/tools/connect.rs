//! `switchboard connect URL`: an interactive client. Lines typed (or piped) on stdin are sent as
//! messages; messages that arrive are printed, one per line. Ends with the close handshake when stdin
//! ends (after `--linger` seconds more of reading, for replies still on their way), or when the
//! server closes.
//!
//! Exit status: 0 after a normal close (1000), 1 when the server closed with any other code (printed
//! with its reason on stderr), 2 when the connection could not be made or failed.

use std::path::PathBuf;
use std::time::Duration;

use switchboard_ws::proto::deflate::DeflateConfig;
use switchboard_ws::{ClientBuilder, CloseCode, CloseFrame, Config, Message};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// What the command line asked for.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub url: String,
    /// Send lines as binary messages instead of text.
    pub binary: bool,
    /// Pretty-print text messages that are JSON.
    pub json: bool,
    pub headers: Vec<(String, String)>,
    pub protocols: Vec<String>,
    pub ping_interval: Option<Duration>,
    pub compression: bool,
    pub ca_file: Option<PathBuf>,
    pub proxy: Option<String>,
    /// How long to keep reading after the end of input before closing.
    pub linger: Option<Duration>,
}

/// How the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed with 1000.
    Clean,
    /// The server closed with another code (or none).
    Closed(Option<CloseFrame>),
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Clean => 0,
            Self::Closed(_) => 1,
        }
    }
}

/// Parses `Name: value`.
pub fn parse_header(header: &str) -> Result<(String, String), String> {
    match header.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() => Ok((name.trim().to_owned(), value.trim().to_owned())),
        _ => Err(format!("header {header:?} is not 'Name: value'")),
    }
}

/// Runs a session: `input` lines go out, messages come out on `output`.
pub async fn run<I, O>(options: ConnectOptions, input: I, mut output: O) -> Result<Outcome, switchboard_ws::Error>
where
    I: AsyncBufRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin,
{
    let mut config = Config::default();
    if options.compression {
        config = config.compression(DeflateConfig::default());
    }
    if let Some(interval) = options.ping_interval {
        config = config.keepalive(interval, interval.max(Duration::from_secs(5)));
    }
    let mut builder = ClientBuilder::new(&options.url).config(config);
    for (name, value) in &options.headers {
        builder = builder.header(name, value);
    }
    for protocol in &options.protocols {
        builder = builder.protocol(protocol);
    }
    if let Some(ca) = &options.ca_file {
        builder = builder.tls_ca_file(ca);
    }
    if let Some(proxy) = &options.proxy {
        builder = builder.proxy(proxy);
    }
    let (ws, accepted) = builder.connect().await?;
    tracing::info!(
        url = %options.url,
        protocol = accepted.protocol.as_deref().unwrap_or("-"),
        compression = accepted.extensions.is_some(),
        "connected"
    );
    let (mut reader, mut writer) = ws.split();
    let (binary, linger) = (options.binary, options.linger);
    let sender = tokio::spawn(async move {
        let mut lines = input.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let message = if binary { Message::binary(line.into_bytes()) } else { Message::text(line) };
            if writer.send(message).await.is_err() {
                return;
            }
        }
        // A pipe ends as soon as its last line is written; what the server answers to it (a
        // broadcast, an ack) is still on its way.
        if let Some(linger) = linger {
            tokio::time::sleep(linger).await;
        }
        let _ = writer.close(CloseCode::NORMAL, "").await;
    });
    let mut close = None;
    while let Some(message) = reader.recv().await {
        match message? {
            Message::Text(text) => {
                let printed = if options.json { pretty_json(&text) } else { None };
                output.write_all(printed.as_deref().unwrap_or(&text).as_bytes()).await?;
                output.write_all(b"\n").await?;
            }
            Message::Binary(data) => {
                output.write_all(&data).await?;
                output.write_all(b"\n").await?;
            }
            Message::Close(frame) => close = Some(frame),
            Message::Ping(_) | Message::Pong(_) => {}
        }
        output.flush().await?;
    }
    sender.abort();
    Ok(match close {
        Some(Some(frame)) if frame.code == CloseCode::NORMAL => Outcome::Clean,
        Some(frame) => Outcome::Closed(frame),
        None => return Err(switchboard_ws::Error::AbnormalClosure),
    })
}

fn pretty_json(text: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(text).ok().and_then(|v| serde_json::to_string_pretty(&v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        assert_eq!(parse_header("Authorization: Bearer x:y"), Ok(("Authorization".into(), "Bearer x:y".into())));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header(": empty name").is_err());
    }

    #[test]
    fn json_is_pretty_printed_and_other_text_left_alone() {
        assert_eq!(pretty_json(r#"{"a":1}"#).as_deref(), Some("{\n  \"a\": 1\n}"));
        assert_eq!(pretty_json("not json"), None);
    }
}
