//! Micro-benchmarks of the engine's per-byte work, in bytes per second: masking, UTF-8 validation,
//! frame header parsing, and whole messages through the receive path.
//!
//! `cargo bench -p switchboard-proto` (results in target/criterion/; BENCHMARKS.md has a run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use switchboard_proto::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};
use switchboard_proto::mask::{apply_mask, apply_mask_reference};
use switchboard_proto::utf8::{validate, Utf8Validator};
use switchboard_proto::{Config, Connection, Role};

const SIZES: [usize; 3] = [20, 16 * 1024, 1 << 20];

fn masking(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for size in SIZES {
        let mut buf = vec![0x61u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("word_at_a_time", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), [1, 2, 3, 4], 0))
        });
        group.bench_with_input(BenchmarkId::new("byte_at_a_time", size), &size, |b, _| {
            b.iter(|| apply_mask_reference(black_box(&mut buf), [1, 2, 3, 4], 0))
        });
    }
    group.finish();
}

fn text(size: usize, ascii: bool) -> Vec<u8> {
    let unit = if ascii { "chat message text " } else { "été, 東京, ✓ 🎉 " };
    let mut bytes = unit.repeat(size / unit.len() + 1).into_bytes();
    bytes.truncate(size);
    bytes
}

fn utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8");
    for size in SIZES {
        for (label, ascii) in [("ascii", true), ("mixed", false)] {
            let mut bytes = text(size, ascii);
            // Cut back to a character boundary so the whole input is valid.
            while std::str::from_utf8(&bytes).is_err() {
                bytes.pop();
            }
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_with_input(BenchmarkId::new(format!("whole_{label}"), size), &bytes, |b, bytes| {
                b.iter(|| validate(black_box(bytes)).unwrap())
            });
            // As frames arrive: 1 KiB pieces, characters split across them.
            group.bench_with_input(BenchmarkId::new(format!("streamed_{label}"), size), &bytes, |b, bytes| {
                b.iter(|| {
                    let mut validator = Utf8Validator::new();
                    for piece in bytes.chunks(1024) {
                        validator.feed(black_box(piece)).unwrap();
                    }
                    assert!(validator.is_complete());
                })
            });
        }
    }
    group.finish();
}

fn masked_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let header = FrameHeader { fin: true, rsv: 0, opcode, mask: Some(key), payload_len: payload.len() as u64 };
    let mut head = [0u8; MAX_HEADER_LEN];
    let n = header.encode(&mut head);
    let mut frame = head[..n].to_vec();
    frame.extend_from_slice(payload);
    apply_mask(&mut frame[n..], key, 0);
    frame
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    // Headers only: 1000 frames of 20 bytes back to back.
    let stream: Vec<u8> = (0..1000).flat_map(|_| masked_frame(OpCode::Text, &[b'x'; 20])).collect();
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("decode_headers_1000x20B", |b| {
        b.iter(|| {
            let mut at = 0;
            while let Ok(Some((header, used))) = FrameHeader::decode(black_box(&stream[at..])) {
                at += used + header.payload_len as usize;
            }
            assert_eq!(at, stream.len());
        })
    });
    // The whole receive path (header, unmask, UTF-8, message) as a server.
    for (count, size) in [(1000usize, 20usize), (16, 16 * 1024)] {
        let payload = text(size, true);
        let stream: Vec<u8> = (0..count).flat_map(|_| masked_frame(OpCode::Text, &payload)).collect();
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_function(format!("receive_{count}x{size}B"), |b| {
            let mut conn = Connection::new(Role::Server, Config::default());
            b.iter(|| {
                conn.receive_data(black_box(&stream));
                let mut messages = 0;
                while let Ok(Some(message)) = conn.next_message() {
                    black_box(&message);
                    messages += 1;
                }
                assert_eq!(messages, count);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, masking, utf8, frames);
criterion_main!(benches);
