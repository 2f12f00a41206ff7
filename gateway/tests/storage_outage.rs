//! When storage fails, a send gets `storage_unavailable`, nothing is
//! acknowledged, the outage shows in `/readyz` and `store_up`, recovery
//! shows within a second without any client asking, and a retry with the
//! same key after recovery is stored once. The outage is simulated by a store wrapper (the real embedded store
//! underneath) whose writes fail while a switch is on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::cluster::http_get;
use common::{Client, KEY};
use kubechat_gateway::app::{self, BrokerSetup, GatewayOptions};
use kubechat_gateway::store::embedded::EmbeddedStore;
use kubechat_gateway::store::{
    Group, InboxEntry, Join, Markers, Message, NewMessage, Page, Store, StoreError, StoreResult, Stored,
};
use kubechat_gateway::transport::auth::Authenticator;
use serde_json::json;

/// The real store underneath, with faults switched on and off by the test.
struct FlakyStore {
    inner: Arc<EmbeddedStore>,
    down: AtomicBool,
    /// Every write takes this long (a slow store); zero by default.
    write_delay: std::sync::Mutex<Duration>,
    /// While on, a send's answer comes back 2 s after the write itself was
    /// stored (a disk that stalls after the write reached it).
    slow_answers: AtomicBool,
}

impl FlakyStore {
    fn new(inner: Arc<EmbeddedStore>, write_delay: Duration) -> Self {
        Self {
            inner,
            down: AtomicBool::new(false),
            write_delay: write_delay.into(),
            slow_answers: AtomicBool::new(false),
        }
    }

    fn check(&self) -> StoreResult<()> {
        if self.down.load(Ordering::Relaxed) { Err(StoreError::Unavailable("simulated outage".into())) } else { Ok(()) }
    }
}

#[async_trait]
impl Store for FlakyStore {
    async fn store_message(&self, new: NewMessage) -> StoreResult<Stored> {
        self.check()?;
        let delay = *self.write_delay.lock().expect("lock");
        tokio::time::sleep(delay).await;
        let stored = self.inner.store_message(new).await;
        if self.slow_answers.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        stored
    }
    async fn inbox_after(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>> {
        self.check()?;
        self.inner.inbox_after(user, after, limit).await
    }
    async fn history(&self, channel: &str, page: Page, limit: usize) -> StoreResult<Vec<Message>> {
        self.check()?;
        self.inner.history(channel, page, limit).await
    }
    async fn message(&self, channel: &str, id: u64) -> StoreResult<Option<Message>> {
        self.check()?;
        self.inner.message(channel, id).await
    }
    async fn create_group(&self, group: &Group, members: &[String]) -> StoreResult<()> {
        self.check()?;
        self.inner.create_group(group, members).await
    }
    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        self.check()?;
        self.inner.group(id).await
    }
    async fn add_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.check()?;
        self.inner.add_member(group, user).await
    }
    async fn remove_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.check()?;
        self.inner.remove_member(group, user).await
    }
    async fn join(&self, group: &str, user: &str, max: usize) -> StoreResult<Join> {
        self.check()?;
        self.inner.join(group, user, max).await
    }
    async fn set_owner(&self, group: &str, owner: &str) -> StoreResult<()> {
        self.check()?;
        self.inner.set_owner(group, owner).await
    }
    async fn members(&self, group: &str) -> StoreResult<Vec<String>> {
        self.check()?;
        self.inner.members(group).await
    }
    async fn channels_of(&self, user: &str) -> StoreResult<Vec<String>> {
        self.check()?;
        self.inner.channels_of(user).await
    }
    async fn advance_markers(&self, user: &str, channel: &str, markers: Markers) -> StoreResult<()> {
        self.check()?;
        self.inner.advance_markers(user, channel, markers).await
    }
    async fn markers_of(&self, user: &str) -> StoreResult<std::collections::HashMap<String, Markers>> {
        self.check()?;
        self.inner.markers_of(user).await
    }
    async fn channel_markers(&self, channel: &str, users: &[String]) -> StoreResult<Vec<Markers>> {
        self.check()?;
        self.inner.channel_markers(channel, users).await
    }
}

#[tokio::test]
async fn a_storage_outage_acks_nothing_and_a_retry_stores_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let inner = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let store = Arc::new(FlakyStore::new(inner.clone(), Duration::ZERO));
    store.down.store(true, Ordering::Relaxed);
    let options = GatewayOptions { listen: "127.0.0.1:0".parse().expect("addr"), ..GatewayOptions::default() };
    let gateway = app::start(
        store.clone(),
        Arc::new(inner.clone()),
        BrokerSetup::Local,
        Authenticator::new(KEY).expect("key"),
        0,
        options,
    )
    .await
    .expect("start");
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;

    let refused = alice.send_to_user("bob", "during the outage", "retry-me").await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "storage_unavailable");
    bob.expect_no_message(Duration::from_millis(300)).await;
    let sync = bob.request(json!({"type": "sync"})).await;
    assert_eq!(sync["code"], "storage_unavailable", "reads fail clearly too: {sync}");
    let port = gateway.addr.port();
    let (status, body) = http_get(port, "/readyz").await.expect("readyz");
    assert!(status == 200 && body.contains("degraded: store unavailable"), "{status} {body}");
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    assert!(metrics.contains("kubechat_gateway_store_up 0"), "{metrics}");

    store.down.store(false, Ordering::Relaxed);
    // Nobody sends: the health probe notices the recovery by itself.
    let back = std::time::Instant::now();
    loop {
        let (status, body) = http_get(port, "/readyz").await.expect("readyz");
        if status == 200 && body == "ready\n" {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(1), "recovery not seen within a second: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    assert!(metrics.contains("kubechat_gateway_store_up 1"), "{metrics}");
    let ack = alice.send_to_user("bob", "during the outage", "retry-me").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["duplicate"], false, "the first attempt stored nothing");
    assert_eq!(bob.expect_message().await["message"]["id"], ack["id"]);
    let history = bob.request(json!({"type": "history", "channel": "dm:alice:bob"})).await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1));
    gateway.stop(Duration::from_secs(5)).await;
}

