//! The connection state machine: bytes in, messages out, bytes to send.
//!
//! One [`Connection`] per WebSocket, after the handshake. The caller appends received bytes to
//! [`Connection::receive_buffer`] (or passes them to [`Connection::receive_data`]), pulls messages with
//! [`Connection::next_message`], queues outgoing messages with [`Connection::send`], and writes out
//! what [`Connection::output_slices`] shows, reporting progress with [`Connection::consume_output`].
//!
//! Payloads are unmasked and UTF-8-checked in place as bytes arrive, so a bad frame fails as soon as
//! its bad byte is seen and a good one is handed out as a slice of the receive buffer, never copied
//! (fragmented messages are the exception: their pieces are joined). Size limits are checked against
//! the frame header, before the payload is buffered.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::close::{parse_close_payload, CloseCode, CloseFrame, ClosePayloadError};
use crate::deflate::{self, Compressor, Decompressor, DeflateConfig, DeflateParams, InflateError};
use crate::frame::{FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
use crate::mask::apply_mask;
use crate::message::{Message, Utf8Bytes};
use crate::random::MaskKeys;
use crate::utf8::{InvalidUtf8, Utf8Validator};

/// Which end of the connection this engine is. Clients mask what they send; servers require it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts masked frames and sends unmasked ones.
    Server,
    /// Masks what it sends and refuses masked frames.
    Client,
}

/// Limits and behaviour of one connection. The defaults suit a public server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest frame payload accepted; a larger header fails with 1009 before any payload is read.
    pub max_frame_size: usize,
    /// Largest message accepted, summed over its fragments; checked at each fragment header (1009).
    pub max_message_size: usize,
    /// Answer pings with pongs automatically.
    pub auto_pong: bool,
    /// Server payloads at least this large are queued by reference and written with vectored I/O
    /// instead of being copied into the output buffer.
    pub zero_copy_threshold: usize,
    /// Fixed client masking key; `None` (the default and the only safe choice) draws fresh random keys.
    pub fixed_mask_key: Option<[u8; 4]>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_frame_size: 16 << 20,
            max_message_size: 16 << 20,
            auto_pong: true,
            zero_copy_threshold: 4096,
            fixed_mask_key: None,
        }
    }
}

