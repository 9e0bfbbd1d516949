//! Payload masking (RFC 6455 §5.3): XOR with a 4-byte key, resumable at any payload offset.
//!
//! Internal: public only with the `internals` feature, for benchmarks and fuzzing, with no stability
//! promise. Use [`crate::frame::mask_payload`] instead.
//!
//! The hot loop works on 8-byte words so the compiler can vectorise it; the engine unmasks in place as
//! bytes arrive, so `offset` lets a frame be unmasked across several partial reads.

/// XORs `buf` with `key`, where `buf[0]` is the byte at `offset` within the frame's payload.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate_key(key, offset);
    let word = u64::from(u32::from_ne_bytes(key)) * 0x1_0000_0001;
    // Chunks of 32 bytes give the auto-vectoriser four independent words per iteration.
    let mut wide = buf.chunks_exact_mut(32);
    for chunk in &mut wide {
        for lane in chunk.chunks_exact_mut(8) {
            let value = u64::from_ne_bytes(lane.try_into().expect("lane is 8 bytes")) ^ word;
            lane.copy_from_slice(&value.to_ne_bytes());
        }
    }
    let rest = wide.into_remainder();
    let mut words = rest.chunks_exact_mut(8);
    for lane in &mut words {
        let value = u64::from_ne_bytes(lane.try_into().expect("lane is 8 bytes")) ^ word;
        lane.copy_from_slice(&value.to_ne_bytes());
    }
    // Each 8-byte step is a multiple of 4, so the tail still starts at key phase 0.
    let mut tail = words.into_remainder();
    if tail.len() >= 4 {
        let (half, rest) = tail.split_at_mut(4);
        let value = u32::from_ne_bytes(half.try_into().expect("4 bytes")) ^ u32::from_ne_bytes(key);
        half.copy_from_slice(&value.to_ne_bytes());
        tail = rest;
    }
    for (byte, k) in tail.iter_mut().zip(key) {
        *byte ^= k;
    }
}

/// The key as seen from payload position `offset`.
#[inline]
fn rotate_key(key: [u8; 4], offset: usize) -> [u8; 4] {
    // As a little-endian word, moving every byte one place towards the front is a right rotation.
    u32::from_le_bytes(key).rotate_right(8 * (offset as u32 & 3)).to_le_bytes()
}

/// Byte-at-a-time reference used by tests and benchmarks to check the fast routine.
#[cfg(any(test, feature = "internals"))]
pub fn apply_mask_reference(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(offset + i) & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: a masked "Hello" with key 37 fa 21 3d.
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn every_length_and_offset_matches_reference() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        for len in 0..130 {
            for offset in 0..4 {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut fast = data.clone();
                let mut slow = data.clone();
                apply_mask(&mut fast, key, offset);
                apply_mask_reference(&mut slow, key, offset);
                assert_eq!(fast, slow, "len {len} offset {offset}");
            }
        }
    }

    proptest! {
        #[test]
        fn split_masking_equals_whole(data in proptest::collection::vec(any::<u8>(), 0..300),
                                      key in any::<[u8; 4]>(), cut in 0usize..300) {
            let cut = cut.min(data.len());
            let mut whole = data.clone();
            apply_mask(&mut whole, key, 0);
            let mut parts = data.clone();
            let (a, b) = parts.split_at_mut(cut);
            apply_mask(a, key, 0);
            apply_mask(b, key, cut);
            prop_assert_eq!(whole, parts);
        }
    }
}
