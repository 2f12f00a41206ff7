//! The broker of a gateway cluster, on Redis.
//!
//! Keys (all under `kubechat:`, names in [`wire`]):
//! - `gateways`: sorted set, gateway id → lease expiry (ms). A gateway
//!   renews its lease every [`RedisBrokerConfig::renew_every`]; one that stops
//!   renewing (SIGKILL, partition) is dead once the lease runs out.
//! - `sessions:{user}`: hash, `{gateway}|{device}` → connected-at (ms).
//!   Written on transitions only (a device's session starts or ends here),
//!   never per heartbeat. Entries of dead gateways are ignored, then reaped.
//! - `gateway-sessions:{gateway}`: set of users with sessions there (for reaping).
//! - `seen:{user}`: last time a session of the user started or ended (ms).
//! - `epoch`: when Redis' data began (see [`wire::EPOCH`]).
//! - `registered`: hash, gateway → the epoch its sessions were last
//!   registered for (see [`wire::REGISTERED`]).
//! - `worker-id:{n}`: the gateway holding id-generator worker id `n`.
//! - Pub/sub channel `deliver:{gateway}`: `user1,user2,…\n{frame}`, each
//!   gateway subscribed to its own. User ids never hold `,` or a newline, and
//!   the frame travels as is (no second JSON encoding).
//! - Pub/sub channel `groups-changed`: a group id whose members changed;
//!   every gateway subscribes and drops its cached members of that group.
//! - Pub/sub channel `resync`: users whose forwards may have been lost.
//!
//! Losing Redis degrades, never corrupts: commands time out and fail (the
//! chat layer still stores and acks), and [`upkeep`] brings the gateway back:
//! subscription, lease, sessions, and a `resync` for everyone a forward may
//! have missed (this gateway's connections, and the recipients of forwards
//! this gateway failed to send).

pub mod send_keys;
mod upkeep;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Broker, BrokerError, Frame, GatewayLoad, LocalDelivery, Routed};
use crate::ids::now_ms;
use wire::{GATEWAYS, ResyncScope, gateway_sessions_key, seen_key, sessions_key};

#[derive(Clone, Debug)]
pub struct RedisBrokerConfig {
    /// Unique among live gateways (the pod name).
    pub gateway_id: String,
    /// A gateway that stops renewing is dead after this long; its users go
    /// offline then. The offline timeout is the natural value.
    pub lease: Duration,
    /// How long one Redis command may take.
    pub command_timeout: Duration,
    /// The id generator's worker id, claimed in Redis for as long as the
    /// lease: two gateways with one worker id would mint the same message
    /// ids and inbox positions and overwrite each other's rows.
    pub worker_id: Option<u16>,
}

impl RedisBrokerConfig {
    /// How often the lease is renewed (which is also how soon a gateway
    /// notices that Redis lost its data without losing the connection).
    pub fn renew_every(&self) -> Duration {
        (self.lease / 3).min(Duration::from_secs(2))
    }

    /// How long after Redis' data began every live gateway has renewed its
    /// lease (it notices the loss at its next renewal): from then on the
    /// gateways that have not yet re-registered their sessions are known
    /// ([`wire::REGISTERED`]), and presence waits for them.
    pub fn settle_time(&self) -> Duration {
        self.renew_every() + self.command_timeout * 2
    }

    /// How long after Redis' data began presence waits, at most, for a live
    /// gateway to re-register its sessions: a gateway that renews its lease
    /// but cannot register them (its subscription stays broken) counts as
    /// holding none after this, like one whose lease lapsed.
    pub fn registration_deadline(&self) -> Duration {
        self.settle_time() + self.lease
    }
}

fn unavailable(what: &str) -> impl Fn(redis::RedisError) -> BrokerError + '_ {
    move |e| BrokerError(format!("{what}: {e}"))
}

/// Users owed a `resync` because a forward to them may have been lost,
/// until it is published. Bounded: past `cap` users it becomes "everyone".
#[derive(Debug, Default)]
struct OwedResyncs {
    users: HashSet<String>,
    everyone: bool,
}

