//! Chat logic, independent of any socket: sending (store, then ack, then
//! fan out), sync from a cursor, history, groups, and local presence.
//!
//! - [`hub`]: this gateway's connections, by user and device.
//! - [`presence`]: sessions for presence (heartbeat grace window), status
//!   fan-out to friends and presence requests.
//! - [`push`]: the queue of notifications for users with no connected device.
//!
//! Other gateways are reached through the [`Broker`]: after the durable
//! write a message is queued on this gateway's connections and forwarded to
//! the gateways holding the other recipients' devices; members with no
//! device anywhere get a push job.
//!
//! Send path: a message id is reserved for `(sender, key)` (so a retry is
//! stored once), the message is written durably to the channel history and
//! to every member's inbox (the sender's too, for their other devices), the
//! sender gets an ack, then every connected device gets it live and every
//! other member gets a push job. If storage fails nothing is acknowledged.

pub mod hub;
pub mod presence;
pub mod push;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashSet;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Frame, LocalDelivery};
use crate::ids::{self, IdGenerator};
use crate::metrics::Metrics;
use crate::protocol::frames::WireGroup;
use crate::protocol::{
    ClientFrame, ErrorCode, Limits, ProtocolError, Recipient, ServerFrame, WireInboxEntry, WireMessage, direct_channel,
    direct_members, encode_shared, is_group_channel,
};
use crate::store::{Delivery, Group, Message, Page, Reservation, Store, StoreError};
use hub::{Hub, Kick};
use presence::PresenceTracker;
use push::{PushJob, PushQueue};

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
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            write_deadline: Duration::from_secs(5),
            sync_horizon: Duration::from_secs(10),
            heartbeat_seconds: 5,
            offline_after: Duration::from_secs(30),
            presence_fanout_max_members: 50,
            push_summary_chars: 80,
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
    fn insert_new(&self, channel: &str) -> bool {
        if self.set.len() >= self.capacity {
            self.set.clear();
        }
        self.set.insert(channel.to_string())
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
    transitions: Vec<mpsc::UnboundedSender<presence::ShardWork>>,
    ids: IdGenerator,
    config: ChatConfig,
    metrics: Metrics,
    known_direct: KnownDirectChannels,
}

const TRANSITION_SHARDS: usize = 8;

fn storage_error(e: StoreError) -> ProtocolError {
    tracing::warn!(error = %e, "storage operation failed");
    ProtocolError::new(ErrorCode::StorageUnavailable, format!("{e}; nothing was stored, retry with the same key"))
}

fn push_target_error(e: crate::push::PushTargetError) -> ProtocolError {
    use crate::push::PushTargetError;
    let code = match e {
        PushTargetError::Invalid(_) | PushTargetError::TooMany => ErrorCode::InvalidArgument,
        PushTargetError::NotConfigured | PushTargetError::Redis(_) => ErrorCode::Unavailable,
    };
    ProtocolError::new(code, e.to_string())
}

/// What the broker's background work may touch of this gateway: its
/// connections and sessions, and a queue for offline announcements (which
/// need the whole chat service, built after the broker).
pub struct GatewayLocal {
    hub: Arc<Hub>,
    presence: Arc<PresenceTracker>,
    remote_offline: mpsc::UnboundedSender<String>,
}

impl GatewayLocal {
    /// The local side of a broker, and the queue [`ChatService::start`] drains.
    pub fn new(hub: Arc<Hub>, presence: Arc<PresenceTracker>) -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (remote_offline, rx) = mpsc::unbounded_channel();
        (Arc::new(Self { hub, presence, remote_offline }), rx)
    }
}

impl LocalDelivery for GatewayLocal {
    fn deliver_local(&self, users: &[String], frame: &Frame) {
        for user in users {
            self.hub.deliver(user, frame, None);
        }
    }

    fn resync_all(&self, reason: &str) {
        let frame = encode_shared(&ServerFrame::Resync { reason: reason.to_string() });
        let delivered = self.hub.broadcast(&frame);
        tracing::info!(connections = delivered.queued, reason, "asked every connection to resync");
    }

    fn local_sessions(&self) -> Vec<(String, String)> {
        self.presence.sessions()
    }

    fn remote_user_offline(&self, user: String) {
        let _ = self.remote_offline.send(user);
    }
}

