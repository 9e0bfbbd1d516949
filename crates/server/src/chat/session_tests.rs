//! Sessions driven without any transport: a fake client hands text to [`Session`], settles what waits
//! for the engine, and reads the hub's deliveries; time is a hand-driven clock.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::*;
use crate::chat::access::{mint, unix_now, Access, Claims, OriginPolicy, Verifier};
use crate::chat::hub::Hub;
use crate::chat::limits::{HubLimits, RateLimit, SessionLimits};
use crate::chat::message::{Clock, NodeId};
use crate::engine::memory::{LocalPresence, MemoryEngine};
use crate::engine::{Deliver, Engine, Retention, UserCommand};

const SECRET: &[u8] = b"test-secret";

/// A clock that moves only when told to.
struct TestClock {
    now: Mutex<(Instant, SystemTime)>,
}

impl TestClock {
    fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap();
        now.0 += by;
        now.1 += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> Instant {
        self.now.lock().unwrap().0
    }

    fn wall(&self) -> SystemTime {
        self.now.lock().unwrap().1
    }
}

struct Chat {
    core: Arc<Core>,
    clock: Arc<TestClock>,
}

struct Options {
    anonymous: bool,
    rate: Option<RateLimit>,
    outbox_messages: usize,
    max_replay: usize,
    max_sessions_per_user: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { anonymous: true, rate: None, outbox_messages: 100, max_replay: 100, max_sessions_per_user: 0 }
    }
}

fn chat(options: Options) -> Chat {
    chat_on(options, |engine| engine)
}

/// A chat whose engine is the memory engine as `wrap` returns it (the hub is attached to that).
fn chat_on(options: Options, wrap: impl FnOnce(Arc<dyn Engine>) -> Arc<dyn Engine>) -> Chat {
    let limits = HubLimits {
        outbox_messages: options.outbox_messages,
        outbox_bytes: 1 << 20,
        max_rooms_per_connection: 4,
        max_presence: 10,
        max_sessions_per_user: options.max_sessions_per_user,
    };
    let hub = Hub::new(limits, "lobby".into(), NodeId::new("t"), Arc::new(LocalPresence::default()));
    let retention = Retention { max_messages: 1000, max_age: None, max_db_bytes: None };
    let engine = wrap(MemoryEngine::new(retention, hub.clone()));
    hub.attach(&engine);
    let access = Access {
        verifier: Some(Verifier::hs256(SECRET)),
        allow_anonymous: options.anonymous,
        origins: OriginPolicy::any(),
        api_key: None,
    };
    let clock = Arc::new(TestClock { now: Mutex::new((Instant::now(), SystemTime::now())) });
    let core = Arc::new(Core {
        hub,
        engine,
        access: Arc::new(access),
        limits: SessionLimits {
            max_message_chars: 100,
            max_name_chars: 10,
            join_backlog: 2,
            max_replay: options.max_replay,
            rate_limit: options.rate,
            auth_timeout: Duration::from_secs(10),
            max_publish_rooms: 3,
            max_replay_bytes: 1 << 20,
        },
        clock: clock.clone(),
    });
    Chat { core, clock }
}

fn token(sub: &str, ttl: u64, rooms: Option<&[&str]>) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: unix_now() + ttl,
        name: None,
        rooms: rooms.map(|r| r.iter().map(|s| s.to_string()).collect()),
        join: None,
        publish: None,
    };
    mint(SECRET, &claims).unwrap()
}

/// The fake transport: one session, its envelopes as JSON.
struct Client {
    session: Session,
}

impl Chat {
    fn client(&self, dialect: Dialect) -> Client {
        let mut session = Session::new(self.core.clone(), dialect);
        let identity = self.core.access.allow_anonymous.then(Identity::anonymous);
        session.start(identity).unwrap();
        Client { session }
    }

    fn v1(&self) -> Client {
        self.client(Dialect::V1)
    }
}

fn parse(texts: Vec<String>) -> Vec<Value> {
    texts.iter().map(|t| serde_json::from_str(t).unwrap()).collect()
}

impl Client {
    /// Sends a request and returns every answer, the ones that waited for the engine included.
    async fn send(&mut self, request: Value) -> Result<Vec<Value>, End> {
        let mut out = parse(self.session.on_text(&request.to_string())?);
        for replies in self.session.settle().await {
            out.extend(parse(replies?));
        }
        Ok(out)
    }

    async fn join(&mut self, room: &str) -> Vec<Value> {
        self.send(json!({"type": "join", "room": room, "name": "me"})).await.unwrap()
    }

