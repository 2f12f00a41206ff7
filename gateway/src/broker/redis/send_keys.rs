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
//! While Redis cannot be reached, reservations are [`Reservation::Unknown`]
//! (the store looks in its own rows) and completed sends are kept in a
//! bounded backlog, written with `SET NX` once Redis answers: a retry that
//! reaches another gateway then still finds them. A backlog that overflowed
//! moves `send-keys-since` to now instead (every gateway looks in the store
//! for one window).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::ids::now_ms;
use crate::store::send_keys::{Reservation, SendKeys, SendRecord};

/// Completed sends kept while Redis is unreachable, at most.
const BACKLOG_CAP: usize = 100_000;

/// After a failed command, reservations skip Redis this long (answering
/// `Unknown` at once instead of each waiting for a timeout).
const SKIP_AFTER_FAILURE_MS: i64 = 250;

/// How often a backlog is offered to Redis while nothing else asks.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Reserve atomically (module docs).
/// KEYS: [send key, since key, epoch key]; ARGV: [record, window ms, now ms].
/// Returns {1, record held} | {0 certain | 2 uncertain, since}.
const RESERVE_SCRIPT: &str = r"
local held = redis.call('GET', KEYS[1])
if held then return {1, held} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local since = redis.call('GET', KEYS[2])
if not since then
  if redis.call('GET', KEYS[3]) == '0' then since = '0' else since = ARGV[3] end
  redis.call('SET', KEYS[2], since)
end
if tonumber(ARGV[3]) - tonumber(since) < tonumber(ARGV[2]) then return {2, since} end
return {0, since}
";

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

    pub fn since(&self) -> String {
        format!("{}send-keys-since", self.prefix)
    }

    /// The broker's [`super::wire::EPOCH`] under the same prefix.
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }
}

impl Default for SendKeyNames {
    fn default() -> Self {
        Self { prefix: "kubechat:".into() }
    }
}

#[derive(Default)]
struct Backlog {
    records: Vec<(String, String)>,
    overflowed: bool,
}

pub struct RedisSendKeys {
    connection: ConnectionManager,
    names: SendKeyNames,
    window: Duration,
    script: redis::Script,
    backlog: Mutex<Backlog>,
    /// When a command last failed (ms; 0: never).
    failed_at_ms: AtomicI64,
}

impl RedisSendKeys {
    /// Reservations on `connection` that last `window` (the documented
    /// retry window); a background task offers the backlog to Redis until
    /// the keys are dropped.
    pub fn start(connection: ConnectionManager, names: SendKeyNames, window: Duration) -> Arc<Self> {
        let keys = Arc::new(Self {
            connection,
            names,
            window,
            script: redis::Script::new(RESERVE_SCRIPT),
            backlog: Mutex::default(),
            failed_at_ms: AtomicI64::new(0),
        });
        tokio::spawn(flush_loop(Arc::downgrade(&keys)));
        keys
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX)
    }

    fn failed(&self, error: &redis::RedisError) {
        self.failed_at_ms.store(now_ms(), Ordering::Relaxed);
        crate::warn_throttled!(error = %error, "send keys: Redis unreachable; retries are looked up in the store");
    }

    fn recently_failed(&self) -> bool {
        now_ms() - self.failed_at_ms.load(Ordering::Relaxed) < SKIP_AFTER_FAILURE_MS
    }

    /// Completed sends not yet in Redis.
    pub fn backlog_len(&self) -> usize {
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner).records.len()
    }

    /// Writes the backlog (`SET NX`: a newer reservation stays); an
    /// overflowed one moves `send-keys-since` to now. Put back on failure.
    async fn flush(&self) -> Result<(), redis::RedisError> {
        let Backlog { records, overflowed } =
            std::mem::take(&mut *self.backlog.lock().unwrap_or_else(PoisonError::into_inner));
        if records.is_empty() && !overflowed {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, value) in &records {
            pipe.cmd("SET").arg(key).arg(value).arg("NX").arg("PX").arg(self.window_ms()).ignore();
        }
        if overflowed {
            pipe.cmd("SET").arg(self.names.since()).arg(now_ms()).ignore();
        }
        match pipe.query_async::<()>(&mut self.connection.clone()).await {
            Ok(()) => {
                tracing::info!(
                    records = records.len(),
                    overflowed,
                    "send keys: reservations made while Redis was unreachable are recorded"
                );
                Ok(())
            }
            Err(error) => {
                let mut backlog = self.backlog.lock().unwrap_or_else(PoisonError::into_inner);
                backlog.overflowed |= overflowed;
                for record in records {
                    Self::keep(&mut backlog, record);
                }
                Err(error)
            }
        }
    }

    fn keep(backlog: &mut Backlog, record: (String, String)) {
        if backlog.records.len() >= BACKLOG_CAP {
            backlog.overflowed = true;
        } else {
            backlog.records.push(record);
        }
    }
}

