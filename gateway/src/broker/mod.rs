//! Cross-gateway routing and presence state: who is connected where, live
//! forwarding of frames to other gateways, and online/offline transitions.
//!
//! - [`Broker`]: the seam the chat layer uses.
//! - [`LocalBroker`]: one gateway alone (standalone mode): nothing to forward.
//! - [`redis::RedisBroker`]: many gateways sharing Redis.
//!
//! Contract: forwarding is **at most once**. The durable inbox is the source
//! of truth; a forward that may not have arrived (Redis unreachable, no
//! gateway subscribed to take it) is followed, once forwarding works again,
//! by a `resync` to the recipients wherever they are connected: a lost
//! forward costs latency, never a message, and never leaves it waiting for
//! the device's next reconnect. Back-ends call back into the chat layer
//! through [`LocalDelivery`] instead of holding it.

pub mod redis;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// What the broker forwards: an encoded frame.
pub type Frame = crate::protocol::EncodedFrame;

#[derive(Debug, thiserror::Error)]
#[error("broker unavailable: {0}")]
pub struct BrokerError(pub String);

/// What the chat layer offers the broker's background work.
pub trait LocalDelivery: Send + Sync + 'static {
    /// Queues `frame` on every connection here of each of `users`.
    fn deliver_local(&self, users: &[String], frame: &Frame);
    /// Live delivery may have been interrupted: tell every connection to sync.
    fn resync_all(&self, reason: &str);
    /// Forwards to `users` may have been lost: tell their connections here to sync.
    fn resync_users(&self, users: &[String], reason: &str);
    /// `(user, device)` of every session this gateway holds (re-registered after Redis restarts).
    fn local_sessions(&self) -> Vec<(String, String)>;
    /// Sessions an earlier process of this gateway (same id) left registered:
    /// this one holds them now, lingering until their devices return or the
    /// offline timeout ends them.
    fn adopt_sessions(&self, _inherited: Vec<(String, String)>) {}
    /// `user` went offline because the gateway holding them died.
    fn remote_user_offline(&self, user: String);
    /// The members of `group` changed on some gateway.
    fn group_changed(&self, group: &str);
}

/// One gateway's load as it reports it: discovery recommends gateways from
/// these, and the operator reads the same fields from the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayLoad {
    /// The gateway id (its pod name).
    pub pod: String,
    /// The WebSocket URL clients use to reach it.
    pub url: String,
    pub connections: u64,
    /// Connections it accepts at most.
    pub capacity: u64,
    /// Accepting connections (not starting, not draining, not stopping).
    pub ready: bool,
    pub draining: bool,
    pub version: String,
    /// When the broker last published it (ms; 0 where not published, as in
    /// the admin API): a load older than two publish intervals belongs to a
    /// gateway that stopped (killed), and discovery drops it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub published_at_ms: i64,
}

fn is_zero(ms: &i64) -> bool {
    *ms == 0
}

/// One master of a Redis Cluster as this gateway sees it (the admin API
/// reports them; the operator puts them in the ChatCluster's status).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RedisShardView {
    /// `host:port` as the cluster announces it.
    pub master: String,
    pub slots: u32,
    pub replicas: Vec<String>,
    /// This gateway holds its subscriptions there now.
    pub subscribed: bool,
}

/// What routing a frame found out.
#[derive(Debug, Default)]
pub struct Routed {
    /// Users with no device connected anywhere (owed a push notification).
    pub offline: HashSet<String>,
    /// Set while sessions may be missing from the broker (it lost its data
    /// and gateways are still re-registering theirs): `offline` is a guess
    /// until this much time has passed.
    pub unsettled_for: Option<Duration>,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Forwards `frame` to the devices of `users` connected to other
    /// gateways. On failure the broker owes them a `resync` (module docs).
    async fn route(&self, users: &[String], frame: &Frame) -> Result<Routed, BrokerError>;
    /// A device of `user` now has a session here. True when the user was
    /// offline everywhere before (an online transition).
    async fn session_added(&self, user: &str, device: &str) -> Result<bool, BrokerError>;
    /// The device's session here ended. True when the user is now offline
    /// everywhere (an offline transition).
    async fn session_removed(&self, user: &str, device: &str) -> Result<bool, BrokerError>;
    /// Which of `users` are online anywhere.
    async fn online(&self, users: &[String]) -> Result<HashSet<String>, BrokerError>;
    /// When each of `users` was last seen connecting or leaving (ms since the epoch).
    async fn last_active(&self, users: &[String]) -> Result<Vec<Option<i64>>, BrokerError>;
    /// Tells every other gateway that the members of `group` changed (at
    /// most once, like forwards: their caches also expire).
    async fn group_changed(&self, group: &str) -> Result<(), BrokerError>;
    /// False while routing or presence may be incomplete (Redis unreachable,
    /// or this gateway's sessions not yet registered again after it lost them).
    fn healthy(&self) -> bool;
    /// False once another gateway holds this one's worker id: ids minted
    /// now could equal theirs and overwrite their rows.
    fn may_mint_ids(&self) -> bool {
        true
    }
    /// The id this gateway's ids must stay above: where the previous holder
    /// of its worker id stopped (0 when unknown).
    fn id_floor(&self) -> u64 {
        0
    }
    /// True for a broker backed by Redis (the admin API reports its health).
    fn uses_redis(&self) -> bool {
        false
    }
    /// A Redis Cluster's masters as last read (empty for one Redis).
    fn redis_shards(&self) -> Vec<RedisShardView> {
        Vec::new()
    }
    /// This gateway's load, published for discovery (soon after `ready` or
    /// `draining` change, otherwise with the lease).
    fn report_load(&self, load: GatewayLoad);
    /// Reports `load` and publishes it now, waiting for the write (a
    /// drain's start: other gateways must stop recommending this one).
    async fn publish_load_now(&self, load: GatewayLoad) {
        self.report_load(load);
    }
    /// The last reported load of every live gateway, this one's included.
    async fn gateway_loads(&self) -> Result<Vec<GatewayLoad>, BrokerError>;
    /// Tells the connections of `users` on other gateways to resync (soon,
    /// and retried until Redis answers).
    fn resync_elsewhere(&self, _users: &[String]) {}
    /// A session change was dropped before reaching the broker (its queue
    /// was full): reconcile this gateway's sessions with the local ones.
    fn sessions_unrecorded(&self) {}
}

