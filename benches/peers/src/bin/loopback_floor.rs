//! The kernel's share of an echoed message, measured without any WebSocket code: one thread sends a
//! frame-sized write over loopback TCP and reads it back on the other end, again and again.
//!
//! An echo server on one core does one read and one write per message, and on loopback a write also
//! runs the receiving side's TCP processing, so one write plus one read here is close to what the
//! kernel charges that core per echoed message, however little work the server does itself.
//! benches/run.sh prints it beside the echo table. It is an estimate, not a hard ceiling: with many
//! connections the kernel shares some work between messages (wake-ups, acknowledgements), and a
//! 1,000-connection echo cell can run a little faster than its inverse.
//!
//! Usage: loopback_floor [BYTES...]   (default: 26 and 16392, a 20-byte and a 16 KiB frame from a client)
//! Prints one JSON object per size: {"bytes": N, "ns_per_message": T, "messages_per_s": 1e9 / T}.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() -> std::io::Result<()> {
    let sizes: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a byte count")).collect();
    let sizes = if sizes.is_empty() { vec![26, 16_392] } else { sizes };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut sender = TcpStream::connect(listener.local_addr()?)?;
    let (mut receiver, _) = listener.accept()?;
    sender.set_nodelay(true)?;
    receiver.set_nodelay(true)?;
    for size in sizes {
        let message = vec![b'x'; size];
        let mut received = vec![0u8; size];
        let mut one_way = || -> std::io::Result<()> {
            sender.write_all(&message)?;
            receiver.read_exact(&mut received)
        };
        for _ in 0..2_000 {
            one_way()?;
        }
        // About a second per size: the loop count follows from the warm-up's speed.
        let start = Instant::now();
        for _ in 0..2_000 {
            one_way()?;
        }
        let rounds = (2_000.0 / start.elapsed().as_secs_f64()) as usize;
        let start = Instant::now();
        for _ in 0..rounds {
            one_way()?;
        }
        let ns = start.elapsed().as_nanos() as f64 / rounds as f64;
        println!("{{\"bytes\": {size}, \"ns_per_message\": {ns:.0}, \"messages_per_s\": {:.0}}}", 1e9 / ns);
    }
    Ok(())
}
