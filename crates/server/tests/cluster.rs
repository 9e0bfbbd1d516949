//! Cluster mode: several real `switchboard serve` processes on real `redis-server`s, each test
//! starting its own on free ports. Nodes and Redis are killed with SIGKILL where the test says so.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::chat::{next, next_close, next_of, send, v1_client, Ws};
use support::redis::{self as redis_support, Redis};
use support::{start_serve_with_db, temp_dir, Server};
use switchboard_ws::Message;

/// A node on `redis` (comma-separated URLs), with a short presence lease so tests see leaves soon.
fn node(redis: &str, extra: &[&str]) -> Server {
    let db = temp_dir("node").join("unused.db");
    let mut args = vec!["--redis", redis, "--presence-lease-secs", "2", "--rate-limit", "0", "--keepalive-secs", "0"];
    args.extend_from_slice(extra);
    start_serve_with_db(&db, &args)
}

async fn joined(addr: &str, room: &str, name: &str) -> (Ws, Value) {
    let mut ws = v1_client(addr).await;
    send(&mut ws, json!({"type": "join", "room": room, "name": name})).await;
    let joined = next_of(&mut ws, "joined").await;
    (ws, joined)
}

/// The offsets of the next `count` chat messages (skipping presence and the like).
async fn offsets(ws: &mut Ws, count: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.len() < count {
        seen.push(next_of(ws, "message").await["offset"].as_u64().unwrap());
    }
    seen
}

/// The answer to a `presence` request (skipping presence events, which share its type).
async fn presence_list(ws: &mut Ws, room: &str) -> Value {
    send(ws, json!({"type": "presence", "room": room, "req": "list"})).await;
    loop {
        let v = next_of(ws, "presence").await;
        if v["req"] == "list" {
            return v;
        }
    }
}

async fn publish(ws: &mut Ws, room: &str, id: &str) -> Value {
    send(ws, json!({"type": "publish", "room": room, "message": format!("m {id}"), "id": id})).await;
    loop {
        let v = next(ws).await;
        if v["type"] == "ack" || v["type"] == "error" {
            return v;
        }
    }
}

#[tokio::test]
async fn three_nodes_are_one_chat_in_offset_order_with_presence_across_them() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let nodes: Vec<Server> = (0..3).map(|_| node(&redis.url(), &[])).collect();
    let (mut on_b, _) = joined(&nodes[1].addr, "r", "bea").await;
    let (mut on_c, joined_c) = joined(&nodes[2].addr, "r", "cid").await;
    let members: Vec<&str> =
        joined_c["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(members.contains(&"bea") && members.contains(&"cid"), "joined lists members of other nodes: {members:?}");
    let event = next_of(&mut on_b, "presence").await;
    assert_eq!((event["event"].as_str(), event["member"]["name"].as_str()), (Some("join"), Some("cid")));

    let mut publisher = v1_client(&nodes[0].addr).await;
    for i in 0..200 {
        send(&mut publisher, json!({"type": "publish", "room": "r", "message": format!("{i}"), "id": format!("p{i}")}))
            .await;
    }
    let expected: Vec<u64> = (1..=200).collect();
    assert_eq!(offsets(&mut on_b, 200).await, expected, "node B delivers every offset once, in order");
    assert_eq!(offsets(&mut on_c, 200).await, expected, "node C too");

    // A rename on one node is an update on the others.
    send(&mut on_c, json!({"type": "join", "room": "r", "name": "cid2"})).await;
    let event = next_of(&mut on_b, "presence").await;
    assert_eq!((event["event"].as_str(), event["member"]["name"].as_str()), (Some("update"), Some("cid2")));

    // A retry of an acknowledged publish through another node: the original offset, nothing stored.
    let ack = publish(&mut on_c, "r", "p7").await;
    assert_eq!((ack["offset"].as_u64(), ack["duplicate"].as_bool()), (Some(8), Some(true)), "{ack}");
    let fresh = publish(&mut on_c, "r", "new-one").await;
    assert_eq!((fresh["offset"].as_u64(), fresh["duplicate"].as_bool()), (Some(201), Some(false)), "{fresh}");

    // A member leaving on one node is seen leaving on another.
    drop(on_c);
    let event = next_of(&mut on_b, "presence").await;
    assert_eq!((event["event"].as_str(), event["member"]["name"].as_str()), (Some("leave"), Some("cid2")));
}