    async fn publish(&mut self, room: &str, message: &str) -> Value {
        let answers = self.send(json!({"type": "publish", "room": room, "message": message})).await.unwrap();
        answers.into_iter().next().expect("an ack")
    }

    /// What the hub delivered so far.
    fn delivered(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.session.try_delivery()).map(|b| serde_json::from_str(&b).unwrap()).collect()
    }

    fn delivered_messages(&mut self) -> Vec<Value> {
        self.delivered().into_iter().filter(|v| v["type"] == "message" || v.get("type").is_none()).collect()
    }
}

#[tokio::test]
async fn a_seed_message_reaches_seed_and_v1_members_in_their_own_shapes() {
    let chat = chat(Options::default());
    let mut seed = chat.client(Dialect::Seed);
    let mut v1 = chat.v1();
    v1.join("lobby").await;
    let replies = seed.session.on_text(r#"{"name": "Ann", "message": "<b>hi</b>"}"#).unwrap();
    assert!(replies.is_empty(), "the seed protocol has no acknowledgements");
    seed.session.settle().await;
    let seen = seed.delivered();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].as_object().unwrap().keys().collect::<Vec<_>>(), vec!["name", "message", "time"]);
    // The test server signs users in, so an anonymous name is marked as a guest's.
    assert_eq!((seen[0]["name"].as_str(), seen[0]["message"].as_str()), (Some("Ann (guest)"), Some("<b>hi</b>")));
    let envelope = &v1.delivered_messages()[0];
    assert_eq!((envelope["type"].as_str(), envelope["offset"].as_u64()), (Some("message"), Some(1)));
}

#[tokio::test]
async fn a_seed_client_that_breaks_the_protocol_is_closed_with_the_reason() {
    let chat = chat(Options::default());
    let mut seed = chat.client(Dialect::Seed);
    let end = seed.session.on_text("not json").unwrap_err();
    assert_eq!(end.code, INVALID_PAYLOAD);
    assert!(end.reason.contains("expected JSON"), "{}", end.reason);
    assert_eq!(seed.session.on_binary().unwrap_err().code, UNSUPPORTED_DATA);
    let long = json!({"name": "x".repeat(11), "message": "hi"}).to_string();
    assert_eq!(seed.session.on_text(&long).unwrap_err().code, MESSAGE_TOO_BIG);
}

#[tokio::test]
async fn join_answers_with_the_room_its_members_and_the_recent_backlog() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.join("r").await;
    for text in ["one", "two", "three"] {
        ann.publish("r", text).await;
    }
    let mut bob = chat.v1();
    let answers = bob.send(json!({"type": "join", "room": "r", "name": "Bob", "req": 9})).await.unwrap();
    let joined = &answers[0];
    assert_eq!(
        (joined["type"].as_str(), joined["offset"].as_u64(), joined["req"].as_u64()),
        (Some("joined"), Some(3), Some(9))
    );
    assert_eq!(joined["recovered"], Value::Null, "no since, nothing to recover");
    let names: Vec<&str> = joined["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["me (guest)", "Bob (guest)"]);
    assert!(joined["members"][0]["id"].as_str().unwrap().starts_with("t-"), "ids name the node");
    let backlog: Vec<&str> = answers[1..].iter().map(|m| m["message"].as_str().unwrap()).collect();
    assert_eq!(backlog, vec!["two", "three"], "the last join_backlog (2) messages");
    let event = ann.delivered().into_iter().find(|v| v["type"] == "presence").expect("Ann hears Bob join");
    assert_eq!((event["event"].as_str(), event["member"]["name"].as_str()), (Some("join"), Some("Bob (guest)")));
}

#[tokio::test]
async fn leave_answers_and_leaving_a_room_one_is_not_in_is_an_error_naming_the_request() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.join("r").await;
    let left = ann.send(json!({"type": "leave", "room": "r", "req": "a"})).await.unwrap();
    assert_eq!(left, vec![json!({"type": "left", "room": "r", "req": "a"})]);
    let again = ann.send(json!({"type": "leave", "room": "r", "req": "b"})).await.unwrap();
    assert_eq!((again[0]["code"].as_str(), again[0]["req"].as_str()), (Some("unknown_room"), Some("b")));
    ann.publish("r", "after leaving").await;
    assert!(ann.delivered_messages().is_empty(), "no deliveries from a room left");
}

