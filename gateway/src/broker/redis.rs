//! The broker of a gateway cluster, on Redis.
//!
//! Keys (all under `kubechat:`):
//! - `gateways`: sorted set, gateway id → lease expiry (ms). A gateway
//!   renews its lease every third of its length; one that stops renewing
//!   (SIGKILL, partition) is dead once the lease runs out.
//! - `sessions:{user}`: hash, `{gateway}|{device}` → connected-at (ms).
//!   Written on transitions only (a device's session starts or ends here),
//!   never per heartbeat. Entries of dead gateways are ignored, then reaped.
//! - `gateway-sessions:{gateway}`: set of users with sessions there (for reaping).
//! - `seen:{user}`: last time a session of the user started or ended (ms).
//! - Pub/sub channel `deliver:{gateway}`: `user1,user2,…\n{frame}`, each
//!   gateway subscribed to its own. User ids never hold `,` or a newline, and
//!   the frame travels as is (no second JSON encoding).
//! - Pub/sub channel `groups-changed`: a group id whose members changed;
//!   every gateway subscribes and drops its cached members of that group.
//!
//! Losing Redis degrades, never corrupts: commands time out and fail (the
//! chat layer still stores and acks), the subscription is re-established
//! with backoff, and on recovery this gateway re-registers its sessions and
//! tells its clients to resync, since forwards may have been lost meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Broker, BrokerError, Frame, LocalDelivery};
use crate::ids::now_ms;

const GATEWAYS: &str = "kubechat:gateways";
fn sessions_key(user: &str) -> String {
    format!("kubechat:sessions:{user}")
}
fn gateway_sessions_key(gateway: &str) -> String {
    format!("kubechat:gateway-sessions:{gateway}")
}
fn seen_key(user: &str) -> String {
    format!("kubechat:seen:{user}")
}
fn deliver_channel(gateway: &str) -> String {
    format!("kubechat:deliver:{gateway}")
}
const GROUPS_CHANGED: &str = "kubechat:groups-changed";

/// A forward on the wire: the recipients, a newline, the encoded frame.
fn encode_forward(users: &[String], frame: &Frame) -> String {
    let mut payload = users.join(",");
    payload.push('\n');
    payload.push_str(frame.as_str());
    payload
}

fn decode_forward(payload: String) -> Option<(Vec<String>, Frame)> {
    let (users, frame) = payload.split_once('\n')?;
    let users = users.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect();
    Some((users, Frame::from(frame.to_string())))
}

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

fn worker_key(worker_id: u16) -> String {
    format!("kubechat:worker-id:{worker_id}")
}

fn unavailable(what: &str) -> impl Fn(redis::RedisError) -> BrokerError + '_ {
    move |e| BrokerError(format!("{what}: {e}"))
}

pub struct RedisBroker {
    config: RedisBrokerConfig,
    connection: ConnectionManager,
    subscribed: AtomicBool,
    lease_ok: AtomicBool,
    /// A session change failed to reach Redis: this gateway's sessions there
    /// must be reconciled with the local ones once Redis answers again.
    sessions_dirty: AtomicBool,
    /// Live gateways, refreshed at most every second.
    alive: RwLock<(tokio::time::Instant, HashSet<String>)>,
}