impl OwedResyncs {
    const CAP: usize = 10_000;

    fn add<'a>(&mut self, users: impl IntoIterator<Item = &'a String>) {
        if self.everyone {
            return;
        }
        self.users.extend(users.into_iter().cloned());
        if self.users.len() > Self::CAP {
            self.everyone = true;
            self.users = HashSet::new();
        }
    }

    fn take(&mut self) -> Option<ResyncScope> {
        if std::mem::take(&mut self.everyone) {
            return Some(ResyncScope::Everyone);
        }
        (!self.users.is_empty()).then(|| ResyncScope::Users(std::mem::take(&mut self.users).into_iter().collect()))
    }

    /// Puts back what could not be published.
    fn restore(&mut self, scope: ResyncScope) {
        match scope {
            ResyncScope::Everyone => self.everyone = true,
            ResyncScope::Users(users) => self.add(&users),
        }
    }
}

pub struct RedisBroker {
    config: RedisBrokerConfig,
    /// Where Redis was looked for (no password), for error messages.
    address: String,
    connection: ConnectionManager,
    subscribed: AtomicBool,
    lease_ok: AtomicBool,
    /// The lease entry was written once (a later renewal that adds it again found it lost).
    lease_written: AtomicBool,
    /// Some of this gateway's sessions may be missing from Redis: from the
    /// moment they may have been lost (subscription dropped, lease found
    /// missing, a change not written) until they are registered again.
    sessions_lost: AtomicBool,
    /// Everyone connected here must resync once sessions are re-registered
    /// (forwards to this gateway may have been lost meanwhile).
    resync_everyone: AtomicBool,
    owed: Mutex<OwedResyncs>,
    /// Wakes the repair task.
    repair: Notify,
    /// [`wire::EPOCH`] as last read (ms).
    epoch_ms: AtomicI64,
    /// Another gateway holds this one's worker id.
    worker_lost: AtomicBool,
    /// When the last confirmed renewal of the worker-id claim started (ms):
    /// the claim runs a lease from there.
    worker_renewed_ms: AtomicI64,
    /// This process among others of the same pod name (drawn at start).
    instance: String,
    /// Where the previous holder of the worker id said it would stop minting
    /// (ms): ids of this process start above it, whatever the clock says.
    id_floor_ms: AtomicI64,
    /// This gateway's load as last reported.
    load: Mutex<Option<GatewayLoad>>,
    /// Wakes the lease task to publish a load whose state changed.
    load_changed: Notify,
    /// Every live gateway's load, read at most every second.
    loads: RwLock<(tokio::time::Instant, Vec<GatewayLoad>)>,
    /// Live gateways, refreshed at most every second (for transitions and
    /// reaping; routing reads leases and sessions atomically instead).
    alive: RwLock<(tokio::time::Instant, HashSet<String>)>,
    live_sessions: redis::Script,
    route_script: redis::Script,
    reap_script: redis::Script,
    gateway_sessions_script: redis::Script,
    renew_lease_script: redis::Script,
    renew_worker_script: redis::Script,
}

