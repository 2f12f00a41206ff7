//! Chat logic, independent of any socket: sending (store, then ack, then
//! fan out), sync from a cursor, history, groups, and local presence.
//!
//! - [`send`]: store, ack, then fan out (live delivery, forwarding, push
//!   jobs) with backpressure to the sender.
//! - [`hub`]: this gateway's connections and their outboxes.
//! - `groups`: creating groups, adding and removing members, listing them.
//! - [`members`]: group members cached, invalidated across gateways.
//! - [`presence`]: sessions for presence (heartbeat grace window), status
//!   fan-out to friends and presence requests.
//! - [`push`]: the queue of notifications for users with no connected device.
//! - [`receipts`]: read markers, typing indicators and the channel overview.
//!
//! Other gateways are reached through the [`Broker`].

pub mod admission;
mod groups;
pub mod hub;
pub mod members;
pub mod presence;
pub mod push;
pub mod receipts;
pub mod resync;
pub mod send;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashSet;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Frame, LocalDelivery};
use crate::ids::{self, IdGenerator};
use crate::metrics::Metrics;
use crate::protocol::{
    ClientFrame, ErrorCode, Limits, ProtocolError, ServerFrame, WireInboxEntry, WireMessage, direct_members,
    encode_shared, fit_page, is_group_channel,
};
use crate::store::{Page, Store, StoreError};
use hub::{Hub, Kick};
use members::{MemberCache, Members};
use presence::PresenceTracker;
use push::PushQueue;
pub use send::FanOut;

/// Settings of the chat layer.
#[derive(Clone, Debug)]
pub struct ChatConfig {
    pub limits: Limits,
    /// A durable write that takes longer fails (nothing is acked).
    pub write_deadline: Duration,
    /// Sync cursors handed to clients lag "now" by this much, so a write
    /// still in flight when a sync ran cannot fall behind a stored cursor.
    /// Must exceed `write_deadline` plus the clock skew between gateways.
    pub sync_horizon: Duration,
    pub heartbeat_seconds: u32,
    /// A user is offline once no device was heard from for this long.
    pub offline_after: Duration,
    /// Groups up to this size fan presence changes out to their members;
    /// members of larger groups ask for presence when they open the group.
    pub presence_fanout_max_members: usize,
    /// Characters of text a push notification previews.
    pub push_summary_chars: usize,
    /// A receiver whose outbox stays backlogged this long while a fan-out
    /// waits for it is closed as too slow (4008).
    pub stall_timeout: Duration,
    /// Cached group members are read again after this long at the latest.
    pub members_ttl: Duration,
    /// Bounds the sends waiting on the store (clustered gateways): past it
    /// they are refused with `overloaded` instead of queueing. `None`: no
    /// bound (the standalone gateway slows its senders instead).
    pub store_admission: Option<admission::AdmissionConfig>,
    /// Syncs served at once, at most; more wait for a slot (never refused).
    /// Bounds what a crowd of clients resyncing together asks of the store.
    pub max_concurrent_syncs: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            write_deadline: Duration::from_secs(5),
            sync_horizon: Duration::from_secs(10),
            heartbeat_seconds: 5,
            offline_after: Duration::from_secs(30),
            presence_fanout_max_members: kubechat_config::DEFAULT_PRESENCE_FANOUT_MAX_MEMBERS,
            push_summary_chars: 80,
            stall_timeout: Duration::from_secs(5),
            members_ttl: Duration::from_secs(60),
            store_admission: None,
            max_concurrent_syncs: 32,
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    pub device: String,
    pub connection: u64,
}

/// Remembers direct channels already recorded for both users, so the
/// membership rows are written once per gateway lifetime, not per message.
/// Bounded: cleared when full (re-recording is idempotent).
struct KnownDirectChannels {
    set: DashSet<String>,
    capacity: usize,
}

impl KnownDirectChannels {
    pub(crate) fn contains(&self, channel: &str) -> bool {
        self.set.contains(channel)
    }

    pub(crate) fn insert(&self, channel: &str) {
        if self.set.len() >= self.capacity {
            self.set.clear();
        }
        self.set.insert(channel.to_string());
    }
}