/// The standalone gateway's broker: every session is here.
#[derive(Default)]
pub struct LocalBroker {
    state: Mutex<HashMap<Box<str>, LocalUser>>,
    load: Mutex<Option<GatewayLoad>>,
}

/// One user in one map entry: the devices with a session (none once the
/// user left) and when the user was last seen connecting or leaving.
struct LocalUser {
    devices: Vec<Box<str>>,
    last_active: i64,
}

impl LocalUser {
    fn online(&self) -> bool {
        !self.devices.is_empty()
    }
}

impl LocalBroker {
    fn with_state<T>(&self, f: impl FnOnce(&mut HashMap<Box<str>, LocalUser>) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut state)
    }

    /// `user`'s entry, its last activity set to now.
    fn touch<'a>(users: &'a mut HashMap<Box<str>, LocalUser>, user: &str) -> &'a mut LocalUser {
        let now = crate::ids::now_ms();
        if !users.contains_key(user) {
            // Looked up first: the key is allocated only for a new user.
            users.insert(user.into(), LocalUser { devices: Vec::new(), last_active: now });
        }
        let entry = users.get_mut(user).expect("inserted above");
        entry.last_active = now;
        entry
    }
}

#[async_trait]
impl Broker for LocalBroker {
    async fn route(&self, users: &[String], _frame: &Frame) -> Result<Routed, BrokerError> {
        let offline = self.with_state(|s| {
            users.iter().filter(|u| !s.get(u.as_str()).is_some_and(LocalUser::online)).cloned().collect()
        });
        Ok(Routed { offline, unsettled_for: None })
    }

    async fn session_added(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
        Ok(self.with_state(|s| {
            let entry = Self::touch(s, user);
            let was_offline = !entry.online();
            if !entry.devices.iter().any(|d| **d == *device) {
                // Most users have one device: room for one, not four.
                entry.devices.reserve_exact(1);
                entry.devices.push(device.into());
            }
            was_offline
        }))
    }

    async fn session_removed(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
        Ok(self.with_state(|s| {
            let entry = Self::touch(s, user);
            let was_online = entry.online();
            entry.devices.retain(|d| **d != *device);
            if entry.devices.is_empty() {
                entry.devices = Vec::new();
            }
            was_online && !entry.online()
        }))
    }

    async fn online(&self, users: &[String]) -> Result<HashSet<String>, BrokerError> {
        Ok(self.with_state(|s| {
            users.iter().filter(|u| s.get(u.as_str()).is_some_and(LocalUser::online)).cloned().collect()
        }))
    }

    async fn last_active(&self, users: &[String]) -> Result<Vec<Option<i64>>, BrokerError> {
        Ok(self.with_state(|s| users.iter().map(|u| s.get(u.as_str()).map(|e| e.last_active)).collect()))
    }

    async fn group_changed(&self, _group: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    fn healthy(&self) -> bool {
        true
    }

    fn report_load(&self, load: GatewayLoad) {
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = Some(load);
    }

    async fn gateway_loads(&self) -> Result<Vec<GatewayLoad>, BrokerError> {
        Ok(self.load.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_transitions() {
        let broker = LocalBroker::default();
        assert!(broker.session_added("alice", "phone").await.expect("add"));
        assert!(!broker.session_added("alice", "laptop").await.expect("add"));
        assert!(!broker.session_added("alice", "laptop").await.expect("add again"), "idempotent");
        assert!(!broker.session_removed("alice", "phone").await.expect("remove"));
        let frame = Frame::from_static("x");
        let routed = broker.route(&["alice".into(), "bob".into()], &frame).await.expect("route");
        assert_eq!(routed.offline, HashSet::from(["bob".to_string()]));
        assert!(broker.session_removed("alice", "laptop").await.expect("remove"));
        assert!(!broker.session_removed("alice", "laptop").await.expect("remove again"), "already offline");
        assert!(broker.online(&["alice".into()]).await.expect("online").is_empty());
        assert!(broker.last_active(&["alice".into()]).await.expect("seen")[0].is_some(), "remembered after leaving");
        assert!(broker.session_added("alice", "phone").await.expect("add"), "online again");
    }
}
