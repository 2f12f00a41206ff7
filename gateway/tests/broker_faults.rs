//! The Redis broker under faults, against a real `redis-server` of the
//! test's own (so it can be killed, wiped and restarted): the worker id is
//! never taken back from another gateway, and after Redis lost its data
//! presence says "unknown" rather than "offline" until sessions are
//! registered again, after which connections are told to resync.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::PrivateRedis;
use kubechat_gateway::broker::redis::{RedisBroker, RedisBrokerConfig};
use kubechat_gateway::broker::{Broker, Frame, LocalDelivery};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A gateway's local side: fixed sessions, and what the broker asked of it.
#[derive(Default)]
struct Local {
    sessions: Mutex<Vec<(String, String)>>,
    resync_all: Mutex<Vec<Instant>>,
    resync_users: Mutex<Vec<String>>,
}

impl LocalDelivery for Local {
    fn deliver_local(&self, _users: &[String], _frame: &Frame) {}
    fn resync_all(&self, _reason: &str) {
        self.resync_all.lock().expect("lock").push(Instant::now());
    }
    fn resync_users(&self, users: &[String], _reason: &str) {
        self.resync_users.lock().expect("lock").extend_from_slice(users);
    }
    fn local_sessions(&self) -> Vec<(String, String)> {
        self.sessions.lock().expect("lock").clone()
    }
    fn remote_user_offline(&self, _user: String) {}
    fn group_changed(&self, _group: &str) {}
}

async fn broker(
    redis: &PrivateRedis,
    id: &str,
    worker_id: Option<u16>,
    local: Arc<Local>,
    shutdown: &CancellationToken,
) -> Arc<RedisBroker> {
    let config = RedisBrokerConfig {
        gateway_id: id.into(),
        lease: Duration::from_secs(3),
        command_timeout: Duration::from_secs(1),
        worker_id,
    };
    let endpoint = kubechat_redis::Endpoint::single(&redis.url()).expect("Redis URL");
    RedisBroker::start(endpoint, config, local, &TaskTracker::new(), shutdown.clone())
        .await
        .unwrap_or_else(|e| panic!("private Redis not reachable: {e}"))
}

async fn eventually(what: &str, within: Duration, check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_id_taken_by_another_gateway_is_not_taken_back() {
    let redis = PrivateRedis::start().await;
    let shutdown = CancellationToken::new();
    let gateway = broker(&redis, "gw-a", Some(7), Arc::default(), &shutdown).await;
    assert!(gateway.may_mint_ids() && gateway.healthy());

    // Another gateway holds worker id 7 now (as after this one paused past its lease).
    let mut redis_conn =
        redis::Client::open(redis.url()).expect("url").get_multiplexed_async_connection().await.expect("Redis");
    let claim_b = format!("gw-b|another-process|{}", kubechat_gateway::ids::now_ms() + 60_000);
    let _: () = redis_conn.set("kubechat:worker-id:7", &claim_b).await.expect("set");
    eventually("minting stops once the renewal finds gw-b there", Duration::from_secs(3), || !gateway.may_mint_ids())
        .await;
    assert!(!gateway.healthy(), "not healthy without a worker id");
    tokio::time::sleep(Duration::from_millis(2500)).await; // past two more renewals
    let holder: Option<String> = redis_conn.get("kubechat:worker-id:7").await.expect("get");
    assert_eq!(holder.as_deref(), Some(claim_b.as_str()), "the renewal overwrote the other gateway's claim");
    assert!(!gateway.may_mint_ids());

    // Freed: this gateway takes it again.
    let _: () = redis_conn.del("kubechat:worker-id:7").await.expect("del");
    eventually("minting resumes once the id is free", Duration::from_secs(3), || gateway.may_mint_ids()).await;
    let holder: Option<String> = redis_conn.get("kubechat:worker-id:7").await.expect("get");
    assert!(holder.as_deref().is_some_and(|h| h.starts_with("gw-a|")), "{holder:?}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_lost_its_data_presence_is_unknown_until_sessions_are_back() {
    let mut redis = PrivateRedis::start().await;
    let shutdown = CancellationToken::new();
    let (local_a, local_b) = (Arc::new(Local::default()), Arc::new(Local::default()));
    local_a.sessions.lock().expect("lock").push(("alice".into(), "phone".into()));
    let a = broker(&redis, "gw-a", None, local_a.clone(), &shutdown).await;
    let b = broker(&redis, "gw-b", None, local_b.clone(), &shutdown).await;
    assert!(a.session_added("alice", "phone").await.expect("add"));
    let users = vec!["alice".to_string()];
    assert_eq!(b.online(&users).await.expect("presence on a fresh cluster is known"), users.iter().cloned().collect());

    redis.restart().await; // everything lost
    let restarted = Instant::now();
    // Routing works again before presence is known: its "offline" is a
    // guess, so push jobs are held back until it is not.
    let routed = loop {
        if let Ok(routed) = b.route(&users, &Frame::from_static("{}")).await {
            break routed;
        }
        assert!(restarted.elapsed() < Duration::from_secs(10), "routing never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(routed.unsettled_for.is_some(), "a route right after Redis lost its data is not certain: {routed:?}");
    // Until alice's session is back, b must not say she is offline: an
    // error ("unknown") is the honest answer.
    let mut unknown = 0;
    loop {
        match b.online(&users).await {
            Ok(online) if online.contains("alice") => break,
            Ok(online) => panic!("alice reported offline {:?} after the restart: {online:?}", restarted.elapsed()),
            Err(_) => unknown += 1,
        }
        assert!(restarted.elapsed() < Duration::from_secs(15), "presence never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(unknown > 0, "presence was never unknown, so the test proved nothing");
    let last = b.last_active(&users).await.expect("last active");
    assert!(last[0].is_some(), "alice's last activity is known again: {last:?}");

    // a's connections were told to resync once its sessions were back.
    eventually("gateway a asks its connections to resync", Duration::from_secs(5), || {
        !local_a.resync_all.lock().expect("lock").is_empty()
    })
    .await;
    assert!(a.healthy() && b.healthy());

    let routed = b.route(&["nobody".to_string()], &Frame::from_static("{}")).await.expect("route");
    assert!(routed.offline.contains("nobody") && routed.unsettled_for.is_none(), "settled: {routed:?}");
    shutdown.cancel();
}
