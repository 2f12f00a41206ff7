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
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use kubechat_redis::{Shard, query_by_slot, slot};
use redis::{PushKind, Value};

use super::wire::{
    self, EPOCH, GATEWAYS, GROUPS_CHANGED, REGISTERED, RESYNC, ResyncScope, WorkerClaim, gateway_sessions_key,
    reaping_key, seen_key, sessions_key, worker_key,
};
use super::{RedisBroker, unavailable};
use crate::broker::RedisShardView;
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

/// Users a reaper takes per step.
const REAP_CHUNK: usize = 500;

/// How long a reaper's marker lasts if the reaper dies midway (ms).
const REAP_MARKER_MS: i64 = 30_000;

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

    /// The channels this gateway listens on (its delivery partitions,
    /// membership changes and resync notices), grouped by the master that
    /// serves their slot: one subscriber connection per master.
    fn subscriptions_by_master(&self, shards: &[Shard]) -> Vec<(String, Vec<String>)> {
        let mut channels = self.delivery_channels();
        channels.push(GROUPS_CHANGED.to_string());
        channels.push(RESYNC.to_string());
        let mut by_master: Vec<(String, Vec<String>)> =
            shards.iter().map(|s| (s.address.clone(), Vec::new())).collect();
        for channel in channels {
            let slot = slot(channel.as_bytes());
            if let Some(i) = shards.iter().position(|s| s.owns(slot)) {
                by_master[i].1.push(channel);
            }
        }
        by_master.retain(|(_, channels)| !channels.is_empty());
        by_master
    }

    /// Opens one RESP3 connection per master that serves one of this
    /// gateway's channels and subscribes there (`SSUBSCRIBE`). Fails unless
    /// every channel is subscribed: a partition nobody listens on loses forwards.
    async fn subscribe_all(
        &self,
        shards: &[Shard],
        pushes: &tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Result<Vec<redis::aio::MultiplexedConnection>, String> {
        let by_master = self.subscriptions_by_master(shards);
        let covered: usize = by_master.iter().map(|(_, channels)| channels.len()).sum();
        if covered < self.delivery_channels().len() + 2 {
            return Err("some slots have no master (a failover under way)".into());
        }
        let mut held = Vec::with_capacity(by_master.len());
        for (master, channels) in by_master {
            let mut node = self.endpoint.node_connection(&master, pushes.clone()).await.map_err(|e| e.to_string())?;
            // One command per channel: the channels of one `SSUBSCRIBE` must share a slot.
            let mut subscribe = redis::pipe();
            for channel in &channels {
                subscribe.cmd("SSUBSCRIBE").arg(channel).ignore();
            }
            let _: () = subscribe.query_async(&mut node).await.map_err(|e| {
                format!("SSUBSCRIBE at {}: {e}", if master.is_empty() { &self.address } else { &master })
            })?;
            held.push(node);
        }
        Ok(held)
    }

    /// Subscribes to this gateway's channels and keeps them: on a failure
    /// retries (see [`retry_delays`]); on a dropped node connection, a slot
    /// the server moved (it unsubscribes its listeners), or a changed
    /// topology (read every renewal) subscribes afresh. A subscription that
    /// was interrupted means forwards may have been lost: the repair task
    /// re-registers sessions, then asks every connection to resync.
    pub(super) async fn subscribe_loop(self: Arc<Self>, local: Arc<dyn LocalDelivery>, shutdown: CancellationToken) {
        let mut delays = retry_delays();
        let mut first = true;
        let mut failures = 0_u32;
        while !shutdown.is_cancelled() {
            let (pushes, mut received) = tokio::sync::mpsc::unbounded_channel();
            let attempt = async {
                let shards = self.conn().shards().await.map_err(|e| format!("reading the cluster's slots: {e}"))?;
                let held = self.subscribe_all(&shards, &pushes).await?;
                Ok::<_, String>((shards, held))
            };
            let (shards, held) = match tokio::time::timeout(self.config.command_timeout * 2, attempt).await {
                Ok(Ok(subscribed)) => subscribed,
                failed => {
                    self.subscribed.store(false, Ordering::Relaxed);
                    let error = match failed {
                        Ok(Err(e)) => e,
                        _ => format!("no answer within {:?}", self.config.command_timeout * 2),
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
            self.note_shards(&shards, true);
            self.subscribed.store(true, Ordering::Relaxed);
            if !first {
                tracing::info!(failures, masters = held.len(), "Redis subscription restored");
                self.mark_sessions_lost(true);
            }
            first = false;
            failures = 0;
            let why = self.listen(&mut received, &shards, local.as_ref(), &shutdown).await;
            drop(held);
            if shutdown.is_cancelled() {
                return;
            }
            self.subscribed.store(false, Ordering::Relaxed);
            self.note_shards(&shards, false);
            tracing::warn!(redis = %self.address, why, "Redis subscription lost; subscribing again");
        }
    }

    /// Records a Redis Cluster's masters for the admin API (a single
    /// server, one shard with no address, is not listed).
    fn note_shards(&self, shards: &[Shard], subscribed: bool) {
        let views = shards
            .iter()
            .filter(|s| !s.address.is_empty())
            .map(|s| RedisShardView {
                master: s.address.clone(),
                slots: s.slots.iter().map(|(low, high)| u32::from(high - low) + 1).sum(),
                replicas: s.replicas.clone(),
                subscribed,
            })
            .collect();
        *self.shards.lock().unwrap_or_else(|p| p.into_inner()) = views;
    }

    /// Delivers what the subscriptions receive until one of them is lost
    /// (or shutdown); returns why.
    async fn listen(
        &self,
        received: &mut tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
        shards: &[Shard],
        local: &dyn LocalDelivery,
        shutdown: &CancellationToken,
    ) -> &'static str {
        let mut topology_check = tokio::time::interval(self.config.renew_every());
        topology_check.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return "shutdown",
                push = received.recv() => match push {
                    Some(push) => match push.kind {
                        PushKind::SMessage | PushKind::Message => self.on_push(&push.data, local),
                        PushKind::Disconnection => return "a node connection dropped",
                        // Never asked for: the server moved the channel's slot.
                        PushKind::SUnsubscribe | PushKind::Unsubscribe => return "a slot moved",
                        _ => {}
                    },
                    None => return "every node connection closed",
                },
                _ = topology_check.tick() => {
                    if let Ok(now) = self.conn().shards().await
                        && self.subscriptions_by_master(&now) != self.subscriptions_by_master(shards)
                    {
                        return "the cluster's slots moved";
                    }
                }
            }
        }
    }

    fn on_push(&self, data: &[Value], local: &dyn LocalDelivery) {
        let (Some(channel), Some(payload)) = (data.first(), data.get(1)) else { return };
        let (Ok(channel), Ok(payload)) =
            (redis::from_redis_value_ref::<String>(channel), redis::from_redis_value_ref::<String>(payload))
        else {
            tracing::warn!("unreadable sharded pub/sub message ignored");
            return;
        };
        self.on_message(&channel, payload, local);
    }

    fn on_message(&self, channel: &str, payload: String, local: &dyn LocalDelivery) {
        match channel {
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
            let received = match self.spublish(RESYNC, &notice).await {
                Ok(received) => usize::try_from(received).unwrap_or(0),
                Err(e) => {
                    self.owed.lock().unwrap_or_else(|p| p.into_inner()).restore(scope);
                    return Err(unavailable("publishing a resync notice")(e));
                }
            };
            // Every live gateway (this one too) subscribes to the notices. One
            // that did not get it is subscribing again (a failover moved the
            // channel's slot, and it has not seen the new map yet): published
            // again at the next repair, until every live gateway takes it.
            let gateways = self.alive_gateways().await.map_or(0, |alive| alive.len());
            if received < gateways {
                self.owed.lock().unwrap_or_else(|p| p.into_inner()).restore(scope);
                return Err(BrokerError(format!("{received} of {gateways} gateways took the resync notice")));
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
        // A reaper that took this gateway for dead may still be removing its
        // sessions: registering them before it is done would lose them.
        let reaped: bool = self
            .conn()
            .exists(reaping_key(&self.config.gateway_id))
            .await
            .map_err(unavailable("checking for a reaper"))?;
        if reaped {
            return Err(BrokerError("a reaper is removing this gateway's earlier sessions; waiting for it".into()));
        }
        self.renew_lease().await?;
        // The epoch these sessions are registered for (a later loss moves it).
        let epoch = self.epoch_ms.load(Ordering::Relaxed);
        let mine = format!("{}|", self.config.gateway_id);
        let mut devices_here: HashMap<String, HashSet<String>> = HashMap::new();
        for (user, device) in sessions_here {
            devices_here.entry(user.clone()).or_default().insert(device.clone());
        }
        let users_key = gateway_sessions_key(&self.config.gateway_id);
        let mut users: HashSet<String> =
            self.conn().smembers(&users_key).await.map_err(unavailable("reading this gateway's sessions"))?;
        users.extend(devices_here.keys().cloned());
        let users: Vec<String> = users.into_iter().collect();
        let alive = self.alive_gateways().await?;
        let now = now_ms();
        let mut readded = Vec::new();
        for chunk in users.chunks(500) {
            let sessions = self.sessions_of(chunk).await?;
            // (key naming the slot, command): a cluster runs one pipeline per slot.
            let mut commands: Vec<(String, redis::Cmd)> = Vec::new();
            let mut gone = Vec::new();
            for (user, fields) in chunk.iter().zip(&sessions) {
                let key = sessions_key(user);
                let here = devices_here.get(user);
                let is_here = |device: &str| here.is_some_and(|devices| devices.contains(device));
                let (stale, left): (Vec<&String>, Vec<&String>) =
                    fields.iter().partition(|f| f.strip_prefix(&mine).is_some_and(|device| !is_here(device)));
                if !stale.is_empty() {
                    commands.push((key.clone(), redis::cmd("HDEL").arg(&key).arg(stale).clone()));
                }
                let mut missing = false;
                for device in here.into_iter().flatten() {
                    let field = format!("{mine}{device}");
                    missing |= !fields.contains(&field);
                    commands.push((key.clone(), redis::cmd("HSET").arg(&key).arg(field).arg(now).clone()));
                }
                if missing {
                    readded.push(user.clone());
                }
                if here.is_some() {
                    commands.push((users_key.clone(), redis::cmd("SADD").arg(&users_key).arg(user).clone()));
                    // A Redis that lost its data lost when users were last
                    // seen; for the ones connected here it is now.
                    commands.push((key.clone(), redis::cmd("SET").arg(seen_key(user)).arg(now).arg("NX").clone()));
                } else {
                    commands.push((users_key.clone(), redis::cmd("SREM").arg(&users_key).arg(user).clone()));
                    let left: Vec<String> = left.into_iter().cloned().collect();
                    if fields.len() != left.len() && Self::live_gateways(&left, &alive).is_empty() {
                        commands.push((key.clone(), redis::cmd("SET").arg(seen_key(user)).arg(now).clone()));
                        gone.push(user.clone());
                    }
                }
            }
            query_by_slot(&self.connection, commands).await.map_err(unavailable("re-registering sessions"))?;
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

    /// Reaps every dead gateway (one whose lease ran out), one reaper per
    /// gateway at a time ([`wire::BEGIN_REAP_SCRIPT`]: checked with the
    /// lease in one step, so one that comes back first is never reaped, and
    /// one that comes back during it waits before registering again). Users
    /// are taken from the gateway's set in chunks of [`REAP_CHUNK`] (`SPOP`:
    /// a user is announced offline once), each user's sessions changed in
    /// one step in its own slot.
    async fn reap_once(&self, local: &dyn LocalDelivery) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let dead: Vec<String> =
            conn.zrangebyscore(GATEWAYS, "-inf", now_ms()).await.map_err(unavailable("listing dead gateways"))?;
        for gateway in dead.into_iter().filter(|g| *g != self.config.gateway_id) {
            let marker = reaping_key(&gateway);
            let taken: i64 = self
                .begin_reap_script
                .key(GATEWAYS)
                .key(&marker)
                .arg(&gateway)
                .arg(now_ms())
                .arg(REAP_MARKER_MS)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable("reaping a dead gateway"))?;
            if taken != 1 {
                continue;
            }
            let offline = self.reap_sessions(&gateway, local).await?;
            let _: i64 = self
                .end_reap_script
                .key(GATEWAYS)
                .key(wire::GATEWAY_LOADS)
                .key(&marker)
                .arg(&gateway)
                .arg(now_ms())
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable("reaping a dead gateway"))?;
            if offline > 0 {
                tracing::info!(%gateway, offline, "reaped a dead gateway's sessions");
            }
        }
        Ok(())
    }

    /// Ends every session `gateway` left; returns how many users went offline.
    async fn reap_sessions(&self, gateway: &str, local: &dyn LocalDelivery) -> Result<usize, BrokerError> {
        let mut offline = 0;
        loop {
            let users: Vec<String> = redis::cmd("SPOP")
                .arg(gateway_sessions_key(gateway))
                .arg(REAP_CHUNK)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable("reaping a dead gateway"))?;
            if users.is_empty() {
                return Ok(offline);
            }
            let alive: Vec<String> = self.read_control().await?.live.iter().cloned().collect();
            let drops = users.iter().map(|user| {
                let mut invocation = self.drop_sessions_script.key(sessions_key(user));
                invocation.key(seen_key(user)).arg(gateway).arg(now_ms()).arg(&alive);
                let mut conn = self.conn();
                async move { (user, invocation.invoke_async::<i64>(&mut conn).await) }
            });
            for (user, dropped) in futures::future::join_all(drops).await {
                if dropped.map_err(unavailable("reaping a dead gateway"))? == 1 {
                    offline += 1;
                    local.remote_user_offline(user.clone());
                }
            }
        }
    }

    /// Sessions an earlier process of this gateway id left registered
    /// (a crash or fast restart under the same pod name).
    pub(super) async fn inherited_sessions(&self) -> Result<Vec<(String, String)>, BrokerError> {
        let users: Vec<String> = self
            .conn()
            .smembers(gateway_sessions_key(&self.config.gateway_id))
            .await
            .map_err(unavailable("reading this gateway's earlier sessions"))?;
        let mine = format!("{}|", self.config.gateway_id);
        let mut inherited = Vec::new();
        for chunk in users.chunks(500) {
            for (user, fields) in chunk.iter().zip(self.sessions_of(chunk).await?) {
                for field in fields {
                    if let Some(device) = field.strip_prefix(&mine) {
                        inherited.push((user.clone(), device.to_string()));
                    }
                }
            }
        }
        Ok(inherited)
    }
}
