//! Push jobs: notifications owed to recipients with no connected device.
//! The gateway only enqueues; push workers deliver. Clusters queue them on
//! a Redis Stream (consumed by a consumer group); the standalone gateway
//! has no push workers and keeps none.

use std::sync::Arc;

use async_trait::async_trait;
use backon::{ConstantBuilder, Retryable};

use crate::store::embedded::EmbeddedStore;
use crate::store::{Message, StoreError};
use kubechat_push::{JOB_FIELD, MessageRef, PushTarget, PushTargetError};

pub use kubechat_push::{PUSH_PARTITIONS, PUSH_STREAM, PushJob, partition_streams};

/// The job telling `user` about `message`, its text cut to `summary_chars` characters.
pub fn job_for(user: &str, message: &Message, summary_chars: usize) -> PushJob {
    let message =
        MessageRef { id: message.id, channel: &message.channel, sender: &message.sender, text: &message.text };
    PushJob::new(user, message, summary_chars)
}

/// Where push jobs and the devices' push targets go.
#[async_trait]
pub trait PushQueue: Send + Sync + 'static {
    /// Queues the jobs of one message in one round trip.
    async fn enqueue(&self, jobs: &[PushJob]) -> Result<(), StoreError>;
    /// Offline notifications for `user` go to `target` from now on.
    async fn register_target(&self, user: &str, target: &PushTarget) -> Result<(), PushTargetError>;
    /// The device logged out: no more notifications for it.
    async fn unregister_target(&self, user: &str, device: &str) -> Result<(), PushTargetError>;
}

/// The standalone gateway's queue: it has no push workers, so it keeps no
/// jobs (nobody would ever deliver or remove them: each was a durable write
/// growing its disk for good) and refuses registrations instead of
/// accepting tokens it would never use. Its offline users see their
/// messages when they next connect and sync.
#[async_trait]
impl PushQueue for Arc<EmbeddedStore> {
    async fn enqueue(&self, _jobs: &[PushJob]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn register_target(&self, _user: &str, _target: &PushTarget) -> Result<(), PushTargetError> {
        Err(PushTargetError::NotConfigured)
    }

    async fn unregister_target(&self, _user: &str, _device: &str) -> Result<(), PushTargetError> {
        Ok(())
    }
}

/// XADD to the user's partition of [`PUSH_STREAM`] (every partition capped,
/// approximately, so an absent consumer cannot grow Redis without bound).
///
/// The connection may have died unnoticed (Redis restarted while the queue
/// was idle: the first write meets `broken pipe`). The connection manager
/// only reconnects after such a failure, so a write that failed with the
/// connection is written again on the fresh one, a few times: a job
/// written twice is sent once (workers send at most once per message and
/// device), a job dropped is a lost notification.
pub struct RedisPushQueue {
    connection: kubechat_redis::Connection,
    streams: Vec<String>,
    max_len: usize,
}

/// Writes of one batch of jobs, at most (the first and the retries on a
/// fresh connection), and the pause before each retry.
const ENQUEUE_ATTEMPTS: u32 = 3;
const ENQUEUE_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

impl RedisPushQueue {
    pub fn new(connection: impl Into<kubechat_redis::Connection>, max_len: usize) -> Self {
        let streams = partition_streams(PUSH_STREAM, PUSH_PARTITIONS);
        let max_len = max_len.div_ceil(streams.len());
        Self { connection: connection.into(), streams, max_len }
    }
}

/// The connection broke (dropped, reset: Redis restarted): another attempt
/// goes through a new one. Not a timeout (the write may have landed), and
/// not a refusal (Redis is down: retrying at once would only hold up the
/// fan-out behind it).
fn connection_failed(e: &redis::RedisError) -> bool {
    !e.is_timeout() && !e.is_connection_refusal() && (e.is_connection_dropped() || e.is_io_error())
}

#[async_trait]
impl PushQueue for RedisPushQueue {
    async fn enqueue(&self, jobs: &[PushJob]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        // One pipeline per partition's slot (a cluster refuses them across slots).
        let commands: Vec<(String, redis::Cmd)> = jobs
            .iter()
            .map(|job| {
                let stream = &self.streams[kubechat_push::partition_of(&job.user, PUSH_PARTITIONS)];
                let mut xadd = redis::cmd("XADD");
                xadd.arg(stream).arg("MAXLEN").arg("~").arg(self.max_len).arg("*").arg(JOB_FIELD).arg(job.to_payload());
                (stream.clone(), xadd)
            })
            .collect();
        let write = || async { kubechat_redis::query_by_slot(&self.connection, commands.clone()).await.map(drop) };
        let retries =
            ConstantBuilder::default().with_delay(ENQUEUE_RETRY_DELAY).with_max_times(ENQUEUE_ATTEMPTS as usize - 1);
        write
            .retry(retries)
            .when(connection_failed)
            .notify(|e, _| tracing::debug!(error = %e, "push jobs not written; again on a fresh connection"))
            .await
            .map_err(|e| {
                let jobs = jobs.len();
                StoreError::Unavailable(format!(
                    "push queue (Redis XADD × {jobs}, up to {ENQUEUE_ATTEMPTS} attempts): {e}"
                ))
            })
    }

    async fn register_target(&self, user: &str, target: &PushTarget) -> Result<(), PushTargetError> {
        kubechat_push::register_target(&mut self.connection.clone(), user, target).await
    }

    async fn unregister_target(&self, user: &str, device: &str) -> Result<(), PushTargetError> {
        kubechat_push::unregister_target(&mut self.connection.clone(), user, device).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_carries_the_message_and_the_start_of_its_text() {
        let message = Message {
            id: 7,
            channel: "dm:a:b".into(),
            sender: "a".into(),
            sender_device: "phone".into(),
            text: "héllo wörld".into(),
            created_at_ms: 0,
        };
        let job = job_for("b", &message, 5);
        assert_eq!((job.user.as_str(), job.message_id.as_str(), job.channel.as_str()), ("b", "7", "dm:a:b"));
        assert_eq!((job.sender.as_str(), job.summary.as_str()), ("a", "héllo…"));
    }
}
