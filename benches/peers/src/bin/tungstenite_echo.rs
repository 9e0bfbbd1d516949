//! tokio-tungstenite's echo server (its examples/echo-server.rs): accept, split, forward data messages.
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
