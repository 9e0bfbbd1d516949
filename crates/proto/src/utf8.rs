//! Incremental UTF-8 validation that fails as soon as the bytes seen so far cannot begin valid text.
//!
//! Text messages arrive in pieces (partial reads, fragments). RFC 6455 §8.1 asks that invalid text fail
//! the connection; checking each piece as it arrives, rather than the whole message at the end, means a
//! peer cannot make us buffer megabytes of garbage first. A code point split across pieces is carried
//! (at most 3 bytes) to the next call.
//!
//! Internal: public only with the `internals` feature, for benchmarks and fuzzing, with no stability
//! promise. [`crate::Utf8Bytes::try_from_bytes`] is the public way to check text.

/// Why validation stopped: the bytes can never be valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Validator state between pieces of one text message.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    carry: [u8; 4],
    carry_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any carried bytes (start of a new message).
    pub fn reset(&mut self) {
        self.carry_len = 0;
    }

    /// True when no partial code point is pending: the text so far ends on a character boundary.
    pub fn is_complete(&self) -> bool {
        self.carry_len == 0
    }

    /// Checks the next piece of a message.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), InvalidUtf8> {
        if self.carry_len > 0 {
            let have = self.carry_len as usize;
            let need = sequence_length(self.carry[0]).ok_or(InvalidUtf8)?;
            let take = (need - have).min(input.len());
            self.carry[have..have + take].copy_from_slice(&input[..take]);
            let candidate = &self.carry[..have + take];
            match std::str::from_utf8(candidate) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() => {
                    self.carry_len = candidate.len() as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
            input = &input[take..];
        }
        if input.len() < SHORT_INPUT && is_ascii(input) {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &input[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }
}

/// Below this length simdutf8 hands the input to the standard library's scalar validator; chat-sized
/// messages are mostly ASCII, which a word-at-a-time check settles in a few instructions.
const SHORT_INPUT: usize = 64;

fn is_ascii(input: &[u8]) -> bool {
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    let len = input.len();
    if len >= 8 {
        let mut words = input.chunks_exact(8);
        let mut seen = 0u64;
        for word in &mut words {
            seen |= u64::from_ne_bytes(word.try_into().expect("chunks of 8"));
        }
        // The remainder, read as the last 8 bytes (overlapping bytes already seen): no byte loop.
        seen |= u64::from_ne_bytes(input[len - 8..].try_into().expect("8 bytes"));
        seen & HIGH_BITS == 0
    } else if len >= 4 {
        let head = u32::from_ne_bytes(input[..4].try_into().expect("4 bytes"));
        let last = u32::from_ne_bytes(input[len - 4..].try_into().expect("4 bytes"));
        (head | last) & HIGH_BITS as u32 == 0
    } else {
        input.iter().fold(0u8, |acc, &byte| acc | byte) < 0x80
    }
}

/// Length of the sequence a lead byte starts, or None when it cannot start one.
fn sequence_length(lead: u8) -> Option<usize> {
    match lead {
        0x00..=0x7f => Some(1),
        0xc2..=0xdf => Some(2),
        0xe0..=0xef => Some(3),
        0xf0..=0xf4 => Some(4),
        _ => None,
    }
}

/// Validates a complete buffer in one call.
pub fn validate(bytes: &[u8]) -> Result<(), InvalidUtf8> {
    if bytes.len() < SHORT_INPUT && is_ascii(bytes) {
        return Ok(());
    }
    simdutf8::basic::from_utf8(bytes).map(|_| ()).map_err(|_| InvalidUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed_split(bytes: &[u8], cuts: &[usize]) -> Result<bool, InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, bytes.len());
            v.feed(&bytes[start..cut])?;
            start = cut;
        }
        v.feed(&bytes[start..])?;
        Ok(v.is_complete())
    }

    #[test]
    fn ascii_fast_path_agrees_with_std_at_every_length() {
        for len in 0..SHORT_INPUT + 9 {
            let ascii = vec![b'a'; len];
            assert!(is_ascii(&ascii));
            for at in 0..len {
                let mut high = ascii.clone();
                high[at] = 0x80;
                assert!(!is_ascii(&high), "a high byte at {at} of {len} is not ASCII");
                let mut v = Utf8Validator::new();
                assert_eq!(v.feed(&high), Err(InvalidUtf8), "a lone continuation byte is invalid");
                assert_eq!(validate(&high), Err(InvalidUtf8));
            }
        }
    }

    #[test]
    fn multibyte_split_at_every_position() {
        let text = "κόσμε 𝄞 € ok".as_bytes();
        for cut in 0..=text.len() {
            assert_eq!(feed_split(text, &[cut]), Ok(true), "cut at {cut}");
        }
    }

    #[test]
    fn fails_fast_on_impossible_prefix() {
        // 0xF4 0x90 is above U+10FFFF: invalid before the sequence is complete.
        let mut v = Utf8Validator::new();
        v.feed(&[b'a', 0xf4]).unwrap();
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
        // A lone continuation byte fails at once.
        assert_eq!(Utf8Validator::new().feed(&[0x80]), Err(InvalidUtf8));
        // Surrogates (ED A0..) fail at the second byte.
        let mut v = Utf8Validator::new();
        v.feed(&[0xed]).unwrap();
        assert_eq!(v.feed(&[0xa0]), Err(InvalidUtf8));
    }

    #[test]
    fn truncated_sequence_is_incomplete_not_invalid() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xe2, 0x82]).unwrap();
        assert!(!v.is_complete());
        v.feed(&[0xac]).unwrap();
        assert!(v.is_complete());
    }

    proptest! {
        #[test]
        fn agrees_with_std_under_any_split(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                           cuts in proptest::collection::vec(0usize..64, 0..6)) {
            let mut cuts = cuts;
            cuts.sort();
            let expected = std::str::from_utf8(&bytes).is_ok();
            let got = matches!(feed_split(&bytes, &cuts), Ok(true));
            prop_assert_eq!(expected, got);
        }

        #[test]
        fn valid_strings_pass_under_any_split(s in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..6)) {
            let mut cuts = cuts;
            cuts.sort();
            prop_assert_eq!(feed_split(s.as_bytes(), &cuts), Ok(true));
        }
    }
}
