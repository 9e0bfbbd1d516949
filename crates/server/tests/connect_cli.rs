//! `switchboard connect` as a user runs it: lines piped in, output and exit status read back, against
//! the real `switchboard echo`.

mod support;

#[path = "../../ws/tests/support/test_ca.rs"]
mod test_ca;

use std::io::Write;
use std::process::{Output, Stdio};

use support::{start_echo, switchboard};

fn connect(args: &[&str], input: &str) -> Output {
    let mut child = switchboard()
        .arg("connect")
        .args(args)
        .env("SWITCHBOARD_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn lines_in_echoes_out_and_a_clean_close_exits_0() {
    let server = start_echo(&[]);
    let out = connect(&[&format!("ws://{}/", server.addr)], "first line\nsecond line\nünïcödé\n");
    assert_eq!(text(&out.stdout), "first line\nsecond line\nünïcödé\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn binary_and_json_modes() {
    let server = start_echo(&[]);
    let url = format!("ws://{}/", server.addr);
    let out = connect(&[&url, "--binary"], "raw bytes\n");
    assert_eq!(text(&out.stdout), "raw bytes\n");
    assert_eq!(out.status.code(), Some(0));
    let out = connect(&[&url, "--json"], "{\"name\":\"ann\",\"n\":[1,2]}\nplain\n");
    assert_eq!(text(&out.stdout), "{\n  \"name\": \"ann\",\n  \"n\": [\n    1,\n    2\n  ]\n}\nplain\n");
}

#[test]
fn abnormal_close_code_is_reported_and_exits_1() {
    let server = start_echo(&["--max-message-size", "10"]);
    let out = connect(&[&format!("ws://{}/", server.addr)], "this line is longer than ten bytes\n");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("connection closed: 1009"), "{stderr}");
}

#[test]
fn unreachable_server_exits_2_with_the_reason() {
    let port = support::free_port();
    let out = connect(&[&format!("ws://127.0.0.1:{port}/")], "");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("could not connect to 127.0.0.1:{port}")), "{stderr}");
    let out = connect(&["ws://localhost/#frag"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("fragment"));
}

#[test]
fn wss_with_a_private_ca() {
    let ca = test_ca::TestCa::generate(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "connect-cli");
    let server =
        start_echo(&["--tls-cert", ca.cert_file.to_str().unwrap(), "--tls-key", ca.key_file.to_str().unwrap()]);
    let port = server.addr.rsplit(':').next().unwrap();
    let url = format!("wss://localhost:{port}/");
    let out = connect(&[&url, "--ca-file", ca.ca_file.to_str().unwrap()], "secret\n");
    assert_eq!(text(&out.stdout), "secret\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = connect(&[&url], "secret\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("TLS with localhost failed"), "{}", text(&out.stderr));
}

#[test]
fn linger_keeps_reading_after_the_input_ends_so_a_piped_publish_gets_its_broadcast() {
    let (server, _db) = support::start_serve(&[]);
    let input = "{\"type\":\"join\",\"room\":\"lobby\",\"name\":\"pipe\"}\n\
                 {\"type\":\"publish\",\"room\":\"lobby\",\"message\":\"piped hello\"}\n";
    let url = format!("ws://{}/ws", server.addr);
    let out = connect(&[&url, "--subprotocol", "switchboard.v1", "--linger", "2"], input);
    let stdout = text(&out.stdout);
    let broadcast = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|v| v["type"] == "message" && v["message"] == "piped hello");
    assert!(broadcast.is_some(), "no broadcast of the piped message in {stdout}");
    assert!(stdout.contains(r#""type":"ack""#), "and its ack: {stdout}");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}