#[tokio::test]
async fn publishes_are_acknowledged_in_order_with_their_offsets() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.join("r").await;
    let mut acks = Vec::new();
    for n in 0..3 {
        acks.extend(parse(
            ann.session
                .on_text(&json!({"type": "publish", "room": "r", "message": "m", "req": n}).to_string())
                .unwrap(),
        ));
    }
    assert!(acks.is_empty(), "acks wait for the commit");
    for replies in ann.session.settle().await {
        acks.extend(parse(replies.unwrap()));
    }
    let seen: Vec<(u64, u64)> =
        acks.iter().map(|a| (a["req"].as_u64().unwrap(), a["offset"].as_u64().unwrap())).collect();
    assert_eq!(seen, vec![(0, 1), (1, 2), (2, 3)]);
    let offsets: Vec<u64> = ann.delivered_messages().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![1, 2, 3], "the publisher is a member too");
}

#[tokio::test]
async fn a_repeated_id_gets_the_original_offset_and_is_delivered_once() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.join("r").await;
    let publish = json!({"type": "publish", "room": "r", "message": "once", "id": "k-1"});
    let first = ann.send(publish.clone()).await.unwrap();
    ann.publish("r", "between").await;
    let again = ann.send(publish).await.unwrap();
    assert_eq!((first[0]["offset"].as_u64(), first[0]["duplicate"].as_bool()), (Some(1), Some(false)));
    assert_eq!((again[0]["offset"].as_u64(), again[0]["duplicate"].as_bool()), (Some(1), Some(true)));
    assert_eq!(ann.delivered_messages().len(), 2, "the duplicate was not delivered");
}

#[tokio::test]
async fn resume_replays_exactly_what_was_missed_and_says_it_recovered() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.join("r").await;
    for n in 1..=5 {
        ann.publish("r", &format!("m{n}")).await;
    }
    let mut bob = chat.v1();
    let answers = bob.send(json!({"type": "join", "room": "r", "since": 2})).await.unwrap();
    assert_eq!(answers[0]["recovered"], true);
    let replay: Vec<u64> = answers[1..].iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(replay, vec![3, 4, 5]);
    ann.publish("r", "m6").await;
    let live: Vec<u64> = bob.delivered_messages().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(live, vec![6], "live delivery picks up after the replay, no repeat");
    let mut carl = chat.v1();
    let up_to_date = carl.send(json!({"type": "join", "room": "r", "since": 6})).await.unwrap();
    assert_eq!((up_to_date.len(), up_to_date[0]["recovered"].as_bool()), (1, Some(true)));
}

#[tokio::test]
async fn resume_past_the_replay_limit_or_from_another_epoch_is_not_recovered() {
    let chat = chat(Options { max_replay: 2, ..Options::default() });
    let mut ann = chat.v1();
    let joined = ann.join("r").await;
    let epoch = joined[0]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=5 {
        ann.publish("r", &format!("m{n}")).await;
    }
    let mut bob = chat.v1();
    let far = bob.send(json!({"type": "join", "room": "r", "since": 1, "epoch": epoch})).await.unwrap();
    assert_eq!(far[0]["recovered"], false, "4 missed, 2 replayable");
    assert_eq!(far[0]["first"].as_u64(), Some(4), "where what was sent starts: {}", far[0]);
    let mut carl = chat.v1();
    let other = carl.send(json!({"type": "join", "room": "r", "since": 5, "epoch": "a-lost-history"})).await.unwrap();
    assert_eq!(other[0]["recovered"], false, "offsets of another epoch are void");
    assert_eq!(other[0]["epoch"].as_str(), Some(epoch.as_str()));
}

