//! The Redis broker's background work: the lease and the worker id, the
//! subscription, repairs after Redis lost data or changes, and reaping dead
//! gateways.
//!
//! Repair order matters: sessions are re-registered *before* this gateway's
//! connections are told to resync, so a message routed after their sync
//! finds their sessions and is forwarded, and one routed before it is in the
//! inbox they sync from. Forwards this gateway failed to send are owed to
//! their recipients as a `resync` notice on the `resync` channel, published
//! once Redis answers again: a gateway subscribed then acts on it, and one
//! that is not resyncs all its connections once it is.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use super::wire::{
    self, EPOCH, GATEWAYS, GROUPS_CHANGED, REGISTERED, RESYNC, ResyncScope, WorkerClaim, deliver_channel,
    gateway_sessions_key, seen_key, sessions_key, worker_key,
};
use super::{RedisBroker, unavailable};
use crate::broker::{BrokerError, LocalDelivery};
use crate::ids::now_ms;

/// Retry delays while Redis does not answer: 100 ms doubling to 1 s, with
/// jitter so that gateways do not all come back in the same instant.
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Users a reaper takes per atomic step (bounds how long Redis is busy with one).
const REAP_CHUNK: usize = 500;

/// How long a worker-id key outlives its claim: a successor reads its
/// predecessor's `until` from it.
const WORKER_CLAIM_KEPT_MS: i64 = 24 * 3600 * 1000;

/// What renewing the worker-id claim found.
enum Claim {
    /// This process holds it now; `previous` held it before (if anyone did).
    Mine { previous: Option<WorkerClaim> },
    /// Another process holds a live claim.
    Held(WorkerClaim),
}

impl RedisBroker {
    fn lease_ms(&self) -> i64 {
        i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// How long after a renewal started this gateway may mint: its lease,
    /// less a margin for clocks that disagree (a tenth, at most a second).
    pub(super) fn mint_window_ms(&self) -> i64 {
        let lease = self.lease_ms();
        lease - (lease / 10).min(1000)
    }

    /// Claims the worker id before the gateway serves. A live claim of
    /// another pod name is a configuration error (two pods, one id): refused.
    /// A live claim of this pod name is a predecessor (a crash, a force-
    /// deleted pod maybe still running somewhere): it is waited out, at most
    /// a lease, and its `until` becomes the floor of this process's ids.
    pub(super) async fn claim_worker_id(&self) -> Result<(), BrokerError> {
        let Some(worker_id) = self.config.worker_id else { return Ok(()) };
        let give_up = tokio::time::Instant::now() + self.config.lease + self.config.renew_every();
        let mut waited = false;
        loop {
            let claim = self
                .renew_worker_id(worker_id)
                .await
                .map_err(|e| BrokerError(format!("{e} (Redis at {})", self.address)))?;
            let holder = match claim {
                Claim::Mine { previous } => {
                    let floor = previous.and_then(|p| p.until_ms).unwrap_or(0);
                    self.id_floor_ms.store(floor, Ordering::Relaxed);
                    if waited {
                        tracing::info!(
                            worker_id,
                            floor_ms = floor,
                            "the previous holder's claim lapsed; worker id taken"
                        );
                    }
                    return Ok(());
                }
                Claim::Held(holder) => holder,
            };
            let predecessor = holder.gateway == self.config.gateway_id;
            if !predecessor || tokio::time::Instant::now() >= give_up {
                return Err(BrokerError(format!(
                    "worker id {worker_id} is held by the live gateway {:?} (its claim lapses {:?} after it stops); \
                     every gateway needs its own worker id (KUBECHAT_WORKER_ID)",
                    holder.gateway, self.config.lease
                )));
            }
            if !waited {
                tracing::warn!(
                    worker_id,
                    until_ms = holder.until_ms,
                    "an earlier process of this gateway still holds the worker id; waiting for its claim to lapse"
                );
                waited = true;
            }
            let left = holder.until_ms.map_or(100, |until| (until - now_ms()).clamp(10, 1000));
            tokio::time::sleep(Duration::from_millis(left.unsigned_abs())).await;
        }
    }

    /// Extends this process's claim on its worker id for a lease if it
    /// still holds it (or nobody does).
    async fn renew_worker_id(&self, worker_id: u16) -> Result<Claim, BrokerError> {
        let started = now_ms();
        let (status, value): (i64, String) = self
            .renew_worker_script
            .key(worker_key(worker_id))
            .arg(&self.config.gateway_id)
            .arg(&self.instance)
            .arg(started)
            .arg(started + self.lease_ms())
            .arg(WORKER_CLAIM_KEPT_MS)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable("renewing the worker id"))?;
        let mine = status == 1;
        if mine {
            self.worker_renewed_ms.store(started, Ordering::Relaxed);
        }
        let was_lost = self.worker_lost.swap(!mine, Ordering::Relaxed);
        match (was_lost, mine) {
            (false, false) => tracing::error!(
                worker_id,
                holder = %value,
                "another gateway holds this gateway's worker id: sends refused and readiness failed until it is free again"
            ),
            (true, true) => tracing::info!(worker_id, "worker id held again; minting ids"),
            _ => {}
        }
        Ok(if mine {
            Claim::Mine { previous: (!value.is_empty()).then(|| WorkerClaim::parse(&value)) }
        } else {
            Claim::Held(WorkerClaim::parse(&value))
        })
    }