/// Everything a chat service is made of.
pub struct ChatParts {
    pub store: Arc<dyn Store>,
    pub push: Arc<dyn PushQueue>,
    pub hub: Arc<Hub>,
    pub presence: Arc<PresenceTracker>,
    pub broker: Arc<dyn Broker>,
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
        remote_offline: mpsc::UnboundedReceiver<String>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..TRANSITION_SHARDS).map(|_| mpsc::unbounded_channel()).unzip();
        let ChatParts { store, push, hub, presence, broker, ids, config, metrics } = parts;
        let service = Arc::new(Self {
            store,
            push,
            hub,
            broker,
            presence,
            transitions: senders,
            ids,
            config,
            metrics,
            known_direct: KnownDirectChannels { set: DashSet::new(), capacity: 100_000 },
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

    /// Handles one decoded frame; returns the reply (if the frame has one).
    pub async fn handle(&self, session: &Session, frame: ClientFrame) -> Option<ServerFrame> {
        let req = frame.req().map(str::to_string);
        let result = match frame {
            ClientFrame::Send { to, text, key, .. } => self.send(session, req.clone(), to, text, key).await,
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
            ClientFrame::Heartbeat { .. } => return None,
            ClientFrame::Logout { .. } => {
                if let Err(e) = self.push.unregister_target(&session.user, &session.device).await {
                    tracing::warn!(user = %session.user, error = %e, "push target not removed at logout");
                }
                self.hub.kick_device(&session.user, &session.device, Kick::LoggedOut);
                Ok(ServerFrame::Ok { req: req.clone() })
            }
            ClientFrame::RegisterPush { platform, token, .. } => {
                let target = crate::push::PushTarget::new(session.device.clone(), platform, token);
                match self.push.register_target(&session.user, &target).await {
                    Ok(()) => Ok(ServerFrame::Ok { req: req.clone() }),
                    Err(e) => Err(push_target_error(e)),
                }
            }
        };
        Some(result.unwrap_or_else(|e| e.with_req(req).into()))
    }

    /// Members of a channel the sender must belong to.
    async fn channel_members(&self, user: &str, channel: &str) -> Result<Vec<String>, ProtocolError> {
        if let Some((a, b)) = direct_members(channel) {
            return if user == a || user == b {
                Ok(vec![a.to_string(), b.to_string()])
            } else {
                Err(ProtocolError::new(ErrorCode::NotMember, format!("{user} is not part of {channel}")))
            };
        }
        if !is_group_channel(channel) {
            return Err(ProtocolError::new(ErrorCode::InvalidArgument, format!("{channel:?} is not a channel id")));
        }
        let members = self.store.members(channel).await.map_err(storage_error)?;
        if members.is_empty() {
            return Err(ProtocolError::new(ErrorCode::NoSuchGroup, format!("no group {channel}")));
        }
        if !members.iter().any(|m| m == user) {
            return Err(ProtocolError::new(ErrorCode::NotMember, format!("{user} is not a member of {channel}")));
        }
        Ok(members)
    }

    async fn send(
        &self,
        session: &Session,
        req: Option<String>,
        to: Recipient,
        text: String,
        key: String,
    ) -> Result<ServerFrame, ProtocolError> {
        let received = Instant::now();
        let (channel, members) = match to {
            Recipient::User(peer) => {
                if peer == session.user {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidArgument,
                        "cannot send a direct message to yourself",
                    ));
                }
                let channel = direct_channel(&session.user, &peer);
                (channel.clone(), self.channel_members(&session.user, &channel).await?)
            }
            Recipient::Group(group) => {
                let members = self.channel_members(&session.user, &group).await?;
                (group, members)
            }
        };

        let result = tokio::time::timeout(
            self.config.write_deadline,
            self.store_message(session, &channel, &members, &key, text),
        )
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!("write took longer than {:?}", self.config.write_deadline)))
        });
        let (message, position, duplicate) = match result {
            Ok(stored) => stored,
            Err(e) => {
                self.metrics.acks.with_label_values(&[ErrorCode::StorageUnavailable.as_str()]).inc();
                return Err(storage_error(e));
            }
        };
        self.metrics.acks.with_label_values(&[if duplicate { "duplicate" } else { "ok" }]).inc();
        let ack = ServerFrame::Ack {
            req,
            id: message.id,
            channel: channel.clone(),
            created_at_ms: message.created_at_ms,
            duplicate,
        };
        if !duplicate {
            self.metrics.messages_stored.inc();
            self.fan_out(session, &message, position, &members, received).await;
        }
        Ok(ack)
    }

    /// Reserves the id, writes history and inboxes. Returns the message, its
    /// inbox position and whether the key had already been stored.
    async fn store_message(
        &self,
        session: &Session,
        channel: &str,
        members: &[String],
        key: &str,
        text: String,
    ) -> Result<(Message, u64, bool), StoreError> {
        let started = Instant::now();
        let candidate = self.ids.next_id();
        let id = match self.store.reserve_send(&session.user, key, candidate, channel).await? {
            Reservation::New => candidate,
            Reservation::Existing { id, channel: original } => {
                if let Some(stored) = self.store.message(&original, id).await? {
                    return Ok((stored, 0, true));
                }
                // The first attempt failed before its write: finish it under the same id.
                id
            }
        };
        if direct_members(channel).is_some() && self.known_direct.insert_new(channel) {
            for member in members {
                self.store.add_direct_channel(member, channel).await?;
            }
        }
        let message = Message {
            id,
            channel: channel.to_string(),
            sender: session.user.clone(),
            sender_device: session.device.clone(),
            text,
            // The id's own time: a retried send keeps its original timestamp.
            created_at_ms: ids::timestamp_ms(id),
        };
        // One position for every recipient: the live frame is encoded once.
        let position = self.ids.next_id();
        let deliveries: Vec<Delivery> = members.iter().map(|user| Delivery { user: user.clone(), position }).collect();
        self.store.write_message(&message, &deliveries).await?;
        self.metrics.store_seconds.observe(started.elapsed().as_secs_f64());
        Ok((message, position, false))
    }

    async fn fan_out(
        &self,
        session: &Session,
        message: &Message,
        position: u64,
        members: &[String],
        received: Instant,
    ) {
        let frame = encode_shared(&ServerFrame::Message { position, message: WireMessage::from(message) });
        for member in members {
            let delivered = self.hub.deliver(member, &frame, Some(session.connection));
            self.metrics.slow_consumers.inc_by(delivered.overflowed as u64);
            if delivered.queued > 0 {
                self.metrics.delivery_seconds.observe(received.elapsed().as_secs_f64());
            }
        }
        let offline = match self.broker.route(members, &frame).await {
            Ok(offline) => offline,
            Err(e) => {
                // Stored and acked: remote devices catch up on resync or reconnect.
                self.metrics.forward_failures.inc();
                tracing::warn!(error = %e, "live forwarding to other gateways failed");
                return;
            }
        };
        for member in members.iter().filter(|m| **m != session.user && offline.contains(*m)) {
            let job = PushJob::new(member, message, self.config.push_summary_chars);
            match self.push.enqueue(&job).await {
                Ok(()) => self.metrics.push_jobs.inc(),
                // The message is stored and will sync; only the notification is lost.
                Err(e) => tracing::warn!(user = %member, error = %e, "could not enqueue a push job"),
            }
        }
    }

    async fn sync(
        &self,
        session: &Session,
        req: Option<String>,
        after: u64,
        limit: Option<usize>,
    ) -> Result<ServerFrame, ProtocolError> {
        let limit = limit.unwrap_or(100);
        let mut entries = self.store.inbox_after(&session.user, after, limit + 1).await.map_err(storage_error)?;
        let has_more = entries.len() > limit;
        entries.truncate(limit);
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
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        Ok(ServerFrame::History { req, channel, messages: messages.iter().map(WireMessage::from).collect(), has_more })
    }

    async fn group_reply(&self, req: Option<String>, group: Group) -> Result<ServerFrame, ProtocolError> {
        let members = self.store.members(&group.id).await.map_err(storage_error)?;
        Ok(ServerFrame::Group { req, group: WireGroup { id: group.id, name: group.name, owner: group.owner, members } })
    }

    async fn existing_group(&self, id: &str) -> Result<Group, ProtocolError> {
        self.store
            .group(id)
            .await
            .map_err(storage_error)?
            .ok_or_else(|| ProtocolError::new(ErrorCode::NoSuchGroup, format!("no group {id}")))
    }

    async fn create_group(
        &self,
        session: &Session,
        req: Option<String>,
        name: String,
        members: Vec<String>,
    ) -> Result<ServerFrame, ProtocolError> {
        let mut all = vec![session.user.clone()];
        all.extend(members);
        all.sort();
        all.dedup();
        let group = Group {
            id: format!("g:{}", self.ids.next_id()),
            name,
            owner: session.user.clone(),
            created_at_ms: ids::now_ms(),
        };
        self.store.create_group(&group, &all).await.map_err(storage_error)?;
        self.group_reply(req, group).await
    }

    async fn add_member(
        &self,
        session: &Session,
        req: Option<String>,
        group_id: String,
        user: String,
    ) -> Result<ServerFrame, ProtocolError> {
        let group = self.existing_group(&group_id).await?;
        let members = self.channel_members(&session.user, &group_id).await?;
        if !members.contains(&user) {
            if members.len() >= self.config.limits.max_group_members {
                return Err(ProtocolError::new(
                    ErrorCode::GroupFull,
                    format!("{group_id} already has {} members, the maximum", members.len()),
                ));
            }
            self.store.add_member(&group_id, &user).await.map_err(storage_error)?;
        }
        self.group_reply(req, group).await
    }

    async fn remove_member(
        &self,
        session: &Session,
        req: Option<String>,
        group_id: String,
        user: String,
    ) -> Result<ServerFrame, ProtocolError> {
        let group = self.existing_group(&group_id).await?;
        self.channel_members(&session.user, &group_id).await?;
        // Anyone may leave; only the owner removes others.
        if user != session.user && group.owner != session.user {
            return Err(ProtocolError::new(ErrorCode::Forbidden, "only the group's owner removes other members"));
        }
        self.store.remove_member(&group_id, &user).await.map_err(storage_error)?;
        self.group_reply(req, group).await
    }

    async fn list_members(
        &self,
        session: &Session,
        req: Option<String>,
        group_id: String,
    ) -> Result<ServerFrame, ProtocolError> {
        let group = self.existing_group(&group_id).await?;
        self.channel_members(&session.user, &group_id).await?;
        self.group_reply(req, group).await
    }
}