#[tokio::test]
async fn a_replay_and_a_history_answer_hold_at_most_the_outbox_bytes_and_a_resume_past_them_is_told() {
    let mut chat = chat(Options::default());
    Arc::get_mut(&mut chat.core).unwrap().limits.max_replay_bytes = 1000;
    let mut ann = chat.v1();
    let joined = ann.join("r").await;
    let epoch = joined[0]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=10 {
        ann.publish("r", &format!("{n:0>90}")).await; // about 250 bytes an envelope
    }
    let mut bob = chat.v1();
    let answers = bob.send(json!({"type": "join", "room": "r", "since": 2, "epoch": epoch})).await.unwrap();
    let replay: Vec<u64> = answers[1..].iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    let bytes: usize = answers[1..].iter().map(|m| m.to_string().len()).sum();
    assert!(bytes <= 1000 && replay.len() >= 3, "{bytes} bytes: {replay:?}");
    assert_eq!(replay.last(), Some(&10), "the newest ones");
    assert_eq!(
        (answers[0]["recovered"].as_bool(), answers[0]["first"].as_u64()),
        (Some(false), Some(replay[0])),
        "what did not fit is missing, and said so: {}",
        answers[0]
    );
    let mut carl = chat.v1();
    let near = carl.send(json!({"type": "join", "room": "r", "since": 8, "epoch": epoch})).await.unwrap();
    assert_eq!((near[0]["recovered"].as_bool(), near.len()), (Some(true), 3), "two fit");
    // A long poll gets the oldest that fit instead, and its cursor goes on from there: no gap.
    let mut dan = chat.v1();
    dan.session.set_transport(crate::metrics::Transport::LongPoll);
    let poll = dan.send(json!({"type": "join", "room": "r", "since": 2, "epoch": epoch})).await.unwrap();
    let replay: Vec<u64> = poll[1..].iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert!(replay.len() >= 3 && replay.len() < 8, "{replay:?}");
    assert!(replay.iter().copied().eq(3..3 + replay.len() as u64), "from the first missed on: {replay:?}");
    assert_eq!(poll[0]["recovered"].as_bool(), Some(true), "{}", poll[0]);
    let history = ann.send(json!({"type": "history", "room": "r"})).await.unwrap();
    let offsets: Vec<u64> =
        history[0]["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert!(offsets.len() >= 3 && offsets.len() < 10 && offsets.last() == Some(&10), "{offsets:?}");
    let too_many = ann.send(json!({"type": "history", "room": "r", "limit": 100_000})).await.unwrap();
    assert_eq!(too_many[0]["code"].as_str(), Some("bad_request"), "past max_replay: {}", too_many[0]);
}

#[tokio::test]
async fn a_message_committed_while_a_join_reads_its_replay_arrives_once() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.join("r").await;
    ann.publish("r", "before").await;
    let mut bob = chat.v1();
    // Bob's join is queued (held in the hub) but its replay not yet read when "during" commits.
    assert!(bob.session.on_text(&json!({"type": "join", "room": "r", "since": 0}).to_string()).unwrap().is_empty());
    ann.publish("r", "during").await;
    let mut seen = Vec::new();
    for replies in bob.session.settle().await {
        seen.extend(parse(replies.unwrap()).into_iter().filter(|v| v["type"] == "message"));
    }
    seen.extend(bob.delivered_messages());
    let offsets: Vec<u64> = seen.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![1, 2], "each message once, in order");
}

#[tokio::test]
async fn a_ping_is_answered_with_a_pong_naming_it() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    let answers = ann.send(json!({"type": "ping", "req": 9})).await.unwrap();
    assert_eq!(answers, vec![json!({"type": "pong", "req": 9})]);
    let extra = ann.send(json!({"type": "ping", "room": "r"})).await.unwrap();
    assert_eq!(extra[0]["code"].as_str(), Some("bad_request"), "unknown fields are refused: {}", extra[0]);
}

#[tokio::test]
async fn history_reads_a_room_after_an_offset() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.join("r").await;
    for n in 1..=4 {
        ann.publish("r", &format!("m{n}")).await;
    }
    let answers = ann.send(json!({"type": "history", "room": "r", "since": 1, "limit": 2, "req": 3})).await.unwrap();
    let history = &answers[0];
    assert_eq!(
        (history["type"].as_str(), history["last"].as_u64(), history["req"].as_u64()),
        (Some("history"), Some(4), Some(3))
    );
    let offsets: Vec<u64> =
        history["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![3, 4], "the newest two after offset 1");
    let past = ann.send(json!({"type": "history", "room": "r", "since": u64::MAX})).await.unwrap();
    assert_eq!(past[0]["messages"], json!([]), "nothing after an offset past the last: {}", past[0]);
    let none = ann.send(json!({"type": "history", "room": "r", "limit": 0, "req": 5})).await.unwrap();
    assert_eq!((none[0]["code"].as_str(), none[0]["req"].as_u64()), (Some("bad_request"), Some(5)), "{}", none[0]);
}

#[tokio::test]
async fn presence_lists_full_protocol_members_only() {
    let chat = chat(Options::default());
    let _seed = chat.client(Dialect::Seed);
    let mut ann = chat.v1();
    ann.join("lobby").await;
    let answers = ann.send(json!({"type": "presence", "room": "lobby", "req": 1})).await.unwrap();
    assert_eq!(answers[0]["members"].as_array().unwrap().len(), 1, "{}", answers[0]);
    assert_eq!(answers[0]["truncated"], false);
    let elsewhere = ann.send(json!({"type": "presence", "room": "other"})).await.unwrap();
    assert_eq!(elsewhere[0]["code"], "unknown_room");
}

