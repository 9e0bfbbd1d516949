//! fastwebsockets' echo server, as its `examples/echo_server.rs` (0.10.0) is written: a
//! current-thread runtime with only the I/O driver, hyper's HTTP/1 upgrade, a `FragmentCollector`,
//! and the connection task run under `tokio::task::unconstrained` (no cooperative budget).
//!
//! Differences from the example, each for the benchmark only:
//! - the address comes from the first argument (the example binds 127.0.0.1:8080);
//! - `TCP_NODELAY` on each accepted stream, as every server in the benchmarks has;
//! - no `println!("Client connected")` per connection (nothing is logged per message either way);
//! - the runtime also enables its signal driver (`enable_io` covers it on Unix) and the accept loop
//!   stops at Ctrl-C, so `benches/callgrind.sh` gets an orderly exit and its counts;
//! - accept errors end the loop instead of returning them from `main`.
use fastwebsockets::upgrade;
use fastwebsockets::OpCode;
use fastwebsockets::WebSocketError;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper::Response;
use tokio::net::TcpListener;

async fn handle_client(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = fastwebsockets::FragmentCollector::new(fut.await?);

    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => {
                ws.write_frame(frame).await?;
            }
            _ => {}
        }
    }

    Ok(())
}

async fn server_upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;

    tokio::task::spawn(async move {
        if let Err(e) = tokio::task::unconstrained(handle_client(fut)).await {
            eprintln!("Error in websocket connection: {}", e);
        }
    });

    Ok(response)
}

fn main() -> Result<(), WebSocketError> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9004".into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();

    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        let serve = async {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let conn_fut = http1::Builder::new().serve_connection(io, service_fn(server_upgrade)).with_upgrades();
                    if let Err(e) = conn_fut.await {
                        println!("An error occurred: {:?}", e);
                    }
                });
            }
        };
        tokio::select! { _ = serve => {}, _ = tokio::signal::ctrl_c() => {} }
        Ok(())
    })
}