#[tokio::test]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (mut reader, joined_a) = joined(&a.addr, "room", "r").await;
    let epoch = joined_a["epoch"].as_str().unwrap().to_owned();
    let mut writer = v1_client(&b.addr).await;
    for i in 0..5 {
        assert_eq!(publish(&mut writer, "room", &format!("a{i}")).await["type"], "ack");
    }
    assert_eq!(offsets(&mut reader, 5).await, vec![1, 2, 3, 4, 5]);
    drop(reader);
    for i in 0..7 {
        publish(&mut writer, "room", &format!("b{i}")).await;
    }
    let mut back = v1_client(&b.addr).await;
    send(&mut back, json!({"type": "join", "room": "room", "since": 5, "epoch": epoch})).await;
    let joined_b = next_of(&mut back, "joined").await;
    assert_eq!((joined_b["recovered"].as_bool(), joined_b["offset"].as_u64()), (Some(true), Some(12)));
    assert_eq!(joined_b["epoch"], epoch.as_str(), "one epoch across nodes");
    assert_eq!(offsets(&mut back, 7).await, (6..=12).collect::<Vec<_>>());

    // With an epoch the room never had, the offsets are not trusted.
    let mut stranger = v1_client(&a.addr).await;
    send(&mut stranger, json!({"type": "join", "room": "room", "since": 5, "epoch": "0123456789abcdef"})).await;
    assert_eq!(next_of(&mut stranger, "joined").await["recovered"], false);
}

/// Publishes ids `{tag}-{i}` one after another (each waiting for its ack, or its error) until the
/// connection breaks or `stop` is set; records what was acknowledged and what was refused.
async fn publish_loop(
    mut ws: Ws,
    tag: &'static str,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
    refused: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let id = format!("{tag}-{i}");
        let frame = json!({"type": "publish", "room": "load", "message": id, "id": id});
        if ws.send(frame.to_string()).await.is_err() {
            return;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    if v["type"] == "ack" {
                        acked.lock().unwrap().insert(id.clone(), v["offset"].as_u64().unwrap());
                        break;
                    }
                    if v["type"] == "error" {
                        refused.lock().unwrap().push(v["code"].as_str().unwrap_or_default().to_owned());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        break;
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => return,
            }
        }
        i += 1;
    }
}

/// A [`publish_loop`] running on its own task.
struct Load {
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
    refused: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(addr: &str, tag: &'static str) -> Self {
        let (acked, refused, stop) = (Arc::default(), Arc::default(), Arc::default());
        let ws = v1_client(addr).await;
        let task = tokio::spawn(publish_loop(ws, tag, Arc::clone(&acked), Arc::clone(&refused), Arc::clone(&stop)));
        Self { acked, refused, stop, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until at least `count` publishes in all are acknowledged (the load is running, rather
    /// than a guess at how long that takes on a busy machine).
    async fn until_acked(&self, count: usize) {
        let started = Instant::now();
        while self.acked() < count {
            assert!(started.elapsed() < Duration::from_secs(20), "only {} of {count} acks", self.acked());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops publishing; what was acknowledged (id to offset) and the codes of what was refused.
    async fn stop(self) -> (BTreeMap<String, u64>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap();
        let acked = self.acked.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        (acked, refused)
    }
}

/// Reads chat messages of room `load` until the connection ends: (offset, id) in arrival order.
async fn watch(mut ws: Ws) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(30), ws.recv()).await {
        if let Message::Text(text) = message {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == "message" {
                seen.push((v["offset"].as_u64().unwrap(), v["id"].as_str().unwrap_or_default().to_owned()));
            }
        }
    }
    seen
}

#[tokio::test]
async fn kill_9_of_a_node_costs_its_clients_a_reconnect_and_nothing_else() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let mut doomed = node(&redis.url(), &[]);
    let (b, c) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (on_doomed, first) = joined(&doomed.addr, "load", "doomed-reader").await;
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    let (mut observer, _) = joined(&c.addr, "load", "observer").await;
    let reading = tokio::spawn(watch(on_doomed));

    let load = Load::start(&b.addr, "p").await;
    load.until_acked(20).await;
    doomed.child.kill().unwrap(); // SIGKILL, mid-stream
    doomed.child.wait().unwrap();
    let before = reading.await.unwrap();
    assert!(!before.is_empty(), "the reader saw messages before its node died");

    // The reader resumes on another node from the last offset it saw, while the publisher goes on.
    let last_seen = before.last().unwrap().0;
    let mut resumed = v1_client(&c.addr).await;
    send(
        &mut resumed,
        json!({"type": "join", "room": "load", "name": "doomed-reader", "since": last_seen, "epoch": epoch}),
    )
    .await;
    assert_eq!(next_of(&mut resumed, "joined").await["recovered"], true);
    load.until_acked(load.acked() + 10).await;
    let (acked, refused) = load.stop().await;
    let last_acked = acked.values().copied().max().unwrap();
    let mut after = Vec::new();
    while after.last().is_none_or(|(offset, _)| *offset < last_acked) {
        let v = next_of(&mut resumed, "message").await;
        after.push((v["offset"].as_u64().unwrap(), v["id"].as_str().unwrap().to_owned()));
    }
    let all: Vec<(u64, String)> = before.into_iter().chain(after).collect();
    let offsets: Vec<u64> = all.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (1..=last_acked).collect::<Vec<_>>(), "0 lost, 0 repeated, in order");
    let by_id: HashMap<&str, u64> = all.iter().map(|(o, id)| (id.as_str(), *o)).collect();
    for (id, offset) in &acked {
        assert_eq!(by_id.get(id.as_str()), Some(offset), "acknowledged {id} was delivered at its offset");
    }
    assert!(refused.is_empty(), "a node's death refuses no publish on another: {refused:?}");

    // The dead node's member leaves for everyone once its lease (2 s) runs out, exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut leaves = 0;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), observer.recv()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "presence" && v["event"] == "leave" {
                    assert_eq!(v["member"]["name"], "doomed-reader");
                    leaves += 1;
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => panic!("the observer's connection ended"),
            Err(_) if leaves > 0 => break,
            Err(_) => {}
        }
    }
    assert_eq!(leaves, 1, "one leave event for the dead node's member");
    let listed = presence_list(&mut observer, "load").await;
    let ids: Vec<&str> = listed["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(ids.iter().filter(|n| **n == "doomed-reader").count(), 1, "only the resumed session: {ids:?}");
}