#[tokio::test]
async fn bad_requests_get_errors_that_name_them() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    let not_json = parse(ann.session.on_text("{oops").unwrap());
    assert_eq!((not_json[0]["code"].as_str(), &not_json[0]["req"]), (Some("bad_json"), &Value::Null));
    let unknown = ann.send(json!({"type": "dance", "req": "x"})).await.unwrap();
    assert_eq!((unknown[0]["code"].as_str(), unknown[0]["req"].as_str()), (Some("bad_request"), Some("x")));
    let bad_room = ann.send(json!({"type": "join", "room": "no spaces", "req": 2})).await.unwrap();
    assert_eq!((bad_room[0]["code"].as_str(), bad_room[0]["req"].as_u64()), (Some("bad_request"), Some(2)));
    let long = ann.send(json!({"type": "publish", "room": "r", "message": "x".repeat(101), "req": 3})).await.unwrap();
    assert_eq!(long[0]["code"], "too_long");
    let binary = parse(ann.session.on_binary().unwrap());
    assert_eq!(binary[0]["code"], "bad_request");
    for room in ["a", "b", "c", "d"] {
        ann.join(room).await;
    }
    let fifth = ann.send(json!({"type": "join", "room": "e", "req": 5})).await.unwrap();
    assert_eq!((fifth[0]["code"].as_str(), fifth[0]["req"].as_u64()), (Some("too_many"), Some(5)));
}

#[tokio::test]
async fn without_a_token_nothing_is_served_and_the_time_to_send_one_runs_out() {
    let chat = chat(Options { anonymous: false, ..Options::default() });
    let mut client = chat.v1();
    let end = client.session.on_text(&json!({"type": "join", "room": "r"}).to_string()).unwrap_err();
    assert_eq!(end.code, UNAUTHORIZED);
    let mut late = chat.v1();
    assert_eq!(late.session.deadline(), Some(chat.clock.now() + Duration::from_secs(10)));
    chat.clock.advance(Duration::from_secs(9));
    assert!(late.session.check_deadline().is_ok());
    chat.clock.advance(Duration::from_secs(1));
    let end = late.session.check_deadline().unwrap_err();
    assert_eq!(end.code, UNAUTHORIZED);
    assert!(end.reason.contains("no token arrived in time"), "{}", end.reason);
    let mut bad = chat.v1();
    let end = bad.session.on_text(&json!({"type": "auth", "token": "garbage"}).to_string()).unwrap_err();
    assert_eq!(end.code, UNAUTHORIZED, "a bad first token ends the session");
}

#[tokio::test]
async fn a_token_expires_unless_a_fresh_one_arrives_and_a_narrower_one_leaves_rooms() {
    let chat = chat(Options { anonymous: false, ..Options::default() });
    let mut ann = chat.v1();
    let authed = ann.send(json!({"type": "auth", "token": token("ann", 60, None), "req": 1})).await.unwrap();
    assert_eq!((authed[0]["type"].as_str(), authed[0]["sub"].as_str()), (Some("authed"), Some("ann")));
    ann.join("a").await;
    ann.join("b").await;
    chat.clock.advance(Duration::from_secs(50));
    assert!(ann.session.check_deadline().is_ok());
    let refreshed = ann.send(json!({"type": "auth", "token": token("ann", 600, Some(&["a"]))})).await.unwrap();
    assert_eq!(refreshed[0]["type"], "authed");
    assert_eq!(refreshed[1], json!({"type": "left", "room": "b", "reason": "not_allowed", "req": null}));
    chat.clock.advance(Duration::from_secs(20));
    assert!(ann.session.check_deadline().is_ok(), "the fresh token holds past the first one's expiry");
    let other = ann.send(json!({"type": "auth", "token": token("bob", 600, None), "req": 2})).await.unwrap();
    assert_eq!((other[0]["code"].as_str(), other[0]["req"].as_u64()), (Some("bad_token"), Some(2)));
    chat.clock.advance(Duration::from_secs(600));
    assert_eq!(ann.session.check_deadline().unwrap_err(), End::new(UNAUTHORIZED, "token expired"));
}

#[tokio::test]
async fn a_token_that_does_not_grant_a_room_cannot_use_it() {
    let chat = chat(Options { anonymous: false, ..Options::default() });
    let mut ann = chat.v1();
    ann.send(json!({"type": "auth", "token": token("ann", 60, Some(&["mine"]))})).await.unwrap();
    let join = ann.send(json!({"type": "join", "room": "theirs", "req": 1})).await.unwrap();
    assert_eq!((join[0]["code"].as_str(), join[0]["req"].as_u64()), (Some("not_allowed"), Some(1)));
    let publish = ann.send(json!({"type": "publish", "room": "theirs", "message": "hi"})).await.unwrap();
    assert_eq!(publish[0]["code"], "not_allowed");
    let mut seed = chat.client(Dialect::Seed);
    let end = seed.session.on_text(&json!({"token": token("ann", 60, Some(&["mine"]))}).to_string()).unwrap_err();
    assert_eq!(end.code, FORBIDDEN, "a seed client needs the default room");
}

