//! Server-Sent Events at `/sse` and the client publish at `/publish`, over real sockets against the
//! real binary.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::chat::{next_of, send, v1_client};
use support::sse::Stream;
use support::start_serve;

/// `POST /publish` with `token` as a Bearer token: the status and the JSON answer.
fn publish(addr: &str, body: &str, token: Option<&str>) -> (u16, Value) {
    support::http_json(addr, "POST", "/publish", token, Some(body))
}

/// Sends one whole request on a fresh connection (`Connection: close`) and reads the answer to its
/// end: the status and the JSON body (`null` when the body is not JSON).
fn exchange(addr: &str, request: &str, timeout: Duration) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    (status, serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap_or(Value::Null))
}

#[test]
fn a_stream_resumes_by_last_event_id_with_exactly_what_it_missed() {
    let (server, _db) = start_serve(&["--rate-limit", "0"]);
    let mut stream = Stream::open(&server.addr, "room=news&room=chat", "");
    assert_eq!(stream.status, 200);
    assert!(stream.headers.to_ascii_lowercase().contains("content-type: text/event-stream"), "{}", stream.headers);
    assert_eq!(stream.next().kind, "retry");
    assert_eq!(stream.next_of("joined").json()["room"], "news");
    assert_eq!(stream.next_of("joined").json()["room"], "chat");
    for (i, room) in ["news", "chat", "news"].iter().enumerate() {
        let (status, ack) = publish(&server.addr, &json!({"room": room, "message": format!("m{i}")}).to_string(), None);
        assert_eq!(status, 200, "{ack}");
    }
    let mut last_id = None;
    for expected in ["m0", "m1", "m2"] {
        let event = stream.next_of("message");
        assert_eq!(event.json()["message"], expected);
        last_id = event.id;
    }
    drop(stream);
    publish(&server.addr, r#"{"room":"chat","message":"while away 1"}"#, None);
    publish(&server.addr, r#"{"room":"news","message":"while away 2"}"#, None);
    let id = last_id.expect("message events carry ids");
    let mut back = Stream::open(&server.addr, "room=news&room=chat", &format!("Last-Event-ID: {id}\r\n"));
    // Each room's `joined`, then its replay.
    let mut missed = Vec::new();
    while missed.len() < 2 {
        let event = back.next();
        match event.kind.as_str() {
            "joined" => assert_eq!(event.json()["recovered"], true),
            "message" => missed.push(event.json()["message"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
    missed.sort();
    assert_eq!(missed, ["while away 1", "while away 2"], "exactly the two it missed, once");
    // The same place as ?cursor= (what a long-polling client or a reload without the header sends).
    let mut again = Stream::open(&server.addr, &format!("room=chat&cursor={id}"), "");
    assert_eq!(again.next_of("joined").json()["recovered"], true);
    assert_eq!(again.next_of("message").json()["message"], "while away 1");
}

#[test]
fn a_stream_cut_right_after_its_joined_event_resumes_with_the_same_replay() {
    let (server, _db) = start_serve(&["--rate-limit", "0"]);
    for i in 0..120 {
        publish(&server.addr, &json!({"room": "r", "message": format!("m{i}")}).to_string(), None);
    }
    // A fresh stream replays the recent messages after its `joined`; cut before the first of them.
    let mut fresh = Stream::open(&server.addr, "room=r", "");
    let joined = fresh.next_of("joined");
    let replay_from = fresh.next_of("message").json()["offset"].as_u64().unwrap();
    assert!(replay_from > 1, "a fresh stream replays only the recent messages ({replay_from})");
    drop(fresh);
    let id = joined.id.expect("the joined event carries the cursor");
    let mut back = Stream::open(&server.addr, "room=r", &format!("Last-Event-ID: {id}\r\n"));
    let rejoined = back.next_of("joined").json();
    assert_eq!(rejoined["recovered"], true, "nothing was lost: {rejoined}");
    assert_eq!(back.next_of("message").json()["offset"].as_u64(), Some(replay_from), "the same replay, no more");
    // A cursor that says "from now on" (u64::MAX) is the room's last offset once joined: the next
    // poll from the cursor it is given waits for new messages, rather than replay from offset 0.
    let epoch = rejoined["epoch"].as_str().unwrap();
    use base64::Engine as _;
    let now_on =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"r":["{epoch}",{}]}}"#, u64::MAX));
    let (status, answer) = poll(&server.addr, &format!("room=r&cursor={now_on}&wait=0"));
    assert_eq!((status, texts(&answer)), (200, Vec::<&str>::new()), "{answer}");
    let cursor = answer["cursor"].as_str().unwrap().to_owned();
    let (status, answer) = poll(&server.addr, &format!("room=r&cursor={cursor}&wait=0"));
    assert_eq!((status, texts(&answer)), (200, Vec::<&str>::new()), "nothing old comes back: {answer}");
    assert_eq!(answer["notices"], json!([]), "{answer}");
}

#[test]
fn a_cursor_from_another_history_is_told_recovered_false() {
    let (server, _db) = start_serve(&[]);
    publish(&server.addr, r#"{"room":"r","message":"one"}"#, None);
    let mut stream = Stream::open(&server.addr, "room=r", "");
    let joined = stream.next_of("joined");
    let epoch = joined.json()["epoch"].as_str().unwrap().to_owned();
    // A cursor that names another epoch for this room.
    use base64::Engine as _;
    let stale = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"r":["{epoch}x",1]}}"#));
    let mut resumed = Stream::open(&server.addr, &format!("room=r&cursor={stale}"), "");
    let joined = resumed.next_of("joined").json();
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(resumed.next_of("message").json()["message"], "one", "and the recent messages instead");
}

#[tokio::test]
async fn a_place_past_the_rooms_last_offset_gets_the_recent_messages_and_then_every_new_one() {
    // As after a restore from a backup that kept its epoch: the client has seen offsets the room
    // has not given out (again) yet.
    let (server, _db) = start_serve(&["--rate-limit", "0"]);
    publish(&server.addr, r#"{"room":"r","message":"one"}"#, None);
    let mut stream = Stream::open(&server.addr, "room=r", "");
    let epoch = stream.next_of("joined").json()["epoch"].as_str().unwrap().to_owned();
    use base64::Engine as _;
    let ahead = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"r":["{epoch}",999]}}"#));
    let mut resumed = Stream::open(&server.addr, &format!("room=r&cursor={ahead}"), "");
    let joined = resumed.next_of("joined").json();
    assert_eq!((joined["recovered"].as_bool(), joined["offset"].as_u64()), (Some(false), Some(1)), "{joined}");
    assert_eq!(resumed.next_of("message").json()["message"], "one", "the recent messages");
    let (status, answer) = poll(&server.addr, &format!("room=r&cursor={ahead}&wait=0"));
    assert_eq!((status, texts(&answer)), (200, vec!["one"]), "{answer}");
    let mut ws = v1_client(&server.addr).await;
    send(&mut ws, json!({"type": "join", "room": "r", "since": 999, "epoch": epoch})).await;
    let joined = next_of(&mut ws, "joined").await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(next_of(&mut ws, "message").await["message"], "one");
    // The next poll, from the cursor it was given, waits for what comes next and gets it.
    let cursor = answer["cursor"].as_str().unwrap().to_owned();
    let addr = server.addr.clone();
    let waiting = std::thread::spawn(move || poll(&addr, &format!("room=r&cursor={cursor}&wait=10")));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "a poll that is up to date waits");
    publish(&server.addr, r#"{"room":"r","message":"two"}"#, None);
    let (status, answer) = waiting.join().unwrap();
    assert_eq!((status, texts(&answer)), (200, vec!["two"]), "{answer}");
    assert_eq!(resumed.next_of("message").json()["message"], "two", "the stream delivers it too");
    assert_eq!(next_of(&mut ws, "message").await["message"], "two");
}

#[test]
fn a_cursor_past_retention_is_told_recovered_false_over_sse_and_long_polling() {
    let (server, _db) = start_serve(&["--history-max-messages", "3", "--rate-limit", "0"]);
    publish(&server.addr, r#"{"room":"r","message":"m1"}"#, None);
    let mut stream = Stream::open(&server.addr, "room=r", "");
    stream.next_of("joined");
    let first = stream.next_of("message");
    let place = first.id.expect("a message event carries the cursor");
    drop(stream);
    // Six more while away: the history keeps only the last three, so m2..m4 are gone.
    for i in 2..=7 {
        publish(&server.addr, &format!(r#"{{"room":"r","message":"m{i}"}}"#), None);
    }
    let mut resumed = Stream::open(&server.addr, &format!("room=r&cursor={place}"), "");
    let joined = resumed.next_of("joined").json();
    assert_eq!(joined["recovered"], false, "messages were lost to retention: {joined}");
    let rest: Vec<String> =
        (0..3).map(|_| resumed.next_of("message").json()["message"].as_str().unwrap().to_owned()).collect();
    assert_eq!(rest, ["m5", "m6", "m7"], "what is left, once");
    let (status, answer) = poll(&server.addr, &format!("room=r&cursor={place}&wait=0"));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(texts(&answer), ["m5", "m6", "m7"]);
    let told = answer.to_string();
    assert!(told.contains("\"recovered\":false"), "the poll says so too: {told}");
}

#[test]
fn bad_requests_get_a_4xx_naming_the_problem() {
    let (server, _db) = start_serve(&[]);
    let cases =
        [("", "at least one room"), ("room=bad%20room", "invalid room"), ("room=r&cursor=%25%25", "invalid cursor")];
    for (query, says) in cases {
        let stream = Stream::open(&server.addr, query, "");
        assert_eq!(stream.status, 400, "{query}");
        let body = stream.body();
        assert!(body["message"].as_str().unwrap().contains(says), "{query}: {body}");
    }
    // A Last-Event-ID that is not text is refused, not ignored (which would skip what was missed).
    let mut raw = TcpStream::connect(&server.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"GET /sse?room=r HTTP/1.1\r\nHost: x\r\nLast-Event-ID: \xff\xfe\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("Last-Event-ID is not text"), "{answer}");
    let (status, body) = publish(&server.addr, "[]", None);
    assert_eq!((status, body["message"].as_str()), (400, Some("the body must be a JSON object")), "{body}");
    let (status, body) = publish(&server.addr, "{not json", None);
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_json")), "{body}");
    let refused = |reason: &str| {
        support::metrics::metric(&server.addr, &format!(r#"switchboard_messages_refused_total{{reason="{reason}"}}"#))
    };
    assert_eq!(refused("bad_json"), Some(1.0), "a publish refused as it is read counts");
    let (status, body) = publish(&server.addr, r#"{"type":"join","room":"r","message":"m"}"#, None);
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "only a publish: {body}");
    let (status, body) = publish(&server.addr, r#"{"type":"publish","room":"r","message":"m","req":7}"#, None);
    assert_eq!(status, 200, "a WebSocket publish's fields are taken as they are: {body}");
    let (status, body) = publish(&server.addr, r#"{"room":"r"}"#, None);
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "{body}");
    let (status, body) = publish(&server.addr, r#"{"room":"no room","message":"m"}"#, None);
    assert_eq!(status, 400, "{body}");
    // What could only be served in part is refused whole: more rooms than one connection may be
    // in, a name over the limit (a stream without its `joined`, or a poll left out of presence).
    let many: Vec<String> = (0..65).map(|i| format!("room=r{i}")).collect();
    let long_name = format!("room=r&name={}", "n".repeat(65));
    for (query, code) in [(many.join("&"), "too_many"), (long_name, "too_long")] {
        let stream = Stream::open(&server.addr, &query, "");
        assert_eq!((stream.status, stream.body()["code"].as_str()), (400, Some(code)), "/sse {code}");
        let (status, body) = poll(&server.addr, &format!("{query}&client=c1&wait=0"));
        assert_eq!((status, body["code"].as_str()), (400, Some(code)), "/poll {code}: {body}");
    }
    // A name that does not decode to UTF-8 is refused, not shown as U+FFFD: `%FF` and `%EF%BF%BD`
    // would otherwise be one name.
    let stream = Stream::open(&server.addr, "room=r&name=%FF", "");
    assert_eq!(stream.status, 400);
    let body = stream.body();
    assert!(body["message"].as_str().unwrap().contains(r#""name" is not UTF-8"#), "{body}");
    let (status, body) = poll(&server.addr, "room=r&client=c1&name=%C3&wait=0");
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "{body}");
    let (status, body) = poll(&server.addr, "room=r&client=c1&name=%C3%A9&wait=0");
    assert_eq!(status, 200, "a name in UTF-8, escaped: {body}");

    let (closed, _db) = start_serve(&["--jwt-secret", "s3cret", "--allow-anonymous", "false"]);
    let stream = Stream::open(&closed.addr, "room=r", "");
    assert_eq!(stream.status, 401);
    assert!(stream.body()["message"].as_str().unwrap().contains("token is required"));
    let (status, _) = publish(&closed.addr, r#"{"room":"r","message":"m"}"#, Some("nonsense"));
    assert_eq!(status, 401);
}

/// `GET {target}` with `extra_headers`: the status and the JSON answer.
fn get(addr: &str, target: &str, extra_headers: &str) -> (u16, Value) {
    let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra_headers}\r\n");
    exchange(addr, &request, Duration::from_secs(10))
}

/// A server that lets in only tokens signed with `s3cret`, and pages of `origins`.
fn closed_serve_for(origins: &str) -> (support::Server, std::path::PathBuf) {
    start_serve(&["--jwt-secret", "s3cret", "--allow-anonymous", "false", "--allowed-origins", origins])
}

#[test]
fn origins_and_room_grants_hold_for_streams_and_polls_as_for_websockets() {
    let (server, _db) = closed_serve_for("https://chat.example.com");
    let minted = support::switchboard()
        .args(["token", "--sub", "ann", "--room", "lobby", "--secret", "s3cret"])
        .output()
        .unwrap();
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    let good = "Origin: https://chat.example.com\r\n";
    let evil = "Origin: https://evil.example\r\n";
    for path in ["/sse", "/poll"] {
        let wait = if path == "/poll" { "&wait=0" } else { "" };
        let target = |query: &str| format!("{path}?{query}{wait}");
        let (status, body) = get(&server.addr, &target(&format!("room=lobby&token={token}")), evil);
        assert_eq!((status, body["code"].as_str()), (403, Some("not_allowed")), "{path} from another origin: {body}");
        assert!(body["message"].as_str().unwrap().contains("origin"), "{body}");
        let (status, body) = get(&server.addr, &target(&format!("room=other&token={token}")), good);
        assert_eq!((status, body["code"].as_str()), (403, Some("not_allowed")), "{path}, a room not granted: {body}");
        assert!(body["message"].as_str().unwrap().contains("\"other\""), "{body}");
        let (status, body) = get(&server.addr, &target("room=lobby"), good);
        assert_eq!((status, body["code"].as_str()), (401, Some("bad_token")), "{path} without a token: {body}");
        let (status, body) = get(&server.addr, &target(&format!("room=bad%20room&token={token}")), good);
        assert_eq!(status, 400, "{path}, an invalid room: {body}");
        assert!(body["message"].as_str().unwrap().contains("invalid room"), "{body}");
    }
    // With the right origin and a granted room, both serve.
    let mut stream = Stream::open(&server.addr, &format!("room=lobby&token={token}"), good);
    assert_eq!(stream.status, 200);
    stream.next_of("joined");
    let (status, body) = get(&server.addr, &format!("/poll?room=lobby&token={token}&wait=0"), good);
    assert_eq!(status, 200, "{body}");
    // Each refusal is counted by its reason.
    let metrics = support::metrics::text(&server.addr);
    let count = |series: &str| support::metrics::sample(&metrics, series);
    assert_eq!(count(r#"switchboard_connections_refused_total{reason="origin"}"#), Some(2.0), "{metrics}");
    assert!(count(r#"switchboard_connections_refused_total{reason="auth"}"#) >= Some(2.0), "{metrics}");
}

/// The status line and headers (lower case) of a request sent as it is, on a fresh connection.
fn head_of(addr: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[test]
fn pages_of_allowed_origins_may_use_the_http_routes_from_their_own_origin() {
    let (server, _db) = start_serve(&["--allowed-origins", "https://chat.example.com,https://*.example.org"]);
    let addr = &server.addr;
    // Listed by name: the answer names the origin, and it may send credentials (the cookie).
    let named = Stream::open(addr, "room=r", "Origin: https://chat.example.com\r\n");
    let headers = named.headers.to_ascii_lowercase();
    assert_eq!(named.status, 200);
    assert!(headers.contains("access-control-allow-origin: https://chat.example.com\r\n"), "{headers}");
    assert!(headers.contains("access-control-allow-credentials: true\r\n"), "{headers}");
    assert!(headers.contains("vary: origin\r\n"), "{headers}");
    assert!(headers.contains("access-control-expose-headers: retry-after\r\n"), "{headers}");
    // By a subdomain pattern: the same.
    let wild = Stream::open(addr, "room=r", "Origin: https://a.example.org\r\n");
    let headers = wild.headers.to_ascii_lowercase();
    assert!(headers.contains("access-control-allow-origin: https://a.example.org\r\n"), "{headers}");
    assert!(headers.contains("access-control-allow-credentials: true\r\n"), "{headers}");
    // Let in by `*` alone (or by default): named in the answer, without credentials, as the cookie
    // rule has it.
    let (open, _db) = start_serve(&["--allowed-origins", "*"]);
    let any = Stream::open(&open.addr, "room=r", "Origin: https://any.example.net\r\n");
    let headers = any.headers.to_ascii_lowercase();
    assert!(headers.contains("access-control-allow-origin: https://any.example.net\r\n"), "{headers}");
    assert!(!headers.contains("access-control-allow-credentials"), "{headers}");
    // Not let in: refused, and nothing tells the browser it may read the answer.
    let other = Stream::open(addr, "room=r", "Origin: https://evil.example.net\r\n");
    assert_eq!(other.status, 403);
    assert!(!other.headers.to_ascii_lowercase().contains("access-control-allow-origin"), "{}", other.headers);
    // The preflight of a cross-origin JSON POST to /publish (and of a poll with a token header).
    for path in ["/publish", "/poll?room=r"] {
        let preflight = |origin: &str| {
            head_of(
                addr,
                &format!(
                    "OPTIONS {path} HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\
                     Access-Control-Request-Headers: content-type, authorization\r\nConnection: close\r\n\r\n"
                ),
            )
        };
        let head = preflight("https://chat.example.com");
        assert!(head.starts_with("http/1.1 204"), "{head}");
        assert!(head.contains("access-control-allow-origin: https://chat.example.com\r\n"), "{head}");
        assert!(head.contains("access-control-allow-methods: get, post\r\n"), "{head}");
        assert!(
            head.contains("access-control-allow-headers: authorization, content-type, last-event-id\r\n"),
            "{head}"
        );
        let head = preflight("https://evil.example.net");
        assert!(head.starts_with("http/1.1 403"), "{head}");
        assert!(!head.contains("access-control-allow-origin"), "{head}");
    }
    // The publish itself, from the named origin, and a refusal before the handler (the body over
    // its limit): the page can read both.
    let small = r#"{"room":"r","message":"from the other origin"}"#.to_owned();
    let big = format!(r#"{{"room":"r","message":"{}"}}"#, "x".repeat(83_000));
    for (body, status) in [(small, "200"), (big, "413")] {
        let head = head_of(
            addr,
            &format!(
                "POST /publish HTTP/1.1\r\nHost: x\r\nOrigin: https://chat.example.com\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        assert!(head.contains("access-control-allow-origin: https://chat.example.com\r\n"), "{head}");
    }
}

#[test]
fn a_client_address_holds_as_many_streams_as_the_per_address_limit() {
    let (server, _db) = start_serve(&["--max-connections-per-ip", "2"]);
    let mut first = Stream::open(&server.addr, "room=r", "");
    let _second = Stream::open(&server.addr, "room=r", "");
    assert_eq!(first.status, 200);
    first.next_of("joined");
    let third = Stream::open(&server.addr, "room=r", "");
    assert_eq!(third.status, 429, "{}", third.headers);
    assert!(third.headers.to_ascii_lowercase().contains("retry-after: 5"), "{}", third.headers);

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let again = Stream::open(&server.addr, "room=r", "");
        if again.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "a closed stream gives its place back: {}", again.status);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn publishes_are_idempotent_and_tokens_come_from_a_cookie_too() {
    let (server, _db) = start_serve(&["--jwt-secret", "s3cret", "--allow-anonymous", "false"]);
    let token = support::chat::token("s3cret", "ann", 600);
    let token = token.as_str();
    let mut stream = Stream::open(&server.addr, "room=r", &format!("Cookie: other=1; switchboard_token={token}\r\n"));
    assert_eq!(stream.status, 200, "the cookie's token lets it in");
    stream.next_of("joined");
    let body = r#"{"room":"r","message":"once","id":"abc"}"#;
    let auth = Some(token);
    let (status, first) = publish(&server.addr, body, auth);
    assert_eq!(status, 200, "{first}");
    let (_, second) = publish(&server.addr, body, auth);
    assert_eq!(first["acks"][0]["offset"], second["acks"][0]["offset"]);
    assert_eq!(second["acks"][0]["duplicate"], true);
    let message = stream.next_of("message").json();
    assert_eq!((message["message"].as_str(), message["name"].as_str()), (Some("once"), Some("ann")));
    let mut by_query = Stream::open(&server.addr, &format!("room=r&token={token}"), "");
    assert_eq!(by_query.status, 200, "and from ?token=");
    by_query.next_of("joined");
    // Another site's page can make the browser send the cookie, but not read or add a token: the
    // cookie does not count then (its browser says so), and nothing is published.
    let cookie = format!("Cookie: switchboard_token={token}\r\n");
    let foreign = format!("{cookie}Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\n");
    let forged = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n{foreign}\r\n{}",
        r#"{"room":"r","message":"forged"}"#.len(),
        r#"{"room":"r","message":"forged"}"#
    );
    let (status, body) = exchange(&server.addr, &forged, Duration::from_secs(10));
    assert_eq!((status, body["code"].as_str()), (401, Some("bad_token")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("Sec-Fetch-Site"), "the answer says why: {body}");
    for target in ["/sse?room=r", "/poll?room=r&wait=0"] {
        let (status, body) = get(&server.addr, target, &foreign);
        assert_eq!(status, 401, "{target} from another site with the cookie: {body}");
    }
    // The same cookie from the server's own page (or a browser that does not say) still counts.
    for site in ["Sec-Fetch-Site: same-origin\r\n", ""] {
        let (status, body) = get(&server.addr, "/poll?room=r&wait=0", &format!("{cookie}{site}"));
        assert_eq!(status, 200, "{site:?}: {body}");
    }
    let (status, body) =
        get(&server.addr, "/poll?room=r&wait=0", &format!("{foreign}Authorization: Bearer {token}\r\n"));
    assert_eq!(status, 200, "a token the page put in a header counts from any allowed origin: {body}");
    let (status, _) = publish(&server.addr, r#"{"room":"r","message":"after"}"#, auth);
    assert_eq!(status, 200);
    let next = stream.next_of("message").json();
    assert_eq!(next["message"], "after", "the forged publish reached no one: {next}");
}

#[test]
fn a_cookie_from_another_site_counts_when_allowed_origins_names_that_site() {
    let (server, _db) = closed_serve_for("https://app.example.com,*");
    let token = support::chat::token("s3cret", "ann", 600);
    let cookie = format!("Cookie: switchboard_token={token}\r\nSec-Fetch-Site: cross-site\r\n");
    let (status, body) =
        get(&server.addr, "/poll?room=r&wait=0", &format!("{cookie}Origin: https://app.example.com\r\n"));
    assert_eq!(status, 200, "named: {body}");
    let (status, body) =
        get(&server.addr, "/poll?room=r&wait=0", &format!("{cookie}Origin: https://other.example\r\n"));
    assert_eq!(status, 401, "allowed only by `*`: {body}");
}

#[test]
fn heartbeats_keep_coming_between_messages_and_an_expiring_token_ends_the_stream() {
    let (server, _db) =
        start_serve(&["--jwt-secret", "s3cret", "--allow-anonymous", "false", "--sse-heartbeat-secs", "1"]);
    let token = |ttl_secs| support::chat::token("s3cret", "ann", ttl_secs);
    let (long, short) = (token(600), token(6));
    let auth = Some(long.as_str());
    let mut stream = Stream::open(&server.addr, &format!("room=r&token={short}"), "");
    assert_eq!(stream.status, 200);
    stream.next_of("joined");
    let started = Instant::now();
    // Messages every 200 ms do not hold back the heartbeat: it comes once a second all the same, and
    // again after each one (the timer is set anew every time).
    let mut comments = 0;
    for i in 0..20 {
        let (status, ack) = publish(&server.addr, &format!(r#"{{"room":"r","message":"m{i}"}}"#), auth);
        assert_eq!(status, 200, "{ack}");
        loop {
            let event = stream.next();
            match event.kind.as_str() {
                "comment" => comments += 1,
                "message" => {
                    assert_eq!(event.json()["message"], format!("m{i}"));
                    break;
                }
                other => panic!("unexpected {other} event: {event:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(comments >= 3, "{comments} heartbeats in {:?} of messages", started.elapsed());
    // The token runs out 6 s after it was made: the stream says why it ends, then ends.
    let end = stream.next_of("error").json();
    assert_eq!((end["code"].as_str(), end["close"].as_u64()), (Some("closed"), Some(4001)), "{end}");
    assert!(started.elapsed() < Duration::from_secs(8), "ended by its expiry, not later: {:?}", started.elapsed());
    let mut rest = String::new();
    let _ = stream.reader.read_to_string(&mut rest);
    assert!(!rest.contains("event: message"), "nothing after the end: {rest:?}");
    assert_eq!(support::metrics::metric(&server.addr, "switchboard_token_expiries_total"), Some(1.0));
    assert_eq!(
        support::metrics::metric(&server.addr, r#"switchboard_connections_opened_total{transport="sse"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_listener_is_present_while_connected_and_idle_streams_hear_a_heartbeat() {
    let (server, _db) = start_serve(&["--sse-heartbeat-secs", "1"]);
    let mut watcher = v1_client(&server.addr).await;
    send(&mut watcher, json!({"type": "join", "room": "p", "name": "watcher"})).await;
    next_of(&mut watcher, "joined").await;
    let addr = server.addr.clone();
    let listening = std::thread::spawn(move || {
        let mut stream = Stream::open(&addr, "room=p&name=listener", "");
        stream.next_of("joined");
        let started = Instant::now();
        stream.next_of("comment");
        let waited = started.elapsed();
        drop(stream);
        waited
    });
    let joined = next_of(&mut watcher, "presence").await;
    assert_eq!((joined["event"].as_str(), joined["member"]["name"].as_str()), (Some("join"), Some("listener")));
    let waited = tokio::task::spawn_blocking(move || listening.join().unwrap()).await.unwrap();
    assert!(waited < Duration::from_millis(2500), "a heartbeat within the 1 s setting: {waited:?}");
    let left = next_of(&mut watcher, "presence").await;
    assert_eq!((left["event"].as_str(), left["member"]["name"].as_str()), (Some("leave"), Some("listener")));
}

#[tokio::test]
async fn a_stream_that_does_not_read_is_cut_off_like_a_slow_websocket() {
    let (server, _db) = start_serve(&[
        "--rate-limit",
        "0",
        "--outbox-messages",
        "16",
        "--max-message-chars",
        "60000",
        "--send-timeout-secs",
        "2",
    ]);
    // Opened, and never read again.
    let mut stalled = Stream::open(&server.addr, "room=slow&name=stalled", "");
    stalled.next_of("joined");
    let big = "x".repeat(50_000);
    let mut writer = v1_client(&server.addr).await;
    for i in 0..400 {
        send(&mut writer, json!({"type": "publish", "room": "slow", "message": format!("{i} {big}")})).await;
    }
    // Every publish stored before the probes join: a probe that joined during the fan-out and did
    // not read would be a slow consumer too.
    for _ in 0..400 {
        next_of(&mut writer, "ack").await;
    }
    // The stalled stream is dropped from the room: a member joining now does not see it listed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut probe = v1_client(&server.addr).await;
        send(&mut probe, json!({"type": "join", "room": "slow", "name": "probe"})).await;
        let joined = next_of(&mut probe, "joined").await;
        let names: Vec<&str> =
            joined["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
        if !names.contains(&"stalled") {
            break;
        }
        drop(probe);
        assert!(Instant::now() < deadline, "the stalled stream is still a member: {names:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Counted as a slow consumer, by its transport, once the server has closed the connection that
    // took nothing for --send-timeout-secs: the client keeps it open and still reads nothing. What
    // it did take counts as delivered over SSE.
    let metrics =
        support::metrics::wait_for(&server.addr, r#"switchboard_slow_consumer_cuts_total{transport="sse"}"#, 1.0);
    drop(stalled);
    assert_eq!(
        support::metrics::sample(&metrics, r#"switchboard_slow_consumer_cuts_total{transport="sse"}"#),
        Some(1.0)
    );
    assert_eq!(
        support::metrics::metric(&server.addr, r#"switchboard_slow_consumer_cuts_total{transport="websocket"}"#),
        Some(0.0)
    );
    assert!(
        support::metrics::metric(&server.addr, r#"switchboard_messages_delivered_total{transport="sse"}"#) >= Some(1.0)
    );
}

/// `GET /poll?...`: the status and the JSON answer.
fn poll(addr: &str, query: &str) -> (u16, Value) {
    // Long enough for the longest wait a poll may ask for.
    let request = format!("GET /poll?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    exchange(addr, &request, Duration::from_secs(70))
}

fn texts(answer: &Value) -> Vec<&str> {
    answer["messages"].as_array().unwrap().iter().map(|m| m["message"].as_str().unwrap()).collect()
}

#[test]
fn long_polls_answer_at_once_wait_for_a_publish_and_share_the_sse_cursor() {
    let (server, _db) = start_serve(&["--rate-limit", "0"]);
    publish(&server.addr, r#"{"room":"lp","message":"one"}"#, None);
    publish(&server.addr, r#"{"room":"lp","message":"two"}"#, None);
    let (status, first) = poll(&server.addr, "room=lp");
    assert_eq!(status, 200, "{first}");
    assert_eq!(texts(&first), ["one", "two"]);
    let cursor = first["cursor"].as_str().unwrap().to_owned();

    // Nothing after the cursor: the poll waits until a publish releases it.
    let addr = server.addr.clone();
    let query = format!("room=lp&cursor={cursor}&wait=10");
    let waiting = std::thread::spawn(move || {
        let started = Instant::now();
        (poll(&addr, &query), started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(400));
    publish(&server.addr, r#"{"room":"lp","message":"three"}"#, None);
    let ((status, released), took) = waiting.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(texts(&released), ["three"]);
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "released by the publish: {took:?}");
    let next = released["cursor"].as_str().unwrap().to_owned();

    // The answer got lost: asking again with the old cursor gets the same message.
    assert_eq!(texts(&poll(&server.addr, &format!("room=lp&cursor={cursor}&wait=0")).1), ["three"]);
    // Up to date: an empty list once the wait is over, and the cursor stays.
    let started = Instant::now();
    let (_, empty) = poll(&server.addr, &format!("room=lp&cursor={next}&wait=1"));
    assert!(texts(&empty).is_empty() && started.elapsed() >= Duration::from_millis(900));
    assert_eq!(empty["cursor"], next.as_str());
    // The same cursor works for SSE: the stream goes on from it.
    let mut stream = Stream::open(&server.addr, &format!("room=lp&cursor={cursor}"), "");
    assert_eq!(stream.next_of("message").json()["message"], "three");

    for bad in ["room=lp&wait=soon", "room=lp&wait=61", "room=lp&cursor=nope!", "wait=1"] {
        let (status, body) = poll(&server.addr, bad);
        assert_eq!((status, body["type"].as_str()), (400, Some("error")), "{bad}: {body}");
    }
}

#[tokio::test]
async fn a_long_poll_is_not_announced_in_presence() {
    let (server, _db) = start_serve(&[]);
    let mut watcher = v1_client(&server.addr).await;
    send(&mut watcher, json!({"type": "join", "room": "quiet", "name": "watcher"})).await;
    next_of(&mut watcher, "joined").await;
    let addr = server.addr.clone();
    let (status, _) = tokio::task::spawn_blocking(move || poll(&addr, "room=quiet&wait=1")).await.unwrap();
    assert_eq!(status, 200);
    support::chat::quiet(&mut watcher, 300).await;
}

#[tokio::test]
async fn a_long_polling_client_is_present_while_it_polls_and_leaves_after_the_grace_period() {
    let (server, _db) = start_serve(&["--poll-grace-secs", "2"]);
    let mut watcher = v1_client(&server.addr).await;
    send(&mut watcher, json!({"type": "join", "room": "lpp", "name": "watcher"})).await;
    next_of(&mut watcher, "joined").await;
    let addr = server.addr.clone();
    let poll_once = move || {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || poll(&addr, "room=lpp&client=c1&name=Polly&wait=0"))
    };
    assert_eq!(poll_once().await.unwrap().0, 200);
    let joined = next_of(&mut watcher, "presence").await;
    assert_eq!((joined["event"].as_str(), joined["member"]["name"].as_str()), (Some("join"), Some("Polly")));
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(poll_once().await.unwrap().0, 200);
    }
    support::chat::quiet(&mut watcher, 300).await; // polling again announces nothing
    send(&mut watcher, json!({"type": "presence", "room": "lpp", "req": 1})).await;
    let listed = next_of(&mut watcher, "presence").await;
    let names: Vec<&str> = listed["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"Polly"), "listed while polling: {names:?}");
    let left = next_of(&mut watcher, "presence").await;
    assert_eq!((left["event"].as_str(), left["member"]["name"].as_str()), (Some("leave"), Some("Polly")));
    let after = started.elapsed();
    assert!(after >= Duration::from_millis(1500) && after < Duration::from_secs(5), "left after the grace: {after:?}");
}

#[test]
fn http_publishes_have_the_rate_limit_of_a_websocket() {
    let (server, _db) = start_serve(&["--rate-limit", "2", "--rate-burst", "3"]);
    let statuses: Vec<u16> =
        (0..6).map(|i| publish(&server.addr, &format!(r#"{{"room":"r","message":"{i}"}}"#), None).0).collect();
    assert_eq!(&statuses[..3], [200, 200, 200], "the burst: {statuses:?}");
    assert!(statuses[3..].contains(&429), "then too fast: {statuses:?}");
    let (status, body) = publish(&server.addr, r#"{"room":"r","message":"again"}"#, None);
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("rate limit"), "{body}");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(publish(&server.addr, r#"{"room":"r","message":"later"}"#, None).0, 200, "the bucket refills");
}

#[test]
fn a_long_polling_client_takes_one_of_its_users_sessions_and_no_more() {
    let (server, _db) = start_serve(&["--jwt-secret", "s3cret", "--max-connections-per-user", "1"]);
    let token = support::chat::token("s3cret", "kim", 600);
    let poll_as = |client: &str, query: &str| poll(&server.addr, &format!("{query}&client={client}&token={token}"));
    // The client's kept presence is kim's one session; its polls do not count a second.
    for _ in 0..2 {
        let (status, body) = poll_as("c1", "room=r&wait=0");
        assert_eq!(status, 200, "{body}");
    }
    // New rooms (or a new name) replace the kept session: its place passes to the new one.
    let (status, body) = poll_as("c1", "room=s&wait=0");
    assert_eq!(status, 200, "the same client in other rooms: {body}");
    // Another client of kim's is over the limit, and is told so.
    let (status, body) = poll_as("c2", "room=s&wait=0");
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many")), "{body}");
    // One poll at a time stands in the kept session's place: a second one at once counts on its own.
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| poll_as("c1", "room=s&wait=3"));
        std::thread::sleep(Duration::from_millis(500));
        let (status, body) = poll_as("c1", "room=s&wait=0");
        assert_eq!((status, body["code"].as_str()), (429, Some("too_many")), "{body}");
        assert_eq!(waiting.join().unwrap().0, 200);
    });
    let (status, body) = poll_as("c1", "room=s&wait=0");
    assert_eq!(status, 200, "the place is free again once the poll is answered: {body}");
}

#[test]
fn the_server_api_disconnects_a_poll_that_stands_in_its_clients_place() {
    let (server, _db) = start_serve(&["--jwt-secret", "s3cret", "--api-key", "k"]);
    let token = support::chat::token("s3cret", "kim", 600);
    let query = format!("room=r&client=c1&token={token}");
    assert_eq!(poll(&server.addr, &format!("{query}&wait=0")).0, 200, "the client's presence is kept");
    std::thread::scope(|scope| {
        // This poll is in the kept session's place, counted through it.
        let waiting = scope.spawn(|| {
            let started = Instant::now();
            (poll(&server.addr, &format!("{query}&wait=30")), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(500));
        let body = r#"{"code": 4100, "reason": "account closed"}"#;
        let (status, answer) =
            support::http_json(&server.addr, "POST", "/api/users/kim/disconnect", Some("k"), Some(body));
        assert_eq!(status, 200, "{answer}");
        let ((status, body), took) = waiting.join().unwrap();
        assert!(took < Duration::from_secs(10), "the poll ended with the disconnect, not its wait: {took:?}");
        assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")), "{body}");
        assert!(body["message"].as_str().unwrap().contains("account closed"), "{body}");
        assert_eq!(answer["sessions_here"], 2, "the kept presence and the poll: {answer}");
    });
}

#[test]
fn each_long_polling_client_kept_present_holds_a_place_in_the_per_address_limit() {
    // Before, any number of made-up client ids from one address were kept present (8,000 in five
    // seconds, each a join and later a leave for every member of the room).
    let (server, _db) = start_serve(&["--max-connections-per-ip", "3"]);
    // Each poll is a connection of its own, and the last one's place may not be given back yet: a
    // refusal before the request is read (no JSON body) is that, and is tried again.
    let poll_settled = |query: &str| {
        for _ in 0..50 {
            let (status, body) = poll(&server.addr, query);
            if !(status == 429 && body.is_null()) {
                return (status, body);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the connection limit never let a poll through")
    };
    for client in ["c1", "c2"] {
        let (status, body) = poll_settled(&format!("room=r&client={client}&name={client}&wait=0"));
        assert_eq!(status, 200, "{client}: {body}");
    }
    // Two kept, and this poll's own connection: the third id has no place left.
    let (status, body) = poll_settled("room=r&client=c3&name=c3&wait=0");
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many")), "{body}");
    let (status, body) = poll_settled("room=r&client=c1&name=c1&wait=0");
    assert_eq!(status, 200, "a kept client polls on in its place: {body}");
    let (status, _) = poll_settled("room=r&wait=0");
    assert_eq!(status, 200, "a poll without a client id keeps no place");
}
