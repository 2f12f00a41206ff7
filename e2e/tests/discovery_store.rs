//! Discovery end to end when the store goes away: the three gateways of a
//! ChatCluster reach Cassandra through a gate the test closes (to them, a
//! store that is down: every connection reset, new ones refused), and the
//! operator shows it (`Degraded`) until the gate opens again. The gate
//! leaves the shared Cassandra up for the suites beside this one; a real
//! stop and start of Cassandra is `gateway/tests/store_recovery.rs`.

mod discovery_harness;

use std::time::{Duration, Instant};

use kubechat_e2e::cluster::wait_for;
use kubechat_e2e::components::{PrivateRedis, TcpGate, cql_node};

use discovery_harness::*;

#[tokio::test]
async fn a_store_the_gateways_lose_shows_as_degraded_until_it_returns() {
    let redis = PrivateRedis::start().await;
    let gate = TcpGate::start(cql_node()).await;
    let h = Harness::start_with_backends("disc-store", redis.url(), gate.address()).await;
    h.wait_endpoints(INTERVAL * 5, "listing 3 ready gateways seeing the store up", |e| {
        e.gateways.len() == GATEWAYS
            && e.gateways.iter().all(|g| g.ready && g.backends.as_ref().is_some_and(|b| b.store == "up"))
    })
    .await;

    gate.close();
    let lost = Instant::now();
    // Gateways find out when they next touch the store; a probe every
    // heartbeat at the latest (clients are idle here).
    let shown =
        wait_for(Duration::from_secs(60), || async { degraded(&h.cluster().await).filter(|d| d.0 == "True") }).await;
    let Some((_, reason, message)) = shown else {
        panic!("not Degraded with the store out of reach: {:#?}", h.cluster().await.status);
    };
    println!("store out of reach: Degraded after {} ms: {message}", lost.elapsed().as_millis());
    assert_eq!(reason, "BackendUnavailable");
    assert!(message.contains("store unavailable from"), "{message}");

    gate.open();
    let back = Instant::now();
    let recovered =
        wait_for(Duration::from_secs(60), || async { degraded(&h.cluster().await).filter(|d| d.0 == "False") }).await;
    assert!(recovered.is_some(), "still Degraded after the store came back: {:#?}", h.cluster().await.status);
    println!("store reachable again: Degraded False after {} ms", back.elapsed().as_millis());
    h.stop().await;
}
