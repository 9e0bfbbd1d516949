//! A per-thread pool of I/O buffers, lent to a connection while it has bytes in flight and returned
//! as soon as it goes quiet, so an idle connection holds no buffer at all. uWebSockets gets the same
//! effect from one receive buffer per event loop; with tokio a connection's reads are polled from its
//! own task, so the buffer travels with the connection between a read and the next `Pending`.
//!
//! The pool is bounded in count and in the size of what it keeps: a buffer that grew for one large
//! message is freed rather than kept, and the pool never holds more than
//! `MAX_POOLED * MAX_POOLED_CAPACITY` bytes per thread.

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers kept per thread. A connection takes its buffers and gives them back within one poll of its
/// task, so a worker rarely has more than a few out at once.
const MAX_POOLED: usize = 64;
/// What a new buffer is allocated with: the default read size.
const NEW_CAPACITY: usize = 32 * 1024;
/// Smaller remainders are freed rather than pooled: a buffer that would need to grow (or be rewound by
/// `reserve`) at its next use saves nothing.
const MIN_POOLED_CAPACITY: usize = 1024;
/// Larger buffers (grown for a large message) are freed instead of pooled.
const MAX_POOLED_CAPACITY: usize = 64 * 1024;

thread_local! {
    static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from the pool, or a new one.
pub(crate) fn take() -> BytesMut {
    POOL.try_with(|pool| pool.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(NEW_CAPACITY))
}

/// Returns a buffer for reuse; it is freed if it is too large or the pool is full.
pub(crate) fn give(mut buffer: BytesMut) {
    if !(MIN_POOLED_CAPACITY..=MAX_POOLED_CAPACITY).contains(&buffer.capacity()) {
        return;
    }
    buffer.clear();
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < MAX_POOLED {
            pool.push(buffer);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_come_back_without_a_new_allocation() {
        let mut buffer = BytesMut::with_capacity(8192);
        buffer.extend_from_slice(b"leftover");
        let address = buffer.as_ptr();
        give(buffer);
        let again = take();
        assert_eq!(again.as_ptr(), address, "the pooled allocation is reused");
        assert!(again.is_empty() && again.capacity() >= 8192);
    }

    #[test]
    fn oversized_buffers_are_freed_and_the_pool_is_bounded() {
        let drain = || std::iter::from_fn(|| Some(take()).filter(|b| b.capacity() != NEW_CAPACITY)).count();
        drain();
        give(BytesMut::with_capacity(MAX_POOLED_CAPACITY + 1));
        give(BytesMut::with_capacity(MIN_POOLED_CAPACITY - 1));
        assert_eq!(take().capacity(), NEW_CAPACITY, "neither an oversized nor a tiny buffer is kept");
        for _ in 0..MAX_POOLED + 10 {
            give(BytesMut::with_capacity(MIN_POOLED_CAPACITY));
        }
        assert_eq!(drain(), MAX_POOLED);
    }
}