impl RedisBroker {
    /// Connects and starts the lease, subscription, repair and reaper tasks
    /// on `tasks`; they stop with `shutdown`.
    pub async fn start(
        client: redis::Client,
        config: RedisBrokerConfig,
        local: Arc<dyn LocalDelivery>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BrokerError> {
        let address = client.get_connection_info().addr().to_string();
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.command_timeout))
            .set_connection_timeout(Some(config.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_with_config(client.clone(), manager_config)
            .await
            .map_err(|e| BrokerError(format!("connecting to Redis at {address}: {e}")))?;
        let broker = Arc::new(Self {
            config,
            address,
            connection,
            subscribed: AtomicBool::new(false),
            lease_ok: AtomicBool::new(false),
            lease_written: AtomicBool::new(false),
            // No session yet, so none is missing.
            sessions_lost: AtomicBool::new(false),
            resync_everyone: AtomicBool::new(false),
            owed: Mutex::default(),
            repair: Notify::new(),
            epoch_ms: AtomicI64::new(0),
            worker_lost: AtomicBool::new(false),
            worker_renewed_ms: AtomicI64::new(0),
            instance: format!("{:016x}", getrandom::u64().unwrap_or_else(|_| now_ms().cast_unsigned())),
            id_floor_ms: AtomicI64::new(0),
            load: Mutex::new(None),
            load_changed: Notify::new(),
            loads: RwLock::new((tokio::time::Instant::now() - Duration::from_secs(60), Vec::new())),
            alive: RwLock::new((tokio::time::Instant::now() - Duration::from_secs(60), HashSet::new())),
            live_sessions: redis::Script::new(wire::LIVE_SESSIONS_SCRIPT),
            route_script: redis::Script::new(wire::ROUTE_SCRIPT),
            reap_script: redis::Script::new(wire::REAP_SCRIPT),
            gateway_sessions_script: redis::Script::new(wire::GATEWAY_SESSIONS_SCRIPT),
            renew_lease_script: redis::Script::new(wire::RENEW_LEASE_SCRIPT),
            renew_worker_script: redis::Script::new(wire::RENEW_WORKER_SCRIPT),
        });
        broker.claim_worker_id().await?;
        // An earlier process of this pod (crashed, or restarted within its
        // lease) left its sessions registered under this id: hold them,
        // lingering, instead of leaving them online for good.
        let inherited = broker.inherited_sessions().await?;
        if !inherited.is_empty() {
            tracing::info!(sessions = inherited.len(), "holding the sessions an earlier process of this gateway left");
            local.adopt_sessions(inherited);
        }
        broker.renew_lease().await.map_err(|e| BrokerError(format!("{e} (Redis at {})", broker.address)))?;
        tasks.spawn(broker.clone().keep_lease(shutdown.clone()));
        tasks.spawn(broker.clone().subscribe_loop(client, local.clone(), shutdown.clone()));
        tasks.spawn(broker.clone().repair_loop(local.clone(), shutdown.clone()));
        tasks.spawn(broker.clone().reap_loop(local, shutdown));
        // Forwards published before the subscription exists would be lost.
        let started = tokio::time::Instant::now();
        while !broker.subscribed.load(Ordering::Relaxed) && started.elapsed() < broker.config.command_timeout {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(broker)
    }

    /// Redis answers (as far as this gateway knows).
    fn reachable(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed) && self.lease_ok.load(Ordering::Relaxed)
    }

    /// Fails at once while Redis is known to be unreachable, instead of
    /// making every send and connect wait for a command timeout.
    fn check_reachable(&self) -> Result<(), BrokerError> {
        if self.reachable() {
            Ok(())
        } else {
            Err(BrokerError(format!("Redis at {} unreachable (degraded)", self.address)))
        }
    }

    /// This gateway's sessions must be written again; `resync_everyone`
    /// when forwards to it may have been lost as well.
    fn mark_sessions_lost(&self, resync_everyone: bool) {
        self.sessions_lost.store(true, Ordering::Relaxed);
        if resync_everyone {
            self.resync_everyone.store(true, Ordering::Relaxed);
        }
        self.repair.notify_one();
    }

    /// Remembers that Redis missed a session change.
    fn dirty(&self, error: BrokerError) -> BrokerError {
        self.mark_sessions_lost(false);
        error
    }

    /// Forwards to `users` may have been lost: they are owed a resync.
    fn owe_resync<'a>(&self, users: impl IntoIterator<Item = &'a String>) {
        self.owed.lock().unwrap_or_else(|p| p.into_inner()).add(users);
        self.repair.notify_one();
    }