async fn flush_loop(keys: Weak<RedisSendKeys>) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(keys) = keys.upgrade() else { return };
        let pending = {
            let backlog = keys.backlog.lock().unwrap_or_else(PoisonError::into_inner);
            !backlog.records.is_empty() || backlog.overflowed
        };
        if pending && let Err(error) = keys.flush().await {
            keys.failed(&error);
        }
    }
}

#[async_trait]
impl SendKeys for RedisSendKeys {
    async fn reserve(&self, sender: &str, key: &str, candidate: &SendRecord) -> Reservation {
        if self.recently_failed() {
            return Reservation::Unknown;
        }
        if self.backlog_len() > 0 {
            // Earlier sends first: a retry of one of them must find it.
            if let Err(error) = self.flush().await {
                self.failed(&error);
                return Reservation::Unknown;
            }
        }
        let answer: Result<(i64, String), _> = self
            .script
            .key(self.names.send(sender, key))
            .key(self.names.since())
            .key(self.names.epoch())
            .arg(candidate.encode())
            .arg(self.window_ms())
            .arg(now_ms())
            .invoke_async(&mut self.connection.clone())
            .await;
        match answer {
            Ok((0, _)) => Reservation::Reserved { certain: true },
            Ok((2, _)) => Reservation::Reserved { certain: false },
            Ok((_, held)) => match SendRecord::decode(&held) {
                Some(record) => Reservation::Existing(record),
                None => {
                    tracing::warn!(%sender, held, "send keys: unreadable reservation; looking in the store");
                    Reservation::Unknown
                }
            },
            Err(error) => {
                self.failed(&error);
                Reservation::Unknown
            }
        }
    }

    async fn complete(&self, sender: &str, key: &str, record: &SendRecord) {
        let (key, value) = (self.names.send(sender, key), record.encode());
        if !self.recently_failed() {
            let set: Result<(), _> = redis::cmd("SET")
                .arg(&key)
                .arg(&value)
                .arg("PX")
                .arg(self.window_ms())
                .query_async(&mut self.connection.clone())
                .await;
            match set {
                Ok(()) => return,
                Err(error) => self.failed(&error),
            }
        }
        Self::keep(&mut self.backlog.lock().unwrap_or_else(PoisonError::into_inner), (key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_keys_share_a_hash_tag() {
        let names = SendKeyNames::default();
        assert_eq!(names.send("alice", "k:1"), "kubechat:send:{alice}:k:1");
        assert_eq!(names.since(), "kubechat:send-keys-since");
        assert_eq!(names.epoch(), super::super::wire::EPOCH);
    }

    #[test]
    fn the_backlog_is_bounded() {
        let mut backlog = Backlog::default();
        for n in 0..BACKLOG_CAP {
            RedisSendKeys::keep(&mut backlog, (format!("k{n}"), String::new()));
        }
        assert!(!backlog.overflowed);
        RedisSendKeys::keep(&mut backlog, ("one more".into(), String::new()));
        assert!(backlog.overflowed, "past the cap the gap is recorded instead");
        assert_eq!(backlog.records.len(), BACKLOG_CAP);
    }
}
