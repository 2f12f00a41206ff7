//! Gateways on a Redis Cluster: three masters and three replicas of
//! Debian's `redis-server` on 127.0.1.1-6 (`e2e/local/redis-cluster.sh`,
//! one private cluster per test), two gateway processes, Cassandra as the
//! store. Routing, presence and push work with users spread over every
//! shard; a master SIGKILLed under traffic fails over to its replica with
//! no acked message lost and live delivery back within a measured time; a
//! slot moved under traffic (`redis-cli --cluster reshard`) loses no
//! subscription and surfaces no error to clients.
//!
//! A failover waits out the cluster's node timeout under load, so
//! `e2e/test.sh` runs it alone.
//! kubechat-test: exclusive
//! kubechat-test: threads 3

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{ClusterClient, ClusterSpec, GatewayProcess, free_port, push_jobs};
use common::traffic::traffic_through;
use kubechat_gateway::broker::redis::wire;
use kubechat_redis::{Connection, Endpoint, Shard, slot};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A Redis Cluster of this test only, started and stopped by the script.
struct PrivateRedisCluster {
    port: u16,
    dir: tempfile::TempDir,
}

impl PrivateRedisCluster {
    async fn start() -> Self {
        // The port must be free on all six addresses, and so must the
        // cluster bus (port + 10000).
        let port = loop {
            let port = free_port();
            let free =
                |p: u16| (1..=6).all(|n| std::net::TcpListener::bind((format!("127.0.1.{n}").as_str(), p)).is_ok());
            if port < 50_000 && free(port) && free(port + 10_000) {
                break port;
            }
        };
        let cluster = Self { port, dir: tempfile::tempdir().expect("temp dir") };
        cluster.script(&["start"]);
        cluster
    }

    fn script(&self, args: &[&str]) {
        let script = common::repo_root().join("e2e/local/redis-cluster.sh");
        let status = Command::new("bash")
            .arg(&script)
            .args(args)
            .env("REDIS_CLUSTER_PORT", self.port.to_string())
            .env("REDIS_CLUSTER_DIR", self.dir.path())
            .status()
            .expect("run e2e/local/redis-cluster.sh");
        assert!(status.success(), "e2e/local/redis-cluster.sh {} failed (needs Debian's redis-server)", args.join(" "));
    }

    fn node(&self, n: u8) -> String {
        format!("127.0.1.{n}:{}", self.port)
    }

    /// Node n (1-6) of the cluster by its address.
    fn number(&self, address: &str) -> u8 {
        (1..=6).find(|n| self.node(*n) == address).unwrap_or_else(|| panic!("{address} is not a node of this cluster"))
    }

    /// The gateways' `redis` section: every node a seed.
    fn config(&self) -> kubechat_config::Redis {
        kubechat_config::Redis {
            url: format!("redis://{}", self.node(1)),
            password_env: None,
            cluster: true,
            seed_urls: (2..=6).map(|n| format!("redis://{}", self.node(n))).collect(),
        }
    }

    async fn connect(&self) -> Connection {
        Endpoint::new(&self.config(), None).expect("cluster seeds").connect().await.expect("connect to the cluster")
    }

    async fn masters(&self) -> Vec<Shard> {
        self.connect().await.shards().await.expect("CLUSTER SLOTS")
    }