pub struct ChatService {
    store: Arc<dyn Store>,
    push: Arc<dyn PushQueue>,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    presence: Arc<PresenceTracker>,
    /// Session transitions for the broker, sharded by user: each shard is
    /// applied in order, so a user's transitions reach Redis in order.
    /// Bounded ([`TRANSITION_QUEUE`]): see [`presence`].
    transitions: Vec<mpsc::Sender<presence::ShardWork>>,
    ids: IdGenerator,
    config: ChatConfig,
    metrics: Metrics,
    known_direct: KnownDirectChannels,
    /// Bounds the sends waiting on the store (clustered gateways).
    admission: Option<admission::Admission>,
    members: Arc<MemberCache>,
    /// Fan-outs whose push jobs wait for presence to settle.
    deferred_pushes: AtomicUsize,
    /// Slots of the syncs served at once ([`ChatConfig::max_concurrent_syncs`]).
    syncs: tokio::sync::Semaphore,
    /// For work that outlives a call (deferred push jobs).
    this: Weak<ChatService>,
}

/// What handling a client frame produced.
pub struct Handled {
    /// The reply to the frame (an ack, a page, an error), if it has one.
    pub reply: Option<ServerFrame>,
    /// Work owed after the reply: the live delivery of a stored message.
    pub fan_out: Option<FanOut>,
}

const TRANSITION_SHARDS: usize = 8;
/// Transitions waiting per shard (and offline announcements waiting) while
/// Redis is slow; past that they are dropped (module docs of [`presence`]).
const TRANSITION_QUEUE: usize = 10_000;

fn storage_error(e: StoreError) -> ProtocolError {
    if let StoreError::KeyReused { .. } = e {
        return ProtocolError::new(ErrorCode::InvalidArgument, e.to_string());
    }
    crate::warn_throttled!(error = %e, "storage operation failed");
    ProtocolError::new(ErrorCode::StorageUnavailable, format!("{e}; nothing was stored, retry with the same key"))
}

fn push_target_error(e: kubechat_push::PushTargetError) -> ProtocolError {
    use kubechat_push::PushTargetError;
    let code = match e {
        PushTargetError::Invalid(_) | PushTargetError::TooMany => ErrorCode::InvalidArgument,
        PushTargetError::NotConfigured | PushTargetError::Redis(_) => ErrorCode::Unavailable,
    };
    ProtocolError::new(code, e.to_string())
}

/// Counts one in a gauge for as long as it lives.
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeGuard<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the broker's background work may touch of this gateway: its
/// connections and sessions, and a queue for offline announcements (which
/// need the whole chat service, built after the broker).
pub struct GatewayLocal {
    hub: Arc<Hub>,
    /// Spreads resyncs of many connections over a window.
    resyncs: Arc<resync::ResyncPacer>,
    presence: Arc<PresenceTracker>,
    members: Arc<MemberCache>,
    remote_offline: mpsc::Sender<String>,
    metrics: Metrics,
}

impl GatewayLocal {
    /// The local side of a broker, and the queue [`ChatService::start`]
    /// drains; its resync pacer runs on `tasks` until `shutdown`.
    pub fn new(
        hub: Arc<Hub>,
        presence: Arc<PresenceTracker>,
        members: Arc<MemberCache>,
        metrics: Metrics,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, mpsc::Receiver<String>) {
        let (remote_offline, rx) = mpsc::channel(TRANSITION_QUEUE);
        let resyncs = resync::ResyncPacer::new(metrics.resyncs_pending.clone());
        tasks.spawn(Arc::clone(&resyncs).run(shutdown));
        (Arc::new(Self { hub, resyncs, presence, members, remote_offline, metrics }), rx)
    }
}

impl LocalDelivery for GatewayLocal {
    fn deliver_local(&self, users: &[String], frame: &Frame) {
        for user in users {
            self.hub.deliver(user, frame, None);
        }
    }

    fn resync_all(&self, reason: &str) {
        // Membership notices may have been lost with the live frames.
        self.members.clear();
        let frame = encode_shared(&ServerFrame::Resync { reason: reason.to_string() });
        let (waiting, window) = self.resyncs.add(self.hub.connections(), &frame);
        tracing::info!(waiting, window_ms = window.as_millis() as u64, reason, "asking every connection to resync");
    }

    fn resync_users(&self, users: &[String], reason: &str) {
        let frame = encode_shared(&ServerFrame::Resync { reason: reason.to_string() });
        let (waiting, window) = self.resyncs.add(self.hub.connections_of(users), &frame);
        tracing::info!(
            users = users.len(),
            waiting,
            window_ms = window.as_millis() as u64,
            reason,
            "asking connections to resync"
        );
    }

    fn local_sessions(&self) -> Vec<(String, String)> {
        self.presence.sessions()
    }

    fn adopt_sessions(&self, inherited: Vec<(String, String)>) {
        self.presence.adopt(inherited);
    }

    fn remote_user_offline(&self, user: String) {
        // Full while Redis or the store is slow: the announcement to friends
        // is dropped (presence requests still answer right).
        if self.remote_offline.try_send(user).is_err() {
            self.metrics.presence_dropped.inc();
        }
    }

