//! tokio-tungstenite's echo server, as its `examples/echo-server.rs` (0.28.0) is written:
//! `#[tokio::main]` (the multi-threaded runtime), `accept_async`, split, and the read half's text
//! and binary messages forwarded into the write half.
//!
//! Differences from the example, each for the benchmark only:
//! - no `env_logger` and no `info!` per connection (nothing is logged per message either way);
//! - `TCP_NODELAY` on each accepted stream, as every server in the benchmarks has;
//! - a failed handshake or forward ends the connection's task quietly instead of `expect`'s panic;
//! - the accept loop stops at Ctrl-C, so `benches/callgrind.sh` gets an orderly exit and its counts.
use futures_util::{future, StreamExt, TryStreamExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9003".into());
    let listener = TcpListener::bind(&addr).await.expect("bind");
    // Ctrl-C ends the process normally (benches/callgrind.sh needs an orderly exit for its counts).
    let serve = async {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(accept_connection(stream));
        }
    };
    tokio::select! { _ = serve => {}, _ = tokio::signal::ctrl_c() => {} }
}

async fn accept_connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(ws_stream) = tokio_tungstenite::accept_async(stream).await else { return };
    let (write, read) = ws_stream.split();
    let _ = read.try_filter(|msg| future::ready(msg.is_text() || msg.is_binary())).forward(write).await;
}
