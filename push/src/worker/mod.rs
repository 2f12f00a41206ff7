//! The push worker: a consumer of the job stream's consumer group.
//!
//! Loop: XREADGROUP `>` (COUNT ≤ free capacity, BLOCK short so shutdown is prompt) on a
//! connection of its own (a blocked read would hold up other commands on a shared one); every
//! `claim_interval`, XAUTOCLAIM entries pending longer than `claim_idle` (their worker died,
//! or a Redis error left them unfinished here). Each entry is worked on in a task of its own,
//! at most `max_in_flight` at once; the entries in progress are re-claimed by this worker
//! (XCLAIM … JUSTID, idle 0) every third of `claim_idle`, so a slow send or a long backoff
//! does not make them look abandoned.
//!
//! Per entry: the user's targets are looked up; each target is sent to unless already done
//! (the `kubechat:pushed:{message}:{device}` key, or dead-lettered for this entry); transient
//! failures are retried after a full-jitter exponential backoff; after `max_attempts`, or at
//! once for a permanent failure, the (job, device) goes to the dead-letter stream. When every
//! target is done the entry is XACKed.
//!
//! Attempt counts survive crashes: they live in Redis, in the hash
//! `{stream}-attempts:{entry id}` (field `{device}`), incremented *before* each send, so a
//! worker that dies mid-send has used the attempt up. The last error is kept beside it
//! (`{device}:error`) so whoever takes the entry over can dead-letter with it, and
//! `{device}:dead` records the dead-lettering (written in the same MULTI as the XADD, so
//! a takeover does not dead-letter twice). The hash is deleted with the XACK and expires
//! after 7 days otherwise (entries trimmed from the stream while pending).
//!
//! Here: the loop and its tasks; `stream`: reading the stream; `deliver`: one entry's sends.
//!
//! Delivery is at least once: a worker that dies after the provider accepted a notification
//! but before it recorded that, or that loses an entry to another worker while cut off from
//! Redis for longer than `claim_idle`, may cause one duplicate notification.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubechat_redis::{Connection, Endpoint};
use redis::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod deliver;
mod stream;

pub use deliver::backoff;
use deliver::{EntryOutcome, process_entry};
use stream::{Entry, autoclaim, read_new, reap_consumers};

use crate::config::{PushWorkerConfig, SecretSource};
use crate::metrics::PushMetrics;
use crate::provider::Providers;

/// How long delivery markers and attempt counts are kept.
const STATE_TTL_SECONDS: u64 = 7 * 24 * 3600;
/// Longest a single provider send may take, whatever the provider's own timeouts.
const SEND_LIMIT: Duration = Duration::from_secs(120);
/// Consumers with nothing pending and idle this long are removed from the group.
const CONSUMER_REAP_IDLE: Duration = Duration::from_secs(3600);
const CONSUMER_REAP_INTERVAL: Duration = Duration::from_secs(600);
/// Longest pause after a Redis error in the loop.
const MAX_ERROR_PAUSE: Duration = Duration::from_secs(5);
/// IDs per XCLAIM when renewing.
const RENEW_CHUNK: usize = 500;

/// Runs a push worker with the providers of `config.providers` and metrics of its own, until
/// `shutdown` is cancelled. Fails only at start (bad settings, unusable provider secrets);
/// Redis being unreachable is retried, not fatal.
/// Serves `/healthz` and `/metrics` on `config.admin` meanwhile.
pub async fn run_push_worker(config: PushWorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let providers = Providers::from_config(&config.providers)?;
    let metrics = PushMetrics::new();
    if let Some(admin) = config.admin {
        let listener = tokio::net::TcpListener::bind(admin)
            .await
            .map_err(|e| anyhow::anyhow!("binding the admin address {admin}: {e}"))?;
        tokio::spawn(super::admin::serve_admin(listener, metrics.clone(), shutdown.clone()));
    }
    run_push_worker_with(config, providers, metrics, shutdown).await
}

