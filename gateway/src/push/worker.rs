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
//! Delivery is at least once: a worker that dies after the provider accepted a notification
//! but before it recorded that, or that loses an entry to another worker while cut off from
//! Redis for longer than `claim_idle`, may cause one duplicate notification.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{PushWorkerConfig, SecretSource};
use super::metrics::PushMetrics;
use super::provider::{ProviderError, Providers};
use super::{PushTarget, PushTargetError, pushed_key, unregister_stale_target};
use crate::chat::push::PushJob;

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
    let client = redis_client(&config)?;
    let Some(conn) = connect(&client, config.command_timeout, &metrics, &shutdown).await else {
        return Ok(());
    };
    let Some(read_conn) = connect(&client, config.command_timeout + config.block, &metrics, &shutdown).await else {
        return Ok(());
    };
    let sends = tokio::sync::Semaphore::new(config.max_concurrent_sends);
    let ctx = Arc::new(Ctx { config, providers, metrics, conn, in_flight: Mutex::new(HashSet::new()), sends });
    tracing::info!(
        stream = %ctx.config.stream,
        group = %ctx.config.consumer_group,
        consumer = %ctx.config.consumer_name,
        "push worker started"
    );
    tokio::select! {
        () = consume(ctx.clone(), read_conn, shutdown.clone()) => {}
        () = renew_in_flight(ctx.clone()) => {}
    }
    tracing::info!(consumer = %ctx.config.consumer_name, "push worker stopped");
    Ok(())
}

struct Ctx {
    config: PushWorkerConfig,
    providers: Providers,
    metrics: PushMetrics,
    /// For everything but the blocking read.
    conn: ConnectionManager,
    /// Entry ids being worked on by this worker.
    in_flight: Mutex<HashSet<String>>,
    /// Bounds the provider requests under way.
    sends: tokio::sync::Semaphore,
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

fn redis_client(config: &PushWorkerConfig) -> anyhow::Result<redis::Client> {
    use anyhow::Context as _;
    let mut info = redis::IntoConnectionInfo::into_connection_info(config.redis_url.as_str())
        .context("push: parsing the Redis URL")?;
    if let Some(password) = &config.redis_password {
        let password = match password {
            SecretSource::Value(value) => value.clone(),
            file @ SecretSource::File(_) => {
                let bytes = file.load().map_err(|e| anyhow::anyhow!("push: Redis password: {e}"))?;
                String::from_utf8_lossy(bytes.trim_ascii()).into_owned()
            }
        };
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info).context("push: configuring Redis")
}

/// A connection manager (it reconnects by itself later); retried until it connects or
/// `shutdown` is cancelled (then `None`).
async fn connect(
    client: &redis::Client,
    timeout: Duration,
    metrics: &PushMetrics,
    shutdown: &CancellationToken,
) -> Option<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let mut failures = 0;
    loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
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
async fn ensure_group(conn: &mut ConnectionManager, config: &PushWorkerConfig) -> redis::RedisResult<()> {
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
async fn consume(ctx: Arc<Ctx>, mut read_conn: ConnectionManager, shutdown: CancellationToken) {
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

// ---------------------------------------------------------------- reading --

/// A stream entry: its id and `job` field (None if missing, or the entry was deleted).
#[derive(Debug)]
struct Entry {
    id: String,
    job: Option<String>,
}

fn value_string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// `[[id, [field, value, …] | nil], …]`
fn parse_entries(value: &Value) -> Vec<Entry> {
    let Value::Array(items) = value else { return Vec::new() };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else { return None };
            let id = value_string(parts.first()?)?;
            let job = match parts.get(1) {
                Some(Value::Array(fields)) => {
                    { fields.chunks(2).find(|pair| pair.first().and_then(value_string).as_deref() == Some("job")) }
                        .and_then(|pair| pair.get(1))
                        .and_then(value_string)
                }
                Some(Value::Map(fields)) => fields
                    .iter()
                    .find(|(k, _)| value_string(k).as_deref() == Some("job"))
                    .and_then(|(_, v)| value_string(v)),
                _ => None,
            };
            Some(Entry { id, job })
        })
        .collect()
}

/// XREADGROUP reply: `[[stream, entries]]` (RESP2) or `{stream: entries}` (RESP3); nil on timeout.
fn parse_read_reply(value: &Value) -> Vec<Entry> {
    match value {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|stream| match stream {
                Value::Array(parts) => parts.get(1).map(parse_entries).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, entries)| parse_entries(entries)).collect(),
        _ => Vec::new(),
    }
}