#[tokio::test]
async fn kill_9_of_redis_with_fsync_always_loses_nothing_acknowledged() {
    if !redis_support::available() {
        return;
    }
    let mut redis = Redis::durable();
    let a = node(&redis.url(), &["--history-max-messages", "1000000"]);
    let load = Load::start(&a.addr, "d").await;
    load.until_acked(21).await;
    redis.kill();
    let before_restart = load.acked();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    // Publishing goes on after the restart.
    load.until_acked(before_restart + 6).await;
    let (acked, _) = load.stop().await;

    let mut reader = v1_client(&a.addr).await;
    send(&mut reader, json!({"type": "history", "room": "load", "limit": 10000})).await;
    let history = next_of(&mut reader, "history").await;
    let stored: BTreeMap<String, u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_owned(), m["offset"].as_u64().unwrap()))
        .collect();
    let offsets: Vec<u64> = stored.values().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(offsets.len(), stored.len(), "no offset given twice");
    assert!(offsets.iter().copied().eq(1..=offsets.len() as u64), "offsets 1.. went on across the restart, no gap");
    for (id, offset) in &acked {
        assert_eq!(stored.get(id), Some(offset), "acknowledged {id} survived kill -9 of redis");
    }
}

#[tokio::test]
async fn redis_away_for_5_s_refuses_publishes_keeps_clients_and_then_delivers_with_no_gap() {
    if !redis_support::available() {
        return;
    }
    let mut redis = Redis::durable();
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (reader, _) = joined(&b.addr, "load", "reader").await;
    let reading = tokio::spawn(watch(reader));
    let load = Load::start(&a.addr, "u").await;
    load.until_acked(10).await;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = load.acked();
    redis.restart();
    // Publishing resumes after Redis came back.
    load.until_acked(during + 10).await;
    let (acked, refused) = load.stop().await;
    assert!(
        !refused.is_empty() && refused.iter().all(|code| code == "unavailable"),
        "refused as unavailable: {refused:?}"
    );

    // The reader stayed connected; close it by stopping its node gracefully and look at what it saw.
    let last = acked.values().copied().max().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.signal("TERM");
    let seen = reading.await.unwrap();
    let offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (1..=last).collect::<Vec<_>>(), "every acknowledged message once, in order, across the outage");
}

#[tokio::test]
async fn rooms_spread_over_two_redis_shards_and_still_cross_nodes() {
    if !redis_support::available() {
        return;
    }
    let (one, two) = (Redis::start(), Redis::start());
    let urls = format!("{},{}", one.url(), two.url());
    let (a, b) = (node(&urls, &[]), node(&urls, &[]));
    let rooms: Vec<String> = (0..8).map(|i| format!("room{i}")).collect();
    let mut readers = Vec::new();
    for room in &rooms {
        readers.push(joined(&b.addr, room, "reader").await.0);
    }
    let mut writer = v1_client(&a.addr).await;
    for room in &rooms {
        for i in 0..3 {
            assert_eq!(publish(&mut writer, room, &format!("{room}-{i}")).await["type"], "ack");
        }
    }
    for reader in &mut readers {
        assert_eq!(offsets(reader, 3).await, vec![1, 2, 3]);
    }
    let keys = |redis: &Redis| redis.cli(&["--scan", "--pattern", "sb:{room*}:s"]).lines().count();
    let (on_one, on_two) = (keys(&one), keys(&two));
    assert_eq!(on_one + on_two, rooms.len(), "each room's stream lives on one shard");
    assert!(on_one > 0 && on_two > 0, "both shards hold rooms ({on_one} and {on_two})");
}