/// A store slow enough that a send waits longer than the idle timeout: the
/// connection keeps reading heartbeats meanwhile and stays open (it was
/// closed 4000 when requests stopped the reading), and frames a client
/// sent within its rate while the server was busy are not refused as a
/// burst when reading resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_neither_closes_heartbeating_clients_nor_refuses_frames_within_the_rate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let inner = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let store = Arc::new(FlakyStore::new(inner.clone(), Duration::from_secs(3)));
    let limits = kubechat_gateway::transport::connection::ConnectionLimits {
        idle_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let options = GatewayOptions { listen: "127.0.0.1:0".parse().expect("addr"), limits, ..GatewayOptions::default() };
    let gateway = app::start(
        store.clone(),
        Arc::new(inner),
        BrokerSetup::Local,
        Authenticator::new(KEY).expect("key"),
        0,
        options,
    )
    .await
    .expect("start");
    // Heartbeats every second, as the protocol asks.
    let mut alice = common::cluster::ClusterClient::connect(&gateway.ws_url(), "alice", "phone").await;
    let slow = json!({"type": "send", "to": {"user": "bob"}, "text": "slow", "key": "slow-0"});
    let ack = alice.try_request(slow, Duration::from_secs(8)).await;
    let ack = ack.unwrap_or_else(|| panic!("an answer, not a close: closed {:?}", alice.closed));
    assert_eq!(ack["type"], "ack", "{ack}");
    assert!(alice.closed.is_none(), "closed while its send waited on the store: {:?}", alice.closed);

    // 40 frames a second for 4 s (limit 50/s, burst 100) while the first of
    // them waits 3 s on the store: the server reads none of the rest meanwhile.
    for n in 0..160 {
        alice.send(
            json!({"type": "send", "req": format!("q{n}"), "to": {"user": "bob"}, "text": "t", "key": format!("k{n}")}),
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
        if n == 4 {
            // Only the first of them waited on the slow store.
            *store.write_delay.lock().expect("lock") = Duration::ZERO;
        }
    }
    alice.drain_for(Duration::from_secs(6)).await;
    let refused = alice.take("error");
    assert!(refused.is_empty(), "frames within the rate were refused: {} e.g. {:?}", refused.len(), refused.first());
    let acks = alice.take("ack").len();
    let rest = alice.take("resync").len();
    assert_eq!(acks, 160, "other frames: {rest} resyncs, closed {:?}", alice.closed);
    assert!(alice.closed.is_none());
}

/// A write that outlives the deadline may still be stored: the client is
/// told so (not "nothing was stored"), and its retry with the same key
/// returns the stored message and reaches the recipient.
#[tokio::test]
async fn a_write_past_the_deadline_is_reported_as_maybe_stored_and_its_retry_is_delivered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let inner = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let store = Arc::new(FlakyStore::new(inner.clone(), Duration::ZERO));
    store.slow_answers.store(true, Ordering::Relaxed);
    let mut options = GatewayOptions { listen: "127.0.0.1:0".parse().expect("addr"), ..GatewayOptions::default() };
    options.chat.write_deadline = Duration::from_millis(300);
    let gateway = app::start(
        store.clone(),
        Arc::new(inner.clone()),
        BrokerSetup::Local,
        Authenticator::new(KEY).expect("key"),
        0,
        options,
    )
    .await
    .expect("start");
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;

    let late = alice.send_to_user("bob", "late", "late-1").await;
    assert_eq!(late["code"], "storage_unavailable", "{late}");
    let told = late["message"].as_str().expect("message");
    assert!(told.contains("may have been stored") && told.contains("retry with the same key"), "{told}");
    let stored = inner.history("dm:alice:bob", Page::Latest, 10).await.expect("history");
    assert_eq!(stored.len(), 1, "the abandoned write was in fact stored");

    store.slow_answers.store(false, Ordering::Relaxed);
    let ack = alice.send_to_user("bob", "late", "late-1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], stored[0].id.to_string(), "the retry returns the stored message");
    // Delivered live, or bob is told to sync and finds it.
    let frame = bob.expect_frame(&["message", "resync"]).await;
    let delivered = if frame["type"] == "message" {
        vec![frame["message"]["id"].clone()]
    } else {
        bob.sync_all("0").await.0.iter().map(|entry| entry["message"]["id"].clone()).collect()
    };
    assert_eq!(delivered, vec![ack["id"].clone()], "{frame}");
    assert_eq!(inner.history("dm:alice:bob", Page::Latest, 10).await.expect("history").len(), 1, "stored once");
    gateway.stop(Duration::from_secs(5)).await;
}