    /// At shutdown: stop minting, and end the claim a second from now so a
    /// successor of this pod starts at once instead of a lease later.
    pub(super) async fn release_worker_id(&self) {
        let Some(worker_id) = self.config.worker_id else { return };
        self.worker_lost.store(true, Ordering::Relaxed);
        let now = now_ms();
        let released: Result<(i64, String), _> = self
            .renew_worker_script
            .key(worker_key(worker_id))
            .arg(&self.config.gateway_id)
            .arg(&self.instance)
            .arg(now)
            .arg(now + 1000)
            .arg(WORKER_CLAIM_KEPT_MS)
            .invoke_async(&mut self.conn())
            .await;
        if let Err(e) = released {
            tracing::warn!(worker_id, error = %e, "worker id not released; a successor waits for the claim to lapse");
        }
    }

    /// Renews the lease (and the worker id). Finding its own lease entry
    /// missing means Redis lost its data (or reaped this gateway after a
    /// pause): the sessions are registered again and everyone here resyncs.
    pub(super) async fn renew_lease(&self) -> Result<(), BrokerError> {
        let now = now_ms();
        let wrote_before = self.lease_written.load(Ordering::Relaxed);
        let result: Result<(i64, i64), _> = self
            .renew_lease_script
            .key(GATEWAYS)
            .key(EPOCH)
            .key(REGISTERED)
            .arg(&self.config.gateway_id)
            .arg(now + self.lease_ms())
            .arg(i32::from(wrote_before))
            .arg(now)
            .invoke_async(&mut self.conn())
            .await;
        self.lease_ok.store(result.is_ok(), Ordering::Relaxed);
        let (lost, epoch) = result.map_err(unavailable("renewing the gateway lease"))?;
        self.epoch_ms.store(epoch, Ordering::Relaxed);
        self.lease_written.store(true, Ordering::Relaxed);
        if lost == 1 {
            tracing::warn!(
                "this gateway's lease was missing or had lapsed in Redis (data lost, or reaped after a pause); \
                 re-registering sessions"
            );
            self.mark_sessions_lost(true);
        }
        if let Some(worker_id) = self.config.worker_id {
            self.renew_worker_id(worker_id).await?;
        }
        Ok(())
    }

