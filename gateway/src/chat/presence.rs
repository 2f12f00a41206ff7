//! This gateway's view of its sessions, for presence: which (user, device)
//! pairs it has announced to the broker, and which of them are lingering
//! after a dropped connection.
//!
//! Heartbeats never reach Redis: a connection remembers when it last heard
//! from its client, and only transitions leave this module. A connection
//! that drops without logging out keeps its session for `offline_after`
//! counted from its last heartbeat, so a device that comes back in time
//! (to this gateway or another) causes no offline/online flap. A logout
//! ends the session at once.
//!
//! Transitions are handed to a callback while the lock is held, so their
//! order matches the order of the state changes (a session removed by the
//! sweeper and re-added by a reconnect reach the broker in that order).
//!
//! The queues to the broker are bounded. When Redis is so slow that one
//! fills, a transition is dropped and the broker is told to reconcile this
//! gateway's sessions with the ones held here: what Redis ends up knowing is
//! the same, only that transition's `presence_changed` to friends is lost
//! (counted in `kubechat_gateway_presence_dropped_total`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{ChatService, Session, storage_error};
use crate::protocol::frames::WirePresence;
use crate::protocol::{ErrorCode, ProtocolError, ServerFrame, direct_members, encode_shared};
use crate::store::StoreError;

/// A change the broker must hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Added { user: String, device: String },
    Removed { user: String, device: String },
}

impl Transition {
    pub fn user(&self) -> &str {
        match self {
            Transition::Added { user, .. } | Transition::Removed { user, .. } => user,
        }
    }
}

#[derive(Debug)]
struct DeviceSession {
    /// Open connections of this device here.
    connections: u32,
    /// Set while no connection is open: the session ends at this instant.
    linger_until: Option<Instant>,
}

/// Sessions by (user, device); the names are the hub's (`Arc<str>`), not copies.
#[derive(Default)]
struct Sessions {
    map: HashMap<(Arc<str>, Arc<str>), DeviceSession>,
    /// How many have `linger_until` set: the sweeper skips the map when none do.
    lingering: usize,
}

/// Sessions of this gateway by (user, device).
pub struct PresenceTracker {
    offline_after: Duration,
    sessions: Mutex<Sessions>,
}

impl PresenceTracker {
    pub fn new(offline_after: Duration) -> Self {
        Self { offline_after, sessions: Mutex::default() }
    }

    fn with_sessions<T>(&self, f: impl FnOnce(&mut Sessions) -> T) -> T {
        let mut sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut sessions)
    }

    /// A connection of (user, device) opened here.
    pub fn connected(&self, user: &Arc<str>, device: &Arc<str>, emit: impl FnOnce(Transition)) {
        self.with_sessions(|sessions| {
            let key = (Arc::clone(user), Arc::clone(device));
            match sessions.map.get_mut(&key) {
                Some(session) => {
                    session.connections += 1;
                    if session.linger_until.take().is_some() {
                        sessions.lingering -= 1;
                    }
                }
                None => {
                    sessions.map.insert(key, DeviceSession { connections: 1, linger_until: None });
                    emit(Transition::Added { user: user.to_string(), device: device.to_string() });
                }
            }
        });
    }

    /// A connection of (user, device) closed; `last_heard` is when its
    /// client last sent anything. A logout ends the session now.
    pub fn disconnected(
        &self,
        user: &Arc<str>,
        device: &Arc<str>,
        last_heard: Instant,
        logged_out: bool,
        emit: impl FnOnce(Transition),
    ) {
        self.with_sessions(|sessions| {
            let key = (Arc::clone(user), Arc::clone(device));
            let Some(session) = sessions.map.get_mut(&key) else { return };
            session.connections = session.connections.saturating_sub(1);
            if session.connections > 0 {
                return;
            }
            let until = last_heard + self.offline_after;
            if logged_out || until <= Instant::now() {
                if sessions.map.remove(&key).is_some_and(|s| s.linger_until.is_some()) {
                    sessions.lingering -= 1;
                }
                emit(Transition::Removed { user: user.to_string(), device: device.to_string() });
            } else if session.linger_until.replace(until).is_none() {
                sessions.lingering += 1;
            }
        });
    }

    /// Ends lingering sessions whose time is up.
    pub fn sweep(&self, now: Instant, mut emit: impl FnMut(Transition)) {
        self.with_sessions(|sessions| {
            if sessions.lingering == 0 {
                return;
            }
            let mut ended = 0;
            sessions.map.retain(|(user, device), session| {
                let expired = session.linger_until.is_some_and(|until| until <= now);
                if expired {
                    ended += 1;
                    emit(Transition::Removed { user: user.to_string(), device: device.to_string() });
                }
                !expired
            });
            sessions.lingering -= ended;
        });
    }

    /// Takes over sessions an earlier process of this gateway registered
    /// (a crash or fast restart under the same pod name): they linger here
    /// from now, so a device that reconnects in time keeps its session and
    /// one that does not ends it through the sweep, like any dropped
    /// connection. Already registered with the broker: no transition.
    pub fn adopt(&self, inherited: Vec<(String, String)>) {
        let until = Instant::now() + self.offline_after;
        self.with_sessions(|sessions| {
            for (user, device) in inherited {
                let key: (Arc<str>, Arc<str>) = (user.into(), device.into());
                if let std::collections::hash_map::Entry::Vacant(slot) = sessions.map.entry(key) {
                    slot.insert(DeviceSession { connections: 0, linger_until: Some(until) });
                    sessions.lingering += 1;
                }
            }
        });
    }

    /// Every session this gateway holds, lingering ones included.
    pub fn sessions(&self) -> Vec<(String, String)> {
        self.with_sessions(|sessions| sessions.map.keys().map(|(u, d)| (u.to_string(), d.to_string())).collect())
    }
}

