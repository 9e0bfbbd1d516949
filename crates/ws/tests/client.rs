//! The client as a user meets it: wss:// with a private CA, HTTP proxies, compression, and a clear
//! error for each way a connection can fail.

#[path = "support/test_ca.rs"]
mod test_ca;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_ws::proto::deflate::DeflateConfig;
use switchboard_ws::proto::handshake::{self, ResponseError};
use switchboard_ws::tls::TlsAcceptor;
use switchboard_ws::{accept, ClientBuilder, Config, Error, Message, ProtocolError};
use test_ca::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn test_ca(name: &str) -> TestCa {
    TestCa::generate(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), name)
}

/// An echo server, optionally over TLS; returns its port.
async fn echo_server(config: Config, tls: Option<TlsAcceptor>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (config, tls) = (config.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        let Ok(stream) = tls.accept(stream).await else { return };
                        echo(accept(stream, config).await).await
                    }
                    None => echo(accept(stream, config).await).await,
                }
            });
        }
    });
    port
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ws: switchboard_ws::Result<switchboard_ws::WebSocket<S>>,
) {
    let Ok(mut ws) = ws else { return };
    while let Some(message) = ws.recv().await {
        if let Ok(m @ (Message::Text(_) | Message::Binary(_))) = message {
            if ws.feed(m).await.is_err() {
                break;
            }
        }
    }
}

#[tokio::test]
async fn wss_round_trip_with_a_private_ca() {
    let ca = test_ca("wss");
    let acceptor = switchboard_ws::tls::acceptor(&ca.cert_file, &ca.key_file).unwrap();
    let port = echo_server(Config::default(), Some(acceptor)).await;
    for host in ["localhost", "127.0.0.1"] {
        let (mut ws, _) =
            ClientBuilder::new(format!("wss://{host}:{port}/secure")).tls_ca_file(&ca.ca_file).connect().await.unwrap();
        assert!(ws.get_ref().is_tls());
        ws.send("over TLS").await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("over TLS"));
        let big = vec![7u8; 300_000];
        ws.send(big.clone()).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::binary(big));
    }
    // Without the CA the certificate is not trusted, and the error says TLS and which host.
    let err = ClientBuilder::new(format!("wss://localhost:{port}/")).connect().await.unwrap_err();
    assert!(matches!(&err, Error::Tls { host, .. } if host == "localhost"), "{err:?}");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
}

#[tokio::test]
async fn compression_is_negotiated_and_used_end_to_end() {
    let server_config =
        Config::default().compression(DeflateConfig { server_max_window_bits: 12, ..DeflateConfig::default() });
    let port = echo_server(server_config, None).await;
    let client_config = Config::default().compression(DeflateConfig::default());
    let (mut ws, accepted) =
        ClientBuilder::new(format!("ws://127.0.0.1:{port}/")).config(client_config).connect().await.unwrap();
    assert_eq!(accepted.extensions.as_deref(), Some("permessage-deflate; server_max_window_bits=12"));
    let params = ws.compression().expect("negotiated");
    assert_eq!((params.server_max_window_bits, params.client_max_window_bits), (12, 15));
    let json = r#"{"name":"bob","message":"compressible compressible compressible"}"#.repeat(500);
    for _ in 0..3 {
        ws.send(json.as_str()).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(json.as_str()));
    }
    // A client that does not offer it gets plain frames.
    let (ws, accepted) = ClientBuilder::new(format!("ws://127.0.0.1:{port}/")).connect().await.unwrap();
    assert_eq!((accepted.extensions, ws.compression()), (None, None));
}

/// A CONNECT proxy on loopback that records what it was asked for; `refuse` answers 403 instead.
async fn connect_proxy(refuse: bool) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8(head).unwrap();
                let target = head.split_whitespace().nth(1).unwrap().to_owned();
                log.lock().unwrap().push(head.lines().next().unwrap().to_owned());
                if refuse {
                    let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n").await;
                    return;
                }
                let mut upstream = TcpStream::connect(&target).await.unwrap();
                client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn http_proxy_tunnels_with_connect() {
    let ca = test_ca("proxy");
    let echo_port = echo_server(Config::default(), None).await;
    let tls_port =
        echo_server(Config::default(), Some(switchboard_ws::tls::acceptor(&ca.cert_file, &ca.key_file).unwrap())).await;
    let (proxy_port, seen) = connect_proxy(false).await;
    let proxy = format!("http://127.0.0.1:{proxy_port}");

    let (mut ws, _) = ClientBuilder::new(format!("ws://127.0.0.1:{echo_port}/")).proxy(&proxy).connect().await.unwrap();
    ws.send("via proxy").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("via proxy"));

    let (mut ws, _) = ClientBuilder::new(format!("wss://localhost:{tls_port}/"))
        .proxy(&proxy)
        .tls_ca_file(&ca.ca_file)
        .connect()
        .await
        .unwrap();
    ws.send("TLS inside the tunnel").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("TLS inside the tunnel"));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![format!("CONNECT 127.0.0.1:{echo_port} HTTP/1.1"), format!("CONNECT localhost:{tls_port} HTTP/1.1")]
    );

    let (refusing, _) = connect_proxy(true).await;
    let err = ClientBuilder::new(format!("ws://127.0.0.1:{echo_port}/"))
        .proxy(format!("http://127.0.0.1:{refusing}"))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Proxy { reason, .. } if reason.contains("403")), "{err:?}");
}

#[tokio::test]
async fn each_failure_has_its_own_error() {
    // DNS.
    let err = ClientBuilder::new("ws://no-such-host.invalid/").no_proxy().connect().await.unwrap_err();
    assert!(matches!(&err, Error::Dns { host, .. } if host == "no-such-host.invalid"), "{err:?}");
    // Refused: a port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = switchboard_ws::connect(&format!("ws://{closed}/")).await.unwrap_err();
    assert!(matches!(&err, Error::Connect { addr, .. } if *addr == closed.to_string()), "{err:?}");
    assert!(err.to_string().contains(&closed.to_string()));
    // A URL with a fragment.
    assert!(matches!(switchboard_ws::connect("ws://localhost/#x").await, Err(Error::InvalidUrl { .. })));

    // A server that answers 101 with a wrong Sec-WebSocket-Accept, then one that sends masked frames.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for bad_accept in [true, false] {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            let (head, _) = handshake::parse_request(&buf[..n], 8192).unwrap().unwrap();
            let mut offer = handshake::validate_request(head).unwrap().offer;
            if bad_accept {
                offer.key = Some("AAAAAAAAAAAAAAAAAAAAAA==".to_owned());
            }
            let negotiated = handshake::negotiate(&offer, &Default::default()).unwrap();
            stream.write_all(&negotiated.http1_response().to_http1()).await.unwrap();
            // A masked text frame: servers must not mask.
            stream.write_all(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let err = switchboard_ws::connect(&format!("ws://{addr}/")).await.unwrap_err();
    assert!(matches!(&err, Error::Response { error: ResponseError::BadAccept { .. }, .. }), "{err:?}");
    let (mut ws, _) = switchboard_ws::connect(&format!("ws://{addr}/")).await.unwrap();
    let err = ws.recv().await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Protocol(ProtocolError::MaskedFrame)), "{err:?}");
    assert!(err.to_string().contains("1002"), "{err}");
}