    pub(super) async fn keep_lease(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.config.renew_every();
        let mut failing = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
                // Draining or readiness changed: discovery should know now.
                () = self.load_changed.notified() => {
                    let _ = self.publish_load().await;
                    continue;
                }
            }
            match self.renew_lease().await.and(self.publish_load().await) {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "gateway lease not renewed; retrying every {every:?}");
                }
                Err(_) => {}
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("gateway lease renewed again");
                }
                Ok(()) => {}
            }
        }
        // The lease is left to expire: the reaper then ends this gateway's
        // sessions exactly as after a crash (after the offline timeout).
        self.release_worker_id().await;
    }

    /// Writes this gateway's last reported load for discovery.
    pub(super) async fn publish_load(&self) -> Result<(), BrokerError> {
        let Some(mut load) = self.load.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return Ok(()) };
        load.published_at_ms = now_ms();
        let json = serde_json::to_string(&load).map_err(|e| BrokerError(format!("encoding the load: {e}")))?;
        let _: () = self
            .conn()
            .hset(wire::GATEWAY_LOADS, &self.config.gateway_id, json)
            .await
            .map_err(unavailable("publishing the gateway load"))?;
        Ok(())
    }

    /// Subscribes to this gateway's channel, membership changes and resync
    /// notices; on any failure retries (see [`retry_delays`]). A subscription
    /// that returns means forwards may have been lost: the repair task
    /// re-registers sessions, then asks every connection to resync.
    pub(super) async fn subscribe_loop(
        self: Arc<Self>,
        client: redis::Client,
        local: Arc<dyn LocalDelivery>,
        shutdown: CancellationToken,
    ) {
        let channel = deliver_channel(&self.config.gateway_id);
        let mut delays = retry_delays();
        let mut first = true;
        let mut failures = 0_u32;
        while !shutdown.is_cancelled() {
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&[channel.as_str(), GROUPS_CHANGED, RESYNC]).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = match tokio::time::timeout(self.config.command_timeout, subscribed).await {
                Ok(Ok(pubsub)) => pubsub,
                failed => {
                    self.subscribed.store(false, Ordering::Relaxed);
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", self.config.command_timeout),
                    };
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    failures += 1;
                    // The first failure and then one line in ten: an outage is not a log flood.
                    if failures % 10 == 1 {
                        tracing::warn!(redis = %self.address, failures, ?delay, %error, "Redis subscription failed; retrying");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            delays = retry_delays();
            self.subscribed.store(true, Ordering::Relaxed);
            if !first {
                tracing::info!(failures, "Redis subscription restored");
                self.mark_sessions_lost(true);
            }
            first = false;
            failures = 0;
            let mut messages = pubsub.into_on_message();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    message = messages.next() => match message {
                        Some(message) => self.on_message(&message, local.as_ref()),
                        None => break,
                    },
                }
            }
            self.subscribed.store(false, Ordering::Relaxed);
            tracing::warn!(redis = %self.address, "Redis subscription lost");
        }
    }

    fn on_message(&self, message: &redis::Msg, local: &dyn LocalDelivery) {
        let Ok(payload) = message.get_payload::<String>() else { return };
        match message.get_channel_name() {
            GROUPS_CHANGED => local.group_changed(&payload),
            RESYNC => match wire::decode_resync(&payload) {
                // This gateway delivered those messages to its own connections.
                Some((from, _)) if from == self.config.gateway_id => {}
                Some((_, ResyncScope::Everyone)) => local.resync_all("another gateway could not forward messages"),
                Some((_, ResyncScope::Users(users))) => {
                    local.resync_users(&users, "another gateway could not forward messages");
                }
                None => tracing::warn!("malformed resync notice ignored"),
            },
            _ => match wire::decode_forward(payload) {
                Some((users, frame)) => local.deliver_local(&users, &frame),
                None => tracing::warn!("malformed forward ignored"),
            },
        }
    }

    /// Re-registers sessions and publishes owed resyncs whenever needed,
    /// retrying until Redis answers.
    pub(super) async fn repair_loop(self: Arc<Self>, local: Arc<dyn LocalDelivery>, shutdown: CancellationToken) {
        let mut delays = retry_delays();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.repair.notified() => {}
            }
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                match self.repair_once(local.as_ref()).await {
                    Ok(()) => {
                        delays = retry_delays();
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "repair pending");
                        let delay = delays.next().unwrap_or(Duration::from_secs(1));
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    }

    async fn repair_once(&self, local: &dyn LocalDelivery) -> Result<(), BrokerError> {
        // Forwards to this gateway are lost until it is subscribed again.
        if !self.subscribed.load(Ordering::Relaxed) {
            return Err(BrokerError("not subscribed".into()));
        }
        if self.sessions_lost.load(Ordering::Relaxed) {
            let readded = self.reregister(local).await?;
            if self.resync_everyone.swap(false, Ordering::Relaxed) {
                local.resync_all("live delivery was interrupted");
            } else if !readded.is_empty() {
                // Messages routed while their sessions were missing were not forwarded.
                local.resync_users(&readded, "live delivery was interrupted");
            }
        }
        let owed = self.owed.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(scope) = owed {
            let notice = wire::encode_resync(&self.config.gateway_id, &scope);
            let published: Result<(), _> = self.conn().publish(RESYNC, notice).await;
            if let Err(e) = published {
                self.owed.lock().unwrap_or_else(|p| p.into_inner()).restore(scope);
                return Err(unavailable("publishing a resync notice")(e));
            }
            tracing::info!(
                users = match &scope {
                    ResyncScope::Users(users) => users.len(),
                    ResyncScope::Everyone => usize::MAX,
                },
                "asked other gateways to resync recipients of forwards that failed"
            );
        }
        Ok(())
    }

    /// Makes this gateway's sessions in Redis match the local ones: after
    /// Redis lost data (a restart) or missed changes (an outage). Sessions
    /// that ended meanwhile are removed, and users left with none anywhere
    /// are announced offline. Done again if sessions changed while it ran.
    /// Returns the users whose sessions were missing from Redis.
    async fn reregister(&self, local: &dyn LocalDelivery) -> Result<Vec<String>, BrokerError> {
        self.sessions_lost.store(false, Ordering::Relaxed);
        let before: HashSet<(String, String)> = local.local_sessions().into_iter().collect();
        let result = self.reconcile_sessions(local, &before).await;
        if result.is_err() || before != local.local_sessions().into_iter().collect() {
            self.sessions_lost.store(true, Ordering::Relaxed);
        }
        match result {
            Ok(readded) if !self.sessions_lost.load(Ordering::Relaxed) => {
                tracing::info!(sessions = before.len(), missing = readded.len(), "sessions registered in Redis again");
                Ok(readded)
            }
            Ok(_) => Err(BrokerError("sessions changed while re-registering; again".into())),
            Err(e) => Err(e),
        }
    }

    async fn reconcile_sessions(
        &self,
        local: &dyn LocalDelivery,
        sessions_here: &HashSet<(String, String)>,
    ) -> Result<Vec<String>, BrokerError> {
        self.renew_lease().await?;
        // The epoch these sessions are registered for (a later loss moves it).
        let epoch = self.epoch_ms.load(Ordering::Relaxed);
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
        let mut readded = Vec::new();
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
                let mut missing = false;
                for device in here.into_iter().flatten() {
                    let field = format!("{mine}{device}");
                    missing |= !fields.contains(&field);
                    pipe.hset(sessions_key(user), field, now).ignore();
                }
                if missing {
                    readded.push(user.clone());
                }
                if here.is_some() {
                    pipe.sadd(gateway_sessions_key(&self.config.gateway_id), user).ignore();
                    // A Redis that lost its data lost when users were last
                    // seen; for the ones connected here it is now.
                    pipe.cmd("SET").arg(seen_key(user)).arg(now).arg("NX").ignore();
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
        // Last: other gateways take this gateway's users as known once it is written.
        let _: () = self
            .conn()
            .hset(REGISTERED, &self.config.gateway_id, epoch)
            .await
            .map_err(unavailable("recording the re-registration"))?;
        Ok(readded)
    }

    /// Removes dead gateways' sessions; users left with none went offline.
    pub(super) async fn reap_loop(self: Arc<Self>, local: Arc<dyn LocalDelivery>, shutdown: CancellationToken) {
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

    /// Reaps every dead gateway (one whose lease ran out) in chunks of
    /// [`REAP_CHUNK`] users per atomic step: each step first checks that the
    /// gateway is still dead, so one that comes back is never reaped, and
    /// any number of gateways may reap at once without announcing a user
    /// offline twice (the users a step takes are gone for the next).
    async fn reap_once(&self, local: &dyn LocalDelivery) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let dead: Vec<String> =
            conn.zrangebyscore(GATEWAYS, "-inf", now_ms()).await.map_err(unavailable("listing dead gateways"))?;
        for gateway in dead.into_iter().filter(|g| *g != self.config.gateway_id) {
            let mut offline = 0;
            loop {
                let step: Vec<redis::Value> = self
                    .reap_script
                    .key(GATEWAYS)
                    .key(wire::GATEWAY_LOADS)
                    .key(gateway_sessions_key(&gateway))
                    .arg(&gateway)
                    .arg(now_ms())
                    .arg(wire::SESSIONS_PREFIX)
                    .arg(wire::SEEN_PREFIX)
                    .arg(REAP_CHUNK)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable("reaping a dead gateway"))?;
                let done = matches!(step.first(), Some(redis::Value::Int(1)));
                for user in step.iter().skip(1) {
                    if let Ok(user) = redis::from_redis_value::<String>(user.clone()) {
                        offline += 1;
                        local.remote_user_offline(user);
                    }
                }
                if done {
                    break;
                }
            }
            if offline > 0 {
                tracing::info!(%gateway, offline, "reaped a dead gateway's sessions");
            }
        }
        Ok(())
    }

    /// Sessions an earlier process of this gateway id left registered
    /// (a crash or fast restart under the same pod name), in one step.
    pub(super) async fn inherited_sessions(&self) -> Result<Vec<(String, String)>, BrokerError> {
        let flat: Vec<String> = self
            .gateway_sessions_script
            .key(gateway_sessions_key(&self.config.gateway_id))
            .arg(&self.config.gateway_id)
            .arg(wire::SESSIONS_PREFIX)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable("reading this gateway's earlier sessions"))?;
        Ok(flat.chunks_exact(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect())
    }
}
