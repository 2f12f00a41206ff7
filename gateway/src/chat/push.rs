//! Push jobs: notifications owed to recipients with no connected device.
//! The gateway only enqueues; push workers deliver. Clusters queue them on
//! a Redis Stream (consumed by a consumer group); the standalone gateway
//! has no push workers and keeps none.

use std::sync::Arc;

use async_trait::async_trait;
use backon::{ConstantBuilder, Retryable};
use serde::{Deserialize, Serialize};

use crate::push::{PushTarget, PushTargetError};
use crate::store::embedded::EmbeddedStore;
use crate::store::{Message, StoreError};

/// Stream the push workers consume.
pub const PUSH_STREAM: &str = "kubechat:push";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushJob {
    pub user: String,
    /// Decimal message id (JSON-safe).
    pub message_id: String,
    pub channel: String,
    pub sender: String,
    /// The start of the text only: notifications travel through third parties.
    pub summary: String,
}

impl PushJob {
    pub fn new(user: &str, message: &Message, summary_chars: usize) -> Self {
        let mut summary: String = message.text.chars().take(summary_chars).collect();
        if message.text.chars().count() > summary_chars {
            summary.push('…');
        }
        Self {
            user: user.to_string(),
            message_id: message.id.to_string(),
            channel: message.channel.clone(),
            sender: message.sender.clone(),
            summary,
        }
    }
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

/// XADD to [`PUSH_STREAM`], capped (approximately) so an absent consumer
/// cannot grow Redis without bound.
///
/// The connection may have died unnoticed (Redis restarted while the queue
/// was idle: the first write meets `broken pipe`). The connection manager
/// only reconnects after such a failure, so a write that failed with the
/// connection is written again on the fresh one, a few times: a job
/// written twice is sent once (workers send at most once per message and
/// device), a job dropped is a lost notification.
pub struct RedisPushQueue {
    connection: redis::aio::ConnectionManager,
    max_len: usize,
}

/// Writes of one batch of jobs, at most (the first and the retries on a
/// fresh connection), and the pause before each retry.
const ENQUEUE_ATTEMPTS: u32 = 3;
const ENQUEUE_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

impl RedisPushQueue {
    pub fn new(connection: redis::aio::ConnectionManager, max_len: usize) -> Self {
        Self { connection, max_len }
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
        let mut pipe = redis::pipe();
        for job in jobs {
            let payload = serde_json::to_string(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            pipe.cmd("XADD")
                .arg(PUSH_STREAM)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg("*")
                .arg("job")
                .arg(payload)
                .ignore();
        }
        let write = || async { pipe.query_async::<()>(&mut self.connection.clone()).await };
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
        crate::push::register_target(&mut self.connection.clone(), user, target).await
    }

    async fn unregister_target(&self, user: &str, device: &str) -> Result<(), PushTargetError> {
        crate::push::unregister_target(&mut self.connection.clone(), user, device).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_is_cut_short() {
        let message = Message {
            id: 7,
            channel: "dm:a:b".into(),
            sender: "a".into(),
            sender_device: "phone".into(),
            text: "héllo wörld".into(),
            created_at_ms: 0,
        };
        assert_eq!(PushJob::new("b", &message, 5).summary, "héllo…");
        assert_eq!(PushJob::new("b", &message, 50).summary, "héllo wörld");
        assert_eq!(PushJob::new("b", &message, 5).message_id, "7");
    }
}
