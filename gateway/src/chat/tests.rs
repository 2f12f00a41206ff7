//! The chat layer's unit tests: a `ChatService` on an in-memory store and broker.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::push::PushJob;
use super::*;
use crate::broker::LocalBroker;
use crate::protocol::Recipient;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Group, InboxEntry, Join, Markers, Message, NewMessage, StoreResult, Stored};

/// The real embedded store, whose next message write can be made to fail.
struct FailNextWrite {
    inner: Arc<EmbeddedStore>,
    fail: AtomicBool,
}

#[async_trait]
impl Store for FailNextWrite {
    async fn store_message(&self, new: NewMessage) -> StoreResult<Stored> {
        if self.fail.swap(false, Ordering::Relaxed) {
            return Err(StoreError::Unavailable("injected".into()));
        }
        self.inner.store_message(new).await
    }
    async fn inbox_after(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>> {
        self.inner.inbox_after(user, after, limit).await
    }
    async fn history(&self, channel: &str, page: Page, limit: usize) -> StoreResult<Vec<Message>> {
        self.inner.history(channel, page, limit).await
    }
    async fn message(&self, channel: &str, id: u64) -> StoreResult<Option<Message>> {
        self.inner.message(channel, id).await
    }
    async fn create_group(&self, group: &Group, members: &[String]) -> StoreResult<()> {
        self.inner.create_group(group, members).await
    }
    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        self.inner.group(id).await
    }
    async fn add_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.inner.add_member(group, user).await
    }
    async fn remove_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.inner.remove_member(group, user).await
    }
    async fn join(&self, group: &str, user: &str, max: usize) -> StoreResult<Join> {
        self.inner.join(group, user, max).await
    }
    async fn set_owner(&self, group: &str, owner: &str) -> StoreResult<()> {
        self.inner.set_owner(group, owner).await
    }
    async fn members(&self, group: &str) -> StoreResult<Vec<String>> {
        self.inner.members(group).await
    }
    async fn channels_of(&self, user: &str) -> StoreResult<Vec<String>> {
        self.inner.channels_of(user).await
    }
    async fn advance_markers(&self, user: &str, channel: &str, markers: Markers) -> StoreResult<()> {
        self.inner.advance_markers(user, channel, markers).await
    }
    async fn markers_of(&self, user: &str) -> StoreResult<std::collections::HashMap<String, Markers>> {
        self.inner.markers_of(user).await
    }
    async fn channel_markers(&self, channel: &str, users: &[String]) -> StoreResult<Vec<Markers>> {
        self.inner.channel_markers(channel, users).await
    }
}

/// The in-memory broker with faults to switch on: this gateway's worker id
/// lost to another, or its next route failing (Redis out of reach).
#[derive(Default)]
struct FaultyBroker {
    inner: LocalBroker,
    worker_id_lost: bool,
    fail_next_route: AtomicBool,
}

#[async_trait]
impl Broker for FaultyBroker {
    async fn route(
        &self,
        users: &[String],
        frame: &Frame,
    ) -> Result<crate::broker::Routed, crate::broker::BrokerError> {
        if self.fail_next_route.swap(false, Ordering::Relaxed) {
            return Err(crate::broker::BrokerError("injected: Redis unreachable".into()));
        }
        self.inner.route(users, frame).await
    }
    async fn session_added(&self, user: &str, device: &str) -> Result<bool, crate::broker::BrokerError> {
        self.inner.session_added(user, device).await
    }
    async fn session_removed(&self, user: &str, device: &str) -> Result<bool, crate::broker::BrokerError> {
        self.inner.session_removed(user, device).await
    }
    async fn online(&self, users: &[String]) -> Result<std::collections::HashSet<String>, crate::broker::BrokerError> {
        self.inner.online(users).await
    }
    async fn last_active(&self, users: &[String]) -> Result<Vec<Option<i64>>, crate::broker::BrokerError> {
        self.inner.last_active(users).await
    }
    async fn group_changed(&self, group: &str) -> Result<(), crate::broker::BrokerError> {
        self.inner.group_changed(group).await
    }
    fn healthy(&self) -> bool {
        true
    }
    fn may_mint_ids(&self) -> bool {
        !self.worker_id_lost
    }
    fn report_load(&self, load: crate::broker::GatewayLoad) {
        self.inner.report_load(load);
    }
    async fn gateway_loads(&self) -> Result<Vec<crate::broker::GatewayLoad>, crate::broker::BrokerError> {
        self.inner.gateway_loads().await
    }
}

/// Push jobs as queued, in order.
#[derive(Default)]
struct RecordedPushes(std::sync::Mutex<Vec<PushJob>>);

#[async_trait]
impl PushQueue for RecordedPushes {
    async fn enqueue(&self, jobs: &[PushJob]) -> Result<(), StoreError> {
        self.0.lock().expect("lock").extend_from_slice(jobs);
        Ok(())
    }
    async fn register_target(
        &self,
        _user: &str,
        _target: &kubechat_push::PushTarget,
    ) -> Result<(), kubechat_push::PushTargetError> {
        Err(kubechat_push::PushTargetError::NotConfigured)
    }
    async fn unregister_target(&self, _user: &str, _device: &str) -> Result<(), kubechat_push::PushTargetError> {
        Ok(())
    }
}

struct Fixture {
    chat: Arc<ChatService>,
    store: Arc<FailNextWrite>,
    pushes: Arc<RecordedPushes>,
    _dir: tempfile::TempDir,
}

