//! The store as three nodes: Cassandra on 127.0.0.2-4
//! (`e2e/local/cassandra-cluster.sh`), the keyspace replicated three times,
//! reads and writes at QUORUM (docs/storage.md). One node is SIGKILLed while
//! users on two gateway processes send to each other: sends and syncs go on
//! through the other two nodes and no acked message is lost; the node is
//! started again at the end and rejoins.
//!
//! A node's restart takes a core for several seconds, which would stretch
//! other suites' timed assertions, so `e2e/test.sh` runs it alone.
//! kubechat-test: exclusive

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{ClusterClient, ClusterSpec, GatewayProcess, PrivateRedis};
use common::traffic::traffic_through;
use serde_json::json;

/// The three nodes' CQL addresses (`e2e/local/env.sh` exports them).
fn store_nodes() -> Vec<String> {
    std::env::var("KUBECHAT_CQL_CLUSTER")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "127.0.0.2:19042,127.0.0.3:19042,127.0.0.4:19042".into())
        .split(',')
        .map(str::to_string)
        .collect()
}

fn cluster_script(args: &[&str]) {
    let script = common::repo_root().join("e2e/local/cassandra-cluster.sh");
    let status = Command::new("bash").arg(&script).args(args).status().expect("run e2e/local/cassandra-cluster.sh");
    assert!(status.success(), "e2e/local/cassandra-cluster.sh {} failed", args.join(" "));
}

async fn a_store_node_killed_under_traffic_loses_no_acked_message_scenario() {
    const VICTIM: &str = "2";
    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::on_store(redis.url(), 30, store_nodes(), 3).await;
    let gateways = [GatewayProcess::start(&spec, 0).await, GatewayProcess::start(&spec, 1).await];
    let urls: Vec<String> = gateways.iter().map(GatewayProcess::url).collect();

    // Senders and receivers on both gateways, across and within them.
    let pairs = [(0, 1), (1, 0), (0, 0), (1, 1)];
    let mut killed_at = None;
    let started = Instant::now();
    let totals = traffic_through(&urls, &pairs, 300, async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster_script(&["kill", VICTIM]);
        killed_at = Some(started.elapsed());
    })
    .await;
    let traffic_took = started.elapsed();

    // Still with the node down: a device that never synced reads a whole
    // conversation from the other two (QUORUM of three).
    let mut fresh = ClusterClient::connect(&urls[1], "rcpt0", "tablet").await;
    let (entries, _) = fresh.sync_all("0").await.expect("a sync with a store node down");
    let read_with_a_node_down = entries.len();

    // The node comes back (its hints replay what it missed) before any assertion,
    // so a failure leaves the three nodes whole for the next run.
    let restarted = Instant::now();
    cluster_script(&["start-node", VICTIM]);
    let rejoined_after = restarted.elapsed();

    println!(
        "store node {VICTIM} killed at {killed_at:?} into {traffic_took:?} of traffic: {totals:?}; \
         a fresh device synced {read_with_a_node_down} entries with the node down; \
         the node answered again {rejoined_after:?} after its restart"
    );
    assert!(killed_at.is_some(), "the node was not killed");
    assert_eq!(totals.acked, totals.sent, "every send is acked in the end (retried with its key): {totals:?}");
    assert_eq!(totals.lost, 0, "acked messages lost: {totals:?}");
    assert_eq!(totals.live + totals.recovered, totals.acked, "{totals:?}");
    assert_eq!(read_with_a_node_down, 300, "rcpt0's conversation (300 messages) read with a node down");

    // Sends go on once it is back.
    let mut alice = ClusterClient::connect(&urls[0], "alice", "phone").await;
    let ack = alice.request(json!({"type":"send","to":{"user":"bob"},"text":"after","key":"after-1"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_node_killed_under_traffic_loses_no_acked_message() {
    let limit = Duration::from_secs(240);
    tokio::time::timeout(limit, a_store_node_killed_under_traffic_loses_no_acked_message_scenario())
        .await
        .unwrap_or_else(|_| panic!("scenario did not finish within {limit:?}"));
}