#[tokio::test]
async fn the_rate_limit_closes_a_client_that_sends_too_fast() {
    let chat = chat(Options { rate: Some(RateLimit { per_sec: 1.0, burst: 3 }), ..Options::default() });
    let mut ann = chat.v1();
    for _ in 0..3 {
        ann.session.on_text(&json!({"type": "presence", "room": "r"}).to_string()).unwrap();
    }
    assert_eq!(ann.session.on_text("{}").unwrap_err().code, POLICY_VIOLATION);
    chat.clock.advance(Duration::from_secs(1));
    assert!(ann.session.on_text("{}").is_ok(), "one more token a second later");
    let mut multi = chat.v1();
    let three_rooms = json!({"type": "publish", "rooms": ["a", "b", "c"], "message": "hi"}).to_string();
    multi.session.on_text(&three_rooms).expect("three rooms: the whole burst");
    assert_eq!(multi.session.on_text(&three_rooms).unwrap_err().code, POLICY_VIOLATION, "each room counts");
    // More rooms than a burst holds could never pass: refused as too many, not as too fast.
    let narrow = chat_on(Options { rate: Some(RateLimit { per_sec: 1.0, burst: 2 }), ..Options::default() }, |e| e);
    let mut wide = narrow.v1();
    let answer = wide.send(json!({"type": "publish", "rooms": ["a", "b", "c"], "message": "hi", "req": 1})).await;
    let answer = &answer.expect("the connection stays")[0];
    assert_eq!((answer["code"].as_str(), answer["req"].as_u64()), (Some("too_many"), Some(1)), "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("--rate-burst"), "{answer}");
}

#[tokio::test]
async fn a_member_that_stops_reading_is_cut_off_and_the_others_are_not() {
    let chat = chat(Options { outbox_messages: 3, ..Options::default() });
    let mut reader = chat.v1();
    reader.join("r").await;
    let mut stalled = chat.v1();
    stalled.join("r").await;
    reader.delivered();
    for n in 1..=5 {
        reader.publish("r", &format!("m{n}")).await;
        assert_eq!(reader.delivered_messages().len(), 1, "the reader gets every message");
    }
    let kept: Vec<u64> = stalled.delivered_messages().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(kept, vec![1, 2, 3], "what fitted, and no gap after it");
    assert_eq!(stalled.session.streams().1.next().await, None, "then the end: the transport closes it");
    assert!(!chat.core.hub.is_member(stalled.session.conn, "r"));
}

#[tokio::test]
async fn leaving_the_hub_when_a_session_ends() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.join("r").await;
    let mut bob = chat.v1();
    bob.join("r").await;
    ann.delivered();
    drop(bob);
    let event = ann.delivered().pop().expect("a leave event");
    assert_eq!((event["type"].as_str(), event["event"].as_str()), (Some("presence"), Some("leave")));
    assert_eq!(chat.core.hub.connection_count(), 1);
}

/// An engine whose reads fail while `failing` is set (a store that went away). It notes the calls
/// that start a join: `subscribed ROOM` and `top ROOM`, in order.
struct Flaky {
    inner: Arc<dyn Engine>,
    failing: std::sync::atomic::AtomicBool,
    /// Publishes are taken, then fail as they are written (a full disk).
    failing_writes: std::sync::atomic::AtomicBool,
    /// Publishes get no answer in time (Redis stalled): they may have been stored.
    unanswered_writes: std::sync::atomic::AtomicBool,
    calls: Mutex<Vec<String>>,
}

impl Flaky {
    fn new(inner: Arc<dyn Engine>) -> Self {
        Self {
            inner,
            failing: Default::default(),
            failing_writes: Default::default(),
            unanswered_writes: Default::default(),
            calls: Mutex::default(),
        }
    }
}

