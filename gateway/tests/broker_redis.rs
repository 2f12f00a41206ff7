//! The Redis broker against a real Redis: forwarding between gateways,
//! online/offline transitions, and reaping a gateway that stopped renewing
//! its lease.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubechat_gateway::broker::redis::{RedisBroker, RedisBrokerConfig};
use kubechat_gateway::broker::{Broker, Frame, LocalDelivery};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Default)]
struct Recorder {
    delivered: Mutex<Vec<(Vec<String>, String)>>,
    offline: Mutex<Vec<String>>,
    groups_changed: Mutex<Vec<String>>,
}

impl LocalDelivery for Recorder {
    fn deliver_local(&self, users: &[String], frame: &Frame) {
        self.delivered.lock().expect("lock").push((users.to_vec(), frame.to_string()));
    }
    fn resync_all(&self, _reason: &str) {}
    fn resync_users(&self, _users: &[String], _reason: &str) {}
    fn local_sessions(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn remote_user_offline(&self, user: String) {
        self.offline.lock().expect("lock").push(user);
    }
    fn group_changed(&self, group: &str) {
        self.groups_changed.lock().expect("lock").push(group.to_string());
    }
}

fn redis_url() -> String {
    std::env::var("KUBECHAT_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:16379".into())
}

async fn broker(id: &str, lease: Duration, recorder: Arc<Recorder>, shutdown: &CancellationToken) -> Arc<RedisBroker> {
    let config =
        RedisBrokerConfig { gateway_id: id.into(), lease, command_timeout: Duration::from_secs(2), worker_id: None };
    let endpoint = kubechat_redis::Endpoint::single(&redis_url()).expect("Redis URL");
    RedisBroker::start(endpoint, config, recorder, &TaskTracker::new(), shutdown.clone())
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable: {e}; start it with `e2e/local/redis.sh start`"))
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    eventually_async(what, || std::future::ready(check())).await;
}

async fn eventually_async<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within 10 s");
}

#[tokio::test]
async fn forwards_tracks_presence_and_reaps_dead_gateways() {
    let run = format!("{}-{}", std::process::id(), kubechat_gateway::ids::now_ms());
    let (a_id, b_id, c_id) = (format!("a-{run}"), format!("b-{run}"), format!("c-{run}"));
    let (alice, bob, carol) = (format!("alice-{run}"), format!("bob-{run}"), format!("carol-{run}"));
    let shutdown = CancellationToken::new();
    let (rec_a, rec_b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let a = broker(&a_id, Duration::from_secs(30), rec_a.clone(), &shutdown).await;
    let b = broker(&b_id, Duration::from_secs(30), rec_b.clone(), &shutdown).await;
    eventually("both subscribed", || a.healthy() && b.healthy()).await;

    assert!(b.session_added(&bob, "phone").await.expect("add"), "bob's first session is an online transition");
    assert!(!b.session_added(&bob, "laptop").await.expect("add"), "a second device is not");
    // Gateway a lists live gateways through a cache (1 s) that may predate b's lease.
    eventually_async("gateway a sees b as live", || async {
        a.online(std::slice::from_ref(&bob)).await.is_ok_and(|online| online.contains(&bob))
    })
    .await;
    let frame = Frame::from_static(r#"{"type":"message"}"#);
    let routed = a.route(&[bob.clone(), alice.clone()], &frame).await.expect("route");
    assert_eq!(routed.offline, [alice.clone()].into_iter().collect(), "alice has no session anywhere");
    eventually("the forward reaches gateway b", || !rec_b.delivered.lock().expect("lock").is_empty()).await;
    assert_eq!(rec_b.delivered.lock().expect("lock")[0], (vec![bob.clone()], frame.to_string()));

    // A membership change reaches every gateway's member cache, the sender's too.
    let group = format!("g:{run}");
    a.group_changed(&group).await.expect("announce");
    eventually("gateway b hears of the membership change", || {
        rec_b.groups_changed.lock().expect("lock").contains(&group)
    })
    .await;
    eventually("gateway a hears of its own membership change", || {
        rec_a.groups_changed.lock().expect("lock").contains(&group)
    })
    .await;
    assert!(rec_b.delivered.lock().expect("lock").len() == 1, "a membership notice is not a forward");
    // Gateway a's subscription delivers in publish order, and the notice was
    // published after the forward: had a forward to a been published, it
    // would have arrived by now.
    assert!(rec_a.delivered.lock().expect("lock").is_empty(), "nothing forwarded to the sender's gateway");

    assert_eq!(a.online(&[bob.clone(), alice.clone()]).await.expect("online"), [bob.clone()].into_iter().collect());
    assert!(!b.session_removed(&bob, "phone").await.expect("remove"));
    assert!(b.session_removed(&bob, "laptop").await.expect("remove"), "last device gone: offline transition");
    assert!(a.last_active(std::slice::from_ref(&bob)).await.expect("seen")[0].is_some());

    // Gateway c holds carol, then stops renewing its lease (as if killed).
    let c_shutdown = CancellationToken::new();
    let c = broker(&c_id, Duration::from_secs(1), Arc::new(Recorder::default()), &c_shutdown).await;
    assert!(c.session_added(&carol, "phone").await.expect("add"));
    c_shutdown.cancel();
    eventually("carol reaped as offline", || {
        rec_a.offline.lock().expect("lock").contains(&carol) || rec_b.offline.lock().expect("lock").contains(&carol)
    })
    .await;
    assert!(a.online(std::slice::from_ref(&carol)).await.expect("online").is_empty());
    shutdown.cancel();
}
