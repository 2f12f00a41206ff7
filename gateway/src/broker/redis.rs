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
//! - Pub/sub channel `deliver:{gateway}`: `{"users":[…],"frame":"…"}`, each
//!   gateway subscribed to its own.
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
use serde::{Deserialize, Serialize};
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

#[derive(Serialize, Deserialize)]
struct Forward {
    users: Vec<String>,
    frame: String,
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
}

fn unavailable(what: &str) -> impl Fn(redis::RedisError) -> BrokerError + '_ {
    move |e| BrokerError(format!("{what}: {e}"))
}

pub struct RedisBroker {
    config: RedisBrokerConfig,
    connection: ConnectionManager,
    subscribed: AtomicBool,
    lease_ok: AtomicBool,
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
            alive: RwLock::new((tokio::time::Instant::now() - Duration::from_secs(60), HashSet::new())),
        });
        broker.renew_lease().await?;
        tasks.spawn(broker.clone().keep_lease(shutdown.clone()));
        tasks.spawn(broker.clone().subscribe_loop(client, local.clone(), shutdown.clone()));
        tasks.spawn(broker.clone().reap_loop(local, shutdown));
        Ok(broker)
    }

    fn conn(&self) -> ConnectionManager {
        self.connection.clone()
    }

    async fn renew_lease(&self) -> Result<(), BrokerError> {
        let expiry = now_ms() + i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let result: Result<(), _> = self.conn().zadd(GATEWAYS, &self.config.gateway_id, expiry).await;
        self.lease_ok.store(result.is_ok(), Ordering::Relaxed);
        result.map_err(unavailable("renewing the gateway lease"))
    }

    async fn keep_lease(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.config.lease / 3;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.renew_lease().await {
                tracing::warn!(error = %e, "gateway lease not renewed");
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
                pubsub.subscribe(&channel).await?;
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
                            match serde_json::from_str::<Forward>(&payload) {
                                Ok(forward) => local.deliver_local(&forward.users, &Frame::from(forward.frame)),
                                Err(e) => tracing::warn!(error = %e, "malformed forward ignored"),
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

    /// After Redis lost data (a restart), put this gateway's sessions back.
    async fn reregister(&self, local: &dyn LocalDelivery) {
        let _ = self.renew_lease().await;
        for (user, device) in local.local_sessions() {
            if let Err(e) = self.session_added(&user, &device).await {
                tracing::warn!(error = %e, "could not re-register sessions");
                return;
            }
        }
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
                let payload = serde_json::to_string(&Forward { users, frame: frame.to_string() })
                    .map_err(|e| BrokerError(e.to_string()))?;
                pipe.publish(deliver_channel(gateway), payload).ignore();
            }
            let _: () = pipe.query_async(&mut self.conn()).await.map_err(unavailable("forwarding"))?;
        }
        Ok(offline)
    }

    async fn session_added(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
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
            .map_err(unavailable("registering a session"))?;
        let alive = self.alive_gateways().await?;
        let others: Vec<String> = fields.into_iter().filter(|f| *f != field).collect();
        Ok(Self::live_gateways(&others, &alive).is_empty())
    }

    async fn session_removed(&self, user: &str, device: &str) -> Result<bool, BrokerError> {
        let field = format!("{}|{device}", self.config.gateway_id);
        let (fields,): (Vec<String>,) = redis::pipe()
            .hdel(sessions_key(user), &field)
            .ignore()
            .hkeys(sessions_key(user))
            .set(seen_key(user), now_ms())
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable("removing a session"))?;
        let prefix = format!("{}|", self.config.gateway_id);
        if !fields.iter().any(|f| f.starts_with(&prefix)) {
            let _: () = self
                .conn()
                .srem(gateway_sessions_key(&self.config.gateway_id), user)
                .await
                .map_err(unavailable("removing a session"))?;
        }
        let alive = self.alive_gateways().await?;
        Ok(Self::live_gateways(&fields, &alive).is_empty())
    }

    async fn online(&self, users: &[String]) -> Result<HashSet<String>, BrokerError> {
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

    fn healthy(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed) && self.lease_ok.load(Ordering::Relaxed)
    }
}
