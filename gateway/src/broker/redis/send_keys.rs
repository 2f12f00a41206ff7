//! Idempotency reservations in Redis ([`SendKeys`] for the CQL store): one
//! `SET NX` per send instead of a Paxos round in the store.
//!
//! Keys (under the prefix, `kubechat:` in production):
//! - `send:{sender}:{key}` → `id:position:done:channel`, expiring after
//!   the retry window (the sender is the hash tag: one slot per user).
//! - `send-keys-since` (ms): reservations made since then are all here. When
//!   it is missing Redis lost its data (it becomes now), unless `epoch` says
//!   Redis never did (a new cluster: 0). For one retry window after it, a
//!   reservation is uncertain and the store looks for earlier attempts.
//!
//! A reservation is plain commands, no script: `SET … NX GET PX` (the
//! record held, if any), then `GET` of the two markers, written in that
//! order (on one server one connection keeps it; on a Redis Cluster the key
//! and the markers live on different shards, each shard's loss its own).
//! The order matters: a wipe between the two can only make the answer
//! uncertain (the markers are gone), never certain by mistake.
//!
//! Completions (the record marked done) are not on the ack's path: they are
//! queued and written by a background task in one pipeline per batch.
//! While Redis cannot be reached, reservations are [`Reservation::Unknown`]
//! (the store looks in its own rows) and completed sends wait in a bounded
//! backlog, written with `SET NX` once Redis answers: a retry that reaches
//! another gateway then still finds them. A backlog that overflowed moves
//! `send-keys-since` to now instead (every gateway looks in the store for
//! one window).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use kubechat_redis::Connection;
use tokio::sync::Notify;

use crate::ids::now_ms;
use crate::store::send_keys::{Reservation, SendKeys, SendRecord};

/// Completed sends kept while Redis is unreachable, at most.
const BACKLOG_CAP: usize = 100_000;

/// After a failed command, reservations skip Redis this long (answering
/// `Unknown` at once instead of each waiting for a timeout).
const SKIP_AFTER_FAILURE_MS: i64 = 1000;

/// The longest a send waits for Redis to reserve its key: a healthy Redis
/// answers in a millisecond; one that does not answer in time (black-holed,
/// overloaded) costs the send only this, then the store is asked instead.
const RESERVE_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the writer retries a backlog while nothing new arrives.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Where the keys live.
#[derive(Clone, Debug)]
pub struct SendKeyNames {
    /// `kubechat:` in production; tests give each run its own.
    pub prefix: String,
}

impl SendKeyNames {
    pub fn send(&self, sender: &str, key: &str) -> String {
        format!("{}send:{{{sender}}}:{key}", self.prefix)
    }

    /// In the broker's `{control}` slot, beside the epoch: both are read
    /// in one step.
    pub fn since(&self) -> String {
        format!("{}{{control}}:send-keys-since", self.prefix)
    }

    /// The broker's [`super::wire::EPOCH`] under the same prefix.
    pub fn epoch(&self) -> String {
        format!("{}{{control}}:epoch", self.prefix)
    }
}

impl Default for SendKeyNames {
    fn default() -> Self {
        Self { prefix: "kubechat:".into() }
    }
}

/// Records waiting to be written: completions (`SET`, marking done) and
/// the backlog of records Redis never saw (`SET NX`).
#[derive(Default)]
struct Queued {
    completions: Vec<(String, String)>,
    backlog: Vec<(String, String)>,
    overflowed: bool,
}

impl Queued {
    fn is_empty(&self) -> bool {
        self.completions.is_empty() && self.backlog.is_empty() && !self.overflowed
    }

    fn keep(&mut self, record: (String, String)) {
        if self.backlog.len() >= BACKLOG_CAP {
            self.overflowed = true;
        } else {
            self.backlog.push(record);
        }
    }
}

pub struct RedisSendKeys {
    connection: Connection,
    names: SendKeyNames,
    window: Duration,
    queued: Mutex<Queued>,
    wake: Notify,
    /// When a command last failed (ms; 0: never).
    failed_at_ms: AtomicI64,
}

