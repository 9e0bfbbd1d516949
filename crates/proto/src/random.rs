//! Unpredictable bytes for masking keys and handshake nonces.
//!
//! Masking keys must be unpredictable to intermediaries (RFC 6455 §5.3, §10.3). Asking the OS for four
//! bytes per frame costs a syscall each, so keys are drawn from a pool filled from the OS 256 bytes at
//! a time, the way Node's `ws` does it.

const POOL_BYTES: usize = 256;

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn fill(buf: &mut [u8]) {
    // The OS generator failing is not something a protocol engine can recover from, and returning
    // predictable bytes instead would silently weaken masking.
    getrandom::fill(buf).expect("operating system random number generator unavailable");
}

/// Where a client's masking keys come from.
#[derive(Debug, Clone)]
pub(crate) enum MaskKeys {
    /// The pool is allocated at the first key: a server never masks, and an idle server connection
    /// should not carry 256 bytes it will never use.
    Random { pool: Option<Box<[u8; POOL_BYTES]>>, used: usize },
    /// A fixed key, for reproducible tests and benchmarks only.
    Fixed([u8; 4]),
}

impl MaskKeys {
    pub(crate) fn random() -> Self {
        Self::Random { pool: None, used: POOL_BYTES }
    }

    pub(crate) fn next_key(&mut self) -> [u8; 4] {
        match self {
            Self::Fixed(key) => *key,
            Self::Random { pool, used } => {
                let pool = pool.get_or_insert_with(|| Box::new([0; POOL_BYTES]));
                if *used + 4 > POOL_BYTES {
                    fill(&mut pool[..]);
                    *used = 0;
                }
                let key = [pool[*used], pool[*used + 1], pool[*used + 2], pool[*used + 3]];
                *used += 4;
                key
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_keys_vary_across_pool_refills() {
        let mut keys = MaskKeys::random();
        let drawn: Vec<[u8; 4]> = (0..200).map(|_| keys.next_key()).collect();
        let distinct: std::collections::HashSet<_> = drawn.iter().collect();
        // 200 draws of 32 random bits: a collision is astronomically unlikely, a constant key certain.
        assert!(distinct.len() >= 199, "only {} distinct keys", distinct.len());
    }
}
