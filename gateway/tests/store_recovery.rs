//! The Scylla store after a real outage: Cassandra (the CQL stand-in) is
//! stopped and started again with `e2e/local/cassandra.sh`. The store's
//! health goes down while it is away and comes back within a second of
//! Cassandra answering again, and writes work from then on (the driver's
//! own pool would take up to 10 s: the store opens a new session instead).
//!
//! Its own test binary: it stops the shared Cassandra, so `e2e/test.sh`
//! runs it alone, before the suites that share it:
//! kubechat-test: exclusive

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cql_node;
use kubechat_gateway::store::health::{CheckedStore, StoreHealth};
use kubechat_gateway::store::scylla::{ScyllaConfig, ScyllaStore};
use kubechat_gateway::store::{Group, Store};
use tokio_util::sync::CancellationToken;

fn cassandra(action: &str) {
    let script = common::repo_root().join("e2e/local/cassandra.sh");
    let status = Command::new("bash").arg(script).arg(action).status().expect("run e2e/local/cassandra.sh");
    assert!(status.success(), "e2e/local/cassandra.sh {action} failed");
}

/// True once a brand-new CQL session can be opened (Cassandra answers).
async fn cassandra_answers(config: &ScyllaConfig) -> bool {
    let builder = scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .connection_timeout(Duration::from_millis(500));
    matches!(tokio::time::timeout(Duration::from_secs(2), builder.build()).await, Ok(Ok(_)))
}

/// Starts Cassandra again if the test fails while it is stopped: the
/// tests after this one need it.
struct StartAgainOnPanic;

impl Drop for StartAgainOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            cassandra("start");
        }
    }
}

fn group(n: u32) -> Group {
    Group { id: format!("g:{n}"), name: format!("group {n}"), owner: "alice".into(), created_at_ms: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_back_within_a_second_of_cassandra() {
    let keyspace = format!("recovery_{}_{}", std::process::id(), kubechat_gateway::ids::now_ms() % 1_000_000);
    let config = ScyllaConfig {
        contact_points: vec![cql_node()],
        keyspace,
        replication_factor: 1,
        request_timeout: Duration::from_secs(1),
        ..ScyllaConfig::default()
    };
    let inner = ScyllaStore::connect(config.clone()).await.unwrap_or_else(|e| {
        panic!("Cassandra (CQL) is not reachable at {}: {e}; start it with `e2e/local/cassandra.sh start`", cql_node())
    });
    let health = Arc::new(StoreHealth::new(prometheus::IntGauge::new("store_up", "test").expect("gauge")));
    let store = Arc::new(CheckedStore::new(Arc::new(inner), health.clone()));
    let shutdown = CancellationToken::new();
    tokio::spawn(store.clone().probe(shutdown.clone()));
    store.create_group(&group(1), &["alice".into()]).await.expect("a write before the outage");

    let _guard = StartAgainOnPanic;
    cassandra("stop");
    let refused = store.create_group(&group(2), &["alice".into()]).await;
    assert!(refused.is_err(), "a write while Cassandra is stopped must fail");
    assert!(!health.is_up(), "health reports the outage");

    // Start it again in the background and note when it answers.
    let starter = std::thread::spawn(|| cassandra("start"));
    let started = Instant::now();
    while !cassandra_answers(&config).await {
        assert!(started.elapsed() < Duration::from_secs(120), "Cassandra did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = Instant::now();
    while !health.is_up() {
        assert!(back.elapsed() < Duration::from_secs(5), "the store still reports down 5 s after Cassandra came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered_in = back.elapsed();
    starter.join().expect("the start script");
    store.create_group(&group(3), &["alice".into()]).await.expect("a write after the recovery");
    println!("store recovered {recovered_in:?} after Cassandra answered again");
    assert!(recovered_in < Duration::from_secs(1), "recovered only after {recovered_in:?}");
    shutdown.cancel();
}