/// A Redis Cluster of three masters (no replicas), up, and two nodes on it.
fn three_masters_and_two_nodes() -> (Vec<Redis>, Server, Server) {
    let masters: Vec<Redis> =
        (0..3).map(|_| Redis::start_with(&["--save", "", "--appendonly", "no", "--cluster-enabled", "yes"])).collect();
    let addrs: Vec<String> = masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
    let created = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stdout));
    let started = Instant::now();
    while !masters.iter().all(|m| m.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
        assert!(started.elapsed() < Duration::from_secs(20), "the cluster did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = masters[0].url();
    let (a, b) = (node(&url, &["--redis-cluster"]), node(&url, &["--redis-cluster"]));
    (masters, a, b)
}

#[test]
fn a_node_that_lists_the_redis_shards_in_another_order_is_refused_at_start() {
    if !redis_support::available() {
        return;
    }
    let (one, two) = (Redis::start(), Redis::start());
    let _first = node(&format!("{},{}", one.url(), two.url()), &[]);
    let db = temp_dir("order").join("unused.db");
    let addr = format!("127.0.0.1:{}", support::free_port());
    let started = Instant::now();
    let output = support::switchboard()
        .args(["serve", "--listen", &addr, "--db"])
        .arg(&db)
        .args(["--redis", &format!("{},{}", two.url(), one.url())])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the same --redis URLs in the same order"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "said at once, not after the wait for Redis");
    // The same list, in the same order, still starts.
    let _second = node(&format!("{},{}", one.url(), two.url()), &[]);
}

#[tokio::test]
async fn a_redis_cluster_of_three_masters_serves_rooms_from_every_slot() {
    if !redis_support::available() {
        return;
    }
    let (masters, a, b) = three_masters_and_two_nodes();
    let rooms: Vec<String> = (0..6).map(|i| format!("slot{i}")).collect();
    let mut readers = Vec::new();
    for room in &rooms {
        readers.push(joined(&b.addr, room, "reader").await.0);
    }
    let mut writer = v1_client(&a.addr).await;
    for room in &rooms {
        for i in 0..3 {
            let ack = publish(&mut writer, room, &format!("{room}-{i}")).await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
    }
    for reader in &mut readers {
        assert_eq!(offsets(reader, 3).await, vec![1, 2, 3]);
    }
    let holding = masters.iter().filter(|m| m.cli(&["DBSIZE"]).parse::<u64>().unwrap_or(0) > 0).count();
    assert!(holding >= 2, "rooms landed on several masters ({holding})");
}

#[tokio::test]
async fn live_delivery_follows_a_room_whose_slot_moves_to_another_master() {
    if !redis_support::available() {
        return;
    }
    let (masters, a, b) = three_masters_and_two_nodes();
    let (mut reader, _) = joined(&b.addr, "moving", "reader").await;
    let mut writer = v1_client(&a.addr).await;
    for i in 0..3 {
        assert_eq!(publish(&mut writer, "moving", &format!("before{i}")).await["type"], "ack");
    }
    assert_eq!(offsets(&mut reader, 3).await, vec![1, 2, 3]);
    // Move the room's slot to another master, as `redis-cli --cluster reshard` does: Redis takes the
    // room's channel subscribers off the old owner.
    let slot = masters[0].cli(&["CLUSTER", "KEYSLOT", "{moving}"]);
    let id = |m: &Redis| m.cli(&["CLUSTER", "MYID"]);
    let owner = masters.iter().find(|m| m.cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot]) != "0").unwrap();
    let target = masters.iter().find(|m| m.port != owner.port).unwrap();
    assert_eq!(target.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &id(owner)]), "OK");
    assert_eq!(owner.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &id(target)]), "OK");
    let keys = owner.cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
    let keys: Vec<&str> = keys.lines().collect();
    let port = target.port.to_string();
    let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
    migrate.extend(&keys);
    assert_eq!(owner.cli(&migrate), "OK");
    for master in &masters {
        assert_eq!(master.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &id(target)]), "OK");
    }
    for i in 0..3 {
        let ack = publish(&mut writer, "moving", &format!("after{i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    assert_eq!(offsets(&mut reader, 3).await, vec![4, 5, 6], "live delivery goes on from the new owner");
}

#[tokio::test]
async fn a_message_pub_sub_never_brought_is_read_from_the_stream_before_the_next() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (mut reader, _) = joined(&b.addr, "gap", "reader").await;
    let mut writer = v1_client(&a.addr).await;
    assert_eq!(publish(&mut writer, "gap", "one").await["offset"], 1);
    assert_eq!(offsets(&mut reader, 1).await, vec![1]);
    // Offset 2 goes into the room's stream the way the publish script writes it, but nothing is
    // published on the channel: as if pub/sub had dropped it.
    assert_eq!(redis.cli(&["HINCRBY", "sb:{gap}:m", "o", "1"]), "2");
    let body = r#"{"id":"ghost","name":"ghost","message":"only in the stream","time":"00:00:00"}"#;
    assert_eq!(redis.cli(&["XADD", "sb:{gap}:s", "2-0", "m", body, "t", "1700000000000"]), "2-0");
    assert_eq!(publish(&mut writer, "gap", "three").await["offset"], 3);
    let second = next_of(&mut reader, "message").await;
    assert_eq!((second["offset"].as_u64(), second["message"].as_str()), (Some(2), Some("only in the stream")));
    assert_eq!(next_of(&mut reader, "message").await["offset"], 3, "then the one that showed the gap");
}

/// After Redis went back to an older copy of room `room` (whose reader on node `b` had seen offsets
/// up to `seen` under `old_epoch`): the reader is let go, a publish gets a new epoch, and a client
/// resuming from what it saw is told `recovered: false`, not given the reused offsets as news.
async fn told_of_the_rollback(reader: &mut Ws, writer: &mut Ws, b: &Server, room: &str, old_epoch: &str, seen: u64) {
    assert_eq!(next_close(reader).await.map(|(code, _)| code), Some(1012), "members are let go");
    let ack = publish(writer, room, "after").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let mut back = v1_client(&b.addr).await;
    send(&mut back, json!({"type": "join", "room": room, "since": seen, "epoch": old_epoch})).await;
    let rejoined = next_of(&mut back, "joined").await;
    assert_eq!(rejoined["recovered"], false, "{rejoined}");
    assert_ne!(rejoined["epoch"], old_epoch, "the reused offsets are under a new epoch");
    let newest = next_of(&mut back, "message").await;
    assert!(newest["offset"].as_u64() <= ack["offset"].as_u64(), "the recent messages follow: {newest}");
}

#[tokio::test]
async fn a_redis_restarted_from_an_older_snapshot_starts_a_new_epoch_rather_than_reuse_offsets() {
    if !redis_support::available() {
        return;
    }
    // Snapshots only (Redis's own default is snapshots on a timer): a restart loads the last one.
    let mut redis = Redis::start_with(&["--save", "", "--appendonly", "no"]);
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (mut reader, first) = joined(&b.addr, "snap", "reader").await;
    let old_epoch = first["epoch"].as_str().unwrap().to_owned();
    let mut writer = v1_client(&a.addr).await;
    for i in 0..3 {
        publish(&mut writer, "snap", &format!("kept{i}")).await;
    }
    assert_eq!(redis.cli(&["SAVE"]), "OK");
    for i in 0..3 {
        publish(&mut writer, "snap", &format!("lost{i}")).await;
    }
    assert_eq!(offsets(&mut reader, 6).await, vec![1, 2, 3, 4, 5, 6]);
    redis.kill();
    redis.restart();
    assert_eq!(redis.cli(&["HGET", "sb:{snap}:m", "o"]), "3", "Redis went back to the snapshot");
    told_of_the_rollback(&mut reader, &mut writer, &b, "snap", &old_epoch, 6).await;
}

#[tokio::test]
async fn a_room_no_node_delivered_when_redis_went_back_gets_a_new_epoch_at_its_next_use() {
    room_no_node_delivered_when_redis_went_back(false).await;
}

#[tokio::test]
async fn a_rollback_is_caught_even_when_redis_comes_back_with_appendfsync_always() {
    // What the room's last messages were written under decides, not what Redis runs with now.
    room_no_node_delivered_when_redis_went_back(true).await;
}

async fn room_no_node_delivered_when_redis_went_back(then_always: bool) {
    if !redis_support::available() {
        return;
    }
    let mut redis = Redis::start_with(&["--save", "", "--appendonly", "no"]);
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    // Node B has used this Redis before its restart (a publish in another room, which it does not
    // deliver), so it must notice the restart rather than go by what it read then.
    let mut writer_b = v1_client(&b.addr).await;
    assert_eq!(publish(&mut writer_b, "elsewhere", "before").await["type"], "ack");
    let (mut reader, first) = joined(&a.addr, "idle", "reader").await;
    let old_epoch = first["epoch"].as_str().unwrap().to_owned();
    let mut writer = v1_client(&a.addr).await;
    for i in 0..2 {
        publish(&mut writer, "idle", &format!("kept{i}")).await;
    }
    assert_eq!(redis.cli(&["SAVE"]), "OK");
    for i in 0..2 {
        publish(&mut writer, "idle", &format!("lost{i}")).await;
    }
    assert_eq!(offsets(&mut reader, 4).await, vec![1, 2, 3, 4]);
    // The room's only node goes, so no running node saw it at offset 4 when Redis went back to 2.
    drop((reader, writer, a));
    redis.kill();
    redis.restart();
    assert_eq!(redis.cli(&["HGET", "sb:{idle}:m", "o"]), "2", "Redis went back to the snapshot");
    if then_always {
        assert_eq!(redis.cli(&["CONFIG", "SET", "appendonly", "yes"]), "OK");
        assert_eq!(redis.cli(&["CONFIG", "SET", "appendfsync", "always"]), "OK");
    }
    // These take offsets 3 and 4 again: under the old epoch they would pass for the lost ones. The
    // first may find node B still reconnecting.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    while i < 2 {
        let ack = publish(&mut writer_b, "idle", &format!("new{i}")).await;
        if ack["type"] == "ack" {
            i += 1;
        } else {
            assert!(Instant::now() < deadline, "node B did not get its Redis back: {ack}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut back = v1_client(&b.addr).await;
    send(&mut back, json!({"type": "join", "room": "idle", "since": 4, "epoch": old_epoch})).await;
    let rejoined = next_of(&mut back, "joined").await;
    assert_eq!(
        rejoined["recovered"], false,
        "a reader that saw offset 4 must not be told it is up to date: {rejoined}"
    );
    assert_ne!(rejoined["epoch"], old_epoch.as_str(), "the reused offsets are under a new epoch");
    let mut texts = Vec::new();
    while !texts.contains(&"m new1".to_owned()) {
        texts.push(next_of(&mut back, "message").await["message"].as_str().unwrap().to_owned());
    }
    assert!(texts.contains(&"m new0".to_owned()), "the new messages reach the reader: {texts:?}");
}

#[tokio::test]
async fn a_room_that_goes_back_without_a_restart_is_caught_by_the_offsets_it_gives_out_again() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start_with(&["--save", "", "--appendonly", "no", "--enable-debug-command", "yes"]);
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (mut reader, first) = joined(&b.addr, "back", "reader").await;
    let old_epoch = first["epoch"].as_str().unwrap().to_owned();
    let mut writer = v1_client(&a.addr).await;
    publish(&mut writer, "back", "kept").await;
    assert_eq!(redis.cli(&["SAVE"]), "OK");
    for i in 0..3 {
        publish(&mut writer, "back", &format!("lost{i}")).await;
    }
    assert_eq!(offsets(&mut reader, 4).await, vec![1, 2, 3, 4]);
    // The snapshot loaded again in place: same process, connections kept.
    assert_eq!(redis.cli(&["DEBUG", "RELOAD", "NOSAVE"]), "OK");
    // The next publish is given offset 2 again; the reader's node has delivered 4.
    let reused = publish(&mut writer, "back", "reused").await;
    assert_eq!(reused["offset"], 2, "{reused}");
    told_of_the_rollback(&mut reader, &mut writer, &b, "back", &old_epoch, 4).await;
}

#[tokio::test]
async fn when_redis_loses_a_room_its_members_are_told_recovered_false_not_a_wrong_range() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (mut reader, first) = joined(&b.addr, "lost", "reader").await;
    let old_epoch = first["epoch"].as_str().unwrap().to_owned();
    let mut writer = v1_client(&a.addr).await;
    for i in 0..3 {
        publish(&mut writer, "lost", &format!("old{i}")).await;
    }
    assert_eq!(offsets(&mut reader, 3).await, vec![1, 2, 3]);
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK"); // a restart without persistence, in effect
    let ack = publish(&mut writer, "lost", "new0").await;
    assert_eq!(ack["offset"], 1, "offsets start again, under a new epoch: {ack}");
    // The reader's node sees the new epoch and lets its members go, rather than skip or mislabel.
    assert_eq!(next_close(&mut reader).await.map(|(code, _)| code), Some(1012));
    let mut back = v1_client(&b.addr).await;
    send(&mut back, json!({"type": "join", "room": "lost", "since": 3, "epoch": old_epoch})).await;
    let rejoined = next_of(&mut back, "joined").await;
    assert_eq!(rejoined["recovered"], false, "{rejoined}");
    assert_ne!(rejoined["epoch"], old_epoch.as_str());
    assert_eq!(next_of(&mut back, "message").await["message"], "m new0", "the new history instead");
}

#[tokio::test]
async fn the_rust_client_moves_to_another_node_when_its_own_dies() {
    use switchboard::client::{ChatClient, ChatEvent, ClientOptions};
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let (mut a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let urls =
        |first: &Server, second: &Server| [format!("ws://{}/ws", first.addr), format!("ws://{}/ws", second.addr)];
    let mut reader = ChatClient::connect(ClientOptions::new(urls(&a, &b)).name("reader").room("rc"));
    assert!(matches!(reader.next_event().await, Some(ChatEvent::Connected(url)) if url.contains(&a.addr)));
    // The writer is on node A too: both lose their node mid-stream.
    let writer = Arc::new(ChatClient::connect(ClientOptions::new(urls(&a, &b)).name("writer")));
    // Whether the reader's join lands before or after this, offset 1 reaches it (live or replayed).
    let first = writer.publish("rc", "first").await.unwrap();
    assert_eq!(first.offset, 1);
    let publishing = {
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..150 {
                acks.push(writer.publish("rc", &format!("n{i}")).await.unwrap().offset);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acks
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let acks = publishing.await.unwrap();
    let last = *acks.iter().max().unwrap();
    assert_eq!(acks.len(), 150);
    let mut seen = Vec::new();
    let mut moved_to = None;
    while seen.last().is_none_or(|o| *o < last) {
        match tokio::time::timeout(Duration::from_secs(20), reader.next_event()).await.expect("events go on") {
            Some(ChatEvent::Message(m)) => seen.push(m.offset),
            Some(ChatEvent::Connected(url)) => moved_to = Some(url),
            Some(_) => {}
            None => panic!("the client stopped"),
        }
    }
    assert!(moved_to.is_some_and(|url| url.contains(&b.addr)), "the reader moved to node B");
    assert_eq!(seen, (1..=last).collect::<Vec<_>>(), "every message once, in order, across the move");
    let mut sorted = acks.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), acks.len(), "each publish acknowledged at its own offset (retries were duplicates)");
}

/// `POST /api/publish` with the API key; the status and the JSON answer.
fn api_publish(addr: &str, key: &str, body: &str) -> (u16, Value) {
    support::http_json(addr, "POST", "/api/publish", Some(key), Some(body))
}

#[tokio::test]
async fn the_http_publish_api_goes_through_the_cluster_with_the_same_idempotency() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let (a, b) = (node(&redis.url(), &["--api-key", "k"]), node(&redis.url(), &["--api-key", "k"]));
    let (mut reader, _) = joined(&b.addr, "api", "reader").await;
    let body = r#"{"room":"api","message":"from a backend","id":"backend-1"}"#;
    let (status, first) = api_publish(&a.addr, "k", body);
    assert_eq!(status, 200, "{first}");
    let message = next_of(&mut reader, "message").await;
    assert_eq!((message["offset"].as_u64(), message["message"].as_str()), (Some(1), Some("from a backend")));
    // The same id through the other node: the original offset, stored once.
    let (_, again) = api_publish(&b.addr, "k", body);
    assert!(again.to_string().contains("\"duplicate\":true"), "{again}");
    let ack = publish(&mut reader, "api", "after").await;
    assert_eq!(ack["offset"], 2, "nothing was stored for the retry: {ack}");
}

#[tokio::test]
async fn nodes_announce_their_members_again_when_redis_lost_presence() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (_member, joined_a) = joined(&a.addr, "pz", "stays").await;
    let (mut observer, _) = joined(&b.addr, "pz", "observer").await;
    let member_id = joined_a["members"][0]["id"].as_str().unwrap().to_owned();
    // Everything gone, leases included (a restart without persistence, in effect): each node finds
    // its lease missing at its next renewal and says again who it has. (Not checked empty right
    // after: a renewal due at that moment may already have put the members back.)
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    let back = next_of(&mut observer, "presence").await;
    assert_eq!((back["event"].as_str(), back["member"]["id"].as_str()), (Some("join"), Some(member_id.as_str())));
    let started = Instant::now();
    while redis.cli(&["HLEN", "sb:{pz}:p"]) != "2" {
        assert!(started.elapsed() < Duration::from_secs(5), "both nodes' members are back in redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = presence_list(&mut observer, "pz").await;
    let mut names: Vec<&str> =
        listed["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["observer", "stays"], "listed once each after the announcement");
}

#[tokio::test]
async fn a_member_that_left_while_redis_was_down_is_not_left_listed() {
    if !redis_support::available() {
        return;
    }
    let mut redis = Redis::durable();
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    let (member, _) = joined(&a.addr, "gone", "leaver").await;
    let (mut observer, _) = joined(&b.addr, "gone", "observer").await;
    assert_eq!(redis.cli(&["HLEN", "sb:{gone}:p"]), "2");
    redis.kill();
    drop(member); // its removal cannot reach redis now
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    assert_eq!(redis.cli(&["HLEN", "sb:{gone}:p"]), "2", "the append-only file still lists the leaver");
    let started = Instant::now();
    while redis.cli(&["HLEN", "sb:{gone}:p"]) != "1" {
        assert!(started.elapsed() < Duration::from_secs(10), "node A took its departed member out of redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = presence_list(&mut observer, "gone").await;
    let names: Vec<&str> = listed["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["observer"]);
}

/// Redis commands run per publish (those inside scripts included), from INFO commandstats, while
/// one publisher sends 100 messages to `subscribers` readers spread over `nodes` nodes.
async fn redis_calls_per_publish(nodes: usize, subscribers: usize) -> f64 {
    let redis = Redis::start();
    let servers: Vec<Server> = (0..nodes).map(|_| node(&redis.url(), &[])).collect();
    let mut readers = Vec::new();
    for i in 0..subscribers {
        readers.push(joined(&servers[i % nodes].addr, "cost", "reader").await.0);
    }
    let mut writer = v1_client(&servers[0].addr).await;
    publish(&mut writer, "cost", "warm-up").await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    for i in 0..100 {
        publish(&mut writer, "cost", &format!("c{i}")).await;
    }
    let stats = redis.cli(&["INFO", "commandstats"]);
    let calls: u64 =
        stats.lines().filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok()).sum();
    for reader in &mut readers {
        assert_eq!(offsets(reader, 101).await.last(), Some(&101), "every reader got every message");
    }
    calls as f64 / 100.0
}

#[tokio::test]
async fn redis_work_per_publish_does_not_grow_with_nodes_or_subscribers() {
    if !redis_support::available() {
        return;
    }
    let small = redis_calls_per_publish(1, 1).await;
    let large = redis_calls_per_publish(3, 30).await;
    // One EVAL per publish, running 10 commands for a publish with an idempotency key (7 without);
    // lease renewals add a few calls a second.
    assert!((10.5..12.5).contains(&small), "{small} calls per publish with 1 node and 1 subscriber");
    assert!(large < small * 1.2, "{large} calls per publish with 3 nodes and 30 subscribers against {small}");
}

#[tokio::test]
async fn a_user_disconnected_or_subscribed_through_one_node_is_so_on_every_node() {
    if !redis_support::available() {
        return;
    }
    let redis = Redis::start();
    let secret = "cluster-api-secret";
    let extra = ["--api-key", "k", "--jwt-secret", secret];
    let (a, b) = (node(&redis.url(), &extra), node(&redis.url(), &extra));
    let mut ann = support::chat::signed_in(&b.addr, &support::chat::token(secret, "ann", 600)).await;
    send(&mut ann, json!({"type": "join", "room": "lobby"})).await;
    next_of(&mut ann, "joined").await;

    // Through node A, where ann has no session: node B's session joins, then gets A's publish.
    let (status, answer) =
        support::http_json(&a.addr, "POST", "/api/users/ann/subscribe", Some("k"), Some(r#"{"room":"news"}"#));
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["sessions_here"].as_u64(), answer["all_nodes"].as_bool()), (Some(0), Some(true)));
    assert_eq!(next_of(&mut ann, "joined").await["room"], "news");
    api_publish(&a.addr, "k", r#"{"room":"news","message":"cross-node"}"#);
    assert_eq!(next_of(&mut ann, "message").await["message"], "cross-node");

    let (_, info) = support::http_json(&a.addr, "GET", "/api/info", Some("k"), None);
    let (_, info_b) = support::http_json(&b.addr, "GET", "/api/info", Some("k"), None);
    let mut both = vec![info["node"].clone(), info_b["node"].clone()];
    both.sort_by_key(|node| node.to_string());
    assert_eq!((info["engine"].as_str(), info["nodes"].clone()), (Some("redis"), json!(both)), "{info}");

    let body = r#"{"code":4100,"reason":"account closed"}"#;
    let (status, _) = support::http_json(&a.addr, "POST", "/api/users/ann/disconnect", Some("k"), Some(body));
    assert_eq!(status, 200);
    assert_eq!(next_close(&mut ann).await, Some((4100, "account closed".to_owned())));
}

#[tokio::test]
async fn a_node_started_before_its_redis_waits_for_it() {
    if !redis_support::available() {
        return;
    }
    let mut redis = Redis::start();
    redis.kill(); // its port, with nothing on it yet
    let url = redis.url();
    let starting = std::thread::spawn(move || node(&url, &[]));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!starting.is_finished(), "the node waits for Redis rather than serving without it");
    redis.restart();
    let server = tokio::task::spawn_blocking(move || starting.join().expect("the node started once Redis answered"))
        .await
        .unwrap();
    let (mut ws, _) = joined(&server.addr, "late", "Ann").await;
    let ack = publish(&mut ws, "late", "after-the-wait").await;
    assert_eq!((ack["type"].as_str(), ack["offset"].as_u64()), (Some("ack"), Some(1)), "{ack}");
    assert_eq!(redis.cli(&["EXISTS", "sb:{late}:s"]), "1", "the history is in Redis");
}

#[tokio::test]
async fn sse_and_long_polling_on_one_node_see_what_another_node_publishes() {
    if !redis_support::available() {
        return;
    }
    use std::io::{Read, Write};
    let redis = Redis::start();
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    // An SSE stream on node B.
    let mut sse = support::sse::Stream::open(&b.addr, "room=everywhere", "");
    assert_eq!(sse.status, 200, "{}", sse.headers);
    sse.next_of("joined");
    // A publish through node A.
    let (mut publisher, _) = joined(&a.addr, "everywhere", "Ann").await;
    let ack = publish(&mut publisher, "everywhere", "x1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let seen = tokio::task::spawn_blocking(move || sse.next_of("message").json()).await.unwrap();
    assert_eq!((seen["message"].as_str(), seen["offset"].as_u64()), (Some("m x1"), Some(1)), "{seen}");
    // A long poll on node B from the start gets it too.
    let mut poll = std::net::TcpStream::connect(&b.addr).unwrap();
    poll.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    poll.write_all(b"GET /poll?room=everywhere&wait=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    poll.read_to_string(&mut answer).unwrap();
    let body: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    let texts: Vec<&str> = body["messages"].as_array().unwrap().iter().filter_map(|m| m["message"].as_str()).collect();
    assert_eq!(texts, ["m x1"], "{body}");
}

/// What the start's log says a Redis server keeps when it is killed, read from its own settings.
#[test]
fn the_log_at_start_says_what_redis_keeps_through_a_crash() {
    if !redis_support::available() {
        return;
    }
    for (redis, says) in [
        (Redis::start(), "appendonly no: a restart of Redis loses history"),
        (
            Redis::start_with(&["--save", "60 1", "--appendonly", "no"]),
            "snapshots (save 60 1): a restart of Redis goes back",
        ),
        (Redis::durable(), "appendfsync always: every acknowledged message survives"),
    ] {
        let db = temp_dir("durability").join("unused.db");
        let mut command = support::switchboard();
        command.args(["serve", "--listen", "127.0.0.1:0", "--db"]).arg(&db).args(["--redis", &redis.url()]);
        let mut child = command
            .env("SWITCHBOARD_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
        let connected = lines
            .map_while(Result::ok)
            .find(|line| line.contains("connected to redis"))
            .expect("the start logs its Redis");
        let _ = child.kill();
        let _ = child.wait();
        assert!(connected.contains(says), "{connected}");
    }
}
