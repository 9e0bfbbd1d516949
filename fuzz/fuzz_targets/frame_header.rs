//! Frame header decoding: never panics, never claims more bytes than it was given, and whatever it
//! decodes survives an encode/decode round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_proto::frame::{FrameHeader, MAX_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, used))) = FrameHeader::decode(data) {
        assert!(used <= data.len() && used <= MAX_HEADER_LEN);
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = header.encode(&mut out);
        // The encoder picks the shortest length form; peers may send a longer one, which decodes to
        // the same header.
        assert!(n <= used, "{header:?}");
        assert_eq!(FrameHeader::decode(&out[..n]), Ok(Some((header, n))));
    }
});
