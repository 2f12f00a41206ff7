//! The broker of a gateway cluster, on Redis: one server or a Redis
//! Cluster, one code path ([`kubechat_redis`]).
//!
//! Keys (names in [`wire`]). Whatever one script or pipeline touches shares
//! a hash tag, so each runs on one node of a cluster:
//! - `{control}`: what every gateway shares, in one slot: `gateways` (sorted
//!   set, gateway id → lease expiry, ms; a gateway renews every
//!   [`RedisBrokerConfig::renew_every`], one that stops is dead once its lease
//!   runs out), `epoch` (when Redis' data began, see [`wire::EPOCH`]),
//!   `registered` (gateway → the epoch its sessions were last registered
//!   for), `gateway-load`, and `reaping:{gateway}` while a reaper works.
//! - Per user, tagged with the user id: `sessions:{user}` (hash,
//!   `{gateway}|{device}` → connected-at, ms; written on transitions only,
//!   never per heartbeat; fields of dead gateways are ignored, then reaped)
//!   and `seen:{user}` (last time a session started or ended, ms).
//! - `gateway-sessions:{gateway}`: set of users with sessions there (for reaping).
//! - `worker-id:{n}`: the process holding id-generator worker id `n`.
//!
//! Channels are sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`): a message goes to
//! the master of its channel's slot only, where classic `PUBLISH` on a
//! cluster reaches every node. Each gateway listens on
//! [`wire::DELIVERY_PARTITIONS`] channels `deliver:{partition}:{gateway}`,
//! the partitions' tags spread evenly over the slots; a sender publishes on
//! the partition its own id picks, so forwards from one gateway to another
//! stay in order, and many senders spread over every master. A forward is
//! `user1,user2,…\n{frame}` (user ids never hold `,` or a newline; the frame
//! travels as is). `{control}:groups-changed` carries group ids whose
//! members changed; `{control}:resync` users whose forwards may have been lost.
//! [`upkeep`] holds one subscriber connection per master (see
//! `subscribe_loop`) and follows failovers and slot moves.
//!
//! Losing Redis (or a shard of it) degrades, never corrupts: commands time
//! out and fail (the chat layer still stores and acks), and [`upkeep`] brings
//! the gateway back: subscriptions, lease, sessions, and a `resync` for
//! everyone a forward may have missed (this gateway's connections, and the
//! recipients of forwards this gateway failed to send).

pub mod send_keys;
mod upkeep;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kubechat_redis::{Connection, Endpoint, SlotTags, query_by_slot};
use redis::AsyncCommands;
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Broker, BrokerError, Frame, GatewayLoad, LocalDelivery, RedisShardView, Routed};
use crate::ids::now_ms;
use wire::{ResyncScope, field_gateway, gateway_sessions_key, seen_key, sessions_key};

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

/// The shared state as [`wire::CONTROL_STATE_SCRIPT`] read it.
struct ControlState {
    epoch: i64,
    live: Arc<HashSet<String>>,
    unregistered: i64,
}

pub struct RedisBroker {
    config: RedisBrokerConfig,
    /// Where Redis is (and how to reach one of its nodes).
    endpoint: Endpoint,
    /// Where Redis was looked for (no password), for error messages.
    address: String,
    connection: Connection,
    /// The delivery partitions' hash tags.
    partitions: SlotTags,
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
    /// A Redis Cluster's masters as the subscriptions last found them.
    shards: Mutex<Vec<RedisShardView>>,
    /// Live gateways, read at most every second (routing, transitions and
    /// reaping; presence reads them afresh).
    /// Shared, not copied: every send reads it.
    alive: RwLock<(tokio::time::Instant, Arc<HashSet<String>>)>,
    control_state: redis::Script,
    begin_reap_script: redis::Script,
    end_reap_script: redis::Script,
    drop_sessions_script: redis::Script,
    renew_lease_script: redis::Script,
    renew_worker_script: redis::Script,
}