/// Why the engine failed the connection. A close frame with [`ProtocolError::close_code`] has been
/// queued; after flushing it the caller should close the transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame header itself is invalid.
    #[error("invalid frame header: {0}")]
    Header(#[from] crate::frame::HeaderError),
    /// An RSV bit is set that no negotiated extension defines.
    #[error("reserved bits set where no negotiated extension allows them (RSV1: permessage-deflate, on a message's first frame)")]
    ReservedBits,
    /// A server received an unmasked frame.
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// A client received a masked frame.
    #[error("server frame is masked")]
    MaskedFrame,
    /// A continuation frame arrived with no fragmented message to continue.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new text or binary frame arrived in the middle of a fragmented message.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// A frame header announced more than [`Config::max_frame_size`].
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    FrameTooLarge {
        /// The announced payload length.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// A message's fragments added up to more than [`Config::max_message_size`].
    #[error("message of at least {size} bytes exceeds the limit of {limit}")]
    MessageTooLarge {
        /// The size reached when the limit was crossed.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// A text message (or a fragment of one so far) is not UTF-8.
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A close payload of one byte, or with a code that may not be sent.
    #[error("malformed close frame (one byte, or a code that may not be sent)")]
    InvalidClosePayload,
    /// A close reason that is not UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
    /// A compressed message that does not inflate.
    #[error("compressed message does not inflate")]
    InvalidCompressedData,
}

impl ProtocolError {
    /// The close code sent to the peer for this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::FrameTooLarge { .. } | Self::MessageTooLarge { .. } => CloseCode::MESSAGE_TOO_BIG,
            Self::InvalidUtf8 | Self::InvalidCloseReason | Self::InvalidCompressedData => CloseCode::INVALID_PAYLOAD,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// Why a message could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// A close frame was already sent; nothing may follow it.
    #[error("a close frame was already sent; no more frames may follow it")]
    Closed,
    /// A ping, pong or close payload is over 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(usize),
    /// The close code may not be sent (see [`CloseCode::is_sendable`]).
    #[error("close code {0} may not be sent")]
    InvalidCloseCode(u16),
    /// A whole message was sent while a fragmented one is unfinished.
    #[error("a fragmented message is in progress; finish it first")]
    FragmentInProgress,
    /// A continuation fragment was sent without a first fragment.
    #[error("no fragmented message is in progress")]
    NoFragmentInProgress,
}

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseState {
    /// No close frame sent or received yet.
    Open,
    /// We sent a close frame and wait for the peer's.
    CloseSent,
    /// Both close frames have crossed (or the connection failed): no more frames either way.
    Closed,
}

/// A frame whose header has been read and whose payload is arriving.
#[derive(Debug, Clone, Copy)]
struct InFrame {
    header: FrameHeader,
    len: usize,
    /// Payload bytes at the front of the receive buffer already unmasked and validated.
    processed: usize,
    /// Validate the raw payload as UTF-8 as it arrives (uncompressed text only).
    is_text: bool,
    /// Part of a permessage-deflate message: inflate when complete.
    compressed: bool,
}

/// A fragmented data message being joined.
#[derive(Debug)]
struct Assembly {
    is_text: bool,
    compressed: bool,
    /// The message so far (inflated, when compressed).
    data: BytesMut,
}

/// The queue of bytes to send: frames encoded into `tail`, large server payloads held by reference.
#[derive(Debug, Default)]
struct Output {
    /// Finished chunks, in order, before `tail`.
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl Output {
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
    }

    #[inline]
    fn consume(&mut self, n: usize) {
        assert!(n <= self.len, "consumed {n} bytes but only {} are pending", self.len);
        self.len -= n;
        if self.len == 0 && self.chunks.is_empty() {
            // All written: the buffer starts over from its beginning instead of moving along its
            // allocation, so it never needs rewinding by `reserve`.
            self.tail.clear();
            return;
        }
        self.consume_partly(n);
    }

    /// [`Output::consume`] when something is left: walks the chunks.
    fn consume_partly(&mut self, mut n: usize) {
        while n > 0 {
            match self.chunks.front_mut() {
                Some(chunk) if chunk.len() <= n => {
                    n -= chunk.len();
                    self.chunks.pop_front();
                }
                Some(chunk) => {
                    chunk.advance(n);
                    n = 0;
                }
                None => {
                    self.tail.advance(n);
                    n = 0;
                }
            }
        }
    }
}

/// One WebSocket connection's protocol state.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    config: Config,
    recv: BytesMut,
    frame: Option<InFrame>,
    /// Boxed: only a fragmented message in progress needs it.
    assembly: Option<Box<Assembly>>,
    utf8: Utf8Validator,
    out: Output,
    /// Bytes of replies the engine queued on its own (pongs, close replies) since the last of them
    /// was written, so at least as many as are unsent: a count kept apart from what the caller
    /// queued, so a transport can bound what a peer that pings without reading makes us hold, without
    /// also holding up reads behind the caller's own large messages. Saturating `u32`s here fit in
    /// padding, where `usize`s would make every idle connection larger.
    replies: u32,
    /// Pending bytes up to the end of the last of those replies: once they are written, no reply is
    /// left, even while the caller's output never drains.
    replies_end: u32,
    mask_keys: MaskKeys,
    close_sent: bool,
    close_received: bool,
    failed: bool,
    /// An outgoing fragmented message is in progress (frames sent with `fin == false`).
    sending_fragments: bool,
    /// permessage-deflate, when negotiated. Boxed: most connections never use it, and every byte of
    /// `Connection` is held by every idle connection.
    deflate: Option<Box<DeflateState>>,
}

#[derive(Debug)]
struct DeflateState {
    compressor: Compressor,
    decompressor: Decompressor,
    /// Messages shorter than this are sent uncompressed.
    threshold: usize,
    /// Reused buffer for compressed output.
    compressed: Vec<u8>,
    params: DeflateParams,
}

impl Connection {
    /// An engine for one connection, in the given role, with nothing received or sent yet.
    pub fn new(role: Role, config: Config) -> Self {
        let mask_keys = match config.fixed_mask_key {
            Some(key) => MaskKeys::Fixed(key),
            None => MaskKeys::random(),
        };
        Self {
            role,
            config,
            recv: BytesMut::new(),
            frame: None,
            assembly: None,
            utf8: Utf8Validator::new(),
            out: Output::default(),
            replies: 0,
            replies_end: 0,
            mask_keys,
            close_sent: false,
            close_received: false,
            failed: false,
            sending_fragments: false,
            deflate: None,
        }
    }

    /// Turns on permessage-deflate with the negotiated `params`; `config` supplies the local choices
    /// (level, memory level, threshold). Call right after the handshake, before any frame.
    pub fn enable_deflate(&mut self, params: DeflateParams, config: &DeflateConfig) {
        let (send_bits, send_reset, recv_bits, recv_reset) = match self.role {
            Role::Server => (
                params.server_max_window_bits,
                params.server_no_context_takeover,
                params.client_max_window_bits,
                params.client_no_context_takeover,
            ),
            Role::Client => (
                params.client_max_window_bits,
                params.client_no_context_takeover,
                params.server_max_window_bits,
                params.server_no_context_takeover,
            ),
        };
        self.deflate = Some(Box::new(DeflateState {
            compressor: Compressor::new(send_bits, config.level, config.mem_level, send_reset),
            decompressor: Decompressor::new(recv_bits, recv_reset),
            threshold: config.threshold,
            compressed: Vec::new(),
            params,
        }));
    }

    /// The negotiated permessage-deflate parameters, if the extension is on.
    pub fn deflate_params(&self) -> Option<DeflateParams> {
        self.deflate.as_ref().map(|deflate| deflate.params)
    }

    /// Which end this engine is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The limits it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    // --------------------------------------------------------------------------------------------
    // Receiving

    /// Appends received bytes.
    pub fn receive_data(&mut self, data: &[u8]) {
        if !self.failed {
            self.recv.extend_from_slice(data);
        }
    }

    /// The receive buffer, for reading from a socket straight into it. Append only.
    #[inline]
    pub fn receive_buffer(&mut self) -> &mut BytesMut {
        &mut self.recv
    }

    /// Bytes received but not yet turned into messages.
    pub fn buffered_input(&self) -> usize {
        self.recv.len()
    }

    /// How many more bytes the frame being received needs (0 between frames): a hint for sizing the
    /// next read, so a large frame arrives in one read instead of many. Trusting it blindly would let
    /// a header make the reader allocate up to `max_frame_size` before any payload arrives: cap it.
    #[inline]
    pub fn frame_bytes_missing(&self) -> usize {
        self.frame.map_or(0, |frame| frame.len.saturating_sub(self.recv.len()))
    }

    /// The next complete message, `Ok(None)` when more input is needed (or nothing more will come).
    ///
    /// An `Err` fails the connection: a close frame with the error's code is queued, further input is
    /// ignored, and every later call returns `Ok(None)`.
    #[inline]
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        // Nothing buffered means nothing to parse: a frame in progress always waits for payload bytes
        // (an empty payload completes in the call that read its header). Checked inline because every
        // read ends with this call, and the parser is too large to be cheap to enter.
        if self.failed || self.recv.is_empty() {
            return Ok(None);
        }
        self.parse_next()
    }

    fn parse_next(&mut self) -> Result<Option<Message>, ProtocolError> {
        let result = match self.whole_data_frame() {
            Some(result) => result.map(Some),
            None => self.advance(),
        };
        match result {
            Ok(message) => Ok(message),
            Err(error) => {
                self.fail(&error);
                Err(error)
            }
        }
    }

    /// The usual frame in one pass: a whole unfragmented, uncompressed text or binary frame of up to
    /// 64 KiB at the front of the buffer, with nothing else in progress. `None` sends everything else
    /// (other frames, partial frames, and any frame the general parser would reject except for its
    /// UTF-8) to [`Connection::advance`], which gives the same result for these frames: the
    /// `any_split_gives_the_same_events` tests compare the two, since a split frame never takes this way.
    #[inline]
    fn whole_data_frame(&mut self) -> Option<Result<Message, ProtocolError>> {
        if self.frame.is_some() || self.assembly.is_some() || self.close_received {
            return None;
        }
        let buf = &self.recv[..];
        let (&b0, &b1) = (buf.first()?, buf.get(1)?);
        // FIN, no reserved bits (so not compressed), opcode 1 or 2.
        let is_text = match b0 {
            0x81 => true,
            0x82 => false,
            _ => return None,
        };
        let masked = b1 & 0x80 != 0;
        if masked != (self.role == Role::Server) {
            return None;
        }
        let (len, mut header_len) = match b1 & 0x7f {
            127 => return None,
            126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
            short => (short as usize, 2),
        };
        let key = if masked {
            let key: [u8; 4] = buf.get(header_len..header_len + 4)?.try_into().expect("4 bytes");
            header_len += 4;
            Some(key)
        } else {
            None
        };
        if buf.len() < header_len + len || len > self.config.max_frame_size || len > self.config.max_message_size {
            return None;
        }
        let payload = &mut self.recv[header_len..header_len + len];
        if let Some(key) = key {
            apply_mask(payload, key, 0);
        }
        if is_text && crate::utf8::validate(payload).is_err() {
            return Some(Err(ProtocolError::InvalidUtf8));
        }
        // One split for header and payload, then the header is skipped in the frozen `Bytes`, where
        // advancing is a pointer bump.
        let mut payload = self.recv.split_to(header_len + len).freeze();
        payload.advance(header_len);
        Some(Ok(if is_text { Message::Text(Utf8Bytes::from_validated(payload)) } else { Message::Binary(payload) }))
    }

    fn advance(&mut self) -> Result<Option<Message>, ProtocolError> {
        loop {
            if self.close_received {
                // Nothing after the peer's close frame is part of the conversation.
                self.recv.clear();
                return Ok(None);
            }
            let frame = match self.frame {
                Some(frame) => frame,
                None => match FrameHeader::decode(&self.recv)? {
                    None => return Ok(None),
                    Some((header, header_len)) => {
                        let frame = self.check_header(header)?;
                        self.recv.advance(header_len);
                        self.frame = Some(frame);
                        frame
                    }
                },
            };
            let available = self.recv.len().min(frame.len);
            if available > frame.processed {
                let fresh = &mut self.recv[frame.processed..available];
                if let Some(key) = frame.header.mask {
                    apply_mask(fresh, key, frame.processed);
                }
                if frame.is_text && self.utf8.feed(fresh).is_err() {
                    return Err(ProtocolError::InvalidUtf8);
                }
                self.frame = Some(InFrame { processed: available, ..frame });
            }
            if available < frame.len {
                return Ok(None);
            }
            self.frame = None;
            let payload = self.recv.split_to(frame.len).freeze();
            if let Some(message) = self.complete_frame(frame, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Checks a header against the connection's state and limits, before any payload is read.
    fn check_header(&mut self, header: FrameHeader) -> Result<InFrame, ProtocolError> {
        // RSV1 marks a compressed message: only with permessage-deflate, only on its first frame.
        let rsv1 = header.rsv & 0b100 != 0;
        let rsv1_allowed = self.deflate.is_some() && matches!(header.opcode, OpCode::Text | OpCode::Binary);
        if header.rsv & 0b011 != 0 || (rsv1 && !rsv1_allowed) {
            return Err(ProtocolError::ReservedBits);
        }
        match (self.role, header.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        let limit = self.config.max_frame_size;
        if header.payload_len > limit as u64 {
            return Err(ProtocolError::FrameTooLarge { size: header.payload_len, limit });
        }
        let len = header.payload_len as usize;
        // A compressed message's size is checked while inflating, against the inflated bytes.
        let (is_text, compressed) = match header.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.assembly.is_some() {
                    return Err(ProtocolError::ExpectedContinuation);
                }
                if !rsv1 {
                    self.check_message_size(len)?;
                }
                let is_text = header.opcode == OpCode::Text;
                if is_text {
                    self.utf8.reset();
                }
                (is_text, rsv1)
            }
            OpCode::Continuation => match &self.assembly {
                None => return Err(ProtocolError::UnexpectedContinuation),
                Some(assembly) => {
                    if !assembly.compressed {
                        self.check_message_size(assembly.data.len() + len)?;
                    }
                    (assembly.is_text, assembly.compressed)
                }
            },
            OpCode::Close | OpCode::Ping | OpCode::Pong => (false, false),
        };
        Ok(InFrame { header, len, processed: 0, is_text: is_text && !compressed, compressed })
    }

    fn check_message_size(&self, size: usize) -> Result<(), ProtocolError> {
        let limit = self.config.max_message_size;
        if size > limit {
            return Err(ProtocolError::MessageTooLarge { size: size as u64, limit });
        }
        Ok(())
    }

    fn complete_frame(&mut self, frame: InFrame, payload: Bytes) -> Result<Option<Message>, ProtocolError> {
        let fin = frame.header.fin;
        match frame.header.opcode {
            OpCode::Text | OpCode::Binary if !frame.compressed && fin => {
                Ok(Some(self.finish_message(frame.is_text, payload)?))
            }
            OpCode::Text | OpCode::Binary => {
                let is_text = frame.header.opcode == OpCode::Text;
                let mut assembly = Box::new(Assembly { is_text, compressed: frame.compressed, data: BytesMut::new() });
                if frame.compressed {
                    self.inflate(&payload, &mut assembly)?;
                } else {
                    assembly.data = BytesMut::with_capacity(payload.len().max(1024));
                    assembly.data.extend_from_slice(&payload);
                }
                self.assembly = Some(assembly);
                if fin {
                    return self.finish_assembly().map(Some);
                }
                Ok(None)
            }
            OpCode::Continuation => {
                let mut assembly = self.assembly.take().expect("checked in check_header");
                if assembly.compressed {
                    self.inflate(&payload, &mut assembly)?;
                } else {
                    assembly.data.extend_from_slice(&payload);
                }
                self.assembly = Some(assembly);
                if !fin {
                    return Ok(None);
                }
                self.finish_assembly().map(Some)
            }
            OpCode::Ping => {
                if self.config.auto_pong && !self.close_sent {
                    self.queue_reply(OpCode::Pong, &payload);
                }
                Ok(Some(Message::Ping(payload)))
            }
            OpCode::Pong => Ok(Some(Message::Pong(payload))),
            OpCode::Close => {
                let close = parse_close_payload(&payload).map_err(|e| match e {
                    ClosePayloadError::Malformed => ProtocolError::InvalidClosePayload,
                    ClosePayloadError::InvalidReason => ProtocolError::InvalidCloseReason,
                })?;
                self.close_received = true;
                if !self.close_sent {
                    // Echo the peer's code (RFC 6455 §5.5.1); an empty close is answered empty.
                    let echo = close.as_ref().map(|c| CloseFrame::new(c.code, "").encode()).unwrap_or_default();
                    self.queue_reply(OpCode::Close, &echo);
                    self.close_sent = true;
                }
                Ok(Some(Message::Close(close)))
            }
        }
    }

    /// Inflates one frame's payload onto the message, checking size and (for text) UTF-8 as it grows.
    fn inflate(&mut self, input: &[u8], assembly: &mut Assembly) -> Result<(), ProtocolError> {
        let limit = self.config.max_message_size;
        let room = limit.saturating_sub(assembly.data.len());
        let decompressor = &mut self.deflate.as_mut().expect("RSV1 accepted only with deflate").decompressor;
        let utf8 = &mut self.utf8;
        let data = &mut assembly.data;
        let is_text = assembly.is_text;
        let mut sink = |chunk: &[u8]| {
            if is_text {
                utf8.feed(chunk).map_err(|InvalidUtf8| InflateError::InvalidUtf8)?;
            }
            data.extend_from_slice(chunk);
            Ok(())
        };
        decompressor.decompress(input, room, &mut sink).map_err(|e| match e {
            InflateError::Corrupt => ProtocolError::InvalidCompressedData,
            InflateError::InvalidUtf8 => ProtocolError::InvalidUtf8,
            InflateError::TooLarge => ProtocolError::MessageTooLarge { size: limit as u64 + 1, limit },
        })
    }

    fn finish_assembly(&mut self) -> Result<Message, ProtocolError> {
        let mut assembly = self.assembly.take().expect("a message in progress");
        if assembly.compressed {
            self.inflate(deflate::sync_tail(), &mut assembly)?;
            self.deflate.as_mut().expect("deflate on").decompressor.end_message();
        }
        self.finish_message(assembly.is_text, assembly.data.freeze())
    }

    fn finish_message(&mut self, is_text: bool, payload: Bytes) -> Result<Message, ProtocolError> {
        if !is_text {
            return Ok(Message::Binary(payload));
        }
        if !self.utf8.is_complete() {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(Message::Text(Utf8Bytes::from_validated(payload)))
    }

    fn fail(&mut self, error: &ProtocolError) {
        self.failed = true;
        self.frame = None;
        self.assembly = None;
        self.recv = BytesMut::new();
        if !self.close_sent {
            let payload = CloseFrame::new(error.close_code(), error.to_string()).encode();
            self.queue_reply(OpCode::Close, &payload);
            self.close_sent = true;
        }
    }

    // --------------------------------------------------------------------------------------------
    // Sending

    /// Queues a message. `Close` starts the close handshake; `Ping`/`Pong` payloads must be ≤125 bytes.
    #[inline]
    pub fn send(&mut self, message: Message) -> Result<(), SendError> {
        match message {
            Message::Text(text) => self.send_data(OpCode::Text, text.into_bytes()),
            Message::Binary(data) => self.send_data(OpCode::Binary, data),
            Message::Ping(data) => self.send_control(OpCode::Ping, &data),
            Message::Pong(data) => self.send_control(OpCode::Pong, &data),
            Message::Close(frame) => self.close(frame),
        }
    }

    /// Queues a text message from a borrowed string (copied into the output buffer).
    pub fn send_text(&mut self, text: &str) -> Result<(), SendError> {
        self.check_can_send_data()?;
        self.queue_message(OpCode::Text, text.as_bytes());
        Ok(())
    }

    /// Queues a binary message from a borrowed slice (copied into the output buffer).
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), SendError> {
        self.check_can_send_data()?;
        self.queue_message(OpCode::Binary, data);
        Ok(())
    }

    /// Queues a whole message as one frame, compressed when deflate is on and it is long enough.
    fn queue_message(&mut self, opcode: OpCode, payload: &[u8]) {
        match &mut self.deflate {
            Some(deflate) if payload.len() >= deflate.threshold => {
                let mut compressed = std::mem::take(&mut deflate.compressed);
                compressed.clear();
                deflate.compressor.compress(payload, &mut compressed);
                self.queue_frame_with_rsv(opcode, true, 0b100, &compressed);
                if let Some(deflate) = &mut self.deflate {
                    deflate.compressed = compressed;
                }
            }
            _ => self.queue_frame(opcode, true, payload),
        }
    }

    /// Queues one frame of a fragmented message: the first with `Text` or `Binary`, the rest with
    /// `Continuation`; `fin` ends the message. Control frames may be sent between fragments.
    pub fn send_fragment(&mut self, opcode: OpCode, payload: &[u8], fin: bool) -> Result<(), SendError> {
        if self.close_sent {
            return Err(SendError::Closed);
        }
        match opcode {
            OpCode::Text | OpCode::Binary if self.sending_fragments => return Err(SendError::FragmentInProgress),
            OpCode::Continuation if !self.sending_fragments => return Err(SendError::NoFragmentInProgress),
            op if op.is_control() => return self.send_control(op, payload),
            _ => {}
        }
        self.sending_fragments = !fin;
        self.queue_frame(opcode, fin, payload);
        Ok(())
    }

    fn check_can_send_data(&self) -> Result<(), SendError> {
        if self.close_sent {
            Err(SendError::Closed)
        } else if self.sending_fragments {
            Err(SendError::FragmentInProgress)
        } else {
            Ok(())
        }
    }

    #[inline(always)]
    fn send_data(&mut self, opcode: OpCode, payload: Bytes) -> Result<(), SendError> {
        self.check_can_send_data()?;
        let compress = self.deflate.as_ref().is_some_and(|deflate| payload.len() >= deflate.threshold);
        if compress {
            self.queue_message(opcode, &payload);
        } else if self.role == Role::Server && payload.len() >= self.config.zero_copy_threshold {
            self.queue_header(opcode, true, 0, payload.len(), None);
            self.out.seal_tail();
            self.out.len += payload.len();
            self.out.chunks.push_back(payload);
        } else {
            self.queue_frame(opcode, true, &payload);
        }
        Ok(())
    }

    fn send_control(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), SendError> {
        if self.close_sent {
            return Err(SendError::Closed);
        }
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(SendError::ControlTooLong(payload.len()));
        }
        self.queue_frame(opcode, true, payload);
        Ok(())
    }

    /// Starts the close handshake (or answers the peer's close if not done yet). `None` sends a close
    /// frame without a code.
    pub fn close(&mut self, frame: Option<CloseFrame>) -> Result<(), SendError> {
        if self.close_sent {
            return Err(SendError::Closed);
        }
        let payload = match &frame {
            Some(f) if !f.code.is_sendable() => return Err(SendError::InvalidCloseCode(f.code.0)),
            Some(f) => f.encode(),
            None => Bytes::new(),
        };
        self.queue_frame(OpCode::Close, true, &payload);
        self.close_sent = true;
        Ok(())
    }

    fn queue_header(&mut self, opcode: OpCode, fin: bool, rsv: u8, len: usize, mask: Option<[u8; 4]>) {
        let header = FrameHeader { fin, rsv, opcode, mask, payload_len: len as u64 };
        let mut encoded = [0u8; MAX_HEADER_LEN];
        let n = header.encode(&mut encoded);
        self.out.tail.extend_from_slice(&encoded[..n]);
        self.out.len += n;
    }

    /// Queues a control frame the engine sends on its own, counted in [`Connection::pending_replies`].
    fn queue_reply(&mut self, opcode: OpCode, payload: &[u8]) {
        let before = self.out.len;
        self.queue_frame(opcode, true, payload);
        let queued = u32::try_from(self.out.len - before).unwrap_or(u32::MAX);
        self.replies = self.replies.saturating_add(queued);
        self.replies_end = u32::try_from(self.out.len).unwrap_or(u32::MAX);
    }

    /// Encodes a whole frame into the output buffer, masking it when we are the client.
    fn queue_frame(&mut self, opcode: OpCode, fin: bool, payload: &[u8]) {
        self.queue_frame_with_rsv(opcode, fin, 0, payload);
    }

    // Always inlined (as `send_data` is): the fast path is a few instructions, and the calls cost
    // about 30 instructions of each echoed 20-byte message.
    #[inline(always)]
    fn queue_frame_with_rsv(&mut self, opcode: OpCode, fin: bool, rsv: u8, payload: &[u8]) {
        if self.role == Role::Server && payload.len() <= usize::from(u16::MAX) {
            // The usual server frame: a two- or four-byte header, written without building a
            // `FrameHeader`.
            let first = (fin as u8) << 7 | (rsv & 0x7) << 4 | opcode.as_u8();
            let header_len = if payload.len() < 126 { 2 } else { 4 };
            self.out.tail.reserve(header_len + payload.len());
            if header_len == 2 {
                self.out.tail.put_slice(&[first, payload.len() as u8]);
            } else {
                let [high, low] = (payload.len() as u16).to_be_bytes();
                self.out.tail.put_slice(&[first, 126, high, low]);
            }
            self.out.tail.put_slice(payload);
            self.out.len += header_len + payload.len();
            return;
        }
        self.queue_long_or_masked_frame(opcode, fin, rsv, payload);
    }

    /// [`Connection::queue_frame_with_rsv`] for a client's frame (masked) or one over 64 KiB.
    fn queue_long_or_masked_frame(&mut self, opcode: OpCode, fin: bool, rsv: u8, payload: &[u8]) {
        let mask = match self.role {
            Role::Client => Some(self.mask_keys.next_key()),
            Role::Server => None,
        };
        self.out.tail.reserve(MAX_HEADER_LEN + payload.len());
        self.queue_header(opcode, fin, rsv, payload.len(), mask);
        let start = self.out.tail.len();
        self.out.tail.put_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut self.out.tail[start..], key, 0);
        }
        self.out.len += payload.len();
    }

    // --------------------------------------------------------------------------------------------
    // Output

    /// Bytes queued and not yet written.
    #[inline]
    pub fn pending_output(&self) -> usize {
        self.out.len
    }

    /// Bytes of replies the engine queued on its own since the last of them was written: pongs
    /// (with `auto_pong`) and the close frame answering the peer's or a protocol error. What the
    /// caller queued is not counted. At least as many are unsent, so a transport that pauses reading
    /// while this is over its limit bounds what a peer that sends pings and never reads can make it
    /// hold, and still reads while its own messages wait for the peer (which may itself be waiting to
    /// be read).
    #[inline]
    pub fn pending_replies(&self) -> usize {
        self.replies as usize
    }

    /// Fills `dst` with the pending output in order, for a vectored write; returns how many slices.
    pub fn output_slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for chunk in self.out.chunks.iter().map(|c| &c[..]).chain(std::iter::once(&self.out.tail[..])) {
            if n == dst.len() {
                break;
            }
            if !chunk.is_empty() {
                dst[n] = IoSlice::new(chunk);
                n += 1;
            }
        }
        n
    }

    /// The first contiguous run of pending output, for a plain write.
    #[inline]
    pub fn output_front(&self) -> &[u8] {
        self.out.chunks.front().map(|c| &c[..]).unwrap_or(&self.out.tail[..])
    }

    /// Marks `n` bytes of output as written.
    ///
    /// # Panics
    /// If `n` exceeds [`Connection::pending_output`].
    #[inline]
    pub fn consume_output(&mut self, n: usize) {
        self.out.consume(n);
        if self.replies_end != 0 {
            self.replies_end = self.replies_end.saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
            if self.replies_end == 0 || self.out.len == 0 {
                self.replies = 0;
                self.replies_end = 0;
            }
        }
    }

    /// Takes every pending output byte as one contiguous buffer (tests, simple transports).
    pub fn take_output(&mut self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.out.len);
        for chunk in &self.out.chunks {
            all.extend_from_slice(chunk);
        }
        all.extend_from_slice(&self.out.tail);
        self.consume_output(self.out.len);
        all
    }

    /// Frees the receive and send buffers when they hold nothing, and the zlib state between messages
    /// when context takeover is off, so an idle connection keeps no buffer memory. The next use
    /// allocates again.
    pub fn release_idle_buffers(&mut self) {
        drop(self.take_idle_receive_buffer());
        drop(self.take_idle_output_buffer());
        let between_messages = self.assembly.is_none() && self.frame.is_none();
        if let Some(deflate) = &mut self.deflate {
            if self.out.len == 0 {
                deflate.compressor.release();
                deflate.compressed = Vec::new();
            }
            if between_messages {
                deflate.decompressor.release();
            }
        }
    }

    /// Hands over the receive buffer's allocation when it holds no unparsed bytes, for the caller to
    /// pool or free; the engine continues with an empty buffer. `None` when there is nothing to give.
    #[inline]
    pub fn take_idle_receive_buffer(&mut self) -> Option<BytesMut> {
        // Bytes of a frame's payload already unmasked sit in `recv`, so an empty `recv` means no
        // partial-frame state refers to it.
        (self.recv.is_empty() && self.recv.capacity() > 0).then(|| std::mem::take(&mut self.recv))
    }

    /// Hands over the output buffer's allocation once everything queued has been written.
    #[inline]
    pub fn take_idle_output_buffer(&mut self) -> Option<BytesMut> {
        (self.out.len == 0 && self.out.tail.capacity() > 0).then(|| std::mem::take(&mut self.out.tail))
    }

    /// Lends the engine an empty buffer to encode outgoing frames into, if it has none (see
    /// [`Connection::take_idle_output_buffer`]). A buffer that is not needed is handed back.
    #[inline]
    pub fn provide_output_buffer(&mut self, mut buffer: BytesMut) -> Option<BytesMut> {
        if self.out.tail.capacity() > 0 {
            return Some(buffer);
        }
        buffer.clear();
        self.out.tail = buffer;
        None
    }

    /// Bytes of buffer memory the connection holds now (receive, output, and a fragmented message being
    /// joined): what an idle connection costs beyond its fixed state.
    pub fn buffer_capacity(&self) -> usize {
        self.recv.capacity() + self.out.tail.capacity() + self.assembly.as_ref().map_or(0, |a| a.data.capacity())
    }

    /// Room left in the output buffer before it must grow.
    #[inline]
    pub fn output_capacity(&self) -> usize {
        self.out.tail.capacity() - self.out.tail.len()
    }

    // --------------------------------------------------------------------------------------------
    // State

    /// Where the close handshake stands.
    #[inline]
    pub fn close_state(&self) -> CloseState {
        if self.failed || (self.close_sent && self.close_received) {
            CloseState::Closed
        } else if self.close_sent {
            CloseState::CloseSent
        } else {
            CloseState::Open
        }
    }

    /// True once the connection failed with a protocol error.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// True once the peer's close frame arrived.
    pub fn close_received(&self) -> bool {
        self.close_received
    }

    /// True once our close frame is queued.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// Whether we may close the transport now: the handshake is over and the output is flushed, and we
    /// are the side that closes first. RFC 6455 §7.1.1: the server closes TCP first; the client waits
    /// for it (and closes itself only after a timeout, which is the caller's clock to keep).
    pub fn should_close_transport(&self) -> bool {
        self.close_state() == CloseState::Closed && self.out.len == 0 && (self.role == Role::Server || self.failed)
    }
}
