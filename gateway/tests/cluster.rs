//! A cluster of real gateway processes on loopback sharing Redis and
//! Cassandra: cross-gateway delivery, presence timing, a gateway killed
//! under traffic, and Redis restarted under traffic. Needs Cassandra
//! (`e2e/local/cassandra.sh start`) and Debian's `redis-server` on PATH.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::cluster::{ClusterClient, ClusterSpec, GatewayProcess, PrivateRedis, Received};
use serde_json::{Value, json};

fn id_of(frame: &Value) -> u64 {
    frame["message"]["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no id in {frame}"))
}

/// Asks `asker` about `users` until all are online: their sessions are registered everywhere.
async fn wait_all_online(asker: &mut ClusterClient, query: Value) {
    let started = Instant::now();
    loop {
        let reply = asker.request(query.clone()).await;
        assert_eq!(reply["type"], "presence", "{reply}");
        let users = reply["users"].as_array().expect("users");
        if users.iter().all(|u| u["online"] == json!(true)) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "not everyone online: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_cluster(redis: &PrivateRedis, gateways: u16, offline_after: u32) -> (ClusterSpec, Vec<GatewayProcess>) {
    let spec = ClusterSpec::new(redis.url(), offline_after).await;
    let mut started = Vec::new();
    for ordinal in 0..gateways {
        started.push(GatewayProcess::start(&spec, ordinal).await);
    }
    (spec, started)
}

/// Test 1: users on three gateways; 1:1 traffic and a 100-member group.
/// Every recipient device gets every message exactly once, each sender's
/// messages in the order sent (their ids rising), and nothing goes to push.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_cross_gateways_once_and_in_order() {
    let redis = PrivateRedis::start().await;
    let (_spec, gateways) = start_cluster(&redis, 3, 5).await;
    let url = |i: usize| gateways[i % gateways.len()].url();

    // 1:1: alice-i on gateway i, her peer on i+1, and alice's laptop on i+2.
    let mut pairs = Vec::new();
    for i in 0..3 {
        let alice = ClusterClient::connect(&url(i), &format!("alice{i}"), "phone").await;
        let laptop = ClusterClient::connect(&url(i + 2), &format!("alice{i}"), "laptop").await;
        let bob = ClusterClient::connect(&url(i + 1), &format!("bob{i}"), "phone").await;
        pairs.push((alice, laptop, bob));
    }
    // The direct channel must exist before presence may be asked about.
    for (i, (alice, _, bob)) in pairs.iter_mut().enumerate() {
        let ack = alice.request(json!({"type":"send","to":{"user":format!("bob{i}")},"text":"hi","key":"hello"})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        bob.wait_for(Duration::from_secs(5), |f| f["type"] == "message").await.expect("first message");
    }
    for (i, (alice, _, _)) in pairs.iter_mut().enumerate() {
        wait_all_online(alice, json!({"type":"presence","users":[format!("bob{i}")]})).await;
    }
    const DIRECT: usize = 30;
    for (i, (alice, _, _)) in pairs.iter_mut().enumerate() {
        for n in 0..DIRECT {
            let ack = alice
                .request(
                    json!({"type":"send","to":{"user":format!("bob{i}")},"text":format!("m{n}"),"key":format!("k{n}")}),
                )
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
    }
    for (i, (_, laptop, bob)) in pairs.iter_mut().enumerate() {
        for device in [bob, laptop] {
            device.drain_for(Duration::from_millis(1500)).await;
            let got: Vec<String> = device
                .take("message")
                .iter()
                .map(|f| f["message"]["text"].as_str().unwrap_or_default().to_string())
                .filter(|t| t.starts_with('m'))
                .collect();
            let expected: Vec<String> = (0..DIRECT).map(|n| format!("m{n}")).collect();
            assert_eq!(got, expected, "pair {i}, {}/{}: every message once, in order", device.user, device.device);
        }
    }

    // A group of 100 spread over the gateways; three members (one per gateway) send at once.
    let mut members = Vec::new();
    for m in 0..100 {
        members.push(ClusterClient::connect(&url(m), &format!("member{m:03}"), "phone").await);
    }
    let others: Vec<String> = (1..100).map(|m| format!("member{m:03}")).collect();
    let created = members[0].request(json!({"type":"create_group","name":"all","members":others})).await;
    let group = created["group"]["id"].as_str().expect("group id").to_string();
    assert_eq!(created["group"]["members"].as_array().map(Vec::len), Some(100), "{created}");
    wait_all_online(&mut members[0], json!({"type":"presence","group":group})).await;

    const PER_SENDER: usize = 20;
    let senders = [0usize, 1, 2];
    let mut sent: HashMap<String, Vec<u64>> = HashMap::new();
    let mut tasks = Vec::new();
    for &s in &senders {
        let mut sender = std::mem::replace(&mut members[s], ClusterClient::connect(&url(s), "spare", "x").await);
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..PER_SENDER {
                let ack = sender
                    .request(json!({"type":"send","to":{"group":group},"text":format!("g{n}"),"key":format!("g{n}")}))
                    .await;
                assert_eq!(ack["type"], "ack", "{ack}");
                ids.push(ack["id"].as_str().and_then(|s| s.parse::<u64>().ok()).expect("ack id"));
            }
            (sender, ids)
        }));
    }
    for (task, &s) in tasks.into_iter().zip(&senders) {
        let (sender, ids) = task.await.expect("sender task");
        sent.insert(sender.user.clone(), ids);
        members[s] = sender;
    }
    let total: usize = sent.values().map(Vec::len).sum();
    assert_eq!(total, PER_SENDER * senders.len());
    let mut delivered = 0;
    for member in &mut members {
        let expected: usize = sent.iter().filter(|(who, _)| **who != member.user).map(|(_, ids)| ids.len()).sum();
        let deadline = Instant::now() + Duration::from_secs(10);
        while member.backlog.iter().filter(|f| f["type"] == "message").count() < expected && Instant::now() < deadline {
            member.drain_for(Duration::from_millis(200)).await;
        }
        member.drain_for(Duration::from_millis(100)).await;
        let frames = member.take("message");
        let mut by_sender: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for frame in &frames {
            by_sender
                .entry(frame["message"]["from"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(id_of(frame));
        }
        for (who, ids) in &sent {
            if *who == member.user {
                assert!(!by_sender.contains_key(who), "{} got its own messages back", member.user);
                continue;
            }
            assert_eq!(by_sender.get(who), Some(ids), "{} from {who}: every message once, in send order", member.user);
        }
        delivered += frames.len();
    }
    assert_eq!(delivered, PER_SENDER * senders.len() * 99, "group deliveries");
    println!(
        "cluster: 3 gateways; 1:1 {} messages x 2 devices, group 100 members: {total} sent, {delivered} delivered",
        3 * DIRECT
    );
}

fn is_presence_of(user: &'static str, online: bool) -> impl Fn(&Value) -> bool {
    move |f| f["type"] == "presence_changed" && f["user"] == user && f["online"] == json!(online)
}

/// Test 2: bob (on another gateway, sharing a channel with alice) sees her
/// online on connect, offline at once on logout; a killed connection makes
/// her offline only after the timeout; a reconnect within the window (even
/// to a third gateway) shows no change at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_follows_heartbeats_and_the_grace_window() {
    const OFFLINE_AFTER: u32 = 3;
    let redis = PrivateRedis::start().await;
    let (_spec, gateways) = start_cluster(&redis, 3, OFFLINE_AFTER).await;
    let window = Duration::from_secs(u64::from(OFFLINE_AFTER));

    let mut bob = ClusterClient::connect(&gateways[1].url(), "bob", "phone").await;
    let mut alice = ClusterClient::connect(&gateways[0].url(), "alice", "phone").await;
    let ack = alice.request(json!({"type":"send","to":{"user":"bob"},"text":"hi","key":"k1"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // A stranger may not watch either of them.
    let mut eve = ClusterClient::connect(&gateways[2].url(), "eve", "phone").await;
    let refused = eve.request(json!({"type":"presence","users":["alice"]})).await;
    assert_eq!(refused["code"], "not_member", "{refused}");

    // Logout: offline at once (well inside the window).
    alice.request(json!({"type":"logout"})).await;
    let started = Instant::now();
    bob.wait_for(window, is_presence_of("alice", false)).await.expect("offline after logout");
    let logout_took = started.elapsed();
    assert!(logout_took < window, "logout took {logout_took:?}");

    // Connect: online, with last_active.
    let alice = ClusterClient::connect(&gateways[0].url(), "alice", "phone").await;
    let online = bob.wait_for(Duration::from_secs(5), is_presence_of("alice", true)).await.expect("online on connect");
    assert!(online["last_active_ms"].as_i64().is_some(), "{online}");
    let asked = bob.request(json!({"type":"presence","users":["alice"]})).await;
    assert_eq!(asked["users"][0]["online"], true, "{asked}");
    assert!(asked["users"][0]["last_active_ms"].as_i64().is_some(), "{asked}");

    // Connection lost without logout: nothing before the window, offline after it.
    alice.kill();
    let killed = Instant::now();
    let offline = bob.wait_for(window + Duration::from_secs(5), is_presence_of("alice", false)).await;
    let took = killed.elapsed();
    assert!(offline.is_some(), "alice never went offline after her connection was killed");
    assert!(took >= window - Duration::from_millis(1100), "offline after {took:?}: before the {window:?} window");
    let asked = bob.request(json!({"type":"presence","users":["alice"]})).await;
    assert_eq!(asked["users"][0]["online"], false, "{asked}");

    // Back online, then a drop and a reconnect to another gateway within the window: no flap.
    let alice = ClusterClient::connect(&gateways[0].url(), "alice", "phone").await;
    bob.wait_for(Duration::from_secs(5), is_presence_of("alice", true)).await.expect("online again");
    alice.kill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _alice = ClusterClient::connect(&gateways[2].url(), "alice", "phone").await;
    bob.drain_for(window * 2 + Duration::from_secs(1)).await;
    let changes = bob.take("presence_changed");
    assert!(changes.is_empty(), "a reconnect within the window must not flap: {changes:?}");
    let asked = bob.request(json!({"type":"presence","users":["alice"]})).await;
    assert_eq!(asked["users"][0]["online"], true, "{asked}");
    println!("presence: logout offline in {logout_took:?}; killed connection offline after {took:?} (window {window:?})");
}