impl RedisBroker {
    /// Connects and starts the lease, subscription and reaper tasks on
    /// `tasks`; they stop with `shutdown`.
    pub async fn start(
        client: redis::Client,
        config: RedisBrokerConfig,
        local: Arc<dyn LocalDelivery>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BrokerError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.command_timeout))
            .set_connection_timeout(Some(config.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let connection = ConnectionManager::new_with_config(client.clone(), manager_config)
            .await
            .map_err(unavailable("connecting to Redis"))?;
        let broker = Arc::new(Self {
            config,
            connection,
            subscribed: AtomicBool::new(false),
            lease_ok: AtomicBool::new(false),
            sessions_dirty: AtomicBool::new(false),
            alive: RwLock::new((tokio::time::Instant::now() - Duration::from_secs(60), HashSet::new())),
        });
        broker.claim_worker_id().await?;
        broker.renew_lease().await?;
        tasks.spawn(broker.clone().keep_lease(local.clone(), shutdown.clone()));
        tasks.spawn(broker.clone().subscribe_loop(client, local.clone(), shutdown.clone()));
        tasks.spawn(broker.clone().reap_loop(local, shutdown));
        // Forwards published before the subscription exists would be lost.
        let started = tokio::time::Instant::now();
        while !broker.subscribed.load(Ordering::Relaxed) && started.elapsed() < broker.config.command_timeout {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(broker)
    }

    /// Fails at once while Redis is known to be unreachable, instead of
    /// making every send and connect wait for a command timeout.
    fn check_healthy(&self) -> Result<(), BrokerError> {
        if self.healthy() { Ok(()) } else { Err(BrokerError("Redis unreachable (degraded)".into())) }
    }

    /// Remembers that Redis missed a session change.
    fn dirty(&self, error: BrokerError) -> BrokerError {
        self.sessions_dirty.store(true, Ordering::Relaxed);
        error
    }

    fn conn(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// Refuses to start when a live gateway of another name holds the worker id.
    async fn claim_worker_id(&self) -> Result<(), BrokerError> {
        let Some(worker_id) = self.config.worker_id else { return Ok(()) };
        let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        let claimed: Option<String> = redis::cmd("SET")
            .arg(worker_key(worker_id))
            .arg(&self.config.gateway_id)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable("claiming the worker id"))?;
        if claimed.is_some() {
            return Ok(());
        }
        let holder: Option<String> =
            self.conn().get(worker_key(worker_id)).await.map_err(unavailable("reading the worker id's holder"))?;
        match holder {
            // A restart of this same gateway (same pod name) takes its id back.
            Some(holder) if holder != self.config.gateway_id => Err(BrokerError(format!(
                "worker id {worker_id} is held by the live gateway {holder:?} (its claim lapses {:?} after it stops); \
                 every gateway needs its own worker id (KUBECHAT_WORKER_ID)",
                self.config.lease
            ))),
            _ => Ok(()),
        }
    }

    async fn renew_lease(&self) -> Result<(), BrokerError> {
        let expiry = now_ms() + i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        pipe.zadd(GATEWAYS, &self.config.gateway_id, expiry).ignore();
        if let Some(worker_id) = self.config.worker_id {
            let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
            pipe.cmd("SET").arg(worker_key(worker_id)).arg(&self.config.gateway_id).arg("PX").arg(lease_ms).ignore();
        }
        let result: Result<(), _> = pipe.query_async(&mut self.conn()).await;
        self.lease_ok.store(result.is_ok(), Ordering::Relaxed);
        result.map_err(unavailable("renewing the gateway lease"))
    }

    async fn keep_lease(self: Arc<Self>, local: Arc<dyn LocalDelivery>, shutdown: CancellationToken) {
        let every = (self.config.lease / 3).min(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            match self.renew_lease().await {
                Err(e) => tracing::warn!(error = %e, "gateway lease not renewed"),
                Ok(()) if self.sessions_dirty.load(Ordering::Relaxed) => self.reregister(local.as_ref()).await,
                Ok(()) => {}
            }
        }
        // The lease is left to expire: the reaper then ends this gateway's
        // sessions exactly as after a crash (after the offline timeout).
    }

    /// Subscribes to this gateway's channel; on any failure backs off (with
    /// jitter) and subscribes again, then re-registers sessions and asks
    /// clients to resync.
    async fn subscribe_loop(
        self: Arc<Self>,
        client: redis::Client,
        local: Arc<dyn LocalDelivery>,
        shutdown: CancellationToken,
    ) {
        let channel = deliver_channel(&self.config.gateway_id);
        let mut delay = Duration::from_millis(100);
        let mut first = true;
        while !shutdown.is_cancelled() {
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&[channel.as_str(), GROUPS_CHANGED]).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = match tokio::time::timeout(self.config.command_timeout, subscribed).await {
                Ok(Ok(pubsub)) => pubsub,
                failed => {
                    self.subscribed.store(false, Ordering::Relaxed);
                    tracing::warn!(?delay, error = ?failed.err(), "Redis subscription failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(jittered(delay)) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            self.subscribed.store(true, Ordering::Relaxed);
            if !first {
                tracing::info!("Redis subscription restored");
                self.reregister(local.as_ref()).await;
                local.resync_all("live delivery was interrupted");
            }
            first = false;
            let mut messages = pubsub.into_on_message();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    message = messages.next() => match message {
                        Some(message) => {
                            let Ok(payload) = message.get_payload::<String>() else { continue };
                            if message.get_channel_name() == GROUPS_CHANGED {
                                local.group_changed(&payload);
                                continue;
                            }
                            match decode_forward(payload) {
                                Some((users, frame)) => local.deliver_local(&users, &frame),
                                None => tracing::warn!("malformed forward ignored"),
                            }
                        }
                        None => break,
                    },
                }
            }
            self.subscribed.store(false, Ordering::Relaxed);
            tracing::warn!("Redis subscription lost");
        }
    }

    /// Makes this gateway's sessions in Redis match the local ones: after
    /// Redis lost data (a restart) or missed changes (an outage). Sessions
    /// that ended meanwhile are removed, and users left with none anywhere
    /// are announced offline.
    async fn reregister(&self, local: &dyn LocalDelivery) {
        self.sessions_dirty.store(false, Ordering::Relaxed);
        let before: HashSet<(String, String)> = local.local_sessions().into_iter().collect();
        match self.reconcile_sessions(local, &before).await {
            Err(e) => {
                self.sessions_dirty.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, "could not re-register sessions; will retry");
            }
            // A session that ended while this ran may have been written back: go again.
            Ok(()) if before != local.local_sessions().into_iter().collect() => {
                self.sessions_dirty.store(true, Ordering::Relaxed);
            }
            Ok(()) => {}
        }
    }

    async fn reconcile_sessions(
        &self,
        local: &dyn LocalDelivery,
        sessions_here: &HashSet<(String, String)>,
    ) -> Result<(), BrokerError> {
        self.renew_lease().await?;
        let mine = format!("{}|", self.config.gateway_id);
        let mut devices_here: HashMap<String, HashSet<String>> = HashMap::new();
        for (user, device) in sessions_here {
            devices_here.entry(user.clone()).or_default().insert(device.clone());
        }
        let mut users: HashSet<String> = self
            .conn()
            .smembers(gateway_sessions_key(&self.config.gateway_id))
            .await
            .map_err(unavailable("reading this gateway's sessions"))?;
        users.extend(devices_here.keys().cloned());
        let users: Vec<String> = users.into_iter().collect();
        let alive = self.alive_gateways().await?;
        let now = now_ms();
        for chunk in users.chunks(500) {
            let sessions = self.sessions_of(chunk).await?;
            let mut pipe = redis::pipe();
            let mut gone = Vec::new();
            for (user, fields) in chunk.iter().zip(&sessions) {
                let here = devices_here.get(user);
                let is_here = |device: &str| here.is_some_and(|devices| devices.contains(device));
                let (stale, left): (Vec<&String>, Vec<&String>) =
                    fields.iter().partition(|f| f.strip_prefix(&mine).is_some_and(|device| !is_here(device)));
                if !stale.is_empty() {
                    pipe.hdel(sessions_key(user), stale).ignore();
                }
                for device in here.into_iter().flatten() {
                    pipe.hset(sessions_key(user), format!("{mine}{device}"), now).ignore();
                }
                if here.is_some() {
                    pipe.sadd(gateway_sessions_key(&self.config.gateway_id), user).ignore();
                } else {
                    pipe.srem(gateway_sessions_key(&self.config.gateway_id), user).ignore();
                    let left: Vec<String> = left.into_iter().cloned().collect();
                    if fields.len() != left.len() && Self::live_gateways(&left, &alive).is_empty() {
                        pipe.set(seen_key(user), now).ignore();
                        gone.push(user.clone());
                    }
                }
            }
            let _: () = pipe.query_async(&mut self.conn()).await.map_err(unavailable("re-registering sessions"))?;
            gone.into_iter().for_each(|user| local.remote_user_offline(user));
        }
        Ok(())
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

    /// Removes dead gateways' sessions; users left with none went offline.
    async fn reap_loop(self: Arc<Self>, local: Arc<dyn LocalDelivery>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            if let Err(e) = self.reap_once(local.as_ref()).await {
                tracing::debug!(error = %e, "reaping skipped");
            }
        }
    }

    async fn reap_once(&self, local: &dyn LocalDelivery) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let dead: Vec<String> =
            conn.zrangebyscore(GATEWAYS, "-inf", now_ms()).await.map_err(unavailable("listing dead gateways"))?;
        for gateway in dead.into_iter().filter(|g| *g != self.config.gateway_id) {
            // One reaper per dead gateway.
            let won: bool = redis::cmd("SET")
                .arg(format!("kubechat:reap:{gateway}"))
                .arg(&self.config.gateway_id)
                .arg("NX")
                .arg("PX")
                .arg(30_000)
                .query_async::<Option<String>>(&mut conn)
                .await
                .map_err(unavailable("locking a reap"))?
                .is_some();
            if !won {
                continue;
            }
            let users: Vec<String> =
                conn.smembers(gateway_sessions_key(&gateway)).await.map_err(unavailable("reading a dead gateway"))?;
            let alive = self.alive_gateways().await?;
            for user in users {
                let fields: Vec<String> =
                    conn.hkeys(sessions_key(&user)).await.map_err(unavailable("reading sessions"))?;
                let prefix = format!("{gateway}|");
                let stale: Vec<&String> = fields.iter().filter(|f| f.starts_with(&prefix)).collect();
                if !stale.is_empty() {
                    let _: () =
                        conn.hdel(sessions_key(&user), stale).await.map_err(unavailable("removing sessions"))?;
                }
                if Self::live_gateways(&fields, &alive).is_empty() {
                    let _: () =
                        conn.set(seen_key(&user), now_ms()).await.map_err(unavailable("recording last seen"))?;
                    local.remote_user_offline(user);
                }
            }
            let _: () =
                conn.del(gateway_sessions_key(&gateway)).await.map_err(unavailable("clearing a dead gateway"))?;
            let _: () = conn.zrem(GATEWAYS, &gateway).await.map_err(unavailable("removing a dead gateway"))?;
            tracing::info!(%gateway, "reaped a dead gateway's sessions");
        }
        Ok(())
    }
}