    fn group_changed(&self, group: &str) {
        self.members.invalidate(group);
    }
}

/// Everything a chat service is made of.
pub struct ChatParts {
    pub store: Arc<dyn Store>,
    pub push: Arc<dyn PushQueue>,
    pub hub: Arc<Hub>,
    pub presence: Arc<PresenceTracker>,
    pub broker: Arc<dyn Broker>,
    /// The cache the broker's [`GatewayLocal`] invalidates.
    pub members: Arc<MemberCache>,
    pub ids: IdGenerator,
    pub config: ChatConfig,
    pub metrics: Metrics,
}

impl ChatService {
    /// Builds the service and starts its background work on `tasks`: the
    /// transition shards, the sweeper of lingering sessions and the
    /// announcer of users another gateway's death left offline.
    pub fn start(
        parts: ChatParts,
        remote_offline: mpsc::Receiver<String>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..TRANSITION_SHARDS).map(|_| mpsc::channel(TRANSITION_QUEUE)).unzip();
        let ChatParts { store, push, hub, presence, broker, members, ids, config, metrics } = parts;
        let syncs = tokio::sync::Semaphore::new(config.max_concurrent_syncs.max(1));
        let service = Arc::new_cyclic(|this| Self {
            store,
            push,
            hub,
            broker,
            presence,
            transitions: senders,
            ids,
            admission: config.store_admission.clone().map(admission::Admission::new),
            config,
            metrics,
            known_direct: KnownDirectChannels { set: DashSet::new(), capacity: 100_000 },
            members,
            deferred_pushes: AtomicUsize::new(0),
            syncs,
            this: this.clone(),
        });
        for receiver in receivers {
            tasks.spawn(presence::apply_transitions(Arc::downgrade(&service), receiver, shutdown.clone()));
        }
        tasks.spawn(presence::sweep_lingering(Arc::downgrade(&service), shutdown.clone()));
        tasks.spawn(presence::announce_remote_offline(Arc::downgrade(&service), remote_offline, shutdown));
        service
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    /// Handles one decoded frame: its reply, and the fan-out owed after it.
    pub async fn handle(&self, session: &Session, frame: ClientFrame) -> Handled {
        let req = frame.req().map(str::to_string);
        let result = match frame {
            ClientFrame::Send { to, text, key, .. } => match self.send(session, req.clone(), to, text, key).await {
                Ok((ack, fan_out)) => return Handled { reply: Some(ack), fan_out },
                Err(e) => Err(e),
            },
            ClientFrame::Sync { after, limit, .. } => self.sync(session, req.clone(), after, limit).await,
            ClientFrame::History { channel, before, after, limit, .. } => {
                let page = match (before, after) {
                    (Some(id), _) => Page::Before(id),
                    (_, Some(id)) => Page::After(id),
                    _ => Page::Latest,
                };
                self.history(session, req.clone(), channel, page, limit).await
            }
            ClientFrame::CreateGroup { name, members, .. } => {
                self.create_group(session, req.clone(), name, members).await
            }
            ClientFrame::AddMember { group, user, .. } => self.add_member(session, req.clone(), group, user).await,
            ClientFrame::RemoveMember { group, user, .. } => {
                self.remove_member(session, req.clone(), group, user).await
            }
            ClientFrame::ListMembers { group, .. } => self.list_members(session, req.clone(), group).await,
            ClientFrame::ListChannels { .. } => self
                .store
                .channels_of(&session.user)
                .await
                .map(|channels| ServerFrame::Channels { req: req.clone(), channels })
                .map_err(storage_error),
            ClientFrame::Presence { users, group, .. } => self.presence_of(session, req.clone(), users, group).await,
            // The connection notes when it last heard from the client; nothing else to do.
            ClientFrame::Heartbeat { .. } => return Handled { reply: None, fan_out: None },
            ClientFrame::Logout { .. } => {
                if let Err(e) = self.push.unregister_target(&session.user, &session.device).await {
                    tracing::warn!(user = %session.user, error = %e, "push target not removed at logout");
                }
                self.hub.kick_device(&session.user, &session.device, Kick::LoggedOut);
                Ok(ServerFrame::Ok { req: req.clone() })
            }
            ClientFrame::Mark { channel, delivered_up_to, read_up_to, .. } => {
                self.mark(session, req.clone(), channel, delivered_up_to, read_up_to).await
            }
            ClientFrame::Receipts { channel, .. } => self.receipts(session, req.clone(), channel).await,
            ClientFrame::Typing { channel, typing, .. } => match self.typing(session, &channel, typing).await {
                Ok(()) => return Handled { reply: None, fan_out: None },
                Err(e) => Err(e),
            },
            ClientFrame::Overview { .. } => self.overview(session, req.clone()).await,
            ClientFrame::RegisterPush { platform, token, .. } => {
                let target = kubechat_push::PushTarget::new(session.device.clone(), platform, token);
                match self.push.register_target(&session.user, &target).await {
                    Ok(()) => Ok(ServerFrame::Ok { req: req.clone() }),
                    Err(e) => Err(push_target_error(e)),
                }
            }
        };
        Handled { reply: Some(result.unwrap_or_else(|e| e.with_req(req).into())), fan_out: None }
    }