/// What a transition shard works through, in order.
pub(super) enum ShardWork {
    Apply(Transition),
    /// Answered once everything queued before it was applied.
    Barrier(oneshot::Sender<()>),
}

/// How often lingering sessions are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

impl ChatService {
    /// A connection of `user`'s `device` opened on this gateway. Resolves
    /// once the broker knows the session (or `wait` passed, when Redis is
    /// slow or down): a client that syncs after that misses nothing, since
    /// every later message is forwarded to it and every earlier one is in
    /// the store.
    pub async fn session_opened(&self, user: &Arc<str>, device: &Arc<str>, wait: Duration) {
        self.presence.connected(user, device, |t| self.queue_transition(t));
        let (done, mut registered) = oneshot::channel();
        self.queue(user, ShardWork::Barrier(done));
        // A dropped barrier (full queue) answers at once: the broker is told
        // to reconcile, which resyncs whom it re-adds.
        if tokio::time::timeout(wait, &mut registered).await.is_err() {
            tracing::debug!(%user, "session not yet registered with the broker; continuing, resync once it is");
            // Messages routed before the registration lands were not
            // forwarded here, and the client may have synced already: once it
            // lands, the user's connections here sync again.
            let (hub, user) = (Arc::clone(&self.hub), user.to_string());
            tokio::spawn(async move {
                if registered.await.is_ok() {
                    let frame = encode_shared(&ServerFrame::Resync {
                        reason: "this connection's registration completed after its hello".to_string(),
                    });
                    hub.deliver(&user, &frame, None);
                }
            });
        }
    }

    /// A connection closed; `last_heard` is when its client last sent a frame.
    pub fn session_closed(&self, user: &Arc<str>, device: &Arc<str>, last_heard: Instant, logged_out: bool) {
        self.presence.disconnected(user, device, last_heard, logged_out, |t| self.queue_transition(t));
    }

    fn queue_transition(&self, transition: Transition) {
        let user = transition.user().to_string();
        self.queue(&user, ShardWork::Apply(transition));
    }

