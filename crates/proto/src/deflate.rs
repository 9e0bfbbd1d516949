//! permessage-deflate (RFC 7692): negotiation of its four parameters, and the per-connection
//! compressor and decompressor.
//!
//! Memory per connection (zlib-rs, the backend): the compressor holds a fixed 128 KiB hash table
//! (65,536 entries, whatever the memory level) plus about `4 * 2^w + 2^(m+8)` bytes for window bits `w`
//! and memory level `m`; the decompressor holds `2^w` bytes plus about 7 KiB; each side keeps a 16 KiB
//! output chunk. Measured on `switchboard echo` (BENCHMARKS.md): 377 KiB of server RSS per connection
//! with the defaults (w=15, m=8) against 15.5 KiB without compression, 202 KiB with w=10, m=1.
//! With `*_no_context_takeover` the state can be freed between messages
//! ([`crate::Connection::release_idle_buffers`]), so an idle connection then holds none of it.
//!
//! zlib cannot produce a raw deflate stream with an 8-bit (256-byte) window. When the peer limits us
//! to 8 bits we compress with zlib's run-length strategy, whose matches all have distance 1, which is
//! valid under any window; inflating always uses at least a 9-bit window, which decodes anything
//! produced for 8.

use zlib_rs::{
    Deflate, DeflateConfig as ZDeflateConfig, DeflateFlush, Inflate, InflateFlush, Method, Status, Strategy,
};

/// The four bytes a sync flush ends with, removed on send and restored on receive (RFC 7692 §7.2.1).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Output chunk size for compression and decompression.
const CHUNK: usize = 16 * 1024;

/// What this endpoint wants from permessage-deflate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Ask (client) or decide (server) that the server resets its compressor after each message.
    pub server_no_context_takeover: bool,
    /// Ask (server) or promise (client) that the client resets its compressor after each message.
    pub client_no_context_takeover: bool,
    /// Largest window the server may compress with (8-15; a value outside is taken as the nearest).
    pub server_max_window_bits: u8,
    /// Largest window the client may compress with (8-15, as above); only enforceable if the client
    /// offered it.
    pub client_max_window_bits: u8,
    /// zlib compression level, 0-9 (1 is fastest with real compression).
    pub level: u8,
    /// zlib memory level, 1-9: the compressor's hash table size.
    pub mem_level: u8,
    /// Messages shorter than this are sent uncompressed; small payloads rarely shrink.
    pub threshold: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            level: 1,
            mem_level: 8,
            threshold: 64,
        }
    }
}

/// The window sizes RFC 7692 allows (and zlib takes), in bits.
const WINDOW_BITS: std::ops::RangeInclusive<u8> = 8..=15;

/// `bits` within [`WINDOW_BITS`]: a value set by hand outside it is taken as the nearest.
fn window_bits_within_limits(bits: u8) -> u8 {
    bits.clamp(*WINDOW_BITS.start(), *WINDOW_BITS.end())
}

impl DeflateConfig {
    /// The configuration with its window sizes within [`WINDOW_BITS`].
    fn within_limits(&self) -> Self {
        Self {
            server_max_window_bits: window_bits_within_limits(self.server_max_window_bits),
            client_max_window_bits: window_bits_within_limits(self.client_max_window_bits),
            ..self.clone()
        }
    }
}

/// The parameters both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor after each message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after each message.
    pub client_no_context_takeover: bool,
    /// The server compresses with a window of at most 2^this bytes (8-15).
    pub server_max_window_bits: u8,
    /// The client compresses with a window of at most 2^this bytes (8-15).
    pub client_max_window_bits: u8,
}

/// One parsed `permessage-deflate` offer or response (`None` for an absent parameter).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Params {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: present without a value (allowed only for the client's offer).
    client_max_window_bits: Option<Option<u8>>,
}