/// [`run_push_worker`] with the caller's providers (`config.providers` is ignored) and metrics.
pub async fn run_push_worker_with(
    config: PushWorkerConfig,
    providers: Providers,
    metrics: PushMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let endpoint = redis_endpoint(&config)?;
    let Some(conn) = connect(&endpoint, config.command_timeout, &metrics, &shutdown).await else {
        return Ok(());
    };
    // Every partition is consumed here: one loop each, on a connection of its own for the
    // blocking read, sharing the rest (the connection for other commands, the bound on sends).
    let mut streams = crate::job::partition_streams(&config.stream, config.partitions);
    let mut dead = crate::job::partition_streams(&config.dead_letter_stream, config.partitions);
    if config.partitions > 1 && legacy_stream_exists(&conn, &config.stream).await {
        // An earlier version queued every job on the unpartitioned stream:
        // its jobs are sent too, not left behind by an upgrade.
        tracing::info!(stream = %config.stream, "consuming the jobs an earlier version queued unpartitioned");
        streams.push(config.stream.clone());
        dead.push(config.dead_letter_stream.clone());
    }
    let sends = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_sends));
    let per_partition_in_flight = config.max_in_flight.div_ceil(streams.len()).max(1);
    let mut partitions = Vec::with_capacity(streams.len());
    for (stream, dead) in streams.into_iter().zip(dead) {
        let Some(read_conn) = connect(&endpoint, config.command_timeout + config.block, &metrics, &shutdown).await
        else {
            return Ok(());
        };
        let config = PushWorkerConfig {
            stream,
            dead_letter_stream: dead,
            max_in_flight: per_partition_in_flight,
            ..config.clone()
        };
        let ctx = Arc::new(Ctx {
            config,
            providers: providers.clone(),
            metrics: metrics.clone(),
            conn: conn.clone(),
            in_flight: Mutex::new(HashSet::new()),
            sends: sends.clone(),
        });
        let shutdown = shutdown.clone();
        partitions.push(async move {
            tokio::select! {
                () = consume(ctx.clone(), read_conn, shutdown) => {}
                () = renew_in_flight(ctx.clone()) => {}
            }
        });
    }
    tracing::info!(
        stream = %config.stream,
        partitions = partitions.len(),
        group = %config.consumer_group,
        consumer = %config.consumer_name,
        "push worker started"
    );
    futures::future::join_all(partitions).await;
    tracing::info!(consumer = %config.consumer_name, "push worker stopped");
    Ok(())
}

struct Ctx {
    config: PushWorkerConfig,
    providers: Providers,
    metrics: PushMetrics,
    /// For everything but the blocking read.
    conn: Connection,
    /// Entry ids being worked on by this worker.
    in_flight: Mutex<HashSet<String>>,
    /// Bounds the provider requests under way.
    sends: Arc<tokio::sync::Semaphore>,
}

impl Ctx {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn attempts_key(&self, entry_id: &str) -> String {
        format!("{}-attempts:{entry_id}", self.config.stream)
    }
}

/// Removes an entry from the in-flight set however its task ends (even aborted).
struct InFlight {
    ctx: Arc<Ctx>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ctx.in_flight().remove(&self.id);
    }
}

fn redis_endpoint(config: &PushWorkerConfig) -> anyhow::Result<Endpoint> {
    let password = match &config.redis_password {
        None => None,
        Some(SecretSource::Value(value)) => Some(value.clone()),
        Some(file @ SecretSource::File(_)) => {
            let bytes = file.load().map_err(|e| anyhow::anyhow!("push: Redis password: {e}"))?;
            Some(String::from_utf8_lossy(bytes.trim_ascii()).into_owned())
        }
    };
    Endpoint::new(&config.redis, password).map_err(|e| anyhow::anyhow!("push: {e}"))
}