async fn read_new(
    config: &PushWorkerConfig,
    conn: &mut ConnectionManager,
    count: usize,
) -> redis::RedisResult<Vec<Entry>> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&config.consumer_group)
        .arg(&config.consumer_name)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(config.block.as_millis().max(1) as u64)
        .arg("STREAMS")
        .arg(&config.stream)
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(parse_read_reply(&reply))
}

/// XAUTOCLAIM from `cursor`: (next cursor, entries now owned by this worker).
async fn autoclaim(
    ctx: &Ctx,
    conn: &mut ConnectionManager,
    cursor: &str,
    count: usize,
) -> redis::RedisResult<(String, Vec<Entry>)> {
    let config = &ctx.config;
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(&config.stream)
        .arg(&config.consumer_group)
        .arg(&config.consumer_name)
        .arg(config.claim_idle.as_millis() as u64)
        .arg(cursor)
        .arg("COUNT")
        .arg(count.max(1))
        .query_async(conn)
        .await?;
    let Value::Array(parts) = &reply else { return Ok(("0-0".into(), Vec::new())) };
    let next = parts.first().and_then(value_string).unwrap_or_else(|| "0-0".into());
    let entries = parts.get(1).map(parse_entries).unwrap_or_default();
    if let Some(Value::Array(deleted)) = parts.get(2)
        && !deleted.is_empty()
    {
        // Trimmed from the stream while pending: Redis dropped them from the group.
        tracing::warn!(count = deleted.len(), "push jobs were trimmed from the stream before they were sent");
    }
    Ok((next, entries))
}

/// Removes consumers (other than this one) with nothing pending that have been idle long:
/// workers of pods long gone.
async fn reap_consumers(ctx: &Ctx, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
    let config = &ctx.config;
    let reply: redis::streams::StreamInfoConsumersReply =
        redis::cmd("XINFO").arg("CONSUMERS").arg(&config.stream).arg(&config.consumer_group).query_async(conn).await?;
    for consumer in reply.consumers {
        let idle = Duration::from_millis(consumer.idle as u64);
        if consumer.pending == 0 && idle > CONSUMER_REAP_IDLE && consumer.name != config.consumer_name {
            let _: Value = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&config.stream)
                .arg(&config.consumer_group)
                .arg(&consumer.name)
                .query_async(conn)
                .await?;
            tracing::info!(consumer = %consumer.name, "removed an idle push consumer");
        }
    }
    Ok(())
}

// ------------------------------------------------------------- processing --

#[derive(Debug, PartialEq, Eq)]
enum EntryOutcome {
    Acked,
    /// Shutdown came during a backoff: left pending for a takeover.
    Abandoned,
}

#[derive(Debug, PartialEq, Eq)]
enum TargetOutcome {
    /// Delivered (now or before), or dead-lettered.
    Done,
    Abandoned,
}

async fn process_entry(ctx: &Ctx, entry: &Entry, shutdown: &CancellationToken) -> redis::RedisResult<EntryOutcome> {
    let mut conn = ctx.conn.clone();
    let attempts_key = ctx.attempts_key(&entry.id);
    let job = match entry.job.as_deref().map(serde_json::from_str::<PushJob>) {
        Some(Ok(job)) => job,
        Some(Err(e)) => return give_up_on_entry(ctx, &mut conn, entry, &format!("unreadable job: {e}")).await,
        None => return give_up_on_entry(ctx, &mut conn, entry, "the entry has no job field").await,
    };
    let targets = match super::targets(&mut conn, &job.user).await {
        Ok(targets) => targets,
        Err(PushTargetError::Redis(e)) => return Err(e),
        Err(e) => return give_up_on_entry(ctx, &mut conn, entry, &e.to_string()).await,
    };
    if targets.is_empty() {
        ack(ctx, &mut conn, &entry.id, &attempts_key).await?;
        ctx.metrics.jobs_skipped.inc();
        return Ok(EntryOutcome::Acked);
    }
    let outcomes = futures::future::join_all(
        targets.iter().map(|target| deliver(ctx, &job, entry, target, &attempts_key, shutdown)),
    )
    .await;
    let mut abandoned = false;
    for outcome in outcomes {
        abandoned |= outcome? == TargetOutcome::Abandoned;
    }
    if abandoned {
        return Ok(EntryOutcome::Abandoned);
    }
    ack(ctx, &mut conn, &entry.id, &attempts_key).await?;
    Ok(EntryOutcome::Acked)
}