fn fixture(broker: Arc<dyn Broker>) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let inner = Arc::new(EmbeddedStore::open(dir.path()).expect("embedded store"));
    let store = Arc::new(FailNextWrite { inner: inner.clone(), fail: AtomicBool::new(false) });
    let hub = Hub::new();
    let presence = Arc::new(PresenceTracker::new(Duration::from_secs(30)));
    let members = Arc::new(MemberCache::new(Duration::from_secs(60), 100));
    let metrics = Metrics::new();
    let (_local, remote_offline) = GatewayLocal::new(
        hub.clone(),
        presence.clone(),
        members.clone(),
        metrics.clone(),
        &TaskTracker::new(),
        CancellationToken::new(),
    );
    let pushes = Arc::new(RecordedPushes::default());
    let parts = ChatParts {
        store: store.clone(),
        push: pushes.clone(),
        hub,
        presence,
        broker,
        members,
        ids: IdGenerator::new(1, 0),
        config: ChatConfig::default(),
        metrics,
    };
    let chat = ChatService::start(parts, remote_offline, &TaskTracker::new(), CancellationToken::new());
    Fixture { chat, store, pushes, _dir: dir }
}

fn session(user: &str) -> Session {
    Session { user: user.into(), device: "phone".into(), connection: 1 }
}

fn send(to: &str, key: &str) -> ClientFrame {
    ClientFrame::Send { req: Some(key.into()), to: Recipient::User(to.into()), text: "hi".into(), key: key.into() }
}

fn code_of(reply: Option<ServerFrame>) -> Option<ErrorCode> {
    match reply {
        Some(ServerFrame::Error { code, .. }) => Some(code),
        _ => None,
    }
}

#[tokio::test]
async fn a_direct_channel_is_linked_once_its_first_write_succeeds() {
    let f = fixture(Arc::new(LocalBroker::default()));
    f.store.fail.store(true, Ordering::Relaxed);
    let failed = f.chat.handle(&session("alice"), send("bob", "k1")).await;
    assert_eq!(code_of(failed.reply), Some(ErrorCode::StorageUnavailable));
    // The retry must still record the channel for both users.
    let stored = f.chat.handle(&session("alice"), send("bob", "k1")).await;
    assert!(matches!(stored.reply, Some(ServerFrame::Ack { duplicate: false, .. })), "stored on retry");
    for user in ["alice", "bob"] {
        assert_eq!(f.store.channels_of(user).await.expect("channels"), vec!["dm:alice:bob".to_string()], "{user}");
    }
}

#[tokio::test]
async fn a_retried_key_acks_the_first_message_and_asks_for_a_resync() {
    let f = fixture(Arc::new(LocalBroker::default()));
    let first = f.chat.handle(&session("alice"), send("bob", "k1")).await;
    let Some(ServerFrame::Ack { id, duplicate: false, .. }) = first.reply else { panic!("first ack") };
    let again = f.chat.handle(&session("alice"), send("bob", "k1")).await;
    let Some(ServerFrame::Ack { id: again_id, duplicate: true, .. }) = again.reply else { panic!("duplicate ack") };
    assert_eq!(id, again_id);
    let fan_out = again.fan_out.expect("a duplicate still owes the recipients a resync");
    assert!(fan_out.duplicate);
    assert_eq!(f.store.inbox_after("bob", 0, 10).await.expect("inbox").len(), 1, "stored once");
}

#[tokio::test]
async fn without_its_worker_id_a_gateway_stores_nothing() {
    let f = fixture(Arc::new(FaultyBroker { worker_id_lost: true, ..FaultyBroker::default() }));
    let refused = f.chat.handle(&session("alice"), send("bob", "k1")).await;
    assert_eq!(code_of(refused.reply), Some(ErrorCode::Unavailable));
    let group = ClientFrame::CreateGroup { req: None, name: "g".into(), members: vec!["bob".into()] };
    assert_eq!(code_of(f.chat.handle(&session("alice"), group).await.reply), Some(ErrorCode::Unavailable));
    assert!(f.store.inbox_after("bob", 0, 10).await.expect("inbox").is_empty());
}

#[tokio::test]
async fn a_send_whose_routing_fails_still_notifies_its_offline_recipient() {
    let broker = Arc::new(FaultyBroker::default());
    let f = fixture(broker.clone());
    broker.fail_next_route.store(true, Ordering::Relaxed);
    let sent = f.chat.handle(&session("alice"), send("bob", "k1")).await;
    let Some(ServerFrame::Ack { id, .. }) = sent.reply else { panic!("ack: {:?}", sent.reply) };
    f.chat.fan_out(&session("alice"), sent.fan_out.expect("a fan-out")).await;
    // The notification waits for presence, which answers at once here.
    let queued = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let jobs = f.pushes.0.lock().expect("lock").clone();
            if !jobs.is_empty() {
                return jobs;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("bob's notification was dropped with the failed route");
    let to: Vec<(&str, String)> = queued.iter().map(|j| (j.user.as_str(), j.message_id.clone())).collect();
    assert_eq!(to, [("bob", id.to_string())], "one notification, to the offline recipient only");
}

#[tokio::test]
async fn only_members_send_to_a_channel() {
    let f = fixture(Arc::new(LocalBroker::default()));
    let to_other_dm = ClientFrame::Send {
        req: None,
        to: Recipient::Group("dm:bob:carol".into()),
        text: "hi".into(),
        key: "k".into(),
    };
    assert_eq!(code_of(f.chat.handle(&session("alice"), to_other_dm).await.reply), Some(ErrorCode::NotMember));
    let to_no_group =
        ClientFrame::Send { req: None, to: Recipient::Group("g:42".into()), text: "hi".into(), key: "k".into() };
    assert_eq!(code_of(f.chat.handle(&session("alice"), to_no_group).await.reply), Some(ErrorCode::NoSuchGroup));
    let to_self = send("alice", "k");
    assert_eq!(code_of(f.chat.handle(&session("alice"), to_self).await.reply), Some(ErrorCode::InvalidArgument));
}
