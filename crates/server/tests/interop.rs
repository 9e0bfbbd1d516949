//! Interoperability with a WebSocket implementation nobody here wrote: Python's `websockets` (from
//! PyPI, installed by the test into the target directory when missing), over wss:// with
//! permessage-deflate in both directions.

mod support;

#[path = "../../ws/tests/support/test_ca.rs"]
mod test_ca;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use support::start_echo;
use switchboard_ws::proto::deflate::DeflateConfig;
use switchboard_ws::{ClientBuilder, Config, Message};

/// A PYTHONPATH where `import websockets` works.
fn python_websockets() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-websockets");
        let importable = |dir: &PathBuf| {
            Command::new("python3")
                .args(["-c", "import websockets"])
                .env("PYTHONPATH", dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !importable(&dir) {
            let status = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
                .arg(&dir)
                .arg("websockets>=13")
                .status()
                .expect("python3 with pip");
            assert!(status.success(), "pip install websockets failed");
        }
        dir
    })
    .clone()
}

const PY_CLIENT: &str = r#"
import json, ssl, sys
from websockets.sync.client import connect
url, ca = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
# 127.0.0.1 (where the server listens) rather than a name that may resolve to ::1 first; the
# certificate is for "localhost". A generous timeout: a debug build on a loaded 2-core machine.
with connect(url, ssl=ctx, server_hostname="localhost", open_timeout=60) as ws:
    ws.send("hello from python")
    text = ws.recv()
    blob = bytes(range(256)) * 400
    ws.send(blob)
    back = ws.recv()
    big = "compress me " * 5000
    ws.send(big)
    print(json.dumps({"text": text, "binary_ok": back == blob, "big_ok": ws.recv() == big,
                      "extensions": ws.response.headers.get("Sec-WebSocket-Extensions")}))
"#;

#[test]
fn python_client_over_wss_with_compression() {
    let pythonpath = python_websockets();
    let ca = test_ca::TestCa::generate(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "interop");
    let server =
        start_echo(&["--tls-cert", ca.cert_file.to_str().unwrap(), "--tls-key", ca.key_file.to_str().unwrap()]);
    let port = server.addr.rsplit(':').next().unwrap();
    let out = Command::new("python3")
        .args(["-c", PY_CLIENT, &format!("wss://127.0.0.1:{port}/"), ca.ca_file.to_str().unwrap()])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["text"], "hello from python");
    assert_eq!(result["binary_ok"], true);
    assert_eq!(result["big_ok"], true);
    assert!(result["extensions"].as_str().unwrap_or("").starts_with("permessage-deflate"), "{result}");
}

const PY_SERVER: &str = r#"
import sys
from websockets.sync.server import serve
def echo(ws):
    for message in ws:
        ws.send(message)
with serve(echo, "127.0.0.1", int(sys.argv[1])) as server:
    server.serve_forever()
"#;

#[tokio::test]
async fn our_client_against_a_python_server_with_compression() {
    let pythonpath = python_websockets();
    let port = support::free_port();
    let child = Command::new("python3")
        .args(["-c", PY_SERVER, &port.to_string()])
        .env("PYTHONPATH", &pythonpath)
        .spawn()
        .unwrap();
    let _server = support::Server { child, addr: format!("127.0.0.1:{port}") };
    support::wait_listening(&format!("127.0.0.1:{port}"));
    let config = Config::default().compression(DeflateConfig::default());
    let (mut ws, accepted) =
        ClientBuilder::new(format!("ws://127.0.0.1:{port}/")).config(config).connect().await.unwrap();
    assert!(accepted.extensions.as_deref().unwrap_or("").starts_with("permessage-deflate"), "{accepted:?}");
    assert!(ws.compression().is_some());
    let json = r#"{"name":"py","message":"round and round"}"#.repeat(300);
    for _ in 0..3 {
        ws.send(json.as_str()).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(json.as_str()));
    }
    ws.send(vec![0u8, 255, 1, 254]).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::binary(vec![0u8, 255, 1, 254]));
}

const PY_CHAT: &str = r#"
import json, sys
from websockets.sync.client import connect
base = sys.argv[1]
with connect(base, subprotocols=["switchboard.v1"]) as full, connect(base) as seed:
    assert full.subprotocol == "switchboard.v1" and seed.subprotocol is None
    full.send(json.dumps({"type": "join", "room": "lobby", "name": "Py"}))
    joined = json.loads(full.recv())
    full.send(json.dumps({"type": "publish", "room": "lobby", "message": "from python", "id": "py-1", "req": 7}))
    seen = {}
    while "ack" not in seen or "message" not in seen:
        envelope = json.loads(full.recv())
        seen[envelope["type"]] = envelope
    print(json.dumps({"joined": joined, "ack": seen["ack"], "message": seen["message"], "seed": json.loads(seed.recv())}))
"#;

#[test]
fn python_clients_speak_both_chat_protocols_to_serve() {
    let pythonpath = python_websockets();
    let (server, _db) = support::start_serve(&[]);
    let out = Command::new("python3")
        .args(["-c", PY_CHAT, &format!("ws://{}/ws", server.addr)])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["joined"]["type"], "joined");
    assert_eq!((result["ack"]["req"].as_u64(), result["ack"]["offset"].as_u64()), (Some(7), Some(1)));
    assert_eq!(result["message"]["message"], "from python");
    let seed = result["seed"].as_object().unwrap();
    assert_eq!(seed.keys().collect::<Vec<_>>(), ["name", "message", "time"]);
    assert_eq!((seed["name"].as_str(), seed["message"].as_str()), (Some("Py"), Some("from python")));
}