/// `delay` stretched by up to +50%, so reconnecting gateways spread out.
fn jittered(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    delay.mul_f64(1.0 + f64::from(nanos % 500) / 1000.0)
}

#[async_trait]
impl Broker for RedisBroker {
    async fn route(&self, users: &[String], frame: &Frame) -> Result<HashSet<String>, BrokerError> {
        self.check_healthy()?;
        let alive = self.alive_gateways().await?;
        let sessions = self.sessions_of(users).await?;
        let mut by_gateway: HashMap<&str, Vec<String>> = HashMap::new();
        let mut offline = HashSet::new();
        for (user, fields) in users.iter().zip(&sessions) {
            let gateways = Self::live_gateways(fields, &alive);
            if gateways.is_empty() {
                offline.insert(user.clone());
            }
            for gateway in gateways.into_iter().filter(|g| *g != self.config.gateway_id) {
                by_gateway.entry(gateway).or_default().push(user.clone());
            }
        }
        if !by_gateway.is_empty() {
            let mut pipe = redis::pipe();
            for (gateway, users) in by_gateway {
                pipe.publish(deliver_channel(gateway), encode_forward(&users, frame)).ignore();
            }
            let _: () = pipe.query_async(&mut self.conn()).await.map_err(unavailable("forwarding"))?;
        }
        Ok(offline)
    }

    async fn session_added(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
        self.check_healthy().map_err(|e| self.dirty(e))?;
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
        self.check_healthy().map_err(|e| self.dirty(e))?;
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
        self.check_healthy()?;
        let alive = self.alive_gateways().await?;
        let sessions = self.sessions_of(users).await?;
        Ok(users
            .iter()
            .zip(&sessions)
            .filter(|(_, fields)| !Self::live_gateways(fields, &alive).is_empty())
            .map(|(u, _)| u.clone())
            .collect())
    }

    async fn last_active(&self, users: &[String]) -> Result<Vec<Option<i64>>, BrokerError> {
        self.check_healthy()?;
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
        self.check_healthy()?;
        let _: () =
            self.conn().publish(GROUPS_CHANGED, group).await.map_err(unavailable("announcing a membership change"))?;
        Ok(())
    }

    fn healthy(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed) && self.lease_ok.load(Ordering::Relaxed)
    }
}