impl Engine for Flaky {
    fn publish(&self, message: NewMessage) -> Result<crate::engine::PendingPublish, EngineError> {
        if self.failing_writes.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Box::pin(std::future::ready(Err(EngineError::Write("database or disk is full".into())))));
        }
        if self.unanswered_writes.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Box::pin(std::future::ready(Err(EngineError::Unanswered("redis: timed out".into())))));
        }
        self.inner.publish(message)
    }
    fn history(
        &self,
        room: &str,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> crate::engine::BoxFuture<'_, Result<History, EngineError>> {
        self.inner.history(room, after, up_to, limit)
    }
    fn top(&self, room: &str) -> crate::engine::BoxFuture<'_, Result<Position, EngineError>> {
        self.calls.lock().unwrap().push(format!("top {room}"));
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Box::pin(std::future::ready(Err(EngineError::Read("the disk went away".into()))));
        }
        self.inner.top(room)
    }
    fn subscribe(&self, room: &str) {
        self.inner.subscribe(room)
    }
    fn unsubscribe(&self, room: &str) {
        self.inner.unsubscribe(room)
    }
    fn subscribed(&self, room: &str) -> crate::engine::BoxFuture<'_, Result<(), EngineError>> {
        self.calls.lock().unwrap().push(format!("subscribed {room}"));
        self.inner.subscribed(room)
    }
    fn broadcast(&self, command: &UserCommand) -> crate::engine::BoxFuture<'_, Result<bool, EngineError>> {
        self.inner.broadcast(command)
    }
    fn remove_history(&self, room: &str) -> crate::engine::BoxFuture<'_, Result<u64, EngineError>> {
        self.inner.remove_history(room)
    }
    fn shutdown(&self) -> crate::engine::BoxFuture<'_, ()> {
        self.inner.shutdown()
    }
}

/// A chat whose engine is `Flaky`, and the switches.
fn flaky_chat() -> (Chat, Arc<Flaky>) {
    let base = chat(Options::default());
    let flaky = Arc::new(Flaky::new(base.core.engine.clone()));
    let core = Arc::new(Core {
        hub: base.core.hub.clone(),
        engine: flaky.clone(),
        access: base.core.access.clone(),
        limits: base.core.limits.clone(),
        clock: base.clock.clone(),
    });
    (Chat { core, clock: base.clock.clone() }, flaky)
}