    fn conn(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// How long until presence is certain again after Redis lost its data
    /// (`None`: it is certain now).
    fn unsettled_for(&self) -> Option<Duration> {
        let settled_at = self.epoch_ms.load(Ordering::Relaxed)
            + i64::try_from(self.config.settle_time().as_millis()).unwrap_or(i64::MAX);
        let left = settled_at - now_ms();
        (left > 0).then(|| Duration::from_millis(left.unsigned_abs()))
    }

    /// Fails while presence cannot be trusted: Redis unreachable, this
    /// gateway's sessions not registered, or other gateways possibly not.
    fn check_presence_known(&self) -> Result<(), BrokerError> {
        self.check_reachable()?;
        if self.sessions_lost.load(Ordering::Relaxed) {
            return Err(BrokerError("this gateway is re-registering its sessions".into()));
        }
        if let Some(left) = self.unsettled_for() {
            return Err(BrokerError(format!(
                "Redis lost its data; gateways are re-registering their sessions (known in {} ms)",
                left.as_millis()
            )));
        }
        Ok(())
    }

    /// For each user, the live gateways holding a session (one atomic
    /// script); refreshes the epoch on the way. Fails while a live gateway
    /// has not registered its sessions since Redis lost its data (up to
    /// [`RedisBrokerConfig::registration_deadline`] after it): its users
    /// would look offline.
    async fn live_sessions_of(&self, users: &[String]) -> Result<Vec<Vec<String>>, BrokerError> {
        let mut invocation = self.live_sessions.prepare_invoke();
        invocation.key(wire::EPOCH).key(GATEWAYS).key(wire::REGISTERED);
        for user in users {
            invocation.key(sessions_key(user));
        }
        let now = now_ms();
        let (epoch, gateways, unregistered): (i64, Vec<Vec<String>>, i64) =
            invocation.arg(now).invoke_async(&mut self.conn()).await.map_err(unavailable("reading sessions"))?;
        self.epoch_ms.store(epoch, Ordering::Relaxed);
        let deadline = i64::try_from(self.config.registration_deadline().as_millis()).unwrap_or(i64::MAX);
        if unregistered > 0 && now < epoch.saturating_add(deadline) {
            return Err(BrokerError(format!(
                "Redis lost its data; {unregistered} gateway(s) still re-registering their sessions"
            )));
        }
        Ok(gateways)
    }

    async fn alive_gateways(&self) -> Result<HashSet<String>, BrokerError> {
        {
            let cached = self.alive.read().await;
            if cached.0.elapsed() < Duration::from_secs(1) {
                return Ok(cached.1.clone());
            }
        }
        let alive: Vec<String> =
            self.conn().zrangebyscore(GATEWAYS, now_ms(), "+inf").await.map_err(unavailable("listing gateways"))?;
        let alive: HashSet<String> = alive.into_iter().collect();
        *self.alive.write().await = (tokio::time::Instant::now(), alive.clone());
        Ok(alive)
    }

    /// Session fields of each user, in one round trip.
    async fn sessions_of(&self, users: &[String]) -> Result<Vec<Vec<String>>, BrokerError> {
        let mut pipe = redis::pipe();
        for user in users {
            pipe.hkeys(sessions_key(user));
        }
        pipe.query_async(&mut self.conn()).await.map_err(unavailable("reading sessions"))
    }

    /// Gateways (alive) holding a session of the user, from its fields.
    fn live_gateways<'a>(fields: &'a [String], alive: &HashSet<String>) -> HashSet<&'a str> {
        fields.iter().filter_map(|f| f.split_once('|').map(|(g, _)| g)).filter(|g| alive.contains(*g)).collect()
    }
}