/// A connection (it reconnects by itself later); retried until it connects or
/// `shutdown` is cancelled (then `None`).
async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
    metrics: &PushMetrics,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    let endpoint = endpoint.clone().with_timeout(timeout);
    let mut failures = 0;
    loop {
        match endpoint.connect().await {
            Ok(conn) => return Some(conn),
            Err(e) => {
                metrics.redis_errors.inc();
                failures += 1;
                tracing::warn!(error = %e, "push worker: cannot connect to Redis; retrying");
                if !pause(failures, shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// The unpartitioned stream of an earlier version holds entries (an error
/// counts as no: its jobs then wait for the next start).
async fn legacy_stream_exists(conn: &Connection, stream: &str) -> bool {
    let len: redis::RedisResult<u64> = redis::cmd("XLEN").arg(stream).query_async(&mut conn.clone()).await;
    len.is_ok_and(|n| n > 0)
}

/// Sleeps after the `failures`-th consecutive error; false if shut down meanwhile.
async fn pause(failures: u32, shutdown: &CancellationToken) -> bool {
    let delay = (Duration::from_millis(100) * 2u32.saturating_pow(failures.min(10))).min(MAX_ERROR_PAUSE);
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// XGROUP CREATE … 0 MKSTREAM: a new group starts at the beginning, so jobs enqueued before
/// the first worker ran are sent too. An existing group is fine.
async fn ensure_group(conn: &mut Connection, config: &PushWorkerConfig) -> redis::RedisResult<()> {
    let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&config.stream)
        .arg(&config.consumer_group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// The main loop; returns after shutdown, once in-flight entries finished or the grace ran out.
async fn consume(ctx: Arc<Ctx>, mut read_conn: Connection, shutdown: CancellationToken) {
    let config = &ctx.config;
    let mut tasks: JoinSet<(String, redis::RedisResult<EntryOutcome>)> = JoinSet::new();
    let mut group_ready = false;
    let mut claim_cursor = "0-0".to_string();
    let mut next_claim = Instant::now();
    let mut next_reap = Instant::now() + CONSUMER_REAP_INTERVAL;
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        while let Some(done) = tasks.try_join_next() {
            finished(&ctx, done);
        }
        let free = config.max_in_flight.saturating_sub(ctx.in_flight().len());
        if free == 0 {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(done) = tasks.join_next() => finished(&ctx, done),
            }
            continue;
        }
        let step = async {
            let mut conn = ctx.conn.clone();
            if !group_ready {
                ensure_group(&mut conn, config).await?;
                group_ready = true;
            }
            let mut free = free;
            if Instant::now() >= next_claim {
                let (cursor, entries) = autoclaim(&ctx, &mut conn, &claim_cursor, free.min(config.batch_size)).await?;
                // A cursor back at 0-0 means a full pass over the pending entries.
                if cursor == "0-0" {
                    next_claim = Instant::now() + config.claim_interval;
                }
                claim_cursor = cursor;
                for entry in entries {
                    if spawn_entry(&ctx, &mut tasks, entry, &shutdown) {
                        ctx.metrics.claimed.inc();
                        free = free.saturating_sub(1);
                    }
                }
            }
            if Instant::now() >= next_reap {
                next_reap = Instant::now() + CONSUMER_REAP_INTERVAL;
                reap_consumers(&ctx, &mut conn).await?;
            }
            if free > 0 {
                for entry in read_new(config, &mut read_conn, free.min(config.batch_size)).await? {
                    spawn_entry(&ctx, &mut tasks, entry, &shutdown);
                }
            }
            redis::RedisResult::Ok(())
        };
        // Not raced against shutdown: the read returns within `block`, and dropping it
        // half-way could strand entries Redis already handed to this consumer.
        match step.await {
            Ok(()) => failures = 0,
            Err(e) => {
                ctx.metrics.redis_errors.inc();
                failures += 1;
                if e.code() == Some("NOGROUP") {
                    // The stream or group was deleted: make them again.
                    group_ready = false;
                }
                tracing::warn!(error = %e, "push worker: Redis error; retrying");
                if !pause(failures, &shutdown).await {
                    break;
                }
            }
        }
    }
    // Shutdown: backoff sleeps end at once (their entries stay pending for a takeover); sends
    // under way get the grace period.
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while let Some(done) = tasks.join_next().await {
            finished(&ctx, done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(abandoned = tasks.len(), "push worker: shutdown grace over; abandoning sends in progress");
        tasks.abort_all();
    }
}

fn finished(ctx: &Ctx, done: Result<(String, redis::RedisResult<EntryOutcome>), tokio::task::JoinError>) {
    match done {
        Ok((_, Ok(_))) => {}
        Ok((id, Err(e))) => {
            ctx.metrics.redis_errors.inc();
            tracing::warn!(entry = %id, error = %e, "push job left pending after a Redis error; it is retried after the claim idle time");
        }
        Err(e) if e.is_cancelled() => {}
        Err(e) => tracing::error!(error = %e, "push job task failed"),
    }
}

/// Starts work on `entry` unless this worker already works on it.
fn spawn_entry(
    ctx: &Arc<Ctx>,
    tasks: &mut JoinSet<(String, redis::RedisResult<EntryOutcome>)>,
    entry: Entry,
    shutdown: &CancellationToken,
) -> bool {
    if !ctx.in_flight().insert(entry.id.clone()) {
        return false;
    }
    let guard = InFlight { ctx: ctx.clone(), id: entry.id.clone() };
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        let result = process_entry(&guard.ctx, &entry, &shutdown).await;
        drop(guard);
        (entry.id, result)
    });
    true
}

/// Keeps the entries this worker works on from looking abandoned: XCLAIM resets their idle
/// time. Runs until dropped.
async fn renew_in_flight(ctx: Arc<Ctx>) {
    let period = (ctx.config.claim_idle / 3).max(Duration::from_millis(10));
    let mut conn = ctx.conn.clone();
    loop {
        tokio::time::sleep(period).await;
        let ids: Vec<String> = ctx.in_flight().iter().cloned().collect();
        for chunk in ids.chunks(RENEW_CHUNK) {
            let renewed: redis::RedisResult<Value> = redis::cmd("XCLAIM")
                .arg(&ctx.config.stream)
                .arg(&ctx.config.consumer_group)
                .arg(&ctx.config.consumer_name)
                .arg(0)
                .arg(chunk)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await;
            if let Err(e) = renewed {
                ctx.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "push worker: cannot renew in-flight entries");
            }
        }
    }
}