#[tokio::test]
async fn a_seed_message_that_could_not_be_written_ends_the_session_with_1013() {
    let (chat, flaky) = flaky_chat();
    let mut seed = chat.client(Dialect::Seed);
    flaky.failing_writes.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(seed.session.on_text(r#"{"name": "Ann", "message": "lost?"}"#).unwrap().is_empty());
    let outcome: Vec<Replies> = seed.session.settle().await;
    let end = outcome.into_iter().find_map(Result::err).expect("the seed client is told, by its close");
    assert_eq!(end.code, TRY_AGAIN_LATER);
    assert!(end.reason.contains("could not be stored"), "{}", end.reason);
}

#[tokio::test]
async fn a_publish_the_store_did_not_answer_in_time_is_not_said_to_be_lost() {
    let (chat, flaky) = flaky_chat();
    flaky.unanswered_writes.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seed = chat.client(Dialect::Seed);
    assert!(seed.session.on_text(r#"{"name": "Ann", "message": "stored?"}"#).unwrap().is_empty());
    let outcome: Vec<Replies> = seed.session.settle().await;
    let end = outcome.into_iter().find_map(Result::err).expect("the seed client is told, by its close");
    assert_eq!(end.code, TRY_AGAIN_LATER);
    assert!(end.reason.contains("may have been stored"), "{}", end.reason);
    let mut ann = chat.v1();
    ann.join("r").await;
    let publish = json!({"type": "publish", "room": "r", "message": "stored?", "id": "m1", "req": 2});
    let replies = ann.send(publish).await.unwrap();
    let error = replies.iter().find(|r| r["type"] == "error").expect("an error");
    assert_eq!((error["code"].as_str(), error["req"].as_u64()), (Some("unavailable"), Some(2)), "{error}");
    assert!(error["message"].as_str().unwrap().contains("send it again with the same id"), "{error}");
}

#[tokio::test]
async fn a_join_that_cannot_read_its_replay_fails_and_a_live_member_stays() {
    let (chat, flaky) = flaky_chat();
    let mut ann = chat.v1();
    ann.join("r").await;
    flaky.failing.store(true, std::sync::atomic::Ordering::Relaxed);
    let again = ann.send(json!({"type": "join", "room": "r", "name": "Ann", "req": 1})).await.unwrap();
    assert_eq!((again[0]["code"].as_str(), again[0]["req"].as_u64()), (Some("unavailable"), Some(1)));
    assert!(chat.core.hub.is_member(ann.session.conn, "r"), "a failed join again keeps the live member");
    let mut bob = chat.v1();
    let first = bob.send(json!({"type": "join", "room": "other"})).await.unwrap();
    assert_eq!(first[0]["code"], "unavailable");
    assert!(!chat.core.hub.is_member(bob.session.conn, "other"), "a failed first join leaves no member");
    flaky.failing.store(false, std::sync::atomic::Ordering::Relaxed);
    ann.publish("r", "still here").await;
    assert_eq!(ann.delivered_messages().len(), 1);
}

/// The server API's subscribe reads where the room stands only once the engine delivers the room
/// here, as a session's join does: read before, the top could miss what is published in between
/// (with Redis, a room new to this node starts at the top its subscription saw).
#[tokio::test]
async fn the_apis_subscribe_reads_the_room_once_it_is_delivered_here_and_a_failure_leaves_no_member() {
    let mut flaky = None;
    let chat = chat_on(Options { anonymous: false, ..Options::default() }, |inner| {
        let made = Arc::new(Flaky::new(inner));
        flaky = Some(made.clone());
        made
    });
    let flaky = flaky.unwrap();
    let mut session = Session::new(chat.core.clone(), Dialect::V1);
    session.start(Some(chat.core.access.verify(&token("ann", 600, None)).unwrap())).unwrap();
    let subscribe = |room: &str| UserCommand::Subscribe { sub: "ann".into(), room: room.into() };
    assert_eq!(Deliver::command(&*chat.core.hub, &subscribe("r")).await, 1);
    assert_eq!(*flaky.calls.lock().unwrap(), ["subscribed r", "top r"]);
    assert!(chat.core.hub.is_member(session.conn, "r"));
    flaky.failing.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(Deliver::command(&*chat.core.hub, &subscribe("s")).await, 0);
    assert!(!chat.core.hub.is_member(session.conn, "s"), "a subscribe that cannot read the room leaves no member");
}

#[test]
fn close_reasons_fit_a_close_frame() {
    let end = End::new(POLICY_VIOLATION, "é".repeat(100));
    assert!(end.reason.len() <= 123 && end.reason.ends_with("..."), "{}", end.reason.len());
    assert_eq!(End::new(1000, "short").reason, "short");
}

#[tokio::test]
async fn a_guest_asking_for_a_signed_in_users_name_gets_it_marked_as_a_guests() {
    let chat = chat(Options::default());
    let mut ann = chat.v1();
    ann.send(json!({"type": "auth", "token": token("ann", 60, None)})).await.unwrap();
    ann.send(json!({"type": "join", "room": "r", "name": "someone"})).await.unwrap();
    let mut guest = chat.v1();
    let answers = guest.send(json!({"type": "join", "room": "r", "name": "ann"})).await.unwrap();
    let names: Vec<&str> =
        answers[0]["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["ann", "ann (guest)"], "the signed-in user keeps its token's name; the guest is marked");
    guest.publish("r", "it is me").await;
    let seen = ann.delivered_messages();
    assert_eq!((seen[0]["name"].as_str(), seen[0]["message"].as_str()), (Some("ann (guest)"), Some("it is me")));
    let named = guest.send(json!({"type": "publish", "room": "r", "message": "m", "name": "ann"})).await.unwrap();
    assert_eq!(named[0]["type"], "ack");
    assert_eq!(ann.delivered_messages()[0]["name"], "ann (guest)", "a name in the publish is marked too");
    let mut marked = chat.v1();
    let answers = marked.send(json!({"type": "join", "room": "r", "name": "cy (guest)"})).await.unwrap();
    let last = answers[0]["members"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["name"], "cy (guest)", "never marked twice");
}

#[tokio::test]
async fn a_user_has_at_most_its_limit_of_sessions_and_a_closed_one_frees_its_place() {
    let chat = chat(Options { anonymous: false, max_sessions_per_user: 2, ..Options::default() });
    let sign_in = |sub: &str| {
        let mut session = Session::new(chat.core.clone(), Dialect::V1);
        let identity = chat.core.access.verify(&token(sub, 600, None)).unwrap();
        session.start(Some(identity)).map(|()| session)
    };
    let first = sign_in("ann").unwrap();
    let _second = sign_in("ann").unwrap();
    let refused = sign_in("ann").map(|_| ()).unwrap_err();
    assert_eq!(refused.code, POLICY_VIOLATION);
    assert!(refused.reason.contains("\"ann\" has 2 sessions"), "{}", refused.reason);
    assert!(chat.core.hub.user_at_limit("ann"));
    let _bob = sign_in("bob").expect("another user has places of its own");
    // A token in the first message counts the same way.
    let mut late = chat.v1();
    let end = late.session.on_text(&json!({"type": "auth", "token": token("ann", 600, None)}).to_string()).unwrap_err();
    assert_eq!(end.code, POLICY_VIOLATION, "a first token over the limit ends the session: {}", end.reason);
    drop(first);
    assert!(!chat.core.hub.user_at_limit("ann"), "a closed session gives its place back");
    let _third = sign_in("ann").expect("ann's freed place");
}
