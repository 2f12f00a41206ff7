//! A cluster of real gateway processes on loopback sharing Redis and
//! Cassandra: cross-gateway delivery, presence timing, a gateway killed
//! under traffic, and Redis restarted under traffic. Needs Cassandra
//! (`e2e/local/cassandra.sh start`) and Debian's `redis-server` on PATH.
//!
//! Its leases and presence windows are seconds long and asserted: under the
//! load of other suites they stretch, so `e2e/test.sh` runs it alone.
//! kubechat-test: exclusive
//! kubechat-test: threads 4

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::cluster::{
    ClusterClient, ClusterSpec, CuttableProxy, GatewayProcess, PrivateRedis, http_get, wait_all_online,
};
use common::traffic::traffic_through;
use serde_json::{Value, json};

/// A hung scenario fails instead of stalling CI.
async fn within(limit: Duration, scenario: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(limit, scenario).await.unwrap_or_else(|_| panic!("scenario did not finish within {limit:?}"));
}

fn id_of(frame: &Value) -> u64 {
    frame["message"]["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no id in {frame}"))
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
async fn messages_cross_gateways_once_and_in_order_scenario() {
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
    let is_direct =
        |f: &Value| f["type"] == "message" && f["message"]["text"].as_str().is_some_and(|t| t.starts_with('m'));
    let receivers = pairs.iter_mut().flat_map(|(_, laptop, bob)| [bob, laptop]);
    collect_everywhere(receivers.map(|device| (device, DIRECT)).collect(), is_direct).await;
    for (i, (_, laptop, bob)) in pairs.iter_mut().enumerate() {
        for device in [bob, laptop] {
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
    let names: Vec<String> = (0..100).map(|m| format!("member{m:03}")).collect();
    let mut members = futures::future::join_all(
        names.iter().enumerate().map(|(m, name)| async move { ClusterClient::connect(&url(m), name, "phone").await }),
    )
    .await;
    let created = members[0].request(json!({"type":"create_group","name":"all","members":names[1..]})).await;
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
    let expected_by = |member: &ClusterClient| -> usize {
        sent.iter().filter(|(who, _)| **who != member.user).map(|(_, ids)| ids.len()).sum()
    };
    let expected: Vec<usize> = members.iter().map(expected_by).collect();
    collect_everywhere(members.iter_mut().zip(expected).collect(), |f| f["type"] == "message").await;
    let mut delivered = 0;
    for member in &mut members {
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

/// Collects frames on every client at once until each holds its expected
/// number of frames matching `counted` (10 s at most), then half a second
/// more, so that a duplicate arriving just behind the last one is seen too.
async fn collect_everywhere(clients: Vec<(&mut ClusterClient, usize)>, counted: impl Fn(&Value) -> bool + Copy) {
    futures::future::join_all(clients.into_iter().map(|(client, expected)| collect(client, expected, counted))).await;
}

async fn collect(client: &mut ClusterClient, expected: usize, counted: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.backlog.iter().filter(|f| counted(f)).count() < expected && Instant::now() < deadline {
        client.drain_for(Duration::from_millis(100)).await;
    }
    client.drain_for(Duration::from_millis(500)).await;
}

fn is_presence_of(user: &'static str, online: bool) -> impl Fn(&Value) -> bool {
    move |f| f["type"] == "presence_changed" && f["user"] == user && f["online"] == json!(online)
}

/// Test 2: bob (on another gateway, sharing a channel with alice) sees her
/// online on connect, offline at once on logout; a killed connection makes
/// her offline only after the timeout; a reconnect within the window (even
/// to a third gateway) shows no change at all.
async fn presence_follows_heartbeats_and_the_grace_window_scenario() {
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
    println!(
        "presence: logout offline in {logout_took:?}; killed connection offline after {took:?} (window {window:?})"
    );
}

/// Test 8: a gateway killed and restarted at once under the same pod name
/// (a crash restart) leaves no ghost: its predecessor's sessions are held by
/// the new process, lingering, and end after the offline timeout like any
/// dropped connection's: friends see the user go offline once, presence
/// answers offline, and a message to the user gets a push job.
async fn a_fast_restart_leaves_no_ghost_sessions_scenario() {
    const OFFLINE_AFTER: u32 = 3;
    let redis = PrivateRedis::start().await;
    let (spec, mut gateways) = start_cluster(&redis, 2, OFFLINE_AFTER).await;
    let mut bob = ClusterClient::connect(&gateways[1].url(), "bob", "phone").await;
    let mut alice = ClusterClient::connect(&gateways[0].url(), "alice", "phone").await;
    let ack = alice.request(json!({"type":"send","to":{"user":"bob"},"text":"hi","key":"k1"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    wait_all_online(&mut bob, json!({"type":"presence","users":["alice"]})).await;

    gateways[0].kill();
    let killed = Instant::now();
    // Its sessions end either way: held by the new process until the
    // offline timeout, or (if the old lease lapsed first) reaped by gw-1.
    let _restarted = GatewayProcess::start(&spec, 0).await;
    let window = Duration::from_secs(u64::from(OFFLINE_AFTER));
    let offline = bob.wait_for(window * 3 + Duration::from_secs(5), is_presence_of("alice", false)).await;
    assert!(offline.is_some(), "alice stays online {:?} after her gateway was killed", killed.elapsed());
    let asked = bob.request(json!({"type":"presence","users":["alice"]})).await;
    assert_eq!(asked["users"][0]["online"], false, "{asked}");
    bob.drain_for(Duration::from_secs(1)).await;
    assert!(bob.take("presence_changed").is_empty(), "offline announced once");
    println!("fast restart: alice offline {:?} after the kill", killed.elapsed());
}

/// Test 9: a gateway paused past its lease is reaped (its user announced
/// offline once); when it resumes it registers its sessions again without
/// declaring Redis' data lost, so presence elsewhere never turns unknown.
async fn a_reaped_gateway_comes_back_without_making_presence_unknown_scenario() {
    const OFFLINE_AFTER: u32 = 3;
    let redis = PrivateRedis::start().await;
    let (_spec, gateways) = start_cluster(&redis, 2, OFFLINE_AFTER).await;
    let mut bob = ClusterClient::connect(&gateways[1].url(), "bob", "phone").await;
    let mut alice = ClusterClient::connect(&gateways[0].url(), "alice", "phone").await;
    let ack = alice.request(json!({"type":"send","to":{"user":"bob"},"text":"hi","key":"k1"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    wait_all_online(&mut bob, json!({"type":"presence","users":["alice"]})).await;

    gateways[0].pause();
    let reaped = bob.wait_for(Duration::from_secs(15), is_presence_of("alice", false)).await;
    assert!(reaped.is_some(), "the paused gateway's user was never announced offline");
    gateways[0].resume();
    let resumed = Instant::now();
    let mut seen_online = false;
    while resumed.elapsed() < Duration::from_secs(8) {
        let asked = bob.request(json!({"type":"presence","users":["alice"]})).await;
        assert_eq!(asked["type"], "presence", "presence turned unknown after a reaped gateway came back: {asked}");
        seen_online |= asked["users"][0]["online"] == json!(true);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen_online,
        "the resumed gateway never registered alice's session again; its log:\n{}",
        gateways[0].log_matching(&["close", "idle", "connection", "read", "session"])
    );
    let offline_announcements = bob.take("presence_changed").iter().filter(|f| f["online"] == json!(false)).count();
    assert!(offline_announcements <= 1, "alice announced offline {offline_announcements} more times");
}

/// Test 10: Redis so slow on one gateway that a connection's registration
/// takes longer than the 2 s its `hello` waits: a message sent to the user
/// from another gateway after the client's first sync but before the
/// registration lands is not forwarded (no session yet) and not in that
/// sync; the connection is told to resync once it is registered, and gets it.
async fn a_late_registration_resyncs_its_connection_scenario() {
    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 5).await;
    let proxy = CuttableProxy::start(redis.port).await;
    let slow = GatewayProcess::start_custom(&spec, 0, "gw-0", &[], Some(&proxy.url())).await;
    let other = GatewayProcess::start(&spec, 1).await;
    let mut alice = ClusterClient::connect(&other.url(), "alice", "phone").await;

    proxy.set_delay(Duration::from_millis(1500));
    let started = Instant::now();
    let mut bob = ClusterClient::connect(&slow.url(), "bob", "phone").await;
    let hello_after = started.elapsed();
    let (entries, _) = bob.sync_all("0").await.expect("first sync");
    assert!(entries.is_empty(), "{entries:?}");
    let ack = alice.request(json!({"type":"send","to":{"user":"bob"},"text":"in the gap","key":"gap"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let id = ack["id"].as_str().expect("id").to_string();

    let resync = bob.wait_for(Duration::from_secs(15), |f| f["type"] == "resync" || f["type"] == "message").await;
    let resync = resync.unwrap_or_else(|| panic!("bob was never told about the message ({hello_after:?} to hello)"));
    if resync["type"] == "resync" {
        let (entries, _) = bob.sync_all("0").await.expect("sync after resync");
        let ids: Vec<&str> = entries.iter().filter_map(|e| e["message"]["id"].as_str()).collect();
        assert_eq!(ids, vec![id.as_str()], "the resync's sync brings the message");
    }
    println!("late registration: hello after {hello_after:?}, told after {:?}", started.elapsed());
}

/// Test 11: a SIGKILLed gateway leaves every other gateway's discovery
/// answer within two load-publish intervals (2 s each with a 30 s lease),
/// not when its lease runs out: clients are not sent to a dead gateway.
async fn a_killed_gateway_leaves_discovery_within_two_publish_intervals_scenario() {
    let redis = PrivateRedis::start().await;
    let (_spec, mut gateways) = start_cluster(&redis, 3, 30).await;
    let listed = |body: &str, port: u16| body.contains(&format!(":{port}/"));
    let asker = gateways[0].ws_port;
    let victim = gateways[2].ws_port;
    let started = Instant::now();
    loop {
        let (_, body) = common::cluster::http_get(asker, "/v1/discovery").await.expect("discovery");
        if listed(&body, victim) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "gw-2 never listed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateways[2].kill();
    let killed = Instant::now();
    loop {
        let (_, body) = common::cluster::http_get(asker, "/v1/discovery").await.expect("discovery");
        if !listed(&body, victim) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(6),
            "a dead gateway still listed {:?} after its kill: {body}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("a killed gateway left discovery {:?} after the kill", killed.elapsed());
}

/// Test 3: a gateway SIGKILLed under traffic. Its clients reconnect to the
/// others and sync; no acked message is lost; its users' presence expires.
async fn a_killed_gateway_loses_no_acked_message_and_its_users_go_offline_scenario() {
    const OFFLINE_AFTER: u32 = 3;
    let redis = PrivateRedis::start().await;
    let (_spec, mut gateways) = start_cluster(&redis, 3, OFFLINE_AFTER).await;
    let urls: Vec<String> = gateways.iter().map(GatewayProcess::url).collect();

    // carol lives on the victim and will not come back; dave watches her from gateway 0.
    let mut dave = ClusterClient::connect(&urls[0], "dave", "phone").await;
    let carol = ClusterClient::connect(&urls[2], "carol", "phone").await;
    let mut carol = carol;
    assert_eq!(carol.request(json!({"type":"send","to":{"user":"dave"},"text":"hi","key":"c1"})).await["type"], "ack");
    wait_all_online(&mut dave, json!({"type":"presence","users":["carol"]})).await;

    let victim = &mut gateways[2];
    let pairs = [(0, 1), (1, 2), (2, 0), (2, 1)];
    let totals = traffic_through(&urls, &pairs, 150, async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        victim.kill();
    })
    .await;
    println!("SIGKILL: {totals:?}");
    assert_eq!(totals.acked, totals.sent, "every send is acked in the end (retried with its key)");
    assert!(totals.recovered + totals.live == totals.acked && totals.lost == 0, "acked messages lost: {totals:?}");
    // Not asserted: a message the gateway acked in the instant before it
    // died, and never fanned out, reaches its connected recipients only at
    // their next sync (docs/cluster.md, "Losing a gateway"). A send whose
    // ack was lost is retried elsewhere, and its duplicate ack sends the
    // recipients a resync.
    println!("SIGKILL: stranded until the recipients' next sync: {}", totals.stranded);

    // carol's gateway is gone: dave hears she is offline once its lease ran out.
    let offline = dave.wait_for(Duration::from_secs(15), is_presence_of("carol", false)).await;
    assert!(offline.is_some(), "carol stayed online after her gateway died");
    let asked = dave.request(json!({"type":"presence","users":["carol"]})).await;
    assert_eq!(asked["users"][0]["online"], false, "{asked}");
    drop(carol);
}

/// Test 4: Redis SIGKILLed and restarted empty under traffic, for long
/// enough that the gateways come back at different times. Gateways report
/// degraded, keep storing and acking, recover by themselves, no acked
/// message is lost, and none is stranded: receivers sync only on connect
/// and on `resync`, and every message not delivered live is announced by a
/// `resync` while they are connected. Live delivery works again afterwards.
async fn a_redis_restart_degrades_then_recovers_without_loss_scenario() {
    let mut redis = PrivateRedis::start().await;
    let (_spec, gateways) = start_cluster(&redis, 2, 5).await;
    let urls: Vec<String> = gateways.iter().map(GatewayProcess::url).collect();

    let pairs = [(0, 1), (1, 0), (0, 0), (1, 1), (0, 1), (1, 0)];
    let gateways_ref = &gateways;
    let redis_ref = &mut redis;
    let totals = traffic_through(&urls, &pairs, 300, async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        redis_ref.kill();
        for gateway in gateways_ref {
            let started = Instant::now();
            loop {
                let readyz = gateway.admin_get("/readyz").await;
                if let Some((200, body)) = &readyz
                    && body.contains("degraded")
                {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{} never reported degraded: {readyz:?}",
                    gateway.name
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (_, metrics) = gateway.admin_get("/metrics").await.expect("metrics");
            assert!(metrics.contains("kubechat_gateway_broker_healthy 0"), "{}: {metrics}", gateway.name);
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        redis_ref.restart().await;
        for gateway in gateways_ref {
            gateway.wait_ready().await;
        }
    })
    .await;
    println!("Redis restart: {totals:?}");
    if totals.stranded > 0 {
        for gateway in &gateways {
            println!("--- {} ---\n{}", gateway.name, gateway.log_matching(&["resync", "Redis", "sessions", "lease"]));
        }
    }
    assert_eq!(totals.acked, totals.sent, "every send is acked in the end");
    assert!(totals.recovered + totals.live == totals.acked && totals.lost == 0, "acked messages lost: {totals:?}");
    assert_eq!(totals.stranded, 0, "messages neither delivered live nor announced by a resync: {totals:?}");

    // Recovered: live delivery across gateways again, sessions re-registered.
    let mut erin = ClusterClient::connect(&urls[1], "erin", "phone").await;
    let mut frank = ClusterClient::connect(&urls[0], "frank", "phone").await;
    assert_eq!(frank.request(json!({"type":"send","to":{"user":"erin"},"text":"a","key":"a"})).await["type"], "ack");
    erin.wait_for(Duration::from_secs(5), |f| f["type"] == "message").await.expect("first message");
    wait_all_online(&mut frank, json!({"type":"presence","users":["erin"]})).await;
    assert_eq!(frank.request(json!({"type":"send","to":{"user":"erin"},"text":"b","key":"b"})).await["type"], "ack");
    let message = erin.wait_for(Duration::from_secs(3), |f| f["type"] == "message").await;
    assert_eq!(message.map(|m| m["message"]["text"].clone()), Some(json!("b")), "live delivery after recovery");
}

/// Two gateways with one worker id would mint the same ids and overwrite
/// each other's inbox rows: the second refuses to start, saying why. The
/// same gateway (same name) restarting takes its id back.
async fn a_worker_id_in_use_is_refused_scenario() {
    let redis = PrivateRedis::start().await;
    let (spec, mut gateways) = start_cluster(&redis, 1, 3).await;
    let log = GatewayProcess::expect_refused(&spec, 0, "gw-imposter").await;
    assert!(log.contains("worker id 0 is held by the live gateway") && log.contains("gw-0"), "{log}");
    gateways[0].kill();
    let restarted = GatewayProcess::start(&spec, 0).await;
    assert!(restarted.admin_get("/readyz").await.is_some_and(|(status, _)| status == 200));
}

/// Test 6: the gateway of a send is SIGKILLed between two steps of it
/// (after the idempotency key is reserved; after every row is written,
/// before the ack), with and without Redis losing all its data before the
/// client retries on another gateway. Every retry gets an ack naming one
/// message, which every read API shows exactly once: the recipient's
/// sync, the sender's own sync (its other devices) and the history.
async fn a_retry_after_a_crash_and_a_redis_wipe_stores_one_message_scenario() {
    use kubechat_gateway::failpoint::{SEND_AFTER_RESERVE, SEND_BEFORE_ACK};
    let mut redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 3).await;
    let survivor = GatewayProcess::start(&spec, 1).await;
    // (where the first attempt's gateway dies, Redis wiped before the retry)
    let cases =
        [(SEND_AFTER_RESERVE, true), (SEND_BEFORE_ACK, true), (SEND_AFTER_RESERVE, false), (SEND_BEFORE_ACK, false)];
    for (n, (point, wipe)) in cases.into_iter().enumerate() {
        let case = format!("{point}, Redis {}", if wipe { "wiped" } else { "kept" });
        let ordinal = 10 + u16::try_from(n).expect("few cases");
        let mut crashing =
            GatewayProcess::start_with(&spec, ordinal, &format!("gw-crash-{n}"), &[("KUBECHAT_FAILPOINTS", point)])
                .await;
        let (alice, bob) = (format!("alice{n}"), format!("bob{n}"));
        let send =
            json!({"type": "send", "to": {"user": bob}, "text": format!("once, case {n}"), "key": format!("k{n}")});
        let mut first = ClusterClient::connect(&crashing.url(), &alice, "phone").await;
        assert!(first.try_request(send.clone(), Duration::from_secs(1)).await.is_none(), "{case}: acked while paused");
        let paused = Instant::now();
        while crashing.log_matching(&["paused at a failpoint"]).is_empty() {
            assert!(paused.elapsed() < Duration::from_secs(10), "{case}: never paused; log:\n{}", crashing.log_tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        crashing.kill();
        if wipe {
            redis.restart().await;
        }
        survivor.wait_ready().await;

        let mut retry = ClusterClient::connect(&survivor.url(), &alice, "phone").await;
        let ack = retry.request(send).await;
        assert_eq!(ack["type"], "ack", "{case}: {ack}");
        let id = ack["id"].as_str().expect("id").to_string();
        let stored_first = point == SEND_BEFORE_ACK;
        if stored_first {
            assert_eq!(ack["duplicate"], json!(true), "{case}: the first attempt's message is acked: {ack}");
        }
        let ids = |entries: &[Value]| -> Vec<String> {
            entries.iter().map(|e| e["message"]["id"].as_str().unwrap_or_default().to_string()).collect()
        };
        let mut reader = ClusterClient::connect(&survivor.url(), &bob, "laptop").await;
        let (received, _) = reader.sync_all("0").await.expect("the recipient syncs");
        assert_eq!(ids(&received), vec![id.clone()], "{case}: the recipient's inbox");
        let (own, _) = retry.sync_all("0").await.expect("the sender syncs");
        assert_eq!(ids(&own), vec![id.clone()], "{case}: the sender's inbox (its other devices)");
        let channel = ack["channel"].as_str().expect("channel").to_string();
        let history = reader.request(json!({"type": "history", "channel": channel, "limit": 10})).await;
        let in_history: Vec<&str> =
            history["messages"].as_array().expect("messages").iter().filter_map(|m| m["id"].as_str()).collect();
        assert_eq!(in_history, vec![id.as_str()], "{case}: history");
    }
}

/// Sends from `clients` (one each, round robin, every 5 ms) until `stop`;
/// the acked ids with the time they came, and when a send was first refused.
async fn send_until(
    clients: &mut [ClusterClient],
    to: &str,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<(u64, Instant)>, Option<(Instant, Value)>) {
    let (mut acked, mut refused) = (Vec::new(), None);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        for client in clients.iter_mut() {
            n += 1;
            let send =
                json!({"type": "send", "to": {"user": to}, "text": "tick", "key": format!("{}-{n}", client.user)});
            match client.try_request(send, Duration::from_secs(5)).await {
                Some(reply) if reply["type"] == "ack" => {
                    acked.push((reply["id"].as_str().and_then(|s| s.parse().ok()).expect("id"), Instant::now()));
                }
                Some(reply) => {
                    refused.get_or_insert((Instant::now(), reply));
                }
                None => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (acked, refused)
}

/// Test 7: a gateway cut off from Redis (a partition; its pod is then
/// force-deleted and replaced) keeps its worker id only until its claim
/// runs out: it stops minting (sends answered `unavailable`) a margin before
/// the lease ends, and its replacement, same pod name and worker id,
/// waits for that claim to lapse and mints above the old process's last
/// possible id. Both take traffic throughout; no id is ever minted twice.
async fn a_partitioned_gateway_and_its_replacement_never_mint_one_id_twice_scenario() {
    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 3).await;
    let proxy = CuttableProxy::start(redis.port).await;
    let old = GatewayProcess::start_custom(&spec, 7, "gw-7", &[], Some(&proxy.url())).await;
    let mut old_clients = Vec::new();
    for n in 0..4 {
        old_clients.push(ClusterClient::connect(&old.url(), &format!("old{n}"), "phone").await);
    }
    let stop_old = tokio_util::sync::CancellationToken::new();
    let old_sends = tokio::spawn({
        let stop = stop_old.clone();
        async move { send_until(&mut old_clients, "sink", stop).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    let cut_at = Instant::now();
    let cut_ms = kubechat_gateway::ids::now_ms();

    let replacement = GatewayProcess::start(&spec, 7).await; // named gw-7 too
    let ready_at = Instant::now();
    let mut new_clients = Vec::new();
    for n in 0..4 {
        new_clients.push(ClusterClient::connect(&replacement.url(), &format!("new{n}"), "phone").await);
    }
    let stop_new = tokio_util::sync::CancellationToken::new();
    let new_sends = tokio::spawn({
        let stop = stop_new.clone();
        async move { send_until(&mut new_clients, "sink", stop).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_old.cancel();
    stop_new.cancel();
    let (old_acked, old_refused) = old_sends.await.expect("old senders");
    let (new_acked, new_refused) = new_sends.await.expect("new senders");

    assert!(new_refused.is_none(), "the replacement refused a send: {new_refused:?}");
    assert!(!new_acked.is_empty(), "the replacement took no send");
    let (refused_at, refusal) = old_refused.expect("the cut-off gateway must stop minting");
    assert_eq!(refusal["code"], "unavailable", "{refusal}");
    // While it cannot mint ids it is not ready, and refuses new clients too.
    let late = ClusterClient::try_connect(&old.url(), "late", "phone").await;
    let refused_upgrade = late.as_ref().err().is_some_and(|e| e.contains("503"));
    assert!(refused_upgrade, "the cut-off gateway accepted a connection: {:?}", late.as_ref().err());
    let last_old = old_acked.iter().map(|(_, at)| *at).max().expect("the old gateway acked sends");
    // Minting (not the first refusal a client saw: sends queue behind slow
    // ones while Redis is cut) stops within the lease. The ids say when they
    // were minted; an ack's arrival adds the store write and the network.
    let last_minted_ms = old_acked.iter().map(|(id, _)| kubechat_gateway::ids::timestamp_ms(*id)).max();
    let minted_after_ms = last_minted_ms.map_or(0, |ms| ms - cut_ms);
    assert!(minted_after_ms < 3000, "minted an id {minted_after_ms} ms after the cut, past its 3 s lease");
    assert!(refused_at > cut_at);
    assert!(last_old < ready_at, "the old process acked a send after its replacement was ready");
    assert!(
        ready_at.duration_since(cut_at) >= Duration::from_millis(1500),
        "the replacement did not wait for the claim"
    );

    let mut ids: Vec<u64> = old_acked.iter().chain(&new_acked).map(|(id, _)| *id).collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "an id was minted twice");
    let newest_old = old_acked.iter().map(|(id, _)| *id).max().expect("old ids");
    assert!(new_acked.iter().all(|(id, _)| *id > newest_old), "the replacement minted below the old process's ids");
    eprintln!(
        "cut-off gateway: {} acked, the last minted {minted_after_ms} ms after the cut (its ack arrived {:?} after); \
         replacement ready {:?} after it, {} acked",
        old_acked.len(),
        last_old.saturating_duration_since(cut_at),
        ready_at.duration_since(cut_at),
        new_acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_gateway_and_its_replacement_never_mint_one_id_twice() {
    within(Duration::from_secs(120), a_partitioned_gateway_and_its_replacement_never_mint_one_id_twice_scenario())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reaped_gateway_comes_back_without_making_presence_unknown() {
    within(Duration::from_secs(120), a_reaped_gateway_comes_back_without_making_presence_unknown_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_registration_resyncs_its_connection() {
    within(Duration::from_secs(120), a_late_registration_resyncs_its_connection_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_gateway_leaves_discovery_within_two_publish_intervals() {
    within(Duration::from_secs(120), a_killed_gateway_leaves_discovery_within_two_publish_intervals_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fast_restart_leaves_no_ghost_sessions() {
    within(Duration::from_secs(120), a_fast_restart_leaves_no_ghost_sessions_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_a_crash_and_a_redis_wipe_stores_one_message() {
    within(Duration::from_secs(240), a_retry_after_a_crash_and_a_redis_wipe_stores_one_message_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_cross_gateways_once_and_in_order() {
    within(Duration::from_secs(240), messages_cross_gateways_once_and_in_order_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_follows_heartbeats_and_the_grace_window() {
    within(Duration::from_secs(240), presence_follows_heartbeats_and_the_grace_window_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_gateway_loses_no_acked_message_and_its_users_go_offline() {
    within(Duration::from_secs(240), a_killed_gateway_loses_no_acked_message_and_its_users_go_offline_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_degrades_then_recovers_without_loss() {
    within(Duration::from_secs(240), a_redis_restart_degrades_then_recovers_without_loss_scenario()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_id_in_use_is_refused() {
    within(Duration::from_secs(120), a_worker_id_in_use_is_refused_scenario()).await;
}

/// A store outage reads as a few lines, not a flood: the database driver's
/// warnings and errors pass once per 10 s (there were ~13 a second per
/// gateway: every reconnect attempt and every failed request), beside
/// kubechat's own "store unavailable" line. Cassandra is reached through a
/// proxy that the test cuts, while a client keeps sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_logs_the_drivers_warnings_once_per_interval() {
    const OUTAGE: Duration = Duration::from_secs(12);
    let redis = PrivateRedis::start().await;
    let mut spec = ClusterSpec::new(redis.url(), 30).await;
    let cql_port: u16 =
        spec.contact_points[0].rsplit(':').next().and_then(|p| p.parse().ok()).expect("the CQL node's port");
    let proxy = CuttableProxy::start(cql_port).await;
    spec.contact_points = vec![format!("127.0.0.1:{}", proxy.port)];
    let gateway = GatewayProcess::start(&spec, 0).await;
    let mut alice = ClusterClient::connect(&gateway.url(), "alice", "phone").await;
    let first = json!({"type":"send","to":{"user":"bob"},"text":"before","key":"k-0"});
    assert_eq!(alice.request(first).await["type"], "ack", "a send before the outage");
    let before = gateway.log_matching(&["scylla::"]).lines().count();

    proxy.cut();
    let started = Instant::now();
    let mut refused = 0;
    let mut n = 0;
    while started.elapsed() < OUTAGE {
        n += 1;
        let send = json!({"type":"send","to":{"user":"bob"},"text":"during","key":format!("k-{n}")});
        if alice.try_request(send, Duration::from_secs(3)).await.is_some_and(|r| r["type"] == "error") {
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during: Vec<String> = gateway
        .log_matching(&["scylla::"])
        .lines()
        .skip(before)
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .map(str::to_string)
        .collect();
    let (status, metrics) = http_get(gateway.admin_port, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    let held: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubechat_gateway_driver_log_lines_held_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no driver_log_lines_held_total in the metrics:\n{metrics}"));
    println!(
        "store outage of {OUTAGE:?}, {refused} of {n} sends refused: {} driver warning lines logged, {held} held back",
        during.len()
    );
    assert!(refused > 0, "no send was refused during the outage");
    assert!(
        during.len() <= 3,
        "{} driver warning lines in {OUTAGE:?} (at most one per 10 s):\n{}",
        during.len(),
        during.join("\n")
    );
    let unavailable = gateway.log_matching(&["store unavailable"]).lines().count();
    assert_eq!(unavailable, 1, "kubechat's own line says the store is unavailable, once");
    drop(redis);
}
