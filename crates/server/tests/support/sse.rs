//! Reading a `GET /sse` response in tests: its head, then its events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// One event of a stream: its `event:`, `id:` and `data:` (comments are kept as event "comment").
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub kind: String,
    pub id: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// An open `GET /sse` response.
pub struct Stream {
    pub reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: String,
}

impl Stream {
    pub fn open(addr: &str, query: &str, extra_headers: &str) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        write!(writer, "GET /sse?{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{extra_headers}\r\n")
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut headers = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            headers.push_str(&line);
        }
        let status = headers[9..12].parse().unwrap();
        Self { reader, status, headers }
    }

    /// The body (for an error answer), read to its Content-Length.
    pub fn body(mut self) -> Value {
        let length: usize = self
            .headers
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .expect("a length");
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// The next event (chunked transfer: chunk sizes are skipped as they come on lines of their own).
    pub fn next(&mut self) -> Event {
        let mut event = Event::default();
        let mut seen = false;
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("an event within 5 s");
            assert!(n > 0, "the stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(rest) = line.strip_prefix("event: ") {
                event.kind = rest.to_owned();
                seen = true;
            } else if let Some(rest) = line.strip_prefix("id: ") {
                event.id = Some(rest.to_owned());
                seen = true;
            } else if let Some(rest) = line.strip_prefix("data: ") {
                event.data = rest.to_owned();
                seen = true;
            } else if let Some(rest) = line.strip_prefix("retry: ") {
                event.kind = "retry".into();
                event.data = rest.to_owned();
                seen = true;
            } else if line.starts_with(':') {
                event.kind = "comment".into();
                seen = true;
            } else if line.is_empty() && seen {
                return event;
            }
            // Anything else is a chunk size line.
        }
    }

    pub fn next_of(&mut self, kind: &str) -> Event {
        loop {
            let event = self.next();
            if event.kind == kind {
                return event;
            }
        }
    }
}