    fn queue(&self, user: &str, work: ShardWork) {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut hasher);
        let shard = (hasher.finish() % self.transitions.len() as u64) as usize;
        match self.transitions[shard].try_send(work) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ShardWork::Apply(_))) => {
                self.metrics.presence_dropped.inc();
                self.broker.sessions_unrecorded();
                crate::warn_throttled!("presence queue full; Redis will be reconciled with this gateway's sessions");
            }
            // A barrier only tells a connection when it may sync; closed means shutting down.
            Err(_) => {}
        }
    }

    /// Tells the broker; an online or offline transition of the user is
    /// announced to their friends.
    async fn apply(&self, transition: Transition) {
        let (result, online) = match &transition {
            Transition::Added { user, device } => (self.broker.session_added(user, device).await, true),
            Transition::Removed { user, device } => (self.broker.session_removed(user, device).await, false),
        };
        match result {
            Ok(true) => self.announce(transition.user(), online).await,
            Ok(false) => {}
            // The broker reconciles its sessions when Redis is back.
            Err(e) => crate::warn_throttled!(user = transition.user(), error = %e, "presence change not recorded"),
        }
    }

    /// Users who share a channel with `user` and hear of their presence
    /// changes: direct peers and members of groups small enough to fan out.
    async fn friends_of(&self, user: &str, max_group: usize) -> Result<HashSet<String>, StoreError> {
        let mut friends = HashSet::new();
        let mut groups = Vec::new();
        for channel in self.store.channels_of(user).await? {
            match direct_members(&channel) {
                Some((a, b)) => friends.extend([a.to_string(), b.to_string()]),
                None => groups.push(channel),
            }
        }
        // All groups' members in one batched read, not one read per group.
        for members in self.store.members_of(&groups).await?.into_values() {
            if members.len() <= max_group {
                friends.extend(members);
            }
        }
        friends.remove(user);
        Ok(friends)
    }

    /// Sends a `presence_changed` to the online friends of `user`, wherever they are connected.
    async fn announce(&self, user: &str, online: bool) {
        self.metrics.presence_changes.with_label_values(&[if online { "online" } else { "offline" }]).inc();
        let friends = match self.friends_of(user, self.config.presence_fanout_max_members).await {
            Ok(friends) => friends.into_iter().collect::<Vec<_>>(),
            Err(e) => {
                crate::warn_throttled!(%user, error = %e, "presence change not announced: channels unreadable");
                return;
            }
        };
        if friends.is_empty() {
            return;
        }
        let frame = encode_shared(&ServerFrame::PresenceChanged {
            user: user.to_string(),
            online,
            last_active_ms: Some(crate::ids::now_ms()),
        });
        for friend in &friends {
            self.hub.deliver(friend, &frame, None);
        }
        if let Err(e) = self.broker.route(&friends, &frame).await {
            self.metrics.forward_failures.inc();
            crate::warn_throttled!(%user, error = %e, "presence change not forwarded to other gateways");
        }
    }

    /// Presence of `users` and of `group`'s members, for someone who shares
    /// a channel with each (no watching strangers). One batched lookup.
    pub(super) async fn presence_of(
        &self,
        session: &Session,
        req: Option<String>,
        mut users: Vec<String>,
        group: Option<String>,
    ) -> Result<ServerFrame, ProtocolError> {
        if let Some(group) = group {
            users.extend(self.channel_members(&session.user, &group).await?.iter().cloned());
        }
        users.sort();
        users.dedup();
        let mut shared = self.friends_of(&session.user, usize::MAX).await.map_err(storage_error)?;
        shared.insert(session.user.clone());
        if let Some(stranger) = users.iter().find(|u| !shared.contains(*u)) {
            return Err(ProtocolError::new(ErrorCode::NotMember, format!("you share no channel with {stranger}")));
        }
        let unavailable = |e: crate::broker::BrokerError| {
            ProtocolError::new(ErrorCode::Unavailable, format!("presence unknown: {e}"))
        };
        let online = self.broker.online(&users).await.map_err(unavailable)?;
        let last_active = self.broker.last_active(&users).await.map_err(unavailable)?;
        let users = users
            .into_iter()
            .zip(last_active)
            .map(|(user, last_active_ms)| WirePresence { online: online.contains(&user), last_active_ms, user })
            .collect();
        Ok(ServerFrame::Presence { req, users })
    }
}