    /// Refuses to mint ids while another gateway holds this one's worker id.
    fn check_may_mint_ids(&self) -> Result<(), ProtocolError> {
        if self.broker.may_mint_ids() {
            Ok(())
        } else {
            Err(ProtocolError::new(
                ErrorCode::Unavailable,
                "this gateway cannot accept writes right now (its id generator is held by another gateway); reconnect to another gateway",
            ))
        }
    }

    /// Members of a channel the sender must belong to.
    async fn channel_members(&self, user: &str, channel: &str) -> Result<Members, ProtocolError> {
        if let Some((a, b)) = direct_members(channel) {
            return if user == a || user == b {
                Ok(Arc::from([a.to_string(), b.to_string()]))
            } else {
                Err(ProtocolError::new(ErrorCode::NotMember, format!("{user} is not part of {channel}")))
            };
        }
        if !is_group_channel(channel) {
            return Err(ProtocolError::new(ErrorCode::InvalidArgument, format!("{channel:?} is not a channel id")));
        }
        let members = match self.members.get(channel) {
            Some(members) => members,
            None => {
                let ticket = self.members.ticket();
                let members: Members = self.store.members(channel).await.map_err(storage_error)?.into();
                // An unknown group is not cached: it may be created any moment.
                if !members.is_empty() {
                    self.members.insert(channel, Arc::clone(&members), ticket);
                }
                members
            }
        };
        if members.is_empty() {
            return Err(ProtocolError::new(ErrorCode::NoSuchGroup, format!("no group {channel}")));
        }
        if !members.iter().any(|m| m == user) {
            return Err(ProtocolError::new(ErrorCode::NotMember, format!("{user} is not a member of {channel}")));
        }
        Ok(members)
    }

    async fn sync(
        &self,
        session: &Session,
        req: Option<String>,
        after: u64,
        limit: Option<usize>,
    ) -> Result<ServerFrame, ProtocolError> {
        let limit = limit.unwrap_or(100);
        let waiting = GaugeGuard::new(&self.metrics.syncs_waiting);
        let slot = self.syncs.acquire().await;
        drop(waiting);
        let _serving = GaugeGuard::new(&self.metrics.syncs_in_progress);
        let entries = self.store.inbox_after(&session.user, after, limit + 1).await;
        drop(slot);
        let mut entries = entries.map_err(storage_error)?;
        let mut has_more = entries.len() > limit;
        entries.truncate(limit);
        let budget = self.config.limits.max_page_bytes;
        has_more |= fit_page(&mut entries, budget, |e| WireMessage::encoded_len(&e.message) + 48);
        let horizon_ms = ids::now_ms() - i64::try_from(self.config.sync_horizon.as_millis()).unwrap_or(i64::MAX);
        let horizon = ids::first_id_at(horizon_ms).saturating_sub(1);
        let last = entries.last().map(|e| e.position);
        // Safe to store: every entry at or below it is already durable. Never
        // raised to `after`: while paging, `after` is a recent position, and a
        // write in flight may still land below it.
        let cursor = match (last, has_more) {
            (Some(last), true) => last.min(horizon),
            _ => horizon,
        };
        Ok(ServerFrame::Synced {
            req,
            next: last.unwrap_or(after),
            entries: entries.iter().map(WireInboxEntry::from).collect(),
            cursor,
            has_more,
        })
    }

    async fn history(
        &self,
        session: &Session,
        req: Option<String>,
        channel: String,
        page: Page,
        limit: Option<usize>,
    ) -> Result<ServerFrame, ProtocolError> {
        self.channel_members(&session.user, &channel).await?;
        let limit = limit.unwrap_or(50);
        let mut messages = self.store.history(&channel, page, limit + 1).await.map_err(storage_error)?;
        let mut has_more = messages.len() > limit;
        messages.truncate(limit);
        has_more |= fit_page(&mut messages, self.config.limits.max_page_bytes, WireMessage::encoded_len);
        Ok(ServerFrame::History { req, channel, messages: messages.iter().map(WireMessage::from).collect(), has_more })
    }
}

#[cfg(test)]
mod tests;
