//! Discovery end to end when the store goes away: the local Cassandra is
//! stopped under a ChatCluster of three real gateways, and the operator shows
//! it (`Degraded`) until it returns. Its own test binary because it stops the
//! Cassandra every other suite shares, so `e2e/test.sh` runs it alone:
//! kubechat-test: exclusive

mod discovery_harness;

use std::time::{Duration, Instant};

use kubechat_e2e::cluster::wait_for;
use kubechat_e2e::components::PrivateRedis;

use discovery_harness::*;

fn cassandra(action: &str) {
    let script = kubechat_e2e::repo_root().join("e2e/local/cassandra.sh");
    let status =
        std::process::Command::new("bash").arg(script).arg(action).status().expect("run e2e/local/cassandra.sh");
    assert!(status.success(), "e2e/local/cassandra.sh {action} failed");
}

/// Starts Cassandra again if the test fails while it is stopped: the tests
/// after this one need it.
struct StartCassandraOnPanic;

impl Drop for StartCassandraOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            cassandra("start");
        }
    }
}

#[tokio::test]
async fn a_store_the_gateways_lose_shows_as_degraded_until_it_returns() {
    let redis = PrivateRedis::start().await;
    let h = Harness::start_with_redis("disc-store", redis.url()).await;
    h.wait_endpoints(INTERVAL * 5, "listing 3 ready gateways seeing the store up", |e| {
        e.gateways.len() == GATEWAYS
            && e.gateways.iter().all(|g| g.ready && g.backends.as_ref().is_some_and(|b| b.store == "up"))
    })
    .await;

    let _restart = StartCassandraOnPanic;
    cassandra("stop");
    let lost = Instant::now();
    // Gateways find out when they next touch the store; a probe every
    // heartbeat at the latest (clients are idle here).
    let shown =
        wait_for(Duration::from_secs(60), || async { degraded(&h.cluster().await).filter(|d| d.0 == "True") }).await;
    let Some((_, reason, message)) = shown else {
        panic!("not Degraded with Cassandra stopped: {:#?}", h.cluster().await.status);
    };
    println!("Cassandra stopped: Degraded after {} ms: {message}", lost.elapsed().as_millis());
    assert_eq!(reason, "BackendUnavailable");
    assert!(message.contains("store unavailable from"), "{message}");

    cassandra("start");
    let back = Instant::now();
    let recovered =
        wait_for(Duration::from_secs(60), || async { degraded(&h.cluster().await).filter(|d| d.0 == "False") }).await;
    assert!(recovered.is_some(), "still Degraded after Cassandra came back: {:#?}", h.cluster().await.status);
    println!("Cassandra started again: Degraded False {} ms after it answered", back.elapsed().as_millis());
    h.stop().await;
}