impl RedisSendKeys {
    /// Reservations on `connection` that last `window` (the documented
    /// retry window); a background task writes completions and the backlog
    /// until the keys are dropped.
    pub fn start(connection: impl Into<Connection>, names: SendKeyNames, window: Duration) -> Arc<Self> {
        let keys = Arc::new(Self {
            connection: connection.into(),
            names,
            window,
            queued: Mutex::default(),
            wake: Notify::new(),
            failed_at_ms: AtomicI64::new(0),
        });
        tokio::spawn(write_loop(Arc::downgrade(&keys)));
        keys
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn failed(&self, error: &redis::RedisError) {
        self.failed_at_ms.store(now_ms(), Ordering::Relaxed);
        crate::warn_throttled!(error = %error, "send keys: Redis unreachable; retries are looked up in the store");
    }

    fn recently_failed(&self) -> bool {
        now_ms() - self.failed_at_ms.load(Ordering::Relaxed) < SKIP_AFTER_FAILURE_MS
    }

    /// Records made while Redis was unreachable, not yet written there.
    pub fn backlog_len(&self) -> usize {
        self.lock().backlog.len()
    }

    /// Writes what is queued in one pipeline; on failure it all stays (as
    /// backlog: written with `SET NX` later, so a newer reservation stays).
    async fn write_queued(&self) -> Result<(), redis::RedisError> {
        let Queued { completions, backlog, overflowed } = std::mem::take(&mut *self.lock());
        if completions.is_empty() && backlog.is_empty() && !overflowed {
            return Ok(());
        }
        // One pipeline per slot (a cluster refuses them across slots).
        let mut commands = Vec::with_capacity(completions.len() + backlog.len() + 1);
        for (key, value) in &completions {
            commands.push((key.clone(), redis::cmd("SET").arg(key).arg(value).arg("PX").arg(self.window_ms()).clone()));
        }
        for (key, value) in &backlog {
            let set = redis::cmd("SET").arg(key).arg(value).arg("NX").arg("PX").arg(self.window_ms()).clone();
            commands.push((key.clone(), set));
        }
        if overflowed {
            commands.push((self.names.since(), redis::cmd("SET").arg(self.names.since()).arg(now_ms()).clone()));
        }
        match kubechat_redis::query_by_slot(&self.connection, commands).await.map(drop) {
            Ok(()) => {
                if !backlog.is_empty() || overflowed {
                    tracing::info!(
                        records = backlog.len(),
                        overflowed,
                        "send keys: reservations made while Redis was unreachable are recorded"
                    );
                }
                Ok(())
            }
            Err(error) => {
                let mut queued = self.lock();
                queued.overflowed |= overflowed;
                for record in completions.into_iter().chain(backlog) {
                    queued.keep(record);
                }
                Err(error)
            }
        }
    }

    /// Reserves with plain commands (module docs).
    async fn try_reserve(&self, key: &str, candidate: &SendRecord) -> Result<Reservation, redis::RedisError> {
        let (mut key_conn, mut marker_conn) = (self.connection.clone(), self.connection.clone());
        let mut set = redis::cmd("SET");
        set.arg(key).arg(candidate.encode()).arg("NX").arg("GET").arg("PX").arg(self.window_ms());
        let mut get = redis::pipe();
        get.cmd("GET").arg(self.names.since()).cmd("GET").arg(self.names.epoch());
        let reserve = set.query_async::<Option<String>>(&mut key_conn);
        let markers = get.query_async::<(Option<i64>, Option<String>)>(&mut marker_conn);
        // Polled in this order: the SET is written first.
        let (held, markers) = futures::join!(reserve, markers);
        let (held, (since, epoch)) = (held?, markers?);
        if let Some(held) = held {
            return Ok(match SendRecord::decode(&held) {
                Some(record) => Reservation::Existing(record),
                None => {
                    tracing::warn!(held, "send keys: unreadable reservation; looking in the store");
                    Reservation::Unknown
                }
            });
        }
        let now = now_ms();
        let since = match since {
            Some(since) => since,
            None => {
                // Lost (or never set): from now, unless Redis never lost data.
                let since = if epoch.as_deref() == Some("0") { 0 } else { now };
                let (set,): (Option<String>,) = redis::pipe()
                    .cmd("SET")
                    .arg(self.names.since())
                    .arg(since)
                    .arg("NX")
                    .arg("GET")
                    .query_async(&mut self.connection.clone())
                    .await?;
                set.and_then(|s| s.parse().ok()).unwrap_or(since)
            }
        };
        Ok(Reservation::Reserved { certain: now.saturating_sub(since) >= self.window_ms() })
    }
}

async fn write_loop(keys: Weak<RedisSendKeys>) {
    loop {
        // Holds the keys for one round at most: once they are dropped, it ends.
        let Some(live) = keys.upgrade() else { return };
        let wake = live.wake.notified();
        if !live.lock().is_empty()
            && let Err(error) = live.write_queued().await
        {
            live.failed(&error);
        }
        // Woken by a completion, or retried after a while (a backlog).
        let _ = tokio::time::timeout(RETRY_EVERY, wake).await;
    }
}

#[async_trait]
impl SendKeys for RedisSendKeys {
    async fn reserve(&self, sender: &str, key: &str, candidate: &SendRecord) -> Reservation {
        if self.recently_failed() {
            return Reservation::Unknown;
        }
        if self.backlog_len() > 0 || self.lock().overflowed {
            // Earlier sends first: a retry of one of them must find it.
            let written = tokio::time::timeout(RESERVE_TIMEOUT, self.write_queued()).await;
            if !matches!(written, Ok(Ok(()))) {
                let error = match written {
                    Ok(Err(error)) => error,
                    _ => redis::RedisError::from((redis::ErrorKind::Io, "no answer in time")),
                };
                self.failed(&error);
                return Reservation::Unknown;
            }
        }
        let key = self.names.send(sender, key);
        match tokio::time::timeout(RESERVE_TIMEOUT, self.try_reserve(&key, candidate)).await {
            Ok(Ok(reservation)) => reservation,
            Ok(Err(error)) => {
                self.failed(&error);
                Reservation::Unknown
            }
            Err(_) => {
                let timed_out = redis::RedisError::from((redis::ErrorKind::Io, "no answer in time"));
                self.failed(&timed_out);
                Reservation::Unknown
            }
        }
    }

    async fn complete(&self, sender: &str, key: &str, record: &SendRecord) {
        let entry = (self.names.send(sender, key), record.encode());
        let mut queued = self.lock();
        if self.recently_failed() {
            queued.keep(entry);
        } else {
            queued.completions.push(entry);
            drop(queued);
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_keys_share_a_hash_tag() {
        let names = SendKeyNames::default();
        assert_eq!(names.send("alice", "k:1"), "kubechat:send:{alice}:k:1");
        assert_eq!(names.since(), "kubechat:{control}:send-keys-since");
        assert_eq!(names.epoch(), super::super::wire::EPOCH);
    }

    #[test]
    fn the_backlog_is_bounded() {
        let mut queued = Queued::default();
        for n in 0..BACKLOG_CAP {
            queued.keep((format!("k{n}"), String::new()));
        }
        assert!(!queued.overflowed);
        queued.keep(("one more".into(), String::new()));
        assert!(queued.overflowed, "past the cap the gap is recorded instead");
        assert_eq!(queued.backlog.len(), BACKLOG_CAP);
    }
}