/// Parses one element of a `Sec-WebSocket-Extensions` list. `None` when it is not permessage-deflate
/// or is malformed (unknown or repeated parameter, bad value): such offers are declined, not fatal.
fn parse_element(element: &str) -> Option<Params> {
    let mut parts = element.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut params = Params::default();
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (part, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) if !params.server_no_context_takeover => {
                params.server_no_context_takeover = true
            }
            ("client_no_context_takeover", None) if !params.client_no_context_takeover => {
                params.client_no_context_takeover = true
            }
            ("server_max_window_bits", Some(v)) if params.server_max_window_bits.is_none() => {
                params.server_max_window_bits = Some(parse_window_bits(v)?)
            }
            ("client_max_window_bits", v) if params.client_max_window_bits.is_none() => {
                params.client_max_window_bits = Some(match v {
                    Some(v) => Some(parse_window_bits(v)?),
                    None => None,
                })
            }
            _ => return None,
        }
    }
    Some(params)
}

/// A window size: a decimal 8-15 without leading zeros (RFC 7692 §7.1.2).
fn parse_window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') {
        return None;
    }
    value.parse::<u8>().ok().filter(|bits| WINDOW_BITS.contains(bits))
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` value that states these parameters.
    pub fn header_value(&self, include_client_window: bool) -> String {
        let mut value = String::from("permessage-deflate");
        if self.server_no_context_takeover {
            value.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            value.push_str("; client_no_context_takeover");
        }
        if self.server_max_window_bits < 15 {
            value.push_str(&format!("; server_max_window_bits={}", self.server_max_window_bits));
        }
        if include_client_window && self.client_max_window_bits < 15 {
            value.push_str(&format!("; client_max_window_bits={}", self.client_max_window_bits));
        }
        value
    }
}

/// Server side: picks the first acceptable offer among the client's extension list elements and
/// returns the agreed parameters with the response header value. Offers that cannot be honoured are
/// skipped; if none can, the extension is simply not used.
pub fn negotiate_server(offers: &[String], config: &DeflateConfig) -> Option<(DeflateParams, String)> {
    let config = &config.within_limits();
    // The first offer that parses is the one we take: every valid offer can be honoured.
    offers
        .iter()
        .filter_map(|offer| parse_element(offer))
        .map(|offer| {
            let server_max_window_bits = match offer.server_max_window_bits {
                Some(requested) => requested.min(config.server_max_window_bits),
                None => config.server_max_window_bits,
            };
            // We may only limit the client's window if it said it can honour a limit.
            let client_max_window_bits = match offer.client_max_window_bits {
                Some(Some(offered)) => offered.min(config.client_max_window_bits),
                Some(None) => config.client_max_window_bits,
                None => 15,
            };
            let params = DeflateParams {
                server_no_context_takeover: offer.server_no_context_takeover || config.server_no_context_takeover,
                client_no_context_takeover: offer.client_no_context_takeover || config.client_no_context_takeover,
                server_max_window_bits,
                client_max_window_bits,
            };
            // An offer with a client window value is answered with one even at 15 (it asked).
            let mut header = params.header_value(offer.client_max_window_bits.is_some());
            if matches!(offer.client_max_window_bits, Some(Some(_))) && client_max_window_bits == 15 {
                header.push_str("; client_max_window_bits=15");
            }
            (params, header)
        })
        .next()
}

/// Client side: the offer to send.
pub fn client_offer(config: &DeflateConfig) -> String {
    let config = &config.within_limits();
    let mut offer = String::from("permessage-deflate");
    if config.server_no_context_takeover {
        offer.push_str("; server_no_context_takeover");
    }
    if config.client_no_context_takeover {
        offer.push_str("; client_no_context_takeover");
    }
    if config.server_max_window_bits < 15 {
        offer.push_str(&format!("; server_max_window_bits={}", config.server_max_window_bits));
    }
    // Always say we can limit our window, so the server may ask us to.
    if config.client_max_window_bits < 15 {
        offer.push_str(&format!("; client_max_window_bits={}", config.client_max_window_bits));
    } else {
        offer.push_str("; client_max_window_bits");
    }
    offer
}

/// Why a server's permessage-deflate response is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid permessage-deflate response {0:?}")]
pub struct InvalidResponse(pub String);

/// Client side: checks the server's response against our offer; returns the agreed parameters.
pub fn accept_response(response: &str, config: &DeflateConfig) -> Result<DeflateParams, InvalidResponse> {
    let config = &config.within_limits();
    let bad = || InvalidResponse(response.to_owned());
    let mut elements = response.split(',').map(str::trim).filter(|e| !e.is_empty());
    let params = elements.next().and_then(parse_element).ok_or_else(bad)?;
    if elements.next().is_some() {
        return Err(bad()); // we offered one extension
    }
    if config.server_no_context_takeover && !params.server_no_context_takeover {
        return Err(bad());
    }
    let server_max_window_bits = params.server_max_window_bits.unwrap_or(15);
    if server_max_window_bits > config.server_max_window_bits {
        return Err(bad());
    }
    let client_max_window_bits = match params.client_max_window_bits {
        Some(Some(bits)) if bits <= config.client_max_window_bits => bits,
        Some(_) => return Err(bad()),
        None => config.client_max_window_bits,
    };
    Ok(DeflateParams {
        server_no_context_takeover: params.server_no_context_takeover,
        client_no_context_takeover: params.client_no_context_takeover || config.client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
    })
}

// ------------------------------------------------------------------------------------------------
// Compression

/// Why deflate data could not be inflated (close 1007), or the result grew past the limit (1009).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflateError {
    Corrupt,
    TooLarge,
    /// Raised by the caller's sink: the inflated text is not UTF-8.
    InvalidUtf8,
}

/// The sending side's compressor, created on first use.
pub(crate) struct Compressor {
    stream: Option<Deflate>,
    window_bits: u8,
    level: u8,
    mem_level: u8,
    reset_each_message: bool,
    chunk: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("window_bits", &self.window_bits)
            .field("allocated", &self.stream.is_some())
            .finish()
    }
}

impl Compressor {
    pub(crate) fn new(window_bits: u8, level: u8, mem_level: u8, reset_each_message: bool) -> Self {
        Self {
            stream: None,
            // Parameters set by hand, not negotiated, may be anything.
            window_bits: window_bits_within_limits(window_bits),
            level: level.min(9),
            mem_level: mem_level.clamp(1, 9),
            reset_each_message,
            chunk: Vec::new(),
        }
    }

    /// Compresses one message into `out` (appended), without the sync-flush tail.
    pub(crate) fn compress(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        let (window_bits, level, mem_level) = (self.window_bits, self.level, self.mem_level);
        let stream = self.stream.get_or_insert_with(|| {
            let (window_bits, strategy) = match window_bits {
                // See the module docs: RLE output is valid for an 8-bit window.
                8 => (9, Strategy::Rle),
                bits => (bits, Strategy::Default),
            };
            Deflate::new_with_config(ZDeflateConfig {
                level: level as i32,
                method: Method::Deflated,
                window_bits: -(window_bits as i32),
                mem_level: mem_level as i32,
                strategy,
            })
        });
        if self.chunk.len() < CHUNK {
            self.chunk.resize(CHUNK, 0);
        }
        let start = out.len();
        loop {
            let before_in = stream.total_in();
            let before_out = stream.total_out();
            let status = stream.compress(input, &mut self.chunk, DeflateFlush::SyncFlush);
            let consumed = (stream.total_in() - before_in) as usize;
            let produced = (stream.total_out() - before_out) as usize;
            out.extend_from_slice(&self.chunk[..produced]);
            input = &input[consumed..];
            match status {
                // Done once all input is in and the flush fit in the chunk.
                Ok(Status::Ok) if input.is_empty() && produced < self.chunk.len() => break,
                Ok(Status::Ok) => {}
                Ok(Status::BufError) if consumed == 0 && produced == 0 => break,
                Ok(_) => {}
                // A stream error here means our own state is broken, not the peer's data.
                Err(error) => panic!("deflate failed on valid input: {error:?}"),
            }
        }
        if out.len() - start >= 4 && out[out.len() - 4..] == SYNC_TAIL {
            out.truncate(out.len() - 4);
        }
        if out.len() == start {
            // Nothing to flush (an empty message after a previous flush): RFC 7692 §7.2.3.6 spells an
            // empty compressed message as one 0x00 byte, so the receiver's tail has a block header.
            out.push(0x00);
        }
        if self.reset_each_message {
            if let Some(stream) = &mut self.stream {
                stream.reset();
            }
        }
    }

    /// Frees the zlib state when no context carries over between messages.
    pub(crate) fn release(&mut self) {
        if self.reset_each_message {
            self.stream = None;
            self.chunk = Vec::new();
        }
    }
}

/// The receiving side's decompressor, created on first use.
pub(crate) struct Decompressor {
    stream: Option<Inflate>,
    window_bits: u8,
    reset_each_message: bool,
    chunk: Vec<u8>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decompressor")
            .field("window_bits", &self.window_bits)
            .field("allocated", &self.stream.is_some())
            .finish()
    }
}

impl Decompressor {
    pub(crate) fn new(window_bits: u8, reset_each_message: bool) -> Self {
        // At least 9: zlib inflates no raw stream with an 8-bit window, and 9 bits decode anything
        // compressed for 8 (CONFORMANCE.md, "8-bit windows").
        let window_bits = window_bits_within_limits(window_bits).max(9);
        Self { stream: None, window_bits, reset_each_message, chunk: Vec::new() }
    }

    /// Inflates `input` (a frame's payload, or the sync tail at the end of a message), handing the
    /// output to `sink` in chunks. `room` is how many more output bytes the message may grow by;
    /// inflating stops with `TooLarge` as soon as it is exceeded, before the memory is spent.
    pub(crate) fn decompress(
        &mut self,
        mut input: &[u8],
        mut room: usize,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), InflateError>,
    ) -> Result<(), InflateError> {
        let window_bits = self.window_bits;
        let stream = self.stream.get_or_insert_with(|| Inflate::new(false, window_bits));
        if self.chunk.len() < CHUNK {
            self.chunk.resize(CHUNK, 0);
        }
        loop {
            let before_in = stream.total_in();
            let before_out = stream.total_out();
            // Never ask for more output than the limit leaves room for, plus one byte to detect it.
            let window = self.chunk.len().min(room.saturating_add(1));
            let status = stream
                .decompress(input, &mut self.chunk[..window], InflateFlush::SyncFlush)
                .map_err(|_| InflateError::Corrupt)?;
            let consumed = (stream.total_in() - before_in) as usize;
            let produced = (stream.total_out() - before_out) as usize;
            input = &input[consumed..];
            if produced > room {
                return Err(InflateError::TooLarge);
            }
            room -= produced;
            if produced > 0 {
                sink(&self.chunk[..produced])?;
            }
            match status {
                Status::StreamEnd => {
                    // The peer ended its deflate stream (a final block): the next message starts a
                    // new one. Anything after the final block in this payload is invalid.
                    stream.reset(false);
                    if !input.is_empty() {
                        return Err(InflateError::Corrupt);
                    }
                    return Ok(());
                }
                Status::Ok | Status::BufError => {
                    if input.is_empty() && produced < window {
                        return Ok(());
                    }
                    if consumed == 0 && produced == 0 {
                        return Err(InflateError::Corrupt);
                    }
                }
            }
        }
    }

    /// Called at the end of each message.
    pub(crate) fn end_message(&mut self) {
        if self.reset_each_message {
            if let Some(stream) = &mut self.stream {
                stream.reset(false);
            }
        }
    }

    pub(crate) fn release(&mut self) {
        if self.reset_each_message {
            self.stream = None;
            self.chunk = Vec::new();
        }
    }
}

/// The sync tail, to be inflated after the last frame of a compressed message.
pub(crate) const fn sync_tail() -> &'static [u8] {
    &SYNC_TAIL
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(s: &str) -> Vec<String> {
        s.split(',').map(|t| t.trim().to_owned()).collect()
    }

    #[test]
    fn window_sizes_outside_8_to_15_bits_are_taken_as_the_nearest() {
        for (configured, used) in [(16, 15), (255, 15), (7, 8), (0, 8)] {
            let config = DeflateConfig {
                server_max_window_bits: configured,
                client_max_window_bits: configured,
                ..Default::default()
            };
            let offer = client_offer(&config);
            let (params, header) = negotiate_server(&offers(&offer), &config).unwrap();
            assert_eq!((params.server_max_window_bits, params.client_max_window_bits), (used, used), "{configured}");
            assert_eq!(accept_response(&header, &config), Ok(params), "{header}");
            // Both ends compress and inflate with what was agreed (zlib refused 16 bits with a panic).
            let mut server = crate::Connection::new(crate::Role::Server, Default::default());
            let mut client = crate::Connection::new(crate::Role::Client, Default::default());
            server.enable_deflate(params, &config);
            client.enable_deflate(params, &config);
            let text = "compressible ".repeat(100);
            server.send(crate::Message::text(text.clone())).unwrap();
            client.receive_data(&server.take_output());
            assert_eq!(client.next_message().unwrap(), Some(crate::Message::text(text)));
        }
    }

    #[test]
    fn plain_offer_is_accepted_with_defaults() {
        let (params, header) = negotiate_server(&offers("permessage-deflate"), &DeflateConfig::default()).unwrap();
        assert_eq!(header, "permessage-deflate");
        assert_eq!((params.server_max_window_bits, params.client_max_window_bits), (15, 15));
    }

    #[test]
    fn every_parameter_is_negotiated() {
        let offer = offers("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=9");
        let (params, header) = negotiate_server(&offer, &DeflateConfig::default()).unwrap();
        assert_eq!(
            params,
            DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: 10,
                client_max_window_bits: 9
            }
        );
        assert_eq!(header, "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=9");
    }

    #[test]
    fn bare_client_window_lets_the_server_limit_it() {
        let config = DeflateConfig { client_max_window_bits: 8, server_max_window_bits: 8, ..DeflateConfig::default() };
        let (params, header) =
            negotiate_server(&offers("permessage-deflate; client_max_window_bits"), &config).unwrap();
        assert_eq!((params.server_max_window_bits, params.client_max_window_bits), (8, 8));
        assert_eq!(header, "permessage-deflate; server_max_window_bits=8; client_max_window_bits=8");
        // Without the client's parameter the server may not limit the client's window.
        let (params, header) = negotiate_server(&offers("permessage-deflate"), &config).unwrap();
        assert_eq!(params.client_max_window_bits, 15);
        assert!(!header.contains("client_max_window_bits"));
    }

    #[test]
    fn bad_offers_are_skipped_not_fatal() {
        for bad in [
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_param",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(negotiate_server(&offers(bad), &DeflateConfig::default()), None, "{bad}");
        }
        // The second, valid offer of a list is taken.
        let (params, _) = negotiate_server(
            &offers("permessage-deflate; server_max_window_bits=99, permessage-deflate; server_max_window_bits=12"),
            &DeflateConfig::default(),
        )
        .unwrap();
        assert_eq!(params.server_max_window_bits, 12);
        // Quoted values are allowed.
        let (params, _) =
            negotiate_server(&offers("permessage-deflate; client_max_window_bits=\"10\""), &DeflateConfig::default())
                .unwrap();
        assert_eq!(params.client_max_window_bits, 10);
    }

    #[test]
    fn client_offer_and_response_checks() {
        let config =
            DeflateConfig { server_max_window_bits: 10, server_no_context_takeover: true, ..DeflateConfig::default() };
        let offer = client_offer(&config);
        assert_eq!(
            offer,
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits"
        );
        let (server_params, response) = negotiate_server(&offers(&offer), &DeflateConfig::default()).unwrap();
        assert_eq!(accept_response(&response, &config).unwrap(), server_params);
        // The server may not raise the window we asked for, nor drop the no-context-takeover we asked for.
        assert!(accept_response("permessage-deflate; server_no_context_takeover; server_max_window_bits=12", &config)
            .is_err());
        assert!(accept_response("permessage-deflate; server_max_window_bits=10", &config).is_err());
        assert!(accept_response("permessage-deflate; server_no_context_takeover, permessage-deflate", &config).is_err());
        assert!(
            accept_response("permessage-deflate; server_no_context_takeover; client_max_window_bits", &config).is_err()
        );
    }

    fn round_trip(window_bits: u8, messages: &[Vec<u8>], reset: bool) {
        let mut compressor = Compressor::new(window_bits, 6, 8, reset);
        let mut decompressor = Decompressor::new(window_bits, reset);
        for message in messages {
            let mut wire = Vec::new();
            compressor.compress(message, &mut wire);
            let mut out = Vec::new();
            let mut sink = |chunk: &[u8]| {
                out.extend_from_slice(chunk);
                Ok(())
            };
            decompressor.decompress(&wire, usize::MAX, &mut sink).unwrap();
            decompressor.decompress(sync_tail(), usize::MAX, &mut sink).unwrap();
            decompressor.end_message();
            assert_eq!(&out, message, "window {window_bits}");
        }
    }

    #[test]
    fn round_trips_at_every_window_size_with_and_without_context() {
        let text: Vec<u8> = br#"{"name":"alice","message":"hello world","time":"12:00:00"}"#.repeat(300);
        let noise: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let messages = vec![text.clone(), Vec::new(), noise, text];
        for bits in 8..=15 {
            round_trip(bits, &messages, false);
            round_trip(bits, &messages, true);
        }
    }

    #[test]
    fn eight_bit_window_output_only_references_one_byte_back() {
        // Inflating with a strict 8-bit window would reject longer distances; zlib-rs accepts an
        // 8-bit raw inflate window, so use it as the judge.
        let data = b"abcabcabcabc the quick brown fox jumps over the lazy dog; abcabcabc".repeat(50);
        let mut compressor = Compressor::new(8, 9, 8, false);
        let mut wire = Vec::new();
        compressor.compress(&data, &mut wire);
        wire.extend_from_slice(&SYNC_TAIL);
        let mut strict = Inflate::new(false, 8);
        let mut out = vec![0u8; data.len() + 100];
        strict.decompress(&wire, &mut out, InflateFlush::SyncFlush).unwrap();
        assert_eq!(&out[..strict.total_out() as usize], &data[..]);
        assert!(
            wire.len() < data.len(),
            "RLE still compresses runs and entropy-codes: {} vs {}",
            wire.len(),
            data.len()
        );
    }

    #[test]
    fn zip_bomb_stops_at_the_limit() {
        let bomb = vec![0u8; 50 << 20];
        let mut compressor = Compressor::new(15, 9, 9, false);
        let mut wire = Vec::new();
        compressor.compress(&bomb, &mut wire);
        assert!(wire.len() < 100_000, "50 MiB of zeros compresses to {} bytes", wire.len());
        let mut decompressor = Decompressor::new(15, false);
        let mut received = 0usize;
        let mut sink = |chunk: &[u8]| {
            received += chunk.len();
            Ok(())
        };
        assert_eq!(decompressor.decompress(&wire, 1 << 20, &mut sink), Err(InflateError::TooLarge));
        assert!(received <= 1 << 20, "only the allowed bytes were produced: {received}");
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        let mut decompressor = Decompressor::new(15, false);
        let mut sink = |_: &[u8]| Ok(());
        assert_eq!(
            decompressor.decompress(&[0xff, 0xff, 0xff, 0xff, 0x00], 1 << 20, &mut sink),
            Err(InflateError::Corrupt)
        );
    }
}