/// Applies one shard's transitions in order until shutdown.
pub(super) async fn apply_transitions(
    service: Weak<ChatService>,
    mut work: mpsc::Receiver<ShardWork>,
    shutdown: CancellationToken,
) {
    while let Some(next) = next_until(&shutdown, &mut work).await {
        match next {
            ShardWork::Apply(transition) => {
                let Some(service) = service.upgrade() else { return };
                service.apply(transition).await;
            }
            ShardWork::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Ends lingering sessions whose grace window ran out.
pub(super) async fn sweep_lingering(service: Weak<ChatService>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        let Some(service) = service.upgrade() else { return };
        service.presence.sweep(Instant::now(), |t| service.queue_transition(t));
    }
}

/// Announces users who went offline because the gateway holding them died.
pub(super) async fn announce_remote_offline(
    service: Weak<ChatService>,
    mut users: mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    while let Some(user) = next_until(&shutdown, &mut users).await {
        let Some(service) = service.upgrade() else { return };
        service.announce(&user, false).await;
    }
}

/// The next item, or `None` once the queue closed or `shutdown` fired.
async fn next_until<T>(shutdown: &CancellationToken, queue: &mut mpsc::Receiver<T>) -> Option<T> {
    tokio::select! {
        () = shutdown.cancelled() => None,
        next = queue.recv() => next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(tracker: &PresenceTracker, f: impl FnOnce(&PresenceTracker, &mut Vec<Transition>)) -> Vec<Transition> {
        let mut out = Vec::new();
        f(tracker, &mut out);
        out
    }

    fn name(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    fn added(user: &str, device: &str) -> Transition {
        Transition::Added { user: user.into(), device: device.into() }
    }

    fn removed(user: &str, device: &str) -> Transition {
        Transition::Removed { user: user.into(), device: device.into() }
    }

    #[test]
    fn a_second_connection_of_a_device_is_no_transition() {
        let tracker = PresenceTracker::new(Duration::from_secs(30));
        let now = Instant::now();
        let first = collect(&tracker, |t, out| t.connected(&name("a"), &name("phone"), |e| out.push(e)));
        let second = collect(&tracker, |t, out| t.connected(&name("a"), &name("phone"), |e| out.push(e)));
        assert_eq!(first, vec![added("a", "phone")]);
        assert!(second.is_empty());
        let one_closed =
            collect(&tracker, |t, out| t.disconnected(&name("a"), &name("phone"), now, true, |e| out.push(e)));
        assert!(one_closed.is_empty(), "the other connection is still open");
        let both_closed =
            collect(&tracker, |t, out| t.disconnected(&name("a"), &name("phone"), now, true, |e| out.push(e)));
        assert_eq!(both_closed, vec![removed("a", "phone")]);
    }

    #[test]
    fn a_dropped_connection_lingers_from_its_last_heartbeat() {
        let tracker = PresenceTracker::new(Duration::from_secs(30));
        let heard = Instant::now();
        tracker.connected(&name("a"), &name("phone"), |_| {});
        let dropped =
            collect(&tracker, |t, out| t.disconnected(&name("a"), &name("phone"), heard, false, |e| out.push(e)));
        assert!(dropped.is_empty(), "no offline at once");
        assert_eq!(tracker.with_sessions(|s| s.lingering), 1);
        assert_eq!(collect(&tracker, |t, out| t.sweep(heard + Duration::from_secs(29), |e| out.push(e))), vec![]);
        assert_eq!(tracker.sessions(), vec![("a".to_string(), "phone".to_string())]);
        let expired = collect(&tracker, |t, out| t.sweep(heard + Duration::from_secs(30), |e| out.push(e)));
        assert_eq!(expired, vec![removed("a", "phone")]);
        assert!(tracker.sessions().is_empty());
        assert_eq!(tracker.with_sessions(|s| s.lingering), 0);
    }

    #[test]
    fn coming_back_within_the_window_cancels_the_linger() {
        let tracker = PresenceTracker::new(Duration::from_secs(30));
        let heard = Instant::now();
        tracker.connected(&name("a"), &name("phone"), |_| {});
        tracker.disconnected(&name("a"), &name("phone"), heard, false, |_| {});
        let back = collect(&tracker, |t, out| t.connected(&name("a"), &name("phone"), |e| out.push(e)));
        assert!(back.is_empty(), "still registered: no online transition");
        assert_eq!(tracker.with_sessions(|s| s.lingering), 0, "no longer lingering");
        let swept = collect(&tracker, |t, out| t.sweep(heard + Duration::from_secs(60), |e| out.push(e)));
        assert!(swept.is_empty(), "the new connection keeps the session");
    }

    #[test]
    fn a_connection_silent_past_the_window_ends_at_once() {
        let tracker = PresenceTracker::new(Duration::from_secs(1));
        tracker.connected(&name("a"), &name("phone"), |_| {});
        let long_ago = Instant::now().checked_sub(Duration::from_secs(5)).expect("monotonic clock past 5 s");
        let closed =
            collect(&tracker, |t, out| t.disconnected(&name("a"), &name("phone"), long_ago, false, |e| out.push(e)));
        assert_eq!(closed, vec![removed("a", "phone")]);
    }
}