    async fn owner(&self, key: &str) -> Shard {
        let slot = slot(key.as_bytes());
        self.masters()
            .await
            .into_iter()
            .find(|s| s.owns(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    fn node_id(&self, address: &str) -> String {
        let (host, port) = address.rsplit_once(':').expect("host:port");
        let out =
            Command::new("redis-cli").args(["-h", host, "-p", port, "cluster", "myid"]).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        let script = common::repo_root().join("e2e/local/redis-cluster.sh");
        let _ = Command::new("bash")
            .arg(&script)
            .args(["stop", "--wipe"])
            .env("REDIS_CLUSTER_PORT", self.port.to_string())
            .env("REDIS_CLUSTER_DIR", self.dir.path())
            .status();
    }
}

/// The masters a gateway reports on its admin API (`backends.redisShards`):
/// (master, slots, subscribed), ordered by address.
async fn reported_shards(gateway: &GatewayProcess) -> Vec<(String, u64, bool)> {
    let (status, body) = gateway.admin_get("/v1/admin/load").await.expect("the admin API answers");
    assert_eq!(status, 200, "{body}");
    let load: serde_json::Value = serde_json::from_str(&body).expect("load JSON");
    let mut shards: Vec<(String, u64, bool)> = load["backends"]["redisShards"]
        .as_array()
        .map(|shards| {
            shards
                .iter()
                .map(|s| {
                    let master = s["master"].as_str().unwrap_or_default().to_string();
                    (master, s["slots"].as_u64().unwrap_or(0), s["subscribed"] == true)
                })
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards
}

/// Users whose keys live on each master (two per master).
async fn users_on_every_shard(cluster: &PrivateRedisCluster) -> Vec<(String, String)> {
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "three masters: {masters:?}");
    let mut picked = Vec::new();
    for master in &masters {
        let on_it: Vec<String> = (0..200)
            .map(|n| format!("user{n}"))
            .filter(|u| master.owns(slot(wire::sessions_key(u).as_bytes())))
            .take(2)
            .collect();
        assert_eq!(on_it.len(), 2, "users on {}", master.address);
        picked.extend(on_it.into_iter().map(|u| (u, master.address.clone())));
    }
    picked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_presence_and_push_work_with_users_on_every_shard() {
    let cluster = PrivateRedisCluster::start().await;
    // Offline 3 s after a device vanishes.
    let spec = ClusterSpec::on(cluster.config(), 3, vec![common::cql_node()], 1).await;
    let gateways = [GatewayProcess::start(&spec, 0).await, GatewayProcess::start(&spec, 1).await];
    let users = users_on_every_shard(&cluster).await;
    let masters: Vec<String> = cluster.masters().await.into_iter().map(|m| m.address).collect();
    let reported = reported_shards(&gateways[0]).await;
    assert_eq!(
        reported.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        masters,
        "every master reported: {reported:?}"
    );
    assert_eq!(reported.iter().map(|s| s.1).sum::<u64>(), 16_384, "{reported:?}");
    assert!(reported.iter().all(|s| s.2), "subscribed on every master: {reported:?}");

    // Each user connects to one gateway, alternating.
    let mut clients = Vec::new();
    for (i, (user, _)) in users.iter().enumerate() {
        clients.push(ClusterClient::connect(&gateways[i % 2].url(), user, "phone").await);
    }
    // Everyone sends to the next user (on the other gateway, on another shard).
    for i in 0..users.len() {
        let to = &users[(i + 1) % users.len()].0;
        let text = format!("from {} to {to}", users[i].0);
        let ack =
            clients[i].request(json!({"type": "send", "to": {"user": to}, "text": text, "key": format!("k{i}")})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let receiver = &mut clients[(i + 1) % users.len()];
        let live = receiver
            .wait_for(Duration::from_secs(5), |f| f["type"] == "message" && f["message"]["text"] == json!(text))
            .await;
        assert!(
            live.is_some(),
            "{to} (keys on {}) did not get {text:?} live from {} (on {})",
            users[(i + 1) % users.len()].1,
            users[i].0,
            users[i].1
        );
    }

    // A group with a member on every shard: one send reaches all the others live.
    let members: Vec<&String> = users.iter().skip(1).map(|(u, _)| u).collect();
    let created = clients[0].request(json!({"type": "create_group", "name": "shards", "members": members})).await;
    let group = created["group"]["id"].as_str().unwrap_or_else(|| panic!("no group id: {created}")).to_string();
    let ack = clients[0].request(json!({"type": "send", "to": {"group": group}, "text": "to all", "key": "g1"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for (i, client) in clients.iter_mut().enumerate().skip(1) {
        let live = client.wait_for(Duration::from_secs(5), |f| f["message"]["text"] == "to all").await;
        assert!(live.is_some(), "group member {} did not get the group message live", users[i].0);
    }
    // Presence of the members, asked from gateway 0: online on both gateways.
    let names: Vec<&String> = users.iter().skip(1).map(|(u, _)| u).collect();
    common::cluster::wait_all_online(&mut clients[0], json!({"type": "presence", "users": names})).await;

    // A user with no device connected: the send leaves a push job in the stream's shard.
    let mut queue = cluster.connect().await;
    let offline = "nobody-here";
    let ack =
        clients[1].request(json!({"type": "send", "to": {"user": offline}, "text": "wake up", "key": "p1"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let started = Instant::now();
    loop {
        let jobs = push_jobs(&mut queue).await;
        if jobs.iter().any(|j| j["user"] == offline) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no push job for {offline}: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Leaving: presence follows, whatever shard the user's keys are on.
    let leaver = users[2].0.clone();
    clients[2].kill();
    let started = Instant::now();
    loop {
        let reply = clients[0].request(json!({"type": "presence", "users": [leaver]})).await;
        if reply["users"][0]["online"] == false {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{leaver} still online: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Gateway processes `gw-0` and `gw-1` on `cluster` (offline after 30 s),
/// and their URLs; the spec holds their files.
async fn two_gateways(cluster: &PrivateRedisCluster) -> (ClusterSpec, [GatewayProcess; 2], Vec<String>) {
    let spec = ClusterSpec::on(cluster.config(), 30, vec![common::cql_node()], 1).await;
    let gateways = [GatewayProcess::start(&spec, 0).await, GatewayProcess::start(&spec, 1).await];
    let urls = gateways.iter().map(GatewayProcess::url).collect();
    (spec, gateways, urls)
}

/// A user on gateway 0 sending to one on gateway 1 every 100 ms until
/// `stop`: when each message was sent, and whether it arrived live.
async fn probe(from: String, to: String, stop: CancellationToken) -> Vec<(Instant, bool)> {
    let mut sender = ClusterClient::connect(&from, "probe-a", "phone").await;
    let mut receiver = ClusterClient::connect(&to, "probe-b", "phone").await;
    let mut sent = Vec::new();
    let mut n = 0;
    while !stop.is_cancelled() {
        n += 1;
        let text = format!("probe {n}");
        let at = Instant::now();
        let send = json!({"type": "send", "to": {"user": "probe-b"}, "text": text, "key": format!("probe-{n}")});
        if sender.try_request(send, Duration::from_secs(3)).await.is_none_or(|ack| ack["type"] != "ack") {
            sent.push((at, false));
            continue;
        }
        let live = receiver.wait_for(Duration::from_millis(500), |f| f["message"]["text"] == json!(text)).await;
        sent.push((at, live.is_some()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sent
}

/// How long after `from` probes stopped arriving live: from `from` to the
/// first probe after the last one that did not (zero if none missed).
fn live_back_after(probes: &[(Instant, bool)], from: Instant) -> Duration {
    match probes.iter().rposition(|(at, live)| *at >= from && !live) {
        Some(last_missed) => probes.get(last_missed + 1).map_or(Duration::MAX, |(at, _)| at.duration_since(from)),
        None => Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_traffic_fails_over_with_no_acked_message_lost() {
    let cluster = PrivateRedisCluster::start().await;
    let (_spec, gateways, urls) = two_gateways(&cluster).await;
    // The master that carries forwards from gateway 0 to gateway 1.
    let channel = wire::forward_channel(&wire::delivery_partitions(), "gw-0", "gw-1");
    let victim = cluster.owner(&channel).await;
    let victim_node = cluster.number(&victim.address);
    let other_masters: Vec<String> =
        cluster.masters().await.into_iter().map(|m| m.address).filter(|a| *a != victim.address).collect();

    let stop = CancellationToken::new();
    let probes = tokio::spawn(probe(urls[0].clone(), urls[1].clone(), stop.clone()));
    let pairs = [(0, 1), (1, 0), (0, 0), (1, 1)];
    let started = Instant::now();
    let mut killed_at = None;
    // 500 sends a pair (about 20 s): the failover and the resync after it
    // (5-7 s here) happen while the receivers are connected.
    let totals = traffic_through(&urls, &pairs, 500, async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.script(&["kill", &victim_node.to_string()]);
        killed_at = Some(Instant::now());
    })
    .await;
    // Probes go on a while after the traffic, so a slow failover is measured too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let probes = probes.await.expect("probe task");
    let killed_at = killed_at.expect("the master was killed");
    let back_after = live_back_after(&probes, killed_at);
    let masters = cluster.masters().await;
    let promoted = masters.iter().find(|m| m.owns(slot(channel.as_bytes()))).map(|m| m.address.clone());
    println!(
        "master {} (node {victim_node}) SIGKILLed {:?} into {:?} of traffic: {totals:?}; \
         live delivery gateway 0 → 1 back {back_after:?} after the kill ({} probes, {} not live); \
         its slots now served by {promoted:?}",
        victim.address,
        killed_at.duration_since(started),
        started.elapsed(),
        probes.len(),
        probes.iter().filter(|(_, live)| !live).count()
    );
    // The node rejoins (as a replica) before the assertions.
    cluster.script(&["start-node", &victim_node.to_string()]);

    assert_eq!(totals.acked, totals.sent, "every send is acked in the end: {totals:?}");
    assert_eq!(totals.lost, 0, "acked messages lost: {totals:?}");
    assert_eq!(totals.live + totals.recovered, totals.acked, "{totals:?}");
    assert_eq!(totals.stranded, 0, "every message missed live was synced on a resync while connected: {totals:?}");
    assert!(
        promoted.as_ref().is_some_and(|p| *p != victim.address && !other_masters.contains(p)),
        "a replica of {} serves its slots now: {masters:?}",
        victim.address
    );
    assert!(back_after < Duration::from_secs(15), "live delivery back only {back_after:?} after the kill");
    // The admin API (and so the operator's status) names the new master, subscribed.
    let reported = reported_shards(&gateways[1]).await;
    assert!(
        reported.iter().any(|(master, _, subscribed)| Some(master) == promoted.as_ref() && *subscribed),
        "gateway 1 reports {promoted:?} subscribed: {reported:?}"
    );
    assert!(
        probes.last().is_some_and(|(_, live)| *live),
        "the last probes arrive live: {:?}",
        &probes[probes.len().saturating_sub(5)..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_moved_under_traffic_loses_no_subscription_and_no_send() {
    let cluster = PrivateRedisCluster::start().await;
    let (_spec, gateways, urls) = two_gateways(&cluster).await;
    // Move the slot of the channel gateway 1 hears gateway 0 on (and the
    // owner's slots before it: `reshard` takes them from the start).
    let channel = wire::forward_channel(&wire::delivery_partitions(), "gw-0", "gw-1");
    let channel_slot = slot(channel.as_bytes());
    let owner = cluster.owner(&channel).await;
    let masters = cluster.masters().await;
    let target = masters.iter().find(|m| m.address != owner.address).expect("another master").address.clone();
    let first = owner.slots.iter().find(|(low, high)| (*low..=*high).contains(&channel_slot)).expect("range").0;
    let count = (channel_slot - first + 1).to_string();
    let (from_id, to_id) = (cluster.node_id(&owner.address), cluster.node_id(&target));

    let stop = CancellationToken::new();
    let probes = tokio::spawn(probe(urls[0].clone(), urls[1].clone(), stop.clone()));
    let pairs = [(0, 1), (1, 0), (0, 0), (1, 1)];
    let mut moved = None;
    let totals = traffic_through(&urls, &pairs, 300, async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let started = Instant::now();
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &cluster.node(1), "--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &count, "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster reshard");
        assert!(out.status.success(), "reshard failed: {}", String::from_utf8_lossy(&out.stderr));
        moved = Some((started, started.elapsed()));
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let probes = probes.await.expect("probe task");
    let (moved_at, took) = moved.expect("resharded");
    let new_owner = cluster.owner(&channel).await;
    let back_after = live_back_after(&probes, moved_at);
    println!(
        "{count} slots up to {channel_slot} moved from {} to {target} in {took:?} under traffic: {totals:?}; \
         probes: {} sent, {} not live, live again {back_after:?} after the move began",
        owner.address,
        probes.len(),
        probes.iter().filter(|(_, live)| !live).count()
    );
    assert_eq!(new_owner.address, target, "the channel's slot moved");
    assert_eq!(totals.acked, totals.sent, "{totals:?}");
    assert_eq!(totals.lost, 0, "acked messages lost: {totals:?}");
    assert_eq!(totals.live + totals.recovered, totals.acked, "{totals:?}");
    assert_eq!(totals.retries, 0, "a client saw an error or no answer (MOVED/CROSSSLOT must stay inside): {totals:?}");
    assert_eq!(totals.stranded, 0, "every message missed live was synced on a resync while connected: {totals:?}");
    // The subscription followed the slot: probes after the move arrive live.
    let after: Vec<bool> =
        probes.iter().filter(|(at, _)| *at > moved_at + took + Duration::from_secs(2)).map(|p| p.1).collect();
    assert!(!after.is_empty() && after.iter().all(|live| *live), "probes after the move arrive live: {after:?}");
    for gateway in &gateways {
        assert!(gateway.log_matching(&["CROSSSLOT"]).is_empty(), "{}", gateway.log_matching(&["CROSSSLOT"]));
    }
}