/// An entry no target can be derived from: dead-lettered as a whole, then acked.
async fn give_up_on_entry(
    ctx: &Ctx,
    conn: &mut ConnectionManager,
    entry: &Entry,
    error: &str,
) -> redis::RedisResult<EntryOutcome> {
    tracing::warn!(entry = %entry.id, error, "dead-lettering an unusable push job");
    let config = &ctx.config;
    let _: Value = redis::cmd("XADD")
        .arg(&config.dead_letter_stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(config.dead_letter_max_len)
        .arg("*")
        .arg("job")
        .arg(entry.job.as_deref().unwrap_or(""))
        .arg("error")
        .arg(error)
        .arg("attempts")
        .arg(0)
        .arg("entry")
        .arg(&entry.id)
        .arg("failed_at_ms")
        .arg(crate::ids::now_ms())
        .query_async(conn)
        .await?;
    ctx.metrics.dead_lettered.with_label_values(&["none"]).inc();
    ack(ctx, conn, &entry.id, &ctx.attempts_key(&entry.id)).await?;
    Ok(EntryOutcome::Acked)
}

async fn ack(ctx: &Ctx, conn: &mut ConnectionManager, id: &str, attempts_key: &str) -> redis::RedisResult<()> {
    let _: () = redis::pipe()
        .atomic()
        .cmd("XACK")
        .arg(&ctx.config.stream)
        .arg(&ctx.config.consumer_group)
        .arg(id)
        .ignore()
        .del(attempts_key)
        .ignore()
        .query_async(conn)
        .await?;
    ctx.metrics.jobs_processed.inc();
    Ok(())
}

/// The delay before the attempt after the `failed`-th: uniform in [0, min(max, base·2^(failed-1))].
pub fn backoff(base: Duration, max: Duration, failed: u32) -> Duration {
    let cap = base.saturating_mul(2u32.saturating_pow(failed.saturating_sub(1).min(31))).min(max);
    let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    if cap_nanos == 0 {
        return Duration::ZERO;
    }
    // Full jitter; without randomness (never on Linux), half the cap.
    let random = getrandom::u64().unwrap_or(cap_nanos / 2);
    Duration::from_nanos(random % (cap_nanos + 1))
}

/// Sends `job` to one target until it is delivered, dead-lettered, or shutdown interrupts a
/// backoff.
async fn deliver(
    ctx: &Ctx,
    job: &PushJob,
    entry: &Entry,
    target: &PushTarget,
    attempts_key: &str,
    shutdown: &CancellationToken,
) -> redis::RedisResult<TargetOutcome> {
    let config = &ctx.config;
    let metrics = &ctx.metrics;
    let mut conn = ctx.conn.clone();
    let device = target.device.as_str();
    let platform = target.platform.as_str();
    let pushed = pushed_key(&job.message_id, device);
    let error_field = format!("{device}:error");
    let dead_field = format!("{device}:dead");
    loop {
        let (delivered, dead, attempts, last_error): (bool, bool, Option<u32>, Option<String>) = redis::pipe()
            .exists(&pushed)
            .hexists(attempts_key, &dead_field)
            .hget(attempts_key, device)
            .hget(attempts_key, &error_field)
            .query_async(&mut conn)
            .await?;
        if delivered {
            metrics.duplicates.inc();
            return Ok(TargetOutcome::Done);
        }
        if dead {
            return Ok(TargetOutcome::Done);
        }
        let attempts = attempts.unwrap_or(0);
        if attempts >= config.max_attempts {
            // The worker that made the last attempt died before dead-lettering it.
            let error =
                last_error.unwrap_or_else(|| "attempts exhausted (the last attempt's outcome is unknown)".into());
            dead_letter(ctx, &mut conn, job, entry, target, attempts, &error).await?;
            return Ok(TargetOutcome::Done);
        }
        let Some(provider) = ctx.providers.get(target.platform) else {
            let error = format!("no {platform} push provider is configured");
            dead_letter(ctx, &mut conn, job, entry, target, attempts, &error).await?;
            return Ok(TargetOutcome::Done);
        };
        // Count the attempt before making it: one that dies with its worker is used up too.
        let (attempt,): (u32,) = redis::pipe()
            .hincr(attempts_key, device, 1)
            .expire(attempts_key, STATE_TTL_SECONDS as i64)
            .ignore()
            .query_async(&mut conn)
            .await?;
        let result = {
            // Never closed, so acquiring only fails if it were; then send without a permit.
            let _permit = ctx.sends.acquire().await.ok();
            let started = std::time::Instant::now();
            let result = match tokio::time::timeout(SEND_LIMIT, provider.send(job, target)).await {
                Ok(result) => result,
                Err(_) => Err(ProviderError::Transient(format!("the send took longer than {SEND_LIMIT:?}"))),
            };
            metrics.provider_seconds.with_label_values(&[platform]).observe(started.elapsed().as_secs_f64());
            result
        };
        let error = match result {
            Ok(()) => {
                let _: () = redis::pipe()
                    .cmd("SET")
                    .arg(&pushed)
                    .arg(1)
                    .arg("NX")
                    .arg("EX")
                    .arg(STATE_TTL_SECONDS)
                    .ignore()
                    .hdel(attempts_key, &[device, error_field.as_str()])
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
                metrics.deliveries.with_label_values(&[platform]).inc();
                return Ok(TargetOutcome::Done);
            }
            Err(error) => error,
        };
        metrics.failed_attempts.with_label_values(&[platform, error.kind()]).inc();
        tracing::debug!(entry = %entry.id, device, attempt, error = %error, "push attempt failed");
        if error.is_transient() && attempt < config.max_attempts {
            let _: () = redis::pipe()
                .hset(attempts_key, &error_field, error.to_string())
                .ignore()
                .expire(attempts_key, STATE_TTL_SECONDS as i64)
                .ignore()
                .query_async(&mut conn)
                .await?;
            let delay = backoff(config.backoff_base, config.backoff_max, attempt);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(TargetOutcome::Abandoned),
                () = tokio::time::sleep(delay) => continue,
            }
        }
        dead_letter(ctx, &mut conn, job, entry, target, attempt, &error.to_string()).await?;
        if matches!(error, ProviderError::InvalidTarget(_)) {
            match unregister_stale_target(&mut conn, &job.user, target).await {
                Ok(true) => {
                    tracing::info!(user = %job.user, device, "unregistered a push target its provider rejected")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(user = %job.user, device, error = %e, "cannot unregister a rejected push target")
                }
            }
        }
        return Ok(TargetOutcome::Done);
    }
}

