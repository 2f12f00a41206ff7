//! Working on one entry: sending to each of the user's devices, retrying
//! with backoff, dead-lettering what cannot be sent, acking when done.

use std::time::Duration;

use kubechat_redis::Connection;
use redis::Value;
use tokio_util::sync::CancellationToken;

use super::stream::{Entry, now_ms};
use super::{Ctx, SEND_LIMIT, STATE_TTL_SECONDS};
use crate::job::{JOB_FIELD, PushJob};
use crate::names::PushTarget;
use crate::provider::ProviderError;
use crate::targets::{PushTargetError, pushed_key, unregister_stale_target};

#[derive(Debug, PartialEq, Eq)]
pub(super) enum EntryOutcome {
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

pub(super) async fn process_entry(
    ctx: &Ctx,
    entry: &Entry,
    shutdown: &CancellationToken,
) -> redis::RedisResult<EntryOutcome> {
    let mut conn = ctx.conn.clone();
    let attempts_key = ctx.attempts_key(&entry.id);
    let job = match entry.job.as_deref().map(PushJob::from_payload) {
        Some(Ok(job)) => job,
        Some(Err(e)) => return give_up_on_entry(ctx, &mut conn, entry, &format!("unreadable job: {e}")).await,
        None => return give_up_on_entry(ctx, &mut conn, entry, "the entry has no job field").await,
    };
    let targets = match crate::targets::targets(&mut conn, &job.user).await {
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
    conn: &mut Connection,
    entry: &Entry,
    error: &str,
) -> redis::RedisResult<EntryOutcome> {
    tracing::warn!(entry = %entry.id, error, "dead-lettering an unusable push job");
    let _: Value = dead_letter_entry(ctx, entry, &[], error, 0).query_async(conn).await?;
    ctx.metrics.dead_lettered.with_label_values(&["none"]).inc();
    ack(ctx, conn, &entry.id, &ctx.attempts_key(&entry.id)).await?;
    Ok(EntryOutcome::Acked)
}

async fn ack(ctx: &Ctx, conn: &mut Connection, id: &str, attempts_key: &str) -> redis::RedisResult<()> {
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
    let pushed = pushed_key(&config.stream, &job.message_id, device);
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
    conn: &mut Connection,
    job: &PushJob,
    entry: &Entry,
    target: &PushTarget,
    attempts: u32,
    error: &str,
) -> redis::RedisResult<()> {
    let attempts_key = ctx.attempts_key(&entry.id);
    tracing::warn!(entry = %entry.id, user = %job.user, device = %target.device, attempts, error, "push dead-lettered");
    let about = [("user", job.user.as_str()), ("device", &target.device), ("platform", target.platform.as_str())];
    let _: () = redis::pipe()
        .atomic()
        .add_command(dead_letter_entry(ctx, entry, &about, error, attempts))
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

/// The XADD of one dead letter: the job as it was read, `about` (which
/// device, when one), the error, the attempts made and when it gave up.
fn dead_letter_entry(ctx: &Ctx, entry: &Entry, about: &[(&str, &str)], error: &str, attempts: u32) -> redis::Cmd {
    let config = &ctx.config;
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&config.dead_letter_stream).arg("MAXLEN").arg("~").arg(config.dead_letter_max_len).arg("*");
    xadd.arg(JOB_FIELD).arg(entry.job.as_deref().unwrap_or(""));
    for (field, value) in about {
        xadd.arg(*field).arg(*value);
    }
    xadd.arg("error").arg(error).arg("attempts").arg(attempts).arg("entry").arg(&entry.id);
    xadd.arg("failed_at_ms").arg(now_ms());
    xadd
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

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
}
