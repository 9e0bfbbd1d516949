//! Seed 001's Node server on switchboard: plain HTTP answers "WebSocket Server", and on the same port
//! every WebSocket message comes back as "You sent: ...". Run: `cargo run -p switchboard-examples
//! --example echo_http [127.0.0.1:8080]`, then open seed 001's client.html.

use std::convert::Infallible;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use switchboard_ws::upgrade::{is_upgrade_request, refusal_response, Upgrade};
use switchboard_ws::{Bytes, Message};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

async fn handle(mut request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if !is_upgrade_request(&request) {
        let page =
            Response::builder().header("Content-Type", "text/plain").body(Full::from("WebSocket Server\n").boxed());
        return Ok(page.expect("static response"));
    }
    let upgrade = match Upgrade::new(&mut request) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return Ok(refusal_response(&refusal).map(|b| b.boxed())),
    };
    let (response, socket) = upgrade.into_response();
    tokio::spawn(async move {
        let Ok(mut ws) = socket.await else { return };
        println!("A new client connected");
        while let Some(Ok(message)) = ws.recv().await {
            if let Message::Text(text) = message {
                println!("Received: {text}");
                if ws.send(format!("You sent: {text}")).await.is_err() {
                    break;
                }
            }
        }
        println!("A client disconnected");
    });
    Ok(response.map(|b| b.map_err(|never| match never {}).boxed()))
}

pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
            .with_upgrades();
        tokio::spawn(connection);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8080".into());
    println!("Server is listening on {addr}");
    serve(TcpListener::bind(addr).await?).await
}