/// XADD to the dead-letter stream and mark the (entry, device) dead, atomically.
async fn dead_letter(
    ctx: &Ctx,
    conn: &mut ConnectionManager,
    job: &PushJob,
    entry: &Entry,
    target: &PushTarget,
    attempts: u32,
    error: &str,
) -> redis::RedisResult<()> {
    let config = &ctx.config;
    let attempts_key = ctx.attempts_key(&entry.id);
    tracing::warn!(entry = %entry.id, user = %job.user, device = %target.device, attempts, error, "push dead-lettered");
    let _: () = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(&config.dead_letter_stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(config.dead_letter_max_len)
        .arg("*")
        .arg("job")
        .arg(entry.job.as_deref().unwrap_or(""))
        .arg("user")
        .arg(&job.user)
        .arg("device")
        .arg(&target.device)
        .arg("platform")
        .arg(target.platform.as_str())
        .arg("error")
        .arg(error)
        .arg("attempts")
        .arg(attempts)
        .arg("entry")
        .arg(&entry.id)
        .arg("failed_at_ms")
        .arg(crate::ids::now_ms())
        .ignore()
        .hset(&attempts_key, format!("{}:dead", target.device), 1)
        .ignore()
        .expire(&attempts_key, STATE_TTL_SECONDS as i64)
        .ignore()
        .query_async(conn)
        .await?;
    ctx.metrics.dead_lettered.with_label_values(&[target.platform.as_str()]).inc();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for _ in 0..200 {
            assert!(backoff(base, max, 1) <= base);
            assert!(backoff(base, max, 3) <= base * 4);
            assert!(backoff(base, max, 60) <= max);
        }
        assert_eq!(backoff(Duration::ZERO, max, 5), Duration::ZERO);
        // Not constant: 200 draws from [0, 1 s] are not all equal.
        let draws: HashSet<Duration> = (0..200).map(|_| backoff(base, max, 10)).collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn read_replies_parse_with_missing_and_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("kubechat:push"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("job"), bulk("{}")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
                Value::Array(vec![bulk("3-0"), Value::Array(vec![bulk("other"), bulk("x")])]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply);
        assert_eq!(entries.len(), 3);
        assert_eq!((entries[0].id.as_str(), entries[0].job.as_deref()), ("1-0", Some("{}")));
        assert_eq!((entries[1].id.as_str(), entries[1].job.as_deref()), ("2-0", None));
        assert_eq!((entries[2].id.as_str(), entries[2].job.as_deref()), ("3-0", None));
        assert!(parse_read_reply(&Value::Nil).is_empty());
        let resp3 = Value::Map(vec![(
            bulk("kubechat:push"),
            Value::Array(vec![Value::Array(vec![bulk("4-0"), Value::Map(vec![(bulk("job"), bulk("j"))])])]),
        )]);
        let entries = parse_read_reply(&resp3);
        assert_eq!((entries[0].id.as_str(), entries[0].job.as_deref()), ("4-0", Some("j")));
    }
}