#[async_trait]
impl Broker for RedisBroker {
    /// One round trip: the route script looks the sessions up and publishes
    /// one forward per other gateway holding a recipient.
    async fn route(&self, users: &[String], frame: &Frame) -> Result<Routed, BrokerError> {
        let result = async {
            self.check_reachable()?;
            let mut invocation = self.route_script.prepare_invoke();
            invocation.key(wire::EPOCH).key(GATEWAYS);
            for user in users {
                invocation.key(sessions_key(user));
            }
            invocation.arg(now_ms()).arg(&self.config.gateway_id).arg(frame.as_str()).arg(wire::DELIVER_PREFIX);
            for user in users {
                invocation.arg(user);
            }
            let (epoch, offline, unheard): (i64, Vec<usize>, Vec<usize>) =
                invocation.invoke_async(&mut self.conn()).await.map_err(unavailable("routing"))?;
            self.epoch_ms.store(epoch, Ordering::Relaxed);
            let named = |indices: Vec<usize>| -> Vec<String> {
                indices.into_iter().filter_map(|i| users.get(i.wrapping_sub(1)).cloned()).collect()
            };
            let unheard = named(unheard);
            if !unheard.is_empty() {
                // Their gateway is reconnecting to Redis: they resync once it is back.
                self.owe_resync(&unheard);
            }
            Ok(Routed { offline: named(offline).into_iter().collect(), unsettled_for: self.unsettled_for() })
        }
        .await;
        if result.is_err() {
            self.owe_resync(users);
        }
        result
    }