impl RedisBroker {
    /// Connects and starts the lease, subscription, repair and reaper tasks
    /// on `tasks`; they stop with `shutdown`.
    pub async fn start(
        endpoint: Endpoint,
        config: RedisBrokerConfig,
        local: Arc<dyn LocalDelivery>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BrokerError> {
        let endpoint = endpoint.with_timeout(config.command_timeout);
        let address = endpoint.describe();
        let connection = endpoint.connect().await.map_err(|e| BrokerError(e.to_string()))?;
        let partitions = wire::delivery_partitions();
        let broker = Arc::new(Self {
            config,
            endpoint,
            address,
            connection,
            partitions,
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
            alive: RwLock::new((tokio::time::Instant::now() - Duration::from_secs(60), Arc::default())),
            shards: Mutex::default(),
            control_state: redis::Script::new(wire::CONTROL_STATE_SCRIPT),
            begin_reap_script: redis::Script::new(wire::BEGIN_REAP_SCRIPT),
            end_reap_script: redis::Script::new(wire::END_REAP_SCRIPT),
            drop_sessions_script: redis::Script::new(wire::DROP_SESSIONS_SCRIPT),
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
        tasks.spawn(broker.clone().subscribe_loop(local.clone(), shutdown.clone()));
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

    fn conn(&self) -> Connection {
        self.connection.clone()
    }

    /// This gateway's delivery channels, one per partition.
    fn delivery_channels(&self) -> Vec<String> {
        self.partitions.iter().map(|tag| wire::deliver_channel(tag, &self.config.gateway_id)).collect()
    }

    /// The channel this gateway forwards to `gateway` on.
    fn channel_to(&self, gateway: &str) -> String {
        wire::forward_channel(&self.partitions, &self.config.gateway_id, gateway)
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

    /// Reads the shared state in one step and refreshes the epoch and the
    /// cache of live gateways from it.
    async fn read_control(&self) -> Result<ControlState, BrokerError> {
        let (epoch, live, unregistered): (i64, Vec<String>, i64) = self
            .control_state
            .key(wire::EPOCH)
            .key(wire::GATEWAYS)
            .key(wire::REGISTERED)
            .arg(now_ms())
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable("reading the gateways' leases"))?;
        self.epoch_ms.store(epoch, Ordering::Relaxed);
        let live: Arc<HashSet<String>> = Arc::new(live.into_iter().collect());
        *self.alive.write().await = (tokio::time::Instant::now(), live.clone());
        Ok(ControlState { epoch, live, unregistered })
    }

    /// For each user, the live gateways holding a session. Fails while a
    /// live gateway has not registered its sessions since Redis lost its
    /// data (up to [`RedisBrokerConfig::registration_deadline`] after it):
    /// its users would look offline.
    async fn live_sessions_of(&self, users: &[String]) -> Result<Vec<Vec<String>>, BrokerError> {
        let now = now_ms();
        let control = self.read_control().await?;
        let deadline = i64::try_from(self.config.registration_deadline().as_millis()).unwrap_or(i64::MAX);
        if control.unregistered > 0 && now < control.epoch.saturating_add(deadline) {
            return Err(BrokerError(format!(
                "Redis lost its data; {} gateway(s) still re-registering their sessions",
                control.unregistered
            )));
        }
        let sessions = self.sessions_of(users).await?;
        Ok(sessions
            .iter()
            .map(|fields| Self::live_gateways(fields, &control.live).into_iter().map(str::to_string).collect())
            .collect())
    }

    /// Gateways whose lease has not run out, as read within the last second.
    async fn alive_gateways(&self) -> Result<Arc<HashSet<String>>, BrokerError> {
        {
            let cached = self.alive.read().await;
            if cached.0.elapsed() < Duration::from_secs(1) {
                return Ok(cached.1.clone());
            }
        }
        Ok(self.read_control().await?.live)
    }

    /// As [`Self::alive_gateways`], read afresh when a session names a
    /// gateway the cache does not know: one that started within the second
    /// must not have its users taken for offline.
    async fn alive_including<'a>(
        &self,
        named: impl IntoIterator<Item = &'a str>,
    ) -> Result<Arc<HashSet<String>>, BrokerError> {
        let alive = self.alive_gateways().await?;
        let fresh = self.alive.read().await.0.elapsed() < Duration::from_millis(50);
        if !fresh && named.into_iter().any(|g| !alive.contains(g)) {
            return Ok(self.read_control().await?.live);
        }
        Ok(alive)
    }

    /// Session fields of each user (one pipeline per slot, concurrently).
    async fn sessions_of(&self, users: &[String]) -> Result<Vec<Vec<String>>, BrokerError> {
        self.read_per_user(users, "HKEYS", sessions_key, "reading sessions").await
    }

    /// `command key` for each user's key, in one pipeline per slot, the
    /// replies in the order of `users`.
    async fn read_per_user<T: redis::FromRedisValue>(
        &self,
        users: &[String],
        command: &str,
        key: fn(&str) -> String,
        what: &str,
    ) -> Result<Vec<T>, BrokerError> {
        let commands = users
            .iter()
            .map(|u| {
                let key = key(u);
                let cmd = redis::cmd(command).arg(&key).clone();
                (key, cmd)
            })
            .collect();
        let replies = query_by_slot(&self.connection, commands).await.map_err(unavailable(what))?;
        replies
            .into_iter()
            .map(|reply| redis::from_redis_value(reply).map_err(|e| BrokerError(format!("{what}: {e}"))))
            .collect()
    }

    /// Gateways (alive) holding a session of the user, from its fields.
    fn live_gateways<'a>(fields: &'a [String], alive: &HashSet<String>) -> HashSet<&'a str> {
        fields.iter().filter_map(|f| field_gateway(f)).filter(|g| alive.contains(*g)).collect()
    }

    /// Publishes `payload` on a sharded channel; returns how many listened.
    async fn spublish(&self, channel: &str, payload: &str) -> redis::RedisResult<i64> {
        redis::cmd("SPUBLISH").arg(channel).arg(payload).query_async(&mut self.conn()).await
    }

    /// Adds or removes this gateway's session of `user` (its slot) and keeps
    /// the gateway's user set in step (its own slot); returns the user's
    /// session fields as they were before.
    async fn write_session(&self, user: &str, device: &str, added: bool) -> Result<Vec<String>, BrokerError> {
        let field = format!("{}|{device}", self.config.gateway_id);
        let now = now_ms();
        let mut in_user_slot = redis::pipe();
        in_user_slot.hkeys(sessions_key(user));
        if added {
            in_user_slot.hset(sessions_key(user), &field, now).ignore();
        } else {
            in_user_slot.hdel(sessions_key(user), &field).ignore();
        }
        in_user_slot.set(seen_key(user), now).ignore();
        let set = gateway_sessions_key(&self.config.gateway_id);
        let (mut user_conn, mut set_conn) = (self.conn(), self.conn());
        let written = if added {
            // The gateway's set gains the user whatever the fields were: both at once.
            let (fields, listed) = futures::join!(
                in_user_slot.query_async::<(Vec<String>,)>(&mut user_conn),
                set_conn.sadd::<_, _, ()>(&set, user)
            );
            listed.and(fields)
        } else {
            in_user_slot.query_async::<(Vec<String>,)>(&mut user_conn).await
        };
        let (fields,) = written.map_err(|e| self.dirty(unavailable("writing a session")(e)))?;
        if !added {
            let mine = format!("{}|", self.config.gateway_id);
            let still_here = fields.iter().any(|f| f.starts_with(&mine) && *f != field);
            let listed: redis::RedisResult<()> =
                if still_here { set_conn.sadd(&set, user).await } else { set_conn.srem(&set, user).await };
            listed.map_err(|e| self.dirty(unavailable("writing a session")(e)))?;
        }
        Ok(fields)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    /// Looks the recipients' sessions up (one pipeline per slot), then
    /// publishes one forward per other gateway holding a recipient.
    async fn route(&self, users: &[String], frame: &Frame) -> Result<Routed, BrokerError> {
        let result = async {
            self.check_reachable()?;
            let sessions = self.sessions_of(users).await?;
            let mut alive = self.alive_including(sessions.iter().flatten().filter_map(|f| field_gateway(f))).await?;
            // "Offline" owes a push notification: decided on leases and an
            // epoch at most 100 ms old (a Redis that just lost its data makes
            // it a guess, see `Routed::unsettled_for`). At most ten reads of
            // the shared slot a second per gateway, whatever the send rate.
            let someone_offline = sessions.iter().any(|fields| Self::live_gateways(fields, &alive).is_empty());
            if someone_offline && self.alive.read().await.0.elapsed() > Duration::from_millis(100) {
                alive = self.read_control().await?.live;
            }
            let mut offline = HashSet::new();
            let mut by_gateway: HashMap<&str, Vec<String>> = HashMap::new();
            for (user, fields) in users.iter().zip(&sessions) {
                let live = Self::live_gateways(fields, &alive);
                if live.is_empty() {
                    offline.insert(user.clone());
                }
                for gateway in live.into_iter().filter(|g| *g != self.config.gateway_id) {
                    by_gateway.entry(gateway).or_default().push(user.clone());
                }
            }
            let forwards = by_gateway.iter().map(|(gateway, recipients)| async move {
                let payload = wire::encode_forward(recipients, frame);
                (recipients, self.spublish(&self.channel_to(gateway), &payload).await)
            });
            let mut failed = None;
            for (recipients, published) in futures::future::join_all(forwards).await {
                match published {
                    // Their gateway is reconnecting to Redis: they resync once it is back.
                    Ok(0) => self.owe_resync(recipients),
                    Ok(_) => {}
                    Err(e) => {
                        self.owe_resync(recipients);
                        failed = Some(unavailable("forwarding")(e));
                    }
                }
            }
            if let Some(error) = failed {
                return Err(error);
            }
            Ok(Routed { offline, unsettled_for: self.unsettled_for() })
        }
        .await;
        if result.is_err() {
            self.owe_resync(users);
        }
        result
    }

    async fn session_added(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
        self.check_reachable().map_err(|e| self.dirty(e))?;
        let fields = self.write_session(user, device, true).await?;
        let field = format!("{}|{device}", self.config.gateway_id);
        let others: Vec<String> = fields.into_iter().filter(|f| *f != field).collect();
        let alive = self.alive_including(others.iter().filter_map(|f| field_gateway(f))).await?;
        Ok(Self::live_gateways(&others, &alive).is_empty())
    }

    async fn session_removed(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
        self.check_reachable().map_err(|e| self.dirty(e))?;
        let fields = self.write_session(user, device, false).await?;
        let field = format!("{}|{device}", self.config.gateway_id);
        let left: Vec<String> = fields.into_iter().filter(|f| *f != field).collect();
        let alive = self.alive_gateways().await?;
        Ok(Self::live_gateways(&left, &alive).is_empty())
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
        self.read_per_user(users, "GET", seen_key, "reading last seen").await
    }

    async fn group_changed(&self, group: &str) -> Result<(), BrokerError> {
        self.check_reachable()?;
        self.spublish(wire::GROUPS_CHANGED, group).await.map_err(unavailable("announcing a membership change"))?;
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

    fn redis_shards(&self) -> Vec<RedisShardView> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