    async fn session_added(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
        self.check_reachable().map_err(|e| self.dirty(e))?;
        let field = format!("{}|{device}", self.config.gateway_id);
        let now = now_ms();
        let (fields,): (Vec<String>,) = redis::pipe()
            .hkeys(sessions_key(user))
            .hset(sessions_key(user), &field, now)
            .ignore()
            .sadd(gateway_sessions_key(&self.config.gateway_id), user)
            .ignore()
            .set(seen_key(user), now)
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.dirty(unavailable("registering a session")(e)))?;
        let alive = self.alive_gateways().await?;
        let others: Vec<String> = fields.into_iter().filter(|f| *f != field).collect();
        Ok(Self::live_gateways(&others, &alive).is_empty())
    }

    async fn session_removed(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
        self.check_reachable().map_err(|e| self.dirty(e))?;
        let field = format!("{}|{device}", self.config.gateway_id);
        let (fields,): (Vec<String>,) = redis::pipe()
            .hdel(sessions_key(user), &field)
            .ignore()
            .hkeys(sessions_key(user))
            .set(seen_key(user), now_ms())
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.dirty(unavailable("removing a session")(e)))?;
        let prefix = format!("{}|", self.config.gateway_id);
        if !fields.iter().any(|f| f.starts_with(&prefix)) {
            let _: () = self
                .conn()
                .srem(gateway_sessions_key(&self.config.gateway_id), user)
                .await
                .map_err(|e| self.dirty(unavailable("removing a session")(e)))?;
        }
        let alive = self.alive_gateways().await?;
        Ok(Self::live_gateways(&fields, &alive).is_empty())
    }

    async fn online(&self, users: &[String]) -> Result<HashSet<String>, BrokerError> {
        self.check_presence_known()?;
        let live = self.live_sessions_of(users).await?;
        self.check_presence_known()?;
        Ok(users.iter().zip(&live).filter(|(_, gateways)| !gateways.is_empty()).map(|(u, _)| u.clone()).collect())
    }

    async fn last_active(&self, users: &[String]) -> Result<Vec<Option<i64>>, BrokerError> {
        self.check_presence_known()?;
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = users.iter().map(|u| seen_key(u)).collect();
        let values: Vec<Option<i64>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable("reading last seen"))?;
        Ok(values)
    }

    async fn group_changed(&self, group: &str) -> Result<(), BrokerError> {
        self.check_reachable()?;
        let _: () = self
            .conn()
            .publish(wire::GROUPS_CHANGED, group)
            .await
            .map_err(unavailable("announcing a membership change"))?;
        Ok(())
    }

    fn healthy(&self) -> bool {
        self.reachable() && !self.sessions_lost.load(Ordering::Relaxed) && self.may_mint_ids()
    }

    fn may_mint_ids(&self) -> bool {
        if self.config.worker_id.is_none() {
            return true;
        }
        if self.worker_lost.load(Ordering::Relaxed) {
            return false;
        }
        // Minting stops where the last confirmed claim ends, a margin before
        // it, whatever the reason it was not renewed: a pause, or Redis out
        // of reach (a partition: the pod may have been replaced by a process
        // that takes the id once this claim lapses, see `claim_worker_id`).
        now_ms() < self.worker_renewed_ms.load(Ordering::Relaxed) + self.mint_window_ms()
    }

    fn id_floor(&self) -> u64 {
        crate::ids::first_id_at(self.id_floor_ms.load(Ordering::Relaxed))
    }

    fn sessions_unrecorded(&self) {
        self.mark_sessions_lost(false);
    }

    fn uses_redis(&self) -> bool {
        true
    }

    fn report_load(&self, load: GatewayLoad) {
        let mut current = self.load.lock().unwrap_or_else(|p| p.into_inner());
        let state_changed = current.as_ref().is_none_or(|old| old.ready != load.ready || old.draining != load.draining);
        *current = Some(load);
        drop(current);
        if state_changed {
            self.load_changed.notify_one();
        }
    }

    async fn publish_load_now(&self, load: GatewayLoad) {
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = Some(load);
        if let Err(e) = self.publish_load().await {
            tracing::warn!(error = %e, "could not publish this gateway's load; it goes out with the next renewal");
        }
    }

    async fn gateway_loads(&self) -> Result<Vec<GatewayLoad>, BrokerError> {
        {
            let cached = self.loads.read().await;
            if cached.0.elapsed() < Duration::from_secs(1) {
                return Ok(cached.1.clone());
            }
        }
        self.check_reachable()?;
        let alive = self.alive_gateways().await?;
        let all: HashMap<String, String> =
            self.conn().hgetall(wire::GATEWAY_LOADS).await.map_err(unavailable("reading gateway loads"))?;
        // Published within two intervals: a killed gateway leaves discovery
        // in seconds, not when its lease runs out (loads of gateways of an
        // earlier version carry no time and stay until then).
        let stale_before = now_ms() - 2 * i64::try_from(self.config.renew_every().as_millis()).unwrap_or(i64::MAX);
        let mut loads: Vec<GatewayLoad> = all
            .into_iter()
            .filter(|(gateway, _)| alive.contains(gateway))
            .filter_map(|(_, json)| serde_json::from_str::<GatewayLoad>(&json).ok())
            .filter(|load| load.published_at_ms == 0 || load.published_at_ms >= stale_before)
            .collect();
        loads.sort_by(|a, b| a.pod.cmp(&b.pod));
        *self.loads.write().await = (tokio::time::Instant::now(), loads.clone());
        Ok(loads)
    }

    fn resync_elsewhere(&self, users: &[String]) {
        self.owe_resync(users);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owed_resyncs_merge_and_overflow_into_everyone() {
        let mut owed = OwedResyncs::default();
        assert_eq!(owed.take(), None);
        owed.add(&["a".to_string(), "b".to_string()]);
        owed.add(&["a".to_string()]);
        let Some(ResyncScope::Users(mut users)) = owed.take() else { panic!("users owed") };
        users.sort();
        assert_eq!(users, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(owed.take(), None, "taken once");

        let many: Vec<String> = (0..=OwedResyncs::CAP).map(|n| format!("u{n}")).collect();
        owed.add(&many);
        assert_eq!(owed.take(), Some(ResyncScope::Everyone));
        owed.restore(ResyncScope::Users(vec!["c".into()]));
        owed.restore(ResyncScope::Everyone);
        assert_eq!(owed.take(), Some(ResyncScope::Everyone), "a failed publish is put back");
    }

    #[test]
    fn settling_takes_a_renewal_and_two_commands() {
        let config = RedisBrokerConfig {
            gateway_id: "gw-0".into(),
            lease: Duration::from_secs(30),
            command_timeout: Duration::from_secs(2),
            worker_id: None,
        };
        assert_eq!(config.renew_every(), Duration::from_secs(2));
        assert_eq!(config.settle_time(), Duration::from_secs(6));
        let short = RedisBrokerConfig { lease: Duration::from_secs(3), ..config };
        assert_eq!(short.renew_every(), Duration::from_secs(1));
    }
}
